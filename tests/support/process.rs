//! Child processes for the tests: [`Proc`] kills its child when dropped (also when a test
//! panics), [`sigterm`] asks a process to stop as a supervisor would, and [`wait_port`] waits
//! until a server a test started listens.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A child process killed when dropped.
pub struct Proc(pub Child);

impl Proc {
    pub fn spawn(cmd: &mut Command) -> Proc {
        Proc(cmd.stdin(Stdio::null()).spawn().expect("process starts"))
    }

    pub fn kill9(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Sends SIGTERM to `pid` (through `kill`, as a supervisor would).
pub fn sigterm(pid: u32) {
    let status = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill -TERM {pid} failed");
}

/// Waits (up to 10 s) until something accepts connections on `127.0.0.1:<port>`.
pub fn wait_port(port: u16) {
    for _ in 0..200 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("nothing listens on {port}");
}

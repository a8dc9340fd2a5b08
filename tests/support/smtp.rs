//! SMTP sink for the notify tests: aiosmtpd (`tests/py/smtp_sink.py`) on a free port, saving
//! every message and envelope it receives to a directory the test reads back, and Python's own
//! MIME parser (`tests/py/parse_eml.py`) to read them. Stops when dropped.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};

use serde_json::Value;

use crate::{python, run_python, temp_dir, workspace_root};

/// aiosmtpd on a free port, saving what it receives; stops when dropped (its stdin closes).
pub struct SmtpSink {
    child: Child,
    _stdin: ChildStdin,
    pub port: u16,
    dir: PathBuf,
}

impl SmtpSink {
    pub fn start(extra: &[&str]) -> SmtpSink {
        let dir = temp_dir("smtp");
        let mut child = Command::new(python())
            .arg(workspace_root().join("tests/py/smtp_sink.py"))
            .arg(&dir)
            .args(extra)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("python runs smtp_sink.py");
        let stdin = child.stdin.take().unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port = line.trim().parse().unwrap_or_else(|_| {
            panic!("smtp_sink.py printed {line:?}, not a port (is aiosmtpd installed?)")
        });
        SmtpSink {
            child,
            _stdin: stdin,
            port,
            dir,
        }
    }

    pub fn url(&self) -> String {
        format!("smtp://127.0.0.1:{}", self.port)
    }

    /// Every message received so far: (envelope metadata, path of the .eml), in order.
    pub fn messages(&self) -> Vec<(Value, PathBuf)> {
        let mut out = Vec::new();
        for n in 1.. {
            let meta = self.dir.join(format!("{n}.json"));
            let Ok(text) = std::fs::read_to_string(&meta) else {
                break;
            };
            out.push((
                serde_json::from_str(&text).unwrap(),
                self.dir.join(format!("{n}.eml")),
            ));
        }
        out
    }

    pub fn to(&self, rcpt: &str) -> Vec<(Value, PathBuf)> {
        self.messages()
            .into_iter()
            .filter(|(m, _)| m["rcpt_tos"].as_array().unwrap().iter().any(|r| r == rcpt))
            .collect()
    }

    pub fn connections(&self) -> u32 {
        std::fs::read_to_string(self.dir.join("connections"))
            .map(|s| s.trim().parse().unwrap())
            .unwrap_or(0)
    }
}

impl Drop for SmtpSink {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// What Python's email package reads in a received message.
pub fn parse_eml(path: &Path) -> Value {
    let out = run_python("parse_eml.py", &[path.to_str().unwrap()], &[]);
    serde_json::from_str(&out).unwrap()
}

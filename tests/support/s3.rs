//! moto's S3-compatible server (from the project's `.venv`) on a free loopback port, and
//! settings whose storage is a bucket in it: what the storage and image-worker tests write to.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use mediafarm::Settings;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::{python, settings};

/// moto's S3 server on a free loopback port; killed when dropped.
pub struct Moto {
    child: Child,
    pub port: u16,
}

impl Moto {
    pub async fn start() -> Moto {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(python())
            .args([
                "-m",
                "moto.server",
                "-H",
                "127.0.0.1",
                "-p",
                &port.to_string(),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("moto server starts (scripts/setup.sh installs moto[server] in .venv)");
        let moto = Moto { child, port };
        let end = Instant::now() + Duration::from_secs(30);
        while http(port, "GET", "/").await.is_none() {
            assert!(Instant::now() < end, "moto did not answer within 30 s");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        moto
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A plain HTTP/1.1 request on loopback: status and body, `None` if nothing answers.
pub async fn http(port: u16, method: &str, target: &str) -> Option<(u16, Vec<u8>)> {
    let exchange = async {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .ok()?;
        let req = format!(
            "{method} {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        );
        s.write_all(req.as_bytes()).await.ok()?;
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.ok()?;
        let split = out.windows(4).position(|w| w == b"\r\n\r\n")?;
        let head = String::from_utf8_lossy(&out[..split]).into_owned();
        let status = head.split_whitespace().nth(1)?.parse().ok()?;
        let body = out[split + 4..].to_vec();
        // moto answers with Content-Length bodies; chunked bodies are not expected here.
        Some((status, body))
    };
    tokio::time::timeout(Duration::from_secs(5), exchange)
        .await
        .ok()
        .flatten()
}

pub fn s3_settings(moto: &Moto, bucket: &str) -> Settings {
    // Credentials come from the environment, as in production; moto accepts any.
    std::env::set_var("AWS_ACCESS_KEY_ID", "test-key");
    std::env::set_var("AWS_SECRET_ACCESS_KEY", "test-secret");
    let mut s = settings();
    s.storage_url = format!("s3://{bucket}/media");
    s.storage_s3_endpoint = Some(moto.endpoint());
    s.storage_s3_path_style = true;
    s
}

impl Moto {
    /// Creates a bucket with a new name; returns the name.
    pub async fn bucket(&self) -> String {
        let bucket = format!("mf-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        let (status, _) = http(self.port, "PUT", &format!("/{bucket}"))
            .await
            .expect("moto answers");
        assert_eq!(status, 200, "bucket created");
        bucket
    }
}

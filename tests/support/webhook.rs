//! A webhook receiver for snapshot-worker's frame deliveries: it checks every accepted POST's
//! `X-Mediafarm-Signature` (HMAC-SHA256 over `<timestamp>.<body>` with [`SECRET`]) and keeps
//! the bodies, and can refuse the first few with 503 to exercise redelivery, or come up late on
//! a port chosen before (a receiver that was down), slowly if asked.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hmac::{Hmac, Mac};
use serde_json::Value;
use sha2::Sha256;

/// The signing secret the receiver expects: give it to the worker as `MEDIAFARM_WEBHOOK_SECRET`.
pub const SECRET: &str = "test-webhook-secret";

/// Receives webhook POSTs; records (timestamp header, signature header, body) of those it
/// accepts, the `X-Mediafarm-Delivery-Id` of those it accepts, and the `X-Mediafarm-Id` of
/// every request.
pub struct Hook {
    port: u16,
    got: Arc<Mutex<Vec<(String, String, Value)>>>,
    pub ids: Arc<Mutex<Vec<String>>>,
    pub delivery_ids: Arc<Mutex<Vec<String>>>,
}

impl Hook {
    pub fn start() -> Hook {
        Hook::flaky(0)
    }

    /// Answers the first `unavailable` requests with 503, then accepts.
    pub fn flaky(unavailable: usize) -> Hook {
        Hook::serve(
            TcpListener::bind("127.0.0.1:0").unwrap(),
            unavailable,
            Duration::ZERO,
        )
    }

    /// Starts accepting on `127.0.0.1:<port>` (a port reserved with `free_port` while the
    /// receiver was "down": connections to it were refused until now).
    pub fn at(port: u16) -> Hook {
        Hook::slow_at(port, Duration::ZERO)
    }

    /// [`Hook::at`], taking `each` to answer every request (one at a time): a slow receiver,
    /// so a delivery is in flight for a while.
    pub fn slow_at(port: u16, each: Duration) -> Hook {
        Hook::serve(TcpListener::bind(("127.0.0.1", port)).unwrap(), 0, each)
    }

    fn serve(listener: TcpListener, unavailable: usize, each: Duration) -> Hook {
        let port = listener.local_addr().unwrap().port();
        let got = Arc::new(Mutex::new(Vec::new()));
        let ids = Arc::new(Mutex::new(Vec::new()));
        let delivery_ids = Arc::new(Mutex::new(Vec::new()));
        let (sink, seen, accepted) = (got.clone(), ids.clone(), delivery_ids.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let mut reader = BufReader::new(stream);
                let (mut len, mut ts, mut sig) = (0usize, String::new(), String::new());
                let mut delivery_id = String::new();
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                    let lower = line.to_ascii_lowercase();
                    let value = line
                        .split_once(':')
                        .map(|(_, v)| v.trim().to_owned())
                        .unwrap_or_default();
                    if lower.starts_with("content-length:") {
                        len = value.parse().unwrap_or(0);
                    } else if lower.starts_with("x-mediafarm-timestamp:") {
                        ts = value;
                    } else if lower.starts_with("x-mediafarm-signature:") {
                        sig = value;
                    } else if lower.starts_with("x-mediafarm-delivery-id:") {
                        delivery_id = value;
                    } else if lower.starts_with("x-mediafarm-id:") {
                        seen.lock().unwrap().push(value);
                    }
                }
                let mut body = vec![0u8; len];
                if reader.read_exact(&mut body).is_err() {
                    continue;
                }
                let mut stream = reader.into_inner();
                std::thread::sleep(each);
                if seen.lock().unwrap().len() <= unavailable {
                    let _ = stream.write_all(
                        b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                    );
                    continue;
                }
                let _ = stream.write_all(
                    b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                );
                let mut mac = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
                mac.update(format!("{ts}.").as_bytes());
                mac.update(&body);
                let want: String = mac
                    .finalize()
                    .into_bytes()
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect();
                assert_eq!(sig, format!("v1={want}"), "webhook signature");
                let json: Value = serde_json::from_slice(&body).unwrap();
                accepted.lock().unwrap().push(delivery_id);
                sink.lock().unwrap().push((ts, sig, json));
            }
        });
        Hook {
            port,
            got,
            ids,
            delivery_ids,
        }
    }

    /// Waits until `n` deliveries were accepted; fails after `within`, listing those seen.
    pub async fn wait_for_deliveries(&self, n: usize, within: Duration) {
        let end = std::time::Instant::now() + within;
        while self.delivery_ids.lock().unwrap().len() < n {
            assert!(
                std::time::Instant::now() < end,
                "not delivered within {} s: {:?}",
                within.as_secs(),
                self.delivery_ids.lock().unwrap()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/frames", self.port)
    }

    pub fn bodies(&self) -> Vec<Value> {
        self.got
            .lock()
            .unwrap()
            .iter()
            .map(|(_, _, b)| b.clone())
            .collect()
    }
}

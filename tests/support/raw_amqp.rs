//! A minimal AMQP 0-9-1 publisher over a plain TCP socket, for messages lapin cannot send:
//! lapin serialises a header table by recursion on its I/O thread, so a header nested
//! thousands of levels deep would overflow the test's own stack before it reached the broker.
//! Here headers are bytes the test builds iteratively ([`nested`], [`table`]), and the
//! publisher speaks just enough of the protocol to put one confirmed message on a queue:
//! handshake (PLAIN), one channel in confirm mode, `basic.publish` with a content header and
//! one body frame, then wait for the broker's ack — or report why it refused.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// What a raw publish ran into. A broker refusal carries the broker's own words.
#[derive(Debug)]
pub enum RawError {
    Io(std::io::Error),
    /// `connection.close` or `channel.close` from the broker: reply code and text.
    Closed {
        code: u16,
        text: String,
    },
    /// `basic.nack` from the broker.
    Nacked,
    /// `basic.return`: no queue took the message (it is published as mandatory).
    Returned {
        code: u16,
        text: String,
    },
    Protocol(String),
}

impl From<std::io::Error> for RawError {
    fn from(e: std::io::Error) -> Self {
        RawError::Io(e)
    }
}

impl std::fmt::Display for RawError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RawError::Io(e) => write!(f, "socket: {e}"),
            RawError::Closed { code, text } => write!(f, "broker closed: {code} {text}"),
            RawError::Nacked => write!(f, "broker nacked the message"),
            RawError::Returned { code, text } => write!(f, "broker returned it: {code} {text}"),
            RawError::Protocol(s) => write!(f, "unexpected from the broker: {s}"),
        }
    }
}

/// Field-table wire bytes. Values include their type byte; a table starts with its length.
pub mod wire {
    pub fn long_string(s: &str) -> Vec<u8> {
        let mut out = vec![b'S'];
        out.extend_from_slice(&len32(s.len()));
        out.extend_from_slice(s.as_bytes());
        out
    }

    pub fn long_long_int(n: i64) -> Vec<u8> {
        let mut out = vec![b'l'];
        out.extend_from_slice(&n.to_be_bytes());
        out
    }

    pub fn short_short_uint(n: u8) -> Vec<u8> {
        vec![b'B', n]
    }

    pub fn double(f: f64) -> Vec<u8> {
        let mut out = vec![b'd'];
        out.extend_from_slice(&f.to_be_bytes());
        out
    }

    pub fn boolean(b: bool) -> Vec<u8> {
        vec![b't', u8::from(b)]
    }

    pub fn void() -> Vec<u8> {
        vec![b'V']
    }

    /// A field array value of already-encoded values.
    pub fn array(values: &[Vec<u8>]) -> Vec<u8> {
        let body: Vec<u8> = values.concat();
        let mut out = vec![b'A'];
        out.extend_from_slice(&len32(body.len()));
        out.extend_from_slice(&body);
        out
    }

    /// A field table as a value (with its type byte).
    pub fn table_value(entries: &[(String, Vec<u8>)]) -> Vec<u8> {
        let mut out = vec![b'F'];
        out.extend_from_slice(&table(entries));
        out
    }

    /// A field table as it stands in message properties (no type byte).
    pub fn table(entries: &[(String, Vec<u8>)]) -> Vec<u8> {
        let body_len: usize = entries.iter().map(|(k, v)| 1 + k.len() + v.len()).sum();
        let mut out = Vec::with_capacity(4 + body_len);
        out.extend_from_slice(&len32(body_len));
        for (key, value) in entries {
            out.push(u8::try_from(key.len()).expect("a short string key"));
            out.extend_from_slice(key.as_bytes());
            out.extend_from_slice(value);
        }
        out
    }

    /// A value of `levels` nested tables (each holding the next under key `k`) or arrays,
    /// written from the outside in without recursion: level `i`'s length is known from the
    /// number of levels under it.
    pub fn nested(levels: usize, tables: bool) -> Vec<u8> {
        let per_level = if tables { 7 } else { 5 };
        let mut out = Vec::with_capacity(levels * per_level);
        for level in 0..levels {
            let below = levels - level - 1;
            out.push(if tables { b'F' } else { b'A' });
            out.extend_from_slice(&len32(below * per_level));
            if tables && below > 0 {
                out.extend_from_slice(&[1, b'k']);
            }
        }
        out
    }

    /// Celery protocol v2 headers for job `id` of `task`, plus `extra`.
    pub fn celery_headers(id: &str, task: &str, extra: Vec<(String, Vec<u8>)>) -> Vec<u8> {
        let mut entries = vec![
            ("lang".to_owned(), long_string("py")),
            ("task".to_owned(), long_string(task)),
            ("id".to_owned(), long_string(id)),
            ("root_id".to_owned(), long_string(id)),
            ("retries".to_owned(), long_long_int(0)),
        ];
        entries.extend(extra);
        table(&entries)
    }

    pub(crate) fn len32(n: usize) -> [u8; 4] {
        u32::try_from(n)
            .expect("a field fits a 32-bit length")
            .to_be_bytes()
    }
}

const FRAME_METHOD: u8 = 1;
const FRAME_HEADER: u8 = 2;
const FRAME_BODY: u8 = 3;
const FRAME_HEARTBEAT: u8 = 8;
const FRAME_END: u8 = 0xCE;
const CHANNEL: u16 = 1;

fn short_string(out: &mut Vec<u8>, s: &str) {
    out.push(u8::try_from(s.len()).expect("a short string"));
    out.extend_from_slice(s.as_bytes());
}

fn method(class: u16, id: u16, args: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + args.len());
    out.extend_from_slice(&class.to_be_bytes());
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(args);
    out
}

struct Conn {
    sock: TcpStream,
    frame_max: usize,
}

impl Conn {
    fn send(&mut self, kind: u8, channel: u16, payload: &[u8]) -> Result<(), RawError> {
        let mut frame = Vec::with_capacity(8 + payload.len());
        frame.push(kind);
        frame.extend_from_slice(&channel.to_be_bytes());
        frame.extend_from_slice(&wire::len32(payload.len()));
        frame.extend_from_slice(payload);
        frame.push(FRAME_END);
        self.sock.write_all(&frame)?;
        Ok(())
    }

    /// The next method frame's (class, method, arguments); heartbeats are skipped and a
    /// close from the broker becomes [`RawError::Closed`].
    fn method(&mut self) -> Result<(u16, u16, Vec<u8>), RawError> {
        loop {
            let mut head = [0u8; 7];
            self.sock.read_exact(&mut head)?;
            let size = u32::from_be_bytes([head[3], head[4], head[5], head[6]]) as usize;
            let mut payload = vec![0u8; size + 1];
            self.sock.read_exact(&mut payload)?;
            if payload.pop() != Some(FRAME_END) {
                return Err(RawError::Protocol("frame without its end byte".into()));
            }
            match head[0] {
                FRAME_HEARTBEAT => continue,
                FRAME_METHOD if payload.len() >= 4 => {
                    let class = u16::from_be_bytes([payload[0], payload[1]]);
                    let id = u16::from_be_bytes([payload[2], payload[3]]);
                    let args = payload.split_off(4);
                    if (class, id) == (10, 50) || (class, id) == (20, 40) {
                        let code = args
                            .get(..2)
                            .map_or(0, |b| u16::from_be_bytes([b[0], b[1]]));
                        let n = args.get(2).copied().unwrap_or(0) as usize;
                        let text = args.get(3..3 + n).unwrap_or_default();
                        return Err(RawError::Closed {
                            code,
                            text: String::from_utf8_lossy(text).into_owned(),
                        });
                    }
                    return Ok((class, id, args));
                }
                other => return Err(RawError::Protocol(format!("frame type {other}"))),
            }
        }
    }

    fn expect(&mut self, class: u16, id: u16) -> Result<Vec<u8>, RawError> {
        let (c, m, args) = self.method()?;
        if (c, m) != (class, id) {
            return Err(RawError::Protocol(format!(
                "method {c}.{m}, expected {class}.{id}"
            )));
        }
        Ok(args)
    }
}

/// Where and as whom to connect: lapin's reading of the URL, so both sides agree.
fn endpoint(broker_url: &str) -> (String, String, String, String) {
    let uri: lapin::uri::AMQPUri = broker_url.parse().expect("broker_url is an AMQP URI");
    let a = uri.authority;
    (
        format!("{}:{}", a.host, a.port),
        a.userinfo.username,
        a.userinfo.password,
        uri.vhost,
    )
}

/// Publishes one persistent JSON message (`content_type` application/json, utf-8) with these
/// header-table bytes to `queue` through the default exchange, as mandatory, and waits for the
/// broker's confirm. `queue` must exist. Blocking; call it from `spawn_blocking`.
pub fn publish(
    broker_url: &str,
    queue: &str,
    headers: &[u8],
    correlation_id: &str,
    body: &[u8],
) -> Result<(), RawError> {
    let (host, user, pass, vhost) = endpoint(broker_url);
    let sock = TcpStream::connect(host)?;
    sock.set_read_timeout(Some(Duration::from_secs(30)))?;
    sock.set_write_timeout(Some(Duration::from_secs(30)))?;
    let mut c = Conn {
        sock,
        frame_max: 4096,
    };
    c.sock.write_all(b"AMQP\x00\x00\x09\x01")?;

    c.expect(10, 10)?; // connection.start
    let mut args = wire::table(&[]);
    short_string(&mut args, "PLAIN");
    let response = format!("\0{user}\0{pass}");
    args.extend_from_slice(&wire::len32(response.len()));
    args.extend_from_slice(response.as_bytes());
    short_string(&mut args, "en_US");
    c.send(FRAME_METHOD, 0, &method(10, 11, &args))?;

    let tune = c.expect(10, 30)?; // connection.tune: channel_max, frame_max, heartbeat
    if tune.len() < 8 {
        return Err(RawError::Protocol("short connection.tune".into()));
    }
    c.frame_max = u32::from_be_bytes([tune[2], tune[3], tune[4], tune[5]]) as usize;
    let mut args = tune[..6].to_vec();
    args.extend_from_slice(&0u16.to_be_bytes()); // no heartbeats for a connection this short
    c.send(FRAME_METHOD, 0, &method(10, 31, &args))?;

    let mut args = Vec::new();
    short_string(&mut args, &vhost);
    short_string(&mut args, "");
    args.push(0);
    c.send(FRAME_METHOD, 0, &method(10, 40, &args))?;
    c.expect(10, 41)?;

    c.send(FRAME_METHOD, CHANNEL, &method(20, 10, &[0]))?;
    c.expect(20, 11)?;
    c.send(FRAME_METHOD, CHANNEL, &method(85, 10, &[0]))?; // confirm.select
    c.expect(85, 11)?;

    let mut args = 0u16.to_be_bytes().to_vec();
    short_string(&mut args, "");
    short_string(&mut args, queue);
    args.push(1); // mandatory: a message no queue takes comes back instead of vanishing
    c.send(FRAME_METHOD, CHANNEL, &method(60, 40, &args))?;

    // Content header: basic class, weight, body size, then the properties whose flag bits
    // are set, in flag order.
    let mut header = Vec::with_capacity(64 + headers.len());
    header.extend_from_slice(&60u16.to_be_bytes());
    header.extend_from_slice(&0u16.to_be_bytes());
    header.extend_from_slice(&(body.len() as u64).to_be_bytes());
    const CONTENT_TYPE: u16 = 1 << 15;
    const CONTENT_ENCODING: u16 = 1 << 14;
    const HEADERS: u16 = 1 << 13;
    const DELIVERY_MODE: u16 = 1 << 12;
    const CORRELATION_ID: u16 = 1 << 10;
    let flags = CONTENT_TYPE | CONTENT_ENCODING | HEADERS | DELIVERY_MODE | CORRELATION_ID;
    header.extend_from_slice(&flags.to_be_bytes());
    short_string(&mut header, "application/json");
    short_string(&mut header, "utf-8");
    header.extend_from_slice(headers);
    header.push(2); // persistent
    short_string(&mut header, correlation_id);
    let sent = c.send(FRAME_HEADER, CHANNEL, &header).and_then(|()| {
        for chunk in body.chunks(c.frame_max.saturating_sub(8).max(1)) {
            c.send(FRAME_BODY, CHANNEL, chunk)?;
        }
        Ok(())
    });
    if let Err(e) = sent {
        // A broker that refuses the message mid-write (a frame over frame_max) says why in a
        // connection.close that may already be waiting; prefer its words to the socket's.
        return match c.method() {
            Err(closed @ RawError::Closed { .. }) => Err(closed),
            _ => Err(e),
        };
    }

    match c.method()? {
        (60, 80, _) => {}
        (60, 120, _) => return Err(RawError::Nacked),
        (60, 50, args) => {
            let code = args
                .get(..2)
                .map_or(0, |b| u16::from_be_bytes([b[0], b[1]]));
            let n = args.get(2).copied().unwrap_or(0) as usize;
            let text = args.get(3..3 + n).unwrap_or_default();
            return Err(RawError::Returned {
                code,
                text: String::from_utf8_lossy(text).into_owned(),
            });
        }
        (class, id, _) => {
            return Err(RawError::Protocol(format!(
                "method {class}.{id}, expected basic.ack"
            )))
        }
    }

    let mut args = 200u16.to_be_bytes().to_vec();
    short_string(&mut args, "done");
    args.extend_from_slice(&[0, 0, 0, 0]);
    c.send(FRAME_METHOD, 0, &method(10, 50, &args))?;
    c.expect(10, 51)?;
    Ok(())
}

//! An RTMP player over a Tokio socket: the plain (version 3, digest-less) handshake, `connect`,
//! `createStream` and `play` as FFmpeg's RTMP client sends them, then media messages read in
//! batches with [`Player::read_now`] and handed out by [`Player::next_media`], which answers the
//! server's pings and acknowledgement window on the way. What the caller does not keep of a
//! media message is never copied (see [`super::chunk`]). Memory per player: its receive
//! buffer ([`INITIAL_BUFFER`], growing to at most [`MAX_BUFFER`] for fast streams) plus the
//! messages it keeps.
//!
//! Once `play` is sent the socket leaves the runtime's reactor and is read on the caller's
//! timer with non-blocking calls ([`Player::read_now`]): a registered socket makes the reactor
//! report every packet the server sends (about 30 a second per stream, 60,000 a second on a
//! 2,000-session core), waking its thread for data nobody waits for until the next batch.

use std::io::ErrorKind;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::amf0::{self, Value};
use super::chunk::{self, ChunkError, Head, Message, Reader};

/// The receive buffer a player starts with: 200 ms of a 400 kbit/s stream, twice over.
pub const INITIAL_BUFFER: usize = 16 << 10;
/// What the receive buffer may grow to when reads keep filling it (a 6 Mbit/s stream read
/// every 200 ms brings 150 KB).
pub const MAX_BUFFER: usize = 256 << 10;
/// Our chunk size: every command we send fits one chunk.
const OUT_CHUNK: usize = 4096;
/// Acknowledgement window we announce to the server.
const OUR_WINDOW: u32 = 2_500_000;
/// What FFmpeg asks of a live play (`rtmp_live live`: start -1000).
const PLAY_LIVE: f64 = -1000.0;
/// Buffer length told to the server, ms (FFmpeg's default).
const BUFFER_MS: u32 = 3000;

#[derive(Debug, thiserror::Error)]
pub enum RtmpError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("handshake failed: {0}")]
    Handshake(String),
    #[error("protocol error: {0}")]
    Chunk(#[from] ChunkError),
    #[error("unreadable command: {0}")]
    Amf(#[from] amf0::AmfError),
    /// The server said no (`_error`, or an `onStatus` of level `error`).
    #[error("the server answered {code}: {description}")]
    Refused { code: String, description: String },
    /// The stream ended (`NetStream.Play.Stop`, `UnpublishNotify`).
    #[error("the stream ended ({0})")]
    Ended(String),
    #[error("the server closed the connection")]
    Closed,
    #[error("{0}")]
    Url(String),
}

/// Where to play from: `rtmp://host[:port]/app/stream[?query]`, split as FFmpeg splits it
/// (the application is the first path segment, the stream name the rest).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub host: String,
    pub port: u16,
    pub app: String,
    pub stream: String,
    pub tc_url: String,
}

impl Target {
    pub fn parse(text: &str) -> Result<Target, RtmpError> {
        let url = url::Url::parse(text).map_err(|e| RtmpError::Url(e.to_string()))?;
        if url.scheme() != "rtmp" {
            return Err(RtmpError::Url(format!(
                "{}:// is not plain RTMP",
                url.scheme()
            )));
        }
        let host = url
            .host_str()
            .ok_or_else(|| RtmpError::Url("no host".into()))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let port = url.port().unwrap_or(1935);
        let path = url.path().trim_start_matches('/');
        let (app, stream) = path.split_once('/').unwrap_or((path, ""));
        if app.is_empty() || stream.is_empty() {
            return Err(RtmpError::Url(
                "names no application and stream (rtmp://host/app/stream)".into(),
            ));
        }
        let mut stream = stream.to_owned();
        if let Some(q) = url.query() {
            stream.push('?');
            stream.push_str(q);
        }
        let tc_url = match url.port() {
            Some(p) => format!("rtmp://{}:{p}/{app}", url.host_str().unwrap_or_default()),
            None => format!("rtmp://{}/{app}", url.host_str().unwrap_or_default()),
        };
        Ok(Target {
            host,
            port,
            app: app.to_owned(),
            stream,
            tc_url,
        })
    }
}

/// The player's socket: on the reactor while commands wait for answers, off it once playing.
enum Sock {
    Reactor(TcpStream),
    /// Non-blocking, read and written only when the caller asks.
    Polled(std::net::TcpStream),
    /// Only while the socket moves from one to the other.
    Gone,
}

impl Sock {
    /// The socket while commands wait for answers (before `play` is sent).
    fn reactor(&mut self) -> Result<&mut TcpStream, RtmpError> {
        match self {
            Sock::Reactor(sock) => Ok(sock),
            _ => Err(RtmpError::Io(std::io::Error::other(
                "the connection is no longer driven by the runtime",
            ))),
        }
    }
}

/// A playing connection; see the module doc.
pub struct Player {
    sock: Sock,
    reader: Reader,
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// Whether the last read filled all the room it had (more is probably waiting).
    saturated: bool,
    out: Vec<u8>,
    received: u64,
    acked: u64,
    window: u32,
    stream_id: u32,
    txn: f64,
}

fn command(name: &str, txn: f64, rest: &[Value]) -> Vec<u8> {
    let mut body = Vec::with_capacity(256);
    amf0::write(&mut body, &Value::Str(name.into()));
    amf0::write(&mut body, &Value::Number(txn));
    for v in rest {
        amf0::write(&mut body, v);
    }
    body
}

fn status_of(values: &[Value]) -> (String, String, String) {
    let info = values.get(3);
    let field = |k: &str| {
        info.and_then(|i| i.get(k))
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned()
    };
    (field("level"), field("code"), field("description"))
}

impl Player {
    /// Connects, handshakes and asks to play `target`'s stream. Returns once `play` is sent;
    /// a refusal then arrives as an error from [`Player::next_media`].
    pub async fn play(target: &Target) -> Result<Player, RtmpError> {
        let sock = TcpStream::connect((target.host.as_str(), target.port)).await?;
        sock.set_nodelay(true)?;
        let mut p = Player::new(Sock::Reactor(sock));
        p.handshake().await?;
        chunk::write_message(
            &mut p.out,
            2,
            chunk::SET_CHUNK_SIZE,
            0,
            &(OUT_CHUNK as u32).to_be_bytes(),
            128,
        );
        let connect = Value::Object(vec![
            ("app".into(), Value::Str(target.app.clone())),
            ("flashVer".into(), Value::Str("LNX 9,0,124,2".into())),
            ("tcUrl".into(), Value::Str(target.tc_url.clone())),
            ("fpad".into(), Value::Bool(false)),
            ("capabilities".into(), Value::Number(15.0)),
            ("audioCodecs".into(), Value::Number(4071.0)),
            ("videoCodecs".into(), Value::Number(252.0)),
            ("videoFunction".into(), Value::Number(1.0)),
        ]);
        p.invoke("connect", &[connect], 0).await?;
        chunk::write_message(
            &mut p.out,
            2,
            chunk::WINDOW_ACK,
            0,
            &OUR_WINDOW.to_be_bytes(),
            OUT_CHUNK,
        );
        let created = p.invoke("createStream", &[Value::Null], 0).await?;
        let id = created.get(3).and_then(Value::as_f64).unwrap_or(1.0);
        p.stream_id = if id.is_finite() && id >= 0.0 && id < f64::from(u32::MAX) {
            id as u32
        } else {
            1
        };
        let mut ctl = Vec::with_capacity(10);
        ctl.extend_from_slice(&3u16.to_be_bytes());
        ctl.extend_from_slice(&p.stream_id.to_be_bytes());
        ctl.extend_from_slice(&BUFFER_MS.to_be_bytes());
        chunk::write_message(&mut p.out, 2, chunk::USER_CONTROL, 0, &ctl, OUT_CHUNK);
        p.txn += 1.0;
        let play = command(
            "play",
            p.txn,
            &[
                Value::Null,
                Value::Str(target.stream.clone()),
                Value::Number(PLAY_LIVE),
            ],
        );
        chunk::write_message(
            &mut p.out,
            8,
            chunk::COMMAND_AMF0,
            p.stream_id,
            &play,
            OUT_CHUNK,
        );
        p.flush().await?;
        p.leave_reactor()?;
        Ok(p)
    }

    fn new(sock: Sock) -> Player {
        Player {
            sock,
            reader: Reader::default(),
            buf: vec![0; INITIAL_BUFFER],
            start: 0,
            end: 0,
            saturated: false,
            out: Vec::with_capacity(1024),
            received: 0,
            acked: 0,
            window: 0,
            stream_id: 0,
            txn: 0.0,
        }
    }

    /// Takes the socket off the reactor (it stays non-blocking): from now on it is read only
    /// by [`Player::read_now`] and written by [`Player::write_now`].
    fn leave_reactor(&mut self) -> Result<(), RtmpError> {
        if let Sock::Reactor(sock) = std::mem::replace(&mut self.sock, Sock::Gone) {
            self.sock = Sock::Polled(sock.into_std()?);
        }
        Ok(())
    }

    async fn handshake(&mut self) -> Result<(), RtmpError> {
        let mut c0c1 = vec![0u8; 1537];
        c0c1[0] = 3;
        // Time and zero version (the plain handshake), then filler the server echoes back.
        let mut x = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0x9e37_79b9, |d| d.as_nanos() as u32)
            | 1;
        for b in &mut c0c1[9..] {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            *b = x as u8;
        }
        self.sock.reactor()?.write_all(&c0c1).await?;
        let mut s0s1 = vec![0u8; 1537];
        self.read_exact(&mut s0s1).await?;
        if s0s1[0] != 3 {
            return Err(RtmpError::Handshake(format!(
                "the server speaks RTMP version {}, not 3",
                s0s1[0]
            )));
        }
        self.sock.reactor()?.write_all(&s0s1[1..]).await?;
        let mut s2 = vec![0u8; 1536];
        self.read_exact(&mut s2).await?;
        Ok(())
    }

    async fn read_exact(&mut self, buf: &mut [u8]) -> Result<(), RtmpError> {
        match self.sock.reactor()?.read_exact(buf).await {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == ErrorKind::UnexpectedEof => Err(RtmpError::Closed),
            Err(e) => Err(e.into()),
        }
    }

    /// Sends a command and waits for its `_result`; returns the result's values.
    async fn invoke(
        &mut self,
        name: &str,
        args: &[Value],
        stream_id: u32,
    ) -> Result<Vec<Value>, RtmpError> {
        self.txn += 1.0;
        let txn = self.txn;
        let body = command(name, txn, args);
        chunk::write_message(
            &mut self.out,
            3,
            chunk::COMMAND_AMF0,
            stream_id,
            &body,
            OUT_CHUNK,
        );
        self.flush().await?;
        loop {
            while let Some(values) = self.next_command()? {
                let answers = values.get(1).and_then(Value::as_f64) == Some(txn);
                match values.first().and_then(Value::as_str) {
                    Some("_result") if answers => return Ok(values),
                    Some("_error") if answers => {
                        let (_, code, description) = status_of(&values);
                        return Err(RtmpError::Refused { code, description });
                    }
                    _ => {}
                }
            }
            self.flush().await?;
            self.fill().await?;
        }
    }

    /// The next command among the buffered messages (media is dropped: none is expected
    /// before `play`).
    fn next_command(&mut self) -> Result<Option<Vec<Value>>, RtmpError> {
        loop {
            let (used, msg) = self
                .reader
                .next(&self.buf[self.start..self.end], &mut |h, _| {
                    !matches!(h.type_id, chunk::AUDIO | chunk::VIDEO | chunk::AGGREGATE)
                })?;
            if used == 0 {
                return Ok(None);
            }
            self.start += used;
            if let Some(msg) = msg {
                if let Some(values) = self.control(msg)? {
                    return Ok(Some(values));
                }
            }
        }
    }

    /// Handles a non-media message; returns a command's values for the caller.
    fn control(&mut self, msg: Message) -> Result<Option<Vec<Value>>, RtmpError> {
        let body = &msg.body;
        match msg.head.type_id {
            chunk::WINDOW_ACK if body.len() >= 4 => {
                self.window = u32::from_be_bytes([body[0], body[1], body[2], body[3]]);
            }
            // Ping request: answer with the same timestamp.
            chunk::USER_CONTROL if body.len() >= 6 && body[..2] == [0, 6] => {
                let mut pong = vec![0, 7];
                pong.extend_from_slice(&body[2..6]);
                chunk::write_message(&mut self.out, 2, chunk::USER_CONTROL, 0, &pong, OUT_CHUNK);
            }
            chunk::COMMAND_AMF0 | chunk::COMMAND_AMF3 => {
                let data = if msg.head.type_id == chunk::COMMAND_AMF3 {
                    body.get(1..).unwrap_or_default()
                } else {
                    body
                };
                let values = amf0::read_all(data)?;
                if values.first().and_then(Value::as_str) == Some("onStatus") {
                    let (level, code, description) = status_of(&values);
                    if level == "error" {
                        return Err(RtmpError::Refused { code, description });
                    }
                    if code == "NetStream.Play.Stop" || code == "NetStream.Play.UnpublishNotify" {
                        return Err(RtmpError::Ended(code));
                    }
                    return Ok(None);
                }
                return Ok(Some(values));
            }
            _ => {}
        }
        Ok(None)
    }

    /// Makes room in the receive buffer for the next read: moves what is left to its front
    /// and grows it (up to [`MAX_BUFFER`]) when reads keep filling it.
    fn make_room(&mut self) {
        if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        let need = self.reader.max_chunk_bytes().max(INITIAL_BUFFER);
        if self.buf.len() < need {
            self.buf.resize(need, 0);
        } else if (self.saturated || self.end == self.buf.len()) && self.buf.len() < MAX_BUFFER {
            self.buf.resize((self.buf.len() * 2).min(MAX_BUFFER), 0);
        }
        if self.end == self.buf.len() {
            // Cannot happen while the caller drains `next_media` between reads (a buffer
            // always holds a whole chunk), but a zero-length read must not read as a close.
            self.buf
                .resize(self.buf.len() + self.reader.max_chunk_bytes(), 0);
        }
    }

    /// Takes in `n` bytes just read into the buffer; queues an acknowledgement when the
    /// server's window is used up.
    fn took(&mut self, n: usize) {
        self.saturated = self.end + n == self.buf.len();
        self.end += n;
        self.received += n as u64;
        if self.window > 0 && self.received - self.acked >= u64::from(self.window) {
            self.acked = self.received;
            let seq = (self.received & 0xffff_ffff) as u32;
            chunk::write_message(
                &mut self.out,
                2,
                chunk::ACK,
                0,
                &seq.to_be_bytes(),
                OUT_CHUNK,
            );
        }
    }

    /// Before `play`: waits until the socket has data, then reads what it has (one read).
    async fn fill(&mut self) -> Result<usize, RtmpError> {
        self.make_room();
        loop {
            let sock = self.sock.reactor()?;
            sock.readable().await?;
            match sock.try_read(&mut self.buf[self.end..]) {
                Ok(0) => return Err(RtmpError::Closed),
                Ok(n) => {
                    self.took(n);
                    return Ok(n);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Once playing: reads what the socket has now (one non-blocking read; 0 when nothing
    /// arrived since the last). Call [`Player::next_media`] until it gives `None` before the
    /// next read.
    pub fn read_now(&mut self) -> Result<usize, RtmpError> {
        self.make_room();
        let Sock::Polled(sock) = &mut self.sock else {
            return Err(RtmpError::Closed);
        };
        loop {
            match std::io::Read::read(sock, &mut self.buf[self.end..]) {
                Ok(0) => return Err(RtmpError::Closed),
                Ok(n) => {
                    self.took(n);
                    return Ok(n);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    self.saturated = false;
                    return Ok(0);
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Whether the last fill filled the buffer: more is probably waiting, read again now.
    pub fn saturated(&self) -> bool {
        self.saturated
    }

    /// The next kept media message (audio, video, data) among the buffered bytes. `keep` is
    /// asked at each media message's first chunk; control messages are handled here.
    pub fn next_media(
        &mut self,
        keep: &mut dyn FnMut(&Head, &[u8]) -> bool,
    ) -> Result<Option<Message>, RtmpError> {
        loop {
            let (used, msg) = self.reader.next(
                &self.buf[self.start..self.end],
                &mut |h, first| match h.type_id {
                    chunk::AUDIO
                    | chunk::VIDEO
                    | chunk::DATA_AMF0
                    | chunk::DATA_AMF3
                    | chunk::AGGREGATE => keep(h, first),
                    _ => true,
                },
            )?;
            if used == 0 {
                return Ok(None);
            }
            self.start += used;
            let Some(msg) = msg else { continue };
            match msg.head.type_id {
                chunk::AUDIO
                | chunk::VIDEO
                | chunk::DATA_AMF0
                | chunk::DATA_AMF3
                | chunk::AGGREGATE => return Ok(Some(msg)),
                _ => {
                    self.control(msg)?;
                }
            }
        }
    }

    /// Before `play`: sends what is queued (commands).
    async fn flush(&mut self) -> Result<(), RtmpError> {
        if !self.out.is_empty() {
            self.sock.reactor()?.write_all(&self.out).await?;
            self.out.clear();
        }
        Ok(())
    }

    /// Once playing: sends what is queued (acknowledgements, pongs) as far as the socket takes
    /// it now; the rest goes with the next call. These are a few bytes a second, so the send
    /// buffer holds them unless the server stopped reading.
    pub fn write_now(&mut self) -> Result<(), RtmpError> {
        let Sock::Polled(sock) = &mut self.sock else {
            return Err(RtmpError::Closed);
        };
        let mut sent = 0;
        while sent < self.out.len() {
            match std::io::Write::write(sock, &self.out[sent..]) {
                Ok(0) => return Err(RtmpError::Closed),
                Ok(n) => sent += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
            }
        }
        self.out.drain(..sent);
        Ok(())
    }

    /// Bytes held for this player (its buffers' capacity).
    pub fn buffered_capacity(&self) -> usize {
        self.buf.capacity() + self.out.capacity()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_split_as_ffmpeg_splits_them() {
        let t = Target::parse("rtmp://127.0.0.1:19350/live/room7").unwrap();
        assert_eq!(
            t,
            Target {
                host: "127.0.0.1".into(),
                port: 19350,
                app: "live".into(),
                stream: "room7".into(),
                tc_url: "rtmp://127.0.0.1:19350/live".into(),
            }
        );
        let t = Target::parse("rtmp://media.example/app/a/b?token=x").unwrap();
        assert_eq!((t.port, t.app.as_str()), (1935, "app"));
        assert_eq!(t.stream, "a/b?token=x");
        assert!(Target::parse("rtmp://h/live").is_err());
        assert!(Target::parse("rtmps://h/live/x").is_err());
    }

    /// A playing player on one end of a local connection, the server's end as the other.
    fn polled_pair() -> (Player, std::net::TcpStream) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        client.set_nonblocking(true).unwrap();
        (Player::new(Sock::Polled(client)), server)
    }

    /// Reads until something arrived (loopback delivers at once; the bound only keeps a
    /// broken test from hanging).
    fn read_some(p: &mut Player) -> Result<usize, RtmpError> {
        for _ in 0..1000 {
            let n = p.read_now()?;
            if n > 0 {
                return Ok(n);
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        Ok(0)
    }

    #[test]
    fn a_playing_player_reads_without_waiting_and_answers_pings() {
        use std::io::{Read, Write};
        let (mut p, mut server) = polled_pair();
        // Nothing sent yet: the read comes back empty instead of waiting.
        assert_eq!(p.read_now().unwrap(), 0);
        assert!(!p.saturated());
        let mut sent = Vec::new();
        chunk::write_message(
            &mut sent,
            2,
            chunk::USER_CONTROL,
            0,
            &[0, 6, 1, 2, 3, 4],
            128,
        );
        chunk::write_message(&mut sent, 6, chunk::VIDEO, 1, &[0x17, 0, 0, 0, 0, 9], 128);
        server.write_all(&sent).unwrap();
        let mut got = 0;
        while got < sent.len() {
            let n = read_some(&mut p).unwrap();
            assert!(n > 0, "the sent bytes never arrived");
            got += n;
        }
        let video = p
            .next_media(&mut |_, _| true)
            .unwrap()
            .expect("the video message");
        assert_eq!(video.body, [0x17, 0, 0, 0, 0, 9]);
        assert!(p.next_media(&mut |_, _| true).unwrap().is_none());
        // The ping was answered into the out queue; write_now sends it.
        p.write_now().unwrap();
        let mut pong = Vec::new();
        chunk::write_message(
            &mut pong,
            2,
            chunk::USER_CONTROL,
            0,
            &[0, 7, 1, 2, 3, 4],
            OUT_CHUNK,
        );
        let mut answer = vec![0; pong.len()];
        server.read_exact(&mut answer).unwrap();
        assert_eq!(answer, pong);
        // The server going away reads as a close, not as "nothing yet".
        drop(server);
        assert!(matches!(read_some(&mut p), Err(RtmpError::Closed)));
    }
}

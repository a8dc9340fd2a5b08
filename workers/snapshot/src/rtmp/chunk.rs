//! RTMP's chunk stream, sans I/O: [`Reader`] turns received bytes into messages and
//! [`write_message`] frames outgoing ones. A message is judged at its first chunk
//! ([`Reader::next`]'s `keep`): one that is not kept is counted past, chunk by chunk, and never
//! copied or allocated — that is how a snapshot session drops the video frames it will not
//! decode. Limits: a chunk size above [`MAX_CHUNK`] or a kept message above [`MAX_MESSAGE`]
//! is a protocol error (a hostile server cannot make a session allocate much).

/// The largest chunk size a peer may set (FFmpeg and the servers use 128 to 64 KiB).
pub const MAX_CHUNK: usize = 1 << 20;
/// The smallest chunk size accepted: a video message is judged by its first chunk, which must
/// hold the FLV video tag's 5-byte header (frame type, codec, packet type, composition time).
/// The protocol allows 1, no server sends less than 128, and below 5 every frame would be
/// dropped unseen — a session that stalls silently — so it is refused by name instead.
pub const MIN_CHUNK: usize = 5;
/// The largest message kept (a 4K keyframe is a few MB).
pub const MAX_MESSAGE: usize = 8 << 20;
/// Chunk stream ids the reader tracks at once (servers use a handful).
const MAX_STREAMS: usize = 64;

pub const SET_CHUNK_SIZE: u8 = 1;
pub const ABORT: u8 = 2;
pub const ACK: u8 = 3;
pub const USER_CONTROL: u8 = 4;
pub const WINDOW_ACK: u8 = 5;
pub const PEER_BANDWIDTH: u8 = 6;
pub const AUDIO: u8 = 8;
pub const VIDEO: u8 = 9;
pub const DATA_AMF3: u8 = 15;
pub const COMMAND_AMF3: u8 = 17;
pub const DATA_AMF0: u8 = 18;
pub const COMMAND_AMF0: u8 = 20;
pub const AGGREGATE: u8 = 22;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ChunkError {
    #[error("the server set chunk size {0}; {MIN_CHUNK} to {MAX_CHUNK} are accepted")]
    ChunkSize(u32),
    #[error("the server sent a {0}-byte message; at most {MAX_MESSAGE} is accepted")]
    TooLong(u32),
    #[error("the server used more than {MAX_STREAMS} chunk streams")]
    TooManyStreams,
    #[error("a chunk continues a message on chunk stream {0} that never started")]
    NoHeader(u32),
}

/// A message's header, known at its first chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Head {
    pub type_id: u8,
    /// Milliseconds (RTMP's 32-bit clock).
    pub timestamp: u32,
    pub len: u32,
    pub stream_id: u32,
}

/// A whole kept message.
#[derive(Debug, PartialEq)]
pub struct Message {
    pub head: Head,
    pub body: Vec<u8>,
}

#[derive(Debug)]
struct Stream {
    csid: u32,
    head: Head,
    /// The raw timestamp field of the last header with one (delta, or absolute for type 0):
    /// what a type-3 header that starts a new message adds, as FFmpeg reads it.
    ts_field: u32,
    extended: bool,
    /// Bytes of the current message received so far (0: between messages).
    got: u32,
    /// `Some` while a kept message is being gathered.
    body: Option<Vec<u8>>,
}

/// Received-bytes parser; see the module doc.
#[derive(Debug)]
pub struct Reader {
    chunk_size: usize,
    streams: Vec<Stream>,
}

impl Default for Reader {
    fn default() -> Reader {
        Reader {
            chunk_size: 128,
            streams: Vec::new(),
        }
    }
}

fn be24(b: &[u8]) -> u32 {
    (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2])
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

impl Reader {
    /// The peer's chunk size (set by its `Set Chunk Size`).
    pub fn chunk_size(&self) -> usize {
        self.chunk_size
    }

    /// The most bytes one chunk (headers included) can take.
    pub fn max_chunk_bytes(&self) -> usize {
        self.chunk_size + 18
    }

    /// Parses one chunk from the front of `data`. Returns how many bytes it used (0: `data`
    /// holds no whole chunk yet) and the message it completed, if that message is kept.
    /// `keep(head, first)` is asked once per message, with the start of its body (the first
    /// chunk's payload). Set Chunk Size and Abort are applied here and returned as well.
    pub fn next(
        &mut self,
        data: &[u8],
        keep: &mut dyn FnMut(&Head, &[u8]) -> bool,
    ) -> Result<(usize, Option<Message>), ChunkError> {
        let Some(&b0) = data.first() else {
            return Ok((0, None));
        };
        let fmt = b0 >> 6;
        let (csid, mut at) = match b0 & 0x3f {
            0 if data.len() >= 2 => (64 + u32::from(data[1]), 2),
            1 if data.len() >= 3 => (64 + u32::from(data[1]) + 256 * u32::from(data[2]), 3),
            0 | 1 => return Ok((0, None)),
            n => (u32::from(n), 1),
        };
        let header_len = [11, 7, 3, 0][usize::from(fmt)];
        if data.len() < at + header_len {
            return Ok((0, None));
        }
        let h = &data[at..at + header_len];
        at += header_len;
        let idx = match self.streams.iter().position(|s| s.csid == csid) {
            Some(i) => i,
            None if fmt != 0 && fmt != 1 => return Err(ChunkError::NoHeader(csid)),
            None if self.streams.len() >= MAX_STREAMS => return Err(ChunkError::TooManyStreams),
            None => {
                self.streams.push(Stream {
                    csid,
                    head: Head {
                        type_id: 0,
                        timestamp: 0,
                        len: 0,
                        stream_id: 0,
                    },
                    ts_field: 0,
                    extended: false,
                    got: 0,
                    body: None,
                });
                self.streams.len() - 1
            }
        };
        let st = &self.streams[idx];
        let (field, extended) = if fmt < 3 {
            let f = be24(h);
            (f, f == 0xff_ffff)
        } else {
            (st.ts_field, st.extended)
        };
        let ext_ts = if extended {
            if data.len() < at + 4 {
                return Ok((0, None));
            }
            let t = be32(&data[at..at + 4]);
            at += 4;
            Some(t)
        } else {
            None
        };
        let mut head = st.head;
        let starts = fmt < 3 || st.got == 0;
        if fmt <= 1 {
            head.len = be24(&h[3..6]);
            head.type_id = h[6];
        }
        if fmt == 0 {
            head.stream_id = u32::from_le_bytes([h[7], h[8], h[9], h[10]]);
        }
        let ts_field = ext_ts.unwrap_or(field);
        if starts {
            head.timestamp = if fmt == 0 {
                ts_field
            } else {
                head.timestamp.wrapping_add(ts_field)
            };
        }
        let got = if starts { 0 } else { st.got };
        let n = (head.len - got).min(self.chunk_size as u32) as usize;
        if data.len() < at + n {
            return Ok((0, None));
        }
        let payload = &data[at..at + n];
        let used = at + n;
        // The whole chunk is here: commit.
        let st = &mut self.streams[idx];
        if fmt < 3 {
            st.ts_field = ts_field;
            st.extended = extended;
        }
        st.head = head;
        if starts {
            let kept = keep(&head, payload);
            st.body = None;
            if kept {
                if head.len as usize > MAX_MESSAGE {
                    return Err(ChunkError::TooLong(head.len));
                }
                st.body = Some(Vec::with_capacity(head.len as usize));
            }
        }
        if let Some(body) = st.body.as_mut() {
            body.extend_from_slice(payload);
        }
        st.got = got + n as u32;
        if st.got < head.len {
            return Ok((used, None));
        }
        st.got = 0;
        let Some(body) = st.body.take() else {
            return Ok((used, None));
        };
        match head.type_id {
            SET_CHUNK_SIZE if body.len() >= 4 => {
                let size = be32(&body) & 0x7fff_ffff;
                if !(MIN_CHUNK..=MAX_CHUNK).contains(&(size as usize)) {
                    return Err(ChunkError::ChunkSize(size));
                }
                self.chunk_size = size as usize;
            }
            ABORT if body.len() >= 4 => {
                let aborted = be32(&body);
                if let Some(s) = self.streams.iter_mut().find(|s| s.csid == aborted) {
                    s.got = 0;
                    s.body = None;
                }
            }
            _ => {}
        }
        Ok((used, Some(Message { head, body })))
    }
}

/// Appends `body` as one message on chunk stream `csid` (type-0 header, then type-3 chunks
/// of at most `chunk_size` bytes), timestamp 0.
pub fn write_message(
    out: &mut Vec<u8>,
    csid: u8,
    type_id: u8,
    stream_id: u32,
    body: &[u8],
    chunk_size: usize,
) {
    debug_assert!((2..64).contains(&csid));
    out.push(csid);
    out.extend_from_slice(&[0, 0, 0]);
    out.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    out.push(type_id);
    out.extend_from_slice(&stream_id.to_le_bytes());
    for (i, part) in body.chunks(chunk_size.max(1)).enumerate() {
        if i > 0 {
            out.push(0xc0 | csid);
        }
        out.extend_from_slice(part);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(
        r: &mut Reader,
        mut data: &[u8],
        keep: &mut dyn FnMut(&Head, &[u8]) -> bool,
    ) -> Vec<Message> {
        let mut out = Vec::new();
        loop {
            let (used, msg) = r.next(data, keep).unwrap();
            if used == 0 {
                return out;
            }
            data = &data[used..];
            out.extend(msg);
        }
    }

    #[test]
    fn messages_across_chunks_are_gathered_and_skipped_ones_are_not() {
        let mut wire = Vec::new();
        let big: Vec<u8> = (0..300u32).map(|i| i as u8).collect();
        write_message(&mut wire, 6, VIDEO, 1, &big, 128);
        write_message(&mut wire, 4, AUDIO, 1, &[0xaf; 200], 128);
        write_message(&mut wire, 6, VIDEO, 1, &[0x27; 10], 128);
        let mut r = Reader::default();
        let mut seen = Vec::new();
        let got = all(&mut r, &wire, &mut |h, first| {
            seen.push((h.type_id, first.len()));
            h.type_id == VIDEO && first[0] != 0x27
        });
        assert_eq!(seen, vec![(VIDEO, 128), (AUDIO, 128), (VIDEO, 10)]);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].body, big);
        assert_eq!(got[0].head.stream_id, 1);
        // A partial chunk is not consumed.
        let mut r = Reader::default();
        assert_eq!(r.next(&wire[..50], &mut |_, _| true).unwrap().0, 0);
    }

    #[test]
    fn timestamps_follow_the_header_types_and_the_chunk_size_changes() {
        let mut wire = Vec::new();
        // Set Chunk Size 4096.
        write_message(&mut wire, 2, SET_CHUNK_SIZE, 0, &4096u32.to_be_bytes(), 128);
        // Type 0 at an extended timestamp 0x01000000, then a type-1 delta of 40, then a
        // type-3 header starting a new message (adds the last delta again).
        wire.extend_from_slice(&[0x06, 0xff, 0xff, 0xff, 0, 0, 2, VIDEO, 1, 0, 0, 0]);
        wire.extend_from_slice(&0x0100_0000u32.to_be_bytes());
        wire.extend_from_slice(&[0x17, 1]);
        wire.extend_from_slice(&[0x46, 0, 0, 40, 0, 0, 2, VIDEO]);
        wire.extend_from_slice(&[0x27, 1]);
        wire.extend_from_slice(&[0xc6, 0x27, 1]);
        let mut r = Reader::default();
        let got = all(&mut r, &wire, &mut |_, _| true);
        assert_eq!(r.chunk_size(), 4096);
        let ts: Vec<u32> = got.iter().skip(1).map(|m| m.head.timestamp).collect();
        assert_eq!(ts, vec![0x0100_0000, 0x0100_0028, 0x0100_0050]);
    }

    #[test]
    fn hostile_headers_are_errors() {
        let mut wire = Vec::new();
        write_message(
            &mut wire,
            2,
            SET_CHUNK_SIZE,
            0,
            &u32::MAX.to_be_bytes(),
            128,
        );
        let mut r = Reader::default();
        assert!(matches!(
            r.next(&wire, &mut |_, _| true),
            Err(ChunkError::ChunkSize(_))
        ));
        // Too small to judge a video message by its first chunk.
        let mut wire = Vec::new();
        write_message(&mut wire, 2, SET_CHUNK_SIZE, 0, &4u32.to_be_bytes(), 128);
        let mut r = Reader::default();
        assert_eq!(
            r.next(&wire, &mut |_, _| true),
            Err(ChunkError::ChunkSize(4))
        );
        let mut r = Reader::default();
        assert_eq!(
            r.next(&[0xc7, 1, 2], &mut |_, _| true),
            Err(ChunkError::NoHeader(7))
        );
        let mut wire = vec![0x06, 0, 0, 0, 0xff, 0xff, 0xff, VIDEO, 1, 0, 0, 0];
        wire.extend_from_slice(&[0x17; 128]);
        let mut r = Reader::default();
        assert!(matches!(
            r.next(&wire, &mut |_, _| true),
            Err(ChunkError::TooLong(_))
        ));
    }
}

//! What the fuzz targets run, with their replay tests. `snapshot_args`: the first line names
//! the task (`capture` or `watch`), the rest is its kwargs as JSON, taken through the
//! runtime's deserialisation and every check made before a stream is opened (including the key
//! template). `rtmp_stream`: bytes as an RTMP server sends them after the handshake, through
//! the chunk reader, FLV tag classification and AMF0 as the RTMP engine reads them. No I/O.
//! Not part of the supported API.

use std::time::Duration;

use mediafarm::TaskError;

use crate::capture::{self, Capture};
use crate::rtmp::{amf0, chunk, flv};
use crate::watch::{self, Watch};

/// `snapshot_capture_timeout`'s stand-in when `timeout_s` is absent.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(15);

/// What the kwargs were found to be.
#[derive(Debug)]
pub enum Checked {
    Capture(capture::CaptureArgs),
    Watch(watch::WatchArgs),
}

pub fn snapshot_kwargs(data: &[u8]) -> Result<Checked, TaskError> {
    let (task, kwargs) = match data.iter().position(|b| *b == b'\n') {
        Some(nl) => (&data[..nl], &data[nl + 1..]),
        None => (data, &b""[..]),
    };
    match task {
        b"capture" => {
            let args = mediafarm::fuzzing::kwargs::<Capture>(kwargs)?;
            capture::check_args(&args, DEFAULT_TIMEOUT)?;
            Ok(Checked::Capture(args))
        }
        b"watch" => {
            let args = mediafarm::fuzzing::kwargs::<Watch>(kwargs)?;
            watch::check_args(&args)?;
            Ok(Checked::Watch(args))
        }
        _ => Err(TaskError::invalid(
            "FuzzInput",
            "the first line must be `capture` or `watch`",
        )),
    }
}

/// Reads `data` as a server's chunk stream, arriving in pieces whose size its first byte picks
/// (as a socket fills a buffer), keeping what the engine keeps (video tags it would decode,
/// commands and data). Returns how many messages were kept, or the protocol error that ends
/// the session; never panics, never loops.
pub fn rtmp_stream(data: &[u8]) -> Result<usize, String> {
    let mut reader = chunk::Reader::default();
    let step = 1 + usize::from(data.first().copied().unwrap_or(0) % 64);
    let (mut start, mut end, mut kept) = (0, 0, 0);
    loop {
        end = (end + step).min(data.len());
        loop {
            let (used, msg) = reader
                .next(&data[start..end], &mut |head, first| match head.type_id {
                    chunk::VIDEO => matches!(
                        flv::classify(first),
                        flv::Video::AvcConfig | flv::Video::AvcFrame { key: true, .. }
                    ),
                    chunk::AUDIO | chunk::AGGREGATE => false,
                    _ => true,
                })
                .map_err(|e| e.to_string())?;
            if used == 0 {
                break;
            }
            start += used;
            let Some(msg) = msg else { continue };
            kept += 1;
            match msg.head.type_id {
                chunk::VIDEO => {
                    if let flv::Video::AvcConfig | flv::Video::AvcFrame { .. } =
                        flv::classify(&msg.body)
                    {
                        // What the engine hands the decoder: the body past the tag header.
                        let _ = &msg.body[flv::AVC_HEADER..];
                    }
                }
                chunk::COMMAND_AMF0 | chunk::DATA_AMF0 => {
                    let _ = amf0::read_all(&msg.body);
                }
                _ => {}
            }
        }
        if end == data.len() {
            return Ok(kept);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    /// Files whose outcome is pinned: (file, text the error must contain); `None`: accepted.
    const EXPECTED: &[(&str, Option<&str>)] = &[
        ("seeds/capture-readme", None),
        ("seeds/capture-file", None),
        ("seeds/capture-webp", None),
        ("seeds/watch-readme", None),
        ("seeds/watch-all", None),
        (
            "seeds/watch-bad-template",
            Some("unknown placeholder {nope}"),
        ),
    ];

    /// `rtmp_stream`'s pinned files (`fixtures/fuzz/rtmp_stream/make_seeds.py` writes the
    /// seeds): (file, text the protocol error must contain); `None`: read to the end.
    const RTMP_EXPECTED: &[(&str, Option<&str>)] = &[
        ("seeds/play-session", None),
        ("seeds/small-chunks", None),
        ("seeds/extended-timestamps", None),
        ("seeds/abort-and-unsupported", None),
    ];

    /// A small deterministic generator (xorshift), so the stream test needs no dependency.
    struct Bytes(u64);

    impl Bytes {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n.max(1)
        }

        /// Up to `max` - 1 random bytes.
        fn upto(&mut self, max: u64) -> Vec<u8> {
            let n = self.below(max);
            (0..n).map(|_| self.next() as u8).collect()
        }
    }

    /// A plausible stream: Set Chunk Size, video tags (config, keyframes, inter frames),
    /// commands, audio, in chunks of the size in force, some messages cut or corrupted.
    fn plausible(g: &mut Bytes) -> Vec<u8> {
        let mut out = Vec::new();
        let mut size = 128usize;
        for _ in 0..g.below(12) {
            match g.below(5) {
                0 => {
                    size = 1 + g.below(300) as usize;
                    chunk::write_message(
                        &mut out,
                        2,
                        chunk::SET_CHUNK_SIZE,
                        0,
                        &(size as u32).to_be_bytes(),
                        128,
                    );
                }
                1 | 2 => {
                    let mut body = vec![[0x17, 0x27, 0x12, 0xc7][g.below(4) as usize]];
                    body.push(g.below(3) as u8);
                    body.extend(g.upto(400));
                    chunk::write_message(&mut out, 6, chunk::VIDEO, 1, &body, size);
                }
                3 => {
                    let body = g.upto(80);
                    let kind = [chunk::COMMAND_AMF0, chunk::DATA_AMF0, chunk::AUDIO];
                    let kind = kind[g.below(3) as usize];
                    chunk::write_message(&mut out, 3 + g.below(5) as u8, kind, 1, &body, size);
                }
                _ => {
                    // A corrupted byte somewhere, or raw noise.
                    if !out.is_empty() && g.below(2) == 0 {
                        let at = g.below(out.len() as u64) as usize;
                        out[at] = g.next() as u8;
                    } else {
                        out.extend(g.upto(40));
                    }
                }
            }
        }
        out
    }

    #[test]
    fn rtmp_streams_never_panic_and_well_formed_ones_are_read() {
        let mut g = Bytes(0x9e37_79b9_7f4a_7c15);
        let (mut read, mut refused) = (0, 0);
        for _ in 0..20_000 {
            let data = if g.below(4) == 0 {
                g.upto(600)
            } else {
                plausible(&mut g)
            };
            match rtmp_stream(&data) {
                Ok(n) if n > 0 => read += 1,
                Ok(_) => {}
                Err(_) => refused += 1,
            }
        }
        // The generator reaches both the readers behind the chunk layer and its refusals.
        assert!(
            read > 5_000 && refused > 500,
            "read {read}, refused {refused}"
        );
        // A well-formed stream: every kept message is read, across chunk sizes.
        let mut data = Vec::new();
        chunk::write_message(
            &mut data,
            2,
            chunk::SET_CHUNK_SIZE,
            0,
            &7u32.to_be_bytes(),
            128,
        );
        let key: Vec<u8> = [0x17, 1, 0, 0, 0].iter().copied().chain(0..200u8).collect();
        let inter: Vec<u8> = [0x27, 1, 0, 0, 0].iter().copied().chain(0..90u8).collect();
        for body in [&[0x17u8, 0, 0, 0, 0, 1, 0x64][..], &key, &inter, &key] {
            chunk::write_message(&mut data, 6, chunk::VIDEO, 1, body, 7);
        }
        // Set Chunk Size (kept and applied), the config and both keyframes; the inter frame not.
        assert_eq!(rtmp_stream(&data), Ok(4));
    }

    #[test]
    fn rtmp_stream_corpus_replays() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/fuzz/rtmp_stream");
        let ran = mediafarm::fuzzing::replay_expecting(&dir, RTMP_EXPECTED, |data| {
            rtmp_stream(data).err()
        });
        assert!(ran >= RTMP_EXPECTED.len());
        // nginx-rtmp's answers to connect, createStream and play (nine messages), the AVC
        // configuration and the keyframe; the inter frame and the audio are passed over.
        let session = std::fs::read(dir.join("seeds/play-session")).expect("seed");
        assert_eq!(rtmp_stream(&session), Ok(11));
    }

    #[test]
    fn snapshot_args_corpus_replays() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/fuzz/snapshot_args");
        mediafarm::fuzzing::replay_expecting(&dir, EXPECTED, |data| {
            snapshot_kwargs(data).err().map(|e| e.to_string())
        });
    }
}

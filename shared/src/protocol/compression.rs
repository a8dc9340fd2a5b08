//! Message bodies compressed the way kombu compresses them (Celery's `task_compression` or
//! `send_task(..., compression=...)`): the `compression` header names the method by the MIME
//! type kombu registers (or one of its aliases), and the body holds the compressed bytes.
//!
//! Promise: a body is inflated into at most `limit` bytes — a decompression bomb stops at the
//! limit with an error that says so, never by exhausting memory. Every decoder here is pure
//! Rust and reads from memory, so nothing is written to disk and no C library is linked.

use std::io::Read;

/// The methods kombu registers, by their MIME type, with the aliases kombu also accepts.
/// `application/x-gzip` is kombu's name for zlib's format (`zlib.compress`); a real gzip
/// stream under that name is accepted too.
const METHODS: &[(&str, Method, &[&str])] = &[
    ("application/x-gzip", Method::Zlib, &["gzip", "zlib"]),
    ("application/x-bz2", Method::Bzip2, &["bzip2", "bzip"]),
    ("application/x-brotli", Method::Brotli, &["brotli"]),
    ("application/x-lzma", Method::Lzma, &["lzma", "xz"]),
    ("application/zstd", Method::Zstd, &["zstd", "zstandard"]),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Method {
    Zlib,
    Bzip2,
    Brotli,
    Lzma,
    Zstd,
}

/// Why a compressed body could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CompressionError {
    #[error(
        "compression {method:?} is not supported: accepted are {} (as kombu names them)",
        accepted()
    )]
    Unknown { method: String },
    #[error("body compressed with {method} does not decompress: {reason}")]
    Corrupt { method: String, reason: String },
    #[error(
        "body compressed with {method} inflates past {limit} bytes \
         (task_message_max_bytes); the message is refused unread"
    )]
    TooLarge { method: String, limit: usize },
}

fn accepted() -> String {
    METHODS
        .iter()
        .map(|(name, _, aliases)| format!("{name} ({})", aliases.join(", ")))
        .collect::<Vec<_>>()
        .join("; ")
}

/// Decompresses `body` compressed with `method` (kombu's MIME type or alias) into at most
/// `limit` bytes.
pub fn decompress(method: &str, body: &[u8], limit: usize) -> Result<Vec<u8>, CompressionError> {
    let wanted = method.trim();
    let Some((name, kind, _)) = METHODS.iter().find(|(name, _, aliases)| {
        name.eq_ignore_ascii_case(wanted) || aliases.iter().any(|a| a.eq_ignore_ascii_case(wanted))
    }) else {
        // The name comes from the wire: keep what an error shows of it short.
        let shown: String = method.chars().take(80).collect();
        return Err(CompressionError::Unknown { method: shown });
    };
    let corrupt = |reason: String| CompressionError::Corrupt {
        method: (*name).to_owned(),
        reason,
    };
    let out = match kind {
        Method::Zlib if body.starts_with(&[0x1f, 0x8b]) => {
            read_capped(flate2::read::GzDecoder::new(body), limit)
        }
        Method::Zlib => read_capped(flate2::read::ZlibDecoder::new(body), limit),
        Method::Bzip2 => read_capped(bzip2::read::BzDecoder::new(body), limit),
        Method::Brotli => read_capped(brotli_decompressor::Decompressor::new(body, 4096), limit),
        Method::Zstd => {
            let decoder = ruzstd::decoding::StreamingDecoder::new(body)
                .map_err(|e| corrupt(e.to_string()))?;
            read_capped(decoder, limit)
        }
        Method::Lzma => return lzma(body, limit).map_err(|e| lzma_error(e, name, limit)),
    };
    match out {
        Ok(Capped::Fits(bytes)) => Ok(bytes),
        Ok(Capped::Over) => Err(CompressionError::TooLarge {
            method: (*name).to_owned(),
            limit,
        }),
        Err(e) => Err(corrupt(e.to_string())),
    }
}

enum Capped {
    Fits(Vec<u8>),
    Over,
}

fn read_capped(reader: impl Read, limit: usize) -> std::io::Result<Capped> {
    let mut out = Vec::new();
    reader
        .take(limit as u64 + 1)
        .read_to_end(&mut out)
        .map(|_| {
            if out.len() > limit {
                Capped::Over
            } else {
                Capped::Fits(out)
            }
        })
}

/// Python's `lzma.decompress` (kombu's decoder) reads both the .xz container and the legacy
/// .lzma ("alone") format; so does this.
fn lzma(body: &[u8], limit: usize) -> Result<Vec<u8>, lzma_rs::error::Error> {
    const XZ_MAGIC: &[u8] = &[0xfd, b'7', b'z', b'X', b'Z', 0x00];
    let options = lzma_rs::decompress::Options {
        memlimit: Some(limit.saturating_mul(2).max(1 << 20)),
        ..Default::default()
    };
    let mut input = std::io::BufReader::new(body);
    let mut out = LimitedSink {
        bytes: Vec::new(),
        limit,
    };
    if body.starts_with(XZ_MAGIC) {
        // lzma-rs has no memory limit for .xz and keeps a whole block in memory before it
        // writes any of it to `out`: the limit is checked on the chunk headers first.
        xz_within(body, limit)?;
        lzma_rs::xz_decompress(&mut input, &mut out)?;
    } else {
        lzma_rs::lzma_decompress_with_options(&mut input, &mut out, &options)?;
    }
    Ok(out.bytes)
}

/// Checks that an .xz body cannot inflate past `limit`, from the sizes its LZMA2 chunk headers
/// declare (lzma-rs stops each chunk at its declared size), without decoding anything: a
/// bomb is refused before a byte of it is inflated. A structure this walk cannot follow is
/// refused as corrupt; the decoder would refuse it too.
fn xz_within(body: &[u8], limit: usize) -> Result<(), lzma_rs::error::Error> {
    let bad = |what: &str| lzma_rs::error::Error::XzError(format!("{what} (.xz structure)"));
    let byte = |at: usize| body.get(at).copied().ok_or_else(|| bad("cut short"));
    let be16 = |at: usize| -> Result<usize, lzma_rs::error::Error> {
        Ok((usize::from(byte(at)?) << 8) | usize::from(byte(at + 1)?))
    };
    // Stream header: magic (6), flags (2; the check type in the low nibble), CRC32 (4).
    let check = match byte(7)? & 0x0f {
        0 => 0,
        t => 4 << ((t - 1) / 3),
    };
    let (mut at, mut total) = (12usize, 0usize);
    // Blocks until the index (a zero where a block header's size would be).
    while byte(at)? != 0 {
        let block = at;
        at += (usize::from(byte(at)?) + 1) * 4;
        loop {
            let ctrl = byte(at)?;
            let (unpacked, len) = match ctrl {
                0 => break,
                // Uncompressed chunk: its size, then the bytes.
                1 | 2 => {
                    let n = be16(at + 1)? + 1;
                    (n, 3 + n)
                }
                // LZMA chunk: unpacked size (21 bits), packed size, new properties from 0xc0.
                0x80..=0xff => {
                    let n = ((usize::from(ctrl & 0x1f) << 16) | be16(at + 1)?) + 1;
                    let packed = be16(at + 3)? + 1;
                    (n, 5 + usize::from(ctrl >= 0xc0) + packed)
                }
                _ => return Err(bad("invalid LZMA2 chunk")),
            };
            total = total.saturating_add(unpacked);
            if total > limit {
                return Err(lzma_rs::error::Error::IoError(std::io::Error::new(
                    std::io::ErrorKind::FileTooLarge,
                    "declared size past the limit",
                )));
            }
            at += len;
        }
        // The end marker, padding to four bytes from the block's start, the check.
        at += 1;
        at += (4 - (at - block) % 4) % 4 + check;
    }
    Ok(())
}

fn lzma_error(e: lzma_rs::error::Error, name: &str, limit: usize) -> CompressionError {
    match e {
        lzma_rs::error::Error::IoError(io) if io.kind() == std::io::ErrorKind::FileTooLarge => {
            CompressionError::TooLarge {
                method: name.to_owned(),
                limit,
            }
        }
        other => CompressionError::Corrupt {
            method: name.to_owned(),
            reason: other.to_string(),
        },
    }
}

/// A writer that refuses bytes past `limit` (lzma-rs writes its output instead of being read).
struct LimitedSink {
    bytes: Vec<u8>,
    limit: usize,
}

impl std::io::Write for LimitedSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.bytes.len() + buf.len() > self.limit {
            return Err(std::io::Error::new(
                std::io::ErrorKind::FileTooLarge,
                "output limit reached",
            ));
        }
        self.bytes.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    const BODY: &[u8] = br#"[[], {"a": 1}, {"callbacks": null}]"#;

    fn zlib(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    #[test]
    fn kombu_names_and_aliases_decode() {
        let z = zlib(BODY);
        for name in ["application/x-gzip", "gzip", "zlib", "Application/X-Gzip"] {
            assert_eq!(decompress(name, &z, 1024).unwrap(), BODY, "{name}");
        }
        let mut g = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        g.write_all(BODY).unwrap();
        let g = g.finish().unwrap();
        assert_eq!(decompress("application/x-gzip", &g, 1024).unwrap(), BODY);
        let mut b = bzip2::write::BzEncoder::new(Vec::new(), bzip2::Compression::fast());
        b.write_all(BODY).unwrap();
        let b = b.finish().unwrap();
        assert_eq!(decompress("application/x-bz2", &b, 1024).unwrap(), BODY);
        let mut x = Vec::new();
        lzma_rs::xz_compress(&mut std::io::Cursor::new(BODY), &mut x).unwrap();
        assert_eq!(decompress("xz", &x, 1024).unwrap(), BODY);
        let mut l = Vec::new();
        lzma_rs::lzma_compress(&mut std::io::Cursor::new(BODY), &mut l).unwrap();
        assert_eq!(decompress("application/x-lzma", &l, 1024).unwrap(), BODY);
    }

    #[test]
    fn bombs_stop_at_the_limit() {
        let zeros = vec![0u8; 1 << 20];
        let z = zlib(&zeros);
        assert!(z.len() < 4096);
        let e = decompress("application/x-gzip", &z, 64 * 1024).unwrap_err();
        assert!(matches!(e, CompressionError::TooLarge { .. }), "{e}");
        assert!(e.to_string().contains("task_message_max_bytes"));
        let mut x = Vec::new();
        lzma_rs::xz_compress(&mut std::io::Cursor::new(&zeros), &mut x).unwrap();
        let e = decompress("application/x-lzma", &x, 64 * 1024).unwrap_err();
        assert!(matches!(e, CompressionError::TooLarge { .. }), "{e}");
    }

    /// A real .xz bomb: Python's `lzma.compress` (what kombu's `lzma` compression calls) of
    /// 64 MiB of zeros, 9.9 KB; the body of the `message_json` fuzz seed `xz-bomb-64-mib`.
    fn xz_bomb() -> Vec<u8> {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../fixtures/fuzz/message_json/seeds/xz-bomb-64-mib");
        let data = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let nul = data
            .iter()
            .position(|b| *b == 0)
            .expect("headers, NUL, body");
        data[nul + 1..].to_vec()
    }

    #[test]
    fn xz_bombs_are_refused_from_their_chunk_headers() {
        let bomb = xz_bomb();
        // Whole, or cut short in its last chunks: refused as too large from the first chunk's
        // header. lzma-rs alone would gather the whole block in memory first (64 MiB here; a
        // 1 MB body holds about 6 GiB) and fail the cut one only at its end, as corrupt.
        for body in [&bomb[..], &bomb[..bomb.len() - 200]] {
            let e = decompress("application/x-lzma", body, 1 << 20).unwrap_err();
            assert!(matches!(e, CompressionError::TooLarge { .. }), "{e}");
        }
        // A structure the walk cannot follow is corrupt, never read past its end.
        for body in [&bomb[..13], &bomb[..40]] {
            let e = decompress("xz", body, 64 << 20).unwrap_err();
            assert!(matches!(e, CompressionError::Corrupt { .. }), "{e}");
        }
    }

    #[test]
    fn unknown_and_corrupt_bodies_are_explained() {
        let e = decompress("snappy", BODY, 1024).unwrap_err();
        assert!(e.to_string().contains("\"snappy\" is not supported"), "{e}");
        assert!(e.to_string().contains("application/zstd"), "{e}");
        for name in [
            "gzip",
            "bzip2",
            "brotli",
            "lzma",
            "xz",
            "zstd",
            "application/zstd",
        ] {
            let e = decompress(name, b"definitely not compressed", 1024).unwrap_err();
            assert!(matches!(e, CompressionError::Corrupt { .. }), "{name}: {e}");
        }
    }
}

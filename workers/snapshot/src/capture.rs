//! `snapshot.capture`: one frame. From a file at `at_s` (seek to the keyframe before it, decode
//! forward to that time), from a live URL the next keyframe (decoded on its own). `timeout_s`
//! bounds the whole capture through FFmpeg's interrupt callback, so a server that accepts and
//! then says nothing ends the job on time. FFmpeg runs on a blocking thread; decode and encode
//! take a slot of the CPU gate.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use ffmpeg_next as ff;
use mediafarm::storage::Storage;
use mediafarm::{Settings, Task, TaskContext, TaskError};

use crate::settings::SnapshotSettings;
use serde::{Deserialize, Serialize};

use crate::cpu_gate::CpuGate;
use crate::media::{
    EncodeSpec, Encoded, EncoderPool, Format, Input, Interrupt, KeyDecoder, MediaError, Read,
};
use crate::source::{SourceKind, StreamSource};
use crate::template;

pub const DEFAULT_QUALITY: u8 = 80;
const MAX_WIDTH_RANGE: std::ops::RangeInclusive<u32> = 16..=8192;
const MAX_TIMEOUT_S: f64 = 600.0;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaptureArgs {
    /// `file://` (allowed roots), `https://` HLS, `rtmp://` or `rtsp://`.
    pub stream_url: String,
    /// Storage key; `{time}` is the capture time.
    pub key: String,
    /// Seconds from the start of a file.
    pub at_s: Option<f64>,
    #[serde(default)]
    pub format: Format,
    pub quality: Option<u8>,
    pub max_width: Option<u32>,
    pub timeout_s: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CaptureResult {
    pub key: String,
    pub url: String,
    pub width: u32,
    pub height: u32,
    pub bytes: u64,
    /// The frame's time: from the file's start for files, the stream clock for live sources.
    pub pts_s: f64,
    pub captured_at: String,
    pub format: Format,
}

pub struct Capture {
    settings: Settings,
    snapshot: SnapshotSettings,
    storage: Storage,
}

impl Capture {
    pub fn new(settings: &Settings, snapshot: &SnapshotSettings, storage: Storage) -> Capture {
        Capture {
            settings: settings.clone(),
            snapshot: snapshot.clone(),
            storage,
        }
    }
}

/// Sets the stop flag when the job's future is dropped (hard limit, revoke with terminate),
/// so FFmpeg's interrupt callback ends the blocking thread too.
pub struct StopOnDrop(pub Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Checks what the image options allow.
pub fn check_image_args(quality: Option<u8>, max_width: Option<u32>) -> Result<u8, TaskError> {
    let quality = quality.unwrap_or(DEFAULT_QUALITY);
    if !(1..=100).contains(&quality) {
        return Err(TaskError::invalid(
            "InvalidArguments",
            format!("quality {quality} is not accepted: 1 to 100"),
        ));
    }
    if let Some(w) = max_width.filter(|w| !MAX_WIDTH_RANGE.contains(w)) {
        return Err(TaskError::invalid(
            "InvalidArguments",
            format!(
                "max_width {w} is not accepted: {} to {}",
                MAX_WIDTH_RANGE.start(),
                MAX_WIDTH_RANGE.end()
            ),
        ));
    }
    Ok(quality)
}

/// Everything checked before the stream is opened: the JPEG/WebP options, `timeout_s`
/// (`default_timeout` when absent), `at_s` and the key template. Returns quality and timeout.
pub fn check_args(
    args: &CaptureArgs,
    default_timeout: Duration,
) -> Result<(u8, Duration), TaskError> {
    let quality = check_image_args(args.quality, args.max_width)?;
    let timeout = match args.timeout_s {
        None => default_timeout,
        Some(t) if t.is_finite() && t > 0.0 && t <= MAX_TIMEOUT_S => Duration::from_secs_f64(t),
        Some(t) => {
            return Err(TaskError::invalid(
                "InvalidArguments",
                format!("timeout_s {t} is not accepted: more than 0, at most {MAX_TIMEOUT_S}"),
            ))
        }
    };
    if let Some(at) = args.at_s.filter(|a| !a.is_finite() || *a < 0.0) {
        return Err(TaskError::invalid(
            "InvalidArguments",
            format!("at_s {at} is not accepted: seconds from the file's start, 0 or more"),
        ));
    }
    template::expand(&args.key, &[("time", "t")])?;
    Ok((quality, timeout))
}

impl Task for Capture {
    const NAME: &'static str = "snapshot.capture";
    // A frame is about now: a retry minutes later would answer another question.
    const MAX_RETRIES: Option<u32> = Some(0);
    type Args = CaptureArgs;
    type Output = CaptureResult;

    async fn run(&self, ctx: TaskContext, args: CaptureArgs) -> Result<CaptureResult, TaskError> {
        let (quality, timeout) = check_args(&args, self.snapshot.snapshot_capture_timeout)?;
        let deadline = Instant::now() + timeout;
        let src =
            tokio::time::timeout(timeout, StreamSource::vet(&args.stream_url, &self.settings))
                .await
                .map_err(|_| {
                    TaskError::permanent(
                        "SourceTimeout",
                        format!(
                            "{} could not be resolved within {} s",
                            args.stream_url,
                            timeout.as_secs_f64()
                        ),
                    )
                })??;
        if args.at_s.is_some() && src.kind != SourceKind::File {
            return Err(TaskError::invalid(
                "InvalidArguments",
                "at_s applies to files; a live stream gives its next keyframe (leave at_s out)",
            ));
        }
        let stop = Arc::new(AtomicBool::new(false));
        let _guard = StopOnDrop(stop.clone());
        let job_stop = ctx.cancel_flag();
        let (format, max_width, at_s) = (args.format, args.max_width, args.at_s);
        let (encoded, pts_s) = tokio::task::spawn_blocking(move || {
            let interrupt = Interrupt::new(stop);
            interrupt.arm_at(deadline);
            let spec = EncodeSpec {
                format,
                quality,
                max_width,
            };
            let out = grab(&src, at_s, &interrupt, timeout, spec);
            if job_stop.is_set() {
                return Err(MediaError::Stopped);
            }
            out
        })
        .await
        .map_err(|e| {
            TaskError::permanent("InternalError", format!("capture thread failed: {e}"))
        })??;
        let captured_at = chrono::Utc::now();
        let key = template::expand(&args.key, &[("time", &template::time_value(captured_at))])?;
        let stored = self
            .storage
            .put(&key, Bytes::from(encoded.data), format.content_type())
            .await?;
        Ok(CaptureResult {
            key: stored.key,
            url: stored.url,
            width: encoded.width,
            height: encoded.height,
            bytes: stored.bytes,
            pts_s: (pts_s * 1000.0).round() / 1000.0,
            captured_at: mediafarm::protocol::format_time(captured_at),
            format,
        })
    }
}

/// Opens the source and returns one encoded frame and its time.
pub fn grab(
    src: &StreamSource,
    at_s: Option<f64>,
    interrupt: &Interrupt,
    timeout: Duration,
    spec: EncodeSpec,
) -> Result<(Encoded, f64), MediaError> {
    let mut input = Input::open(&src.url, &src.shown, src.kind, interrupt, timeout)?;
    let mut dec = KeyDecoder::new(&input, at_s.is_none())?;
    let mut pkt = ff::Packet::empty();
    match at_s {
        Some(at) => frame_at(&mut input, &mut dec, &mut pkt, at, spec),
        None => loop {
            match input.read(&mut pkt)? {
                Read::Video if pkt.is_key() => {
                    let _slot = CpuGate::global().enter();
                    // A keyframe that does not decode alone (missing headers): try the next.
                    let Ok(frame) = dec.keyframe(&pkt) else {
                        continue;
                    };
                    let t = input
                        .frame_seconds(frame)
                        .or_else(|| input.seconds(&pkt))
                        .unwrap_or(0.0);
                    let t = if src.kind == SourceKind::File {
                        t - input.start_s()
                    } else {
                        t
                    };
                    return Ok((EncoderPool::global().encode(spec, frame)?, t));
                }
                Read::Video | Read::Other => {}
                Read::Eof => {
                    return Err(MediaError::Ended {
                        url: input.url().to_owned(),
                    })
                }
            }
        },
    }
}

/// Seeks a file to the keyframe before `at` and decodes forward to the frame shown at `at`.
fn frame_at(
    input: &mut Input,
    dec: &mut KeyDecoder,
    pkt: &mut ff::Packet,
    at: f64,
    spec: EncodeSpec,
) -> Result<(Encoded, f64), MediaError> {
    if let Some(duration) = input.duration_s().filter(|d| at > *d) {
        return Err(MediaError::PastEnd {
            url: input.url().to_owned(),
            at,
            duration,
        });
    }
    input.seek(at)?;
    let start = input.start_s();
    // Half a millisecond of slack for timestamps that do not land exactly on `at`.
    let wanted = at - 0.0005;
    loop {
        match input.read(pkt)? {
            Read::Video => {
                let _slot = CpuGate::global().enter();
                if let Some(frame) = dec.feed(pkt)? {
                    let t = input.frame_seconds(frame).unwrap_or(f64::MIN) - start;
                    if t >= wanted {
                        return Ok((EncoderPool::global().encode(spec, frame)?, t));
                    }
                }
            }
            Read::Other => {}
            Read::Eof => {
                let _slot = CpuGate::global().enter();
                let mut last: Option<(Encoded, f64)> = None;
                while let Some(frame) = dec.drain() {
                    let t = input.frame_seconds(frame).unwrap_or(f64::MIN) - start;
                    let encoded = EncoderPool::global().encode(spec, frame)?;
                    if t >= wanted {
                        return Ok((encoded, t));
                    }
                    last = Some((encoded, t));
                }
                return last.ok_or_else(|| MediaError::Ended {
                    url: input.url().to_owned(),
                });
            }
        }
    }
}

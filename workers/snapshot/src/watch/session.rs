//! The blocking half of a session, on its own thread: demux the stream continuously, skip every
//! non-key packet, decode only the keyframe chosen for a tick (single-threaded, inside a CPU
//! gate slot), scale and encode it, and hand the picture to the async half. Reconnects with
//! backoff when the stream drops, until nothing new arrived for the reconnect window.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ffmpeg_next as ff;
use tokio::sync::mpsc;

use super::schedule::{LastTick, Schedule};
use crate::cpu_gate::CpuGate;
use crate::media::{
    EncodeSpec, Encoded, EncoderPool, Format, Input, Interrupt, KeyDecoder, MediaError, Read,
};
use crate::source::{SourceKind, StreamSource};

/// A `realtime` file is read in batches of this much stream time.
const PACE_BATCH: Duration = Duration::from_millis(100);

/// The most a keyframe gap adds to the stall allowance of one read.
const MAX_KEY_GAP: Duration = Duration::from_secs(60);

/// What the session thread tells the job.
pub enum Event {
    Frame {
        picture: Encoded,
        pts_s: f64,
        wall_s: f64,
        /// When its tick fell due (unix seconds), where the source tells (the RTMP engine's
        /// [`super::timing::StreamClock`]).
        due_at: Option<f64>,
    },
    Reconnecting {
        attempt: u32,
        error: String,
    },
    /// The thread is done.
    Ended(End),
}

#[derive(Debug)]
pub enum End {
    /// Told to stop (stop request, revoke, duration, hand-off, job dropped).
    Stopped,
    /// A file reached its end, or a live stream gave nothing new for the reconnect window.
    StreamEnded { detail: String },
    /// The first connection of a new session failed: the job fails.
    Failed(MediaError),
}

pub struct SessionParams {
    pub source: StreamSource,
    pub interval_s: f64,
    pub last: Option<LastTick>,
    /// True when this session has never taken a frame (a failing first connection fails it).
    pub fresh: bool,
    /// Read a file at its own pace instead of as fast as possible.
    pub realtime: bool,
    /// Start a file over at its end.
    pub looped: bool,
    /// How long one open or read may block.
    pub stall_timeout: Duration,
    pub reconnect_window: Duration,
    pub format: Format,
    pub quality: u8,
    pub max_width: Option<u32>,
}

pub fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Runs a session until it ends; always sends `Event::Ended` last (unless the job is gone).
pub fn run(p: SessionParams, stop: Arc<AtomicBool>, events: mpsc::Sender<Event>) {
    let spec = EncodeSpec {
        format: p.format,
        quality: p.quality,
        max_width: p.max_width,
    };
    let end = run_inner(&p, spec, &stop, &events);
    let _ = events.blocking_send(Event::Ended(end));
}

fn run_inner(
    p: &SessionParams,
    spec: EncodeSpec,
    stop: &Arc<AtomicBool>,
    events: &mpsc::Sender<Event>,
) -> End {
    let interrupt = Interrupt::new(stop.clone());
    let mut sched = Schedule::new(p.interval_s, p.last);
    let mut last_progress = Instant::now();
    let mut attempt = 0u32;
    let mut ever_connected = false;
    loop {
        if stop.load(Ordering::Relaxed) {
            return End::Stopped;
        }
        interrupt.arm(p.stall_timeout);
        let outcome = Input::open(
            &p.source.url,
            &p.source.shown,
            p.source.kind,
            &interrupt,
            p.stall_timeout,
        )
        .and_then(|input| {
            ever_connected = true;
            attempt = 0;
            sched.reconnected();
            let link = Link {
                p,
                interrupt: &interrupt,
                stop,
                events,
            };
            stream(&link, spec, input, &mut sched, &mut last_progress)
        });
        let error = match after_read(outcome, p, ever_connected, last_progress) {
            Ok(error) => error,
            Err(end) => return end,
        };
        attempt += 1;
        tracing::info!(stream = %p.source.shown, attempt, error = %error, "stream dropped; reconnecting");
        if events
            .blocking_send(Event::Reconnecting {
                attempt,
                error: error.to_string(),
            })
            .is_err()
        {
            return End::Stopped;
        }
        if sleep_unless_stopped(reconnect_backoff(attempt), stop) {
            return End::Stopped;
        }
    }
}

/// How a session goes on after one go at its stream ended with `outcome`, the same on the
/// thread path and the RTMP engine: `Err` ends the session (the stream ended, a stop, an
/// error that another try cannot change, the first open of a fresh session failing, or
/// `reconnect_window` without progress); `Ok` is the error to reconnect after.
pub(super) fn after_read(
    outcome: Result<End, MediaError>,
    p: &SessionParams,
    ever_connected: bool,
    last_progress: Instant,
) -> Result<MediaError, End> {
    let error = match outcome {
        Ok(end) => return Err(end),
        Err(MediaError::Stopped) => return Err(End::Stopped),
        Err(e) if p.fresh && !ever_connected => return Err(End::Failed(e)),
        Err(e @ (MediaError::NoVideo { .. } | MediaError::Codec { .. })) => {
            return Err(End::Failed(e))
        }
        Err(e) => e,
    };
    if last_progress.elapsed() >= p.reconnect_window {
        return Err(End::StreamEnded {
            detail: format!(
                "nothing new for {} s: {error}",
                p.reconnect_window.as_secs_f64()
            ),
        });
    }
    Ok(error)
}

/// The pause before reconnect `attempt` (1, 2, …): 0.5 s doubling, at most 10 s.
pub(super) fn reconnect_backoff(attempt: u32) -> Duration {
    Duration::from_millis(250 * 2u64.pow(attempt.min(6))).min(Duration::from_secs(10))
}

/// True when stopped while sleeping.
fn sleep_unless_stopped(d: Duration, stop: &AtomicBool) -> bool {
    let until = Instant::now() + d;
    while Instant::now() < until {
        if stop.load(Ordering::Relaxed) {
            return true;
        }
        std::thread::sleep((until - Instant::now()).min(Duration::from_millis(100)));
    }
    stop.load(Ordering::Relaxed)
}

/// What a connection's reader shares with its session.
struct Link<'a> {
    p: &'a SessionParams,
    interrupt: &'a Interrupt,
    stop: &'a AtomicBool,
    events: &'a mpsc::Sender<Event>,
}

/// Reads one connection until it ends. `Ok` ends the session; `Err` asks for a reconnect.
fn stream(
    link: &Link<'_>,
    spec: EncodeSpec,
    mut input: Input,
    sched: &mut Schedule,
    last_progress: &mut Instant,
) -> Result<End, MediaError> {
    let Link {
        p,
        interrupt,
        stop,
        events,
    } = *link;
    // Made now so a stream FFmpeg cannot decode fails at once, then dropped: a decoder lives
    // only for the tick it serves, so idle sessions hold no picture buffers.
    KeyDecoder::new(&input, true)?;
    // Only keyframes are ever decoded: the demuxer drops the rest before copying it out where
    // the container allows (FLV skips non-key video, which halves its demux time at 6 Mbit/s;
    // every container drops the audio).
    input.keep_only_video_keyframes();
    // So one read may wait for a whole GOP: the stall allowance is the stall timeout plus the
    // longest keyframe gap seen (assumed as long as the stall timeout until one is seen).
    let mut key_gap = p.stall_timeout;
    let mut last_key: Option<f64> = None;
    let mut pkt = ff::Packet::empty();
    let file = p.source.kind == SourceKind::File;
    if file {
        if let Some(at) = sched.resume_point() {
            input.seek((at - input.start_s()).max(0.0))?;
        }
    }
    // A looped file's clock keeps running across loops.
    let mut offset = 0.0;
    let mut newest_in_loop = f64::MIN;
    let mut pace: Option<(Instant, f64)> = None;
    loop {
        interrupt.arm(p.stall_timeout + key_gap.min(MAX_KEY_GAP));
        match input.read(&mut pkt)? {
            Read::Other => continue,
            Read::Eof if file && p.looped => {
                offset += newest_in_loop.max(0.0) + 0.04;
                newest_in_loop = f64::MIN;
                input.seek(0.0)?;
                continue;
            }
            Read::Eof if file => {
                return Ok(End::StreamEnded {
                    detail: "the file ended".into(),
                })
            }
            Read::Eof => {
                return Err(MediaError::Read {
                    url: input.url().to_owned(),
                    reason: "the stream ended".into(),
                })
            }
            Read::Video => {}
        }
        let Some(raw) = input.seconds(&pkt) else {
            continue;
        };
        newest_in_loop = newest_in_loop.max(raw);
        let t = raw + offset;
        if sched.progressed(t) {
            *last_progress = Instant::now();
        }
        if p.realtime {
            let (wall0, t0) = *pace.get_or_insert((Instant::now(), t));
            // Timestamps come from the file: a wild jump must not overflow the clock.
            let at = Duration::try_from_secs_f64((t - t0).max(0.0))
                .ok()
                .and_then(|d| wall0.checked_add(d))
                .unwrap_or_else(Instant::now);
            // Packets come in batches, as a network source's do: a packet due within
            // PACE_BATCH is read now, so the thread wakes a few times a second, not per frame.
            let ahead = at.saturating_duration_since(Instant::now());
            if ahead > PACE_BATCH && sleep_unless_stopped(ahead, stop) {
                return Err(MediaError::Stopped);
            }
        }
        if !pkt.is_key() {
            continue;
        }
        if let Some(gap) = last_key
            .map(|k| t - k)
            .filter(|g| g.is_finite() && *g > 0.0)
        {
            key_gap = key_gap.max(Duration::from_secs_f64(gap.min(MAX_KEY_GAP.as_secs_f64())));
        }
        last_key = Some(t);
        let now = unix_now();
        if !sched.is_due(t, now) {
            continue;
        }
        let picture = {
            let _slot = CpuGate::global().enter();
            let mut dec = KeyDecoder::new(&input, true)?;
            match dec.keyframe(&pkt) {
                Ok(frame) => EncoderPool::global().encode(spec, frame)?,
                // A keyframe that does not decode alone: the next one serves the tick.
                Err(e) => {
                    tracing::debug!(error = %e, "keyframe did not decode; waiting for the next");
                    continue;
                }
            }
        };
        sched.taken(t, now);
        let frame = Event::Frame {
            picture,
            pts_s: (t * 1000.0).round() / 1000.0,
            wall_s: now,
            due_at: None,
        };
        if events.blocking_send(frame).is_err() {
            return Err(MediaError::Stopped);
        }
    }
}

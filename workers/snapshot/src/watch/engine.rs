//! The RTMP engine: a `snapshot.watch` session on an `rtmp://` source as a Tokio task instead
//! of an OS thread running FFmpeg's blocking demuxer. Many sessions share the runtime's few
//! threads; each holds a socket, a [`Player`] (a 16 KiB receive buffer for a low-bitrate
//! stream) and the stream's H.264 configuration, and no FFmpeg context.
//!
//! Per connection: play the stream, read what has arrived on a timer rather than on the
//! socket's readiness ([`Cadence`]: every [`READ_BATCH`] near a due tick, up to [`IDLE_BATCH`]
//! between ticks, so a session wakes a few times a second, not once per packet, and its socket
//! is off the reactor so the packets arriving in between wake no thread), judge each video
//! message by its FLV tag header at its first chunk — inter frames, audio and keyframes not due are skipped
//! without being copied — and keep only the keyframe that serves a due tick. That keyframe is
//! decoded and encoded on the decode queue's own threads, one per core, the earliest due
//! first ([`DueQueue`], inside the process's [`CpuGate`]), by a decoder built from the `avcC`
//! record for that tick alone. What reaches the job is what the thread path sends ([`Event`]): same schedule
//! ([`Schedule`]), same frame values, same reconnect and end rules, so storing, state, outbox,
//! manifest, PROGRESS, continuation and stop/revoke are unchanged.
//!
//! H.264 only: a stream in another codec ends the session at once with `UnsupportedCodec`
//! naming it. Other kinds of source (files, HLS, RTSP) keep the thread path (`session`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ffmpeg_next as ff;
use tokio::sync::mpsc;

use super::due_queue::DueQueue;
use super::schedule::Schedule;
use super::session::{after_read, reconnect_backoff, unix_now, End, Event, SessionParams};
use super::timing::{self, Stage, StreamClock};
use crate::cpu_gate::CpuGate;
use crate::media::{EncodeSpec, Encoded, EncoderPool, KeyDecoder, MediaError};
use crate::rtmp::flv::{self, Video};
use crate::rtmp::{chunk, Player, RtmpError, Target};

/// How long a session near its due tick leaves its socket unread between batches: a due
/// keyframe is read at most this much later than its arrival.
pub const READ_BATCH: Duration = Duration::from_millis(200);
/// How often a session connecting or waiting to reconnect looks at its stop flag.
const STOP_POLL: Duration = Duration::from_millis(250);

/// Runs a session until it ends; always sends `Event::Ended` last (unless the job is gone).
pub async fn run(p: SessionParams, stop: Arc<AtomicBool>, events: mpsc::Sender<Event>) {
    let end = run_inner(&p, &stop, &events).await;
    let _ = events.send(Event::Ended(end)).await;
}

/// What one connection shares with its session.
struct Link<'a> {
    p: &'a SessionParams,
    target: &'a Target,
    spec: EncodeSpec,
    stop: &'a AtomicBool,
    events: &'a mpsc::Sender<Event>,
}

async fn run_inner(p: &SessionParams, stop: &AtomicBool, events: &mpsc::Sender<Event>) -> End {
    let spec = EncodeSpec {
        format: p.format,
        quality: p.quality,
        max_width: p.max_width,
    };
    let target = match Target::parse(&p.source.url) {
        Ok(t) => t,
        Err(e) => {
            return End::Failed(MediaError::Open {
                url: p.source.shown.clone(),
                reason: e.to_string(),
            })
        }
    };
    let link = Link {
        p,
        target: &target,
        spec,
        stop,
        events,
    };
    let mut sched = Schedule::new(p.interval_s, p.last);
    let mut last_progress = Instant::now();
    let mut attempt = 0u32;
    let mut ever_connected = false;
    loop {
        if stop.load(Ordering::Relaxed) {
            return End::Stopped;
        }
        let mut connected = false;
        let outcome = stream(&link, &mut sched, &mut last_progress, &mut connected).await;
        if connected {
            ever_connected = true;
            attempt = 0;
        }
        let error = match after_read(outcome, p, ever_connected, last_progress) {
            Ok(error) => error,
            Err(end) => return end,
        };
        attempt += 1;
        tracing::info!(stream = %p.source.shown, attempt, error = %error, "stream dropped; reconnecting");
        if events
            .send(Event::Reconnecting {
                attempt,
                error: error.to_string(),
            })
            .await
            .is_err()
        {
            return End::Stopped;
        }
        if sleep_unless_stopped(reconnect_backoff(attempt), stop).await {
            return End::Stopped;
        }
    }
}

/// True when stopped while sleeping.
async fn sleep_unless_stopped(d: Duration, stop: &AtomicBool) -> bool {
    let until = tokio::time::Instant::now() + d;
    while tokio::time::Instant::now() < until {
        if stop.load(Ordering::Relaxed) {
            return true;
        }
        tokio::time::sleep_until(until.min(tokio::time::Instant::now() + STOP_POLL)).await;
    }
    stop.load(Ordering::Relaxed)
}

async fn until_stopped(stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        tokio::time::sleep(STOP_POLL).await;
    }
}

/// How a failure to connect or play reads, in the thread path's terms.
fn open_error(e: RtmpError, url: &str) -> MediaError {
    MediaError::Open {
        url: url.to_owned(),
        reason: e.to_string(),
    }
}

fn read_error(e: RtmpError, url: &str) -> MediaError {
    match e {
        RtmpError::Refused { .. } | RtmpError::Handshake(_) | RtmpError::Url(_) => {
            open_error(e, url)
        }
        RtmpError::Closed | RtmpError::Ended(_) => MediaError::Read {
            url: url.to_owned(),
            reason: "the stream ended".into(),
        },
        other => MediaError::Read {
            url: url.to_owned(),
            reason: other.to_string(),
        },
    }
}

/// Plays one connection until it ends. `Ok` ends the session; `Err` asks for a reconnect.
/// `connected` is set once the stream's video configuration arrived and was usable.
async fn stream(
    link: &Link<'_>,
    sched: &mut Schedule,
    last_progress: &mut Instant,
    connected: &mut bool,
) -> Result<End, MediaError> {
    let Link {
        p,
        target,
        spec,
        stop,
        events,
    } = *link;
    let url = p.source.shown.as_str();
    let timed_out = || MediaError::TimedOut {
        url: url.to_owned(),
        secs: p.stall_timeout.as_secs_f64(),
    };
    let mut player = tokio::select! {
        r = tokio::time::timeout(p.stall_timeout, Player::play(target)) => match r {
            Err(_) => return Err(timed_out()),
            Ok(Err(e)) => return Err(open_error(e, url)),
            Ok(Ok(player)) => player,
        },
        () = until_stopped(stop) => return Err(MediaError::Stopped),
    };
    sched.reconnected();
    // The H.264 decoder configuration (`avcC`), from the stream's sequence header.
    let mut config: Option<Vec<u8>> = None;
    // This connection's stream time against the wall clock: when each tick fell due.
    let mut clock = StreamClock::default();
    let mut last_data = Instant::now();
    let mut cadence = Cadence::new();
    loop {
        if stop.load(Ordering::Relaxed) {
            return Err(MediaError::Stopped);
        }
        let got = player.read_now().map_err(|e| read_error(e, url))?;
        if got > 0 {
            last_data = Instant::now();
            cadence.read(got);
        } else if last_data.elapsed() >= p.stall_timeout {
            return Err(timed_out());
        }
        let now = unix_now();
        let mut unsupported: Option<&'static str> = None;
        loop {
            let have_config = config.is_some();
            let msg = player
                .next_media(&mut |head, first| {
                    if head.type_id == chunk::AGGREGATE {
                        // Not read yet: say so rather than take no frame silently.
                        unsupported = Some("aggregate-message (several FLV tags per message)");
                        return false;
                    }
                    if head.type_id != chunk::VIDEO {
                        return false;
                    }
                    match flv::classify(first) {
                        Video::AvcConfig => true,
                        Video::AvcFrame { key, cts_ms } => {
                            let t = presentation_s(head.timestamp, cts_ms);
                            clock.observe(f64::from(head.timestamp) / 1000.0, now);
                            if sched.progressed(t) {
                                *last_progress = Instant::now();
                            }
                            // Only a keyframe that serves a due tick is gathered.
                            key && have_config && sched.is_due(t, now)
                        }
                        Video::Ignore => false,
                        Video::Unsupported(codec) => {
                            unsupported = Some(codec);
                            false
                        }
                    }
                })
                .map_err(|e| read_error(e, url))?;
            if let Some(codec) = unsupported {
                return Err(MediaError::Codec {
                    url: url.to_owned(),
                    codec,
                });
            }
            let Some(msg) = msg else { break };
            match flv::classify(&msg.body) {
                Video::AvcConfig => {
                    let avcc = msg.body[flv::AVC_HEADER..].to_vec();
                    // Made now so a configuration FFmpeg cannot use fails at once, then
                    // dropped: a decoder lives only for the tick it serves.
                    KeyDecoder::from_config(ff::codec::Id::H264, &avcc, url)?;
                    config = Some(avcc);
                    *connected = true;
                }
                Video::AvcFrame { key: true, cts_ms } => {
                    let Some(avcc) = config.clone() else { continue };
                    let t = presentation_s(msg.head.timestamp, cts_ms);
                    let due_at = sched.due().and_then(|due| clock.wall(due));
                    timing::record(Stage::Read, due_at, now);
                    let Some(picture) = decode(avcc, msg.body, spec, url, due_at, now).await?
                    else {
                        // A keyframe that does not decode alone: the next one serves the tick.
                        continue;
                    };
                    timing::record(Stage::Encoded, due_at, unix_now());
                    sched.taken(t, now);
                    let frame = Event::Frame {
                        picture,
                        pts_s: (t * 1000.0).round() / 1000.0,
                        wall_s: now,
                        due_at,
                    };
                    if events.send(frame).await.is_err() {
                        return Err(MediaError::Stopped);
                    }
                }
                _ => {}
            }
        }
        player.write_now().map_err(|e| read_error(e, url))?;
        // A read that filled the buffer leaves more waiting: read on once the other tasks had
        // their turn (the socket is off the reactor, so nothing else would make this task
        // yield while a backlog lasts).
        if player.saturated() {
            tokio::task::yield_now().await;
        } else {
            let due_in = sched
                .due()
                .and_then(|due| clock.wall(due))
                .map(|at| at - unix_now());
            tokio::time::sleep(cadence.pause(due_in)).await;
        }
    }
}

/// How long a session leaves its socket unread. Near its next due time (and before the
/// stream's clock is known) every [`READ_BATCH`], so a due keyframe is read at most that long
/// after it arrived; further away as long as the stream leaves in the socket's receive buffer
/// (about [`IDLE_BYTES`]), at most [`IDLE_BATCH`], ending on the due time: on a low-bitrate
/// stream and a 20 s interval a session then wakes about once a second instead of five times.
struct Cadence {
    since: Instant,
    bytes: u64,
}

/// The longest pause between reads of a session whose next tick is not near.
pub const IDLE_BATCH: Duration = Duration::from_secs(1);
/// What a pause may leave waiting in the socket: half the kernel's default receive buffer
/// (`tcp_rmem`'s 128 KiB), so a slow read never closes the server's window.
const IDLE_BYTES: f64 = 64.0 * 1024.0;
/// How long after the due time the first read near it comes: a keyframe arrives a little after
/// its stream time's promptest arrival (the clock's estimate), so reading right on the due time
/// would mostly find it not there yet.
const DUE_SLACK: Duration = Duration::from_millis(30);

impl Cadence {
    fn new() -> Cadence {
        Cadence {
            since: Instant::now(),
            bytes: 0,
        }
    }

    fn read(&mut self, n: usize) {
        self.bytes += n as u64;
    }

    /// The pause before the next read; `due_in`: seconds until the next tick falls due, once
    /// the stream's clock is known (negative when it is overdue).
    fn pause(&self, due_in: Option<f64>) -> Duration {
        let secs = self.since.elapsed().as_secs_f64();
        // The rate over the whole connection; the first second counts as a full one, so a
        // burst at the start does not read as a fast stream for long.
        let rate = self.bytes as f64 / secs.max(1.0);
        let room = if rate > 0.0 {
            IDLE_BYTES / rate
        } else {
            READ_BATCH.as_secs_f64()
        };
        idle_pause(due_in, room)
    }
}

/// The pause before the next read given `due_in` (see [`Cadence::pause`]) and `room`: seconds
/// of the stream the receive buffer takes.
fn idle_pause(due_in: Option<f64>, room: f64) -> Duration {
    let batch = READ_BATCH.as_secs_f64();
    let Some(due_in) = due_in.filter(|d| d.is_finite()) else {
        return READ_BATCH;
    };
    let until_due = due_in + DUE_SLACK.as_secs_f64();
    if until_due <= batch {
        return READ_BATCH;
    }
    let longest = room.min(IDLE_BATCH.as_secs_f64()).max(batch);
    Duration::from_secs_f64(until_due.min(longest))
}

/// A message's presentation time in seconds: its timestamp plus the composition offset, as
/// FFmpeg's FLV demuxer computes `pts`.
fn presentation_s(timestamp_ms: u32, cts_ms: i32) -> f64 {
    (f64::from(timestamp_ms) + f64::from(cts_ms)) / 1000.0
}

/// Decodes one keyframe message (its FLV header included) and encodes the picture on the
/// [`DueQueue`]'s threads, its turn taken by `due_at` (unix seconds; a frame of a clock not
/// known yet queues as due when `read`). `Ok(None)`: it did not decode on its own.
async fn decode(
    avcc: Vec<u8>,
    tag: Vec<u8>,
    spec: EncodeSpec,
    url: &str,
    due_at: Option<f64>,
    read: f64,
) -> Result<Option<Encoded>, MediaError> {
    let shown = url.to_owned();
    let work = move || {
        let _slot = CpuGate::global().enter();
        let (wall0, cpu0) = (Instant::now(), timing::thread_cpu_s());
        timing::record(Stage::Decoding, due_at, unix_now());
        let out = decode_now(&avcc, &tag, spec, &shown);
        timing::record_decode(timing::thread_cpu_s() - cpu0, wall0.elapsed().as_secs_f64());
        out
    };
    let failed = |why: &str| MediaError::Decode {
        url: url.to_owned(),
        reason: format!("the decode task failed: {why}"),
    };
    match DueQueue::global() {
        Some(queue) => queue
            .run(due_at.unwrap_or(read), work)
            .await
            .ok_or_else(|| failed("it panicked"))?,
        // No decode threads could be started: the runtime's blocking pool, in asking order.
        None => tokio::task::spawn_blocking(work)
            .await
            .map_err(|e| failed(&e.to_string()))?,
    }
}

fn decode_now(
    avcc: &[u8],
    tag: &[u8],
    spec: EncodeSpec,
    url: &str,
) -> Result<Option<Encoded>, MediaError> {
    let mut dec = KeyDecoder::from_config(ff::codec::Id::H264, avcc, url)?;
    let mut pkt = ff::Packet::copy(tag.get(flv::AVC_HEADER..).unwrap_or_default());
    pkt.set_flags(ff::packet::Flags::KEY);
    match dec.keyframe(&pkt) {
        Ok(frame) => EncoderPool::global().encode(spec, frame).map(Some),
        Err(e) => {
            tracing::debug!(error = %e, "keyframe did not decode; waiting for the next");
            Ok(None)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_are_sparse_between_ticks_and_dense_near_them() {
        let ms = |d: Duration| d.as_millis();
        // The clock is not known yet, or the tick is due or overdue: every batch.
        assert_eq!(idle_pause(None, 2.0), READ_BATCH);
        assert_eq!(idle_pause(Some(0.1), 2.0), READ_BATCH);
        assert_eq!(idle_pause(Some(-3.0), 2.0), READ_BATCH);
        assert_eq!(idle_pause(Some(f64::NAN), 2.0), READ_BATCH);
        // Far from the tick: the longest pause; nearer: one that ends just after the due time.
        assert_eq!(idle_pause(Some(15.0), 2.0), IDLE_BATCH);
        assert_eq!(ms(idle_pause(Some(0.5), 2.0)), 530);
        // A fast stream fills the receive buffer sooner: no longer than its room, and never
        // shorter than a batch.
        assert_eq!(ms(idle_pause(Some(15.0), 0.4)), 400);
        assert_eq!(idle_pause(Some(15.0), 0.05), READ_BATCH);
    }

    #[test]
    fn presentation_time_adds_the_composition_offset() {
        assert_eq!(presentation_s(2000, 66), 2.066);
        assert_eq!(presentation_s(2000, -33), 1.967);
    }
}

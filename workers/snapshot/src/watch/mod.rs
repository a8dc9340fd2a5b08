//! `snapshot.watch`: a session that stores one picture every `interval_s` of a stream until
//! `duration_s`, a stop request (`mediafarm streams stop`), a revoke, or the stream's end. The
//! demux/decode half of an `rtmp://` session is a task of the RTMP engine ([`engine`]: many
//! sessions on a few threads); for other sources it runs FFmpeg's blocking demuxer on its own
//! thread ([`session`]). Both send the same events; this async half stores each
//! frame, records the session in Redis ([`state`]) together with the frame's delivery in the
//! stream's outbox ([`outbox`]) and the lines of its audit manifest ([`manifest`]), reports
//! PROGRESS, delivers webhooks from that outbox
//! ([`deliver`]), uploads frames to an authority over mutual TLS from a second outbox
//! ([`upload`]) and, before RabbitMQ's ack timeout could matter, hands the session on as a
//! continuation ([`TaskContext::continue_with`]) and ends its own job. Outboxes that no
//! session sends any more are swept by every worker's background [`sweep::Sweeper`]. Stop requests and
//! revokes come through the runtime's signals ([`mediafarm::runtime::stop`], scope
//! [`STOP_SCOPE`]), looked up for all the worker's sessions at once by its [`poller`], which
//! also renews their claims on their streams.

pub mod deliver;
pub mod due_queue;
pub mod engine;
pub mod manifest;
pub mod outbox;
pub mod poller;
pub mod schedule;
pub mod session;
pub mod state;
pub mod sweep;
pub mod timing;
pub mod upload;

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use mediafarm::storage::Storage;
use mediafarm::{Settings, Task, TaskContext, TaskError};

use crate::settings::{SnapshotGroups, SnapshotSettings};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::{mpsc, Semaphore};

use crate::capture::{check_image_args, StopOnDrop};
use crate::media::Format;
use crate::source::{SourceKind, StreamSource};
use crate::template;
use session::{End, Event, SessionParams};
use state::{LastFrame, SessionState};

pub const DEFAULT_INTERVAL_S: f64 = 20.0;
/// The scope of sessions' stop requests, by stream id (`mediafarm streams stop STREAM_ID`).
pub use mediafarm::runtime::stop::STREAM_SESSIONS as STOP_SCOPE;
const MIN_INTERVAL_S: f64 = 0.5;
/// How long one open or read of the stream may block before it counts as a drop.
const STALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Time kept between the hand-off and the job's hard limit.
const SLICE_MARGIN: Duration = Duration::from_secs(60);
// A running session's claim on its stream lapses when not renewed for this long (its worker
// died, its job was terminated); the worker's poller renews it.
use poller::CLAIM_TTL;
/// How long the end of a session waits for its frames' deliveries still under way (what is
/// left stays in the stream's outbox for its next session; a continuation does not wait).
const DELIVERY_GRACE: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WatchArgs {
    pub stream_id: String,
    pub stream_url: String,
    #[serde(default = "default_interval")]
    pub interval_s: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_s: Option<f64>,
    /// Storage key template: `{stream_id}`, `{seq}`, `{time}`.
    pub key: String,
    #[serde(default)]
    pub format: Format,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quality: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_width: Option<u32>,
    /// Webhook each frame is POSTed to, signed with HMAC-SHA256.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deliver: Option<String>,
    /// Authority (a name in `snapshot_authorities`) each frame is PUT to over mutual TLS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authority: Option<String>,
    /// Files: read at the stream's own pace (as a live source would arrive).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub realtime: bool,
    /// Files: start over at the end.
    #[serde(default, rename = "loop", skip_serializing_if = "std::ops::Not::not")]
    pub looped: bool,
    /// Set on continuations: the session this job carries on (the first job's id).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
}

fn default_interval() -> f64 {
    DEFAULT_INTERVAL_S
}

/// Why a session (or this job's slice of it) ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Ended {
    Duration,
    Stopped,
    Revoked,
    StreamEnded,
    /// This job's slice is over; the session goes on in `continued_as`.
    Continued,
    /// Its claim on the stream lapsed (Redis unreachable past the claim's TTL) and another
    /// session holds the stream now.
    Superseded,
}

#[derive(Debug, Clone, Serialize)]
pub struct WatchSummary {
    pub stream_id: String,
    pub session_id: String,
    pub ended: Ended,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub continued_as: Option<String>,
    pub frames: u64,
    pub frames_this_job: u64,
    pub reconnects: u64,
    pub started_at: String,
    pub last_frame: Option<LastFrame>,
    pub deliveries_failed: u64,
    /// Deliveries still in the stream's outbox when this job ended.
    pub deliveries_pending: u64,
    /// Authority uploads this job gave up (dead letters), and those still waiting.
    pub uploads_failed: u64,
    pub uploads_pending: u64,
}

pub struct Watch {
    settings: Settings,
    snapshot: SnapshotSettings,
    storage: Storage,
    sessions: Arc<Semaphore>,
    deliver: deliver::Deliverer,
    upload: upload::Uploader,
    /// Stop requests, revokes and claim renewals of all this worker's sessions, in one look
    /// (started with the first session: it needs the runtime and the result backend).
    poller: std::sync::OnceLock<poller::Poller>,
}

#[derive(Debug, thiserror::Error)]
pub enum WatchSetupError {
    #[error(
        "snapshot_session_slice = {slice} s leaves no room before the longest hard time limit ({longest} s): \
         set it at most {most} s"
    )]
    Slice { slice: f64, longest: f64, most: f64 },
    #[error("snapshot_manifest_prefix {prefix:?} is not a usable storage key prefix: {reason}")]
    ManifestPrefix { prefix: String, reason: String },
    #[error(transparent)]
    Authority(#[from] upload::UploadSetupError),
}

impl Watch {
    /// The task; its continuations go back to the queue each job came from.
    pub fn new(
        settings: &Settings,
        (snapshot, webhook): &SnapshotGroups,
        storage: Storage,
    ) -> Result<Watch, WatchSetupError> {
        let longest = settings
            .task_time_limit
            .unwrap_or_else(|| settings.longest_hard_limit());
        let most = longest.saturating_sub(SLICE_MARGIN.min(longest / 4));
        if snapshot.snapshot_session_slice > most {
            return Err(WatchSetupError::Slice {
                slice: snapshot.snapshot_session_slice.as_secs_f64(),
                longest: longest.as_secs_f64(),
                most: most.as_secs_f64(),
            });
        }
        if let Some(prefix) = &snapshot.snapshot_manifest_prefix {
            mediafarm::storage::check_key(&format!("{prefix}/s/2000-01-01/index.json")).map_err(
                |e| WatchSetupError::ManifestPrefix {
                    prefix: prefix.clone(),
                    reason: e.to_string(),
                },
            )?;
        }
        let upload = upload::Uploader::new(
            &snapshot.snapshot_authorities,
            storage.clone(),
            snapshot.snapshot_delivery_deadline,
            snapshot.snapshot_delivery_backoff_max,
        )?;
        Ok(Watch {
            upload,
            settings: settings.clone(),
            snapshot: snapshot.clone(),
            storage,
            sessions: Arc::new(Semaphore::new(snapshot.snapshot_max_sessions)),
            poller: std::sync::OnceLock::new(),
            deliver: deliver::Deliverer::new(
                webhook,
                snapshot.snapshot_delivery_deadline,
                snapshot.snapshot_delivery_backoff_max,
            ),
        })
    }
}

impl Watch {
    /// The outbox sweeper for the worker's background work; `None` when
    /// `snapshot_outbox_sweep` is 0.
    pub fn sweeper(&self) -> Option<sweep::Sweeper> {
        let every = self.snapshot.snapshot_outbox_sweep;
        (!every.is_zero()).then(|| sweep::Sweeper {
            webhook: self.deliver.clone(),
            upload: self.upload.clone(),
            every,
        })
    }
}

/// Gives the stream's claim up when the job ends without handing the session on, however it
/// ends (also when the runtime drops it: terminate, hard time limit), so a new session need not
/// wait for the claim to lapse.
struct ClaimGuard {
    backend: mediafarm::ResultBackend,
    stream_id: String,
    session_id: String,
    keep: bool,
}

impl ClaimGuard {
    /// Gives the claim up now (before the job's result is stored, so whoever reads that
    /// result can start a new session on the stream at once).
    async fn release(mut self) {
        self.keep = true;
        give_up(&self.backend, &self.stream_id, &self.session_id).await;
    }
}

async fn give_up(backend: &mediafarm::ResultBackend, stream_id: &str, session_id: &str) {
    if let Err(e) = state::release(backend, stream_id, session_id).await {
        tracing::warn!(%stream_id, error = %e, "cannot release the stream's claim");
    }
}

impl Drop for ClaimGuard {
    fn drop(&mut self) {
        if self.keep {
            return;
        }
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let (backend, stream_id, session_id) = (
                self.backend.clone(),
                std::mem::take(&mut self.stream_id),
                std::mem::take(&mut self.session_id),
            );
            rt.spawn(async move { give_up(&backend, &stream_id, &session_id).await });
        }
    }
}

fn invalid(msg: String) -> TaskError {
    TaskError::invalid("InvalidArguments", msg)
}

/// Everything checked before the stream is opened: the stream id, the interval and duration,
/// the key template and the image options. Returns the quality.
pub fn check_args(args: &WatchArgs) -> Result<u8, TaskError> {
    let id_ok = !args.stream_id.is_empty()
        && args.stream_id.len() <= 128
        && args
            .stream_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if !id_ok {
        return Err(invalid(format!(
            "stream_id {:?} is not accepted: 1 to 128 of A-Z a-z 0-9 - _ .",
            args.stream_id
        )));
    }
    if !args.interval_s.is_finite() || args.interval_s < MIN_INTERVAL_S {
        return Err(invalid(format!(
            "interval_s {} is not accepted: {MIN_INTERVAL_S} or more",
            args.interval_s
        )));
    }
    if let Some(d) = args.duration_s.filter(|d| !d.is_finite() || *d <= 0.0) {
        return Err(invalid(format!(
            "duration_s {d} is not accepted: more than 0"
        )));
    }
    template::expand(
        &args.key,
        &[
            ("stream_id", &args.stream_id),
            ("seq", "000000"),
            ("time", "t"),
        ],
    )?;
    check_image_args(args.quality, args.max_width)
}

impl Task for Watch {
    const NAME: &'static str = "snapshot.watch";
    // Transient failures here are "this worker is full" and Redis hiccups: keep trying.
    const MAX_RETRIES: Option<u32> = Some(1000);
    type Args = WatchArgs;
    type Output = WatchSummary;

    async fn run(&self, ctx: TaskContext, args: WatchArgs) -> Result<WatchSummary, TaskError> {
        let quality = check_args(&args)?;
        let source = StreamSource::vet(&args.stream_url, &self.settings).await?;
        if (args.realtime || args.looped) && source.kind != SourceKind::File {
            return Err(invalid("realtime and loop apply to files only".into()));
        }
        let deliver_to = match &args.deliver {
            Some(url) => Some((url.clone(), self.deliver.vet(url).await?)),
            None => None,
        };
        if let Some(name) = &args.authority {
            self.upload.check(name)?;
        }
        let Ok(_session_slot) = self.sessions.clone().try_acquire_owned() else {
            return Err(TaskError::transient(
                "TooManySessions",
                format!(
                    "this worker runs snapshot_max_sessions = {} sessions already",
                    self.snapshot.snapshot_max_sessions
                ),
            )
            .retry_after(Duration::from_secs(5)));
        };
        let backend = ctx.backend().clone();
        let session_id = args.session.clone().unwrap_or_else(|| ctx.id.clone());
        if let Some(holder) =
            state::claim(&backend, &args.stream_id, &session_id, CLAIM_TTL).await?
        {
            return Err(TaskError::invalid(
                "StreamBusy",
                format!(
                    "stream {:?} is already watched by session {holder}; stop that one first \
                     (mediafarm streams stop {} or revoke its job)",
                    args.stream_id, args.stream_id
                ),
            ));
        }
        // Also without `deliver` (or `authority`) of its own, a session sends what earlier
        // ones left queued.
        let courier = if deliver_to.is_some()
            || outbox::len(&backend, outbox::Lane::Webhook, &args.stream_id).await? > 0
        {
            Some(deliver::Courier::start(
                deliver::Sender::Webhook(self.deliver.clone()),
                backend.clone(),
                &args.stream_id,
                deliver_to,
            ))
        } else {
            None
        };
        let uploader = if args.authority.is_some()
            || outbox::len(&backend, outbox::Lane::Upload, &args.stream_id).await? > 0
        {
            Some(deliver::Courier::start(
                deliver::Sender::Upload(self.upload.clone()),
                backend.clone(),
                &args.stream_id,
                None,
            ))
        } else {
            None
        };
        let mut claim = ClaimGuard {
            backend: backend.clone(),
            stream_id: args.stream_id.clone(),
            session_id: session_id.clone(),
            keep: false,
        };
        let mut st = match state::load(&backend, &args.stream_id).await? {
            Some(s) if s.session_id == session_id => s,
            _ => SessionState {
                session_id: session_id.clone(),
                task_id: ctx.id.clone(),
                started_at: session::unix_now(),
                next_seq: 0,
                frames: 0,
                reconnects: 0,
                slices: 0,
                last: None,
            },
        };
        st.task_id = ctx.id.clone();
        st.slices += 1;
        state::save(&backend, &args.stream_id, &st).await?;
        tracing::info!(stream_id = %args.stream_id, session = %session_id, resume_seq = st.next_seq, "session running");

        let stop = Arc::new(AtomicBool::new(false));
        let _guard = StopOnDrop(stop.clone());
        let (tx, mut rx) = mpsc::channel(2);
        let params = SessionParams {
            source,
            interval_s: args.interval_s,
            last: st.last_tick(),
            fresh: st.frames == 0,
            realtime: args.realtime,
            looped: args.looped,
            stall_timeout: STALL_TIMEOUT,
            reconnect_window: self.snapshot.snapshot_reconnect_window,
            format: args.format,
            quality,
            max_width: args.max_width,
        };
        let thread_stop = stop.clone();
        if params.source.kind == SourceKind::Rtmp && self.snapshot.snapshot_rtmp_engine {
            tokio::spawn(engine::run(params, thread_stop, tx));
        } else {
            std::thread::Builder::new()
                .name(format!("session-{}", args.stream_id))
                .spawn(move || session::run(params, thread_stop, tx))
                .map_err(|e| {
                    TaskError::transient(
                        "ThreadError",
                        format!("cannot start a session thread: {e}"),
                    )
                })?;
        }

        let slice_end = tokio::time::Instant::now() + self.snapshot.snapshot_session_slice;
        let mut signals = self
            .poller
            .get_or_init(|| poller::Poller::start(backend.clone()))
            .register(&args.stream_id, &session_id, &ctx.id, st.started_at);
        // `duration_s` is counted from the session's start, across its slices.
        let duration_end = args.duration_s.map(|d| {
            let left = d - (session::unix_now() - st.started_at);
            tokio::time::Instant::now() + Duration::from_secs_f64(left.clamp(0.0, 1e9))
        });
        let mut why: Option<Ended> = None;
        let mut frames_this_job = 0u64;
        let mut audit = self
            .snapshot
            .snapshot_manifest_prefix
            .as_deref()
            .map(|prefix| manifest::Manifest::new(self.storage.clone(), prefix, &args.stream_id));
        // Reconnects counted when the last frame was taken: more at the next one is a drop.
        let mut reconnects_at_frame = st.reconnects;
        let end = loop {
            tokio::select! {
                event = rx.recv() => match event {
                    Some(Event::Frame { picture, pts_s, wall_s, due_at }) => {
                        let prev = st.last.clone();
                        let last = self.store(&args, &mut st, picture, pts_s, wall_s, due_at).await?;
                        timing::record(timing::Stage::Stored, due_at, session::unix_now());
                        let gap_reason = if st.reconnects > reconnects_at_frame {
                            "stream_dropped"
                        } else if frames_this_job == 0 {
                            "resumed"
                        } else {
                            "late"
                        };
                        let part = manifest::Part::of(frame_time(&last));
                        let encoded = match &audit {
                            Some(_) => manifest::Manifest::encode(&audit_lines(
                                &args, &session_id, prev.as_ref(), &last, gap_reason,
                            ))?,
                            None => Vec::new(),
                        };
                        reconnects_at_frame = st.reconnects;
                        frames_this_job += 1;
                        let entry = args
                            .deliver
                            .as_deref()
                            .map(|url| deliver::entry(&args.stream_id, &session_id, url, &last));
                        let upload = args.authority.as_deref().and_then(|name| {
                            self.upload.entry(
                                &args.stream_id,
                                &session_id,
                                name,
                                &last,
                                args.format.content_type(),
                            )
                        });
                        let queued = outbox::commit(
                            &backend,
                            &st,
                            &args.stream_id,
                            (entry.as_ref(), upload.as_ref()),
                            self.snapshot.snapshot_outbox_max,
                            audit.as_ref().map(|_| outbox::ManifestLines {
                                list_key: part.list_key(&args.stream_id),
                                lines: &encoded,
                                keep_s: manifest::KEEP_S,
                            }),
                        )
                        .await?;
                        timing::record(timing::Stage::Queued, due_at, session::unix_now());
                        if let Some(audit) = &mut audit {
                            audit.touched(&part);
                            audit.write(&backend).await;
                        }
                        let progress = json!({
                            "stream_id": args.stream_id,
                            "session_id": session_id,
                            "frames": st.frames,
                            "last_frame": last,
                        });
                        ctx.update_state("PROGRESS", progress).await?;
                        for (c, queued, what) in [
                            (&courier, queued.webhook, "delivery"),
                            (&uploader, queued.upload, "upload"),
                        ] {
                            match (c, queued) {
                                (Some(c), outbox::Queued::Queued) => c.wake(),
                                (Some(c), outbox::Queued::Full) => {
                                    tracing::warn!(stream_id = %args.stream_id, seq = last.seq, what, "frame not queued: the outbox is full (dead letter outbox_full)");
                                    c.count_refused();
                                }
                                _ => {}
                            }
                        }
                    }
                    Some(Event::Reconnecting { attempt, error }) => {
                        st.reconnects += 1;
                        tracing::info!(stream_id = %args.stream_id, attempt, %error, "reconnecting");
                    }
                    Some(Event::Ended(end)) => break end,
                    None => break End::Stopped,
                },
                stop_why = signals.verdict(), if why.is_none() => {
                    why = Some(stop_why);
                    stop.store(true, std::sync::atomic::Ordering::Relaxed);
                }
                _ = sleep_until_some(duration_end), if why.is_none() => {
                    why = Some(Ended::Duration);
                    stop.store(true, std::sync::atomic::Ordering::Relaxed);
                }
                _ = tokio::time::sleep_until(slice_end), if why.is_none() => {
                    why = Some(Ended::Continued);
                    stop.store(true, std::sync::atomic::Ordering::Relaxed);
                }
            }
        };
        // No renewal of the claim from here on: it is given up or handed on below.
        signals.leave().await;
        let (ended, detail) = match (end, why) {
            (End::Failed(e), _) => {
                finish(&ctx, &args.stream_id).await?;
                claim.release().await;
                return Err(e.into());
            }
            (End::StreamEnded { detail }, _) => (Ended::StreamEnded, Some(detail)),
            (End::Stopped, Some(why)) => (why, None),
            (End::Stopped, None) => (Ended::Stopped, None),
        };
        let grace = match ended {
            // The continuation sends the rest; a superseded session leaves them to its successor.
            Ended::Continued | Ended::Superseded => Duration::ZERO,
            _ => DELIVERY_GRACE,
        };
        // Both couriers finish side by side, within one grace.
        let finish_lane = |c: Option<deliver::Courier>| async move {
            match c {
                Some(c) => c.finish(grace).await,
                None => (0, 0),
            }
        };
        let ((deliveries_failed, deliveries_pending), (uploads_failed, uploads_pending)) =
            tokio::join!(finish_lane(courier), finish_lane(uploader));
        if uploads_pending > 0 {
            tracing::info!(stream_id = %args.stream_id, uploads_pending, "authority uploads left in the stream's outbox");
        }
        if deliveries_pending > 0 {
            tracing::info!(stream_id = %args.stream_id, deliveries_pending, "frame deliveries left in the stream's outbox");
        }
        let mut summary = WatchSummary {
            stream_id: args.stream_id.clone(),
            session_id: session_id.clone(),
            ended,
            detail,
            continued_as: None,
            frames: st.frames,
            frames_this_job,
            reconnects: st.reconnects,
            started_at: mediafarm::protocol::format_time(
                chrono::DateTime::from_timestamp_millis((st.started_at * 1000.0) as i64)
                    .unwrap_or_else(chrono::Utc::now),
            ),
            last_frame: st.last.clone(),
            deliveries_failed,
            deliveries_pending,
            uploads_failed,
            uploads_pending,
        };
        if ended == Ended::Continued {
            state::save(&backend, &args.stream_id, &st).await?;
            summary.continued_as = Some(hand_on(&ctx, &args, &session_id).await?);
            // The continuation carries the same session id and takes the claim on.
            claim.keep = true;
        } else if ended != Ended::Superseded {
            finish(&ctx, &args.stream_id).await?;
            claim.release().await;
        }
        if let Some(audit) = &mut audit {
            if !matches!(ended, Ended::Continued | Ended::Superseded) {
                let now = chrono::Utc::now();
                let end = manifest::Line::SessionEnd {
                    session_id: session_id.clone(),
                    at: mediafarm::protocol::format_time(now),
                    ended: serde_json::to_value(ended)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_owned))
                        .unwrap_or_default(),
                    frames: st.frames,
                };
                if let Err(e) = audit.push(&backend, &manifest::Part::of(now), &[end]).await {
                    tracing::warn!(stream_id = %args.stream_id, error = %e, "cannot record the session's end in the audit manifest");
                }
            }
            audit.write(&backend).await;
        }
        tracing::info!(stream_id = %args.stream_id, ended = ?summary.ended, frames = summary.frames, "session slice over");
        Ok(summary)
    }
}

impl Watch {
    /// Stores one picture under the next `{seq}` and records it as the last frame.
    async fn store(
        &self,
        args: &WatchArgs,
        st: &mut SessionState,
        picture: crate::media::Encoded,
        pts_s: f64,
        wall_s: f64,
        due_at: Option<f64>,
    ) -> Result<LastFrame, TaskError> {
        let at = chrono::DateTime::from_timestamp_millis((wall_s * 1000.0) as i64)
            .unwrap_or_else(chrono::Utc::now);
        let seq = st.next_seq;
        let seq_text = format!("{seq:06}");
        let key = template::expand(
            &args.key,
            &[
                ("stream_id", &args.stream_id),
                ("seq", &seq_text),
                ("time", &template::time_value(at)),
            ],
        )?;
        let (width, height) = (picture.width, picture.height);
        let sha256 = manifest::hex_sha256(&picture.data);
        let stored = self
            .storage
            .put(&key, Bytes::from(picture.data), args.format.content_type())
            .await?;
        let last = LastFrame {
            seq,
            key: stored.key,
            url: stored.url,
            width,
            height,
            bytes: stored.bytes,
            sha256,
            pts_s,
            captured_at: mediafarm::protocol::format_time(at),
            wall_s,
            due_at,
        };
        st.next_seq += 1;
        st.frames += 1;
        st.last = Some(last.clone());
        Ok(last)
    }
}

fn frame_time(f: &LastFrame) -> chrono::DateTime<chrono::Utc> {
    chrono::DateTime::from_timestamp_millis((f.wall_s * 1000.0) as i64)
        .unwrap_or_else(chrono::Utc::now)
}

/// The audit manifest's lines for a frame just stored: the session's start (its first frame),
/// a gap since the previous frame when a whole tick or more has no frame, and the frame.
fn audit_lines(
    args: &WatchArgs,
    session_id: &str,
    prev: Option<&LastFrame>,
    last: &LastFrame,
    gap_reason: &'static str,
) -> Vec<manifest::Line> {
    let mut lines = Vec::with_capacity(2);
    match prev {
        None => lines.push(manifest::Line::SessionStart {
            session_id: session_id.to_owned(),
            at: last.captured_at.clone(),
        }),
        Some(prev) => {
            let gap = last.wall_s - prev.wall_s;
            if gap >= 2.0 * args.interval_s {
                lines.push(manifest::Line::Gap {
                    reason: gap_reason,
                    from: prev.captured_at.clone(),
                    to: last.captured_at.clone(),
                    missed: ((gap / args.interval_s).round() as u64).saturating_sub(1),
                    session_id: session_id.to_owned(),
                });
            }
        }
    }
    lines.push(manifest::Line::Frame {
        seq: last.seq,
        session_id: session_id.to_owned(),
        key: last.key.clone(),
        captured_at: last.captured_at.clone(),
        pts_s: last.pts_s,
        sha256: last.sha256.clone(),
        bytes: last.bytes,
        width: last.width,
        height: last.height,
    });
    lines
}

/// Sleeps until `at`, or forever without one.
async fn sleep_until_some(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Forgets an ended session: its record, and any stop request it obeyed.
async fn finish(ctx: &TaskContext, stream_id: &str) -> Result<(), TaskError> {
    state::finish(ctx.backend(), stream_id).await?;
    ctx.clear_stop(STOP_SCOPE, stream_id).await
}

/// Publishes the continuation (same stream and session) and returns its job id.
async fn hand_on(
    ctx: &TaskContext,
    args: &WatchArgs,
    session_id: &str,
) -> Result<String, TaskError> {
    let mut next = args.clone();
    next.session = Some(session_id.to_owned());
    let kwargs = match serde_json::to_value(&next) {
        Ok(Value::Object(m)) => m,
        _ => {
            return Err(TaskError::permanent(
                "InternalError",
                "continuation kwargs are not an object",
            ))
        }
    };
    let id = ctx.continue_with(kwargs).await?;
    tracing::info!(stream_id = %args.stream_id, next = %id, "session handed on");
    Ok(id)
}

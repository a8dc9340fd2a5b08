//! Delivery of each frame to the session's webhook: a JSON POST signed like notify-worker's
//! webhooks ([`mediafarm::net::signing`]) — `X-Mediafarm-Timestamp: <unix seconds>` and
//! `X-Mediafarm-Signature: v1=<hex HMAC-SHA256(webhook_secret, "<timestamp>.<body>")>` — with
//! `X-Mediafarm-Delivery-Id: <stream_id>/<session_id>/<seq>` (and the older `X-Mediafarm-Id:
//! <session_id>-<seq>`), the same on every try and from every worker. The URL follows the
//! webhook rules of [`mediafarm::net::outbound`] (`webhook_allowed_hosts`, `webhook_allow_http`,
//! `webhook_allow_private`); the request connects to the addresses that were checked (no DNS
//! rebinding) and follows no redirects.
//!
//! Deliveries wait in the stream's outbox in Redis ([`super::outbox`]), written when the frame
//! is recorded, and a [`Courier`] task per session sends its head, one at a time, in order, so
//! a slow receiver never holds up the frames and a worker's death loses none: the session's
//! next job (redelivery, continuation, or a later session on the stream) sends what is left
//! first, and when no session comes, a worker's outbox sweeper does ([`super::sweep`]). A network error, a timeout, 408, 429 or 5xx is tried again (1 s doubling to
//! `snapshot_delivery_backoff_max`) until `snapshot_delivery_deadline` after the frame was
//! taken; then, or at once on another answer, the delivery becomes a dead letter with its
//! reason and the courier goes on with the next frame.
//!
//! The same courier sends a stream's authority uploads ([`super::upload`]) from their own
//! outbox ([`Lane::Upload`]): a [`Sender`] says which lane a courier serves and makes one try,
//! and the retry rules above are the same for both.
//!
//! One courier sends a stream's lane at a time ([`Role`]): a session's waits while a sweeper
//! holds the stream's sweep lease, and a sweeper's stops before its next entry, or its next
//! try, once a session claims the stream. So a session starting on a stream being swept does
//! not send the head in flight a second time beside the sweeper.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use mediafarm::net::{signing, OutboundError, OutboundPolicy, Redirects, SettingNames};
use mediafarm::settings::WebhookSettings;
use mediafarm::{ResultBackend, TaskError};
use tokio::sync::Notify;
use url::Url;

use super::outbox::{self, DeadLetter, Entry, Lane, SWEEP_PREFIX};
use super::session::unix_now;
use super::state::{LastFrame, OWNER_PREFIX};
use super::timing::{self, Stage};
use super::upload::Uploader;

/// The first pause between tries; it doubles, up to `snapshot_delivery_backoff_max`.
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
/// How often an idle courier looks at the outbox without being woken (another worker's
/// session on the stream could have left entries only in a race with this one's start).
const IDLE_POLL: Duration = Duration::from_secs(5);
/// The pause after Redis did not answer.
const REDIS_PAUSE: Duration = Duration::from_secs(1);
/// How often a session's courier looks whether the sweeper has let its stream go.
const HANDOVER_POLL: Duration = Duration::from_millis(250);
/// How long a courier past its grace may take to end the try in flight before it is cut off.
/// Cutting a try off mid-request leaves a frame the receiver may already have in the outbox,
/// and whoever sends the outbox next sends it again: waiting for the answer avoids that for
/// any try that ends within it (`webhook_timeout` is 10 s by default).
const IN_FLIGHT_WAIT: Duration = Duration::from_secs(30);

/// The header carrying a delivery's stable id.
pub const DELIVERY_ID_HEADER: &str = "x-mediafarm-delivery-id";

#[derive(Clone)]
pub struct Deliverer {
    secret: Option<String>,
    policy: OutboundPolicy,
    /// `snapshot_delivery_deadline`: from the frame's capture to giving its delivery up.
    deadline: Duration,
    /// `snapshot_delivery_backoff_max`.
    backoff_max: Duration,
}

/// A checked webhook URL, and a client that connects only to the addresses checked.
#[derive(Clone)]
pub struct Target {
    pub(super) url: Url,
    pub(super) client: reqwest::Client,
}

/// Why one try did not deliver, and whether another may.
#[derive(Debug)]
pub(super) struct Refusal {
    pub reason: String,
    /// `None`: trying again will not help (a 4xx other than 408 and 429).
    pub retry_after: Option<Duration>,
    /// The dead letter's reason when no try follows: `refused`, or the lane's own (`tls`, …).
    pub kind: &'static str,
}

impl Refusal {
    /// A failure that may pass (network, 5xx): tried again.
    pub fn passing(reason: String) -> Refusal {
        Refusal {
            reason,
            retry_after: Some(Duration::ZERO),
            kind: "refused",
        }
    }

    /// A failure that trying again does not change; `kind` is the dead letter's reason.
    pub fn lasting(kind: &'static str, reason: String) -> Refusal {
        Refusal {
            reason,
            retry_after: None,
            kind,
        }
    }

    /// The refusal of an answer that was not a 2xx: 408, 429 (with its `Retry-After`) and 5xx
    /// pass; any other answer is lasting.
    pub fn of_answer(url: &Url, resp: &reqwest::Response) -> Refusal {
        let status = resp.status();
        let retry_after = match status.as_u16() {
            429 => Some(
                resp.headers()
                    .get(reqwest::header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    // Capped: past the deadline it only means "give up", and an absurd value
                    // must not overflow the clock arithmetic.
                    .map_or(Duration::ZERO, |s| Duration::from_secs(s.min(3600))),
            ),
            408 | 500..=599 => Some(Duration::ZERO),
            _ => None,
        };
        Refusal {
            reason: format!("{url} answered {status}"),
            retry_after,
            kind: "refused",
        }
    }
}

fn refused(url: &str, why: impl std::fmt::Display) -> TaskError {
    TaskError::invalid(
        "DeliverRefused",
        format!("deliver URL {url} refused: {why}"),
    )
}

/// The task error for a deliver URL the policy refused or could not reach.
fn policy_error(url: &str, e: OutboundError) -> TaskError {
    match e {
        // Shorter than the policy's own text, as it always was for deliveries.
        OutboundError::Internal { host, ip, setting } => refused(
            url,
            format!("{host} resolves to {ip}, an internal address; see {setting}"),
        ),
        e if e.is_refusal() => refused(url, e),
        e => TaskError::permanent("DeliverUnreachable", format!("deliver URL {url}: {e}")),
    }
}

impl Deliverer {
    pub fn new(webhook: &WebhookSettings, deadline: Duration, backoff_max: Duration) -> Deliverer {
        Deliverer {
            secret: webhook.webhook_secret.clone(),
            deadline,
            backoff_max,
            policy: OutboundPolicy {
                allow_http: webhook.webhook_allow_http,
                allowed_hosts: webhook.webhook_allowed_hosts.clone(),
                any_host_when_empty: true,
                allow_private: webhook.webhook_allow_private,
                timeout: Some(webhook.webhook_timeout),
                redirects: Redirects::Return,
                // Deliveries have always gone through a proxy set in the environment.
                system_proxy: true,
                ..OutboundPolicy::new(SettingNames {
                    allow_http: "webhook_allow_http",
                    allowed_hosts: "webhook_allowed_hosts",
                    allow_private: "webhook_allow_private",
                })
            },
        }
    }

    /// Checks a webhook URL once, when the session starts.
    pub async fn vet(&self, text: &str) -> Result<Target, TaskError> {
        let url = Url::parse(text).map_err(|e| refused(text, e))?;
        let checked = self
            .policy
            .resolve(&url)
            .await
            .map_err(|e| policy_error(text, e))?;
        let client = self
            .policy
            .client(&checked)
            .map_err(|e| policy_error(text, e))?;
        Ok(Target { url, client })
    }

    /// One try at POSTing `body`, signed now.
    async fn post(&self, to: &Target, entry: &Entry) -> Result<(), Refusal> {
        let body = &entry.body;
        let timestamp = signing::now();
        let mut req = to
            .client
            .post(to.url.clone())
            .header("Content-Type", "application/json")
            .header(DELIVERY_ID_HEADER, &entry.id)
            .header(
                signing::ID_HEADER,
                format!("{}-{}", entry.session_id, entry.seq),
            )
            .header(signing::TIMESTAMP_HEADER, timestamp.to_string());
        if let Some(secret) = &self.secret {
            req = req.header(
                signing::SIGNATURE_HEADER,
                signing::sign(secret.as_bytes(), timestamp, body.as_bytes()),
            );
        }
        let resp = mediafarm::observe::trace::inject_http(req.body(body.to_owned()))
            .send()
            .await
            .map_err(|e| Refusal::passing(format!("{}: {e}", to.url)))?;
        if resp.status().is_success() {
            return Ok(());
        }
        Err(Refusal::of_answer(&to.url, &resp))
    }
}

/// What a courier sends, and how one try goes: webhook deliveries or authority uploads.
#[derive(Clone)]
pub enum Sender {
    Webhook(Deliverer),
    Upload(Uploader),
}

impl Sender {
    pub fn lane(&self) -> Lane {
        match self {
            Sender::Webhook(_) => Lane::Webhook,
            Sender::Upload(_) => Lane::Upload,
        }
    }

    /// From the frame's capture to giving its delivery up, and the longest pause.
    fn timing(&self) -> (Duration, Duration) {
        match self {
            Sender::Webhook(d) => (d.deadline, d.backoff_max),
            Sender::Upload(u) => u.timing(),
        }
    }

    /// The key a checked target is kept under between entries.
    fn target_key(entry: &Entry) -> String {
        match &entry.authority {
            Some(name) => format!("{name} {}", entry.url),
            None => entry.url.clone(),
        }
    }

    /// Checks an entry's URL (and, for uploads, its authority) and builds its client.
    async fn vet(&self, entry: &Entry) -> Result<Target, TaskError> {
        match self {
            Sender::Webhook(d) => d.vet(&entry.url).await,
            Sender::Upload(u) => u.vet(entry).await,
        }
    }

    async fn try_once(&self, to: &Target, entry: &Entry) -> Result<(), Refusal> {
        match self {
            Sender::Webhook(d) => d.post(to, entry).await,
            Sender::Upload(u) => u.put(to, entry).await,
        }
    }
}

/// A frame's delivery, made when the frame is recorded: the body is fixed then.
pub fn entry(stream_id: &str, session_id: &str, url: &str, last: &LastFrame) -> Entry {
    let id = outbox::delivery_id(stream_id, session_id, last.seq);
    let mut body = serde_json::json!({
        "event": "snapshot.frame",
        "delivery_id": id,
        "stream_id": stream_id,
        "session_id": session_id,
        "seq": last.seq,
        "key": last.key,
        "url": last.url,
        "width": last.width,
        "height": last.height,
        "bytes": last.bytes,
        "sha256": last.sha256,
        "pts_s": last.pts_s,
        "captured_at": last.captured_at,
    });
    if let Some(due) = last
        .due_at
        .and_then(|d| chrono::DateTime::from_timestamp_millis((d * 1000.0).round() as i64))
    {
        body["due_at"] = mediafarm::protocol::format_time(due).into();
    }
    let body = body.to_string();
    Entry {
        id,
        stream_id: stream_id.to_owned(),
        session_id: session_id.to_owned(),
        seq: last.seq,
        url: url.to_owned(),
        authority: None,
        body,
        offered_at: last.wall_s,
        due_at: last.due_at,
    }
}

/// Who a courier sends for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// The session that claims the stream: it waits while a sweeper holds the stream.
    Session,
    /// The outbox sweeper, standing in while no session claims the stream: it gives the
    /// stream up to a session that claims it.
    Sweeper,
}

/// Whether a courier may send the next entry now.
enum Turn {
    Mine,
    /// A sweeper still sends the stream (a session's courier waits).
    Wait,
    /// A session claims the stream (a sweeper's courier stops).
    Over,
}

/// A session's delivery task: sends the head of its stream's outbox until the outbox is empty
/// and the session is over.
pub struct Courier {
    task: tokio::task::JoinHandle<()>,
    wake: Arc<Notify>,
    closing: Arc<AtomicBool>,
    /// Past the grace: start no further try (the one in flight ends first).
    halt: Arc<AtomicBool>,
    /// Deliveries this job gave up (dead letters, the outbox's refusals included).
    failed: Arc<AtomicU64>,
    backend: ResultBackend,
    lane: Lane,
    stream_id: String,
}

/// What the courier's loop shares.
struct Run {
    sender: Sender,
    role: Role,
    backend: ResultBackend,
    stream_id: String,
    /// The last target checked, by its URL text.
    target: Option<(String, Target)>,
    wake: Arc<Notify>,
    closing: Arc<AtomicBool>,
    halt: Arc<AtomicBool>,
    failed: Arc<AtomicU64>,
}

impl Courier {
    /// Starts delivering `stream_id`'s outbox of `sender`'s lane; `checked` is the session's
    /// own webhook target, checked already (entries for other URLs, left by earlier sessions,
    /// and uploads are checked when they come).
    pub fn start(
        sender: Sender,
        backend: ResultBackend,
        stream_id: &str,
        checked: Option<(String, Target)>,
    ) -> Courier {
        Courier::spawn(sender, Role::Session, backend, stream_id, checked)
    }

    /// Starts the sweeper's courier for `stream_id`'s outbox of `sender`'s lane: it stops
    /// when the outbox is empty and closing, or when a session claims the stream.
    pub fn sweep(sender: Sender, backend: ResultBackend, stream_id: &str) -> Courier {
        Courier::spawn(sender, Role::Sweeper, backend, stream_id, None)
    }

    fn spawn(
        sender: Sender,
        role: Role,
        backend: ResultBackend,
        stream_id: &str,
        checked: Option<(String, Target)>,
    ) -> Courier {
        let wake = Arc::new(Notify::new());
        let closing = Arc::new(AtomicBool::new(false));
        let halt = Arc::new(AtomicBool::new(false));
        let failed = Arc::new(AtomicU64::new(0));
        let lane = sender.lane();
        let run = Run {
            sender,
            role,
            backend: backend.clone(),
            stream_id: stream_id.to_owned(),
            target: checked,
            wake: wake.clone(),
            closing: closing.clone(),
            halt: halt.clone(),
            failed: failed.clone(),
        };
        Courier {
            task: tokio::spawn(run.go()),
            wake,
            closing,
            halt,
            failed,
            backend,
            lane,
            stream_id: stream_id.to_owned(),
        }
    }

    /// A delivery was queued.
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// A delivery could not be queued (the outbox was full; its dead letter is written).
    pub fn count_refused(&self) {
        self.failed.fetch_add(1, Ordering::Relaxed);
    }

    /// Waits up to `grace` for the outbox to empty, then stops: no new try starts, and the
    /// one in flight is let end (up to [`IN_FLIGHT_WAIT`]) so that a frame the receiver got
    /// is not left in the outbox to be sent again. Returns how many deliveries this job gave
    /// up and how many still wait in the outbox (the stream's next session, or the sweeper,
    /// sends them first).
    pub async fn finish(self, grace: Duration) -> (u64, u64) {
        self.closing.store(true, Ordering::Relaxed);
        self.wake.notify_one();
        let mut task = self.task;
        if tokio::time::timeout(grace, &mut task).await.is_err() {
            self.halt.store(true, Ordering::Relaxed);
            self.wake.notify_one();
            if tokio::time::timeout(IN_FLIGHT_WAIT, &mut task)
                .await
                .is_err()
            {
                tracing::warn!(stream_id = %self.stream_id, "a frame delivery still in flight was cut off; it will be sent again");
                task.abort();
            }
        }
        let pending = outbox::len(&self.backend, self.lane, &self.stream_id)
            .await
            .unwrap_or_else(|e| {
                tracing::warn!(stream_id = %self.stream_id, error = %e, "cannot count the outbox");
                0
            });
        (self.failed.load(Ordering::Relaxed), pending)
    }
}

impl Run {
    /// Whether this courier may send now: only one of a session's and a sweeper's does.
    async fn turn(&self) -> Turn {
        let (key, other) = match self.role {
            Role::Session => (format!("{SWEEP_PREFIX}{}", self.stream_id), Turn::Wait),
            Role::Sweeper => (format!("{OWNER_PREFIX}{}", self.stream_id), Turn::Over),
        };
        let mut conn = self.backend.connection();
        match redis::cmd("EXISTS")
            .arg(key)
            .query_async::<i64>(&mut conn)
            .await
        {
            Ok(1) => other,
            // Redis trouble shows (and is waited out) when the head is read.
            _ => Turn::Mine,
        }
    }

    fn halted(&self) -> bool {
        self.halt.load(Ordering::Relaxed)
    }

    /// Waits `d`, or less once the courier is halted; whether it still runs.
    async fn pause(&self, d: Duration) -> bool {
        let until = tokio::time::Instant::now() + d;
        while !self.halted() {
            if tokio::time::timeout_at(until, self.wake.notified())
                .await
                .is_err()
            {
                break;
            }
        }
        !self.halted()
    }

    async fn go(mut self) {
        loop {
            if self.halted() {
                return;
            }
            match self.turn().await {
                Turn::Mine => {}
                Turn::Wait => {
                    tokio::time::sleep(HANDOVER_POLL).await;
                    continue;
                }
                Turn::Over => {
                    tracing::info!(stream_id = %self.stream_id, "a session claims the stream; the sweeper leaves its outbox to it");
                    return;
                }
            }
            let lane = self.sender.lane();
            let raw = match outbox::head(&self.backend, lane, &self.stream_id).await {
                Ok(Some(raw)) => raw,
                Ok(None) if self.closing.load(Ordering::Relaxed) => return,
                Ok(None) => {
                    let _ = tokio::time::timeout(IDLE_POLL, self.wake.notified()).await;
                    continue;
                }
                Err(e) => {
                    tracing::warn!(stream_id = %self.stream_id, error = %e, "cannot read the delivery outbox");
                    tokio::time::sleep(REDIS_PAUSE).await;
                    continue;
                }
            };
            match serde_json::from_str::<Entry>(&raw) {
                Ok(entry) => self.send(&raw, &entry).await,
                Err(e) => {
                    let entry = Entry {
                        id: String::new(),
                        stream_id: self.stream_id.clone(),
                        session_id: String::new(),
                        seq: 0,
                        url: String::new(),
                        authority: None,
                        body: raw.clone(),
                        offered_at: 0.0,
                        due_at: None,
                    };
                    self.give_up(&raw, &entry, "unreadable", e.to_string())
                        .await;
                }
            }
        }
    }

    /// Delivers the head `entry` (stored as `raw`) and removes it, or gives it up.
    async fn send(&mut self, raw: &str, entry: &Entry) {
        let key = Sender::target_key(entry);
        let target = match &self.target {
            Some((k, t)) if *k == key => Ok(t.clone()),
            _ => self.sender.vet(entry).await,
        };
        let (deadline, backoff_max) = self.sender.timing();
        let outcome = match target {
            Ok(t) => {
                self.target = Some((key, t.clone()));
                match self.deliver(&t, entry).await {
                    Some(outcome) => outcome,
                    // Handed over (the session's courier sends this entry from now on),
                    // or halted past the grace (the next sender does).
                    None => return,
                }
            }
            Err(e) if e.exc_type == "DeliverRefused" => Err(("refused", e.message)),
            Err(e) if unix_now() < entry.offered_at + deadline.as_secs_f64() => {
                // Unreachable for now (its name does not resolve): as a failed try.
                tracing::info!(id = %entry.id, error = %e, "frame delivery will be tried again");
                tokio::time::sleep(backoff_max.min(Duration::from_secs(5))).await;
                return;
            }
            Err(e) => Err(("deadline", e.message)),
        };
        match outcome {
            Ok(()) => {
                let stage = match self.sender {
                    Sender::Webhook(_) => Stage::Delivered,
                    Sender::Upload(_) => Stage::Uploaded,
                };
                timing::record(stage, entry.due_at, unix_now());
                // A removal lost to Redis is tried again; the delivery is not (at least once).
                let lane = self.sender.lane();
                while let Err(e) = outbox::done(&self.backend, lane, &self.stream_id, raw).await {
                    tracing::warn!(id = %entry.id, error = %e, "cannot remove a delivered frame from the outbox");
                    tokio::time::sleep(REDIS_PAUSE).await;
                }
            }
            Err((reason, detail)) => self.give_up(raw, entry, reason, detail).await,
        }
    }

    /// Delivers one entry, trying again on passing failures until its deadline. `Err` carries
    /// the dead letter's reason (`deadline` or `refused`) and detail; `None` means a sweeper
    /// handed the stream to a session, or the courier was halted, between two tries.
    async fn deliver(
        &self,
        to: &Target,
        entry: &Entry,
    ) -> Option<Result<(), (&'static str, String)>> {
        let (deadline_after, backoff_max) = self.sender.timing();
        let deadline = entry.offered_at + deadline_after.as_secs_f64();
        let mut backoff = FIRST_BACKOFF;
        loop {
            let refusal = match self.sender.try_once(to, entry).await {
                Ok(()) => return Some(Ok(())),
                Err(r) => r,
            };
            let Some(asked) = refusal.retry_after else {
                return Some(Err((refusal.kind, refusal.reason)));
            };
            let wait = asked.max(backoff);
            if unix_now() + wait.as_secs_f64() > deadline {
                return Some(Err((
                    "deadline",
                    format!(
                        "{} (gave up {} s after the frame was taken)",
                        refusal.reason,
                        deadline_after.as_secs_f64()
                    ),
                )));
            }
            tracing::debug!(id = %entry.id, reason = %refusal.reason, ?wait, "frame delivery will be tried again");
            if !self.pause(wait).await {
                // Halted between two tries: the entry stays at the head for whoever is next.
                return None;
            }
            backoff = (backoff * 2).min(backoff_max.max(FIRST_BACKOFF));
            if matches!(self.turn().await, Turn::Over) {
                return None;
            }
        }
    }

    async fn give_up(&self, raw: &str, entry: &Entry, reason: &str, detail: String) {
        tracing::warn!(stream_id = %self.stream_id, id = %entry.id, %reason, %detail, "frame delivery given up (dead letter)");
        let letter = DeadLetter::of(entry, reason, detail);
        let lane = self.sender.lane();
        loop {
            match outbox::dead(&self.backend, lane, &self.stream_id, raw, &letter).await {
                Ok(moved) => {
                    if moved {
                        self.failed.fetch_add(1, Ordering::Relaxed);
                    }
                    return;
                }
                Err(e) => {
                    tracing::warn!(id = %entry.id, error = %e, "cannot record a dead letter");
                    tokio::time::sleep(REDIS_PAUSE).await;
                }
            }
        }
    }
}

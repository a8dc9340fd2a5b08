//! The per-stream delivery outbox in Redis: what makes a frame's webhook delivery survive the
//! worker that took the frame.
//!
//! - `mediafarm-snapshot-outbox-<stream_id>`, a list of [`Entry`] (JSON), oldest first. A frame's
//!   entry is pushed in the same Lua script that saves the session record with the frame counted
//!   ([`commit`]): a frame either counts as captured *and* waits in the outbox, or neither (a
//!   worker killed in between takes the same `seq` again on resume, under the same delivery id).
//! - The courier ([`super::deliver::Courier`]) delivers the head only, and removes it only
//!   after a 2xx ([`done`]) or when it gives it up ([`dead`]): head-of-line, so a stream's frames
//!   reach the receiver in order, also across crashes, continuations and later sessions on the
//!   same stream (the outbox belongs to the stream, and a new session's first frames queue behind
//!   what an earlier one left).
//! - Both removals compare the head with the entry delivered (its exact text), so a stale
//!   courier (a session superseded while it delivered) cannot remove another's entry.
//! - `mediafarm-snapshot-dead-<stream_id>`, a list of [`DeadLetter`] (JSON), newest last, the
//!   newest [`DEAD_KEEP`] kept: each delivery given up (past `snapshot_delivery_deadline`, an
//!   answer that retrying cannot change, a URL the policy now refuses) or never queued (the
//!   outbox held `snapshot_outbox_max` entries already), with its reason and its body.
//!
//! - Authority uploads ([`super::upload`]) are a second lane with the same rules and lists of
//!   their own ([`Lane::Upload`]: `mediafarm-snapshot-upload-outbox-<stream_id>` and
//!   `mediafarm-snapshot-upload-dead-<stream_id>`), queued in the same step as the webhook's
//!   entry: an authority that is down never holds up the webhook, nor the other way round.
//!
//! At least once: a worker killed after the receiver's 2xx and before the removal sends that
//! frame again, under the same `X-Mediafarm-Delivery-Id`; receivers that drop an id they have
//! seen get each frame exactly once. Both lists expire [`KEEP_S`] after their last write.

use mediafarm::{ResultBackend, TaskError};
use serde::{Deserialize, Serialize};

use super::state::{SessionState, SESSION_PREFIX};

pub const OUTBOX_PREFIX: &str = "mediafarm-snapshot-outbox-";
pub const DEAD_PREFIX: &str = "mediafarm-snapshot-dead-";
/// The authority uploads' outbox and dead letters ([`Lane::Upload`]). No stream id makes one
/// of these names equal to another lane's (`outbox-`, `dead-`, `upload-` differ at once).
pub const UPLOAD_OUTBOX_PREFIX: &str = "mediafarm-snapshot-upload-outbox-";
pub const UPLOAD_DEAD_PREFIX: &str = "mediafarm-snapshot-upload-dead-";
/// A stream's sweep lease: held by the worker whose sweeper sends the stream's outboxes
/// ([`super::sweep`]) while no session does.
pub const SWEEP_PREFIX: &str = "mediafarm-snapshot-sweep-";
/// Dead letters kept per stream (the newest).
pub const DEAD_KEEP: u64 = 10_000;
/// How long an outbox or a dead-letter list nobody writes is kept (as the session record).
pub const KEEP_S: u64 = 7 * 86_400;

/// Saves the session record, adds the audit manifest's lines (KEYS[6], when given) and queues
/// the frame's webhook delivery (KEYS[2], dead letters KEYS[3]) and authority upload (KEYS[4],
/// KEYS[5]), each recorded as a dead letter instead when its outbox is full. Returns, per lane,
/// 1 queued, 2 outbox full, 0 nothing to queue.
const COMMIT_LUA: &str = r"
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
if KEYS[6] then
  for i = 10, #ARGV do redis.call('RPUSH', KEYS[6], ARGV[i]) end
  redis.call('EXPIRE', KEYS[6], ARGV[7])
end
local function queue(outbox, dead, raw, letter)
  if raw == '' then return 0 end
  if redis.call('LLEN', outbox) >= tonumber(ARGV[4]) then
    redis.call('RPUSH', dead, letter)
    redis.call('LTRIM', dead, -tonumber(ARGV[6]), -1)
    redis.call('EXPIRE', dead, ARGV[2])
    return 2
  end
  redis.call('RPUSH', outbox, raw)
  redis.call('EXPIRE', outbox, ARGV[2])
  return 1
end
return {queue(KEYS[2], KEYS[3], ARGV[3], ARGV[5]), queue(KEYS[4], KEYS[5], ARGV[8], ARGV[9])}
";

/// Removes the head if it is still the entry delivered.
const DONE_LUA: &str = r"
if redis.call('LINDEX', KEYS[1], 0) == ARGV[1] then
  redis.call('LPOP', KEYS[1])
  return 1
end
return 0
";

/// Moves the head to the dead letters if it is still the entry given up.
const DEAD_LUA: &str = r"
if redis.call('LINDEX', KEYS[1], 0) ~= ARGV[1] then return 0 end
redis.call('LPOP', KEYS[1])
redis.call('RPUSH', KEYS[2], ARGV[2])
redis.call('LTRIM', KEYS[2], -tonumber(ARGV[3]), -1)
redis.call('EXPIRE', KEYS[2], ARGV[4])
return 1
";

/// One frame's delivery as it waits in the outbox: everything needed to send it again from
/// another worker (the body is fixed at capture; only the signature's timestamp is new per try).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    /// `X-Mediafarm-Delivery-Id`: `<stream_id>/<session_id>/<seq>`.
    pub id: String,
    pub stream_id: String,
    pub session_id: String,
    pub seq: u64,
    /// The webhook URL, or the authority's URL with the frame's values filled in (checked
    /// again by the courier that sends it).
    pub url: String,
    /// Uploads: the name of the authority in `snapshot_authorities` (its client certificate).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authority: Option<String>,
    pub body: String,
    /// Unix seconds when the frame was taken; the delivery deadline counts from here.
    pub offered_at: f64,
    /// Unix seconds when the frame's tick fell due, where known: its delivery is timed
    /// against it ([`super::timing`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub due_at: Option<f64>,
}

/// A delivery given up, or never queued.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    pub id: String,
    pub stream_id: String,
    pub session_id: String,
    pub seq: u64,
    pub url: String,
    /// `outbox_full`, `deadline`, `refused`, `unreadable`; uploads also `tls` (the handshake
    /// was refused or a certificate not accepted) and `frame` (the stored frame is gone or
    /// changed).
    pub reason: String,
    pub detail: String,
    /// Unix seconds when it was given up.
    pub at: f64,
    pub offered_at: f64,
    pub body: String,
}

impl DeadLetter {
    pub fn of(entry: &Entry, reason: &str, detail: String) -> DeadLetter {
        DeadLetter {
            id: entry.id.clone(),
            stream_id: entry.stream_id.clone(),
            session_id: entry.session_id.clone(),
            seq: entry.seq,
            url: entry.url.clone(),
            reason: reason.to_owned(),
            detail,
            at: super::session::unix_now(),
            offered_at: entry.offered_at,
            body: entry.body.clone(),
        }
    }
}

pub fn delivery_id(stream_id: &str, session_id: &str, seq: u64) -> String {
    format!("{stream_id}/{session_id}/{seq}")
}

fn backend_error(e: impl std::fmt::Display) -> TaskError {
    TaskError::transient("BackendError", e.to_string())
}

/// Which of a stream's two outboxes: webhook deliveries or authority uploads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lane {
    Webhook,
    Upload,
}

impl Lane {
    pub fn outbox_key(self, stream_id: &str) -> String {
        match self {
            Lane::Webhook => format!("{OUTBOX_PREFIX}{stream_id}"),
            Lane::Upload => format!("{UPLOAD_OUTBOX_PREFIX}{stream_id}"),
        }
    }

    pub fn dead_key(self, stream_id: &str) -> String {
        match self {
            Lane::Webhook => format!("{DEAD_PREFIX}{stream_id}"),
            Lane::Upload => format!("{UPLOAD_DEAD_PREFIX}{stream_id}"),
        }
    }
}

/// What [`commit`] did with the frame's delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Queued {
    /// No delivery for this session.
    Nothing,
    Queued,
    /// The outbox was full: recorded as a dead letter instead.
    Full,
}

/// Lines for a Redis list of the audit manifest, added in the same step as the frame.
pub struct ManifestLines<'a> {
    pub list_key: String,
    pub lines: &'a [String],
    pub keep_s: u64,
}

/// What [`commit`] did with each lane's entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Committed {
    pub webhook: Queued,
    pub upload: Queued,
}

/// An entry as stored, and its dead letter should the outbox be full; empty texts for none.
fn texts(entry: Option<&Entry>, cap: usize) -> Result<(String, String), TaskError> {
    let Some(e) = entry else {
        return Ok((String::new(), String::new()));
    };
    let dead = DeadLetter::of(
        e,
        "outbox_full",
        format!("the stream's outbox held snapshot_outbox_max = {cap} deliveries"),
    );
    Ok((
        serde_json::to_string(e).map_err(backend_error)?,
        serde_json::to_string(&dead).map_err(backend_error)?,
    ))
}

fn queued(code: Option<&i64>) -> Queued {
    match code {
        Some(1) => Queued::Queued,
        Some(2) => Queued::Full,
        _ => Queued::Nothing,
    }
}

/// Saves the session record (with the new frame counted) and, in the same step, adds the
/// frame's manifest lines and queues its webhook delivery and its authority upload behind
/// their outboxes (at most `cap` entries each).
pub async fn commit(
    backend: &ResultBackend,
    state: &SessionState,
    stream_id: &str,
    (webhook, upload): (Option<&Entry>, Option<&Entry>),
    cap: usize,
    manifest: Option<ManifestLines<'_>>,
) -> Result<Committed, TaskError> {
    let mut conn = backend.connection();
    let text = serde_json::to_string(state).map_err(backend_error)?;
    let (raw, dead) = texts(webhook, cap)?;
    let (up_raw, up_dead) = texts(upload, cap)?;
    let mut cmd = redis::cmd("EVAL");
    cmd.arg(COMMIT_LUA)
        .arg(if manifest.is_some() { 6 } else { 5 })
        .arg(format!("{SESSION_PREFIX}{stream_id}"))
        .arg(Lane::Webhook.outbox_key(stream_id))
        .arg(Lane::Webhook.dead_key(stream_id))
        .arg(Lane::Upload.outbox_key(stream_id))
        .arg(Lane::Upload.dead_key(stream_id));
    if let Some(m) = &manifest {
        cmd.arg(&m.list_key);
    }
    cmd.arg(text)
        .arg(KEEP_S)
        .arg(raw)
        .arg(cap)
        .arg(dead)
        .arg(DEAD_KEEP)
        .arg(manifest.as_ref().map_or(0, |m| m.keep_s))
        .arg(up_raw)
        .arg(up_dead);
    if let Some(m) = &manifest {
        cmd.arg(m.lines);
    }
    let done: Vec<i64> = cmd.query_async(&mut conn).await.map_err(backend_error)?;
    Ok(Committed {
        webhook: queued(done.first()),
        upload: queued(done.get(1)),
    })
}

/// The oldest waiting delivery, as stored (the text [`done`] and [`dead`] compare).
pub async fn head(
    backend: &ResultBackend,
    lane: Lane,
    stream_id: &str,
) -> Result<Option<String>, TaskError> {
    let mut conn = backend.connection();
    redis::cmd("LINDEX")
        .arg(lane.outbox_key(stream_id))
        .arg(0)
        .query_async(&mut conn)
        .await
        .map_err(backend_error)
}

/// How many deliveries wait.
pub async fn len(backend: &ResultBackend, lane: Lane, stream_id: &str) -> Result<u64, TaskError> {
    let mut conn = backend.connection();
    redis::cmd("LLEN")
        .arg(lane.outbox_key(stream_id))
        .query_async(&mut conn)
        .await
        .map_err(backend_error)
}

/// Removes the delivered head `raw`; false when the head is another entry now.
pub async fn done(
    backend: &ResultBackend,
    lane: Lane,
    stream_id: &str,
    raw: &str,
) -> Result<bool, TaskError> {
    let mut conn = backend.connection();
    redis::cmd("EVAL")
        .arg(DONE_LUA)
        .arg(1)
        .arg(lane.outbox_key(stream_id))
        .arg(raw)
        .query_async::<i64>(&mut conn)
        .await
        .map(|n| n == 1)
        .map_err(backend_error)
}

/// Moves the head `raw` to the dead letters as `letter`; false when the head is another now.
pub async fn dead(
    backend: &ResultBackend,
    lane: Lane,
    stream_id: &str,
    raw: &str,
    letter: &DeadLetter,
) -> Result<bool, TaskError> {
    let mut conn = backend.connection();
    let text = serde_json::to_string(letter).map_err(backend_error)?;
    redis::cmd("EVAL")
        .arg(DEAD_LUA)
        .arg(2)
        .arg(lane.outbox_key(stream_id))
        .arg(lane.dead_key(stream_id))
        .arg(raw)
        .arg(text)
        .arg(DEAD_KEEP)
        .arg(KEEP_S)
        .query_async::<i64>(&mut conn)
        .await
        .map(|n| n == 1)
        .map_err(backend_error)
}

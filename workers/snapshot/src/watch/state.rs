//! A session's record in Redis, keyed by stream id: which session owns the stream, when it
//! began, the next sequence number and the last tick. Written after every stored frame, so a
//! worker that picks up a redelivered or continued session resumes from the last tick. Also
//! the claim that keeps a stream to one session at a time. (Stop requests and revokes are the
//! runtime's: `mediafarm::runtime::stop`.)

use mediafarm::{ResultBackend, TaskError};
use serde::{Deserialize, Serialize};

use super::schedule::LastTick;

pub const SESSION_PREFIX: &str = "mediafarm-snapshot-session-";
/// Holds the id of the session that watches a stream while it runs (renewed, with a TTL).
pub const OWNER_PREFIX: &str = "mediafarm-snapshot-owner-";
/// How long an idle session record is kept.
const KEEP_S: u64 = 7 * 86_400;

/// Takes or renews the claim when it is free or already ours; else returns the holder.
const CLAIM_LUA: &str = r"
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then return holder end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return false
";

/// Drops the claim only if it is still ours.
const RELEASE_LUA: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 1
";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LastFrame {
    pub seq: u64,
    pub key: String,
    pub url: String,
    pub width: u32,
    pub height: u32,
    pub bytes: u64,
    /// Hex SHA-256 of the stored object (empty in records written before it was kept).
    #[serde(default)]
    pub sha256: String,
    pub pts_s: f64,
    pub captured_at: String,
    /// Unix seconds when it was taken.
    pub wall_s: f64,
    /// Unix seconds when its tick fell due (RTMP engine sessions; see `timing`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub due_at: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionState {
    pub session_id: String,
    /// The job (slice) that runs the session now.
    pub task_id: String,
    /// Unix seconds when the session began.
    pub started_at: f64,
    /// The `{seq}` of the next frame.
    pub next_seq: u64,
    pub frames: u64,
    pub reconnects: u64,
    pub slices: u64,
    pub last: Option<LastFrame>,
}

impl SessionState {
    pub fn last_tick(&self) -> Option<LastTick> {
        self.last.as_ref().map(|l| LastTick {
            pts_s: l.pts_s,
            wall_s: l.wall_s,
        })
    }
}

fn backend_error(e: impl std::fmt::Display) -> TaskError {
    TaskError::transient("BackendError", e.to_string())
}

pub async fn load(
    backend: &ResultBackend,
    stream_id: &str,
) -> Result<Option<SessionState>, TaskError> {
    let mut conn = backend.connection();
    let raw: Option<String> = redis::cmd("GET")
        .arg(format!("{SESSION_PREFIX}{stream_id}"))
        .query_async(&mut conn)
        .await
        .map_err(backend_error)?;
    Ok(raw.and_then(|text| serde_json::from_str(&text).ok()))
}

pub async fn save(
    backend: &ResultBackend,
    stream_id: &str,
    state: &SessionState,
) -> Result<(), TaskError> {
    let mut conn = backend.connection();
    let text = serde_json::to_string(state).map_err(backend_error)?;
    redis::cmd("SET")
        .arg(format!("{SESSION_PREFIX}{stream_id}"))
        .arg(text)
        .arg("EX")
        .arg(KEEP_S)
        .query_async::<()>(&mut conn)
        .await
        .map_err(backend_error)
}

/// Claims `stream_id` for `session_id` for `ttl`, or renews the claim it already holds.
/// `Ok(Some(holder))`: another session watches the stream now. A crashed session's claim
/// lapses after `ttl`; its redelivery or continuation carries the same session id and so takes
/// the claim back at once.
pub async fn claim(
    backend: &ResultBackend,
    stream_id: &str,
    session_id: &str,
    ttl: std::time::Duration,
) -> Result<Option<String>, TaskError> {
    let mut conn = backend.connection();
    redis::cmd("EVAL")
        .arg(CLAIM_LUA)
        .arg(1)
        .arg(format!("{OWNER_PREFIX}{stream_id}"))
        .arg(session_id)
        .arg(ttl.as_millis().max(1) as u64)
        .query_async(&mut conn)
        .await
        .map_err(backend_error)
}

/// [`claim`] for many `(stream_id, session_id)` pairs in one pipeline (the worker's poller
/// renews all its sessions' claims at once); replies in order.
pub async fn claim_many(
    backend: &ResultBackend,
    claims: &[(&str, &str)],
    ttl: std::time::Duration,
) -> Result<Vec<Option<String>>, TaskError> {
    if claims.is_empty() {
        return Ok(Vec::new());
    }
    let ttl_ms = ttl.as_millis().max(1) as u64;
    let mut pipe = redis::pipe();
    for (stream_id, session_id) in claims {
        pipe.cmd("EVAL")
            .arg(CLAIM_LUA)
            .arg(1)
            .arg(format!("{OWNER_PREFIX}{stream_id}"))
            .arg(*session_id)
            .arg(ttl_ms);
    }
    let mut conn = backend.connection();
    pipe.query_async(&mut conn).await.map_err(backend_error)
}

/// Gives up the claim on `stream_id` if `session_id` holds it.
pub async fn release(
    backend: &ResultBackend,
    stream_id: &str,
    session_id: &str,
) -> Result<(), TaskError> {
    let mut conn = backend.connection();
    redis::cmd("EVAL")
        .arg(RELEASE_LUA)
        .arg(1)
        .arg(format!("{OWNER_PREFIX}{stream_id}"))
        .arg(session_id)
        .query_async::<i64>(&mut conn)
        .await
        .map(drop)
        .map_err(backend_error)
}

/// Forgets an ended session's record.
pub async fn finish(backend: &ResultBackend, stream_id: &str) -> Result<(), TaskError> {
    let mut conn = backend.connection();
    redis::cmd("DEL")
        .arg(format!("{SESSION_PREFIX}{stream_id}"))
        .query_async::<()>(&mut conn)
        .await
        .map_err(backend_error)
}

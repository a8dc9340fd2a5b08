//! A session's record in Redis, keyed by stream id: which session owns the stream, when it
//! began, the next sequence number and the last tick. Written after every stored frame, so a
//! worker that picks up a redelivered or continued session resumes from the last tick. Also
//! the stop request `mediafarm streams stop` leaves for a stream.

use mediafarm::{ResultBackend, TaskError};
use serde::{Deserialize, Serialize};

use super::schedule::LastTick;

pub const SESSION_PREFIX: &str = "mediafarm-snapshot-session-";
/// `mediafarm streams stop STREAM_ID` sets this (to the unix time of the request).
pub const STOP_PREFIX: &str = "mediafarm-snapshot-stop-";
/// How long a stop request or an idle session record is kept.
const KEEP_S: u64 = 7 * 86_400;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LastFrame {
    pub seq: u64,
    pub key: String,
    pub url: String,
    pub width: u32,
    pub height: u32,
    pub bytes: u64,
    pub pts_s: f64,
    pub captured_at: String,
    /// Unix seconds when it was taken.
    pub wall_s: f64,
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

/// Forgets an ended session, and any stop request it obeyed.
pub async fn finish(backend: &ResultBackend, stream_id: &str) -> Result<(), TaskError> {
    let mut conn = backend.connection();
    redis::pipe()
        .cmd("DEL")
        .arg(format!("{SESSION_PREFIX}{stream_id}"))
        .ignore()
        .cmd("DEL")
        .arg(format!("{STOP_PREFIX}{stream_id}"))
        .ignore()
        .query_async::<()>(&mut conn)
        .await
        .map_err(backend_error)
}

/// When a stop was asked for this stream (unix seconds), if it was.
pub async fn stop_requested(
    backend: &ResultBackend,
    stream_id: &str,
) -> Result<Option<f64>, TaskError> {
    let mut conn = backend.connection();
    let raw: Option<String> = redis::cmd("GET")
        .arg(format!("{STOP_PREFIX}{stream_id}"))
        .query_async(&mut conn)
        .await
        .map_err(backend_error)?;
    Ok(raw.and_then(|s| s.trim().parse().ok()))
}

/// Asks the session of `stream_id` (running, or picked up later) to stop.
pub async fn request_stop(
    backend: &ResultBackend,
    stream_id: &str,
    now: f64,
) -> Result<(), TaskError> {
    let mut conn = backend.connection();
    redis::cmd("SET")
        .arg(format!("{STOP_PREFIX}{stream_id}"))
        .arg(format!("{now:.3}"))
        .arg("EX")
        .arg(KEEP_S)
        .query_async::<()>(&mut conn)
        .await
        .map_err(backend_error)
}

/// Whether job `id` was revoked (Celery's revoke, kept in Redis by the runtime).
pub async fn revoked(backend: &ResultBackend, id: &str) -> bool {
    mediafarm::revoke::Revocations::default()
        .check_stored(backend, id)
        .await
}

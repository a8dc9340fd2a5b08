//! Starting and stopping `snapshot.watch` sessions for published streams, once each.
//!
//! A publish starts at most one session per stream id, however often its hook arrives
//! (media servers retry hooks, and two replicas of this service may each get one):
//!
//! 1. a stream whose claim (`state::claim`, the same one that keeps a stream to one session)
//!    is held by a session that was not asked to stop is watched already: nothing is sent;
//! 2. a stream whose session was asked to stop (a quick republish after `publish_done`) is
//!    waited for, up to `hooks_takeover_wait`, so the new publish gets its own session;
//! 3. a start guard `mediafarm-snapshot-hook-<stream_id>` (Redis `SET NX`, kept
//!    `hooks_start_guard`, holding the job id) covers the moment between sending the job and
//!    the session claiming the stream: a second hook in that window sends nothing.
//!
//! The end of publishing leaves the stop request `mediafarm streams stop` leaves
//! (`mediafarm::runtime::stop`, scope [`STOP_SCOPE`]) and drops the guard; the session ends as
//! `stopped` after its last frame. A session whose job has not begun yet when its stream ends
//! (a busy farm) does not obey a request older than itself: its job is revoked instead.

use std::time::Duration;

use mediafarm::client::SendOptions;
use mediafarm::runtime::stop;
use mediafarm::{Client, Settings, Task};
use serde_json::Value;

use crate::watch::state::OWNER_PREFIX;
use crate::watch::{state, Watch, WatchArgs, STOP_SCOPE};

/// The start guard of a stream id, holding the id of the job sent for it.
pub const GUARD_PREFIX: &str = "mediafarm-snapshot-hook-";

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("Redis: {0}")]
    Redis(String),
    #[error("cannot send the snapshot.watch job: {0}")]
    Send(String),
    #[error(
        "the previous session of stream {stream_id} (session {holder}) was asked to stop but \
         has not ended within {waited:?}"
    )]
    StillEnding {
        stream_id: String,
        holder: String,
        waited: Duration,
    },
}

/// What a publish did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Started {
    /// A job was sent: its id (the session's id).
    Sent(String),
    /// A session runs already (its id).
    Watched(String),
    /// A job was sent a moment ago for this stream (its id).
    Starting(String),
}

fn redis_error(e: impl std::fmt::Display) -> StartError {
    StartError::Redis(e.to_string())
}

/// Starts the session of `args` (its stream id) unless one runs or is starting.
pub async fn start(
    client: &Client,
    queue: &str,
    args: &WatchArgs,
    guard_ttl: Duration,
    takeover_wait: Duration,
) -> Result<Started, StartError> {
    let backend = client.backend();
    let mut conn = backend.connection();
    let stream_id = &args.stream_id;
    let owner_key = format!("{OWNER_PREFIX}{stream_id}");
    let waited_from = tokio::time::Instant::now();
    loop {
        let holder: Option<String> = redis::cmd("GET")
            .arg(&owner_key)
            .query_async(&mut conn)
            .await
            .map_err(redis_error)?;
        let Some(holder) = holder else { break };
        let began = state::load(backend, stream_id)
            .await
            .map_err(|e| StartError::Redis(e.message))?
            .filter(|s| s.session_id == holder)
            .map_or(0.0, |s| s.started_at);
        let no_jobs: [&str; 0] = [];
        let signals = stop::signals(backend, STOP_SCOPE, stream_id, &no_jobs)
            .await
            .map_err(redis_error)?;
        if !signals.stop_requested_since(began) {
            return Ok(Started::Watched(holder));
        }
        if waited_from.elapsed() >= takeover_wait {
            return Err(StartError::StillEnding {
                stream_id: stream_id.clone(),
                holder,
                waited: takeover_wait,
            });
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let job_id = uuid::Uuid::new_v4().to_string();
    let guard = format!("{GUARD_PREFIX}{stream_id}");
    let set: Option<String> = redis::cmd("SET")
        .arg(&guard)
        .arg(&job_id)
        .arg("NX")
        .arg("PX")
        .arg(guard_ttl.as_millis().max(1) as u64)
        .query_async(&mut conn)
        .await
        .map_err(redis_error)?;
    if set.is_none() {
        let other: Option<String> = redis::cmd("GET")
            .arg(&guard)
            .query_async(&mut conn)
            .await
            .map_err(redis_error)?;
        return Ok(Started::Starting(other.unwrap_or_default()));
    }
    let kwargs = match serde_json::to_value(args) {
        Ok(Value::Object(m)) => m,
        _ => {
            return Err(StartError::Send(
                "the job's arguments are not an object".into(),
            ))
        }
    };
    let opts = SendOptions {
        queue: Some(queue.to_owned()),
        task_id: Some(job_id.clone()),
        ..Default::default()
    };
    if let Err(e) = client.send_task(Watch::NAME, kwargs, &opts).await {
        // Let the media server's retry (or the next publish) try again at once.
        let _ = redis::cmd("DEL")
            .arg(&guard)
            .query_async::<()>(&mut conn)
            .await;
        return Err(StartError::Send(e.to_string()));
    }
    Ok(Started::Sent(job_id))
}

/// What the end of a publish did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stopped {
    /// The job revoked because it had not begun its session yet.
    pub revoked: Option<String>,
}

/// Asks the session of `stream_id` to stop (as `mediafarm streams stop` does) and drops the
/// start guard; a job sent for it that has not claimed the stream yet is revoked.
pub async fn stop(
    settings: &Settings,
    client: &Client,
    stream_id: &str,
) -> Result<Stopped, StartError> {
    let backend = client.backend();
    stop::request(backend, STOP_SCOPE, stream_id)
        .await
        .map_err(redis_error)?;
    let mut conn = backend.connection();
    let (sent, holder): (Option<String>, Option<String>) = redis::pipe()
        .cmd("GETDEL")
        .arg(format!("{GUARD_PREFIX}{stream_id}"))
        .cmd("GET")
        .arg(format!("{OWNER_PREFIX}{stream_id}"))
        .query_async(&mut conn)
        .await
        .map_err(redis_error)?;
    let revoked = match (sent, holder) {
        (Some(job), None) => {
            // Not begun (or over already: then the revoke changes nothing).
            mediafarm::amqp::pidbox::broadcast(
                settings,
                backend,
                std::slice::from_ref(&job),
                false,
            )
            .await
            .map_err(|e| StartError::Send(e.to_string()))?;
            Some(job)
        }
        _ => None,
    };
    Ok(Stopped { revoked })
}

//! Signals for long-running jobs: stop requests by subject, and revokes, as one poll.
//!
//! A long job (a live-stream session) runs on for hours and across continuations, so the
//! runtime's own stop switches (soft limit, `revoke --terminate`) are not enough: a person asks
//! to stop *a subject* (a stream id) whichever job runs it now, or will pick it up next. This
//! module owns that request — [`request`] leaves it in Redis, [`signals`] reads it together
//! with Celery's revoke set in one round trip, [`clear`] forgets it — so neither the CLI nor a
//! worker spells a key or reaches into the revoke set.
//!
//! A request is a key `mediafarm-<scope>-stop-<subject>` holding the unix time it was made,
//! kept for 7 days so one made while a session is being handed on waits for the next job. The
//! format is fixed: running farms may hold such keys. `scope` names the owner of the subjects
//! (the worker kind, e.g. `snapshot`), so two kinds of subjects never share a key.
//!
//! A request stays in Redis until the subject's owner clears it, so [`Signals`] reports when
//! it was made: a session obeys only requests made after it began
//! ([`Signals::stop_requested_since`]), and an old one never ends a new session.
//!
//! ```no_run
//! # async fn demo(backend: &mediafarm::ResultBackend, ctx: &mediafarm::TaskContext) -> Result<(), Box<dyn std::error::Error>> {
//! use mediafarm::runtime::stop;
//! // The CLI:
//! stop::request(backend, "snapshot", "room7").await?;
//! // The session, every poll (this job and the session's first job may be revoked):
//! let started_at = 1_700_000_000.0;
//! let signals = ctx.signals("snapshot", "room7", &[&ctx.id, "first-job-id"]).await?;
//! if signals.stop_requested_since(started_at) || signals.revoked {
//!     // wrap up
//! }
//! # Ok(()) }
//! ```

use crate::amqp::pidbox::REVOKED_KEY;
use crate::backend::{BackendError, ResultBackend};

/// The scope of live-stream sessions, by stream id: what `mediafarm streams stop STREAM_ID` asks
/// and snapshot-worker's `snapshot.watch` obeys. Named here, once, so the CLI and the worker
/// cannot drift apart; fixed, because running farms hold requests under it.
pub const STREAM_SESSIONS: &str = "snapshot";

/// How long a stop request is kept when nobody clears it.
const KEEP_S: u64 = 7 * 86_400;

/// The Redis key of a stop request for `subject` of `scope`.
fn key(scope: &str, subject: &str) -> String {
    format!("mediafarm-{scope}-stop-{subject}")
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// What a long-running job looks for every poll.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Signals {
    /// When a stop was asked for the subject (unix seconds), if it was.
    pub stop_requested_at: Option<f64>,
    /// Whether any of the job ids asked about is revoked (Celery's revoke, kept in Redis by
    /// the runtime until it lapses).
    pub revoked: bool,
}

impl Signals {
    /// Whether a stop was asked at or after `began` (unix seconds): requests older than the
    /// session are not for it.
    pub fn stop_requested_since(&self, began: f64) -> bool {
        self.stop_requested_at.is_some_and(|at| at >= began)
    }
}

/// Asks whoever runs `subject` of `scope` (now, or when it is picked up later) to stop.
/// Returns the time of the request (unix seconds).
pub async fn request(
    backend: &ResultBackend,
    scope: &str,
    subject: &str,
) -> Result<f64, BackendError> {
    // Millisecond precision, as the request has always been written.
    let now = (unix_now() * 1000.0).floor() / 1000.0;
    let mut conn = backend.connection();
    redis::cmd("SET")
        .arg(key(scope, subject))
        .arg(format!("{now:.3}"))
        .arg("EX")
        .arg(KEEP_S)
        .query_async::<()>(&mut conn)
        .await?;
    Ok(now)
}

/// A stop request for `subject` of `scope` and revokes of `ids`, in one round trip.
pub async fn signals(
    backend: &ResultBackend,
    scope: &str,
    subject: &str,
    ids: &[&str],
) -> Result<Signals, BackendError> {
    let mut pipe = redis::pipe();
    pipe.cmd("GET").arg(key(scope, subject));
    for id in ids {
        pipe.cmd("ZSCORE").arg(REVOKED_KEY).arg(*id);
    }
    let mut conn = backend.connection();
    let replies: Vec<redis::Value> = pipe.query_async(&mut conn).await?;
    let mut replies = replies.into_iter();
    let stop: Option<String> = match replies.next() {
        Some(v) => redis::from_redis_value(v).map_err(redis::RedisError::from)?,
        None => None,
    };
    let mut until = Vec::with_capacity(ids.len());
    for v in replies {
        until.push(redis::from_redis_value::<Option<f64>>(v).map_err(redis::RedisError::from)?);
    }
    Ok(read(stop.as_deref(), &until, unix_now()))
}

/// One subject's question in [`signals_batch`]: its stop request, and revokes of its job ids.
#[derive(Debug, Clone, Copy)]
pub struct Asked<'a> {
    pub subject: &'a str,
    pub ids: &'a [&'a str],
}

/// [`signals`] for many subjects of `scope` in one round trip (one `MGET` of their stop
/// requests and one `ZMSCORE` of all their ids in Celery's revoke set): what a worker running
/// thousands of sessions asks once per poll instead of once per session. Replies in the order
/// asked.
pub async fn signals_batch(
    backend: &ResultBackend,
    scope: &str,
    asked: &[Asked<'_>],
) -> Result<Vec<Signals>, BackendError> {
    if asked.is_empty() {
        return Ok(Vec::new());
    }
    let keys: Vec<String> = asked.iter().map(|a| key(scope, a.subject)).collect();
    let ids: Vec<&str> = asked.iter().flat_map(|a| a.ids.iter().copied()).collect();
    let mut pipe = redis::pipe();
    pipe.cmd("MGET").arg(&keys);
    if !ids.is_empty() {
        pipe.cmd("ZMSCORE").arg(REVOKED_KEY).arg(&ids);
    }
    let mut conn = backend.connection();
    let replies: Vec<redis::Value> = pipe.query_async(&mut conn).await?;
    let mut replies = replies.into_iter();
    let stops: Vec<Option<String>> = match replies.next() {
        Some(v) => redis::from_redis_value(v).map_err(redis::RedisError::from)?,
        None => Vec::new(),
    };
    let until: Vec<Option<f64>> = match replies.next() {
        Some(v) => redis::from_redis_value(v).map_err(redis::RedisError::from)?,
        None => Vec::new(),
    };
    let now = unix_now();
    let mut at = 0;
    Ok(asked
        .iter()
        .enumerate()
        .map(|(i, a)| {
            let mine = until.get(at..at + a.ids.len()).unwrap_or_default();
            at += a.ids.len();
            read(stops.get(i).and_then(|s| s.as_deref()), mine, now)
        })
        .collect())
}

/// Forgets the stop request for `subject` of `scope` (the subject's session has ended).
pub async fn clear(
    backend: &ResultBackend,
    scope: &str,
    subject: &str,
) -> Result<(), BackendError> {
    let mut conn = backend.connection();
    redis::cmd("DEL")
        .arg(key(scope, subject))
        .query_async::<()>(&mut conn)
        .await?;
    Ok(())
}

/// The signals in a poll's replies: the stop request's text, and each id's revoke expiry.
fn read(stop: Option<&str>, revoked_until: &[Option<f64>], now: f64) -> Signals {
    Signals {
        stop_requested_at: stop.and_then(|s| s.trim().parse().ok()),
        revoked: revoked_until.iter().flatten().any(|until| *until > now),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_format_is_the_one_running_farms_hold() {
        assert_eq!(key("snapshot", "room7"), "mediafarm-snapshot-stop-room7");
    }

    #[test]
    fn a_session_obeys_only_requests_made_after_it_began() {
        let s = read(Some("100.250"), &[], 0.0);
        assert_eq!(s.stop_requested_at, Some(100.25));
        assert!(s.stop_requested_since(100.0));
        assert!(s.stop_requested_since(100.25));
        assert!(!s.stop_requested_since(100.5));
        assert!(!read(None, &[], 0.0).stop_requested_since(0.0));
        assert_eq!(read(Some("garbage"), &[], 0.0).stop_requested_at, None);
    }

    #[test]
    fn a_revoke_counts_until_it_lapses() {
        assert!(!read(None, &[None, None], 50.0).revoked);
        assert!(read(None, &[None, Some(60.0)], 50.0).revoked);
        assert!(!read(None, &[Some(40.0), None], 50.0).revoked);
        assert!(!read(None, &[], 50.0).revoked);
    }
}

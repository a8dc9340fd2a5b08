//! Revoking jobs. A revoke arrives as Celery's broadcast control message (what Python's
//! `app.control.revoke(id)` and `mediafarm revoke` publish to the `celery.pidbox` fanout
//! exchange) and is also written to Redis, so a worker that starts later, or was away when the
//! broadcast went out, still skips the job. A revoked job that has not started is stored as
//! REVOKED and not run; with `terminate` a running one is stopped and stored as REVOKED too.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use super::mailbox::{self, Request};
use crate::amqp::broker::BrokerError;
use crate::backend::{BackendError, ResultBackend};
use crate::redis_broker::RedisBroker;
use crate::settings::Settings;

/// Redis sorted set of revoked ids, scored by when the revoke may be forgotten.
pub const REVOKED_KEY: &str = "mediafarm-revoked";
/// How long a revoke is remembered at least (Celery keeps them 3 hours).
const REMEMBER: Duration = Duration::from_secs(3 * 3600);

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// The ids this worker must not run, and the jobs it can stop.
#[derive(Default)]
pub struct Revocations {
    /// Revoked id → when it may be forgotten (unix seconds).
    revoked: Mutex<HashMap<String, f64>>,
    /// Running job id → its terminate switch.
    running: Mutex<HashMap<String, CancellationToken>>,
}

impl Revocations {
    pub fn is_revoked(&self, id: &str) -> bool {
        self.revoked
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(id)
    }

    /// Marks `ids` revoked here; with `terminate`, stops those running. Returns the running
    /// jobs told to stop.
    pub fn apply(&self, ids: &[String], terminate: bool, until: f64) -> Vec<String> {
        {
            let mut revoked = self.revoked.lock().unwrap_or_else(|e| e.into_inner());
            for id in ids {
                revoked.insert(id.clone(), until);
            }
        }
        if !terminate {
            return Vec::new();
        }
        let running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        ids.iter()
            .filter(|id| running.get(*id).inspect(|t| t.cancel()).is_some())
            .cloned()
            .collect()
    }

    /// The ids known revoked here, in no particular order (Celery's `inspect revoked`).
    pub fn ids(&self) -> Vec<String> {
        self.revoked
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .cloned()
            .collect()
    }

    /// Registers a running job; the token is cancelled if it is revoked with `terminate`.
    pub fn started(&self, id: &str) -> CancellationToken {
        let token = CancellationToken::new();
        self.running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.to_owned(), token.clone());
        if self.is_revoked(id) {
            // Revoked between the check and the start: no terminate flag is known here, and a
            // job revoked before it started must not run, so stop it.
            token.cancel();
        }
        token
    }

    pub fn finished(&self, id: &str) {
        self.running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
    }

    /// Asks Redis whether `id` was revoked (and remembers it if so). For jobs that waited —
    /// delayed or retried — a revoke broadcast while this worker was starting or disconnected
    /// must still stop them, and they are rare enough to afford the round trip.
    pub async fn check_stored(&self, backend: &ResultBackend, id: &str) -> bool {
        let mut conn = backend.connection();
        let score: Result<Option<f64>, _> = redis::cmd("ZSCORE")
            .arg(REVOKED_KEY)
            .arg(id)
            .query_async(&mut conn)
            .await;
        match score {
            Ok(Some(until)) if until > unix_now() => {
                self.revoked
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(id.to_owned(), until);
                true
            }
            _ => false,
        }
    }

    /// Replaces the known set with what Redis holds (forgetting expired entries).
    pub async fn refresh(&self, backend: &ResultBackend) -> Result<(), BackendError> {
        let now = unix_now();
        let mut conn = backend.connection();
        let (_, entries): (i64, Vec<(String, f64)>) = redis::pipe()
            .cmd("ZREMRANGEBYSCORE")
            .arg(REVOKED_KEY)
            .arg("-inf")
            .arg(now)
            .cmd("ZRANGE")
            .arg(REVOKED_KEY)
            .arg(0)
            .arg(-1)
            .arg("WITHSCORES")
            .query_async(&mut conn)
            .await?;
        let mut revoked = self.revoked.lock().unwrap_or_else(|e| e.into_inner());
        revoked.retain(|_, until| *until > now);
        for (id, until) in entries {
            revoked.insert(id, until);
        }
        Ok(())
    }
}

/// When a revoke made now may be forgotten: after results expire, and not before 3 hours.
pub fn remember_until(settings: &Settings) -> f64 {
    unix_now() + settings.result_expires.max(REMEMBER).as_secs_f64()
}

/// Records revokes in Redis for every worker, present and future.
pub async fn record(
    backend: &ResultBackend,
    ids: &[String],
    until: f64,
) -> Result<(), BackendError> {
    if ids.is_empty() {
        return Ok(());
    }
    let mut conn = backend.connection();
    let mut cmd = redis::cmd("ZADD");
    cmd.arg(REVOKED_KEY);
    for id in ids {
        cmd.arg(until).arg(id);
    }
    let _: i64 = cmd.query_async(&mut conn).await?;
    Ok(())
}

/// What a `revoke` asks: Celery's `task_id` (one id or a list) and `terminate`.
#[derive(Debug, PartialEq)]
pub struct RevokeCommand {
    pub ids: Vec<String>,
    pub terminate: bool,
}

impl RevokeCommand {
    pub fn of(request: &Request) -> RevokeCommand {
        RevokeCommand {
            ids: request.list("task_id"),
            terminate: request
                .arguments
                .get("terminate")
                .and_then(Value::as_bool)
                .unwrap_or(false),
        }
    }
}

/// Applies a revoke here (Celery's `terminate` command is a revoke with `terminate` forced),
/// records it in Redis, and answers as Celery's `revoke` command does.
pub async fn revoke(
    revocations: &Revocations,
    backend: &ResultBackend,
    settings: &Settings,
    request: &Request,
) -> Value {
    let mut cmd = RevokeCommand::of(request);
    cmd.terminate |= request.method == "terminate";
    let until = remember_until(settings);
    let stopped = revocations.apply(&cmd.ids, cmd.terminate, until);
    tracing::info!(ids = ?cmd.ids, terminate = cmd.terminate, ?stopped, "revoked");
    if let Err(e) = record(backend, &cmd.ids, until).await {
        tracing::warn!(error = %e, "could not record the revoke in Redis; this worker still knows it");
    }
    revoke_reply(&cmd, &stopped)
}

/// Celery's words: `tasks {'a', 'b'} flagged as revoked`, or with `terminate` the ids stopped
/// (`terminate: a, b`) or `terminate: tasks unknown`.
fn revoke_reply(cmd: &RevokeCommand, stopped: &[String]) -> Value {
    if cmd.terminate {
        if stopped.is_empty() {
            return json!({"ok": "terminate: tasks unknown"});
        }
        return json!({"ok": format!("terminate: {}", stopped.join(", "))});
    }
    let set: Vec<String> = cmd.ids.iter().map(|id| format!("'{id}'")).collect();
    json!({"ok": format!("tasks {{{}}} flagged as revoked", set.join(", "))})
}

/// Publishes a revoke as Celery's `app.control.revoke` does, after recording it in Redis.
pub async fn broadcast(
    settings: &Settings,
    backend: &ResultBackend,
    ids: &[String],
    terminate: bool,
) -> Result<(), RevokeError> {
    record(backend, ids, remember_until(settings)).await?;
    let task_id = if ids.len() == 1 {
        json!(ids[0])
    } else {
        json!(ids)
    };
    let arguments = json!({"task_id": task_id, "terminate": terminate, "signal": "SIGTERM"});
    if settings.broker_is_redis() {
        let broker = RedisBroker::connect(settings)
            .await
            .map_err(BrokerError::from)?;
        super::over_redis::publish(&broker, "revoke", arguments, None, None)
            .await
            .map_err(BrokerError::from)?;
        return Ok(());
    }
    let conn = crate::amqp::broker::connect(settings, "mediafarm revoke").await?;
    let channel = conn.create_channel().await.map_err(BrokerError::from)?;
    mailbox::publish(&channel, "revoke", arguments, None, None).await?;
    crate::amqp::broker::close_quietly(&conn, &[&channel], "sent").await;
    Ok(())
}

#[derive(Debug, thiserror::Error)]
pub enum RevokeError {
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error(transparent)]
    Backend(#[from] BackendError),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_celerys_revoke_and_answers_in_its_words() {
        let body = br#"{"method": "revoke", "arguments": {"task_id": "abc", "terminate": false, "signal": "SIGTERM"}, "destination": null, "pattern": null, "matcher": null}"#;
        let one = RevokeCommand::of(&Request::parse(body).unwrap());
        assert_eq!(
            one,
            RevokeCommand {
                ids: vec!["abc".into()],
                terminate: false
            }
        );
        assert_eq!(
            revoke_reply(&one, &[]),
            json!({"ok": "tasks {'abc'} flagged as revoked"})
        );
        let many = br#"{"method": "revoke", "arguments": {"task_id": ["a", "b"], "terminate": true}, "destination": ["w@h"]}"#;
        let many = RevokeCommand::of(&Request::parse(many).unwrap());
        assert_eq!(many.ids, ["a", "b"]);
        assert!(many.terminate);
        assert_eq!(
            revoke_reply(&many, &[]),
            json!({"ok": "terminate: tasks unknown"})
        );
        assert_eq!(
            revoke_reply(&many, &["b".into()]),
            json!({"ok": "terminate: b"})
        );
    }

    #[test]
    fn terminate_stops_only_running_revoked_jobs() {
        let r = Revocations::default();
        let a = r.started("a");
        let b = r.started("b");
        assert_eq!(r.apply(&["a".into()], true, f64::MAX), ["a"]);
        assert!(a.is_cancelled());
        assert!(!b.is_cancelled());
        assert!(r.is_revoked("a") && !r.is_revoked("b"));
        r.finished("a");
        assert!(r.apply(&["a".into()], true, f64::MAX).is_empty());
        assert_eq!(r.ids(), ["a"]);
    }
}

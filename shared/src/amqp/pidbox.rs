//! Revoking jobs. A revoke arrives as Celery's broadcast control message (what Python's
//! `app.control.revoke(id)` and `mediafarm revoke` publish to the `celery.pidbox` fanout
//! exchange) and is also written to Redis, so a worker that starts later, or was away when the
//! broadcast went out, still skips the job. A revoked job that has not started is stored as
//! REVOKED and not run; with `terminate` a running one is stopped and stored as REVOKED too.
//!
//! `ping` is answered as a Celery worker answers it (`{"<node>": {"ok": "pong"}}` to the
//! requester's reply exchange, with its `ticket`), so `celery inspect ping` and
//! `app.control.ping()` see mediafarm workers. Other control commands are not answered yet.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, ExchangeKind};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use crate::amqp::broker::BrokerError;
use crate::backend::{BackendError, ResultBackend};
use crate::settings::Settings;

/// Celery's control exchange (kombu `Mailbox` "celery", `<namespace>.pidbox`).
pub const CONTROL_EXCHANGE: &str = "celery.pidbox";
/// Where control replies go (kombu `Mailbox.reply_exchange`, `reply.<namespace>.pidbox`).
pub const REPLY_EXCHANGE: &str = "reply.celery.pidbox";
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

    /// Marks `ids` revoked here; with `terminate`, stops those running. Returns how many
    /// running jobs were told to stop.
    pub fn apply(&self, ids: &[String], terminate: bool, until: f64) -> usize {
        {
            let mut revoked = self.revoked.lock().unwrap_or_else(|e| e.into_inner());
            for id in ids {
                revoked.insert(id.clone(), until);
            }
        }
        if !terminate {
            return 0;
        }
        let running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        ids.iter()
            .filter_map(|id| running.get(id))
            .map(CancellationToken::cancel)
            .count()
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

/// A control command this worker acts on.
#[derive(Debug, PartialEq)]
pub struct RevokeCommand {
    pub ids: Vec<String>,
    pub terminate: bool,
}

/// Reads a kombu mailbox message; `None` for other methods or other destinations.
pub fn parse_control(body: &[u8], hostname: &str) -> Option<RevokeCommand> {
    let v: Value = serde_json::from_slice(body).ok()?;
    if let Some(dest) = v.get("destination").and_then(Value::as_array) {
        if !dest.is_empty() && !dest.iter().any(|d| d.as_str() == Some(hostname)) {
            return None;
        }
    }
    if v.get("method").and_then(Value::as_str) != Some("revoke") {
        return None;
    }
    let args = v.get("arguments")?;
    let ids = match args.get("task_id")? {
        Value::String(s) => vec![s.clone()],
        Value::Array(items) => items
            .iter()
            .filter_map(|i| i.as_str().map(str::to_owned))
            .collect(),
        _ => return None,
    };
    let terminate = args
        .get("terminate")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    Some(RevokeCommand { ids, terminate })
}

/// Where a control command wants its reply: kombu's `reply_to` and `ticket`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplyTo {
    pub routing_key: String,
    pub ticket: String,
}

/// A `ping` for this worker (all workers, or `hostname` among its destinations) that asks for a
/// reply; `None` for anything else.
pub fn parse_ping(body: &[u8], hostname: &str) -> Option<ReplyTo> {
    let v: Value = serde_json::from_slice(body).ok()?;
    if let Some(dest) = v.get("destination").and_then(Value::as_array) {
        if !dest.is_empty() && !dest.iter().any(|d| d.as_str() == Some(hostname)) {
            return None;
        }
    }
    if v.get("method").and_then(Value::as_str) != Some("ping") {
        return None;
    }
    let reply_to = v.get("reply_to")?;
    if reply_to.get("exchange").and_then(Value::as_str) != Some(REPLY_EXCHANGE) {
        return None;
    }
    Some(ReplyTo {
        routing_key: reply_to.get("routing_key")?.as_str()?.to_owned(),
        ticket: v.get("ticket")?.as_str()?.to_owned(),
    })
}

/// Sends `{"<hostname>": reply}` to the requester, as kombu's `Mailbox._publish_reply` does:
/// to the reply exchange (declared as kombu declares it: direct, not durable) under the
/// requester's routing key, with the `ticket` header it matches replies by.
async fn send_reply(
    channel: &Channel,
    hostname: &str,
    to: &ReplyTo,
    reply: Value,
) -> Result<(), BrokerError> {
    channel
        .exchange_declare(
            REPLY_EXCHANGE.into(),
            ExchangeKind::Direct,
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let mut headers = FieldTable::default();
    headers.insert(
        "ticket".into(),
        AMQPValue::LongString(to.ticket.as_str().into()),
    );
    headers.insert("clock".into(), AMQPValue::LongLongInt(1));
    let props = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_content_encoding("utf-8".into())
        .with_headers(headers);
    let body = json!({ hostname: reply });
    channel
        .basic_publish(
            REPLY_EXCHANGE.into(),
            to.routing_key.as_str().into(),
            BasicPublishOptions::default(),
            body.to_string().as_bytes(),
            props,
        )
        .await?;
    Ok(())
}

/// Declares the control exchange exactly as kombu does (fanout, not durable), or Python's
/// declaration would be refused.
async fn declare_exchange(channel: &Channel) -> Result<(), BrokerError> {
    channel
        .exchange_declare(
            CONTROL_EXCHANGE.into(),
            ExchangeKind::Fanout,
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        )
        .await?;
    Ok(())
}

/// Consumes this worker's control queue `<hostname>.celery.pidbox` until the channel closes,
/// applying revokes and recording them in Redis.
pub async fn listen(
    channel: Channel,
    hostname: String,
    revocations: std::sync::Arc<Revocations>,
    backend: ResultBackend,
    settings: Settings,
) -> Result<(), BrokerError> {
    declare_exchange(&channel).await?;
    let queue = format!("{hostname}.{CONTROL_EXCHANGE}");
    let mut args = FieldTable::default();
    // As Celery's control queues: stale commands expire, the queue goes when the worker does.
    args.insert("x-message-ttl".into(), AMQPValue::LongInt(300_000));
    args.insert("x-expires".into(), AMQPValue::LongInt(10_000));
    channel
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                auto_delete: true,
                exclusive: true,
                ..Default::default()
            },
            args,
        )
        .await?;
    channel
        .queue_bind(
            queue.as_str().into(),
            CONTROL_EXCHANGE.into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let mut consumer = channel
        .basic_consume(
            queue.as_str().into(),
            format!("{hostname}-control").as_str().into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    while let Some(delivery) = consumer.next().await {
        let delivery = delivery?;
        if let Some(to) = parse_ping(&delivery.data, &hostname) {
            if let Err(e) = send_reply(&channel, &hostname, &to, json!({"ok": "pong"})).await {
                tracing::warn!(error = %e, "could not answer a ping");
            }
            continue;
        }
        let Some(cmd) = parse_control(&delivery.data, &hostname) else {
            tracing::debug!("control message ignored (not a revoke for this worker)");
            continue;
        };
        let until = remember_until(&settings);
        let stopped = revocations.apply(&cmd.ids, cmd.terminate, until);
        tracing::info!(ids = ?cmd.ids, terminate = cmd.terminate, stopped, "revoked");
        if let Err(e) = record(&backend, &cmd.ids, until).await {
            tracing::warn!(error = %e, "could not record the revoke in Redis; this worker still knows it");
        }
    }
    Ok(())
}

/// Publishes a revoke as Celery's `app.control.revoke` does, after recording it in Redis.
pub async fn broadcast(
    settings: &Settings,
    backend: &ResultBackend,
    ids: &[String],
    terminate: bool,
) -> Result<(), RevokeError> {
    record(backend, ids, remember_until(settings)).await?;
    let conn = crate::amqp::broker::connect(settings, "mediafarm revoke").await?;
    let channel = conn.create_channel().await.map_err(BrokerError::from)?;
    declare_exchange(&channel).await?;
    let task_id = if ids.len() == 1 {
        json!(ids[0])
    } else {
        json!(ids)
    };
    let body = json!({
        "method": "revoke",
        "arguments": {"task_id": task_id, "terminate": terminate, "signal": "SIGTERM"},
        "destination": null,
        "pattern": null,
        "matcher": null,
    });
    let mut headers = FieldTable::default();
    headers.insert("clock".into(), AMQPValue::LongLongInt(1));
    headers.insert("expires".into(), AMQPValue::LongLongInt(0));
    let props = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_content_encoding("utf-8".into())
        .with_headers(headers);
    channel
        .basic_publish(
            CONTROL_EXCHANGE.into(),
            "".into(),
            BasicPublishOptions::default(),
            body.to_string().as_bytes(),
            props,
        )
        .await
        .map_err(BrokerError::from)?;
    let _ = channel.close(200, "sent".into()).await;
    let _ = conn.close(200, "sent".into()).await;
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
    fn reads_celerys_revoke_broadcast() {
        let body = br#"{"method": "revoke", "arguments": {"task_id": "abc", "terminate": false, "signal": "SIGTERM"}, "destination": null, "pattern": null, "matcher": null}"#;
        assert_eq!(
            parse_control(body, "w@h"),
            Some(RevokeCommand {
                ids: vec!["abc".into()],
                terminate: false
            })
        );
        let many = br#"{"method": "revoke", "arguments": {"task_id": ["a", "b"], "terminate": true}, "destination": ["w@h"]}"#;
        assert_eq!(parse_control(many, "w@h").unwrap().ids, ["a", "b"]);
        assert!(parse_control(many, "w@h").unwrap().terminate);
        assert_eq!(parse_control(many, "other@h"), None);
        assert_eq!(
            parse_control(br#"{"method": "ping", "arguments": {}}"#, "w@h"),
            None
        );
        assert_eq!(parse_control(b"not json", "w@h"), None);
    }

    #[test]
    fn reads_celerys_ping_with_its_reply_address() {
        let body = br#"{"method": "ping", "arguments": {}, "destination": ["w@h"], "pattern": null, "matcher": null, "ticket": "t-1", "reply_to": {"exchange": "reply.celery.pidbox", "routing_key": "rk-1"}}"#;
        assert_eq!(
            parse_ping(body, "w@h"),
            Some(ReplyTo {
                routing_key: "rk-1".into(),
                ticket: "t-1".into()
            })
        );
        assert_eq!(parse_ping(body, "other@h"), None, "another worker's ping");
        let no_reply = br#"{"method": "ping", "arguments": {}, "destination": null}"#;
        assert_eq!(parse_ping(no_reply, "w@h"), None, "nothing to answer to");
        let revoke = br#"{"method": "revoke", "arguments": {"task_id": "a"}, "ticket": "t", "reply_to": {"exchange": "reply.celery.pidbox", "routing_key": "r"}}"#;
        assert_eq!(parse_ping(revoke, "w@h"), None);
    }

    #[test]
    fn terminate_stops_only_running_revoked_jobs() {
        let r = Revocations::default();
        let a = r.started("a");
        let b = r.started("b");
        assert_eq!(r.apply(&["a".into()], true, f64::MAX), 1);
        assert!(a.is_cancelled());
        assert!(!b.is_cancelled());
        assert!(r.is_revoked("a") && !r.is_revoked("b"));
        r.finished("a");
        assert_eq!(r.apply(&["a".into()], true, f64::MAX), 0);
    }
}

//! Looking into and replaying a queue's dead letters (`<queue>.dead`), for `mediafarm dead`.
//! Listing takes messages without acknowledging them and closes the channel, so the broker
//! puts every one back; replaying forgets the job's stored FAILURE (it is pending again) and
//! publishes a copy to the work queue (confirmed) before it acknowledges the dead letter, so a
//! crash in between duplicates rather than loses.
//!
//! Most letters are put there by a worker, with `x-mediafarm-dead-*` headers saying why. On a
//! quorum work queue RabbitMQ puts a message there itself once it was delivered more than
//! `task_quorum_delivery_limit` times (every worker that took it died or gave it back); such a
//! letter carries only RabbitMQ's `x-first-death-*` headers, from which the listing says why.
//!
//! On the Redis broker the dead letters are the list `<queue>.dead` (kombu envelopes with the
//! same headers); listing reads it without changing it, and replaying moves each letter back
//! onto its queue in one atomic step, after forgetting the job's stored result.

use lapin::options::{BasicAckOptions, BasicGetOptions};
use lapin::types::AMQPValue;
use lapin::BasicProperties;
use serde::Serialize;

use crate::amqp::broker::{self, BrokerError, QueueShape};
use crate::amqp::reroute::{
    dead_queue, Rerouter, DEAD_AT, DEAD_QUEUE, DEAD_REASON, DEAD_TYPE, DEAD_WORKER,
};
use crate::backend::{BackendError, ResultBackend};
use crate::redis_broker::{Envelope, RedisBroker};
use crate::settings::Settings;

/// One dead letter as `mediafarm dead list` shows it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct DeadLetter {
    pub id: Option<String>,
    pub task: Option<String>,
    pub kind: Option<String>,
    pub reason: Option<String>,
    pub at: Option<String>,
    pub queue: Option<String>,
    pub worker: Option<String>,
    pub bytes: usize,
}

fn header(props: &BasicProperties, name: &str) -> Option<String> {
    let value = props.headers().as_ref()?.inner().get(name)?.clone();
    match value {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        other => Some(format!("{other:?}")),
    }
}

/// Kind and reason of a letter RabbitMQ dead-lettered itself (`x-first-death-reason`).
fn broker_reason(reason: &str) -> (String, String) {
    let (kind, text) = match reason {
        "delivery_limit" => (
            "DeliveryLimitExceeded",
            "delivered more often than the quorum queue's x-delivery-limit \
             (task_quorum_delivery_limit) without being acknowledged: every worker that took it \
             died or gave it back, so it may be a poison message",
        ),
        "rejected" => ("Rejected", "rejected without requeueing"),
        "expired" => ("Expired", "its time to live in the queue ran out"),
        "maxlen" => ("QueueFull", "the queue was at its length limit"),
        other => return ("BrokerDeadLettered".into(), format!("RabbitMQ: {other}")),
    };
    (kind.into(), format!("{text} (dead-lettered by RabbitMQ)"))
}

fn describe(props: &BasicProperties, bytes: usize) -> DeadLetter {
    describe_by(|name| header(props, name), bytes)
}

/// A letter from its headers, read by `header`.
fn describe_by(header: impl Fn(&str) -> Option<String>, bytes: usize) -> DeadLetter {
    let by_broker = header(DEAD_TYPE)
        .is_none()
        .then(|| header("x-first-death-reason"))
        .flatten()
        .map(|r| broker_reason(&r));
    let (kind, reason) = match by_broker {
        Some((kind, reason)) => (Some(kind), Some(reason)),
        None => (header(DEAD_TYPE), header(DEAD_REASON)),
    };
    DeadLetter {
        id: header("id"),
        task: header("task"),
        kind,
        reason,
        at: header(DEAD_AT),
        queue: header(DEAD_QUEUE).or_else(|| header("x-first-death-queue")),
        worker: header(DEAD_WORKER),
        bytes,
    }
}

/// A letter on the Redis broker: a kombu envelope, or a value that was not one (kept as it
/// was taken, byte for byte; why it could not be read is worked out again from it).
fn describe_redis(stored: &[u8]) -> DeadLetter {
    let parsed = Envelope::parse(stored);
    let headers = parsed
        .as_ref()
        .map(|e| e.properties().1)
        .unwrap_or_default();
    let text = |name: &str| {
        headers.get(name).map(|v| match v {
            serde_json::Value::String(s) => s.clone(),
            other => other.to_string(),
        })
    };
    let mut letter = describe_by(text, stored.len());
    if letter.kind.is_none() {
        letter.kind = Some("InvalidMessage".into());
        letter.reason = Some(match parsed {
            Err(why) => format!("not a kombu message ({why}); kept as it was taken from the queue"),
            // Only the take's own rule refuses an envelope that reads (`redis_broker::scripts`).
            Ok(_) => "its properties.delivery_tag is not 1–255 bytes of printable ASCII, or \
                      Redis's JSON reader (cjson) cannot read it; kept as it was taken from the \
                      queue"
                .into(),
        });
    }
    letter
}

/// Declares the dead queue as the worker does and says how many letters it holds.
async fn open(
    settings: &Settings,
    queue: &str,
    what: &str,
) -> Result<(lapin::Connection, lapin::Channel, u32), BrokerError> {
    broker::check_queue_name(queue)?;
    let conn = broker::connect(settings, what).await?;
    let channel = conn.create_channel().await?;
    let count = broker::declare_dead_queue(&channel, queue, &QueueShape::of(settings)).await?;
    Ok((conn, channel, count))
}

/// Up to `limit` dead letters of `queue`, oldest first; the queue is left as it was.
pub async fn list(
    settings: &Settings,
    queue: &str,
    limit: usize,
) -> Result<Vec<DeadLetter>, BrokerError> {
    if settings.broker_is_redis() {
        broker::check_queue_name(queue)?;
        let redis = RedisBroker::connect(settings).await?;
        let letters = redis.dead_letters(queue, limit).await?;
        return Ok(letters.iter().map(|l| describe_redis(l)).collect());
    }
    let (conn, channel, count) = open(settings, queue, "mediafarm dead list").await?;
    let mut out = Vec::new();
    for _ in 0..(count as usize).min(limit) {
        let Some(msg) = channel
            .basic_get(
                dead_queue(queue).as_str().into(),
                BasicGetOptions { no_ack: false },
            )
            .await?
        else {
            break;
        };
        out.push(describe(&msg.delivery.properties, msg.delivery.data.len()));
    }
    // Closing without acks returns every letter to the queue.
    crate::amqp::broker::close_quietly(&conn, &[&channel], "listed").await;
    Ok(out)
}

/// [`replay`] on the Redis broker: each letter, oldest first, moves from `<queue>.dead` onto
/// its queue's list in one atomic step, with its dead-letter headers removed and `retries`
/// back at 0 (as over AMQP). A value that is not a kombu message stays where it is.
async fn replay_redis(
    settings: &Settings,
    backend: &ResultBackend,
    queue: &str,
    id: Option<&str>,
) -> Result<usize, ReplayError> {
    broker::check_queue_name(queue)?;
    let redis = RedisBroker::connect(settings)
        .await
        .map_err(BrokerError::from)?;
    let letters = redis
        .dead_letters(queue, usize::MAX)
        .await
        .map_err(BrokerError::from)?;
    let mut reset = serde_json::Map::new();
    reset.insert("retries".into(), serde_json::json!(0));
    let mut replayed = 0;
    for stored in letters {
        let Ok(letter) = Envelope::parse(&stored) else {
            continue;
        };
        let (_, headers) = letter.properties();
        let job_id = headers.get("id").and_then(serde_json::Value::as_str);
        if id.is_some_and(|want| job_id != Some(want)) {
            continue;
        }
        if let Some(job_id) = job_id {
            backend.forget(job_id).await?;
        }
        let again = letter.republished(
            &reset,
            &[DEAD_REASON, DEAD_TYPE, DEAD_AT, DEAD_QUEUE, DEAD_WORKER],
            queue,
        );
        if redis
            .replay_dead(queue, &stored, &again)
            .await
            .map_err(BrokerError::from)?
        {
            replayed += 1;
        }
    }
    Ok(replayed)
}

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error(transparent)]
    Backend(#[from] BackendError),
}

/// Publishes `queue`'s dead letters (only `id`'s, when given) back to `queue`; returns how
/// many were replayed. Others stay where they are. Each replayed job's stored result is
/// forgotten first: the job is pending again, and a worker that gets it redelivered later
/// must not mistake the old FAILURE for its outcome.
pub async fn replay(
    settings: &Settings,
    backend: &ResultBackend,
    queue: &str,
    id: Option<&str>,
) -> Result<usize, ReplayError> {
    if settings.broker_is_redis() {
        return replay_redis(settings, backend, queue, id).await;
    }
    let (conn, channel, count) = open(settings, queue, "mediafarm dead replay").await?;
    let conn = std::sync::Arc::new(conn);
    let rerouter = Rerouter::open(conn.clone(), QueueShape::of(settings)).await?;
    let mut replayed = 0;
    for _ in 0..count {
        let Some(msg) = channel
            .basic_get(
                dead_queue(queue).as_str().into(),
                BasicGetOptions { no_ack: false },
            )
            .await
            .map_err(BrokerError::from)?
        else {
            break;
        };
        let d = msg.delivery;
        let job_id = header(&d.properties, "id");
        if id.is_some_and(|want| job_id.as_deref() != Some(want)) {
            continue;
        }
        if let Some(job_id) = &job_id {
            backend.forget(job_id).await?;
        }
        rerouter.to_queue(queue, &d.properties, &d.data).await?;
        d.acker
            .ack(BasicAckOptions::default())
            .await
            .map_err(BrokerError::from)?;
        replayed += 1;
    }
    rerouter.close().await;
    crate::amqp::broker::close_quietly(&conn, &[&channel], "replayed").await;
    Ok(replayed)
}

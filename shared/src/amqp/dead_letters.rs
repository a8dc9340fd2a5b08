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

use lapin::options::{BasicAckOptions, BasicGetOptions};
use lapin::types::AMQPValue;
use lapin::BasicProperties;
use serde::Serialize;

use crate::amqp::broker::{self, BrokerError, QueueShape};
use crate::amqp::reroute::{
    dead_queue, Rerouter, DEAD_AT, DEAD_QUEUE, DEAD_REASON, DEAD_TYPE, DEAD_WORKER,
};
use crate::backend::{BackendError, ResultBackend};
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
    let by_broker = header(props, DEAD_TYPE)
        .is_none()
        .then(|| header(props, "x-first-death-reason"))
        .flatten()
        .map(|r| broker_reason(&r));
    let (kind, reason) = match by_broker {
        Some((kind, reason)) => (Some(kind), Some(reason)),
        None => (header(props, DEAD_TYPE), header(props, DEAD_REASON)),
    };
    DeadLetter {
        id: header(props, "id"),
        task: header(props, "task"),
        kind,
        reason,
        at: header(props, DEAD_AT),
        queue: header(props, DEAD_QUEUE).or_else(|| header(props, "x-first-death-queue")),
        worker: header(props, DEAD_WORKER),
        bytes,
    }
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
    let _ = channel.close(200, "listed".into()).await;
    let _ = conn.close(200, "listed".into()).await;
    Ok(out)
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
    let _ = channel.close(200, "replayed".into()).await;
    let _ = conn.close(200, "replayed".into()).await;
    Ok(replayed)
}

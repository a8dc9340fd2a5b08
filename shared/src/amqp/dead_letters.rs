//! Looking into and replaying a queue's dead letters (`<queue>.dead`), for `mediafarm dead`.
//! Listing takes messages without acknowledging them and closes the channel, so the broker
//! puts every one back; replaying forgets the job's stored FAILURE (it is pending again) and
//! publishes a copy to the work queue (confirmed) before it acknowledges the dead letter, so a
//! crash in between duplicates rather than loses.

use lapin::options::{BasicAckOptions, BasicGetOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::BasicProperties;
use serde::Serialize;

use crate::amqp::broker::{self, BrokerError};
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

fn describe(props: &BasicProperties, bytes: usize) -> DeadLetter {
    DeadLetter {
        id: header(props, "id"),
        task: header(props, "task"),
        kind: header(props, DEAD_TYPE),
        reason: header(props, DEAD_REASON),
        at: header(props, DEAD_AT),
        queue: header(props, DEAD_QUEUE),
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
    let q = channel
        .queue_declare(
            dead_queue(queue).as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    Ok((conn, channel, q.message_count()))
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
    let rerouter = Rerouter::open(conn.clone()).await?;
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

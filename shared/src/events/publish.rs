//! The background task that writes events to the broker: connects on the first event, declares
//! the `event_exchange` as kombu declares Celery's (`Exchange('celeryev', type='topic')`:
//! durable, not auto-deleted) — or, on the Redis broker, publishes on its fanout channel as
//! Celery does there — and publishes with Celery's properties (JSON, UTF-8,
//! `delivery_mode=1`, a `hostname` header) and no publisher confirms. Events gather for
//! [`LINGER`] after the first of a batch, then go at once: task events as one `task.multi`
//! message (a JSON list, which `EventReceiver` unpacks as Celery's own buffered events), worker
//! events one by one on their own keys. While the broker cannot be reached the events in hand are dropped and
//! counted, and it tries again with backoff on the next ones.

use std::time::Duration;

use lapin::options::{BasicPublishOptions, ExchangeDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel, Connection, ExchangeKind};
use prometheus_client::metrics::counter::Counter;
use tokio::sync::mpsc;

use super::{Event, Outgoing};
use crate::amqp::broker::{self, backoff, BrokerError};
use crate::protocol::Properties;
use crate::redis_broker::{Envelope, RedisBroker};
use crate::settings::Settings;

/// Events taken from the queue at once, at most: one `task.multi` message carries up to this
/// many task events.
const BATCH: usize = 512;

/// How long the publisher lets events gather after the first of a batch: a broker message and
/// a publish cost far more than the bytes of one more event, so a busy worker's events go out
/// as a few large `task.multi` messages (Celery's worker buffers task events the same way).
/// Monitors see events at most this much later.
const LINGER: Duration = Duration::from_millis(10);

/// Where events go: a channel to RabbitMQ, or the Redis broker (where Celery makes the event
/// exchange a fanout: each event is `PUBLISH`ed on `/{db}.<event_exchange>/<routing key>`, which
/// `app.events.Receiver` subscribes to as `/{db}.<event_exchange>/*`).
enum Link {
    Amqp { conn: Connection, channel: Channel },
    Redis(RedisBroker),
}

impl Link {
    async fn close(self, why: &str) {
        if let Link::Amqp { conn, channel } = self {
            crate::amqp::broker::close_quietly(&conn, &[&channel], why).await;
        }
    }
}

pub(super) async fn run(
    settings: Settings,
    hostname: String,
    mut rx: mpsc::Receiver<Outgoing>,
    dropped: Counter,
) {
    let name = format!("{hostname} events");
    let exchange = settings.event_exchange.clone();
    let mut link: Option<Link> = None;
    let mut failures = 0u32;
    let mut batch = Vec::with_capacity(BATCH);
    while rx.recv_many(&mut batch, BATCH).await > 0 {
        let flushing = batch.iter().any(|o| matches!(o, Outgoing::Flush(_)));
        if batch.len() < BATCH && !flushing {
            tokio::time::sleep(LINGER).await;
            while batch.len() < BATCH {
                match rx.try_recv() {
                    Ok(more) => batch.push(more),
                    Err(_) => break,
                }
            }
        }
        let mut events = Vec::with_capacity(batch.len());
        let mut flushed = Vec::new();
        for item in batch.drain(..) {
            match item {
                Outgoing::Event(e) => events.push(e),
                Outgoing::Flush(done) => flushed.push(done),
            }
        }
        if !events.is_empty() {
            if link.is_none() {
                match open(&settings, &name, &exchange).await {
                    Ok(l) => {
                        link = Some(l);
                        failures = 0;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, dropped = events.len(), "events: cannot reach the broker; dropping events");
                        dropped.inc_by(events.len() as u64);
                        failures = failures.saturating_add(1);
                        tokio::time::sleep(backoff(failures)).await;
                    }
                }
            }
            if let Some(l) = &link {
                let count = events.len() as u64;
                let sent = match l {
                    Link::Amqp { channel, .. } => {
                        publish(channel, &exchange, &hostname, events).await
                    }
                    Link::Redis(broker) => {
                        publish_redis(broker, &exchange, &hostname, events).await
                    }
                };
                if let Err(e) = sent {
                    tracing::warn!(error = %e, "events: publishing failed; reconnecting on the next event");
                    dropped.inc_by(count);
                    if let Some(l) = link.take() {
                        l.close("events: publish failed").await;
                    }
                }
            }
        }
        for done in flushed {
            let _ = done.send(());
        }
    }
    if let Some(l) = link {
        l.close("events: done").await;
    }
}

async fn open(settings: &Settings, name: &str, exchange: &str) -> Result<Link, BrokerError> {
    if settings.broker_is_redis() {
        // Nothing to declare: a fanout exchange on Redis is only a channel name.
        return Ok(Link::Redis(RedisBroker::connect(settings).await?));
    }
    let conn = broker::connect(settings, name).await?;
    let channel = conn.create_channel().await?;
    channel
        .exchange_declare(
            exchange.into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                auto_delete: false,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    Ok(Link::Amqp { conn, channel })
}

/// The messages a batch becomes: `(routing key, body)`. Two or more task events go as one
/// `task.multi` list (where the first of them was); anything else one message per event.
pub(super) fn messages(events: Vec<Event>) -> Vec<(String, Vec<u8>)> {
    let tasks = events.iter().filter(|e| e.group() == "task").count();
    let mut out = Vec::new();
    let mut multi: Vec<u8> = Vec::new();
    let mut multi_at = None;
    for e in events {
        if tasks > 1 && e.group() == "task" {
            multi_at.get_or_insert(out.len());
            multi.push(if multi.is_empty() { b'[' } else { b',' });
            multi.extend_from_slice(&e.json);
        } else {
            out.push((e.routing_key(), e.json));
        }
    }
    if let Some(at) = multi_at {
        multi.push(b']');
        out.insert(at, ("task.multi".to_owned(), multi));
    }
    out
}

async fn publish(
    channel: &Channel,
    exchange: &str,
    hostname: &str,
    events: Vec<Event>,
) -> Result<(), BrokerError> {
    let mut headers = FieldTable::default();
    headers.insert(
        "hostname".into(),
        AMQPValue::LongString(LongString::from(hostname)),
    );
    for (key, payload) in messages(events) {
        let properties = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_content_encoding("utf-8".into())
            .with_delivery_mode(1)
            .with_headers(headers.clone());
        // No confirm is asked for, so the returned confirm is already settled.
        channel
            .basic_publish(
                exchange.into(),
                key.as_str().into(),
                BasicPublishOptions::default(),
                &payload,
                properties,
            )
            .await?;
    }
    Ok(())
}

/// The same messages on the Redis broker: kombu envelopes (JSON, UTF-8, transient, the
/// `hostname` header) published in one round trip.
async fn publish_redis(
    broker: &RedisBroker,
    exchange: &str,
    hostname: &str,
    events: Vec<Event>,
) -> Result<(), BrokerError> {
    let mut headers = serde_json::Map::new();
    headers.insert("hostname".into(), serde_json::Value::from(hostname));
    let props = Properties {
        content_type: Some("application/json".into()),
        content_encoding: Some("utf-8".into()),
        ..Properties::default()
    };
    let messages: Vec<(String, Envelope)> = messages(events)
        .into_iter()
        .map(|(key, payload)| {
            let e = Envelope::routed(&props, &headers, &payload, (exchange, &key), 1);
            (key, e)
        })
        .collect();
    broker.publish_fanout(exchange, &messages).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::body::{self, Origin};

    #[test]
    fn a_burst_of_task_events_goes_as_one_list_and_worker_events_alone() {
        let origin = Origin::new("w@h");
        fn stamped<F: serde::Serialize>(origin: &Origin, (kind, f): (&'static str, F)) -> Event {
            origin.stamp(kind, &f)
        }
        let single = messages(vec![stamped(&origin, body::task_started("a"))]);
        assert_eq!(single.len(), 1);
        assert_eq!(single[0].0, "task.started");
        let one: serde_json::Value = serde_json::from_slice(&single[0].1).unwrap();
        assert_eq!(one["hostname"], "w@h");
        let burst = vec![
            stamped(&origin, body::task_started("a")),
            stamped(
                &origin,
                body::worker(
                    body::WorkerEvent::Heartbeat,
                    std::time::Duration::from_secs(2),
                    body::Load::default(),
                    [0.0; 3],
                ),
            ),
            stamped(&origin, body::task_rejected("b", true)),
        ];
        let out = messages(burst);
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].0, "task.multi");
        let list: Vec<serde_json::Value> = serde_json::from_slice(&out[0].1).unwrap();
        assert_eq!(list.len(), 2);
        assert_eq!(list[0]["type"], "task-started");
        assert_eq!(list[1]["type"], "task-rejected");
        assert_eq!(out[1].0, "worker.heartbeat");
    }
}

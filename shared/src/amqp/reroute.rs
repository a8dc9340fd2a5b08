//! Re-publishing a received message unchanged but for its headers: into a delay queue (ETA,
//! countdown and retries wait in RabbitMQ, not in worker memory), to its queue's dead-letter
//! queue with the reason, and back to a work queue (replaying a dead letter). Every publish
//! waits for the broker's confirm, so the original may be acknowledged only afterwards.
//!
//! Delays use fixed-TTL buckets: queue `mediafarm.delay.<ms>` holds messages for exactly
//! `<ms>` (a queue-wide TTL, so expiry is first-in first-out and exact), then dead-letters
//! them to the default exchange under their original routing key, which is the work queue's
//! name. Buckets are powers of two from 128 ms to about 24 days; a delay takes the largest
//! bucket that fits and the worker re-delays what is left when the message comes back, so a
//! delay of any length takes at most ~25 hops and never ends early.
//!
//! Delay queues are classic queues whatever `task_default_queue_type` says: one bucket serves
//! every work queue of the vhost (classic and quorum ones, this program's and others'), so its
//! declaration must not depend on one program's settings, and a quorum queue dead-letters
//! at-most-once unless it also refuses publishes when full. Work queues and dead-letter queues
//! follow the settings ([`QueueShape`]).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection, ExchangeKind};
use tokio::sync::Mutex;

use crate::amqp::broker::{self, BrokerError, QueueShape};
use crate::protocol::format_time;

/// Prefix of the delay exchanges and queues.
pub const DELAY_PREFIX: &str = "mediafarm.delay.";
/// Shortest bucket; a shorter remainder is waited out by the worker.
pub const MIN_DELAY: Duration = Duration::from_millis(128);
const MAX_BUCKET_EXP: u32 = 31;
const MIN_BUCKET_EXP: u32 = 7;

/// Headers a dead letter carries, besides the original message's.
pub const DEAD_REASON: &str = "x-mediafarm-dead-reason";
pub const DEAD_TYPE: &str = "x-mediafarm-dead-type";
pub const DEAD_AT: &str = "x-mediafarm-dead-at";
pub const DEAD_QUEUE: &str = "x-mediafarm-dead-queue";
pub const DEAD_WORKER: &str = "x-mediafarm-dead-worker";

/// Headers RabbitMQ adds on dead-lettering (and a quorum queue's delivery count); dropped on
/// re-publishing so they do not grow or follow a replayed message.
const BROKER_DEATH_HEADERS: &[&str] = &[
    "x-delivery-count",
    "x-death",
    "x-first-death-exchange",
    "x-first-death-queue",
    "x-first-death-reason",
    "x-last-death-exchange",
    "x-last-death-queue",
    "x-last-death-reason",
];

/// The dead-letter queue of `queue`.
pub fn dead_queue(queue: &str) -> String {
    format!("{queue}.dead")
}

/// The bucket (in ms) a message with `remaining` to wait goes to; `None` below `MIN_DELAY`.
pub fn delay_bucket(remaining: Duration) -> Option<u64> {
    let ms = u64::try_from(remaining.as_millis()).unwrap_or(u64::MAX);
    if ms < 1 << MIN_BUCKET_EXP {
        return None;
    }
    let exp = (63 - ms.leading_zeros()).min(MAX_BUCKET_EXP);
    Some(1u64 << exp)
}

/// Why a message goes to the dead-letter queue.
#[derive(Debug, Clone)]
pub struct DeadReason {
    /// A short type, such as `InvalidMessage`, `NotRegistered`, `MaxRetriesExceeded`.
    pub kind: String,
    /// What a person reads to decide what to do.
    pub reason: String,
    pub queue: String,
    pub worker: String,
}

impl DeadReason {
    /// The headers a dead letter carries: why, of what kind, when, from which queue and worker.
    pub fn headers(&self) -> [(&'static str, AMQPValue); 5] {
        let text = |s: &str| AMQPValue::LongString(LongString::from(s));
        [
            (DEAD_REASON, text(&self.reason)),
            (DEAD_TYPE, text(&self.kind)),
            (DEAD_AT, text(&format_time(Utc::now()))),
            (DEAD_QUEUE, text(&self.queue)),
            (DEAD_WORKER, text(&self.worker)),
        ]
    }
}

/// A confirm-mode channel for re-publishing, and the delay and dead queues declared on it.
/// A channel the broker closed (a refused declaration, say) is replaced on next use.
pub struct Rerouter {
    conn: Arc<Connection>,
    shape: QueueShape,
    state: Mutex<RerouteChannel>,
}

struct RerouteChannel {
    channel: Channel,
    declared: HashSet<String>,
}

async fn confirm_channel(conn: &Connection) -> Result<Channel, BrokerError> {
    let channel = conn.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    Ok(channel)
}

impl Rerouter {
    /// A rerouter declaring work and dead-letter queues with `shape`.
    pub async fn open(conn: Arc<Connection>, shape: QueueShape) -> Result<Rerouter, BrokerError> {
        let channel = confirm_channel(&conn).await?;
        Ok(Rerouter {
            conn,
            shape,
            state: Mutex::new(RerouteChannel {
                channel,
                declared: HashSet::new(),
            }),
        })
    }

    /// The channel, re-opened if the broker closed it.
    async fn channel(&self) -> Result<Channel, BrokerError> {
        let mut state = self.state.lock().await;
        if !state.channel.status().connected() {
            state.channel = confirm_channel(&self.conn).await?;
            state.declared.clear();
        }
        Ok(state.channel.clone())
    }

    /// Sends the message into the delay bucket for `remaining`, to come back to `queue`; a
    /// delay under the shortest bucket goes straight back to `queue` (the worker that takes it
    /// waits out the rest). Returns how long it will wait in the broker.
    pub async fn delay(
        &self,
        queue: &str,
        props: &BasicProperties,
        body: &[u8],
        remaining: Duration,
        headers: &[(&str, AMQPValue)],
    ) -> Result<Duration, BrokerError> {
        let props = rewrite(props, headers, &[]);
        let Some(bucket) = delay_bucket(remaining) else {
            self.declare_work_queue(queue).await?;
            self.publish("", queue, props, body).await?;
            return Ok(Duration::ZERO);
        };
        let name = format!("{DELAY_PREFIX}{bucket}");
        self.declare_delay(&name, bucket).await?;
        self.publish(&name, queue, props, body).await?;
        Ok(Duration::from_millis(bucket))
    }

    /// Sends the message to `<queue>.dead` with why and when.
    pub async fn dead(
        &self,
        props: &BasicProperties,
        body: &[u8],
        why: &DeadReason,
    ) -> Result<(), BrokerError> {
        let dead = dead_queue(&why.queue);
        self.declare_dead(&why.queue).await?;
        let props = rewrite(props, &why.headers(), &[]);
        self.publish("", &dead, props, body).await
    }

    /// Publishes the message to `queue` without dead-letter headers and with its retry count
    /// back at 0, so a replayed job gets its full retries again.
    pub async fn to_queue(
        &self,
        queue: &str,
        props: &BasicProperties,
        body: &[u8],
    ) -> Result<(), BrokerError> {
        self.declare_work_queue(queue).await?;
        let props = rewrite(
            props,
            &[("retries", AMQPValue::LongLongInt(0))],
            &[DEAD_REASON, DEAD_TYPE, DEAD_AT, DEAD_QUEUE, DEAD_WORKER],
        );
        self.publish("", queue, props, body).await
    }

    async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        props: BasicProperties,
        body: &[u8],
    ) -> Result<(), BrokerError> {
        let confirm = self
            .channel()
            .await?
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                BasicPublishOptions::default(),
                body,
                props,
            )
            .await?
            .await?;
        if confirm.is_ack() {
            Ok(())
        } else {
            Err(BrokerError::Nacked {
                id: routing_key.to_owned(),
            })
        }
    }

    /// Runs `declare` once per name on the current channel.
    async fn declare_once<F, Fut>(&self, name: &str, declare: F) -> Result<(), BrokerError>
    where
        F: FnOnce(Channel) -> Fut,
        Fut: std::future::Future<Output = Result<(), BrokerError>>,
    {
        let channel = self.channel().await?;
        if self.state.lock().await.declared.contains(name) {
            return Ok(());
        }
        declare(channel).await?;
        self.state.lock().await.declared.insert(name.to_owned());
        Ok(())
    }

    async fn declare_delay(&self, name: &str, ttl_ms: u64) -> Result<(), BrokerError> {
        self.declare_once(name, |channel| async move {
            channel
                .exchange_declare(
                    name.into(),
                    ExchangeKind::Fanout,
                    ExchangeDeclareOptions {
                        durable: true,
                        ..Default::default()
                    },
                    FieldTable::default(),
                )
                .await?;
            let mut args = FieldTable::default();
            args.insert(
                "x-message-ttl".into(),
                AMQPValue::LongLongInt(ttl_ms as i64),
            );
            args.insert(
                "x-dead-letter-exchange".into(),
                AMQPValue::LongString(LongString::from("")),
            );
            channel
                .queue_declare(
                    name.into(),
                    QueueDeclareOptions {
                        durable: true,
                        ..Default::default()
                    },
                    args,
                )
                .await?;
            channel
                .queue_bind(
                    name.into(),
                    name.into(),
                    "".into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await?;
            Ok(())
        })
        .await
    }

    /// Declares the dead-letter queue of work queue `queue`.
    async fn declare_dead(&self, queue: &str) -> Result<(), BrokerError> {
        let shape = self.shape;
        self.declare_once(&dead_queue(queue), |channel| async move {
            broker::declare_dead_queue(&channel, queue, &shape)
                .await
                .map(|_| ())
        })
        .await
    }

    async fn declare_work_queue(&self, name: &str) -> Result<(), BrokerError> {
        let shape = self.shape;
        self.declare_once(name, |channel| async move {
            broker::declare_queue(&channel, name, &shape).await
        })
        .await
    }

    pub async fn close(&self) {
        let channel = self.state.lock().await.channel.clone();
        let _ = tokio::time::timeout(
            crate::amqp::broker::CLOSE_STEP,
            channel.close(200, "done".into()),
        )
        .await;
    }
}

/// The same properties with `set` headers added or replaced, `drop` headers and the broker's
/// dead-lettering headers removed, no per-message TTL, and persistent delivery.
pub fn rewrite(
    props: &BasicProperties,
    set: &[(&str, AMQPValue)],
    drop: &[&str],
) -> BasicProperties {
    let mut table = FieldTable::default();
    if let Some(old) = props.headers() {
        for (k, v) in old.inner() {
            let name = k.as_str();
            if BROKER_DEATH_HEADERS.contains(&name)
                || drop.contains(&name)
                || set.iter().any(|(s, _)| *s == name)
            {
                continue;
            }
            table.insert(k.clone(), v.clone());
        }
    }
    for (k, v) in set {
        table.insert(ShortString::from(*k), v.clone());
    }
    let mut p = props.clone().with_headers(table).with_delivery_mode(2);
    if p.expiration().is_some() {
        p = strip_expiration(p);
    }
    p
}

/// `BasicProperties` has no way to unset a field, so rebuild without `expiration`.
fn strip_expiration(p: BasicProperties) -> BasicProperties {
    let mut out = BasicProperties::default();
    if let Some(v) = p.content_type() {
        out = out.with_content_type(v.clone());
    }
    if let Some(v) = p.content_encoding() {
        out = out.with_content_encoding(v.clone());
    }
    if let Some(v) = p.headers() {
        out = out.with_headers(v.clone());
    }
    if let Some(v) = p.delivery_mode() {
        out = out.with_delivery_mode(*v);
    }
    if let Some(v) = p.priority() {
        out = out.with_priority(*v);
    }
    if let Some(v) = p.correlation_id() {
        out = out.with_correlation_id(v.clone());
    }
    if let Some(v) = p.reply_to() {
        out = out.with_reply_to(v.clone());
    }
    if let Some(v) = p.message_id() {
        out = out.with_message_id(v.clone());
    }
    if let Some(v) = p.timestamp() {
        out = out.with_timestamp(*v);
    }
    if let Some(v) = p.kind() {
        out = out.with_type(v.clone());
    }
    if let Some(v) = p.user_id() {
        out = out.with_user_id(v.clone());
    }
    if let Some(v) = p.app_id() {
        out = out.with_app_id(v.clone());
    }
    out
}

/// A header value for a time, in Celery's ISO format.
pub fn time_header(t: DateTime<Utc>) -> AMQPValue {
    AMQPValue::LongString(LongString::from(format_time(t).as_str()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_the_largest_power_of_two_that_fits() {
        assert_eq!(delay_bucket(Duration::from_millis(100)), None);
        assert_eq!(delay_bucket(Duration::from_millis(128)), Some(128));
        assert_eq!(delay_bucket(Duration::from_millis(1000)), Some(512));
        assert_eq!(delay_bucket(Duration::from_secs(20)), Some(16_384));
        assert_eq!(
            delay_bucket(Duration::from_secs(400 * 86_400)),
            Some(1 << 31)
        );
        // Never past the remaining time, so a message never comes back late by a bucket.
        for ms in [128u64, 300, 4097, 65_535, 1_000_000] {
            let b = delay_bucket(Duration::from_millis(ms)).unwrap();
            assert!(b <= ms && b * 2 > ms, "{ms} -> {b}");
        }
    }

    #[test]
    fn rewriting_drops_broker_death_headers_and_ttl() {
        let mut h = FieldTable::default();
        h.insert("id".into(), AMQPValue::LongString("a".into()));
        h.insert("x-death".into(), AMQPValue::LongString("x".into()));
        h.insert("retries".into(), AMQPValue::LongLongInt(0));
        let p = BasicProperties::default()
            .with_headers(h)
            .with_expiration("5000".into())
            .with_correlation_id("a".into());
        let out = rewrite(&p, &[("retries", AMQPValue::LongLongInt(1))], &[]);
        let headers = out.headers().clone().unwrap();
        assert!(headers.contains_key("id"));
        assert!(!headers.contains_key("x-death"));
        assert_eq!(
            headers.inner().get("retries"),
            Some(&AMQPValue::LongLongInt(1))
        );
        assert!(out.expiration().is_none());
        assert_eq!(out.correlation_id().as_ref().unwrap().as_str(), "a");
        assert_eq!(*out.delivery_mode(), Some(2));
    }
}

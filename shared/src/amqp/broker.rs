//! RabbitMQ: connecting (Celery-style URLs), declaring queues exactly as kombu does, and a
//! pooled publisher that waits for publisher confirms.

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions, QueuePurgeOptions,
};
use lapin::types::FieldTable;
use lapin::uri::AMQPUri;
use lapin::{Channel, Connection, ConnectionProperties, ExchangeKind};
use tokio::sync::{Mutex, Semaphore};

use crate::amqp::table::{try_write_properties, TooLong};
use crate::backend::redact;
use crate::protocol::TaskMessage;
use crate::settings::Settings;

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("broker URL {url} is not valid: {reason}")]
    Url { url: String, reason: String },
    #[error("cannot connect to the broker at {url}: {source}")]
    Connect { url: String, source: lapin::Error },
    #[error("broker error: {0}")]
    Amqp(#[from] lapin::Error),
    #[error("the broker refused message {id} (publisher confirm was a nack)")]
    Nacked { id: String },
    #[error("queue name {0:?} is not valid: 1 to 200 characters, no spaces")]
    QueueName(String),
    #[error("message {id} cannot be published: {reason}")]
    Unpublishable { id: String, reason: TooLong },
}

/// Parses a Celery/kombu-style AMQP URL: `//` and an empty path both mean vhost `/`.
pub fn parse_url(url: &str, heartbeat: u16) -> Result<AMQPUri, BrokerError> {
    let mut uri: AMQPUri = url.parse().map_err(|reason: String| BrokerError::Url {
        url: redact(url),
        reason,
    })?;
    if uri.vhost.is_empty() {
        uri.vhost = "/".into();
    }
    if uri.query.heartbeat.is_none() {
        uri.query.heartbeat = Some(heartbeat);
    }
    Ok(uri)
}

/// Opens a connection named for the RabbitMQ management UI.
pub async fn connect(settings: &Settings, name: &str) -> Result<Connection, BrokerError> {
    let uri = parse_url(&settings.broker_url, settings.broker_heartbeat)?;
    let props = ConnectionProperties::default().with_connection_name(name.into());
    let connect = Connection::connect_uri(uri, props);
    match tokio::time::timeout(Duration::from_secs(10), connect).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(source)) => Err(BrokerError::Connect {
            url: redact(&settings.broker_url),
            source,
        }),
        Err(_) => Err(BrokerError::Connect {
            url: redact(&settings.broker_url),
            source: lapin::Error::from(lapin::ErrorKind::IOError(std::sync::Arc::new(
                std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer within 10 s"),
            ))),
        }),
    }
}

pub fn check_queue_name(name: &str) -> Result<(), BrokerError> {
    if !crate::protocol::is_valid_queue_name(name) {
        return Err(BrokerError::QueueName(name.to_owned()));
    }
    Ok(())
}

/// Declares `queue` as kombu does for `Queue(name)`: a durable direct exchange of the same
/// name, a durable queue with no arguments, bound with the queue's name as routing key.
/// Anything else makes RabbitMQ refuse a Python producer's declaration (PRECONDITION_FAILED).
pub async fn declare_queue(channel: &Channel, queue: &str) -> Result<(), BrokerError> {
    check_queue_name(queue)?;
    declare_bound_queue(channel, queue, queue, ExchangeKind::Direct, queue).await
}

/// Declares a durable `exchange` of `kind` and a durable `queue` with no arguments, as kombu
/// declares a `Queue(name, Exchange(exchange, kind), routing_key)`, and binds them.
pub async fn declare_bound_queue(
    channel: &Channel,
    queue: &str,
    exchange: &str,
    kind: ExchangeKind,
    routing_key: &str,
) -> Result<(), BrokerError> {
    channel
        .exchange_declare(
            exchange.into(),
            kind,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    channel
        .queue_bind(
            queue.into(),
            exchange.into(),
            routing_key.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    Ok(())
}

/// Removes every ready message from `queue`; returns how many were removed.
pub async fn purge(settings: &Settings, queue: &str) -> Result<u32, BrokerError> {
    let conn = connect(settings, "mediafarm purge").await?;
    let channel = conn.create_channel().await?;
    declare_queue(&channel, queue).await?;
    let n = channel
        .queue_purge(queue.into(), QueuePurgeOptions::default())
        .await?;
    let _ = conn.close(200, "purged".into()).await;
    Ok(n)
}

/// One pooled connection with a confirm-mode channel.
struct Slot {
    conn: Connection,
    channel: Channel,
    declared: HashSet<String>,
}

/// Publishes task messages with publisher confirms over at most `broker_pool_limit`
/// connections, reconnecting when a connection is lost.
///
/// A publish holds a pooled channel only while its frames are written; its confirms are awaited
/// after the channel went back to the pool, so many publishes share a channel with their
/// confirms in flight together. Holding the channel until the confirm came back capped a whole
/// worker at `broker_pool_limit` publishes per confirm round trip (a chain's next step is one).
#[derive(Clone)]
pub struct Publisher {
    inner: Arc<PublisherInner>,
}

struct PublisherInner {
    settings: Settings,
    name: String,
    idle: Mutex<Vec<Slot>>,
    limit: Semaphore,
    opened: AtomicUsize,
}

const PUBLISH_ATTEMPTS: u32 = 5;

/// Confirms of messages whose frames were written, in publish order.
type Pending<'m> = Vec<(&'m str, lapin::PublisherConfirm)>;

impl Publisher {
    pub fn new(settings: &Settings) -> Publisher {
        Publisher::named(settings, "mediafarm producer")
    }

    /// A publisher whose connections carry `name` in the RabbitMQ management UI.
    pub fn named(settings: &Settings, name: &str) -> Publisher {
        Publisher {
            inner: Arc::new(PublisherInner {
                settings: settings.clone(),
                name: name.to_owned(),
                idle: Mutex::new(Vec::new()),
                limit: Semaphore::new(settings.broker_pool_limit),
                opened: AtomicUsize::new(0),
            }),
        }
    }

    /// Connections opened so far (reconnects included).
    pub fn connections_opened(&self) -> usize {
        self.inner.opened.load(Ordering::Relaxed)
    }

    /// Publishes one message to `queue` and waits for the broker's confirm.
    pub async fn publish(&self, queue: &str, msg: &TaskMessage) -> Result<(), BrokerError> {
        self.publish_batch(queue, std::slice::from_ref(msg)).await
    }

    /// Publishes messages to `queue` back to back and waits for all confirms; on a lost
    /// connection the unconfirmed ones are published again (at-least-once).
    pub async fn publish_batch(
        &self,
        queue: &str,
        msgs: &[TaskMessage],
    ) -> Result<(), BrokerError> {
        check_queue_name(queue)?;
        let mut attempt = 0;
        let mut done = 0;
        loop {
            let (confirmed, error) = match self.send(queue, &msgs[done..]).await {
                Ok(pending) => match settle(pending).await {
                    (_, None) => return Ok(()),
                    (confirmed, Some(e)) => (confirmed, e),
                },
                Err(SendError::NoSlot(e)) => (0, e),
                Err(SendError::Cut(pending, e)) => (settle(pending).await.0, e),
            };
            done += confirmed;
            if matches!(
                error,
                BrokerError::Nacked { .. }
                    | BrokerError::QueueName(_)
                    | BrokerError::Unpublishable { .. }
            ) || attempt + 1 >= PUBLISH_ATTEMPTS
            {
                return Err(error);
            }
            attempt += 1;
            tracing::warn!(error = %error, attempt, "publish failed, retrying");
            tokio::time::sleep(backoff(attempt)).await;
        }
    }

    /// Writes the frames of `msgs` on a pooled channel and gives the channel back; the
    /// confirms are left to the caller.
    async fn send<'m>(
        &self,
        queue: &str,
        msgs: &'m [TaskMessage],
    ) -> Result<Pending<'m>, SendError<'m>> {
        let _permit = self
            .inner
            .limit
            .acquire()
            .await
            .map_err(|_| SendError::NoSlot(BrokerError::QueueName(queue.to_owned())))?;
        let mut slot = self.take_slot().await.map_err(SendError::NoSlot)?;
        match send_on(&mut slot, queue, msgs).await {
            Ok(pending) => {
                self.inner.idle.lock().await.push(slot);
                Ok(pending)
            }
            Err(cut) => {
                let _ = slot.conn.close(200, "publish failed".into()).await;
                Err(cut)
            }
        }
    }

    async fn take_slot(&self) -> Result<Slot, BrokerError> {
        while let Some(slot) = self.inner.idle.lock().await.pop() {
            if slot.conn.status().connected() && slot.channel.status().connected() {
                return Ok(slot);
            }
        }
        let conn = connect(&self.inner.settings, &self.inner.name).await?;
        self.inner.opened.fetch_add(1, Ordering::Relaxed);
        let channel = conn.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        Ok(Slot {
            conn,
            channel,
            declared: HashSet::new(),
        })
    }
}

/// Why frames were not all written.
enum SendError<'m> {
    /// No channel could be had (the broker is unreachable).
    NoSlot(BrokerError),
    /// Writing stopped part-way: the confirms of what was written, and the error.
    Cut(Pending<'m>, BrokerError),
}

/// Writes `msgs` on one channel; says which confirms to await.
async fn send_on<'m>(
    slot: &mut Slot,
    queue: &str,
    msgs: &'m [TaskMessage],
) -> Result<Pending<'m>, SendError<'m>> {
    if !slot.declared.contains(queue) {
        declare_queue(&slot.channel, queue)
            .await
            .map_err(|e| SendError::Cut(Vec::new(), e))?;
        slot.declared.insert(queue.to_owned());
    }
    let mut pending = Vec::with_capacity(msgs.len());
    for msg in msgs {
        let (props, mut headers, body) = msg.encode();
        crate::observe::trace::inject_headers(&mut headers);
        let properties = match try_write_properties(&props, &headers) {
            Ok(p) => p,
            Err(reason) => {
                let id = msg.id.chars().take(64).collect();
                return Err(SendError::Cut(
                    pending,
                    BrokerError::Unpublishable { id, reason },
                ));
            }
        };
        // Celery publishes to the default exchange with the queue's name as routing key.
        let confirm = slot
            .channel
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                &body,
                properties,
            )
            .await;
        match confirm {
            Ok(c) => pending.push((msg.id.as_str(), c)),
            Err(e) => return Err(SendError::Cut(pending, e.into())),
        }
    }
    Ok(pending)
}

/// Awaits confirms in publish order: how many leading ones were acks, and the first failure.
async fn settle(pending: Pending<'_>) -> (usize, Option<BrokerError>) {
    let mut confirmed = 0;
    for (id, confirm) in pending {
        match confirm.await {
            Ok(c) if c.is_ack() => confirmed += 1,
            Ok(_) => return (confirmed, Some(BrokerError::Nacked { id: id.to_owned() })),
            Err(e) => return (confirmed, Some(e.into())),
        }
    }
    (confirmed, None)
}

/// Exponential backoff with jitter: 200 ms doubling to 10 s.
pub fn backoff(attempt: u32) -> Duration {
    let base = 200u64.saturating_mul(1 << attempt.min(6)).min(10_000);
    Duration::from_millis(base / 2 + fastrand::u64(0..=base / 2))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn celery_style_urls_mean_vhost_slash() {
        for url in [
            "amqp://guest:guest@127.0.0.1:5672//",
            "amqp://guest:guest@127.0.0.1:5672/",
            "amqp://guest:guest@127.0.0.1:5672",
            "amqp://guest:guest@127.0.0.1:5672/%2f",
        ] {
            let uri = parse_url(url, 30).unwrap();
            assert_eq!(uri.vhost, "/", "{url}");
            assert_eq!(uri.query.heartbeat, Some(30));
        }
        assert_eq!(
            parse_url("amqp://h/prod?heartbeat=5", 30).unwrap().vhost,
            "prod"
        );
        assert_eq!(
            parse_url("amqp://h/prod?heartbeat=5", 30)
                .unwrap()
                .query
                .heartbeat,
            Some(5)
        );
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        assert!(backoff(0) <= Duration::from_millis(200));
        assert!(backoff(10) <= Duration::from_secs(10));
        assert!(backoff(10) >= Duration::from_secs(5));
    }

    #[test]
    fn queue_names_are_checked() {
        assert!(check_queue_name("image").is_ok());
        assert!(check_queue_name("").is_err());
        assert!(check_queue_name("a b").is_err());
    }
}

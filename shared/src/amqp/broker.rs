//! RabbitMQ: connecting (Celery-style URLs), declaring queues exactly as kombu does, and a
//! pooled publisher that waits for publisher confirms.
//!
//! A work queue's arguments come from the settings ([`QueueShape`]): `x-max-priority`
//! (`task_queue_max_priority`, as Celery declares it), or `x-queue-type: quorum`
//! (`task_default_queue_type`) with `x-delivery-limit` and dead-lettering to `<queue>.dead`
//! (`task_quorum_delivery_limit`). Every program that declares a queue — worker, producer,
//! `mediafarm dead`, the rerouter — declares it with the same shape, because RabbitMQ refuses a
//! declaration whose arguments differ from the queue's (PRECONDITION_FAILED, which closes the
//! channel); that refusal becomes [`BrokerError::QueueArguments`], which says what to do.

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions, QueuePurgeOptions,
};
use lapin::tcp::{AMQPUriTcpExt, RustlsConnector};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::uri::{AMQPScheme, AMQPUri};
use lapin::{Channel, Connection, ConnectionProperties, ExchangeKind};
use tokio::sync::{Mutex, Semaphore};

use crate::amqp::table::{try_write_properties, TooLong};
use crate::backend::redact;
use crate::protocol::TaskMessage;
use crate::redis_broker::RedisBroker;
use crate::settings::tls::BROKER_KEYS;
use crate::settings::Settings;

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("broker URL {url} is not valid: {reason}")]
    Url { url: String, reason: String },
    /// For a TLS handshake failure the message ends with what to change.
    #[error(
        "cannot connect to the broker at {url}: {source}{hint}",
        hint = crate::tls::explain(&.source.to_string(), &BROKER_KEYS)
    )]
    Connect { url: String, source: lapin::Error },
    #[error("cannot set up TLS to the broker: {0}")]
    Tls(#[from] crate::tls::TlsError),
    #[error("broker error: {0}")]
    Amqp(#[from] lapin::Error),
    #[error(transparent)]
    Redis(#[from] crate::redis_broker::RedisBrokerError),
    #[error("the broker refused message {id} (publisher confirm was a nack)")]
    Nacked { id: String },
    #[error("queue name {0:?} is not valid: 1 to 200 characters, no spaces")]
    QueueName(String),
    #[error("message {id} cannot be published: {reason}")]
    Unpublishable { id: String, reason: TooLong },
    #[error(
        "queue {queue:?} already exists with other arguments than these settings declare \
         ({argument}: the queue has {existing}, the settings want {wanted}); RabbitMQ said: \
         {said}. A queue's arguments never change once declared. Either set \
         task_queue_max_priority / task_default_queue_type / task_quorum_delivery_limit back to \
         what the queue has, or migrate (README, \"Priorities and quorum queues\"): consume a new \
         queue name with the new settings; or move the messages to a new queue with a shovel; or \
         stop the producers, let the workers drain {queue:?}, delete it (`rabbitmqctl \
         delete_queue {queue}`) and start again with the new settings"
    )]
    QueueArguments {
        queue: String,
        /// The argument RabbitMQ named (`x-max-priority`, `x-queue-type`, ...).
        argument: String,
        /// Its value on the existing queue, as RabbitMQ wrote it (`none` when absent).
        existing: String,
        /// The value these settings declare (`none` when absent).
        wanted: String,
        /// RabbitMQ's own text.
        said: String,
    },
}

impl BrokerError {
    /// Errors that the same call would get again: retrying does not help.
    pub fn is_permanent(&self) -> bool {
        matches!(
            self,
            BrokerError::Nacked { .. }
                | BrokerError::QueueName(_)
                | BrokerError::Unpublishable { .. }
                | BrokerError::QueueArguments { .. }
                | BrokerError::Tls(_)
        )
    }
}

/// How work queues are declared: their type and arguments, from the settings. A producer and
/// a worker of one queue must share it, or RabbitMQ refuses the second declaration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct QueueShape {
    /// `x-max-priority` (classic queues only).
    pub max_priority: Option<u8>,
    /// A quorum queue with this `x-delivery-limit`; 0 declares no limit and no dead-lettering
    /// (Celery's own quorum declaration). `None`: a classic queue.
    pub quorum_delivery_limit: Option<u32>,
}

impl QueueShape {
    /// The shape the settings ask for.
    pub fn of(settings: &Settings) -> QueueShape {
        QueueShape {
            max_priority: settings.task_queue_max_priority,
            quorum_delivery_limit: settings
                .quorum()
                .then_some(settings.task_quorum_delivery_limit),
        }
    }

    /// RabbitMQ dead-letters a message delivered too often to `<queue>.dead` itself, so that
    /// queue must exist before the work queue takes messages.
    pub fn broker_dead_letters(&self) -> bool {
        self.quorum_delivery_limit.is_some_and(|n| n > 0)
    }

    /// The arguments of work queue `queue`.
    pub fn work_arguments(&self, queue: &str) -> FieldTable {
        let mut args = FieldTable::default();
        if let Some(max) = self.max_priority {
            args.insert("x-max-priority".into(), AMQPValue::LongInt(i32::from(max)));
        }
        if let Some(limit) = self.quorum_delivery_limit {
            args.insert(
                "x-queue-type".into(),
                AMQPValue::LongString(LongString::from("quorum")),
            );
            if limit > 0 {
                let limit = i32::try_from(limit).unwrap_or(i32::MAX);
                args.insert("x-delivery-limit".into(), AMQPValue::LongInt(limit));
                args.insert(
                    "x-dead-letter-exchange".into(),
                    AMQPValue::LongString(LongString::from("")),
                );
                args.insert(
                    "x-dead-letter-routing-key".into(),
                    AMQPValue::LongString(LongString::from(
                        crate::amqp::reroute::dead_queue(queue).as_str(),
                    )),
                );
            }
        }
        args
    }

    /// The arguments of a dead-letter queue: only its type (dead letters wait for a person,
    /// so no priority, limit or dead-lettering of their own).
    pub fn dead_arguments(&self) -> FieldTable {
        let mut args = FieldTable::default();
        if self.quorum_delivery_limit.is_some() {
            args.insert(
                "x-queue-type".into(),
                AMQPValue::LongString(LongString::from("quorum")),
            );
        }
        args
    }
}

/// Turns RabbitMQ's refusal of a declaration with other arguments (406 PRECONDITION_FAILED,
/// "inequivalent arg 'x-max-priority' for queue 'q' in vhost '/': received '5' but current is
/// '10'") into [`BrokerError::QueueArguments`]; other errors pass through.
pub fn explain_declare_error(queue: &str, error: lapin::Error) -> BrokerError {
    let said = match error.kind() {
        lapin::ErrorKind::ProtocolError(e) if e.get_id() == 406 => e.get_message().to_string(),
        _ => return BrokerError::Amqp(error),
    };
    if !(said.contains("inequivalent arg") || said.contains("invalid arg")) {
        return BrokerError::Amqp(error);
    }
    let argument = said.split('\'').nth(1).unwrap_or("an argument").to_owned();
    let (wanted, existing) = match said.split_once("received ") {
        Some((_, rest)) => match rest.split_once(" but current is ") {
            Some((w, e)) => (plain_value(w), plain_value(e)),
            None => (plain_value(rest), "other arguments".into()),
        },
        // "invalid arg": the queue type does not take the argument at all.
        None => (
            "an argument this queue type does not accept".into(),
            "a type without it".into(),
        ),
    };
    BrokerError::QueueArguments {
        queue: queue.to_owned(),
        argument,
        existing,
        wanted,
        said,
    }
}

/// `'10'`, `none` or `the value '' of type 'longstr'` as a person writes it.
fn plain_value(text: &str) -> String {
    let text = text.trim();
    if let Some(rest) = text.strip_prefix("the value ") {
        return rest.split(" of type ").next().unwrap_or(rest).to_owned();
    }
    text.to_owned()
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

/// The broker URL to connect to: with `broker_use_ssl` set on an `amqp://` URL, TLS is on
/// as kombu turns it on, so the URL is read as `amqps://` (port 5671 unless it names one).
pub fn effective_url(settings: &Settings) -> std::borrow::Cow<'_, str> {
    match (
        &settings.broker_use_ssl,
        settings.broker_url.strip_prefix("amqp://"),
    ) {
        (Some(_), Some(rest)) => format!("amqps://{rest}").into(),
        _ => settings.broker_url.as_str().into(),
    }
}

/// Checks what connecting needs before the first try, so a bad value stops start-up instead
/// of being retried: the URL, and the TLS files and options.
pub fn check(settings: &Settings) -> Result<(), BrokerError> {
    if crate::settings::sentinel::is_sentinel(&settings.broker_url) {
        // Read by the settings' own check; the master's address is known only when connecting.
        return Ok(());
    }
    if settings.broker_is_redis() {
        return match crate::tls::redis_client(&settings.broker_url, None) {
            Ok(_) => Ok(()),
            Err(crate::tls::RedisClientError::Tls(e)) => Err(BrokerError::Tls(e)),
            Err(crate::tls::RedisClientError::Redis(e)) => Err(BrokerError::Url {
                url: redact(&settings.broker_url),
                reason: e.to_string(),
            }),
        };
    }
    parse_url(&effective_url(settings), settings.broker_heartbeat)?;
    crate::tls::broker_config(settings)?;
    Ok(())
}

/// Opens a connection named for the RabbitMQ management UI; over TLS for `amqps://` or with
/// `broker_use_ssl` (see [`crate::tls`]).
pub async fn connect(settings: &Settings, name: &str) -> Result<Connection, BrokerError> {
    let uri = parse_url(&effective_url(settings), settings.broker_heartbeat)?;
    let tls = crate::tls::broker_config(settings)?;
    let props = ConnectionProperties::default().with_connection_name(name.into());
    let connect = async move {
        match tls {
            None => Connection::connect_uri(uri, props).await,
            Some(config) => connect_tls(uri, props, config).await,
        }
    };
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

/// AMQP over TLS with mediafarm's own rustls configuration (CA, client certificate,
/// verification), where lapin's own TLS takes only a PEM chain and a PKCS#12 identity. The
/// TCP connection is lapin's; the server name checked is the URL's host.
async fn connect_tls(
    uri: AMQPUri,
    props: ConnectionProperties,
    config: rustls::ClientConfig,
) -> lapin::Result<Connection> {
    let connector = RustlsConnector::from(config);
    let runtime = lapin::runtime::default_runtime()?;
    Connection::connector(
        uri,
        runtime,
        async move |uri: AMQPUri, runtime| {
            let mut plain = uri.clone();
            plain.scheme = AMQPScheme::AMQP;
            let stream = plain.connect_async(&runtime).await?;
            Ok(stream.into_rustls(&connector, &uri.authority.host).await?)
        },
        props,
    )
    .await
}

pub fn check_queue_name(name: &str) -> Result<(), BrokerError> {
    if !crate::protocol::is_valid_queue_name(name) {
        return Err(BrokerError::QueueName(name.to_owned()));
    }
    Ok(())
}

/// Declares work queue `queue` as kombu does for `Queue(name)`: a durable direct exchange of
/// the same name, a durable queue with the `shape`'s arguments (none by default, as Celery's),
/// bound with the queue's name as routing key. Other arguments than a Python producer's make
/// RabbitMQ refuse one of the two declarations (PRECONDITION_FAILED). When the broker
/// dead-letters into `<queue>.dead` (a quorum queue with a delivery limit), that queue is
/// declared first.
pub async fn declare_queue(
    channel: &Channel,
    queue: &str,
    shape: &QueueShape,
) -> Result<(), BrokerError> {
    check_queue_name(queue)?;
    if shape.broker_dead_letters() {
        declare_dead_queue(channel, queue, shape).await?;
    }
    let args = shape.work_arguments(queue);
    declare_bound_queue(channel, queue, queue, ExchangeKind::Direct, queue, args).await
}

/// Declares `<queue>.dead`, the dead-letter queue of work queue `queue`; returns how many
/// letters it holds.
pub async fn declare_dead_queue(
    channel: &Channel,
    queue: &str,
    shape: &QueueShape,
) -> Result<u32, BrokerError> {
    let dead = crate::amqp::reroute::dead_queue(queue);
    let q = channel
        .queue_declare(
            dead.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            shape.dead_arguments(),
        )
        .await
        .map_err(|e| explain_declare_error(&dead, e))?;
    Ok(q.message_count())
}

/// Declares a durable `exchange` of `kind` and a durable `queue` with `args`, as kombu
/// declares a `Queue(name, Exchange(exchange, kind), routing_key, queue_arguments=args)`, and
/// binds them.
pub async fn declare_bound_queue(
    channel: &Channel,
    queue: &str,
    exchange: &str,
    kind: ExchangeKind,
    routing_key: &str,
    args: FieldTable,
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
            args,
        )
        .await
        .map_err(|e| explain_declare_error(queue, e))?;
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

/// How long each step of [`close_quietly`] waits for the broker's answer.
pub const CLOSE_STEP: Duration = Duration::from_secs(5);

/// Lets a connection go: closes `channels`, then `conn`, each step waiting at most
/// [`CLOSE_STEP`], errors ignored (the caller is done with it either way). The channels go first
/// because lapin 4.12 closing a connection with a channel still open fails with "invalid channel
/// state: Closing" and, now and then, never returns; a test's clean-up once waited on it for
/// ever.
pub async fn close_quietly(conn: &Connection, channels: &[&Channel], why: &str) {
    for channel in channels {
        let _ = tokio::time::timeout(CLOSE_STEP, channel.close(200, why.into())).await;
    }
    let _ = tokio::time::timeout(CLOSE_STEP, conn.close(200, why.into())).await;
}

/// Removes every ready message from `queue`; returns how many were removed. On the Redis
/// broker: every priority list of it (kombu's `_purge`); taken, unacknowledged ones stay.
pub async fn purge(settings: &Settings, queue: &str) -> Result<u64, BrokerError> {
    if settings.broker_is_redis() {
        check_queue_name(queue)?;
        return Ok(RedisBroker::connect(settings).await?.purge(queue).await?);
    }
    let conn = connect(settings, "mediafarm purge").await?;
    let channel = conn.create_channel().await?;
    declare_queue(&channel, queue, &QueueShape::of(settings)).await?;
    let n = channel
        .queue_purge(queue.into(), QueuePurgeOptions::default())
        .await?;
    close_quietly(&conn, &[&channel], "purged").await;
    Ok(u64::from(n))
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
    /// With a Redis `broker_url`: the Redis broker, connected on first use.
    redis: tokio::sync::OnceCell<RedisBroker>,
}

const PUBLISH_ATTEMPTS: u32 = 5;
/// How many messages one round trip to the Redis broker publishes.
const REDIS_PUBLISH_CHUNK: usize = 64;

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
                redis: tokio::sync::OnceCell::new(),
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
        if self.inner.settings.broker_is_redis() {
            return self.publish_redis(queue, msgs).await;
        }
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
            if error.is_permanent() || attempt + 1 >= PUBLISH_ATTEMPTS {
                return Err(error);
            }
            attempt += 1;
            tracing::warn!(error = %error, attempt, "publish failed, retrying");
            tokio::time::sleep(backoff(attempt)).await;
        }
    }

    /// Publishes onto the Redis broker's lists, [`REDIS_PUBLISH_CHUNK`] messages per pipelined
    /// round trip (Redis has no confirms: the reply to the pipeline is the confirm), retrying
    /// as over AMQP. Chunks let a worker start on the first messages of a large batch while the
    /// rest are still being encoded, and keep the encoded copies small.
    async fn publish_redis(&self, queue: &str, msgs: &[TaskMessage]) -> Result<(), BrokerError> {
        for chunk in msgs.chunks(REDIS_PUBLISH_CHUNK) {
            self.publish_redis_chunk(queue, chunk).await?;
        }
        Ok(())
    }

    async fn publish_redis_chunk(
        &self,
        queue: &str,
        msgs: &[TaskMessage],
    ) -> Result<(), BrokerError> {
        let default_priority = self.inner.settings.task_default_priority;
        let encoded: Vec<_> = msgs
            .iter()
            .map(|msg| {
                let (mut props, mut headers, body) = msg.encode();
                if msg.priority.is_none() {
                    props.priority = default_priority;
                }
                crate::observe::trace::inject_headers(&mut headers);
                (props, headers, body)
            })
            .collect();
        let mut attempt = 0;
        loop {
            let sent = async {
                let broker = self
                    .inner
                    .redis
                    .get_or_try_init(|| async {
                        self.inner.opened.fetch_add(1, Ordering::Relaxed);
                        RedisBroker::connect(&self.inner.settings).await
                    })
                    .await?;
                broker.publish(queue, &encoded).await
            }
            .await;
            match sent {
                Ok(()) => return Ok(()),
                Err(e) if attempt + 1 >= PUBLISH_ATTEMPTS => return Err(e.into()),
                Err(e) => {
                    attempt += 1;
                    tracing::warn!(error = %e, attempt, "publish to the Redis broker failed, retrying");
                    tokio::time::sleep(backoff(attempt)).await;
                }
            }
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
        let shape = QueueShape::of(&self.inner.settings);
        let default_priority = self.inner.settings.task_default_priority;
        match send_on(&mut slot, queue, &shape, default_priority, msgs).await {
            Ok(pending) => {
                self.inner.idle.lock().await.push(slot);
                Ok(pending)
            }
            Err(cut) => {
                close_quietly(&slot.conn, &[&slot.channel], "publish failed").await;
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

/// Writes `msgs` on one channel; says which confirms to await. A message without a priority
/// gets `default_priority` (Celery's `task_default_priority`).
async fn send_on<'m>(
    slot: &mut Slot,
    queue: &str,
    shape: &QueueShape,
    default_priority: Option<u8>,
    msgs: &'m [TaskMessage],
) -> Result<Pending<'m>, SendError<'m>> {
    if !slot.declared.contains(queue) {
        declare_queue(&slot.channel, queue, shape)
            .await
            .map_err(|e| SendError::Cut(Vec::new(), e))?;
        slot.declared.insert(queue.to_owned());
    }
    let mut pending = Vec::with_capacity(msgs.len());
    for window in msgs.chunks(PUBLISHES_QUEUED) {
        let (mut ids, mut bodies, mut properties) = (Vec::new(), Vec::new(), Vec::new());
        let mut unpublishable = None;
        for msg in window {
            let (mut props, mut headers, body) = msg.encode();
            if msg.priority.is_none() {
                if let Some(p) = default_priority {
                    props.priority = Some(p);
                }
            }
            crate::observe::trace::inject_headers(&mut headers);
            match try_write_properties(&props, &headers) {
                Ok(p) => {
                    ids.push(msg.id.as_str());
                    bodies.push(body);
                    properties.push(p);
                }
                Err(reason) => {
                    let id = msg.id.chars().take(64).collect();
                    unpublishable = Some(BrokerError::Unpublishable { id, reason });
                    break;
                }
            }
        }
        // Celery publishes to the default exchange with the queue's name as routing key.
        let publishes = bodies.iter().zip(properties).map(|(body, properties)| {
            slot.channel.basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                body,
                properties,
            )
        });
        let written = queued_in_order(publishes.collect()).await;
        for (id, confirm) in ids.into_iter().zip(written) {
            match confirm {
                Ok(c) => pending.push((id, c)),
                Err(e) => return Err(SendError::Cut(pending, e.into())),
            }
        }
        if let Some(e) = unpublishable {
            return Err(SendError::Cut(pending, e));
        }
    }
    Ok(pending)
}

/// How many publishes of one batch are queued on the channel before their writes are awaited.
const PUBLISHES_QUEUED: usize = 256;

/// Polls every future once, in order, then awaits each in turn; their outputs in order.
/// lapin's `basic_publish` queues its frames and takes its confirm's delivery tag on its first
/// poll and then waits until the frames are written: awaited one by one, every message cost a
/// hand-off to lapin's I/O thread and a write of its own (~0.2 ms each for a chord of 1,000);
/// all queued first, the I/O thread writes them in a few large writes, in publish order.
async fn queued_in_order<F: std::future::Future>(futures: Vec<F>) -> Vec<F::Output> {
    use std::future::Future as _;
    let mut futures: Vec<_> = futures
        .into_iter()
        .map(|f| Box::pin(futures_util::future::maybe_done(f)))
        .collect();
    std::future::poll_fn(|cx| {
        for f in &mut futures {
            // A future done at its first poll keeps its output; the rest are awaited below.
            let _ = f.as_mut().poll(cx);
        }
        std::task::Poll::Ready(())
    })
    .await;
    for f in &mut futures {
        f.as_mut().await;
    }
    futures
        .iter_mut()
        .filter_map(|f| f.as_mut().take_output())
        .collect()
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

    fn refusal(text: &str) -> lapin::Error {
        use lapin::protocol::{AMQPError, AMQPErrorKind, AMQPSoftError};
        lapin::Error::from(lapin::ErrorKind::ProtocolError(AMQPError::new(
            AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED),
            text.into(),
        )))
    }

    #[test]
    fn a_refused_redeclaration_says_which_argument_and_what_to_do() {
        let said = "PRECONDITION_FAILED - inequivalent arg 'x-max-priority' for queue 'images' \
                    in vhost '/': received none but current is the value '10' of type 'signedint'";
        let e = explain_declare_error("images", refusal(said));
        let BrokerError::QueueArguments {
            queue,
            argument,
            existing,
            wanted,
            ..
        } = &e
        else {
            panic!("{e:?}");
        };
        assert_eq!(
            (
                queue.as_str(),
                argument.as_str(),
                existing.as_str(),
                wanted.as_str()
            ),
            ("images", "x-max-priority", "'10'", "none")
        );
        let text = e.to_string();
        for part in [
            "\"images\"",
            "new queue",
            "shovel",
            "drain",
            "delete_queue images",
        ] {
            assert!(text.contains(part), "{part}: {text}");
        }
        assert!(e.is_permanent());
        let e = explain_declare_error(
            "q",
            refusal(
                "PRECONDITION_FAILED - inequivalent arg 'x-delivery-limit' for queue 'q' in vhost \
                 '/': received '5' but current is '20'",
            ),
        );
        assert!(
            matches!(&e, BrokerError::QueueArguments { existing, wanted, .. }
                if existing == "'20'" && wanted == "'5'"),
            "{e:?}"
        );
        // Other refusals stay what they were.
        let e = explain_declare_error("q", refusal("PRECONDITION_FAILED - unknown delivery tag 1"));
        assert!(matches!(e, BrokerError::Amqp(_)), "{e:?}");
    }

    #[test]
    fn queue_shapes_follow_the_settings() {
        let mut s = Settings::default();
        assert!(QueueShape::of(&s).work_arguments("q").inner().is_empty());
        assert!(QueueShape::of(&s).dead_arguments().inner().is_empty());
        s.task_queue_max_priority = Some(10);
        let args = QueueShape::of(&s).work_arguments("q");
        assert_eq!(
            args.inner().get("x-max-priority"),
            Some(&AMQPValue::LongInt(10))
        );
        s.task_queue_max_priority = None;
        s.task_default_queue_type = "quorum".into();
        let shape = QueueShape::of(&s);
        let args = shape.work_arguments("q");
        assert_eq!(
            args.inner().get("x-delivery-limit"),
            Some(&AMQPValue::LongInt(20))
        );
        assert_eq!(
            args.inner().get("x-dead-letter-routing-key"),
            Some(&AMQPValue::LongString("q.dead".into()))
        );
        assert!(shape.broker_dead_letters());
        assert!(shape.dead_arguments().inner().contains_key("x-queue-type"));
        // A limit of 0 is Celery's declaration: the type and nothing else.
        s.task_quorum_delivery_limit = 0;
        let args = QueueShape::of(&s).work_arguments("q");
        assert_eq!(
            args.inner().keys().map(|k| k.as_str()).collect::<Vec<_>>(),
            ["x-queue-type"]
        );
    }

    #[test]
    fn queue_names_are_checked() {
        assert!(check_queue_name("image").is_ok());
        assert!(check_queue_name("").is_err());
        assert!(check_queue_name("a b").is_err());
    }
}

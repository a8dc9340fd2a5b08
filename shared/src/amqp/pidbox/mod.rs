//! Celery's remote control over the pidbox, worker side and requester side. Each worker
//! consumes its mailbox queue `<node>.celery.pidbox` (bound to the `celery.pidbox` fanout) and
//! answers in Celery 5's own formats, so `celery inspect`, `celery control`, `celery status`
//! and Flower see mediafarm workers as they see Python ones.
//!
//! - [`commands`]: the commands a requester may send and their positional arguments;
//! - [`mailbox`]: the kombu message on the wire (reading a request, sending a reply, and
//!   [`mailbox::call`] for a requester gathering replies);
//! - [`revoke`]: the revoked set (here and in Redis) and the `revoke` command;
//! - [`jobs`]: the jobs a worker holds (active, reserved, scheduled), which the runtime reports;
//! - [`inspect`]: read-only replies (`ping`, `stats`, `active`, `registered`, `conf`, ...);
//! - [`control`]: commands that change the worker (`add_consumer`, `cancel_consumer`,
//!   `time_limit`, `shutdown`);
//! - [`over_redis`]: the same mailbox on the Redis broker (requests by `PUBLISH`, replies
//!   pushed onto the requester's reply list), as kombu's Redis transport carries it.
//!
//! [`Node`] is what a worker exposes to its mailbox; [`listen`] (or [`over_redis::listen`])
//! reads requests and sends each to one match arm per method ([`dispatch`]), whichever broker
//! carried it. A method without an arm is answered as Celery
//! answers a method it has no handler for.

pub mod commands;
pub mod control;
pub mod inspect;
pub mod jobs;
pub mod mailbox;
pub mod over_redis;
pub mod revoke;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lapin::options::BasicConsumeOptions;
use lapin::types::FieldTable;
use lapin::Channel;
use serde_json::{json, Map, Value};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::amqp::broker::BrokerError;
use crate::backend::ResultBackend;
use crate::redis_broker::RedisBroker;
use crate::settings::Settings;

pub use jobs::{JobState, Jobs, Tracked};
pub use mailbox::{ReplyTo, Request};
pub use revoke::{broadcast, record, remember_until, Revocations, RevokeError, REVOKED_KEY};

/// Celery's control exchange (kombu `Mailbox` "celery", `<namespace>.pidbox`).
pub const CONTROL_EXCHANGE: &str = "celery.pidbox";
/// Where control replies go (kombu `Mailbox.reply_exchange`, `reply.<namespace>.pidbox`).
pub const REPLY_EXCHANGE: &str = "reply.celery.pidbox";

/// A task's time limits set at run time (`control time_limit`): soft, hard.
pub type TimeLimitOverride = (Option<Duration>, Option<Duration>);

/// What a worker shows and lets be changed through its mailbox. The runtime holds it too: it
/// reports jobs into [`Node::jobs`], reads [`Node::time_limit`] for each job, consumes the
/// queues [`Node::watch_queues`] names, and stops when [`Node::stop`] is cancelled.
pub struct Node {
    pub hostname: String,
    pub settings: Settings,
    pub backend: ResultBackend,
    pub revocations: Arc<Revocations>,
    pub jobs: Jobs,
    /// Registered task names, sorted.
    pub tasks: Vec<String>,
    pub stop: CancellationToken,
    queues: watch::Sender<Vec<String>>,
    time_limits: Mutex<HashMap<String, TimeLimitOverride>>,
    /// Commands answered by layers above this one (the runtime's rate limits, the event
    /// switch), which this module cannot name without an import cycle.
    handlers: Mutex<HashMap<&'static str, Handler>>,
    started: Instant,
    clock: AtomicU64,
    /// Reads the prefetch window the consumer applies now (it widens while finished jobs wait
    /// for their result to be stored); `None` until a consumer gives one, or once it is gone.
    prefetch_source: Mutex<Option<PrefetchSource>>,
}

/// How `stats` reads the consumer's window, set by the runtime (which this module cannot name).
pub type PrefetchSource = Box<dyn Fn() -> Option<u16> + Send + Sync>;

/// A command a higher layer answers: Celery's keyword arguments in, the reply out.
pub type Handler = Arc<dyn Fn(&Map<String, Value>) -> Value + Send + Sync>;

impl Node {
    pub fn new(
        hostname: String,
        settings: Settings,
        backend: ResultBackend,
        revocations: Arc<Revocations>,
        mut tasks: Vec<String>,
        queues: Vec<String>,
        stop: CancellationToken,
    ) -> Node {
        tasks.sort();
        Node {
            hostname,
            settings,
            backend,
            revocations,
            jobs: Jobs::default(),
            tasks,
            stop,
            queues: watch::Sender::new(queues),
            time_limits: Mutex::new(HashMap::new()),
            handlers: Mutex::new(HashMap::new()),
            started: Instant::now(),
            clock: AtomicU64::new(0),
            prefetch_source: Mutex::new(None),
        }
    }

    /// The queues consumed now.
    pub fn queues(&self) -> Vec<String> {
        self.queues.borrow().clone()
    }

    /// Follows the queues to consume (changed by `add_consumer` / `cancel_consumer`).
    pub fn watch_queues(&self) -> watch::Receiver<Vec<String>> {
        self.queues.subscribe()
    }

    /// Adds `queue` to those consumed; `false` if it already was.
    pub fn add_queue(&self, queue: &str) -> bool {
        self.queues.send_if_modified(|qs| {
            if qs.iter().any(|q| q == queue) {
                return false;
            }
            qs.push(queue.to_owned());
            true
        })
    }

    /// Stops consuming `queue`; `false` if it was not consumed.
    pub fn remove_queue(&self, queue: &str) -> bool {
        self.queues.send_if_modified(|qs| {
            let before = qs.len();
            qs.retain(|q| q != queue);
            qs.len() != before
        })
    }

    /// The limits `control time_limit` set for `task`, if any (they replace the task's own).
    pub fn time_limit(&self, task: &str) -> Option<TimeLimitOverride> {
        self.time_limits
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(task)
            .copied()
    }

    fn set_time_limit(&self, task: &str, limits: TimeLimitOverride) {
        self.time_limits
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(task.to_owned(), limits);
    }

    /// Answers `method` with `handler` (registered by the runtime at start-up).
    pub fn handle(&self, method: &'static str, handler: Handler) {
        self.handlers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(method, handler);
    }

    fn handler(&self, method: &str) -> Option<Handler> {
        self.handlers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(method)
            .cloned()
    }

    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// kombu's Lamport clock: forwarded on every request and reply.
    pub(crate) fn forward_clock(&self) -> u64 {
        self.clock.fetch_add(1, Ordering::Relaxed) + 1
    }

    pub fn clock(&self) -> u64 {
        self.clock.load(Ordering::Relaxed)
    }

    /// Where `stats` reads the prefetch window in effect from (the current consumer's).
    pub fn set_prefetch_source(&self, source: PrefetchSource) {
        *self
            .prefetch_source
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(source);
    }

    /// The prefetch window in effect, as Celery's `stats` reports its consumer's current QoS:
    /// the configured `prefetch_count` while no consumer gives one.
    pub fn prefetch_in_effect(&self) -> u16 {
        self.prefetch_source
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .and_then(|read| read())
            .unwrap_or_else(|| self.settings.prefetch_count())
    }
}

/// The broker a request came through, for the commands that change what is bound there
/// (`add_consumer` with an exchange).
#[derive(Clone, Copy)]
pub enum Via<'a> {
    Amqp(&'a Channel),
    Redis(&'a RedisBroker),
}

/// Runs one request; `None` when Celery sends no reply (`shutdown` ends the worker instead).
/// One arm per method: a new command is a new arm and a function in `inspect` or `control`.
pub async fn dispatch(node: &Node, via: Via<'_>, req: &Request) -> Option<Value> {
    Some(match req.method.as_str() {
        "ping" => json!({"ok": "pong"}),
        "stats" => inspect::stats(node),
        "active" | "dump_active" => inspect::active(node),
        "reserved" | "dump_reserved" => inspect::reserved(node),
        "scheduled" | "dump_schedule" => inspect::scheduled(node),
        "registered" | "dump_tasks" => inspect::registered(node),
        "active_queues" => inspect::active_queues(node),
        "revoked" | "dump_revoked" => inspect::revoked(node),
        "query_task" => inspect::query_task(node, req),
        "conf" | "dump_conf" => inspect::conf(node, req),
        "report" => inspect::report(node),
        "clock" => json!({"clock": node.clock()}),
        "hello" => inspect::hello(node, req),
        "revoke" | "terminate" => {
            revoke::revoke(&node.revocations, &node.backend, &node.settings, req).await
        }
        "add_consumer" => control::add_consumer(node, via, req).await,
        "cancel_consumer" => control::cancel_consumer(node, req),
        "time_limit" => control::time_limit(node, req),
        "shutdown" => {
            control::shutdown(node);
            return None;
        }
        other => match node.handler(other) {
            Some(handler) => handler(&req.arguments),
            // Celery's kombu Node answers a method it has no handler for with the KeyError.
            None => json!({"error": format!("KeyError('{}')", other.replace('\'', "\\'"))}),
        },
    })
}

/// Consumes this worker's mailbox queue `<hostname>.celery.pidbox` until the channel closes,
/// answering every request meant for this node.
pub async fn listen(channel: Channel, node: Arc<Node>) -> Result<(), BrokerError> {
    mailbox::declare_exchange(&channel).await?;
    let hostname = node.hostname.as_str();
    let queue = format!("{hostname}.{CONTROL_EXCHANGE}");
    // As Celery's control queues: stale commands expire (300 s), the queue goes when the worker
    // does.
    mailbox::declare_mailbox_queue(&channel, &queue, CONTROL_EXCHANGE, "", Some(300_000)).await?;
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
        let Some(req) = Request::parse(&delivery.data) else {
            tracing::debug!("control message ignored (not a kombu mailbox request)");
            continue;
        };
        if !req.is_for(hostname) {
            continue;
        }
        node.forward_clock();
        tracing::debug!(method = %req.method, "control request");
        let reply = dispatch(&node, Via::Amqp(&channel), &req).await;
        if let (Some(to), Some(reply)) = (&req.reply_to, reply) {
            let clock = node.forward_clock();
            if let Err(e) = mailbox::send_reply(&channel, hostname, to, clock, reply).await {
                tracing::warn!(error = %e, method = %req.method, "could not send a control reply");
            }
        }
    }
    Ok(())
}

//! The worker runtime: connect, declare, consume from RabbitMQ (or from Redis:
//! [`super::redis_consumer`]) with prefetch = concurrency ×
//! multiplier (widened for jobs that have only their finishing left: [`super::window`]), hand each delivery to `job` (which runs at most `concurrency` at once and acks
//! only after the outcome is stored), answer Celery's remote control on the pidbox (revokes,
//! inspect, control; the queues consumed follow `add_consumer` / `cancel_consumer`), and
//! keep `/readyz` honest. A lost connection is re-established with backoff and consuming
//! resumes. On stop (SIGTERM or `control shutdown`): cancel the consumers, let running jobs
//! finish within the grace period, return the rest to the broker.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::stream::{select_all, StreamExt};
use futures_util::FutureExt;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::amqp::broker::{self, backoff, BrokerError, Publisher, QueueShape};
use crate::amqp::pidbox::{self, Node, Revocations};
use crate::amqp::reroute::Rerouter;
use crate::backend::{BackendError, ResultBackend};
use crate::events::Events;
use crate::observe::http::{self, Readiness};
use crate::observe::metrics::{host_label, Metrics, WorkerLabels};
use crate::runtime::background::Background;
use crate::runtime::cpu::CpuPool;
use crate::runtime::message::{self, Incoming, Shared};
use crate::runtime::rate::{RateError, RateLimits};
use crate::runtime::task::Registry;
use crate::runtime::transport::Via;
use crate::runtime::window::{Seat, Window};
use crate::settings::Settings;

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error(transparent)]
    Http(#[from] http::BindError),
    #[error("worker has no queues to consume from; pass --queues")]
    NoQueues,
    #[error("worker has no tasks registered")]
    NoTasks,
    #[error(transparent)]
    Rate(#[from] RateError),
    #[error(transparent)]
    Traces(#[from] crate::observe::trace::TraceConfigError),
    #[error(
        "task {task} has a hard time limit of {} s; at most {} s is allowed: \
         broker_consumer_timeout (on Redis: broker_transport_options.visibility_timeout) less \
         the time to store the result and acknowledge",
        limit.as_secs_f64(), longest.as_secs_f64()
    )]
    TimeLimit {
        task: String,
        limit: Duration,
        longest: Duration,
    },
}

/// How long a stopping worker waits for its last spans to reach the OTLP receiver.
const TRACE_FLUSH: Duration = Duration::from_secs(5);

/// `OTEL_SERVICE_NAME`'s default: the program's name (`image-worker`, …).
fn service_name() -> String {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "mediafarm".to_owned())
}

/// A configured worker, ready to run.
pub struct Worker {
    settings: Settings,
    registry: Registry,
    queues: Vec<String>,
    hostname: String,
    metrics: Metrics,
}

/// A running worker: its metrics address and a way to stop it.
pub struct WorkerHandle {
    pub metrics_addr: std::net::SocketAddr,
    rates: Arc<RateLimits>,
    events: Arc<Events>,
    stop: CancellationToken,
    done: tokio::task::JoinHandle<()>,
}

impl WorkerHandle {
    /// The worker's Celery events and their switch (on with `worker_send_task_events`).
    pub fn events(&self) -> Arc<Events> {
        self.events.clone()
    }

    /// Asks the worker to stop as on SIGTERM.
    pub fn stop(&self) {
        self.stop.cancel();
    }

    /// Stops and waits until every job has finished or been returned to the broker.
    pub async fn shutdown(self) {
        self.stop.cancel();
        let _ = self.done.await;
    }

    /// Waits for the worker to end (after `stop`).
    pub async fn wait(self) {
        let _ = self.done.await;
    }

    /// The worker's per-task rate limits, to read or change while it runs (what Celery's
    /// `rate_limit` control command does).
    pub fn rate_limits(&self) -> Arc<RateLimits> {
        self.rates.clone()
    }
}

impl Worker {
    pub fn new(settings: Settings, registry: Registry, queues: Vec<String>) -> Worker {
        Worker {
            hostname: default_node_name(&crate::hostname()),
            settings,
            registry,
            queues,
            metrics: Metrics::new(),
        }
    }

    /// The node name reported in results and metrics (Celery's `-n`): `%h` is this host's
    /// name, `%n` its first label and `%d` the rest (its domain), as in Celery.
    pub fn hostname(mut self, hostname: impl Into<String>) -> Worker {
        self.hostname = expand_node_name(&hostname.into(), &crate::hostname());
        self
    }

    /// Connects to the result backend, serves the HTTP endpoints and starts consuming.
    pub async fn start(self) -> Result<WorkerHandle, WorkerError> {
        if self.queues.is_empty() {
            return Err(WorkerError::NoQueues);
        }
        if self.registry.names().is_empty() {
            return Err(WorkerError::NoTasks);
        }
        for q in &self.queues {
            broker::check_queue_name(q)?;
        }
        let longest = self.settings.longest_hard_limit();
        for task in self.registry.names() {
            if let Some(limit) = self
                .registry
                .policy(task)
                .and_then(|p| p.time_limit)
                .filter(|l| *l > longest)
            {
                return Err(WorkerError::TimeLimit {
                    task: task.to_owned(),
                    limit,
                    longest,
                });
            }
        }
        crate::observe::trace::install_from_env(&service_name())?;
        // Check the broker URL and TLS files now, so a bad one stops start-up instead of being
        // retried.
        broker::check(&self.settings)?;
        let backend = ResultBackend::from_settings(&self.settings).await?;
        let cluster = (self.settings.task_rate_limit_scope == "cluster").then_some(&backend);
        let rates = Arc::new(RateLimits::new(
            &self.registry,
            self.settings.task_default_rate_limit.as_ref(),
            &self.metrics,
            &self.hostname,
            cluster,
        )?);
        let readiness = Arc::new(Readiness::default());
        readiness.backend.store(true, Ordering::Relaxed);
        let stop = CancellationToken::new();
        let http_stop = CancellationToken::new();
        let metrics_addr = http::serve(
            self.settings.metrics_addr,
            self.metrics.clone(),
            readiness.clone(),
            http_stop.clone(),
        )
        .await?;
        let hostname: Arc<str> = self.hostname.into();
        let active = self
            .metrics
            .active
            .get_or_create(&WorkerLabels {
                hostname: host_label(&hostname),
            })
            .clone();
        let events = Events::start(
            &self.settings,
            &hostname,
            self.settings.worker_send_task_events,
            self.metrics.events_dropped.clone(),
        );
        let revocations = Arc::new(Revocations::default());
        if let Err(e) = revocations.refresh(&backend).await {
            tracing::warn!(error = %e, "could not load revoked ids from Redis");
        }
        let node = Arc::new(Node::new(
            hostname.to_string(),
            self.settings.clone(),
            backend.clone(),
            revocations,
            self.registry
                .names()
                .into_iter()
                .map(str::to_owned)
                .collect(),
            self.queues.clone(),
            stop.clone(),
        ));
        node.handle("rate_limit", {
            let rates = rates.clone();
            Arc::new(move |args| rates.control(&serde_json::Value::Object(args.clone())))
        });
        // Celery's replies, word for word (celery/worker/control.py).
        for (method, on) in [("enable_events", true), ("disable_events", false)] {
            let events = events.clone();
            node.handle(
                method,
                Arc::new(move |_| {
                    let (was, word) =
                        (events.is_enabled(), if on { "enabled" } else { "disabled" });
                    events.set_enabled(on);
                    let already = if was == on { "already " } else { "" };
                    serde_json::json!({ "ok": format!("task events {already}{word}") })
                }),
            );
        }
        node.handle("heartbeat", {
            let events = events.clone();
            Arc::new(move |_| {
                events.heartbeat_now();
                serde_json::Value::Null
            })
        });
        let shared = Arc::new(Shared {
            node,
            task_metrics: Mutex::new(HashMap::new()),
            active,
            slots: Arc::new(Semaphore::new(self.settings.worker_concurrency)),
            rates: rates.clone(),
            // Opens its connection only when a job first hands itself on.
            publisher: Publisher::named(&self.settings, &format!("{hostname} continuations")),
            settings: self.settings,
            registry: self.registry,
            backend,
            cpu: CpuPool::per_core(),
            metrics: self.metrics,
            readiness,
            hostname,
            stop: stop.clone(),
            jobs: TaskTracker::new(),
            background: TaskTracker::new(),
            events: events.clone(),
        });
        for (name, start) in shared.registry.background_work() {
            let context = Background::new(
                name,
                shared.hostname.clone(),
                shared.settings.clone(),
                shared.backend.clone(),
                shared.metrics.clone(),
                shared.readiness.clone(),
                stop.clone(),
            );
            shared.background.spawn(start(context));
        }
        shared.background.close();
        tracing::info!(
            hostname = %shared.hostname,
            queues = ?self.queues,
            tasks = ?shared.registry.names(),
            concurrency = shared.settings.worker_concurrency,
            prefetch = shared.settings.prefetch_count(),
            %metrics_addr,
            "worker starting"
        );
        let done = tokio::spawn(async move {
            tokio::spawn(watch_backend(shared.clone()));
            let beating = shared.clone();
            tokio::spawn(async move {
                let stop = beating.stop.clone();
                beating.events.heartbeats(stop, || beating.load()).await
            });
            consume_until_stopped(shared.clone()).await;
            crate::observe::trace::flush(TRACE_FLUSH).await;
            http_stop.cancel();
        });
        Ok(WorkerHandle {
            metrics_addr,
            rates,
            events,
            stop,
            done,
        })
    }

    /// Runs until SIGTERM or SIGINT (a second signal stops at once, as Celery's cold shutdown).
    pub async fn run_until_signal(self) -> Result<(), WorkerError> {
        let handle = self.start().await?;
        let stop = handle.stop.clone();
        tokio::spawn(async move {
            wait_for_signal().await;
            stop.cancel();
            tracing::info!("stop requested: finishing running jobs, returning the rest");
            wait_for_signal().await;
            tracing::warn!(
                "second stop signal: exiting now; unacknowledged jobs return to the broker"
            );
            std::process::exit(130);
        });
        handle.wait().await;
        tracing::info!("worker stopped");
        Ok(())
    }
}

/// The node name a worker gets without `-n`: `mediafarm.<pid>@<host>`, and `…<pid>-<n>@<host>`
/// for the n-th worker started in one process. Unique per process, so two workers on one host
/// never contend for one control queue (Celery's default `celery@%h` is not, and Celery warns
/// with DuplicateNodenameWarning instead).
fn default_node_name(host: &str) -> String {
    static STARTED: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let nth = STARTED.fetch_add(1, Ordering::Relaxed);
    let pid = std::process::id();
    if nth == 0 {
        format!("mediafarm.{pid}@{host}")
    } else {
        format!("mediafarm.{pid}-{}@{host}", nth + 1)
    }
}

/// Celery's node-name expansion: `%h` host, `%n` first label, `%d` domain, `%%` a percent.
pub fn expand_node_name(template: &str, host: &str) -> String {
    let (name, domain) = host.split_once('.').unwrap_or((host, ""));
    let mut out = String::with_capacity(template.len() + host.len());
    let mut chars = template.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('h') => out.push_str(host),
            Some('n') => out.push_str(name),
            Some('d') => out.push_str(domain),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => {},
                    _ = int.recv() => {},
                }
            }
            _ => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Keeps `/readyz` honest about Redis, and the revoked set in step with Redis (for revokes
/// broadcast while this worker was disconnected).
async fn watch_backend(shared: Arc<Shared>) {
    let mut round = 0u32;
    while !shared.stop.is_cancelled() {
        let ok = tokio::time::timeout(Duration::from_secs(2), shared.backend.ping())
            .await
            .is_ok_and(|r| r.is_ok());
        shared.readiness.backend.store(ok, Ordering::Relaxed);
        round = round.wrapping_add(1);
        if ok && round.is_multiple_of(5) {
            if let Err(e) = shared.node.revocations.refresh(&shared.backend).await {
                tracing::debug!(error = %e, "could not refresh revoked ids");
            }
        }
        tokio::select! {
            _ = shared.stop.cancelled() => break,
            _ = tokio::time::sleep(Duration::from_secs(2)) => {},
        }
    }
}

/// Consumes (from RabbitMQ, or from Redis with a Redis `broker_url`), reconnecting with
/// backoff, until stopped; then drains.
async fn consume_until_stopped(shared: Arc<Shared>) {
    let up = WorkerLabels {
        hostname: host_label(&shared.hostname),
    };
    let held = if shared.settings.broker_is_redis() {
        crate::runtime::redis_consumer::consume_until_stopped(shared.clone()).await
    } else {
        consume_amqp_until_stopped(&shared, &up).await;
        None
    };
    shared.readiness.consuming.store(false, Ordering::Relaxed);
    shared.metrics.up.get_or_create(&up).set(0);
    drain(&shared).await;
    if let Some(held) = held {
        held.give_back().await;
    }
    // Last, so the events of jobs that finished while draining go out before it.
    shared
        .events
        .worker_offline(shared.load(), Duration::from_secs(2))
        .await;
}

/// Reconnects to RabbitMQ with backoff until stopped.
async fn consume_amqp_until_stopped(shared: &Arc<Shared>, up: &WorkerLabels) {
    let mut attempt = 0;
    loop {
        match consume(shared, &mut attempt).await {
            Ok(()) => break,
            Err(e) => {
                shared.readiness.broker.store(false, Ordering::Relaxed);
                shared.readiness.consuming.store(false, Ordering::Relaxed);
                shared.metrics.up.get_or_create(up).set(0);
                let wait = backoff(attempt);
                attempt = attempt.saturating_add(1);
                if matches!(e, BrokerError::QueueArguments { .. }) {
                    // Settings and queue disagree: nothing is consumed until someone acts, and
                    // the worker picks up on its own once the queue is migrated.
                    tracing::error!(error = %e, retry_in = ?wait, "cannot declare a work queue");
                } else {
                    tracing::warn!(error = %e, retry_in = ?wait, "broker connection lost; reconnecting");
                }
                tokio::select! {
                    _ = shared.stop.cancelled() => break,
                    _ = tokio::time::sleep(wait) => {},
                }
            }
        }
    }
}

/// How long a stopping worker waits for one of the broker's answers in the close handshake.
const STOP_STEP: Duration = Duration::from_secs(5);

/// Awaits one step of a stop's handshake with the broker for at most [`STOP_STEP`]: a stop must
/// end even when an answer never comes (the connection is dropped then, and RabbitMQ returns
/// what was not acknowledged, as after a lost connection).
async fn bounded<T>(what: &str, step: impl std::future::Future<Output = T>) {
    if tokio::time::timeout(STOP_STEP, step).await.is_err() {
        tracing::warn!(
            step = what,
            "the broker did not answer while the worker stopped; going on"
        );
    }
}

/// Waits for running jobs and background work within the grace period; jobs left return to
/// the broker when the connection closes.
async fn drain(shared: &Shared) {
    shared.jobs.close();
    let grace = shared.settings.worker_shutdown_grace;
    let both = futures_util::future::join(shared.jobs.wait(), shared.background.wait());
    if tokio::time::timeout(grace, both).await.is_err() {
        tracing::warn!(
            still_running = shared.jobs.len(),
            background = shared.background.len(),
            ?grace,
            "grace period over; unfinished jobs return to the broker"
        );
    }
}

/// One connection's life: declare, consume, dispatch. `Ok` means stopped on request. On an
/// error the connection is closed, so a half-broken one (a channel closed by the broker, say)
/// does not linger beside its replacement.
async fn consume(shared: &Arc<Shared>, attempt: &mut u32) -> Result<(), BrokerError> {
    let conn = broker::connect(&shared.settings, &format!("{} worker", shared.hostname)).await?;
    let conn = Arc::new(conn);
    let outcome = consume_on(shared, &conn, attempt).await;
    if outcome.is_err() {
        let close = conn.close(320, "worker reconnecting".into());
        let _ = tokio::time::timeout(Duration::from_secs(2), close).await;
    }
    outcome
}

async fn consume_on(
    shared: &Arc<Shared>,
    conn: &Arc<lapin::Connection>,
    attempt: &mut u32,
) -> Result<(), BrokerError> {
    let channel = conn.create_channel().await?;
    let quorum = shared.settings.quorum();
    let qos = if quorum { PER_CONSUMER } else { CHANNEL_WIDE };
    // Per-consumer QoS is fixed once a consumer starts: with quorum queues it cannot widen.
    let window = Window::for_settings(&shared.settings, quorum, true);
    channel
        .basic_qos(window.qos_of(window.count()), qos)
        .await?;
    window.report_to(&shared.node);
    if !quorum {
        tokio::spawn(follow_window(channel.clone(), window.clone()));
    }
    let rerouter = Arc::new(Rerouter::open(conn.clone(), QueueShape::of(&shared.settings)).await?);
    let control = conn.create_channel().await?;
    let listen = pidbox::listen(control, shared.node.clone());
    let hostname = shared.hostname.clone();
    tokio::spawn(async move {
        match listen.await {
            Err(e) if e.to_string().contains("RESOURCE_LOCKED") => tracing::warn!(
                node = %hostname,
                "DuplicateNodenameWarning: another running worker already has the node name \
                 {hostname} (its control queue is taken), so control commands sent to that name \
                 reach only the other one; this worker gets revokes through Redis within 10 s. \
                 Give each worker its own -n (the default, mediafarm.<pid>@<host>, is unique)"
            ),
            // The connection went: the next one listens again.
            Err(e) => tracing::debug!(error = %e, "control listener ended"),
            Ok(()) => {}
        }
    });
    // The queues to consume follow add_consumer / cancel_consumer, across reconnections too.
    let mut wanted = shared.node.watch_queues();
    let queues = wanted.borrow_and_update().clone();
    let mut deliveries = select_all(Vec::new());
    let mut tags = HashMap::with_capacity(queues.len());
    for queue in &queues {
        let (tag, consumer) = start_consuming(shared, &channel, queue).await?;
        tags.insert(queue.clone(), tag);
        deliveries.push(consumer);
    }
    *attempt = 0;
    shared.readiness.broker.store(true, Ordering::Relaxed);
    shared.readiness.consuming.store(true, Ordering::Relaxed);
    shared
        .metrics
        .up
        .get_or_create(&WorkerLabels {
            hostname: host_label(&shared.hostname),
        })
        .set(1);
    tracing::info!(?queues, "consuming");
    let outcome = loop {
        tokio::select! {
            biased;
            _ = shared.stop.cancelled() => break Ok(()),
            changed = wanted.changed() => {
                if changed.is_err() {
                    continue;
                }
                let now = wanted.borrow_and_update().clone();
                if let Err(e) = follow_queues(shared, &channel, &now, &mut tags, &mut deliveries).await {
                    break Err(e);
                }
            }
            next = deliveries.next(), if !deliveries.is_empty() => match next {
                Some((queue, Ok(delivery))) => {
                    let incoming = Incoming {
                        delivery,
                        queue,
                        received_at: Instant::now(),
                        via: Via::Amqp(rerouter.clone()),
                        seat: Seat::new(&window),
                    };
                    shared.jobs.spawn(message::handle(shared.clone(), incoming));
                }
                Some((_, Err(e))) => break Err(BrokerError::from(e)),
                // Every consumer was cancelled on request: wait for a queue to be added.
                None if tags.is_empty() => {}
                None => break Err(BrokerError::Amqp(lapin::Error::from(lapin::ErrorKind::InvalidConnectionState(
                    lapin::ConnectionState::Closed,
                )))),
            }
        }
    };
    if outcome.is_ok() {
        shared.readiness.consuming.store(false, Ordering::Relaxed);
        for tag in tags.values() {
            let cancel = channel.basic_cancel(tag.as_str().into(), BasicCancelOptions::default());
            bounded("cancelling a consumer", cancel).await;
        }
        // Jobs still waiting for a slot see the stop and return their messages; running
        // jobs need this connection to acknowledge, so it stays open while they drain.
        drain(shared).await;
        bounded(
            "closing the channel",
            channel.close(200, "worker stopping".into()),
        )
        .await;
        bounded(
            "closing the connection",
            conn.close(200, "worker stopping".into()),
        )
        .await;
    }
    outcome
}

/// Keeps the channel's `basic.qos` at the window's size as finishing jobs widen and narrow it
/// ([`Window`]), and reports each size *queued* on the channel, which a job that narrowed it
/// waits for before its ack. Queued is enough: lapin sends a channel's frames in the order they
/// were queued, and RabbitMQ handles them in that order (a global `basic.qos` is set in the
/// channel's limiter before the next frame is read), so an ack queued after the narrower size
/// is counted against it. Waiting for `qos-ok` instead cost every narrowing ack a round trip.
/// Several `basic.qos` may be in flight; their `qos-ok`s are awaited here. Ends when the
/// channel fails (the connection is replaced with a window of its own) or when the window is
/// gone (its connection's jobs have all ended).
async fn follow_window(channel: lapin::Channel, window: Arc<Window>) {
    let mut changes = window.watch();
    let mut queued = window.qos_of(window.count());
    // Holding the window here would keep it alive for ever: follow it through the receiver.
    let weak = Arc::downgrade(&window);
    drop(window);
    let mut replies = futures_util::stream::FuturesUnordered::new();
    let failed = |e: lapin::Error| {
        tracing::debug!(error = %e, "could not change the prefetch window; the channel is gone");
        if let Some(window) = weak.upgrade() {
            window.not_applied_any_more();
        }
    };
    loop {
        tokio::select! {
            changed = changes.changed() => {
                if changed.is_err() {
                    break;
                }
                let Some(window) = weak.upgrade() else {
                    break;
                };
                let count = *changes.borrow_and_update();
                let size = window.qos_of(count);
                if size != queued {
                    // lapin queues the frame when the call is first polled.
                    let mut qos = Box::pin(channel.basic_qos(size, CHANNEL_WIDE));
                    match (&mut qos).now_or_never() {
                        Some(Err(e)) => {
                            drop(window);
                            failed(e);
                            break;
                        }
                        Some(Ok(())) => {}
                        None => replies.push(qos),
                    }
                    queued = size;
                }
                window.applied(count.changes);
            }
            Some(reply) = replies.next(), if !replies.is_empty() => {
                if let Err(e) = reply {
                    failed(e);
                    break;
                }
            }
        }
    }
}

type Deliveries = futures_util::stream::BoxStream<
    'static,
    (String, Result<lapin::message::Delivery, lapin::Error>),
>;

/// Declares `queue` as kombu does and consumes it; returns the consumer tag and its stream.
async fn start_consuming(
    shared: &Shared,
    channel: &lapin::Channel,
    queue: &str,
) -> Result<(String, Deliveries), BrokerError> {
    broker::declare_queue(channel, queue, &QueueShape::of(&shared.settings)).await?;
    let tag = format!(
        "{}-{}-{}",
        shared.hostname,
        queue,
        uuid::Uuid::new_v4().simple()
    );
    let consumer = channel
        .basic_consume(
            queue.into(),
            tag.as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    // Every series exists from the start (at 0), so dashboards show zero, not "no data".
    for task in shared.registry.names() {
        shared.metrics_for(task, queue);
    }
    let queue = queue.to_owned();
    Ok((tag, consumer.map(move |d| (queue.clone(), d)).boxed()))
}

/// Starts consumers for queues newly wanted and cancels those no longer wanted (their
/// streams end; deliveries already received still run).
async fn follow_queues(
    shared: &Shared,
    channel: &lapin::Channel,
    wanted: &[String],
    tags: &mut HashMap<String, String>,
    deliveries: &mut futures_util::stream::SelectAll<Deliveries>,
) -> Result<(), BrokerError> {
    let gone: Vec<String> = tags
        .keys()
        .filter(|q| !wanted.contains(q))
        .cloned()
        .collect();
    for queue in gone {
        if let Some(tag) = tags.remove(&queue) {
            channel
                .basic_cancel(tag.as_str().into(), BasicCancelOptions::default())
                .await?;
            tracing::info!(%queue, "no longer consuming");
        }
    }
    for queue in wanted {
        if tags.contains_key(queue) {
            continue;
        }
        match start_consuming(shared, channel, queue).await {
            Ok((tag, consumer)) => {
                tags.insert(queue.clone(), tag);
                deliveries.push(consumer);
                tracing::info!(%queue, "consuming");
            }
            // A queue RabbitMQ refuses closes the channel: forget it rather than retry forever.
            Err(e) => {
                tracing::warn!(%queue, error = %e, "could not consume the queue asked for");
                shared.node.remove_queue(queue);
                return Err(e);
            }
        }
    }
    Ok(())
}

/// Prefetch is channel-wide (RabbitMQ's `global` QoS, as Celery sets it), so a worker on
/// several queues holds `concurrency × multiplier` messages in all, not per queue.
const CHANNEL_WIDE: BasicQosOptions = BasicQosOptions { global: true };

/// Quorum queues refuse consumers on a channel with global QoS, so with
/// `task_default_queue_type = "quorum"` prefetch is per consumer, as Celery does then
/// (`worker_detect_quorum_queues`): a worker holds `concurrency × multiplier` per queue.
const PER_CONSUMER: BasicQosOptions = BasicQosOptions { global: false };

#[cfg(test)]
mod tests {
    use super::expand_node_name;

    #[test]
    fn node_names_expand_like_celerys() {
        let host = "web-1.prod.example";
        assert_eq!(
            expand_node_name("image@%h", host),
            "image@web-1.prod.example"
        );
        assert_eq!(
            expand_node_name("%n-worker.%d", host),
            "web-1-worker.prod.example"
        );
        assert_eq!(expand_node_name("100%% %x %", "h"), "100% %x %");
    }

    #[test]
    fn default_node_names_differ_between_workers_of_one_process() {
        let pid = std::process::id();
        let a = super::default_node_name("h");
        let b = super::default_node_name("h");
        assert_ne!(a, b);
        for name in [&a, &b] {
            assert!(
                name.starts_with(&format!("mediafarm.{pid}")) && name.ends_with("@h"),
                "{name}"
            );
        }
    }
}

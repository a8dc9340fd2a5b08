//! The worker runtime: consume from RabbitMQ with prefetch = concurrency × multiplier, run each
//! job through the registry with at most `concurrency` at once, store its result, and only then
//! acknowledge. Bad messages get a FAILURE result (when their id is known) and are rejected;
//! the worker keeps going. Connection loss is retried with backoff. On stop: cancel the
//! consumers, let running jobs finish within the grace period, return the rest to the broker.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::stream::{select_all, StreamExt};
use futures_util::FutureExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
    BasicRejectOptions,
};
use lapin::types::FieldTable;
use serde_json::json;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::amqp_table::read_properties;
use crate::backend::{BackendError, ResultBackend};
use crate::broker::{self, backoff, BrokerError};
use crate::cpu::{panic_message, CpuPool};
use crate::http::{self, Readiness};
use crate::metrics::{host_label, Metrics, TaskLabels, TaskMetrics, WorkerLabels};
use crate::protocol::{DecodeError, TaskMessage};
use crate::result::{ResultMeta, TaskError, TaskState};
use crate::settings::Settings;
use crate::task::{Registry, TaskContext};
use prometheus_client::metrics::gauge::Gauge;

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
    stop: CancellationToken,
    done: tokio::task::JoinHandle<()>,
}

impl WorkerHandle {
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
}

struct Shared {
    settings: Settings,
    registry: Registry,
    backend: ResultBackend,
    cpu: CpuPool,
    metrics: Metrics,
    readiness: Arc<Readiness>,
    hostname: Arc<str>,
    slots: Arc<Semaphore>,
    stop: CancellationToken,
    jobs: TaskTracker,
    /// Metric handles by queue, then task name.
    task_metrics: Mutex<HashMap<String, HashMap<String, TaskMetrics>>>,
    active: Gauge,
}

impl Shared {
    fn metrics_for(&self, task: &str, queue: &str) -> TaskMetrics {
        let mut cache = self.task_metrics.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(m) = cache.get(queue).and_then(|by_task| by_task.get(task)) {
            return m.clone();
        }
        let m = self.metrics.task(&TaskLabels {
            name: task.to_owned(),
            hostname: host_label(&self.hostname),
            queue_name: queue.to_owned(),
        });
        cache
            .entry(queue.to_owned())
            .or_default()
            .insert(task.to_owned(), m.clone());
        m
    }
}

impl Worker {
    pub fn new(settings: Settings, registry: Registry, queues: Vec<String>) -> Worker {
        Worker {
            hostname: format!("mediafarm@{}", crate::hostname()),
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
        // Parse the broker URL now, so a bad one stops start-up instead of being retried.
        broker::parse_url(&self.settings.broker_url, self.settings.broker_heartbeat)?;
        let backend = ResultBackend::connect(
            &self.settings.result_backend,
            self.settings.result_expires_secs(),
        )
        .await?;
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
        let shared = Arc::new(Shared {
            task_metrics: Mutex::new(HashMap::new()),
            active,
            slots: Arc::new(Semaphore::new(self.settings.worker_concurrency)),
            settings: self.settings,
            registry: self.registry,
            backend,
            cpu: CpuPool::per_core(),
            metrics: self.metrics,
            readiness,
            hostname,
            stop: stop.clone(),
            jobs: TaskTracker::new(),
        });
        if shared.settings.task_soft_time_limit.is_some() {
            tracing::warn!(
                "task_soft_time_limit is set but not enforced yet: jobs are stopped only at \
                 task_time_limit (the hard limit)"
            );
        }
        tracing::info!(
            hostname = %shared.hostname,
            queues = ?self.queues,
            tasks = ?shared.registry.names(),
            concurrency = shared.settings.worker_concurrency,
            prefetch = shared.settings.prefetch_count(),
            %metrics_addr,
            "worker starting"
        );
        let queues = self.queues;
        let done = tokio::spawn(async move {
            tokio::spawn(watch_backend(shared.clone()));
            consume_until_stopped(shared.clone(), &queues).await;
            http_stop.cancel();
        });
        Ok(WorkerHandle {
            metrics_addr,
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

/// Keeps `/readyz` honest about Redis.
async fn watch_backend(shared: Arc<Shared>) {
    while !shared.stop.is_cancelled() {
        let ok = tokio::time::timeout(Duration::from_secs(2), shared.backend.ping())
            .await
            .is_ok_and(|r| r.is_ok());
        shared.readiness.backend.store(ok, Ordering::Relaxed);
        tokio::select! {
            _ = shared.stop.cancelled() => break,
            _ = tokio::time::sleep(Duration::from_secs(2)) => {},
        }
    }
}

/// Reconnects with backoff until stopped.
async fn consume_until_stopped(shared: Arc<Shared>, queues: &[String]) {
    let up = WorkerLabels {
        hostname: host_label(&shared.hostname),
    };
    let mut attempt = 0;
    loop {
        match consume(&shared, queues, &mut attempt).await {
            Ok(()) => break,
            Err(e) => {
                shared.readiness.broker.store(false, Ordering::Relaxed);
                shared.readiness.consuming.store(false, Ordering::Relaxed);
                shared.metrics.up.get_or_create(&up).set(0);
                let wait = backoff(attempt);
                attempt = attempt.saturating_add(1);
                tracing::warn!(error = %e, retry_in = ?wait, "broker connection lost; reconnecting");
                tokio::select! {
                    _ = shared.stop.cancelled() => break,
                    _ = tokio::time::sleep(wait) => {},
                }
            }
        }
    }
    shared.readiness.consuming.store(false, Ordering::Relaxed);
    shared.metrics.up.get_or_create(&up).set(0);
    drain(&shared).await;
}

/// Waits for running jobs within the grace period; what is left returns to the broker when
/// the connection closes.
async fn drain(shared: &Shared) {
    shared.jobs.close();
    let grace = shared.settings.worker_shutdown_grace;
    if tokio::time::timeout(grace, shared.jobs.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            still_running = shared.jobs.len(),
            ?grace,
            "grace period over; unfinished jobs return to the broker"
        );
    }
}

/// One connection's life: declare, consume, dispatch. `Ok` means stopped on request.
async fn consume(
    shared: &Arc<Shared>,
    queues: &[String],
    attempt: &mut u32,
) -> Result<(), BrokerError> {
    let conn = broker::connect(&shared.settings, &format!("{} worker", shared.hostname)).await?;
    let channel = conn.create_channel().await?;
    channel
        .basic_qos(shared.settings.prefetch_count(), CHANNEL_WIDE)
        .await?;
    let prefetch = Arc::new(Prefetch {
        channel: channel.clone(),
        base: shared.settings.prefetch_count(),
        held: tokio::sync::Mutex::new(0),
    });
    let mut consumers = Vec::with_capacity(queues.len());
    let mut tags = Vec::with_capacity(queues.len());
    for queue in queues {
        broker::declare_queue(&channel, queue).await?;
        let tag = format!(
            "{}-{}-{}",
            shared.hostname,
            queue,
            uuid::Uuid::new_v4().simple()
        );
        let consumer = channel
            .basic_consume(
                queue.as_str().into(),
                tag.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        tags.push(tag);
        consumers.push(consumer);
    }
    *attempt = 0;
    // Every series exists from the start (at 0), so dashboards show zero, not "no data".
    for queue in queues {
        for task in shared.registry.names() {
            shared.metrics_for(task, queue);
        }
    }
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
    let mut deliveries = select_all(consumers);
    let outcome = loop {
        tokio::select! {
            biased;
            _ = shared.stop.cancelled() => break Ok(()),
            next = deliveries.next() => match next {
                Some(Ok(delivery)) => {
                    let shared2 = shared.clone();
                    shared.jobs.spawn(handle_delivery(shared2, delivery, prefetch.clone()));
                }
                Some(Err(e)) => break Err(BrokerError::from(e)),
                None => break Err(BrokerError::Amqp(lapin::Error::from(lapin::ErrorKind::InvalidConnectionState(
                    lapin::ConnectionState::Closed,
                )))),
            }
        }
    };
    if outcome.is_ok() {
        shared.readiness.consuming.store(false, Ordering::Relaxed);
        for tag in &tags {
            let _ = channel
                .basic_cancel(tag.as_str().into(), BasicCancelOptions::default())
                .await;
        }
        // Jobs still waiting for a slot see the stop and return their messages; running
        // jobs need this connection to acknowledge, so it stays open while they drain.
        drain(shared).await;
        let _ = channel.close(200, "worker stopping".into()).await;
        let _ = conn.close(200, "worker stopping".into()).await;
    }
    outcome
}

async fn handle_delivery(shared: Arc<Shared>, delivery: Delivery, prefetch: Arc<Prefetch>) {
    let queue = delivery.routing_key.as_str().to_owned();
    let (props, headers) = read_properties(&delivery.properties);
    let mut msg = match TaskMessage::decode(
        &props,
        &headers,
        &delivery.data,
        shared.settings.task_message_max_bytes,
    ) {
        Ok(msg) => msg,
        Err(e) => return refuse(&shared, &delivery, &queue, e).await,
    };
    if !shared.registry.contains(&msg.task) {
        let reason = format!(
            "unknown task {:?}: this worker runs {}",
            msg.task,
            shared.registry.names().join(", ")
        );
        let e = DecodeError {
            id: Some(msg.id.clone()),
            task: Some(msg.task.clone()),
            reason,
        };
        return refuse(&shared, &delivery, &queue, e).await;
    }
    let l = shared.metrics_for(&msg.task, &queue);
    l.received.inc();
    if msg.is_expired(chrono::Utc::now()) {
        return expire(&shared, &delivery, &msg, &l).await;
    }
    if let Some(eta) = msg.eta {
        // Countdown held in this worker until the fault-tolerance work moves delays to the
        // broker; a stop returns the message unharmed.
        let wait = (eta - chrono::Utc::now()).to_std().unwrap_or_default();
        if !wait.is_zero() {
            prefetch.hold().await;
            let stopped = tokio::select! {
                _ = shared.stop.cancelled() => true,
                _ = tokio::time::sleep(wait) => false,
            };
            prefetch.release().await;
            if stopped {
                return requeue(&delivery).await;
            }
            if msg.is_expired(chrono::Utc::now()) {
                return expire(&shared, &delivery, &msg, &l).await;
            }
        }
    }
    let _slot = tokio::select! {
        biased;
        _ = shared.stop.cancelled() => return requeue(&delivery).await,
        permit = shared.slots.clone().acquire_owned() => match permit {
            Ok(p) => p,
            Err(_) => return requeue(&delivery).await,
        },
    };
    run_job(&shared, &delivery, &mut msg, &l).await;
}

async fn expire(shared: &Shared, delivery: &Delivery, msg: &TaskMessage, l: &TaskMetrics) {
    tracing::info!(id = %msg.id, task = %msg.task, "expired before it ran; not running it");
    l.revoked.inc();
    let meta = ResultMeta::revoked(&msg.id, "expired");
    finish(shared, delivery, msg, meta).await;
}

async fn run_job(
    shared: &Arc<Shared>,
    delivery: &Delivery,
    msg: &mut TaskMessage,
    l: &TaskMetrics,
) {
    l.started.inc();
    shared.active.inc();
    if shared.settings.task_track_started {
        let started = ResultMeta::new(
            &msg.id,
            TaskState::Started,
            json!({"pid": std::process::id(), "hostname": &*shared.hostname}),
        );
        if let Err(e) = shared.backend.store(&started).await {
            tracing::warn!(id = %msg.id, error = %e, "could not store STARTED");
        }
    }
    let ctx = TaskContext::new(
        msg.id.clone(),
        msg.task.clone(),
        msg.retries,
        shared.hostname.clone(),
        shared.backend.clone(),
        shared.cpu.clone(),
    );
    let began = Instant::now();
    let extended = shared.settings.result_extended.then(|| {
        json!({
            "name": msg.task,
            "args": msg.args,
            "kwargs": msg.kwargs,
            "worker": &*shared.hostname,
            "retries": msg.retries,
            "queue": delivery.routing_key.as_str(),
        })
    });
    let (args, kwargs) = (
        std::mem::take(&mut msg.args),
        std::mem::take(&mut msg.kwargs),
    );
    let outcome = match shared.registry.call(&msg.task, ctx, args, kwargs) {
        Some(job) => run_with_limit(job, hard_limit(shared, msg)).await,
        None => Err(TaskError::permanent(
            "NotRegistered",
            format!("task {} is not registered", msg.task),
        )),
    };
    let elapsed = began.elapsed();
    l.runtime.observe(elapsed.as_secs_f64());
    shared.active.dec();
    let mut meta = match outcome {
        Ok(value) => {
            l.succeeded.inc();
            tracing::debug!(id = %msg.id, task = %msg.task, ?elapsed, "succeeded");
            ResultMeta::success(&msg.id, value)
        }
        Err(e) => {
            l.failed(&e.exc_type);
            tracing::warn!(id = %msg.id, task = %msg.task, error = %e, ?elapsed, "failed");
            ResultMeta::failure(&msg.id, &e, traceback(shared, &msg.task, &msg.id, &e))
        }
    };
    if let Some(serde_json::Value::Object(fields)) = extended {
        meta.extra.extend(fields);
    }
    finish(shared, delivery, msg, meta).await;
}

/// Prefetch is channel-wide (RabbitMQ's `global` QoS, as Celery sets it), so a worker on
/// several queues holds `concurrency × multiplier` messages in all, not per queue.
const CHANNEL_WIDE: BasicQosOptions = BasicQosOptions { global: true };

/// Raises the channel's prefetch by one for each job held waiting for its ETA, as Celery
/// does, so waiting jobs never take the places of ready ones.
struct Prefetch {
    channel: lapin::Channel,
    base: u16,
    held: tokio::sync::Mutex<u16>,
}

impl Prefetch {
    async fn hold(&self) {
        let mut held = self.held.lock().await;
        *held = held.saturating_add(1);
        self.apply(*held).await;
    }

    async fn release(&self) {
        let mut held = self.held.lock().await;
        *held = held.saturating_sub(1);
        self.apply(*held).await;
    }

    async fn apply(&self, held: u16) {
        let count = self.base.saturating_add(held);
        if let Err(e) = self.channel.basic_qos(count, CHANNEL_WIDE).await {
            tracing::warn!(error = %e, count, "could not change prefetch");
        }
    }
}

fn hard_limit(shared: &Shared, msg: &TaskMessage) -> Option<Duration> {
    msg.timelimit
        .hard
        .map(Duration::from_secs_f64)
        .or(shared.settings.task_time_limit)
}

/// Runs the job under the hard time limit; a panic inside it becomes an `InternalError`
/// instead of taking the worker down.
async fn run_with_limit(
    job: crate::task::BoxFuture<Result<serde_json::Value, TaskError>>,
    limit: Option<Duration>,
) -> Result<serde_json::Value, TaskError> {
    let guarded = std::panic::AssertUnwindSafe(job).catch_unwind();
    let outcome = match limit {
        Some(limit) => match tokio::time::timeout(limit, guarded).await {
            Ok(outcome) => outcome,
            Err(_) => {
                return Err(TaskError::permanent(
                    "TimeLimitExceeded",
                    format!(
                        "job ran longer than its hard time limit of {} s",
                        limit.as_secs_f64()
                    ),
                )
                .in_module("celery.exceptions"))
            }
        },
        None => guarded.await,
    };
    outcome.unwrap_or_else(|payload| {
        Err(TaskError::permanent(
            "InternalError",
            format!("the task crashed: {}", panic_message(payload.as_ref())),
        ))
    })
}

fn traceback(shared: &Shared, task: &str, id: &str, e: &TaskError) -> String {
    format!(
        "{}.{}: {}\n  in task {task}[{id}] on {} (mediafarm {})",
        e.exc_module,
        e.exc_type,
        e.message,
        shared.hostname,
        env!("CARGO_PKG_VERSION")
    )
}

/// A message that cannot run: store FAILURE where the producer will look, then reject it.
async fn refuse(shared: &Shared, delivery: &Delivery, queue: &str, e: DecodeError) {
    let task = e.task.clone().unwrap_or_else(|| "unknown".into());
    // Only registered names become metric labels: names from the wire are unbounded.
    let label = if shared.registry.contains(&task) {
        task.as_str()
    } else {
        "unknown"
    };
    shared.metrics_for(label, queue).rejected.inc();
    tracing::error!(id = ?e.id, task = %task, reason = %e.reason, "rejecting message");
    if let Some(id) = &e.id {
        let error = TaskError::invalid(
            if e.reason.starts_with("unknown task") {
                "NotRegistered"
            } else {
                "InvalidMessage"
            },
            e.reason.clone(),
        );
        let meta = ResultMeta::failure(id, &error, traceback(shared, &task, id, &error));
        if !store_with_retry(shared, &meta).await {
            return requeue(delivery).await;
        }
    }
    if let Err(err) = delivery
        .acker
        .reject(BasicRejectOptions { requeue: false })
        .await
    {
        tracing::warn!(error = %err, "could not reject message; the broker will redeliver it");
    }
}

/// Stores the result, then acknowledges. If the result cannot be stored the message goes
/// back to the broker: nothing is acknowledged before its result is stored.
async fn finish(shared: &Shared, delivery: &Delivery, msg: &TaskMessage, meta: ResultMeta) {
    let store = !msg.ignore_result || meta.status != TaskState::Success;
    if store && !store_with_retry(shared, &meta).await {
        return requeue(delivery).await;
    }
    if let Err(e) = delivery.acker.ack(BasicAckOptions::default()).await {
        tracing::warn!(id = %msg.id, error = %e, "ack failed after the result was stored; the broker may redeliver");
    }
}

/// Retries a result write with backoff for about a minute (longer with a stop pending only
/// up to the grace period).
async fn store_with_retry(shared: &Shared, meta: &ResultMeta) -> bool {
    for attempt in 0..12u32 {
        match shared.backend.store(meta).await {
            Ok(()) => return true,
            Err(e) => {
                shared.readiness.backend.store(false, Ordering::Relaxed);
                tracing::warn!(id = %meta.task_id, error = %e, attempt, "storing result failed; retrying");
                tokio::time::sleep(backoff(attempt)).await;
            }
        }
    }
    tracing::error!(id = %meta.task_id, "result could not be stored; returning the message to the broker");
    false
}

async fn requeue(delivery: &Delivery) {
    let _ = delivery
        .acker
        .nack(BasicNackOptions {
            requeue: true,
            multiple: false,
        })
        .await;
}

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
}

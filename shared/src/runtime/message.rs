//! One delivery's life inside a worker: decode it, skip it if revoked, expired or already
//! done, send it to a delay queue while its ETA is ahead, run it under its time limits, then
//! store the outcome (SUCCESS, RETRY with a delayed copy, FAILURE with a dead letter, REVOKED),
//! join its chord if it is a chord header, and only then acknowledge. When the outcome cannot be stored or published, the message goes
//! back to the broker instead: nothing is acknowledged before its result is safe.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::Utc;
use futures_util::FutureExt;
use lapin::message::Delivery;
use lapin::types::AMQPValue;
use prometheus_client::metrics::gauge::Gauge;
use serde_json::{json, Value};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::amqp::broker::{backoff, Publisher};
use crate::amqp::pidbox::Node;
use crate::amqp::reroute::{time_header, DeadReason, MIN_DELAY};
use crate::amqp::table::{read_job_properties, read_properties};
use crate::backend::chord::{self as backend_chord, PartReturn, TakeOver};
use crate::backend::result::{FailureKind, ResultMeta, TaskError, TaskState};
use crate::backend::ResultBackend;
use crate::canvas::{self, chord, Canvas, ChordPart, Parent, Publish};
use crate::events::{Events, Load};
use crate::observe::http::Readiness;
use crate::observe::metrics::{host_label, Metrics, TaskLabels, TaskMetrics};
use crate::observe::trace;
use crate::protocol::{DecodeError, TaskMessage};
use crate::runtime::cpu::{panic_message, CpuPool};
use crate::runtime::rate::{Admission, RateLimits};
use crate::runtime::task::{Registry, Services, TaskContext, TaskPolicy};
use crate::runtime::transport::Via;
use crate::runtime::window::Seat;
use crate::settings::Settings;

/// What every job of a worker shares.
pub(crate) struct Shared {
    pub settings: Settings,
    pub registry: Registry,
    pub backend: ResultBackend,
    /// Publishes what jobs send on (continuations), with confirms; connects on first use.
    pub publisher: Publisher,
    pub cpu: CpuPool,
    pub metrics: Metrics,
    pub readiness: Arc<Readiness>,
    pub hostname: Arc<str>,
    pub slots: Arc<Semaphore>,
    /// Per-task rate limits: a limited job waits on its task's bucket before asking for a slot.
    pub rates: Arc<RateLimits>,
    pub stop: CancellationToken,
    pub jobs: TaskTracker,
    /// The tasks' background work (`runtime::background`), awaited on stop with the jobs.
    pub background: TaskTracker,
    /// What the mailbox shows and changes: the revoked set, held jobs, queues, time limits set
    /// at run time.
    pub node: Arc<Node>,
    /// Metric handles by queue, then task name.
    pub task_metrics: Mutex<HashMap<String, HashMap<String, TaskMetrics>>>,
    pub active: Gauge,
    /// Celery's events and their switch (`enable_events`, `disable_events`, `heartbeat`).
    pub events: Arc<Events>,
}

impl Shared {
    /// What a heartbeat reports: jobs running now, and jobs started since the worker began
    /// (summed from the started counters when a heartbeat is due, so jobs pay nothing for it).
    pub fn load(&self) -> Load {
        let cache = self.task_metrics.lock().unwrap_or_else(|e| e.into_inner());
        let processed = cache
            .values()
            .flat_map(|by_task| by_task.values())
            .map(|m| m.started.get())
            .sum();
        Load {
            active: u64::try_from(self.active.get()).unwrap_or(0),
            processed,
        }
    }

    pub fn metrics_for(&self, task: &str, queue: &str) -> TaskMetrics {
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

/// A delivery and where it came from. A message from Redis is read into the same AMQP
/// delivery shape (properties, headers, body), so everything here is broker-blind but the
/// steps in [`crate::runtime::transport`].
pub(crate) struct Incoming {
    pub delivery: Delivery,
    pub queue: String,
    pub received_at: Instant,
    pub via: Via,
    /// The message's seat in the prefetch window it was delivered in: lent out while the job
    /// finishes, taken back before the message is acknowledged or returned.
    pub seat: Seat,
}

/// Handles one delivery to its end. A panic anywhere on the way (decode, policy, limits, run,
/// store) still ends the message: FAILURE `InternalError` where the producer looks, a dead
/// letter with the reason, then the ack — and if even that panics, the message is rejected
/// without requeue. No path leaves a message unacknowledged and unresolved.
pub(crate) async fn handle(shared: Arc<Shared>, job: Incoming) {
    let processed = AssertUnwindSafe(process(&shared, &job))
        .catch_unwind()
        .await;
    if let Err(payload) = processed {
        settle_after_panic(&shared, &job, panic_message(payload.as_ref())).await;
    }
}

async fn settle_after_panic(shared: &Shared, job: &Incoming, what: String) {
    let reason = format!(
        "mediafarm failed while handling this message (a bug: please report it with this \
         text): {what}"
    );
    tracing::error!(queue = %job.queue, %reason, "a message's handling panicked; failing it");
    let (id, task) = std::panic::catch_unwind(AssertUnwindSafe(|| {
        let (props, headers) = read_properties(&job.delivery.properties);
        let text = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.as_str())
                .map(str::to_owned)
        };
        (text("id").or(props.correlation_id), text("task"))
    }))
    .unwrap_or_default();
    let e = DecodeError { id, task, reason };
    let settled = AssertUnwindSafe(refuse(shared, job, "InternalError", e, None))
        .catch_unwind()
        .await;
    if settled.is_err() {
        tracing::error!(queue = %job.queue, "failing the message panicked too; rejecting it without requeue");
        job.reject_without_requeue().await;
    }
}

async fn process(shared: &Arc<Shared>, job: &Incoming) {
    let (props, headers) = match read_job_properties(&job.delivery.properties) {
        Ok(read) => read,
        Err(e) => return refuse(shared, job, "InvalidMessage", e, None).await,
    };
    let msg = match TaskMessage::decode(
        &props,
        &headers,
        &job.delivery.data,
        shared.settings.task_message_max_bytes,
    ) {
        Ok(msg) => msg,
        Err(e) => return refuse(shared, job, "InvalidMessage", e, None).await,
    };
    let Some(policy) = shared.registry.policy(&msg.task) else {
        let reason = format!(
            "unknown task {}: this worker runs {}",
            crate::protocol::preview_str(&msg.task),
            shared.registry.names().join(", ")
        );
        let e = DecodeError {
            id: Some(msg.id.clone()),
            task: Some(msg.task.clone()),
            reason,
        };
        return refuse(shared, job, "NotRegistered", e, Some(&msg)).await;
    };
    // Before anything else may end the job: a workflow it cannot carry on fails it now,
    // rather than running it and dropping the rest.
    let canvas = match Canvas::from_message(&msg) {
        Ok(canvas) => canvas,
        Err(e) => {
            let kind = e.exc_type();
            let e = DecodeError {
                id: Some(msg.id.clone()),
                task: Some(msg.task.clone()),
                reason: e.to_string(),
            };
            return refuse(shared, job, kind, e, Some(&msg)).await;
        }
    };
    let l = shared.metrics_for(&msg.task, &job.queue);
    let waited = msg.eta.is_some() || msg.retries > 0;
    if shared.node.revocations.is_revoked(&msg.id)
        || (waited
            && shared
                .node
                .revocations
                .check_stored(&shared.backend, &msg.id)
                .await)
    {
        shared.events.task_revoked(&msg.id, false, false);
        return revoked(shared, job, &msg, &canvas, &l, "revoked before it ran").await;
    }
    if msg.is_expired(Utc::now()) {
        return expire(shared, job, &msg, &canvas, &l).await;
    }
    if job.delivery.redelivered && already_done(shared, job, &msg, &canvas).await {
        return;
    }
    let tracked = shared.node.jobs.received(&msg, &job.delivery);
    if let Some(eta) = msg.eta {
        let remaining = (eta - Utc::now()).to_std().unwrap_or_default();
        if remaining >= MIN_DELAY {
            return delay(shared, job, &msg, remaining).await;
        }
        if !remaining.is_zero() {
            // Under the shortest delay bucket: not worth a trip through the broker.
            tokio::select! {
                _ = shared.stop.cancelled() => return job.requeue().await,
                _ = tokio::time::sleep(remaining) => {},
            }
            tracked.reserved();
        }
    }
    // Counted once per job, not once per hop through the delay queues (a job parked by its
    // rate limit, rarely, is counted again when it comes back).
    l.received.inc();
    shared.events.task_received(&msg);
    let mut policy = policy;
    if let Some((soft, hard)) = shared.node.time_limit(&msg.task) {
        (policy.soft_time_limit, policy.time_limit) = (soft, hard);
    }
    let limits = Limits::for_job(&shared.settings, &msg, &policy);
    if let Some(bucket) = shared.rates.bucket(&msg.task) {
        let latest = limits.latest_start(&shared.settings, job.received_at);
        match bucket.admit(latest, &shared.stop).await {
            Admission::Go => {}
            Admission::Stopped => return give_back(shared, job, &msg).await,
            Admission::Late { wait } => {
                tracing::info!(
                    id = %msg.id,
                    task = %msg.task,
                    ?wait,
                    "the task's rate limit would start this job too late to be acknowledged \
                     before RabbitMQ's consumer_timeout; parking it in a delay queue"
                );
                return delay(shared, job, &msg, wait.max(MIN_DELAY)).await;
            }
        }
    }
    let slot = tokio::select! {
        biased;
        _ = shared.stop.cancelled() => return give_back(shared, job, &msg).await,
        permit = shared.slots.clone().acquire_owned() => match permit {
            Ok(p) => p,
            Err(_) => return give_back(shared, job, &msg).await,
        },
    };
    if !limits.fits_ack_deadline(&shared.settings, job.received_at.elapsed()) {
        tracing::warn!(
            id = %msg.id,
            waited = ?job.received_at.elapsed(),
            hard_limit = ?limits.hard,
            "job waited so long for a slot that it could not finish before RabbitMQ's \
             consumer_timeout; returning it to the queue"
        );
        return give_back(shared, job, &msg).await;
    }
    tracked.started();
    let span = trace::JobSpan::start(trace::JobInfo {
        task: &msg.task,
        id: &msg.id,
        queue: &job.queue,
        retries: msg.retries,
        hostname: &shared.hostname,
        headers: &msg.extra_headers,
    });
    span.run(run(shared, job, msg, canvas, &l, policy, limits, slot))
        .await;
}

/// A message redelivered after its result was stored (its worker died before the ack): do not
/// run it again. Only redelivered messages pay for this lookup.
async fn already_done(shared: &Shared, job: &Incoming, msg: &TaskMessage, canvas: &Canvas) -> bool {
    let meta = match shared.backend.get(&msg.id).await {
        Ok(Some(meta)) if meta.status.is_ready() => meta,
        _ => return false,
    };
    tracing::info!(id = %msg.id, state = %meta.status, "redelivered job already has its result; not running it again");
    if meta.status == TaskState::Failure {
        // The worker died between storing FAILURE and dead-lettering: finish the dead letter.
        let error = meta
            .error()
            .unwrap_or_else(|| TaskError::permanent("Failed", "the job failed"));
        let why = dead_reason(shared, job, &error.exc_type, error.message.clone());
        // The errbacks may not have gone out either; they carry the same ids as before.
        let errbacks = canvas::on_failure(canvas, parent_of(msg), Utc::now());
        let ending = Ending {
            after: errbacks,
            chained: canvas.chain_failures(&meta),
            join: Join::of(canvas, msg, &meta),
            ..Ending::dead_only(why)
        };
        settle(shared, job, &msg.id, ending).await;
        return true;
    }
    // The chord may not have been joined yet; joining again counts nothing twice.
    let ending = Ending {
        join: Join::of(canvas, msg, &meta),
        ..Ending::ack_only()
    };
    settle(shared, job, &msg.id, ending).await;
    true
}

/// Effective time limits of one job.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Limits {
    pub hard: Duration,
    pub soft: Option<Duration>,
}

impl Limits {
    /// The message's `timelimit` header, else the task's own, else the settings; the hard
    /// limit is capped so the job is acknowledged before RabbitMQ's consumer_timeout.
    pub fn for_job(settings: &Settings, msg: &TaskMessage, policy: &TaskPolicy) -> Limits {
        // The protocol refuses limits out of range; this never panics on one that slipped by.
        let secs = |s: Option<f64>| {
            s.filter(|s| *s > 0.0)
                .and_then(|s| Duration::try_from_secs_f64(s).ok())
        };
        let longest = settings.longest_hard_limit();
        let hard = secs(msg.timelimit.hard)
            .or(policy.time_limit)
            .or(settings.task_time_limit)
            .unwrap_or(longest);
        if hard > longest {
            tracing::warn!(
                id = %msg.id,
                asked = ?hard,
                cap = ?longest,
                "hard time limit capped below broker_consumer_timeout"
            );
        }
        let hard = hard.min(longest);
        let soft = secs(msg.timelimit.soft)
            .or(policy.soft_time_limit)
            .or(settings.task_soft_time_limit)
            .filter(|soft| *soft < hard);
        Limits { hard, soft }
    }

    /// Whether a job that has already waited `waited` since delivery can still run to its hard
    /// limit and be acknowledged before the broker's delivery-ack timeout.
    pub fn fits_ack_deadline(&self, settings: &Settings, waited: Duration) -> bool {
        self.start_budget(settings)
            .is_some_and(|budget| waited <= budget)
    }

    /// The last moment a job delivered at `received_at` can start and still fit the ack
    /// deadline (see [`Limits::fits_ack_deadline`]).
    pub fn latest_start(&self, settings: &Settings, received_at: Instant) -> tokio::time::Instant {
        let budget = self.start_budget(settings).unwrap_or_default();
        tokio::time::Instant::from_std(received_at) + budget
    }

    /// How long after delivery a job may wait and still run to its hard limit and be
    /// acknowledged before the broker's delivery-ack timeout; `None`: not even at once.
    fn start_budget(&self, settings: &Settings) -> Option<Duration> {
        let deadline = settings
            .ack_timeout()
            .saturating_sub(settings.ack_deadline_margin() / 2);
        deadline.checked_sub(self.hard)
    }
}

/// How a job's run ended, before it is stored.
enum Ended {
    Done(Result<serde_json::Value, TaskError>),
    Terminated,
}

#[allow(clippy::too_many_arguments)]
async fn run(
    shared: &Arc<Shared>,
    job: &Incoming,
    mut msg: TaskMessage,
    canvas: Canvas,
    l: &TaskMetrics,
    policy: TaskPolicy,
    limits: Limits,
    slot: OwnedSemaphorePermit,
) {
    l.started.inc();
    shared.active.inc();
    shared.events.task_started(&msg.id);
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
    let services = Services {
        hostname: shared.hostname.clone(),
        backend: shared.backend.clone(),
        publisher: shared.publisher.clone(),
        cpu: shared.cpu.clone(),
    };
    let ctx = TaskContext::new(&msg, job.queue.as_str().into(), &services);
    let stop_signal = ctx.cancel_flag();
    let running = shared.readiness.running.start(&msg.id, limits.hard);
    let began = Instant::now();
    let extended = shared.settings.result_extended.then(|| {
        json!({
            "name": msg.task,
            "args": msg.args,
            "kwargs": msg.kwargs,
            "worker": &*shared.hostname,
            "retries": msg.retries,
            "queue": job.queue,
        })
    });
    let (args, kwargs) = (
        std::mem::take(&mut msg.args),
        std::mem::take(&mut msg.kwargs),
    );
    let terminate = shared.node.revocations.started(&msg.id);
    let ended = match shared.registry.call(&msg.task, ctx, args, kwargs) {
        Some(future) => {
            let guarded = std::panic::AssertUnwindSafe(future).catch_unwind();
            let soft = async {
                if let Some(soft) = limits.soft {
                    tokio::time::sleep(soft).await;
                    tracing::info!(id = %msg.id, ?soft, "soft time limit reached; the job is told to stop");
                    stop_signal.set();
                }
                std::future::pending::<Ended>().await
            };
            tokio::select! {
                outcome = guarded => Ended::Done(outcome.unwrap_or_else(|payload| {
                    Err(TaskError::permanent(
                        "InternalError",
                        format!("the task crashed: {}", panic_message(payload.as_ref())),
                    ))
                })),
                _ = tokio::time::sleep(limits.hard) => Ended::Done(Err(TaskError::permanent(
                    "TimeLimitExceeded",
                    format!(
                        "job ran longer than its hard time limit of {} s",
                        limits.hard.as_secs_f64()
                    ),
                )
                .in_module("celery.exceptions"))),
                _ = terminate.cancelled() => Ended::Terminated,
                never = soft => never,
            }
        }
        None => Ended::Done(Err(TaskError::permanent(
            "NotRegistered",
            format!("task {} is not registered", msg.task),
        ))),
    };
    drop(running);
    // Whatever still runs for this job (CPU work abandoned at the hard limit) is told to stop.
    stop_signal.set();
    shared.node.revocations.finished(&msg.id);
    let elapsed = began.elapsed();
    l.runtime.observe(elapsed.as_secs_f64());
    shared.active.dec();
    // The slot bounds how many jobs *run* at once. Publishing what follows, storing the outcome
    // and acknowledging are network waits: they go on without a slot, so a job waiting for a
    // publisher confirm or a Redis reply does not keep the next job from running; and on a
    // place lent by the prefetch window (up to its most), so it does not keep the next message
    // from being delivered either. The window narrows again just before the ack.
    drop(slot);
    job.seat.finishing();
    let outcome = match ended {
        Ended::Terminated => {
            shared.events.task_revoked(&msg.id, true, false);
            return revoked(shared, job, &msg, &canvas, l, "terminated while running").await;
        }
        Ended::Done(outcome) => outcome,
    };
    // Celery's order: what carries the workflow on is published before the result is stored
    // (so the record lists it as `children`); errbacks after the FAILURE is stored.
    let mut before = Vec::new();
    let mut sizes = Vec::new();
    let mut after = Vec::new();
    let mut chained = Vec::new();
    let (mut meta, dead) = match outcome {
        Ok(value) => {
            l.succeeded.inc();
            tracing::debug!(id = %msg.id, task = %msg.task, ?elapsed, "succeeded");
            shared.events.task_succeeded(&msg.id, &value, elapsed);
            let mut meta = ResultMeta::success(&msg.id, Value::Null);
            if !canvas.is_empty() {
                let mut next = canvas::on_success(&canvas, parent_of(&msg), &value, Utc::now());
                if shared.settings.task_inherit_parent_priority {
                    canvas::inherit_priority(&mut next.publish, msg.priority);
                }
                meta.children = next.children;
                before = next.publish;
                sizes = next.chord_sizes;
            }
            meta.result = value;
            (meta, None)
        }
        Err(e) => {
            if let FailureKind::Transient { retry_after } = e.kind {
                let max = policy
                    .max_retries
                    .unwrap_or(shared.settings.task_max_retries);
                if msg.retries < max {
                    return retry(shared, job, &msg, l, &e, retry_after).await;
                }
                let e = TaskError::permanent(
                    e.exc_type.clone(),
                    format!("{} (gave up after {} retries)", e.message, msg.retries),
                )
                .in_module(e.exc_module.clone());
                l.failed(&e.exc_type);
                tracing::warn!(id = %msg.id, task = %msg.task, error = %e, "failed; no retries left");
                let why = dead_reason(shared, job, "MaxRetriesExceeded", e.to_string());
                let meta = ResultMeta::failure(&msg.id, &e, traceback(shared, &msg, &e));
                shared
                    .events
                    .task_failed(&msg.id, &e, meta.traceback.as_deref().unwrap_or(""));
                after = canvas::on_failure(&canvas, parent_of(&msg), Utc::now());
                chained = canvas.chain_failures(&meta);
                (meta, Some(why))
            } else {
                l.failed(&e.exc_type);
                tracing::warn!(id = %msg.id, task = %msg.task, error = %e, ?elapsed, "failed");
                let why = dead_reason(shared, job, &e.exc_type, e.message.clone());
                let meta = ResultMeta::failure(&msg.id, &e, traceback(shared, &msg, &e));
                shared
                    .events
                    .task_failed(&msg.id, &e, meta.traceback.as_deref().unwrap_or(""));
                after = canvas::on_failure(&canvas, parent_of(&msg), Utc::now());
                chained = canvas.chain_failures(&meta);
                (meta, Some(why))
            }
        }
    };
    // As Celery's backend records them, so a reader can walk a workflow from any result.
    if let Some(group) = &msg.group {
        meta.extra
            .insert("group_id".into(), Value::String(group.clone()));
    }
    if let Some(parent) = &msg.parent_id {
        meta.extra
            .insert("parent_id".into(), Value::String(parent.clone()));
    }
    if let Some(serde_json::Value::Object(fields)) = extended {
        meta.extra.extend(fields);
    }
    let store = !msg.ignore_result || meta.status != TaskState::Success;
    let ending = Ending {
        before,
        sizes,
        after,
        chained,
        join: Join::of(&canvas, &msg, &meta),
        store: store.then_some(&meta),
        dead,
    };
    settle(shared, job, &msg.id, ending).await;
}

/// The delay before retry number `retries + 1`: the task's wish, else exponential backoff from
/// `task_default_retry_delay`, capped, with jitter over the upper half.
pub fn retry_delay(settings: &Settings, retries: u32, asked: Option<Duration>) -> Duration {
    if let Some(d) = asked {
        return d;
    }
    let base = settings.task_default_retry_delay.as_secs_f64();
    let cap = settings.task_retry_backoff_max.as_secs_f64();
    let full = (base * 2f64.powi(retries.min(60) as i32)).min(cap).max(0.0);
    let secs = if settings.task_retry_jitter {
        full / 2.0 + fastrand::f64() * full / 2.0
    } else {
        full
    };
    Duration::from_secs_f64(secs)
}

/// Stores RETRY, sends a copy with `retries + 1` and its new ETA into a delay queue, then acks.
async fn retry(
    shared: &Shared,
    job: &Incoming,
    msg: &TaskMessage,
    l: &TaskMetrics,
    e: &TaskError,
    asked: Option<Duration>,
) {
    let wait = retry_delay(&shared.settings, msg.retries, asked);
    let eta = Utc::now() + chrono::Duration::from_std(wait).unwrap_or_default();
    tracing::info!(id = %msg.id, task = %msg.task, error = %e, retry = msg.retries + 1, in_ = ?wait, "retrying");
    l.retried.inc();
    trace::retrying(&e.to_string());
    let mut meta = ResultMeta::new(&msg.id, TaskState::Retry, e.to_celery_json());
    meta.traceback = Some(traceback(shared, msg, e));
    shared
        .events
        .task_retried(&msg.id, e, meta.traceback.as_deref().unwrap_or(""));
    if !store_with_retry(shared, &meta).await {
        return job.requeue().await;
    }
    let headers = [
        (
            "retries",
            AMQPValue::LongLongInt(i64::from(msg.retries) + 1),
        ),
        ("eta", time_header(eta)),
    ];
    let sent = job.delay(wait, &headers).await;
    match sent {
        Ok(_) => ack(job, &msg.id).await,
        Err(err) => {
            tracing::warn!(id = %msg.id, error = %err, "could not send the retry; returning the message to the queue");
            requeue_after_pause(shared, job).await
        }
    }
}

/// The ETA is ahead: park the message in a delay queue and let it go.
async fn delay(shared: &Shared, job: &Incoming, msg: &TaskMessage, remaining: Duration) {
    match job.delay(remaining, &[]).await {
        Ok(hop) => {
            tracing::debug!(id = %msg.id, ?remaining, ?hop, "waiting for its ETA in the broker");
            ack(job, &msg.id).await
        }
        Err(e) => {
            tracing::warn!(id = %msg.id, error = %e, "could not delay the message; returning it to the queue");
            requeue_after_pause(shared, job).await
        }
    }
}

async fn expire(
    shared: &Shared,
    job: &Incoming,
    msg: &TaskMessage,
    canvas: &Canvas,
    l: &TaskMetrics,
) {
    tracing::info!(id = %msg.id, task = %msg.task, "expired before it ran; not running it");
    l.revoked.inc();
    shared.events.task_revoked(&msg.id, false, true);
    let meta = ResultMeta::revoked(&msg.id, "expired");
    let expires = msg
        .expires
        .map(crate::protocol::format_time)
        .unwrap_or_default();
    let why = dead_reason(
        shared,
        job,
        "Expired",
        format!("expired at {expires} before it ran"),
    );
    let ending = Ending {
        join: Join::of(canvas, msg, &meta),
        ..Ending::stored(&meta).dead(why)
    };
    settle(shared, job, &msg.id, ending).await;
}

async fn revoked(
    shared: &Shared,
    job: &Incoming,
    msg: &TaskMessage,
    canvas: &Canvas,
    l: &TaskMetrics,
    how: &str,
) {
    tracing::info!(id = %msg.id, task = %msg.task, "{how}");
    l.revoked.inc();
    let meta = ResultMeta::revoked(&msg.id, how);
    let ending = Ending {
        join: Join::of(canvas, msg, &meta),
        ..Ending::stored(&meta)
    };
    settle(shared, job, &msg.id, ending).await;
}

fn traceback(shared: &Shared, msg: &TaskMessage, e: &TaskError) -> String {
    traceback_for(shared, &msg.task, &msg.id, e)
}

fn traceback_for(shared: &Shared, task: &str, id: &str, e: &TaskError) -> String {
    format!(
        "{}.{}: {}\n  in task {task}[{id}] on {} (mediafarm {})",
        e.exc_module,
        e.exc_type,
        e.message,
        shared.hostname,
        env!("CARGO_PKG_VERSION")
    )
}

fn dead_reason(shared: &Shared, job: &Incoming, kind: &str, reason: String) -> DeadReason {
    DeadReason {
        kind: kind.to_owned(),
        reason,
        queue: job.queue.clone(),
        worker: shared.hostname.to_string(),
    }
}

/// A message that can never run: store FAILURE (of type `kind`) where the producer will look
/// (when its id is known), send it to the dead-letter queue with the reason, then acknowledge
/// it. For a message that was `decoded`, what can be read of its canvas is carried on as for a
/// failure, so a refused chord header still reaches its chord (the body then fails with
/// `ChordError` instead of waiting for ever) and its errbacks are sent.
async fn refuse(
    shared: &Shared,
    job: &Incoming,
    kind: &'static str,
    e: DecodeError,
    decoded: Option<&TaskMessage>,
) {
    let task = e.task.clone().unwrap_or_else(|| "unknown".into());
    // Only registered names become metric labels: names from the wire are unbounded.
    let label = if shared.registry.contains(&task) {
        task.as_str()
    } else {
        "unknown"
    };
    shared.metrics_for(label, &job.queue).rejected.inc();
    tracing::error!(id = ?e.id, task = %task, reason = %e.reason, "rejecting message");
    let meta = e.id.as_ref().map(|id| {
        let error = TaskError::invalid(kind, e.reason.clone());
        let meta = ResultMeta::failure(id, &error, traceback_for(shared, &task, id, &error));
        shared
            .events
            .task_refused(id, &task, &error, meta.traceback.as_deref().unwrap_or(""));
        meta
    });
    let why = dead_reason(shared, job, kind, e.reason.clone());
    let canvas = decoded.map(Canvas::salvage);
    let (after, chained, join) = match (decoded, &canvas, &meta) {
        (Some(msg), Some(canvas), Some(meta)) => (
            canvas::on_failure(canvas, parent_of(msg), Utc::now()),
            canvas.chain_failures(meta),
            Join::of(canvas, msg, meta),
        ),
        _ => (Vec::new(), Vec::new(), None),
    };
    let ending = Ending {
        store: meta.as_ref(),
        after,
        chained,
        join,
        dead: Some(why),
        ..Ending::ack_only()
    };
    settle(shared, job, e.id.as_deref().unwrap_or("?"), ending).await;
}

/// How a message ends, in the one order that keeps the promise of this module: set the size of
/// any chord it sends, publish what carries its workflow on (callbacks, the next chain step),
/// store the outcome (if there is one
/// to store) and a FAILURE's copies for the chain steps after it, publish its errbacks, join its chord (a chord header),
/// copy the message to its dead-letter queue (if it failed for good), and only then
/// acknowledge. A store that fails returns the
/// message to the broker; a publish or dead letter that fails returns it after a pause.
struct Ending<'a> {
    /// Published before the outcome is stored (SUCCESS's callbacks and next chain step).
    before: Vec<Publish>,
    /// The sizes of the chords `before` sends, (group id, header size), set first.
    sizes: Vec<(String, usize)>,
    /// Published after the outcome is stored (a FAILURE's errbacks).
    after: Vec<Publish>,
    /// Stored right after the outcome: a FAILURE given to the chain steps after the job.
    chained: Vec<ResultMeta>,
    /// A chord header's outcome, joined after it is stored.
    join: Option<Join<'a>>,
    store: Option<&'a ResultMeta>,
    dead: Option<DeadReason>,
}

impl<'a> Ending<'a> {
    fn ack_only() -> Ending<'a> {
        Ending {
            before: Vec::new(),
            sizes: Vec::new(),
            after: Vec::new(),
            chained: Vec::new(),
            join: None,
            store: None,
            dead: None,
        }
    }

    fn stored(meta: &'a ResultMeta) -> Ending<'a> {
        Ending {
            store: Some(meta),
            ..Ending::ack_only()
        }
    }

    fn dead_only(why: DeadReason) -> Ending<'a> {
        Ending::ack_only().dead(why)
    }

    fn dead(self, why: DeadReason) -> Ending<'a> {
        Ending {
            dead: Some(why),
            ..self
        }
    }
}

async fn settle(shared: &Shared, job: &Incoming, id: &str, ending: Ending<'_>) {
    trace::outcome(ending.store.map(|m| (m.status.as_str(), &m.result)));
    for (group, size) in &ending.sizes {
        match shared
            .backend
            .chord_set_size(group, *size, job.delivery.redelivered)
            .await
        {
            Ok(true) => {}
            Ok(false) => {
                tracing::info!(%id, %group, "this job ran before and started its chord then; the chord's size is left as that run set it, so the chord is not run twice");
            }
            Err(e) => {
                tracing::warn!(%id, %group, error = %e, "could not set the size of the chord this job sends; returning the message to the queue");
                return requeue_after_pause(shared, job).await;
            }
        }
    }
    if !publish_next(shared, id, &ending.before).await {
        return requeue_after_pause(shared, job).await;
    }
    if let Some(meta) = ending.store {
        if !store_with_retry(shared, meta).await {
            return job.requeue().await;
        }
    }
    for meta in &ending.chained {
        if !store_with_retry(shared, meta).await {
            return job.requeue().await;
        }
    }
    if !publish_next(shared, id, &ending.after).await {
        return requeue_after_pause(shared, job).await;
    }
    if let Some(join) = &ending.join {
        if !join_chord(shared, join).await {
            return requeue_after_pause(shared, job).await;
        }
    }
    if let Some(why) = &ending.dead {
        if !dead_letter(job, why).await {
            return requeue_after_pause(shared, job).await;
        }
    }
    ack(job, id).await;
}

/// Publishes a workflow's next messages with confirms; `false` when one could not be sent (the
/// job's message then goes back, and the next run sends the same ids again).
///
/// They are sent together, their confirms awaited together: several callbacks or errbacks cost
/// one confirm round trip, not one each.
async fn publish_next(shared: &Shared, id: &str, next: &[Publish]) -> bool {
    let sent = futures_util::future::join_all(
        next.iter()
            .map(|p| async move { (p, shared.publisher.publish(&p.queue, &p.msg).await) }),
    )
    .await;
    let mut all = true;
    for (p, outcome) in sent {
        match outcome {
            Ok(()) => {
                tracing::debug!(%id, next = %p.msg.id, task = %p.msg.task, queue = %p.queue, "workflow carried on")
            }
            Err(e) => {
                tracing::warn!(%id, next = %p.msg.id, task = %p.msg.task, queue = %p.queue, error = %e, "could not publish the workflow's next message; returning the message to the queue");
                all = false;
            }
        }
    }
    all
}

/// A chord header's ended job, ready to join its chord.
struct Join<'a> {
    part: &'a ChordPart,
    header: Parent<'a>,
    /// The `.j` member, encoded from the result as stored (or as it would be stored).
    member: String,
}

impl<'a> Join<'a> {
    fn of(canvas: &'a Canvas, msg: &'a TaskMessage, meta: &ResultMeta) -> Option<Join<'a>> {
        canvas.chord.as_ref().map(|part| Join {
            part,
            header: parent_of(msg),
            member: chord::member(&msg.id, &meta.status, &meta.result),
        })
    }
}

/// Joins a header's result into its chord as Celery 5.7's Redis backend does
/// (`backend::chord`) and, when it completes the count and takes the dispatch claim, sends the
/// body (or stores the body's `ChordError` and sends its errbacks). `false`: Redis or the
/// broker failed before the chord was carried on; the claim (if taken) is given back and the
/// header's message goes back, to join again when redelivered.
async fn join_chord(shared: &Shared, join: &Join<'_>) -> bool {
    let part = join.part;
    let id = join.header.id;
    let group = part.group.as_str();
    let token = backend_chord::claim_token();
    let count = match shared
        .backend
        .chord_part_return(group, id, &join.member, part.index, &token)
        .await
    {
        Ok(PartReturn::Counted(count)) => count,
        Ok(PartReturn::Done) => {
            tracing::debug!(%id, %group, "the chord's body was already sent; this return is ignored");
            return true;
        }
        Err(e) => {
            tracing::warn!(%id, %group, error = %e, "could not join the chord; returning the message to the queue");
            return false;
        }
    };
    if !chord::is_complete(count.ready, count.diff, count.size) {
        return true;
    }
    if !count.claimed && !take_over(shared, id, group, &token).await {
        return true;
    }
    let carried = dispatch_body(shared, join, &token).await;
    if !carried {
        if let Err(e) = shared.backend.chord_release(group, &token).await {
            tracing::warn!(%id, %group, error = %e, "could not give the chord's dispatch claim back; it lapses by itself");
        }
    }
    carried
}

/// A header completed the count while another worker held the dispatch claim (this header ran
/// before, or two copies of it ran): waits for that claim to end. `true` when it lapsed with
/// the chord unfinished (its holder died) and this worker took it; `false` when the chord
/// finished (or the wait gave up: the holder's lease keeps being renewed).
async fn take_over(shared: &Shared, id: &str, group: &str, token: &str) -> bool {
    let deadline = tokio::time::Instant::now() + TAKE_OVER_WAIT;
    loop {
        match shared.backend.chord_take_over(group, token).await {
            Ok(TakeOver::Finished) => return false,
            Ok(TakeOver::Claimed) => {
                tracing::info!(%id, %group, "the chord's dispatch claim lapsed unfinished; this header sends its body");
                return true;
            }
            Ok(TakeOver::Held(left)) => {
                if tokio::time::Instant::now() >= deadline {
                    tracing::warn!(%id, %group, "another worker kept the chord's dispatch claim; leaving the body to it");
                    return false;
                }
                let nap = left.clamp(Duration::from_millis(20), Duration::from_secs(1));
                tokio::time::sleep(nap).await;
            }
            Err(e) => {
                tracing::warn!(%id, %group, error = %e, "could not read the chord's dispatch claim; leaving the body to its holder");
                return false;
            }
        }
    }
}

/// How long the dispatch claim is extended to while the body is sent: mediafarm's publish
/// estimate, or the claim's own lease if longer (Celery's `max(initial_expires, …)`).
fn publish_claim_secs(backend: &ResultBackend) -> u64 {
    backend_chord::PUBLISH_CLAIM_SECS.max(backend.chord_times().claim_secs)
}

/// How long a header that completed its chord without the claim waits for the holder.
const TAKE_OVER_WAIT: Duration = Duration::from_secs(60);

/// Sends the body (or fails it) under the dispatch claim `token` holds; `false` when Redis or
/// the broker failed first.
async fn dispatch_body(shared: &Shared, join: &Join<'_>, token: &str) -> bool {
    let part = join.part;
    let id = join.header.id;
    let group = part.group.as_str();
    let members = match shared.backend.chord_members(group).await {
        Ok(members) => members,
        Err(e) => {
            tracing::warn!(%id, %group, error = %e, "could not read the chord's results; returning the message to the queue");
            return false;
        }
    };
    match chord::results(&members) {
        Ok(results) => {
            match shared
                .backend
                .chord_claim_extend(group, token, publish_claim_secs(&shared.backend))
                .await
            {
                Ok(true) => {}
                Ok(false) => {
                    tracing::warn!(%id, %group, "the chord's dispatch claim is no longer this worker's; its body is not sent from here");
                    return true;
                }
                Err(e) => {
                    tracing::warn!(%id, %group, error = %e, "could not extend the chord's dispatch claim; returning the message to the queue");
                    return false;
                }
            }
            let body = chord::body_message(part, results, join.header, Utc::now());
            // A chord body: its size first, as for any chord sent on. Set as for a rerun: a
            // dispatch that failed after setting it leaves it as it is.
            for (inner, size) in &body.chord_sizes {
                if let Err(e) = shared.backend.chord_set_size(inner, *size, true).await {
                    tracing::warn!(%id, %group, error = %e, "could not set the size of the chord that is this chord's body; returning the message to the queue");
                    return false;
                }
            }
            if !publish_next(shared, id, &body.publish).await {
                return false;
            }
            match shared.backend.chord_cleanup(group, token).await {
                Ok(true) => {}
                Ok(false) => {
                    tracing::warn!(%id, %group, "the chord's dispatch claim lapsed before its keys were deleted; they expire by themselves");
                }
                Err(e) => {
                    tracing::warn!(%id, %group, error = %e, "could not delete the chord's keys; they expire with result_expires");
                }
            }
        }
        Err(reason) => {
            tracing::info!(%id, %group, reason = %reason.reason, "a chord header failed; failing the body");
            let (metas, errbacks) = chord::body_failure(part, &reason, Utc::now());
            for meta in &metas {
                if !store_with_retry(shared, meta).await {
                    return false;
                }
            }
            if !publish_next(shared, id, &errbacks).await {
                return false;
            }
            if let Err(e) = shared.backend.chord_drop_size(group).await {
                tracing::warn!(%id, %group, error = %e, "could not delete the chord's size; it expires with result_expires");
            }
        }
    }
    true
}

/// The job as the parent of what its end sends on.
fn parent_of(msg: &TaskMessage) -> Parent<'_> {
    Parent {
        id: &msg.id,
        root_id: msg.root_id.as_deref().unwrap_or(&msg.id),
    }
}

async fn dead_letter(job: &Incoming, why: &DeadReason) -> bool {
    match job.dead_letter(why).await {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(error = %e, queue = %why.queue, "could not dead-letter the message; returning it to the queue");
            false
        }
    }
}

/// Stores the FAILURE of a message refused before it reached [`handle`] (a Redis value whose
/// body cannot be read), when its headers name the job; `false` when that could not be
/// stored, so the caller leaves the message to come back instead of dead-lettering it.
pub(crate) async fn store_refusal(
    shared: &Shared,
    id: &str,
    task: &str,
    kind: &'static str,
    reason: &str,
) -> bool {
    let error = TaskError::invalid(kind, reason.to_owned());
    let meta = ResultMeta::failure(id, &error, traceback_for(shared, task, id, &error));
    shared
        .events
        .task_refused(id, task, &error, meta.traceback.as_deref().unwrap_or(""));
    store_with_retry(shared, &meta).await
}

/// Retries a result write with backoff for about a minute; `false` sends the message back to
/// the broker.
async fn store_with_retry(shared: &Shared, meta: &ResultMeta) -> bool {
    for attempt in 0..12u32 {
        match shared.backend.store(meta).await {
            Ok(()) => {
                if attempt > 0 {
                    shared.readiness.backend.store(true, Ordering::Relaxed);
                }
                return true;
            }
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

async fn ack(job: &Incoming, id: &str) {
    if let Err(e) = job.ack().await {
        tracing::warn!(%id, error = %e, "ack failed after the outcome was stored; the broker will redeliver and the copy will be skipped");
    }
}

/// Returns a received job's message to the broker without running it (the worker is stopping,
/// or the job waited too long for a slot): Celery's `reject(requeue=True)`.
async fn give_back(shared: &Shared, job: &Incoming, msg: &TaskMessage) {
    shared.events.task_rejected(&msg.id, true);
    job.requeue().await
}

/// Returns a message whose re-publishing failed, after a pause, so a lasting fault (a dead
/// queue declared with other arguments, say) does not turn into a hot redelivery loop.
async fn requeue_after_pause(shared: &Shared, job: &Incoming) {
    tokio::select! {
        _ = shared.stop.cancelled() => {},
        _ = tokio::time::sleep(Duration::from_secs(1)) => {},
    }
    job.requeue().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::TimeLimits;

    #[test]
    fn retry_delays_grow_are_capped_and_jittered() {
        let mut s = Settings {
            task_default_retry_delay: Duration::from_secs(2),
            task_retry_backoff_max: Duration::from_secs(30),
            task_retry_jitter: false,
            ..Settings::default()
        };
        assert_eq!(retry_delay(&s, 0, None), Duration::from_secs(2));
        assert_eq!(retry_delay(&s, 3, None), Duration::from_secs(16));
        assert_eq!(retry_delay(&s, 10, None), Duration::from_secs(30));
        assert_eq!(
            retry_delay(&s, 10, Some(Duration::from_secs(1))),
            Duration::from_secs(1)
        );
        s.task_retry_jitter = true;
        for _ in 0..100 {
            let d = retry_delay(&s, 3, None);
            assert!(d >= Duration::from_secs(8) && d <= Duration::from_secs(16));
        }
    }

    #[test]
    fn limits_come_from_the_message_then_the_task_then_settings_and_stay_under_the_ack_timeout() {
        let s = Settings {
            task_time_limit: Some(Duration::from_secs(60)),
            task_soft_time_limit: Some(Duration::from_secs(50)),
            ..Settings::default()
        };
        let mut msg = TaskMessage::new("t", Default::default());
        let none = TaskPolicy::default();
        let l = Limits::for_job(&s, &msg, &none);
        assert_eq!(l.hard, Duration::from_secs(60));
        assert_eq!(l.soft, Some(Duration::from_secs(50)));
        let task = TaskPolicy {
            time_limit: Some(Duration::from_secs(10)),
            soft_time_limit: Some(Duration::from_secs(5)),
            max_retries: None,
            rate_limit: None,
        };
        assert_eq!(
            Limits::for_job(&s, &msg, &task).hard,
            Duration::from_secs(10)
        );
        msg.timelimit = TimeLimits {
            hard: Some(3.0),
            soft: Some(1.0),
        };
        let l = Limits::for_job(&s, &msg, &task);
        assert_eq!(
            (l.hard, l.soft),
            (Duration::from_secs(3), Some(Duration::from_secs(1)))
        );
        msg.timelimit.hard = Some(100_000.0);
        msg.timelimit.soft = None;
        let l = Limits::for_job(&s, &msg, &task);
        assert_eq!(l.hard, s.longest_hard_limit());
        // No limit anywhere: the longest allowed, so the ack always beats consumer_timeout.
        let bare = Settings::default();
        let l = Limits::for_job(&bare, &TaskMessage::new("t", Default::default()), &none);
        assert_eq!(l.hard, Duration::from_secs(1800 - 120));
        assert!(l.fits_ack_deadline(&bare, Duration::from_secs(30)));
        assert!(!l.fits_ack_deadline(&bare, Duration::from_secs(90)));
    }
}

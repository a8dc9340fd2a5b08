//! Consuming from the Redis broker: what [`super::worker`]'s AMQP consumer does, on kombu's
//! Redis transport ([`crate::redis_broker`]). At most `prefetch_count` messages are taken and
//! unacknowledged at once, plus one for each job that has only its finishing left, up to
//! `worker_finishing_limit` more ([`super::window`]); each is handed to
//! [`super::message::handle`] exactly as an AMQP delivery is. Beside it, every worker promotes
//! delayed messages that are due and puts back messages left unacknowledged past the
//! visibility timeout (a worker that died), and answers the pidbox
//! ([`crate::amqp::pidbox::over_redis`]).
//!
//! Taking is polling: one script call takes as many messages as the window has room for (at
//! most [`FETCH_MOST`]) and records them as unacknowledged atomically, which a blocking
//! `BRPOP` cannot (a blocking command does not block inside a script). An idle worker asks
//! again after 2 ms, doubling to [`IDLE_POLL_MAX`], or as soon as its doorbell rings (a
//! message pushed onto a queue's main list: [`crate::redis_broker::doorbell`]); a busy one
//! never waits. An idle worker costs Redis about 20 script calls and 20 blocking waits a
//! second.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lapin::message::Delivery;
use serde_json::Map;

use crate::amqp::broker::backoff;
use crate::amqp::pidbox;
use crate::amqp::reroute::DeadReason;
use crate::amqp::table::{try_write_properties, value_to_json};
use crate::observe::metrics::{host_label, WorkerLabels};
use crate::redis_broker::doorbell::Doorbell;
use crate::redis_broker::{Envelope, RedisBroker, Taken, Unreadable};
use crate::runtime::message::{self, Incoming, Shared};
use crate::runtime::transport::{FromRedis, Via};
use crate::runtime::window::{Place, Seat, Window};

/// The longest wait between two polls of empty queues.
pub const IDLE_POLL_MAX: Duration = Duration::from_millis(50);
/// The most messages one round trip takes (each needs a free place in the window).
const FETCH_MOST: usize = 32;
/// How often due delayed messages are promoted.
const PROMOTE_EVERY: Duration = Duration::from_millis(100);

/// What a stopped consumer still holds: messages taken whose handling has not ended.
pub(crate) struct Held {
    broker: RedisBroker,
    tags: Arc<Mutex<HashSet<String>>>,
}

impl Held {
    /// Returns to their queues the messages whose jobs did not end within the grace period
    /// (as closing an AMQP connection returns its unacknowledged deliveries), instead of
    /// leaving them to the visibility timeout.
    pub(crate) async fn give_back(self) {
        let tags: Vec<String> = lock(&self.tags).drain().collect();
        for tag in tags {
            match self.broker.restore(&tag).await {
                Ok(true) => {
                    tracing::info!(%tag, "returned an unfinished job's message to its queue")
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(%tag, error = %e, "could not return a message; it comes back after the visibility timeout")
                }
            }
        }
    }
}

fn lock(tags: &Mutex<HashSet<String>>) -> std::sync::MutexGuard<'_, HashSet<String>> {
    tags.lock().unwrap_or_else(|e| e.into_inner())
}

/// Connects (with backoff), then takes and dispatches messages until stopped; returns what
/// it still holds (to give back after the grace period).
pub(crate) async fn consume_until_stopped(shared: Arc<Shared>) -> Option<Held> {
    let up = WorkerLabels {
        hostname: host_label(&shared.hostname),
    };
    let mut attempt = 0;
    let broker = loop {
        match RedisBroker::connect(&shared.settings).await {
            Ok(b) => break b,
            Err(e) => {
                let wait = backoff(attempt);
                attempt = attempt.saturating_add(1);
                tracing::warn!(error = %e, retry_in = ?wait, "Redis broker unreachable; retrying");
                tokio::select! {
                    _ = shared.stop.cancelled() => return None,
                    _ = tokio::time::sleep(wait) => {},
                }
            }
        }
    };
    let tags: Arc<Mutex<HashSet<String>>> = Arc::default();
    tokio::spawn(housekeeping(broker.clone(), shared.clone()));
    tokio::spawn(answer_control(broker.clone(), shared.clone()));
    let wanted = shared.node.watch_queues();
    let window = Window::for_settings(&shared.settings, false, false);
    window.report_to(&shared.node);
    let mut idle = 0u32;
    let mut doorbell = Doorbell::default();
    let mut healthy = false;
    tracing::info!(queues = ?*wanted.borrow(), "consuming from the Redis broker");
    loop {
        let first = tokio::select! {
            biased;
            _ = shared.stop.cancelled() => break,
            p = window.take() => p,
        };
        // Every place free now is filled by the same round trip.
        let mut places = vec![first];
        while places.len() < FETCH_MOST {
            match window.try_take() {
                Some(p) => places.push(p),
                None => break,
            }
        }
        let queues = wanted.borrow().clone();
        for q in &queues {
            // Once per queue per process (the broker remembers); a failure is retried here.
            if let Err(e) = broker.bind(q).await {
                tracing::debug!(queue = %q, error = %e, "could not write the queue's kombu binding");
            }
        }
        match broker.fetch(&queues, places.len()).await {
            Ok(taken) => {
                if !healthy {
                    healthy = true;
                    attempt = 0;
                    shared.readiness.broker.store(true, Ordering::Relaxed);
                    shared.readiness.consuming.store(true, Ordering::Relaxed);
                    shared.metrics.up.get_or_create(&up).set(1);
                }
                if taken.is_empty() {
                    drop(places);
                    let wait =
                        (Duration::from_millis(2) * 2u32.pow(idle.min(5))).min(IDLE_POLL_MAX);
                    idle = idle.saturating_add(1);
                    tokio::select! {
                        _ = shared.stop.cancelled() => break,
                        rung = doorbell.wait(&broker, &queues, wait) => {
                            if rung {
                                idle = 0;
                            }
                        },
                    }
                } else {
                    idle = 0;
                    // The places left over (fewer messages than places) are dropped here.
                    for (taken, place) in taken.into_iter().zip(places) {
                        dispatch(&shared, &broker, &tags, taken, &window, place).await;
                    }
                }
            }
            Err(e) => {
                drop(places);
                healthy = false;
                shared.readiness.broker.store(false, Ordering::Relaxed);
                shared.readiness.consuming.store(false, Ordering::Relaxed);
                shared.metrics.up.get_or_create(&up).set(0);
                let wait = backoff(attempt);
                attempt = attempt.saturating_add(1);
                tracing::warn!(error = %e, retry_in = ?wait, "taking from the Redis broker failed; retrying");
                tokio::select! {
                    _ = shared.stop.cancelled() => break,
                    _ = tokio::time::sleep(wait) => {},
                }
            }
        }
    }
    Some(Held { broker, tags })
}

/// Promotes due delayed messages, and puts back messages past the visibility timeout, until
/// the worker stops.
async fn housekeeping(broker: RedisBroker, shared: Arc<Shared>) {
    let vt = broker.options().visibility_timeout;
    // kombu checks every 10 s at most; a short visibility timeout is checked more often.
    let restore_every = (vt / 4).clamp(Duration::from_millis(500), Duration::from_secs(10));
    let mut last_restore = Instant::now();
    while !shared.stop.is_cancelled() {
        if let Err(e) = broker.promote_due().await {
            tracing::debug!(error = %e, "could not promote delayed messages");
        }
        if last_restore.elapsed() >= restore_every {
            last_restore = Instant::now();
            if let Err(e) = broker.restore_visible().await {
                tracing::debug!(error = %e, "could not restore messages past the visibility timeout");
            }
        }
        tokio::select! {
            _ = shared.stop.cancelled() => break,
            _ = tokio::time::sleep(PROMOTE_EVERY) => {},
        }
    }
}

/// Answers pidbox requests (`celery inspect`/`control`, revokes) from the Redis broker until
/// the worker stops, subscribing again with backoff whenever the subscription is lost. A
/// request published while it is not subscribed never reaches it (kombu's fanout keeps
/// nothing); a revoke still does, through the revoked set in the result backend.
async fn answer_control(broker: RedisBroker, shared: Arc<Shared>) {
    let mut attempt = 0u32;
    while !shared.stop.is_cancelled() {
        let started = Instant::now();
        let outcome = tokio::select! {
            _ = shared.stop.cancelled() => break,
            o = pidbox::over_redis::listen(broker.clone(), shared.node.clone()) => o,
        };
        if started.elapsed() > Duration::from_secs(30) {
            attempt = 0;
        }
        let wait = backoff(attempt);
        attempt = attempt.saturating_add(1);
        match outcome {
            Ok(()) => {
                tracing::warn!(retry_in = ?wait, "control subscription on the Redis broker lost; subscribing again")
            }
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?wait, "cannot subscribe to control requests on the Redis broker; retrying")
            }
        }
        tokio::select! {
            _ = shared.stop.cancelled() => break,
            _ = tokio::time::sleep(wait) => {},
        }
    }
}

/// Hands a taken message to its job; one that cannot be read as a task message at all goes
/// to the queue's dead letters with the reason.
async fn dispatch(
    shared: &Arc<Shared>,
    broker: &RedisBroker,
    held: &Arc<Mutex<HashSet<String>>>,
    taken: Taken,
    window: &Arc<Window>,
    place: Place,
) {
    let Taken { queue, message } = taken;
    let unreadable = |why: String| DeadReason {
        kind: "InvalidMessage".into(),
        reason: why,
        queue: queue.clone(),
        worker: shared.hostname.to_string(),
    };
    let envelope = match message {
        Ok(e) => e,
        Err(Unreadable { raw, why, tag }) => {
            let why = format!("the value taken from the Redis list is not a kombu message: {why}");
            tracing::error!(%queue, %why, "moving it to the dead letters as it was");
            if let Err(e) = broker.dead(&tag, &queue, &raw).await {
                tracing::error!(%queue, error = %e, "could not dead-letter an unreadable value; it is lost");
            }
            return;
        }
    };
    let tag = envelope.tag().unwrap_or_default().to_owned();
    let (props, headers) = envelope.properties();
    let body = envelope.body();
    let properties = try_write_properties(&props, &headers);
    let (body, properties) = match (body, properties) {
        (Ok(b), Ok(p)) => (b, p),
        (Err(why), _) => {
            return dead_unreadable(shared, broker, &envelope, &tag, unreadable(why)).await
        }
        (_, Err(e)) => {
            return dead_unreadable(shared, broker, &envelope, &tag, unreadable(e.to_string()))
                .await
        }
    };
    let (exchange, routing_key) = envelope.exchange_and_routing_key();
    let mut delivery = Delivery::mock(
        0,
        exchange.as_str().into(),
        routing_key.as_str().into(),
        envelope.redelivered(),
        body,
    );
    delivery.properties = properties;
    let incoming = Incoming {
        delivery,
        queue,
        received_at: Instant::now(),
        via: Via::Redis(Box::new(FromRedis {
            broker: broker.clone(),
            tag: tag.clone(),
            envelope,
        })),
        seat: Seat::new(window),
    };
    let (shared2, held) = (shared.clone(), held.clone());
    lock(&held).insert(tag.clone());
    shared.jobs.spawn(async move {
        message::handle(shared2, incoming).await;
        lock(&held).remove(&tag);
        drop(place);
    });
}

/// Dead-letters a kombu message whose body or properties cannot be read, after storing its
/// FAILURE when its headers name the job (`id`, and `task` for the traceback), as a refused
/// AMQP message's is: nothing leaves the unacked set before its result is stored.
async fn dead_unreadable(
    shared: &Shared,
    broker: &RedisBroker,
    envelope: &Envelope,
    tag: &str,
    why: DeadReason,
) {
    tracing::error!(queue = %why.queue, reason = %why.reason, "rejecting message");
    let (_, named) = envelope.properties();
    let text = |key: &str| named.get(key).and_then(serde_json::Value::as_str);
    if let Some(id) = text("id") {
        let task = text("task").unwrap_or("unknown");
        if !message::store_refusal(shared, id, task, "InvalidMessage", &why.reason).await {
            tracing::warn!(%id, "the refusal could not be stored; the message comes back after the visibility timeout");
            return;
        }
    }
    let headers: Map<String, serde_json::Value> = why
        .headers()
        .iter()
        .map(|(k, v)| ((*k).to_owned(), value_to_json(v)))
        .collect();
    let dead = envelope.republished(&headers, &[], &why.queue);
    if let Err(e) = broker
        .dead(tag, &why.queue, dead.to_json().as_bytes())
        .await
    {
        tracing::warn!(error = %e, "could not dead-letter; the message comes back after the visibility timeout");
    }
}

//! Celery's events (`celeryev`), so Flower, `celery events` and any `app.events.Receiver` see
//! mediafarm workers and producers as they see Celery's: `task-sent` from a producer,
//! `task-received` → `task-started` → `task-succeeded`/`-failed`/`-retried`/`-revoked`/
//! `-rejected` from a worker, and `worker-online`, `worker-heartbeat` every
//! `worker_heartbeat_interval` and `worker-offline` on shutdown. Bodies are Celery's field for
//! field (`body`); they go out on the `event_exchange` topic exchange with Celery's routing
//! keys (`publish`), or on the Redis broker by `PUBLISH` on that exchange's fanout channel, as
//! Celery sends them there.
//!
//! What it promises the hot path: an event site costs one atomic load while events are off (the
//! default, as in Celery). While they are on, a job's event is built and put on a bounded
//! in-process queue; one background task publishes (without publisher confirms, as Celery
//! publishes events with `delivery_mode=1` and no confirms), letting them gather for 10 ms and
//! sending the task events among them as one `task.multi` message, a list of events, as
//! Celery's own worker buffers them. A job never waits for the broker because of an event: when
//! the queue is full (the broker is slow or gone), the event is dropped and counted in
//! `mediafarm_events_dropped_total`. Events are monitoring, not a record (Celery sends them
//! the same way, to receivers that may not be there); dropping one costs a monitor a line, and
//! waiting for one would cost every job its throughput.
//!
//! [`Events`] is also the runtime switch: `set_enabled`, `is_enabled` and `heartbeat_now` are
//! what the `enable_events`, `disable_events` and `heartbeat` control commands call.

pub mod body;
mod publish;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use serde::Serialize;
use serde_json::Value;
use tokio::sync::{mpsc, oneshot, Notify};
use tokio_util::sync::CancellationToken;

use crate::backend::result::TaskError;
use crate::protocol::TaskMessage;
use crate::settings::Settings;

pub use body::{Event, Load, Origin, WorkerEvent};

/// Events waiting to be published at most; beyond it they are dropped and counted.
pub const QUEUE_CAPACITY: usize = 16_384;

/// What the background publisher is handed: an event, or a request to say when everything
/// handed before it has been written to the broker.
enum Outgoing {
    Event(Event),
    Flush(oneshot::Sender<()>),
}

/// One process's event sender and switch. Cheap to share (`Arc`); its publisher task ends when
/// the last `Events` is dropped, after publishing what is queued.
pub struct Events {
    enabled: AtomicBool,
    /// Set once `worker-offline` is sent: no worker event follows it.
    offline: AtomicBool,
    wake: Notify,
    origin: Origin,
    heartbeat_interval: Duration,
    tx: mpsc::Sender<Outgoing>,
    dropped: Counter,
}

impl Events {
    /// Starts the publisher task (on the current Tokio runtime; it connects on the first
    /// event) for events sent as `hostname`. `dropped` counts events the full queue refused.
    pub fn start(
        settings: &Settings,
        hostname: &str,
        enabled: bool,
        dropped: Counter,
    ) -> Arc<Events> {
        let (tx, rx) = mpsc::channel(QUEUE_CAPACITY);
        tokio::spawn(publish::run(
            settings.clone(),
            hostname.to_owned(),
            rx,
            dropped.clone(),
        ));
        Arc::new(Events {
            enabled: AtomicBool::new(enabled),
            offline: AtomicBool::new(false),
            wake: Notify::new(),
            origin: Origin::new(hostname),
            heartbeat_interval: settings.worker_heartbeat_interval,
            tx,
            dropped,
        })
    }

    /// Turns events on or off from now on (the `enable_events`/`disable_events` commands).
    /// Turning them on sends `worker-online` and starts the heartbeats.
    pub fn set_enabled(&self, on: bool) {
        let was = self.enabled.swap(on, Ordering::Relaxed);
        if on && !was {
            self.wake.notify_one();
        }
    }

    /// Whether events are sent now: the one atomic load an event site pays while they are off.
    #[inline]
    pub fn is_enabled(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
    }

    /// Makes the heartbeat task send a `worker-heartbeat` now (the `heartbeat` command, which
    /// a starting receiver broadcasts to see every worker at once).
    pub fn heartbeat_now(&self) {
        self.wake.notify_one();
    }

    /// The node name events are sent as.
    pub fn hostname(&self) -> &str {
        &self.origin.hostname
    }

    /// Events dropped because the queue was full, so far.
    pub fn dropped(&self) -> u64 {
        self.dropped.get()
    }

    fn send(&self, (kind, fields): (&'static str, impl Serialize)) {
        let event = self.origin.stamp(kind, &fields);
        if self.tx.try_send(Outgoing::Event(event)).is_err() {
            self.dropped.inc();
        }
    }

    /// Waits (at most `limit`) until every event sent before this call has been written to
    /// the broker or dropped.
    pub async fn flush(&self, limit: Duration) {
        let (done, wait) = oneshot::channel();
        let queued = self.tx.send(Outgoing::Flush(done));
        let _ = tokio::time::timeout(limit, async {
            if queued.await.is_ok() {
                let _ = wait.await;
            }
        })
        .await;
    }

    /// `task-sent`, for a producer.
    pub fn task_sent(&self, msg: &TaskMessage, queue: &str) {
        if self.is_enabled() {
            // Celery's producers publish jobs to the default exchange, routed by queue name.
            self.send(body::task_sent(msg, queue, "", queue));
        }
    }

    pub fn task_received(&self, msg: &TaskMessage) {
        if self.is_enabled() {
            self.send(body::task_received(msg));
        }
    }

    pub fn task_started(&self, id: &str) {
        if self.is_enabled() {
            self.send(body::task_started(id));
        }
    }

    pub fn task_succeeded(&self, id: &str, result: &Value, runtime: Duration) {
        if self.is_enabled() {
            self.send(body::task_succeeded(id, result, runtime));
        }
    }

    pub fn task_failed(&self, id: &str, e: &TaskError, traceback: &str) {
        if self.is_enabled() {
            self.send(body::task_failed(id, e, traceback));
        }
    }

    pub fn task_retried(&self, id: &str, e: &TaskError, traceback: &str) {
        if self.is_enabled() {
            self.send(body::task_retried(id, e, traceback));
        }
    }

    /// `task-failed` for a message refused without running (FAILURE is stored for it): a task
    /// this worker does not know as Celery's consumer says it (`NotRegistered('<name>')`),
    /// anything else with the refusal's error.
    pub fn task_refused(&self, id: &str, name: &str, e: &TaskError, traceback: &str) {
        if self.is_enabled() {
            if e.exc_type == "NotRegistered" {
                self.send(body::task_unknown(id, name));
            } else {
                self.send(body::task_failed(id, e, traceback));
            }
        }
    }

    pub fn task_revoked(&self, id: &str, terminated: bool, expired: bool) {
        if self.is_enabled() {
            self.send(body::task_revoked(id, terminated, expired));
        }
    }

    pub fn task_rejected(&self, id: &str, requeue: bool) {
        if self.is_enabled() {
            self.send(body::task_rejected(id, requeue));
        }
    }

    fn worker_event(&self, which: WorkerEvent, load: Load) {
        self.send(body::worker(
            which,
            self.heartbeat_interval,
            load,
            body::load_average(),
        ));
    }

    /// Sends `worker-online`, then `worker-heartbeat` every `worker_heartbeat_interval` (and at
    /// once on [`heartbeat_now`](Self::heartbeat_now)) while events are on, until `stop`.
    /// Turning events on again sends `worker-online` again, as Celery's `Heart` does. `load`
    /// reads the worker's running and started job counts when a heartbeat is due.
    pub async fn heartbeats(&self, stop: CancellationToken, load: impl Fn() -> Load) {
        loop {
            while !self.is_enabled() {
                tokio::select! {
                    biased;
                    _ = stop.cancelled() => return,
                    _ = self.wake.notified() => {},
                }
            }
            if self.offline.load(Ordering::Relaxed) {
                return;
            }
            self.worker_event(WorkerEvent::Online, load());
            loop {
                tokio::select! {
                    biased;
                    _ = stop.cancelled() => return,
                    _ = self.wake.notified() => {},
                    _ = tokio::time::sleep(self.heartbeat_interval) => {},
                }
                if !self.is_enabled() {
                    break;
                }
                if self.offline.load(Ordering::Relaxed) {
                    return;
                }
                self.worker_event(WorkerEvent::Heartbeat, load());
            }
        }
    }

    /// Sends `worker-offline` (when events are on) and waits, at most `limit`, until it and
    /// everything before it is written: the last thing a stopping worker does.
    pub async fn worker_offline(&self, load: Load, limit: Duration) {
        if self.offline.swap(true, Ordering::Relaxed) || !self.is_enabled() {
            return;
        }
        self.worker_event(WorkerEvent::Offline, load);
        self.flush(limit).await;
    }
}

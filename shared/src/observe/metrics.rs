//! Prometheus metrics of a worker, named and labelled as celery-exporter exports them so
//! existing dashboards and alerts keep working: tasks received/started/succeeded/failed/
//! retried/rejected/revoked by task name, host and queue (failed also by exception type), a
//! runtime histogram, the in-flight gauge and `worker_up`; plus mediafarm's own
//! `mediafarm_task_rate_limit_waiting` (jobs held back by their task's `rate_limit`). A worker
//! adds series of its own with [`Metrics::register`] (from its background work, see
//! `runtime::background`); the shared crate names none of them.

use std::sync::{Arc, RwLock};

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Metric, Registry};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TaskLabels {
    pub name: String,
    pub hostname: String,
    pub queue_name: String,
}

/// celery-exporter's labels for `celery_task_failed`, in its order.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailedLabels {
    pub name: String,
    pub hostname: String,
    pub exception: String,
    pub queue_name: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WorkerLabels {
    pub hostname: String,
}

/// Labels of a per-task, per-worker series that has no queue (a rate limit is per task).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NameLabels {
    pub name: String,
    pub hostname: String,
}

type Counters = Family<TaskLabels, Counter>;

/// Runtime buckets in seconds, from a fast echo job to a long media job.
const RUNTIME_BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 30.0, 120.0,
];

fn runtime_histogram() -> Histogram {
    Histogram::new(RUNTIME_BUCKETS)
}

/// The metric handles of one task on one queue, looked up once and then shared: the hot path
/// touches atomics only, with no label allocation or family lookup per message. Cloning is one
/// reference-count increment (a job takes its own handle from the cache on every message).
#[derive(Clone)]
pub struct TaskMetrics(Arc<TaskHandles>);

/// The handles themselves; reached through `TaskMetrics` (`l.received.inc()`).
pub struct TaskHandles {
    labels: TaskLabels,
    failed_by_type: Family<FailedLabels, Counter>,
    pub received: Counter,
    pub started: Counter,
    pub succeeded: Counter,
    pub retried: Counter,
    pub rejected: Counter,
    pub revoked: Counter,
    pub runtime: Histogram,
}

impl std::ops::Deref for TaskMetrics {
    type Target = TaskHandles;

    fn deref(&self) -> &TaskHandles {
        &self.0
    }
}

impl TaskHandles {
    /// Counts a failure with its exception type. Types come from the worker's own errors, not
    /// from message content, so the label stays bounded.
    pub fn failed(&self, exception: &str) {
        self.failed_series(exception).inc();
    }

    fn failed_series(&self, exception: &str) -> Counter {
        self.failed_by_type
            .get_or_create(&FailedLabels {
                name: self.labels.name.clone(),
                hostname: self.labels.hostname.clone(),
                exception: exception.to_owned(),
                queue_name: self.labels.queue_name.clone(),
            })
            .clone()
    }
}

/// celery-exporter's `hostname` label: the host part of a node name (`image@web-1` → `web-1`).
pub fn host_label(node_name: &str) -> String {
    node_name
        .split_once('@')
        .map_or(node_name, |(_, host)| host)
        .to_owned()
}

/// Every metric a worker exports; cheap to clone.
#[derive(Clone)]
pub struct Metrics {
    /// Written only when a worker registers a metric of its own; read on every scrape.
    registry: Arc<RwLock<Registry>>,
    pub received: Counters,
    pub started: Counters,
    pub succeeded: Counters,
    pub failed: Family<FailedLabels, Counter>,
    pub retried: Counters,
    pub rejected: Counters,
    pub revoked: Counters,
    pub runtime: Family<TaskLabels, Histogram, fn() -> Histogram>,
    pub active: Family<WorkerLabels, Gauge>,
    pub up: Family<WorkerLabels, Gauge>,
    /// Jobs waiting for their task's rate limit to let them start (holding no slot).
    pub rate_limit_waiting: Family<NameLabels, Gauge>,
    /// Celery events dropped because their queue was full (the broker slow or unreachable):
    /// events never hold a job up, so a monitor may miss some instead.
    pub events_dropped: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::default();
        let counter = |registry: &mut Registry, name: &str, help: &str| {
            let family = Counters::default();
            registry.register(name, help, family.clone());
            family
        };
        let received = counter(
            &mut registry,
            "celery_task_received",
            "Tasks received by the worker",
        );
        let started = counter(&mut registry, "celery_task_started", "Tasks started");
        let succeeded = counter(
            &mut registry,
            "celery_task_succeeded",
            "Tasks that succeeded",
        );
        let failed = Family::<FailedLabels, Counter>::default();
        registry.register(
            "celery_task_failed",
            "Tasks that failed, by exception type",
            failed.clone(),
        );
        let retried = counter(
            &mut registry,
            "celery_task_retried",
            "Tasks scheduled for a retry",
        );
        let rejected = counter(
            &mut registry,
            "celery_task_rejected",
            "Messages rejected (undecodable, unknown task)",
        );
        let revoked = counter(
            &mut registry,
            "celery_task_revoked",
            "Tasks revoked or expired",
        );
        let runtime = Family::<TaskLabels, Histogram, fn() -> Histogram>::new_with_constructor(
            runtime_histogram,
        );
        registry.register(
            "celery_task_runtime",
            "Task runtime in seconds",
            runtime.clone(),
        );
        let active = Family::<WorkerLabels, Gauge>::default();
        registry.register(
            "celery_worker_tasks_active",
            "Tasks running now",
            active.clone(),
        );
        let up = Family::<WorkerLabels, Gauge>::default();
        registry.register(
            "celery_worker_up",
            "1 while the worker consumes",
            up.clone(),
        );
        let rate_limit_waiting = Family::<NameLabels, Gauge>::default();
        registry.register(
            "mediafarm_task_rate_limit_waiting",
            "Jobs received and waiting for their task's rate_limit to let them start",
            rate_limit_waiting.clone(),
        );
        let events_dropped = Counter::default();
        registry.register(
            "mediafarm_events_dropped",
            "Celery events dropped because the queue to the broker was full",
            events_dropped.clone(),
        );
        Metrics {
            registry: Arc::new(RwLock::new(registry)),
            received,
            started,
            succeeded,
            failed,
            retried,
            rejected,
            revoked,
            runtime,
            active,
            up,
            rate_limit_waiting,
            events_dropped,
        }
    }

    /// Handles for one label set (creating the series on first use).
    pub fn task(&self, labels: &TaskLabels) -> TaskMetrics {
        let handles = TaskHandles {
            labels: labels.clone(),
            failed_by_type: self.failed.clone(),
            received: self.received.get_or_create(labels).clone(),
            started: self.started.get_or_create(labels).clone(),
            succeeded: self.succeeded.get_or_create(labels).clone(),
            retried: self.retried.get_or_create(labels).clone(),
            rejected: self.rejected.get_or_create(labels).clone(),
            revoked: self.revoked.get_or_create(labels).clone(),
            runtime: self.runtime.get_or_create(labels).clone(),
        };
        // As celery-exporter does, the failure series exists (at 0) before the first failure.
        handles.failed_series("");
        TaskMetrics(Arc::new(handles))
    }

    /// Adds a metric of the worker's own (a family of gauges, say), exported from now on.
    /// `name` must be new: Prometheus refuses an exposition that names a metric twice.
    pub fn register(&self, name: &str, help: &str, metric: impl Metric) {
        self.registry
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .register(name, help, metric);
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let registry = self.registry.read().unwrap_or_else(|e| e.into_inner());
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_celery_exporter_names() {
        let m = Metrics::new();
        let labels = TaskLabels {
            name: "echo.echo".into(),
            hostname: "w1".into(),
            queue_name: "echo".into(),
        };
        m.received.get_or_create(&labels).inc();
        m.runtime.get_or_create(&labels).observe(0.003);
        m.active
            .get_or_create(&WorkerLabels {
                hostname: "w1".into(),
            })
            .set(2);
        m.task(&labels).failed("EchoFailure");
        let text = m.render();
        assert!(
            text.contains(r#"celery_task_failed_total{name="echo.echo",hostname="w1",exception="EchoFailure",queue_name="echo"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"celery_task_failed_total{name="echo.echo",hostname="w1",exception="",queue_name="echo"} 0"#),
            "{text}"
        );
        assert_eq!(host_label("image@web-1.prod"), "web-1.prod");
        assert_eq!(host_label("plain"), "plain");
        assert!(
            text.contains(
                r#"celery_task_received_total{name="echo.echo",hostname="w1",queue_name="echo"} 1"#
            ),
            "{text}"
        );
        assert!(text.contains("celery_task_runtime_bucket"), "{text}");
        m.events_dropped.inc();
        assert!(
            m.render().contains("mediafarm_events_dropped_total 1"),
            "{text}"
        );
        assert!(
            text.contains(r#"celery_worker_tasks_active{hostname="w1"} 2"#),
            "{text}"
        );
        let own = Family::<WorkerLabels, Gauge>::default();
        m.register("own_backlog", "A worker's own gauge", own.clone());
        own.get_or_create(&WorkerLabels {
            hostname: "w1".into(),
        })
        .set(7);
        let text = m.render();
        assert!(text.contains(r#"own_backlog{hostname="w1"} 7"#), "{text}");
        assert!(text.trim_end().ends_with("# EOF"), "{text}");
    }
}

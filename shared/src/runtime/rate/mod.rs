//! Per-task rate limits, as Celery's worker keeps them: one token bucket of capacity 1 per task
//! name, per worker, filled at the task's `rate_limit` (`"100/m"`, `"10/s"`, `"1000/h"`). A job
//! over the rate waits in the worker, in arrival order, before it asks for a concurrency slot,
//! so it holds none: other tasks' jobs run meanwhile. It is never rejected.
//!
//! What this module promises:
//! - A task's jobs start at most once per interval (`"5/s"`: 200 ms apart), the first at once,
//!   and an idle bucket saves up no more than one start (Celery's `TokenBucket(capacity=1)`).
//! - Waiting jobs are served first come, first served (tokio's `Mutex` is fair), in the order
//!   they reach the bucket: about delivery order, but deliveries are handled concurrently, so
//!   two that arrive together may swap (as they may for a concurrency slot).
//! - A waiting job gives up when the worker stops ([`Admission::Stopped`]: its message goes
//!   back to the broker), and when its turn would come too late to finish before RabbitMQ's
//!   delivery-ack timeout ([`Admission::Late`]: the message is parked in a delay queue for
//!   the wait instead, so a long backlog never holds a delivery past that timeout).
//! - A task with no limit costs one map lookup per job ([`RateLimits::bucket`]).
//! - The rate can change while the worker runs ([`RateLimits::set`], what Celery's
//!   `rate_limit` control command does, with its replies); waiting jobs follow the new rate
//!   at once.
//!
//! Where a task's rate comes from: its `Task::RATE_LIMIT`, else the `task_default_rate_limit`
//! setting, else the last `rate_limit` control command (which wins over both).
//!
//! With `task_rate_limit_scope = "cluster"` the turns are taken from one bucket per task in
//! Redis ([`cluster`]) instead of the worker's own, so the rate holds across every worker;
//! jobs still wait in order inside each worker. When Redis cannot be asked, the worker's own
//! bucket decides (with a warning), so jobs keep flowing at no more than the rate per worker.

pub mod cluster;

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::{watch, Mutex};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::backend::ResultBackend;
use crate::observe::metrics::{host_label, Metrics, NameLabels};
use crate::runtime::task::Registry;
use crate::settings::{RateParseError, TaskRate};
use cluster::SharedBucket;

/// Celery's reply when a `rate_limit` control command set a rate.
pub const SET_REPLY: &str = "new rate limit set successfully";
/// Celery's reply when a `rate_limit` control command removed a task's rate.
pub const DISABLED_REPLY: &str = "rate limit disabled successfully";

/// Why a rate could not be applied. The `Display` texts of the first two are Celery's own
/// error replies to the `rate_limit` control command (`{"error": <text>}`).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RateError {
    #[error("Invalid rate limit string: {0}")]
    Invalid(#[from] RateParseError),
    /// No task of this name is registered on the worker.
    #[error("unknown task")]
    UnknownTask(String),
    /// A task's `RATE_LIMIT` constant is not a rate (stops the worker's start-up).
    #[error("task {task}: RATE_LIMIT {source}")]
    Declared {
        task: String,
        source: RateParseError,
    },
}

/// The rate-limited tasks of one worker and their buckets.
pub struct RateLimits {
    /// Only tasks with a rate have a bucket: an unlimited task's lookup finds nothing.
    buckets: RwLock<HashMap<String, Arc<Bucket>>>,
    /// Every registered task name, for the control command's `unknown task`.
    known: BTreeSet<String>,
    waiting: prometheus_client::metrics::family::Family<NameLabels, Gauge>,
    hostname: String,
    /// Set for `task_rate_limit_scope = "cluster"`: buckets live in this Redis.
    cluster: Option<ResultBackend>,
}

impl RateLimits {
    /// The buckets of `registry`'s tasks: each task's `RATE_LIMIT`, else `default` (the
    /// `task_default_rate_limit` setting). `metrics` gets one waiting gauge per limited task.
    /// With `cluster`, turns are taken from buckets in that Redis, shared by all workers.
    pub fn new(
        registry: &Registry,
        default: Option<&TaskRate>,
        metrics: &Metrics,
        hostname: &str,
        cluster: Option<&ResultBackend>,
    ) -> Result<RateLimits, RateError> {
        let limits = RateLimits {
            buckets: RwLock::new(HashMap::new()),
            known: registry.names().into_iter().map(str::to_owned).collect(),
            waiting: metrics.rate_limit_waiting.clone(),
            hostname: host_label(hostname),
            cluster: cluster.cloned(),
        };
        for task in &limits.known {
            let declared = registry.policy(task).and_then(|p| p.rate_limit);
            let rate = match declared {
                Some(text) => TaskRate::parse(text).map_err(|source| RateError::Declared {
                    task: task.clone(),
                    source,
                })?,
                None => default.cloned(),
            };
            if let Some(rate) = rate {
                limits
                    .write()
                    .insert(task.clone(), limits.new_bucket(task, rate));
            }
        }
        Ok(limits)
    }

    /// The bucket of `task`, `None` when the task has no rate limit (one map lookup).
    pub fn bucket(&self, task: &str) -> Option<Arc<Bucket>> {
        self.buckets
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(task)
            .cloned()
    }

    /// The rate `task` has now, as written (what `inspect registered` shows as `rate_limit`).
    pub fn get(&self, task: &str) -> Option<String> {
        self.bucket(task)
            .and_then(|b| b.rate.borrow().as_ref().map(|r| r.as_str().to_owned()))
    }

    /// Celery's `rate_limit` control command: sets `task`'s rate (`None`, `""` or `"0"`:
    /// removes it) and returns Celery's reply. Jobs already waiting follow the new rate at
    /// once; without a rate they go at once. An invalid rate is refused before the task name
    /// is looked at, as in Celery.
    pub fn set(&self, task: &str, rate: Option<&str>) -> Result<&'static str, RateError> {
        let rate = match rate {
            Some(text) => TaskRate::parse(text)?,
            None => None,
        };
        if !self.known.contains(task) {
            tracing::error!(task, "rate limit attempt for unknown task");
            return Err(RateError::UnknownTask(task.to_owned()));
        }
        let mut buckets = self.write();
        match rate {
            Some(rate) => {
                tracing::info!(task, rate = %rate, "new rate limit");
                match buckets.get(task) {
                    Some(bucket) => {
                        bucket.rate.send_replace(Some(rate));
                    }
                    None => {
                        buckets.insert(task.to_owned(), self.new_bucket(task, rate));
                    }
                }
                Ok(SET_REPLY)
            }
            None => {
                tracing::info!(task, "rate limit disabled");
                if let Some(bucket) = buckets.remove(task) {
                    // Jobs waiting on it see no rate and go.
                    bucket.rate.send_replace(None);
                }
                Ok(DISABLED_REPLY)
            }
        }
    }

    /// The `rate_limit` control command as it arrives on the pidbox: `arguments` is Celery's
    /// `{"task_name": ..., "rate_limit": "5/s" | 5 | null}`, the reply Celery's `{"ok": ...}`
    /// or `{"error": ...}`.
    pub fn control(&self, arguments: &serde_json::Value) -> serde_json::Value {
        use serde_json::{json, Value};
        let task = arguments.get("task_name").and_then(Value::as_str);
        let rate = match arguments.get("rate_limit") {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(text)) => Ok(Some(text.clone())),
            Some(Value::Number(n)) => Ok(Some(n.to_string())),
            Some(other) => Err(RateError::Invalid(RateParseError {
                text: other.to_string(),
            })),
        };
        let outcome = match (task, rate) {
            (_, Err(e)) => Err(e),
            (None, Ok(_)) => Err(RateError::UnknownTask(String::new())),
            (Some(task), Ok(rate)) => self.set(task, rate.as_deref()),
        };
        match outcome {
            Ok(reply) => json!({ "ok": reply }),
            Err(e) => json!({ "error": e.to_string() }),
        }
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, Arc<Bucket>>> {
        self.buckets.write().unwrap_or_else(|e| e.into_inner())
    }

    fn new_bucket(&self, task: &str, rate: TaskRate) -> Arc<Bucket> {
        let waiting = self
            .waiting
            .get_or_create(&NameLabels {
                name: task.to_owned(),
                hostname: self.hostname.clone(),
            })
            .clone();
        let mut bucket = Bucket::new(rate, waiting);
        if let Some(backend) = &self.cluster {
            bucket.shared = Some(SharedBucket::new(backend.clone(), task));
        }
        Arc::new(bucket)
    }
}

/// One task's token bucket (capacity 1) and the queue of jobs waiting on it.
pub struct Bucket {
    /// The queue of waiting jobs, fair (first come, first served); the one holding it owns
    /// when the last job was let through.
    last: Mutex<Option<Instant>>,
    /// The rate; `None` once removed at runtime (waiting jobs then go at once).
    rate: watch::Sender<Option<TaskRate>>,
    /// Jobs waiting on this bucket now.
    waiting: Gauge,
    /// The cluster-wide bucket the first waiting job takes its turn from, if any.
    shared: Option<SharedBucket>,
}

/// How a job's wait for its rate limit ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// It may start (ask for a concurrency slot).
    Go,
    /// The worker is stopping: return the message to the broker.
    Stopped,
    /// Its turn would come after `latest`: park the message for about `wait` and let it go.
    Late { wait: Duration },
}

impl Bucket {
    pub fn new(rate: TaskRate, waiting: Gauge) -> Bucket {
        Bucket {
            last: Mutex::new(None),
            rate: watch::Sender::new(Some(rate)),
            waiting,
            shared: None,
        }
    }

    /// Waits for this job's turn: behind every job that arrived before it, then until one
    /// interval has passed since the previous job was let through. Gives up on `stop`, and
    /// when its turn would come after `latest` (the last moment the job can start and still be
    /// acknowledged before the broker's timeout).
    pub async fn admit(&self, latest: Instant, stop: &CancellationToken) -> Admission {
        self.waiting.inc();
        let _counted = Uncount(&self.waiting);
        let mut last = tokio::select! {
            biased;
            _ = stop.cancelled() => return Admission::Stopped,
            held = self.last.lock() => held,
            _ = tokio::time::sleep_until(latest) => {
                // Still queued behind others at its deadline: about one interval per job ahead.
                let interval = self.interval().unwrap_or_default();
                let ahead = u32::try_from(self.waiting.get().max(1)).unwrap_or(u32::MAX);
                return Admission::Late { wait: interval.saturating_mul(ahead) };
            }
        };
        let mut rate = self.rate.subscribe();
        loop {
            let Some(interval) = rate.borrow_and_update().as_ref().map(TaskRate::interval) else {
                return Admission::Go;
            };
            let Some(next) = self.next_turn(interval, *last).await else {
                *last = Some(Instant::now());
                return Admission::Go;
            };
            let now = Instant::now();
            if next > latest {
                return Admission::Late { wait: next - now };
            }
            tokio::select! {
                biased;
                _ = stop.cancelled() => return Admission::Stopped,
                // The sender lives in `self`, so `changed` only returns on a new rate.
                _ = rate.changed() => {},
                _ = tokio::time::sleep_until(next) => {},
            }
        }
    }

    /// `None`: the turn is there and taken (in Redis, for a cluster-wide bucket); else when
    /// it will be. `last`: when this worker last let a job through.
    async fn next_turn(&self, interval: Duration, last: Option<Instant>) -> Option<Instant> {
        if let Some(shared) = &self.shared {
            match shared.take(interval).await {
                Ok(wait) if wait.is_zero() => return None,
                Ok(wait) => return Some(Instant::now() + wait),
                Err(e) => tracing::warn!(
                    error = %e,
                    "cannot take a turn from the cluster-wide rate limit; this worker's own \
                     bucket decides meanwhile"
                ),
            }
        }
        let next = last.map(|at| at + interval)?;
        (next > Instant::now()).then_some(next)
    }

    /// The time between two jobs' starts now; `None`: no limit.
    pub fn interval(&self) -> Option<Duration> {
        self.rate.borrow().as_ref().map(TaskRate::interval)
    }
}

/// Takes a job off the waiting gauge however its wait ends (a dropped future included).
struct Uncount<'a>(&'a Gauge);

impl Drop for Uncount<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::task::{Task, TaskContext};
    use crate::TaskError;

    fn rate(text: &str) -> TaskRate {
        TaskRate::parse(text).unwrap().unwrap()
    }

    const FAR: Duration = Duration::from_secs(3600);

    /// Starts `n` jobs on `bucket` one after the other (each queued before the next), and
    /// returns when each was let through, in the order they finished waiting.
    async fn admit_all(bucket: &Arc<Bucket>, n: usize) -> Vec<(usize, Duration)> {
        let t0 = Instant::now();
        let stop = CancellationToken::new();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        for i in 0..n {
            let (bucket, stop, tx) = (bucket.clone(), stop.clone(), tx.clone());
            tokio::spawn(async move {
                let outcome = bucket.admit(Instant::now() + FAR, &stop).await;
                assert_eq!(outcome, Admission::Go);
                let _ = tx.send((i, t0.elapsed()));
            });
            // Let it reach the queue before the next one arrives.
            tokio::task::yield_now().await;
        }
        drop(tx);
        let mut out = Vec::new();
        while let Some(x) = rx.recv().await {
            out.push(x);
        }
        out
    }

    #[tokio::test(start_paused = true)]
    async fn jobs_go_one_interval_apart_in_arrival_order_the_first_at_once() {
        let bucket = Arc::new(Bucket::new(rate("5/s"), Gauge::default()));
        let admitted = admit_all(&bucket, 6).await;
        let order: Vec<usize> = admitted.iter().map(|(i, _)| *i).collect();
        assert_eq!(order, [0, 1, 2, 3, 4, 5]);
        let times: Vec<Duration> = admitted.iter().map(|(_, t)| *t).collect();
        let ms = |n: u64| Duration::from_millis(n);
        assert_eq!(times, [ms(0), ms(200), ms(400), ms(600), ms(800), ms(1000)]);
        assert_eq!(bucket.waiting.get(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_bucket_saves_up_one_start_only() {
        let bucket = Arc::new(Bucket::new(rate("10/m"), Gauge::default()));
        admit_all(&bucket, 1).await;
        tokio::time::sleep(Duration::from_secs(600)).await;
        let times: Vec<Duration> = admit_all(&bucket, 3)
            .await
            .into_iter()
            .map(|(_, t)| t)
            .collect();
        let s = Duration::from_secs;
        assert_eq!(
            times,
            [s(0), s(6), s(12)],
            "capacity 1: no burst after idling"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_stop_ends_the_wait_and_the_gauge_counts_waiting_jobs() {
        let bucket = Arc::new(Bucket::new(rate("1/m"), Gauge::default()));
        admit_all(&bucket, 1).await;
        let stop = CancellationToken::new();
        let waiters: Vec<_> = (0..3)
            .map(|_| {
                let (bucket, stop) = (bucket.clone(), stop.clone());
                tokio::spawn(async move { bucket.admit(Instant::now() + FAR, &stop).await })
            })
            .collect();
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert_eq!(bucket.waiting.get(), 3);
        stop.cancel();
        for w in waiters {
            assert_eq!(w.await.unwrap(), Admission::Stopped);
        }
        assert_eq!(bucket.waiting.get(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_turn_after_the_ack_deadline_is_late_and_takes_no_token() {
        let bucket = Arc::new(Bucket::new(rate("1/m"), Gauge::default()));
        admit_all(&bucket, 1).await;
        let stop = CancellationToken::new();
        let t0 = Instant::now();
        let late = bucket.admit(t0 + Duration::from_secs(30), &stop).await;
        assert_eq!(
            late,
            Admission::Late {
                wait: Duration::from_secs(60)
            }
        );
        assert_eq!(Instant::now(), t0, "it gave up without waiting");
        // The token it did not take is still there for the next job at its time.
        let go = bucket.admit(t0 + FAR, &stop).await;
        assert_eq!((go, t0.elapsed()), (Admission::Go, Duration::from_secs(60)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_job_queued_behind_others_past_its_deadline_is_late() {
        let bucket = Arc::new(Bucket::new(rate("1/s"), Gauge::default()));
        admit_all(&bucket, 1).await;
        let stop = CancellationToken::new();
        let first = {
            let (bucket, stop) = (bucket.clone(), stop.clone());
            tokio::spawn(async move { bucket.admit(Instant::now() + FAR, &stop).await })
        };
        tokio::task::yield_now().await;
        let t0 = Instant::now();
        let second = bucket.admit(t0 + Duration::from_millis(500), &stop).await;
        assert!(matches!(second, Admission::Late { wait } if wait >= Duration::from_secs(1)));
        assert_eq!(t0.elapsed(), Duration::from_millis(500));
        assert_eq!(first.await.unwrap(), Admission::Go);
    }

    struct Plain;
    impl Task for Plain {
        const NAME: &'static str = "t.plain";
        type Args = serde_json::Value;
        type Output = ();
        async fn run(&self, _: TaskContext, _: Self::Args) -> Result<(), TaskError> {
            Ok(())
        }
    }
    struct Limited;
    impl Task for Limited {
        const NAME: &'static str = "t.limited";
        const RATE_LIMIT: Option<&'static str> = Some("2/s");
        type Args = serde_json::Value;
        type Output = ();
        async fn run(&self, _: TaskContext, _: Self::Args) -> Result<(), TaskError> {
            Ok(())
        }
    }
    struct OptedOut;
    impl Task for OptedOut {
        const NAME: &'static str = "t.opted_out";
        const RATE_LIMIT: Option<&'static str> = Some("0");
        type Args = serde_json::Value;
        type Output = ();
        async fn run(&self, _: TaskContext, _: Self::Args) -> Result<(), TaskError> {
            Ok(())
        }
    }
    struct Broken;
    impl Task for Broken {
        const NAME: &'static str = "t.broken";
        const RATE_LIMIT: Option<&'static str> = Some("2/day");
        type Args = serde_json::Value;
        type Output = ();
        async fn run(&self, _: TaskContext, _: Self::Args) -> Result<(), TaskError> {
            Ok(())
        }
    }

    fn registry() -> Registry {
        Registry::new()
            .register(Plain)
            .register(Limited)
            .register(OptedOut)
    }

    #[test]
    fn a_tasks_own_rate_wins_over_the_default_and_0_opts_out() {
        let m = Metrics::new();
        let none = RateLimits::new(&registry(), None, &m, "w@h", None).unwrap();
        assert_eq!(none.get("t.limited").as_deref(), Some("2/s"));
        assert!(none.bucket("t.plain").is_none() && none.bucket("t.opted_out").is_none());
        let default = rate("100/m");
        let with = RateLimits::new(&registry(), Some(&default), &m, "w@h", None).unwrap();
        assert_eq!(with.get("t.plain").as_deref(), Some("100/m"));
        assert_eq!(with.get("t.limited").as_deref(), Some("2/s"));
        assert_eq!(with.get("t.opted_out"), None);
        let err = RateLimits::new(&registry().register(Broken), None, &m, "w@h", None)
            .err()
            .unwrap();
        assert!(
            matches!(&err, RateError::Declared { task, .. } if task == "t.broken"),
            "{err}"
        );
        assert!(err.to_string().contains("\"2/day\" is not a rate"), "{err}");
        assert!(m
            .render()
            .contains(r#"mediafarm_task_rate_limit_waiting{name="t.limited",hostname="h"} 0"#));
    }

    #[test]
    fn the_control_command_answers_as_celery_does() {
        let limits = RateLimits::new(&registry(), None, &Metrics::new(), "w", None).unwrap();
        assert_eq!(limits.set("t.plain", Some("10/m")), Ok(SET_REPLY));
        assert_eq!(limits.get("t.plain").as_deref(), Some("10/m"));
        assert_eq!(limits.set("t.limited", Some("1/h")), Ok(SET_REPLY));
        assert_eq!(limits.get("t.limited").as_deref(), Some("1/h"));
        for off in [None, Some(""), Some("0")] {
            limits.set("t.plain", Some("1/s")).unwrap();
            assert_eq!(limits.set("t.plain", off), Ok(DISABLED_REPLY), "{off:?}");
            assert!(limits.bucket("t.plain").is_none());
        }
        let unknown = limits.set("t.nope", Some("1/s")).unwrap_err();
        assert_eq!(unknown.to_string(), "unknown task");
        // The rate is checked first, as Celery does.
        let invalid = limits.set("t.nope", Some("fast")).unwrap_err();
        assert!(
            invalid
                .to_string()
                .starts_with("Invalid rate limit string: \"fast\" is not a rate"),
            "{invalid}"
        );
    }

    #[test]
    fn the_control_message_gets_celerys_reply() {
        use serde_json::json;
        let limits = RateLimits::new(&registry(), None, &Metrics::new(), "w", None).unwrap();
        let reply = |args| limits.control(&args);
        assert_eq!(
            reply(json!({"task_name": "t.plain", "rate_limit": "5/m"})),
            json!({"ok": "new rate limit set successfully"})
        );
        assert_eq!(limits.get("t.plain").as_deref(), Some("5/m"));
        assert_eq!(
            reply(json!({"task_name": "t.plain", "rate_limit": 4})),
            json!({"ok": "new rate limit set successfully"})
        );
        assert_eq!(
            limits.bucket("t.plain").and_then(|b| b.interval()),
            Some(Duration::from_millis(250))
        );
        assert_eq!(
            reply(json!({"task_name": "t.plain", "rate_limit": null})),
            json!({"ok": "rate limit disabled successfully"})
        );
        assert_eq!(
            reply(json!({"task_name": "t.other", "rate_limit": "1/s"})),
            json!({"error": "unknown task"})
        );
        let bad = reply(json!({"task_name": "t.plain", "rate_limit": "1/d"}));
        assert!(
            bad["error"]
                .as_str()
                .is_some_and(|e| e.starts_with("Invalid rate limit string: \"1/d\"")),
            "{bad}"
        );
        let bad = reply(json!({"task_name": "t.plain", "rate_limit": [1]}));
        assert!(bad.get("error").is_some(), "{bad}");
    }

    #[tokio::test(start_paused = true)]
    async fn waiting_jobs_follow_a_new_rate_at_once() {
        let limits = RateLimits::new(&registry(), None, &Metrics::new(), "w", None).unwrap();
        limits.set("t.plain", Some("1/h")).unwrap();
        let bucket = limits.bucket("t.plain").unwrap();
        admit_all(&bucket, 1).await;
        let stop = CancellationToken::new();
        let t0 = Instant::now();
        let waiter = {
            let (bucket, stop) = (bucket.clone(), stop.clone());
            tokio::spawn(async move { bucket.admit(Instant::now() + FAR * 2, &stop).await })
        };
        tokio::time::sleep(Duration::from_secs(5)).await;
        limits.set("t.plain", Some("6/m")).unwrap();
        assert_eq!(waiter.await.unwrap(), Admission::Go);
        assert_eq!(
            t0.elapsed(),
            Duration::from_secs(10),
            "10 s after the last start"
        );
        let waiter = {
            let (bucket, stop) = (bucket.clone(), stop.clone());
            tokio::spawn(async move { bucket.admit(Instant::now() + FAR, &stop).await })
        };
        tokio::time::sleep(Duration::from_secs(1)).await;
        limits.set("t.plain", None).unwrap();
        assert_eq!(waiter.await.unwrap(), Admission::Go);
        assert_eq!(
            t0.elapsed(),
            Duration::from_secs(11),
            "went when the rate was removed"
        );
    }
}

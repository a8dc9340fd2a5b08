//! Work a worker's tasks own beside their jobs: a reader that drains a Redis Stream without
//! waiting for jobs, a probe of a database that `/readyz` must reflect, gauges refreshed on a
//! timer. A worker binary registers it with its tasks ([`Registry::background`]); the runtime
//! starts each piece once, after the endpoints are up, and hands it a [`Background`].
//!
//! **Stopping.** On SIGTERM (or `control shutdown`) the context's stop signal is set at the same
//! moment the consumers are cancelled. The work should then finish what it holds — commit, then
//! acknowledge — and return; the runtime waits for it alongside the running jobs, within
//! `worker_shutdown_grace`, and then lets the process end. Whatever is still running then dies
//! with the process, so background work keeps the promise jobs keep: nothing is acknowledged
//! before it is safe.
//!
//! ```ignore
//! Registry::new()
//!     .register(MyTask::new(state.clone()))
//!     .background("my-reader", move |bg| Box::pin(reader(state.clone(), bg)));
//! // async fn reader(state: Arc<State>, bg: Background) {
//! //     while !bg.is_stopping() { …; bg.pause(Duration::from_secs(1)).await; }
//! // }
//! ```

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use tokio_util::sync::CancellationToken;

use crate::backend::ResultBackend;
use crate::observe::http::Readiness;
use crate::observe::metrics::Metrics;
use crate::settings::Settings;

/// Starts one piece of background work from its context; called once per worker start.
pub type StartBackground = Arc<dyn Fn(Background) -> BoxFuture<'static, ()> + Send + Sync>;

/// What background work sees of its worker.
pub struct Background {
    name: &'static str,
    hostname: Arc<str>,
    settings: Settings,
    backend: ResultBackend,
    metrics: Metrics,
    readiness: Arc<Readiness>,
    stop: CancellationToken,
}

impl Background {
    pub(crate) fn new(
        name: &'static str,
        hostname: Arc<str>,
        settings: Settings,
        backend: ResultBackend,
        metrics: Metrics,
        readiness: Arc<Readiness>,
        stop: CancellationToken,
    ) -> Background {
        Background {
            name,
            hostname,
            settings,
            backend,
            metrics,
            readiness,
            stop,
        }
    }

    /// The name it was registered under.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// The worker's node name (unique per process: a good Redis consumer name).
    pub fn hostname(&self) -> &str {
        &self.hostname
    }

    /// The worker's core settings.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// The result backend (Redis); for blocking commands take
    /// [`ResultBackend::dedicated_connection`].
    pub fn backend(&self) -> &ResultBackend {
        &self.backend
    }

    /// The worker's metrics, to [`Metrics::register`] series of its own.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Whether the worker is stopping: finish what is held and return.
    pub fn is_stopping(&self) -> bool {
        self.stop.is_cancelled()
    }

    /// Resolves when the worker starts stopping.
    pub async fn stopping(&self) {
        self.stop.cancelled().await
    }

    /// Waits `wait`, or less if the worker starts stopping; `false` when it is stopping.
    pub async fn pause(&self, wait: Duration) -> bool {
        tokio::select! {
            _ = self.stop.cancelled() => false,
            _ = tokio::time::sleep(wait) => true,
        }
    }

    /// Says what keeps the worker from being ready (`None`: nothing this work knows of);
    /// `/readyz` answers 503 with the reason while one is set.
    pub fn set_not_ready(&self, why: Option<String>) {
        self.readiness.set_check(self.name, why);
    }
}

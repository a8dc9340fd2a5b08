//! OTLP/HTTP JSON export, written here rather than taken from `opentelemetry-otlp`: the format
//! is one JSON document per batch (`ExportTraceServiceRequest`), posted with the `reqwest`
//! client the crate already builds, so tracing adds no crate to the build (the SDK + OTLP
//! crates with `http-proto` would add prost, opentelemetry-proto and the SDK: ~40 crates).
//!
//! What it promises: a job never waits for it. Finished spans go into a bounded queue with
//! `try_send` (a full queue drops the span and counts it) and are turned into JSON on the
//! exporter's own thread, which wakes once per schedule delay, or early when [`MAX_BATCH`]
//! spans wait, and posts them a batch at a time. Failed posts are counted and logged at most
//! once a minute.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot, Notify};

/// Spans waiting for export beyond this are dropped (and counted), never waited for.
pub const QUEUE: usize = 4096;
/// The most spans in one request (OpenTelemetry's `OTEL_BSP_MAX_EXPORT_BATCH_SIZE` default).
pub const MAX_BATCH: usize = 512;
const LOG_EVERY: Duration = Duration::from_secs(60);
const POST_TIMEOUT: Duration = Duration::from_secs(10);

/// Where and how spans are sent.
#[derive(Clone, Debug)]
pub struct ExportConfig {
    /// The full traces URL (`…/v1/traces`).
    pub endpoint: String,
    pub service_name: String,
    /// Extra request headers (`OTEL_EXPORTER_OTLP_HEADERS`), e.g. an API key.
    pub headers: Vec<(String, String)>,
    /// How long a partial batch waits for more spans (`OTEL_BSP_SCHEDULE_DELAY`).
    pub schedule_delay: Duration,
}

/// What the exporter has done so far.
#[derive(Debug, Default)]
pub struct ExportStats {
    /// Spans the receiver accepted.
    pub exported: AtomicU64,
    /// Spans dropped because the queue was full.
    pub dropped: AtomicU64,
    /// Spans in batches the receiver refused or could not be reached for.
    pub failed: AtomicU64,
}

/// A finished span, turned into OTLP JSON on the exporter's thread (not the job's).
pub(crate) type Finished = Box<dyn FnOnce() -> Value + Send>;

/// The sending half: what a finished span is handed to.
pub(crate) struct Exporter {
    spans: mpsc::Sender<Finished>,
    flushes: mpsc::UnboundedSender<oneshot::Sender<()>>,
    /// Wakes the exporter early when a full batch is waiting; otherwise it wakes once per
    /// schedule delay, not once per span (a wake-up per job cost more than the span itself).
    full: Arc<Notify>,
    pub stats: Arc<ExportStats>,
}

impl Exporter {
    /// Starts the batching task on a thread of its own (one small current-thread runtime), so
    /// it needs no runtime from its caller, outlives the runtime that installed it, and never
    /// takes time from the workers' threads.
    pub fn start(config: ExportConfig) -> Exporter {
        let (spans, rx) = mpsc::channel(QUEUE);
        let (flushes, flush_rx) = mpsc::unbounded_channel();
        let full = Arc::new(Notify::new());
        let stats = Arc::new(ExportStats::default());
        let batching = batch_loop(config, rx, flush_rx, full.clone(), stats.clone());
        let started = std::thread::Builder::new()
            .name("otlp-export".into())
            .spawn(move || {
                match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt.block_on(batching),
                    Err(e) => tracing::error!(error = %e, "OTLP export: no runtime; traces are not exported"),
                }
            });
        if let Err(e) = started {
            tracing::error!(error = %e, "OTLP export: no thread; traces are not exported");
        }
        Exporter {
            spans,
            flushes,
            full,
            stats,
        }
    }

    /// Queues one span; drops it when the queue is full.
    pub fn send(&self, span: Finished) {
        if self.spans.try_send(span).is_err() {
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if QUEUE - self.spans.capacity() >= MAX_BATCH {
            self.full.notify_one();
        }
    }

    /// Asks for what is queued to be sent now; `done` is told when it has been.
    pub fn flush(&self, done: oneshot::Sender<()>) {
        let _ = self.flushes.send(done);
    }
}

async fn batch_loop(
    config: ExportConfig,
    mut rx: mpsc::Receiver<Finished>,
    mut flush_rx: mpsc::UnboundedReceiver<oneshot::Sender<()>>,
    full: Arc<Notify>,
    stats: Arc<ExportStats>,
) {
    let client = match reqwest::Client::builder().timeout(POST_TIMEOUT).build() {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "OTLP export: could not build the HTTP client; traces are not exported");
            return;
        }
    };
    let resource = resource(&config.service_name);
    let mut last_logged: Option<Instant> = None;
    loop {
        let mut flushed = Vec::new();
        tokio::select! {
            _ = tokio::time::sleep(config.schedule_delay) => {}
            _ = full.notified() => {}
            done = flush_rx.recv() => match done {
                Some(done) => flushed.push(done),
                None => break,
            },
        }
        let mut batch = Vec::with_capacity(MAX_BATCH);
        while let Ok(span) = rx.try_recv() {
            batch.push(span());
            if batch.len() == MAX_BATCH {
                let spans = std::mem::replace(&mut batch, Vec::with_capacity(MAX_BATCH));
                post(&client, &config, &resource, spans, &stats, &mut last_logged).await;
            }
        }
        if !batch.is_empty() {
            post(&client, &config, &resource, batch, &stats, &mut last_logged).await;
        }
        for done in flushed {
            let _ = done.send(());
        }
    }
}

async fn post(
    client: &reqwest::Client,
    config: &ExportConfig,
    resource: &Value,
    spans: Vec<Value>,
    stats: &ExportStats,
    last_logged: &mut Option<Instant>,
) {
    let n = spans.len() as u64;
    let body = json!({
        "resourceSpans": [{
            "resource": resource,
            "scopeSpans": [{
                "scope": {"name": "mediafarm", "version": env!("CARGO_PKG_VERSION")},
                "spans": spans,
            }],
        }],
    });
    let mut request = client
        .post(&config.endpoint)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(body.to_string());
    for (k, v) in &config.headers {
        request = request.header(k, v);
    }
    let error = match request.send().await {
        Ok(r) if r.status().is_success() => {
            stats.exported.fetch_add(n, Ordering::Relaxed);
            return;
        }
        Ok(r) => format!("the receiver answered {}", r.status()),
        Err(e) => e.to_string(),
    };
    let failed = stats.failed.fetch_add(n, Ordering::Relaxed) + n;
    if last_logged.is_none_or(|t| t.elapsed() >= LOG_EVERY) {
        *last_logged = Some(Instant::now());
        tracing::warn!(
            endpoint = %config.endpoint,
            %error,
            spans_failed_so_far = failed,
            "OTLP export failed; spans are dropped (logged at most once a minute)"
        );
    }
}

fn resource(service_name: &str) -> Value {
    json!({"attributes": [
        attribute("service.name", json!(service_name)),
        attribute("host.name", json!(crate::hostname())),
        attribute("telemetry.sdk.name", json!("mediafarm")),
        attribute("telemetry.sdk.language", json!("rust")),
        attribute("telemetry.sdk.version", json!(env!("CARGO_PKG_VERSION"))),
    ]})
}

/// One OTLP `KeyValue` in JSON: strings, integers (as strings, per the protobuf JSON mapping)
/// and booleans are what mediafarm's spans carry.
pub(crate) fn attribute(key: &str, value: Value) -> Value {
    let value = match value {
        Value::Bool(b) => json!({"boolValue": b}),
        Value::Number(n) if n.is_i64() || n.is_u64() => json!({"intValue": n.to_string()}),
        Value::Number(n) => json!({"doubleValue": n}),
        Value::String(s) => json!({"stringValue": s}),
        other => json!({"stringValue": other.to_string()}),
    };
    json!({"key": key, "value": value})
}

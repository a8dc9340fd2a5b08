//! The HTTP endpoints on `metrics_addr`: `/metrics` (Prometheus text), `/healthz` (alive) and
//! `/readyz` (ready for work). A worker is alive while the process answers and no job has
//! overrun its hard time limit (`watchdog`), and ready while alive, connected to RabbitMQ and
//! Redis and consuming, and while no check a worker's background work reports
//! ([`Readiness::set_check`]: persist-worker's database, say) says otherwise; other processes (`mediafarm beat`) say what
//! the endpoints report through [`Probe`].

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::observe::metrics::Metrics;
use crate::observe::watchdog::RunningJobs;

/// What `/readyz` and `/healthz` report; set by the worker as connections come and go and as
/// jobs start and end.
#[derive(Default)]
pub struct Readiness {
    pub broker: AtomicBool,
    pub backend: AtomicBool,
    pub consuming: AtomicBool,
    pub running: RunningJobs,
    /// What a worker's own checks report missing, by check name (absent: fine).
    checks: Mutex<BTreeMap<String, String>>,
}

impl Readiness {
    /// `None` while alive, else why not: a job overran its hard time limit (see `watchdog`).
    pub fn wedged(&self) -> Option<String> {
        self.running.overdue(std::time::Instant::now())
    }

    /// `None` when ready, else what is missing.
    pub fn problem(&self) -> Option<String> {
        if let Some(wedged) = self.wedged() {
            return Some(wedged);
        }
        let mut missing = Vec::new();
        if !self.broker.load(Ordering::Relaxed) {
            missing.push("broker (RabbitMQ) not connected");
        }
        if !self.backend.load(Ordering::Relaxed) {
            missing.push("result backend (Redis) not reachable");
        }
        if !self.consuming.load(Ordering::Relaxed) {
            missing.push("not consuming");
        }
        let checks = self.checks.lock().unwrap_or_else(|e| e.into_inner());
        missing.extend(checks.values().map(String::as_str));
        (!missing.is_empty()).then(|| missing.join("; "))
    }

    /// Sets what a worker's own check `name` finds missing (`None`: nothing, ready as far as
    /// it goes), shown by `/readyz` beside the runtime's own reasons.
    pub fn set_check(&self, name: &str, missing: Option<String>) {
        let mut checks = self.checks.lock().unwrap_or_else(|e| e.into_inner());
        match missing {
            Some(why) => checks.insert(name.to_owned(), why),
            None => checks.remove(name),
        };
    }
}

/// What the endpoints report, for one kind of process.
pub trait Probe: Send + Sync + 'static {
    /// The Prometheus text exposition for `/metrics`.
    fn metrics(&self) -> String;
    /// `None` while alive, else why not (`/healthz` answers 503).
    fn unhealthy(&self) -> Option<String> {
        None
    }
    /// `None` when ready, else what is missing (`/readyz` answers 503).
    fn not_ready(&self) -> Option<String>;
}

/// A worker's endpoints: alive while it answers, ready as `Readiness` says.
struct WorkerProbe {
    metrics: Metrics,
    readiness: Arc<Readiness>,
}

impl Probe for WorkerProbe {
    fn metrics(&self) -> String {
        self.metrics.render()
    }

    fn unhealthy(&self) -> Option<String> {
        self.readiness.wedged()
    }

    fn not_ready(&self) -> Option<String> {
        self.readiness.problem()
    }
}

#[derive(Debug, thiserror::Error)]
#[error("cannot serve metrics on metrics_addr = {addr}: {source}")]
pub struct BindError {
    pub addr: SocketAddr,
    pub source: std::io::Error,
}

/// Binds `addr` and serves a worker's endpoints until `stop`; returns the bound address
/// (port 0 picks one).
pub async fn serve(
    addr: SocketAddr,
    metrics: Metrics,
    readiness: Arc<Readiness>,
    stop: CancellationToken,
) -> Result<SocketAddr, BindError> {
    serve_probe(addr, Arc::new(WorkerProbe { metrics, readiness }), stop).await
}

/// Binds `addr` and serves what `probe` reports until `stop`; returns the bound address.
pub async fn serve_probe(
    addr: SocketAddr,
    probe: Arc<dyn Probe>,
    stop: CancellationToken,
) -> Result<SocketAddr, BindError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| BindError { addr, source })?;
    let local = listener
        .local_addr()
        .map_err(|source| BindError { addr, source })?;
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                _ = stop.cancelled() => break,
                a = listener.accept() => a,
            };
            let Ok((stream, _)) = accepted else { continue };
            let probe = probe.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req| {
                    let response = route(&req, probe.as_ref());
                    async move { Ok::<_, Infallible>(response) }
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok(local)
}

fn route(req: &Request<Incoming>, probe: &dyn Probe) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n".into());
    }
    match req.uri().path() {
        "/metrics" => {
            let mut r = text(StatusCode::OK, probe.metrics());
            r.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
            r
        }
        "/healthz" => match probe.unhealthy() {
            None => text(StatusCode::OK, "ok\n".into()),
            Some(why) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("unhealthy: {why}\n"),
            ),
        },
        "/readyz" => match probe.not_ready() {
            None => text(StatusCode::OK, "ready\n".into()),
            Some(why) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {why}\n"),
            ),
        },
        _ => text(
            StatusCode::NOT_FOUND,
            "try /metrics, /healthz or /readyz\n".into(),
        ),
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn get(addr: SocketAddr, path: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn serves_health_readiness_and_metrics() {
        let readiness = Arc::new(Readiness::default());
        let stop = CancellationToken::new();
        let metrics = Metrics::new();
        metrics
            .up
            .get_or_create(&crate::observe::metrics::WorkerLabels {
                hostname: "w".into(),
            })
            .set(1);
        let addr = serve(
            "127.0.0.1:0".parse().unwrap(),
            metrics,
            readiness.clone(),
            stop.clone(),
        )
        .await
        .unwrap();
        assert!(get(addr, "/healthz").await.starts_with("HTTP/1.1 200"));
        let r = get(addr, "/readyz").await;
        assert!(
            r.starts_with("HTTP/1.1 503") && r.contains("broker (RabbitMQ) not connected"),
            "{r}"
        );
        for flag in [&readiness.broker, &readiness.backend, &readiness.consuming] {
            flag.store(true, Ordering::Relaxed);
        }
        assert!(get(addr, "/readyz").await.starts_with("HTTP/1.1 200"));
        readiness.set_check("db", Some("database unreachable".into()));
        let r = get(addr, "/readyz").await;
        assert!(
            r.starts_with("HTTP/1.1 503") && r.contains("database unreachable"),
            "{r}"
        );
        readiness.set_check("db", None);
        assert!(get(addr, "/readyz").await.starts_with("HTTP/1.1 200"));
        let m = get(addr, "/metrics").await;
        assert!(m.contains("celery_worker_up{hostname=\"w\"} 1"), "{m}");
        assert!(get(addr, "/nope").await.starts_with("HTTP/1.1 404"));
        stop.cancel();
    }

    #[tokio::test]
    async fn a_taken_port_names_the_setting() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap();
        let err = serve(
            addr,
            Metrics::new(),
            Arc::default(),
            CancellationToken::new(),
        )
        .await
        .unwrap_err();
        assert!(err.to_string().contains("metrics_addr"), "{err}");
    }
}

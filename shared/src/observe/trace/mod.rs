//! OpenTelemetry traces: a span per job, joined to the producer's trace and passed on.
//!
//! - **In**: the W3C `traceparent`/`tracestate` message headers that Python's
//!   opentelemetry-instrumentation-celery writes (`context`); the job's span is their child.
//! - **The span** (`span`): named and labelled as that instrumentation names a Python worker's
//!   (`run/<task>`), current while the job runs, publishes what follows and settles.
//! - **Out**: every message published while a span is current (callbacks, chain steps,
//!   `send_task` from a job, through [`inject_headers`]) and every outbound HTTP request
//!   (webhooks, web sources, through [`inject_http`]) carries the span as `traceparent`.
//! - **Export** (`export`): OTLP over HTTP, JSON, off unless [`install`]ed — workers install it
//!   when `OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is set
//!   ([`install_from_env`]). Off, a job pays one atomic load and allocates nothing.

mod context;
mod export;
mod span;

use std::sync::OnceLock;
use std::time::Duration;

use serde_json::{Map, Value};

pub use context::{Propagated, SpanContext};
pub use export::{ExportConfig, ExportStats, MAX_BATCH, QUEUE};
pub use span::{current, outcome, retrying, JobInfo, JobSpan};

static EXPORTER: OnceLock<export::Exporter> = OnceLock::new();

/// OpenTelemetry's default `OTEL_BSP_SCHEDULE_DELAY`: how long a partial batch waits.
const DEFAULT_SCHEDULE_DELAY: Duration = Duration::from_millis(5000);

/// An OpenTelemetry environment variable mediafarm cannot honour.
#[derive(Debug, thiserror::Error)]
pub enum TraceConfigError {
    #[error(
        "{name}={value:?}: mediafarm exports traces over OTLP/HTTP (JSON); accepted: \
         http/json, or http/protobuf (the same OTLP/HTTP endpoint, sent as JSON)"
    )]
    Protocol { name: &'static str, value: String },
    #[error("{name}={value:?}: expected a whole number of milliseconds")]
    Delay { name: &'static str, value: String },
}

/// Starts exporting spans (on the current Tokio runtime); `false` if an exporter was already
/// installed in this process, which stays.
pub fn install(config: ExportConfig) -> bool {
    let mut installed = false;
    EXPORTER.get_or_init(|| {
        installed = true;
        tracing::info!(endpoint = %config.endpoint, service = %config.service_name, "exporting traces over OTLP/HTTP");
        export::Exporter::start(config)
    });
    installed
}

/// Installs the exporter the standard OpenTelemetry variables describe, if they turn it on.
pub fn install_from_env(default_service_name: &str) -> Result<bool, TraceConfigError> {
    match config_from(|name| std::env::var(name).ok(), default_service_name)? {
        Some(config) => Ok(install(config)),
        None => Ok(false),
    }
}

/// Whether spans are recorded and exported in this process.
pub fn enabled() -> bool {
    EXPORTER.get().is_some()
}

/// What the exporter has sent, dropped and failed to send; `None` when export is off.
pub fn stats() -> Option<&'static ExportStats> {
    EXPORTER.get().map(|e| &*e.stats)
}

/// Sends what is queued now and waits (at most `within`) until it is sent.
pub async fn flush(within: Duration) {
    let Some(exporter) = EXPORTER.get() else {
        return;
    };
    let (done, sent) = tokio::sync::oneshot::channel();
    exporter.flush(done);
    let _ = tokio::time::timeout(within, sent).await;
}

/// Writes the current span as `traceparent` (and `tracestate`) into a Celery message's
/// headers, where Python's instrumentation reads it; nothing when no span is current.
pub fn inject_headers(headers: &mut Map<String, Value>) {
    if let Some(p) = current() {
        headers.insert("traceparent".into(), Value::String(p.span.traceparent()));
        match p.tracestate {
            Some(state) => headers.insert("tracestate".into(), Value::String(state.to_string())),
            None => headers.remove("tracestate"),
        };
    }
}

/// Adds the current span's `traceparent` (and `tracestate`) to an outgoing HTTP request.
pub fn inject_http(request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
    match current() {
        Some(p) => {
            let request = request.header("traceparent", p.span.traceparent());
            match p.tracestate {
                Some(state) => request.header("tracestate", &*state),
                None => request,
            }
        }
        None => request,
    }
}

/// The exporter configuration from OpenTelemetry's environment variables (read through
/// `var`), or `None` when they leave export off.
pub fn config_from(
    var: impl Fn(&str) -> Option<String>,
    default_service_name: &str,
) -> Result<Option<ExportConfig>, TraceConfigError> {
    let set = |name: &str| {
        var(name)
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty())
    };
    if set("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true"))
        || set("OTEL_TRACES_EXPORTER").is_some_and(|v| v.eq_ignore_ascii_case("none"))
    {
        return Ok(None);
    }
    let endpoint = match set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") {
        Some(url) => url,
        None => match set("OTEL_EXPORTER_OTLP_ENDPOINT") {
            Some(base) => format!("{}/v1/traces", base.trim_end_matches('/')),
            None => return Ok(None),
        },
    };
    for name in [
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
        "OTEL_EXPORTER_OTLP_PROTOCOL",
    ] {
        if let Some(value) = set(name) {
            if value != "http/json" && value != "http/protobuf" {
                return Err(TraceConfigError::Protocol { name, value });
            }
            break;
        }
    }
    let headers = set("OTEL_EXPORTER_OTLP_TRACES_HEADERS")
        .or_else(|| set("OTEL_EXPORTER_OTLP_HEADERS"))
        .map(|h| {
            h.split(',')
                .filter_map(|pair| pair.split_once('='))
                .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
                .collect()
        })
        .unwrap_or_default();
    let name = "OTEL_BSP_SCHEDULE_DELAY";
    let schedule_delay = match set(name) {
        Some(value) => match value.parse::<u64>() {
            Ok(ms) => Duration::from_millis(ms.max(1)),
            Err(_) => return Err(TraceConfigError::Delay { name, value }),
        },
        None => DEFAULT_SCHEDULE_DELAY,
    };
    Ok(Some(ExportConfig {
        endpoint,
        service_name: set("OTEL_SERVICE_NAME").unwrap_or_else(|| default_service_name.to_owned()),
        headers,
        schedule_delay,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(vars: &[(&str, &str)]) -> Result<Option<ExportConfig>, TraceConfigError> {
        let vars: Vec<(String, String)> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        config_from(
            |name| vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone()),
            "image-worker",
        )
    }

    #[test]
    fn export_is_off_unless_an_endpoint_is_set() {
        assert!(config(&[]).unwrap().is_none());
        assert!(config(&[("OTEL_SERVICE_NAME", "x")]).unwrap().is_none());
        let on = [("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318/")];
        assert!(config(&[on[0], ("OTEL_SDK_DISABLED", "true")])
            .unwrap()
            .is_none());
        assert!(config(&[on[0], ("OTEL_TRACES_EXPORTER", "none")])
            .unwrap()
            .is_none());
    }

    #[test]
    fn endpoints_service_name_headers_and_delay_follow_the_otel_variables() {
        let c = config(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318/")])
            .unwrap()
            .unwrap();
        assert_eq!(c.endpoint, "http://collector:4318/v1/traces");
        assert_eq!(c.service_name, "image-worker");
        assert_eq!(c.schedule_delay, DEFAULT_SCHEDULE_DELAY);
        let c = config(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318"),
            (
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                "http://other:9/traces",
            ),
            ("OTEL_SERVICE_NAME", "thumbs"),
            ("OTEL_EXPORTER_OTLP_HEADERS", "api-key=abc, x-team = media"),
            ("OTEL_BSP_SCHEDULE_DELAY", "250"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(c.endpoint, "http://other:9/traces");
        assert_eq!(c.service_name, "thumbs");
        assert_eq!(
            c.headers,
            vec![
                ("api-key".to_owned(), "abc".to_owned()),
                ("x-team".to_owned(), "media".to_owned())
            ]
        );
        assert_eq!(c.schedule_delay, Duration::from_millis(250));
    }

    #[test]
    fn grpc_and_bad_delays_are_refused_by_name() {
        let on = ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317");
        let e = config(&[on, ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")]).unwrap_err();
        assert!(
            e.to_string()
                .contains("OTEL_EXPORTER_OTLP_PROTOCOL=\"grpc\""),
            "{e}"
        );
        let e = config(&[on, ("OTEL_BSP_SCHEDULE_DELAY", "soon")]).unwrap_err();
        assert!(e.to_string().contains("OTEL_BSP_SCHEDULE_DELAY"), "{e}");
    }

    #[tokio::test]
    async fn with_no_exporter_a_job_span_is_off_and_injects_nothing() {
        // No test in this crate installs an exporter: the process-wide default is off.
        let headers: Map<String, Value> = serde_json::from_value(serde_json::json!({
            "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        }))
        .unwrap();
        let span = JobSpan::start(JobInfo {
            task: "echo.echo",
            id: "1",
            queue: "q",
            retries: 0,
            hostname: "h",
            headers: &headers,
        });
        assert!(!span.is_recording());
        let mut out = Map::new();
        span.run(async { inject_headers(&mut out) }).await;
        assert!(out.is_empty());
    }
}

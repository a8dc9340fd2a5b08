//! The span of one job, named and labelled as opentelemetry-instrumentation-celery labels the
//! consumer span of a Python worker (`run/<task name>`, kind CONSUMER, `celery.action = run`,
//! `celery.task_name`, `messaging.message.id`, `celery.state`, …), so a trace reads the same
//! whichever language ran the job. While the job runs — the task's future, then publishing
//! what follows, storing and acknowledging — its context is current (a Tokio task-local), so
//! what the job publishes or requests names it as parent.

use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Map, Value};

use super::context::{Propagated, SpanContext};
use super::export::attribute;
use super::EXPORTER;

/// OTLP's `SPAN_KIND_CONSUMER`.
const KIND_CONSUMER: u8 = 5;
/// OTLP's `STATUS_CODE_ERROR`.
const STATUS_ERROR: u8 = 2;

tokio::task_local! {
    static CURRENT: Current;
}

#[derive(Clone)]
struct Current {
    propagated: Propagated,
    /// `None` when the span is not recorded (its parent was not sampled).
    outcome: Option<Arc<Mutex<Outcome>>>,
}

#[derive(Default)]
struct Outcome {
    state: Option<String>,
    error: Option<(String, String)>,
    retry_reason: Option<String>,
}

/// The span of one job; `Off` (free: nothing allocated) when no exporter is installed.
pub struct JobSpan(Inner);

enum Inner {
    Off,
    /// The parent was not sampled: its context is passed on, nothing is recorded.
    PassOn(Propagated),
    Recording(Box<Recording>),
}

struct Recording {
    current: Current,
    outcome: Arc<Mutex<Outcome>>,
    parent: Option<[u8; 8]>,
    name: String,
    start: u64,
    /// Turned into OTLP `KeyValue`s on the exporter's thread.
    attributes: Vec<(&'static str, Value)>,
}

/// What names and labels a job's span.
pub struct JobInfo<'a> {
    pub task: &'a str,
    pub id: &'a str,
    pub queue: &'a str,
    pub retries: u32,
    pub hostname: &'a str,
    /// The message's headers not otherwise interpreted: `traceparent` and `tracestate` are
    /// read from there, where Python's instrumentation writes them.
    pub headers: &'a Map<String, Value>,
}

impl JobSpan {
    /// Starts the job's span: a child of the message's `traceparent`, or a new trace.
    pub fn start(job: JobInfo<'_>) -> JobSpan {
        if EXPORTER.get().is_none() {
            return JobSpan(Inner::Off);
        }
        let text = |name: &str| job.headers.get(name).and_then(Value::as_str);
        let parent = text("traceparent").and_then(SpanContext::parse);
        let tracestate = text("tracestate")
            .filter(|s| !s.is_empty() && s.len() <= 512)
            .map(Arc::from);
        if let Some(p) = parent.filter(|p| !p.sampled) {
            return JobSpan(Inner::PassOn(Propagated {
                span: p,
                tracestate,
            }));
        }
        let span = parent.map_or_else(SpanContext::root, |p| p.child());
        let mut attributes = vec![
            ("celery.action", json!("run")),
            ("celery.task_name", json!(job.task)),
            ("messaging.message.id", json!(job.id)),
            ("celery.hostname", json!(job.hostname)),
            ("celery.queue", json!(job.queue)),
            // Celery publishes to the default exchange with the queue's name as routing key.
            ("messaging.destination", json!(job.queue)),
        ];
        if job.retries > 0 {
            attributes.push(("celery.retries", json!(job.retries)));
        }
        let outcome = Arc::new(Mutex::new(Outcome::default()));
        JobSpan(Inner::Recording(Box::new(Recording {
            current: Current {
                propagated: Propagated { span, tracestate },
                outcome: Some(outcome.clone()),
            },
            outcome,
            parent: parent.map(|p| p.span_id),
            name: format!("run/{}", job.task),
            start: now_nanos(),
            attributes,
        })))
    }

    /// Whether this span is recorded (an exporter is installed and the parent, if any, was
    /// sampled).
    pub fn is_recording(&self) -> bool {
        matches!(self.0, Inner::Recording(_))
    }

    /// Runs `job` with this span current, then ends the span and queues it for export.
    pub async fn run<F: std::future::Future>(self, job: F) -> F::Output {
        match self.0 {
            Inner::Off => job.await,
            Inner::PassOn(propagated) => {
                let current = Current {
                    propagated,
                    outcome: None,
                };
                CURRENT.scope(current, job).await
            }
            Inner::Recording(rec) => {
                let out = CURRENT.scope(rec.current.clone(), job).await;
                rec.end();
                out
            }
        }
    }
}

impl Recording {
    /// Ends the span: the end time and outcome are taken here, the JSON is built on the
    /// exporter's thread.
    fn end(self) {
        let Some(exporter) = EXPORTER.get() else {
            return;
        };
        let end = now_nanos();
        let outcome = std::mem::take(&mut *self.outcome.lock().unwrap_or_else(|e| e.into_inner()));
        exporter.send(Box::new(move || self.otlp(end, outcome)));
    }

    /// This span as an OTLP/JSON `Span`.
    fn otlp(self, end: u64, outcome: Outcome) -> Value {
        let mut attributes: Vec<Value> = self
            .attributes
            .into_iter()
            .map(|(k, v)| attribute(k, v))
            .collect();
        if let Some(state) = outcome.state {
            attributes.push(attribute("celery.state", Value::String(state)));
        }
        if let Some(reason) = outcome.retry_reason {
            attributes.push(attribute("celery.retry.reason", Value::String(reason)));
        }
        let ctx = self.current.propagated.span;
        let mut span = json!({
            "traceId": hex::encode(ctx.trace_id),
            "spanId": hex::encode(ctx.span_id),
            "name": self.name,
            "kind": KIND_CONSUMER,
            "startTimeUnixNano": self.start.to_string(),
            "endTimeUnixNano": end.to_string(),
            "attributes": attributes,
        });
        if let Some(parent) = self.parent {
            span["parentSpanId"] = json!(hex::encode(parent));
        }
        if let Some(state) = &self.current.propagated.tracestate {
            span["traceState"] = json!(&**state);
        }
        if let Some((exc_type, message)) = outcome.error {
            span["status"] = json!({"code": STATUS_ERROR, "message": message});
            // As Python's span.record_exception does.
            span["events"] = json!([{
                "timeUnixNano": end.to_string(),
                "name": "exception",
                "attributes": [
                    attribute("exception.type", json!(exc_type)),
                    attribute("exception.message", json!(message)),
                ],
            }]);
        }
        span
    }
}

/// The context current in this job, if any: what its messages and requests carry.
pub fn current() -> Option<Propagated> {
    CURRENT.try_with(|c| c.propagated.clone()).ok()
}

/// Records how the current job ended: its stored state and, for a FAILURE, the stored
/// exception (`{"exc_type", "exc_message"}` as Celery stores it). `None` (nothing stored: the
/// task ignores results) records SUCCESS.
pub fn outcome(stored: Option<(&str, &Value)>) {
    with_outcome(|o| {
        let Some((state, result)) = stored else {
            o.state = Some("SUCCESS".into());
            return;
        };
        o.state = Some(state.to_owned());
        if state == "FAILURE" {
            let exc_type = result["exc_type"].as_str().unwrap_or("Exception");
            let message = match &result["exc_message"] {
                Value::Array(parts) => parts
                    .iter()
                    .map(|p| p.as_str().map_or_else(|| p.to_string(), str::to_owned))
                    .collect::<Vec<_>>()
                    .join(", "),
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            o.error = Some((exc_type.to_owned(), message));
        }
    });
}

/// Records that the current job is retried, and why (`celery.retry.reason`).
pub fn retrying(reason: &str) {
    with_outcome(|o| {
        o.state = Some("RETRY".into());
        o.retry_reason = Some(reason.to_owned());
    });
}

fn with_outcome(f: impl FnOnce(&mut Outcome)) {
    let _ = CURRENT.try_with(|c| {
        if let Some(o) = &c.outcome {
            f(&mut o.lock().unwrap_or_else(|e| e.into_inner()));
        }
    });
}

fn now_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

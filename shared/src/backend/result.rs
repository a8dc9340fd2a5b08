//! Result metadata as Celery's Redis backend stores it (`celery-task-meta-<id>`), task states,
//! and the error a failed job reports (`exc_type`, `exc_message`, `exc_module`, as Celery
//! serialises exceptions to JSON so that Python can re-raise them).

use std::borrow::Cow;
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{json, Map, Value};

/// The Python module Celery resolves mediafarm's error types in. It is not importable, so
/// Python builds an exception class of the given name there, and `str(exc)` is our message.
pub const ERROR_MODULE: &str = "mediafarm.errors";

/// A job's state, with Celery's names.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum TaskState {
    Pending,
    Received,
    Started,
    Retry,
    Success,
    Failure,
    Revoked,
    /// A task-defined state such as `PROGRESS`.
    Custom(String),
}

impl TaskState {
    pub fn as_str(&self) -> &str {
        match self {
            TaskState::Pending => "PENDING",
            TaskState::Received => "RECEIVED",
            TaskState::Started => "STARTED",
            TaskState::Retry => "RETRY",
            TaskState::Success => "SUCCESS",
            TaskState::Failure => "FAILURE",
            TaskState::Revoked => "REVOKED",
            TaskState::Custom(s) => s,
        }
    }

    /// SUCCESS, FAILURE and REVOKED end a job (Celery's READY_STATES).
    pub fn is_ready(&self) -> bool {
        matches!(
            self,
            TaskState::Success | TaskState::Failure | TaskState::Revoked
        )
    }

    fn parse(s: &str) -> TaskState {
        match s {
            "PENDING" => TaskState::Pending,
            "RECEIVED" => TaskState::Received,
            "STARTED" => TaskState::Started,
            "RETRY" => TaskState::Retry,
            "SUCCESS" => TaskState::Success,
            "FAILURE" => TaskState::Failure,
            "REVOKED" => TaskState::Revoked,
            other => TaskState::Custom(other.to_owned()),
        }
    }
}

impl fmt::Display for TaskState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for TaskState {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for TaskState {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = Cow::<str>::deserialize(d)?;
        Ok(TaskState::parse(&s))
    }
}

/// The stored record of a job, field for field as Celery writes it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResultMeta {
    pub status: TaskState,
    pub result: Value,
    pub traceback: Option<String>,
    #[serde(default)]
    pub children: Vec<Value>,
    pub date_done: Option<String>,
    pub task_id: String,
    /// Anything else a Celery writer added (`group_id`, `parent_id`, extended fields).
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl ResultMeta {
    pub fn new(task_id: &str, status: TaskState, result: Value) -> ResultMeta {
        let date_done = status
            .is_ready()
            .then(|| format_date_done(chrono::Utc::now()));
        ResultMeta {
            status,
            result,
            traceback: None,
            children: Vec::new(),
            date_done,
            task_id: task_id.to_owned(),
            extra: Map::new(),
        }
    }

    pub fn success(task_id: &str, result: Value) -> ResultMeta {
        ResultMeta::new(task_id, TaskState::Success, result)
    }

    pub fn failure(task_id: &str, error: &TaskError, traceback: String) -> ResultMeta {
        let mut meta = ResultMeta::new(task_id, TaskState::Failure, error.to_celery_json());
        meta.traceback = Some(traceback);
        meta
    }

    pub fn revoked(task_id: &str, reason: &str) -> ResultMeta {
        let error = TaskError::new(
            FailureKind::Permanent,
            "TaskRevokedError",
            reason.to_owned(),
        )
        .in_module("celery.exceptions");
        let mut meta = ResultMeta::new(task_id, TaskState::Revoked, error.to_celery_json());
        meta.traceback = Some(format!("TaskRevokedError: {reason}"));
        meta
    }

    /// The error a FAILURE or REVOKED record carries, read back from Celery's JSON form.
    pub fn error(&self) -> Option<TaskError> {
        if !matches!(self.status, TaskState::Failure | TaskState::Revoked) {
            return None;
        }
        let obj = self.result.as_object();
        let field = |k: &str| obj.and_then(|o| o.get(k));
        let exc_type = field("exc_type")
            .and_then(Value::as_str)
            .unwrap_or("Exception");
        let message = match field("exc_message") {
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| {
                    v.as_str()
                        .map(str::to_owned)
                        .unwrap_or_else(|| v.to_string())
                })
                .collect::<Vec<_>>()
                .join(", "),
            Some(Value::String(s)) => s.clone(),
            Some(other) => other.to_string(),
            None => self.result.to_string(),
        };
        let module = field("exc_module")
            .and_then(Value::as_str)
            .unwrap_or(ERROR_MODULE);
        Some(
            TaskError::new(FailureKind::Permanent, exc_type.to_owned(), message)
                .in_module(module.to_owned()),
        )
    }
}

/// `date_done` exactly as `protocol::format_time` writes it (Python's `isoformat()` of an aware
/// UTC datetime), without chrono's format-string interpreter: it runs once per stored result,
/// and the interpreter was a quarter of building and serialising a SUCCESS record.
fn format_date_done(d: chrono::DateTime<chrono::Utc>) -> String {
    use chrono::{Datelike, Timelike};
    use std::fmt::Write;
    let year = d.year();
    if !(0..=9999).contains(&year) {
        // Outside four digits chrono adds a sign; leave that rare case to chrono itself.
        return crate::protocol::format_time(d);
    }
    // A leap second is nanosecond ≥ 1e9 in chrono, printed as second 60.
    let nanos = d.nanosecond();
    let (second, nanos) = if nanos >= 1_000_000_000 {
        (d.second() + 1, nanos - 1_000_000_000)
    } else {
        (d.second(), nanos)
    };
    let mut out = String::with_capacity(32);
    // Writing into a String cannot fail.
    let _ = write!(
        out,
        "{year:04}-{:02}-{:02}T{:02}:{:02}:{second:02}.{:06}+00:00",
        d.month(),
        d.day(),
        d.hour(),
        d.minute(),
        nanos / 1000
    );
    out
}

/// How a failure should be treated by the runtime.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum FailureKind {
    /// The input can never work (bad kwargs, undecodable source): never retried.
    Invalid,
    /// The job failed for a reason retrying will not fix.
    Permanent,
    /// A passing fault (a provider's 5xx, a timeout): may be retried, after `retry_after`.
    Transient { retry_after: Option<Duration> },
}

/// A failure a person can act on: a type name and a message, never a bare panic text.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{exc_type}: {message}")]
pub struct TaskError {
    pub kind: FailureKind,
    pub exc_type: Cow<'static, str>,
    pub exc_module: Cow<'static, str>,
    pub message: String,
}

impl TaskError {
    pub fn new(
        kind: FailureKind,
        exc_type: impl Into<Cow<'static, str>>,
        message: impl Into<String>,
    ) -> TaskError {
        TaskError {
            kind,
            exc_type: exc_type.into(),
            exc_module: Cow::Borrowed(ERROR_MODULE),
            message: message.into(),
        }
    }

    /// Input that can never succeed.
    pub fn invalid(
        exc_type: impl Into<Cow<'static, str>>,
        message: impl Into<String>,
    ) -> TaskError {
        TaskError::new(FailureKind::Invalid, exc_type, message)
    }

    /// A failure retrying will not fix.
    pub fn permanent(
        exc_type: impl Into<Cow<'static, str>>,
        message: impl Into<String>,
    ) -> TaskError {
        TaskError::new(FailureKind::Permanent, exc_type, message)
    }

    /// A passing fault worth retrying.
    pub fn transient(
        exc_type: impl Into<Cow<'static, str>>,
        message: impl Into<String>,
    ) -> TaskError {
        TaskError::new(
            FailureKind::Transient { retry_after: None },
            exc_type,
            message,
        )
    }

    /// Asks for the retry of a transient failure to wait `delay` instead of the backoff.
    pub fn retry_after(mut self, delay: Duration) -> TaskError {
        if let FailureKind::Transient { retry_after } = &mut self.kind {
            *retry_after = Some(delay);
        }
        self
    }

    pub fn in_module(mut self, module: impl Into<Cow<'static, str>>) -> TaskError {
        self.exc_module = module.into();
        self
    }

    /// Celery's JSON form of an exception, which `AsyncResult.get()` re-raises in Python.
    pub fn to_celery_json(&self) -> Value {
        json!({
            "exc_type": self.exc_type,
            "exc_message": [self.message],
            "exc_module": self.exc_module,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn date_done_is_written_as_format_time_writes_it() {
        use chrono::{TimeZone, Utc};
        let mut t = Utc.with_ymd_and_hms(1999, 12, 31, 23, 59, 58).unwrap();
        for step in 0..5_000i64 {
            // Every microsecond digit, day, month and year boundary comes by.
            t += chrono::Duration::microseconds(step * 7_919_301 + 1);
            assert_eq!(format_date_done(t), crate::protocol::format_time(t));
        }
        let leap = chrono::NaiveDate::from_ymd_opt(2016, 12, 31)
            .and_then(|d| d.and_hms_nano_opt(23, 59, 59, 1_500_000_000))
            .unwrap()
            .and_utc();
        assert_eq!(format_date_done(leap), crate::protocol::format_time(leap));
        let far = Utc.with_ymd_and_hms(12345, 1, 2, 3, 4, 5).unwrap();
        assert_eq!(format_date_done(far), crate::protocol::format_time(far));
    }

    #[test]
    fn meta_serialises_in_celerys_layout() {
        let meta = ResultMeta::success("id-1", json!({"a": 1}));
        let v = serde_json::to_value(&meta).unwrap();
        let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            [
                "children",
                "date_done",
                "result",
                "status",
                "task_id",
                "traceback"
            ]
        );
        assert_eq!(v["status"], "SUCCESS");
        assert!(v["date_done"].as_str().unwrap().ends_with("+00:00"));
        let pending = ResultMeta::new("id-2", TaskState::Started, json!({"pid": 1}));
        assert!(pending.date_done.is_none());
    }

    #[test]
    fn celery_written_meta_is_read_with_extra_fields() {
        let text = r#"{"status": "FAILURE", "result": {"exc_type": "ValueError", "exc_message": ["bad", 2], "exc_module": "builtins"}, "traceback": "Traceback...", "children": [], "date_done": "2026-11-24T03:33:10.022423+00:00", "task_id": "x", "name": "t", "retries": 0}"#;
        let meta: ResultMeta = serde_json::from_str(text).unwrap();
        assert_eq!(meta.extra["name"], "t");
        let err = meta.error().unwrap();
        assert_eq!(err.exc_type, "ValueError");
        assert_eq!(err.exc_module, "builtins");
        assert_eq!(err.message, "bad, 2");
    }

    #[test]
    fn errors_round_trip_through_celery_json() {
        let err = TaskError::invalid(
            "SourceTooLarge",
            "source image is 61 MP; the limit is 50 MP",
        );
        let meta = ResultMeta::failure("id", &err, "tb".into());
        assert_eq!(
            meta.result["exc_message"],
            json!(["source image is 61 MP; the limit is 50 MP"])
        );
        let back = meta.error().unwrap();
        assert_eq!(back.exc_type, "SourceTooLarge");
        assert_eq!(back.message, err.message);
        let revoked = ResultMeta::revoked("id", "expired");
        assert_eq!(revoked.status, TaskState::Revoked);
        assert_eq!(revoked.error().unwrap().exc_module, "celery.exceptions");
    }

    #[test]
    fn custom_states_survive() {
        let s: TaskState = serde_json::from_str("\"PROGRESS\"").unwrap();
        assert_eq!(s, TaskState::Custom("PROGRESS".into()));
        assert!(!s.is_ready());
        assert_eq!(serde_json::to_string(&s).unwrap(), "\"PROGRESS\"");
    }
}

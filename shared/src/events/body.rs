//! The bodies of Celery's events, field for field as Celery 5.7 sends them (read from
//! `celery/worker/strategy.py`, `worker/request.py`, `worker/heartbeat.py`, `app/amqp.py` and
//! `events/dispatcher.py`), so `app.events.Receiver`, `celery.events.state.State` and Flower
//! read them unchanged. Pure data: nothing here publishes.
//!
//! Every event carries `type`, `hostname`, `utcoffset`, `pid`, `clock` and `timestamp`
//! ([`Origin::stamp`]); the receiver adds `local_received`. Values Celery sends as Python
//! `repr` strings (`args`, `kwargs`, `result`, `exception`) are written as Python prints them.

use std::borrow::Cow;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use serde_json::{Map, Value};

use crate::backend::result::TaskError;
use crate::protocol::repr::{exception_repr, py_repr_max, REPR_MAX};
use crate::protocol::{format_time, TaskMessage};

/// What a worker heartbeat says it is (Celery sends `py-celery`, its version and
/// `platform.system()`); Flower shows it in the worker list.
pub const SW_IDENT: &str = "mediafarm";

/// One event: its type (`task-succeeded`) and its body as JSON, stamped with where it came
/// from. The body is written once, when the event is made (straight from borrowed fields, with
/// no map in between), and published as it is.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub kind: &'static str,
    pub json: Vec<u8>,
}

impl Event {
    /// Celery's routing key: the type with `-` as `.` (`task.succeeded`).
    pub fn routing_key(&self) -> String {
        self.kind.replace('-', ".")
    }

    /// The group: the type's part before the first `-` (`task`, `worker`).
    pub fn group(&self) -> &'static str {
        self.kind.split('-').next().unwrap_or(self.kind)
    }

    /// The body read back as JSON fields (for tests and logs).
    pub fn fields(&self) -> Map<String, Value> {
        serde_json::from_slice(&self.json).unwrap_or_default()
    }
}

/// The sender of events: node name, process id, UTC offset and its Lamport clock.
#[derive(Debug)]
pub struct Origin {
    pub hostname: String,
    pub pid: u32,
    /// Celery's `utcoffset()`: hours *west* of UTC (`time.timezone / 3600`), read once at start.
    pub utcoffset: f64,
    clock: AtomicU64,
}

/// The fields every event has (Celery's `EventDispatcher._prepare_event` and `Event`).
#[derive(Serialize)]
struct Stamp<'a> {
    hostname: &'a str,
    utcoffset: f64,
    pid: u32,
    clock: u64,
    timestamp: f64,
    #[serde(rename = "type")]
    kind: &'a str,
}

impl Origin {
    pub fn new(hostname: impl Into<String>) -> Origin {
        let east = chrono::Local::now().offset().local_minus_utc();
        Origin {
            hostname: hostname.into(),
            pid: std::process::id(),
            utcoffset: -f64::from(east) / 3600.0,
            clock: AtomicU64::new(0),
        }
    }

    /// Writes the event: its own fields, then `hostname`, `utcoffset`, `pid`, `clock` (one
    /// forward per event) and `timestamp`, and `type`.
    pub fn stamp(&self, kind: &'static str, fields: &impl Serialize) -> Event {
        let stamp = Stamp {
            hostname: &self.hostname,
            utcoffset: self.utcoffset,
            pid: self.pid,
            clock: self.clock.fetch_add(1, Ordering::Relaxed) + 1,
            timestamp: now(),
            kind,
        };
        // Both serialise as JSON objects: `{a..}` and `{b..}` become `{a..,b..}`.
        let mut json = Vec::with_capacity(320);
        if serde_json::to_writer(&mut json, fields).is_err() || json.last() != Some(&b'}') {
            json = b"{}".to_vec();
        }
        json.pop();
        if json.len() > 1 {
            json.push(b',');
        }
        let at = json.len();
        if serde_json::to_writer(&mut json, &stamp).is_ok() {
            json.remove(at);
        } else {
            json.truncate(at);
            json.push(b'}');
        }
        Event { kind, json }
    }
}

/// Seconds since the epoch, as Python's `time.time()`.
pub fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or_default()
}

/// `task-sent` and `task-received` (Celery's `sent_event` and the strategy's `task-received`);
/// `task-sent` adds where it was sent.
#[derive(Serialize)]
pub struct TaskFields<'a> {
    uuid: &'a str,
    name: &'a str,
    args: Cow<'a, str>,
    kwargs: Cow<'a, str>,
    root_id: Option<&'a str>,
    parent_id: Option<&'a str>,
    retries: u32,
    eta: Option<String>,
    expires: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    queue: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    exchange: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    routing_key: Option<&'a str>,
}

/// `args` and `kwargs` as Celery puts them in events: the message's `argsrepr`/`kwargsrepr`
/// headers when the producer sent them (Celery's own producers always do), else the repr.
fn task_fields(msg: &TaskMessage) -> TaskFields<'_> {
    let args = match &msg.argsrepr {
        Some(r) => Cow::Borrowed(r.as_str()),
        None => Cow::Owned(py_repr_max(&Value::Array(msg.args.clone()), REPR_MAX)),
    };
    let kwargs = match &msg.kwargsrepr {
        Some(r) => Cow::Borrowed(r.as_str()),
        None => Cow::Owned(py_repr_max(&Value::Object(msg.kwargs.clone()), REPR_MAX)),
    };
    TaskFields {
        uuid: &msg.id,
        name: &msg.task,
        args,
        kwargs,
        root_id: msg.root_id.as_deref(),
        parent_id: msg.parent_id.as_deref(),
        retries: msg.retries,
        eta: msg.eta.map(format_time),
        expires: msg.expires.map(format_time),
        queue: None,
        exchange: None,
        routing_key: None,
    }
}

/// `task-sent`: a producer published `msg` to `exchange` with `routing_key` (queue `queue`).
pub fn task_sent<'a>(
    msg: &'a TaskMessage,
    queue: &'a str,
    exchange: &'a str,
    routing_key: &'a str,
) -> (&'static str, TaskFields<'a>) {
    let mut f = task_fields(msg);
    f.queue = Some(queue);
    f.exchange = Some(exchange);
    f.routing_key = Some(routing_key);
    ("task-sent", f)
}

/// `task-received`: the worker took the message and will run it.
pub fn task_received(msg: &TaskMessage) -> (&'static str, TaskFields<'_>) {
    ("task-received", task_fields(msg))
}

#[derive(Serialize)]
pub struct Uuid<'a> {
    uuid: &'a str,
}

/// `task-started`: the job begins (its pid is the event's own).
pub fn task_started(id: &str) -> (&'static str, Uuid<'_>) {
    ("task-started", Uuid { uuid: id })
}

#[derive(Serialize)]
pub struct Succeeded<'a> {
    uuid: &'a str,
    result: String,
    runtime: f64,
}

/// `task-succeeded`: the result's repr and the run time in seconds.
pub fn task_succeeded<'a>(
    id: &'a str,
    result: &Value,
    runtime: Duration,
) -> (&'static str, Succeeded<'a>) {
    (
        "task-succeeded",
        Succeeded {
            uuid: id,
            result: py_repr_max(result, REPR_MAX),
            runtime: runtime.as_secs_f64(),
        },
    )
}

#[derive(Serialize)]
pub struct Failure<'a> {
    uuid: &'a str,
    exception: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    traceback: Option<&'a str>,
}

/// `task-failed`: the exception's repr (`ValueError('x')`) and the traceback text.
pub fn task_failed<'a>(
    id: &'a str,
    e: &TaskError,
    traceback: &'a str,
) -> (&'static str, Failure<'a>) {
    ("task-failed", failure(id, e, traceback))
}

/// `task-retried`: as `task-failed`, for a failure that will be retried.
pub fn task_retried<'a>(
    id: &'a str,
    e: &TaskError,
    traceback: &'a str,
) -> (&'static str, Failure<'a>) {
    ("task-retried", failure(id, e, traceback))
}

fn failure<'a>(id: &'a str, e: &TaskError, traceback: &'a str) -> Failure<'a> {
    Failure {
        uuid: id,
        exception: exception_repr(&e.exc_type, &e.message),
        traceback: Some(traceback),
    }
}

/// `task-failed` for a task this worker does not know, as Celery's consumer sends it.
pub fn task_unknown<'a>(id: &'a str, name: &str) -> (&'static str, Failure<'a>) {
    (
        "task-failed",
        Failure {
            uuid: id,
            exception: exception_repr("NotRegistered", name),
            traceback: None,
        },
    )
}

#[derive(Serialize)]
pub struct Revoked<'a> {
    uuid: &'a str,
    terminated: bool,
    signum: Option<u8>,
    expired: bool,
}

/// `task-revoked`: `terminated` when it was stopped while running, `expired` when its
/// `expires` passed first (`signum` is always `None`: a job is cancelled, not signalled).
pub fn task_revoked(id: &str, terminated: bool, expired: bool) -> (&'static str, Revoked<'_>) {
    (
        "task-revoked",
        Revoked {
            uuid: id,
            terminated,
            signum: None,
            expired,
        },
    )
}

#[derive(Serialize)]
pub struct Rejected<'a> {
    uuid: &'a str,
    requeue: bool,
}

/// `task-rejected`: the message went back to the broker (`requeue`) or was dropped.
pub fn task_rejected(id: &str, requeue: bool) -> (&'static str, Rejected<'_>) {
    ("task-rejected", Rejected { uuid: id, requeue })
}

/// The worker events Celery's `Heart` sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerEvent {
    Online,
    Heartbeat,
    Offline,
}

impl WorkerEvent {
    pub fn kind(self) -> &'static str {
        match self {
            WorkerEvent::Online => "worker-online",
            WorkerEvent::Heartbeat => "worker-heartbeat",
            WorkerEvent::Offline => "worker-offline",
        }
    }
}

/// What a heartbeat reports: jobs running now and jobs started since the worker began.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Load {
    pub active: u64,
    pub processed: u64,
}

#[derive(Serialize)]
pub struct Worker {
    freq: f64,
    active: u64,
    processed: u64,
    loadavg: [f64; 3],
    sw_ident: &'static str,
    sw_ver: &'static str,
    sw_sys: &'static str,
}

/// `worker-online`, `worker-heartbeat` or `worker-offline` with Celery's fields: `freq` (the
/// heartbeat interval, from which Flower and `State` compute when the worker counts as gone),
/// `active`, `processed`, `loadavg` and the software it runs.
pub fn worker(
    which: WorkerEvent,
    freq: Duration,
    load: Load,
    loadavg: [f64; 3],
) -> (&'static str, Worker) {
    (
        which.kind(),
        Worker {
            freq: freq.as_secs_f64(),
            active: load.active,
            processed: load.processed,
            loadavg,
            sw_ident: SW_IDENT,
            sw_ver: env!("CARGO_PKG_VERSION"),
            sw_sys: sw_sys(),
        },
    )
}

/// Python's `platform.system()` for this build's OS.
fn sw_sys() -> &'static str {
    match std::env::consts::OS {
        "linux" => "Linux",
        "macos" => "Darwin",
        "windows" => "Windows",
        "freebsd" => "FreeBSD",
        other => other,
    }
}

/// The 1, 5 and 15 minute load averages from `/proc/loadavg`, rounded up to hundredths as
/// Celery's `load_average()`; zeros where there is no such file.
pub fn load_average() -> [f64; 3] {
    std::fs::read_to_string("/proc/loadavg")
        .map(|text| parse_loadavg(&text))
        .unwrap_or_default()
}

fn parse_loadavg(text: &str) -> [f64; 3] {
    let mut out = [0.0; 3];
    for (slot, word) in out.iter_mut().zip(text.split_whitespace()) {
        if let Ok(v) = word.parse::<f64>() {
            *slot = (v * 100.0).ceil() / 100.0;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// An event as a receiver reads it.
    fn read<F: Serialize>((kind, f): (&'static str, F)) -> (&'static str, Map<String, Value>) {
        let e = Origin::new("w1@host").stamp(kind, &f);
        assert_eq!(e.kind, kind);
        (kind, e.fields())
    }

    fn message() -> TaskMessage {
        let mut kwargs = Map::new();
        kwargs.insert("text".into(), json!("it's"));
        let mut msg = TaskMessage::new("echo.echo", kwargs);
        msg.id = "id-1".into();
        msg.root_id = Some("root-1".into());
        msg.retries = 2;
        msg.eta = Some(chrono::DateTime::from_timestamp(1_700_000_000, 0).unwrap());
        msg
    }

    #[test]
    fn every_event_is_stamped_with_its_origin_and_a_rising_clock() {
        let origin = Origin::new("w1@host");
        let (kind, f) = task_started("id-1");
        let first = origin.stamp(kind, &f);
        let (kind, f) = task_started("id-2");
        let second = origin.stamp(kind, &f).fields();
        let fields = first.fields();
        for key in ["hostname", "utcoffset", "pid", "clock", "timestamp", "type"] {
            assert!(fields.contains_key(key), "{key} in {fields:?}");
        }
        assert_eq!(fields.len(), 7, "{fields:?}");
        assert_eq!(fields["type"], "task-started");
        assert_eq!(fields["hostname"], "w1@host");
        assert_eq!(fields["pid"], std::process::id());
        assert_eq!(fields["uuid"], "id-1");
        assert_eq!(
            second["clock"].as_u64().unwrap(),
            fields["clock"].as_u64().unwrap() + 1
        );
        assert!(fields["timestamp"].as_f64().unwrap() > 1.7e9);
        assert_eq!(first.routing_key(), "task.started");
        assert_eq!(first.group(), "task");
    }

    #[test]
    fn task_received_has_celerys_fields_with_python_reprs() {
        let (kind, f) = read(task_received(&message()));
        assert_eq!(kind, "task-received");
        assert_eq!(f["uuid"], "id-1");
        assert_eq!(f["name"], "echo.echo");
        assert_eq!(f["args"], "[]");
        assert_eq!(f["kwargs"], r#"{'text': "it's"}"#);
        assert_eq!(f["root_id"], "root-1");
        assert_eq!(f["parent_id"], Value::Null);
        assert_eq!(f["retries"], 2);
        assert_eq!(f["eta"], "2023-11-14T22:13:20.000000+00:00");
        assert_eq!(f["expires"], Value::Null);
        // A producer's own reprs win, as in Celery.
        let mut msg = message();
        msg.kwargsrepr = Some("{'text': '...'}".into());
        assert_eq!(read(task_received(&msg)).1["kwargs"], "{'text': '...'}");
    }

    #[test]
    fn task_sent_names_where_it_was_sent() {
        let (kind, f) = read(task_sent(&message(), "echo", "", "echo"));
        assert_eq!(kind, "task-sent");
        assert_eq!(f["queue"], "echo");
        assert_eq!(f["exchange"], "");
        assert_eq!(f["routing_key"], "echo");
        assert_eq!(f["name"], "echo.echo");
    }

    #[test]
    fn outcomes_carry_reprs_runtime_and_traceback() {
        let (kind, f) = read(task_succeeded(
            "id-1",
            &json!({"n": 1}),
            Duration::from_millis(1500),
        ));
        assert_eq!(kind, "task-succeeded");
        assert_eq!(f["result"], "{'n': 1}");
        assert_eq!(f["runtime"], 1.5);
        let long = read(task_succeeded(
            "id-1",
            &json!("x".repeat(5000)),
            Duration::ZERO,
        ))
        .1;
        assert_eq!(long["result"].as_str().unwrap().len(), REPR_MAX);
        let e = TaskError::permanent("ValueError", "bad 'x'");
        let (kind, f) = read(task_failed("id-1", &e, "tb"));
        assert_eq!(kind, "task-failed");
        assert_eq!(f["exception"], r#"ValueError("bad 'x'")"#);
        assert_eq!(f["traceback"], "tb");
        assert_eq!(task_retried("id-1", &e, "tb").0, "task-retried");
        let (_, f) = read(task_unknown("id-1", "nope.task"));
        assert_eq!(f["exception"], "NotRegistered('nope.task')");
        let (kind, f) = read(task_revoked("id-1", true, false));
        assert_eq!(kind, "task-revoked");
        assert_eq!(
            (&f["terminated"], &f["signum"], &f["expired"]),
            (&json!(true), &Value::Null, &json!(false))
        );
        let (kind, f) = read(task_rejected("id-1", true));
        assert_eq!((kind, &f["requeue"]), ("task-rejected", &json!(true)));
    }

    #[test]
    fn worker_events_say_how_often_they_come_and_what_runs() {
        let load = Load {
            active: 3,
            processed: 40,
        };
        let (kind, f) = read(worker(
            WorkerEvent::Heartbeat,
            Duration::from_secs(2),
            load,
            [0.5, 0.25, 0.0],
        ));
        assert_eq!(kind, "worker-heartbeat");
        assert_eq!(f["freq"], 2.0);
        assert_eq!(f["active"], 3);
        assert_eq!(f["processed"], 40);
        assert_eq!(f["loadavg"], json!([0.5, 0.25, 0.0]));
        assert_eq!(f["sw_ident"], "mediafarm");
        assert_eq!(f["sw_ver"], env!("CARGO_PKG_VERSION"));
        assert!(!f["sw_sys"].as_str().unwrap().is_empty());
        assert_eq!(WorkerEvent::Online.kind(), "worker-online");
        assert_eq!(WorkerEvent::Offline.kind(), "worker-offline");
    }

    #[test]
    fn load_averages_round_up_to_hundredths() {
        assert_eq!(
            parse_loadavg("0.001 1.50 2.344 1/234 5678\n"),
            [0.01, 1.5, 2.35]
        );
        assert_eq!(parse_loadavg(""), [0.0; 3]);
    }
}

//! Celery's events from mediafarm, read by Celery itself: a Python `app.events.Receiver`
//! (celery from `.venv`, tests/py/events.py) captures what an in-process worker and producer
//! send, and Celery's `events.state.State` (what Flower runs on) derives the task states and
//! worker liveness from them. Also: with events off nothing is sent, and the runtime switch
//! turns them on and off.

use std::process::Stdio;
use std::time::Duration;

use mediafarm::events::Events;
use mediafarm::{SendOptions, Settings};
use mediafarm_tests::{
    echo_registry, python, python_env, settings, unique_queue, workspace_root, Farm,
};
use serde_json::{json, Map, Value};
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};
use tokio::time::timeout;

const LIMIT: Duration = Duration::from_secs(60);

/// The Python receiver, started and bound before anything sends.
struct Receiver {
    child: Child,
    lines: Lines<BufReader<ChildStdout>>,
    /// Events received so far, each with `alive` added to worker-heartbeats.
    events: Vec<Value>,
}

impl Receiver {
    /// Captures events from `hosts` until `until` sends worker-offline.
    async fn start(settings: &Settings, hosts: &[&str], until: &str) -> Receiver {
        let mut child = Command::new(python())
            .arg(workspace_root().join("tests/py/events.py"))
            .args(["--hosts", &hosts.join(","), "--until", until])
            .args(["--deadline", &LIMIT.as_secs().to_string()])
            .envs(python_env(settings))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("python runs");
        let stdout = child.stdout.take().expect("piped");
        let mut r = Receiver {
            child,
            lines: BufReader::new(stdout).lines(),
            events: Vec::new(),
        };
        let first = r.line().await;
        assert_eq!(first, "ready", "the receiver did not start");
        r
    }

    async fn line(&mut self) -> String {
        match timeout(LIMIT, self.lines.next_line()).await {
            Ok(Ok(Some(line))) => line,
            other => panic!(
                "the receiver said nothing more: {other:?}; events so far: {:#?}",
                self.events
            ),
        }
    }

    /// Reads events until one satisfies `found`; the report, if it comes first.
    async fn until(&mut self, found: impl Fn(&Value) -> bool) -> Option<Value> {
        loop {
            let line: Value = serde_json::from_str(&self.line().await).expect("a JSON line");
            if let Some(report) = line.get("report") {
                return Some(report.clone());
            }
            let mut event = line["event"].clone();
            if let Some(alive) = line.get("alive") {
                event["alive"] = alive.clone();
            }
            let done = found(&event);
            self.events.push(event);
            if done {
                return None;
            }
        }
    }

    /// Everything it received once the worker it waits for has gone offline.
    async fn finish(mut self) -> Report {
        let report = self.until(|_| false).await.expect("a report");
        let _ = timeout(LIMIT, self.child.wait()).await;
        assert_eq!(
            report["timed_out"], false,
            "no worker-offline before the deadline: {:#?}",
            self.events
        );
        Report {
            events: self.events,
            states: report["states"].clone(),
        }
    }
}

struct Report {
    events: Vec<Value>,
    states: Value,
}

impl Report {
    fn from(&self, host: &str) -> Vec<&Value> {
        self.events
            .iter()
            .filter(|e| e["hostname"] == host)
            .collect()
    }

    /// The types of the events about task `id`, in the order received.
    fn types_of(&self, id: &str) -> Vec<&str> {
        self.events
            .iter()
            .filter(|e| e["uuid"] == id)
            .filter_map(|e| e["type"].as_str())
            .collect()
    }

    fn one(&self, id: &str, kind: &str) -> &Value {
        let found: Vec<&Value> = self
            .events
            .iter()
            .filter(|e| e["uuid"] == id && e["type"] == kind)
            .collect();
        assert_eq!(found.len(), 1, "{kind} of {id}: {:#?}", self.events);
        found[0]
    }

    fn state(&self, id: &str) -> &Value {
        &self.states[id]
    }
}

fn kwargs(v: Value) -> Map<String, Value> {
    v.as_object().cloned().expect("an object")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_celery_receiver_sees_every_event_of_a_worker_and_its_producer() {
    let mut s = settings();
    s.worker_send_task_events = true;
    s.task_send_sent_event = true;
    s.worker_heartbeat_interval = Duration::from_secs(1);
    let queue = unique_queue("events");
    let host = format!("test@{queue}");
    // Celery's producers send as gen<pid>@<host>; so does mediafarm's Client.
    let producer = format!("gen{}@{}", std::process::id(), mediafarm::hostname());
    let mut receiver = Receiver::start(&s, &[&host, &producer], &host).await;
    let farm = Farm::start_on(queue.clone(), s, echo_registry()).await;
    let opts = SendOptions {
        queue: Some(queue.clone()),
        ..Default::default()
    };
    let client = &farm.client;
    let good = client
        .send_task("echo.echo", kwargs(json!({"n": 1})), &opts)
        .await
        .unwrap();
    let bad = client
        .send_task("echo.echo", kwargs(json!({"fail": "boom"})), &opts)
        .await
        .unwrap();
    let retried = client
        .send_task(
            "echo.echo",
            kwargs(json!({"fail_times": 1, "retry_after_s": 0.2})),
            &opts,
        )
        .await
        .unwrap();
    assert_eq!(good.get(LIMIT).await.unwrap(), json!({"n": 1}));
    assert!(bad.get(LIMIT).await.is_err());
    assert!(retried.get(LIMIT).await.is_ok());
    // A heartbeat now (as the `heartbeat` control command asks) reports the four runs.
    farm.worker.events().heartbeat_now();
    let report = receiver
        .until(|e| e["type"] == "worker-heartbeat" && e["processed"] == 4)
        .await;
    assert!(
        report.is_none(),
        "no heartbeat with the four runs: {report:?}"
    );
    farm.stop().await;
    let report = receiver.finish().await;

    // The worker's own events: online first, heartbeats Flower takes as alive, offline last.
    let worker: Vec<&Value> = report
        .from(&host)
        .into_iter()
        .filter(|e| e["type"].as_str().unwrap().starts_with("worker-"))
        .collect();
    assert_eq!(
        worker.first().unwrap()["type"],
        "worker-online",
        "{worker:#?}"
    );
    assert_eq!(
        worker.last().unwrap()["type"],
        "worker-offline",
        "{worker:#?}"
    );
    let beats: Vec<&&Value> = worker
        .iter()
        .filter(|e| e["type"] == "worker-heartbeat")
        .collect();
    assert!(!beats.is_empty(), "{worker:#?}");
    for e in &worker {
        assert_eq!(e["freq"], 1.0);
        assert_eq!(e["sw_ident"], "mediafarm");
        assert_eq!(e["sw_ver"], env!("CARGO_PKG_VERSION"));
        assert_eq!(e["sw_sys"], "Linux");
        assert_eq!(e["loadavg"].as_array().map(Vec::len), Some(3));
        assert_eq!(e["pid"], std::process::id());
    }
    assert!(
        beats.iter().all(|e| e["alive"] == true),
        "State counts the worker alive after each heartbeat: {beats:#?}"
    );
    let last = beats.last().unwrap();
    assert_eq!(
        (&last["active"], &last["processed"]),
        (&json!(0), &json!(4))
    );

    // A good job: sent, received, started, succeeded with its result's repr and runtime.
    let mut types = report.types_of(&good.id);
    types.sort_unstable();
    assert_eq!(
        types,
        [
            "task-received",
            "task-sent",
            "task-started",
            "task-succeeded"
        ]
    );
    let sent = report.one(&good.id, "task-sent");
    assert_eq!(sent["hostname"], producer.as_str());
    assert_eq!(sent["name"], "echo.echo");
    assert_eq!(sent["queue"], queue.as_str());
    assert_eq!(sent["routing_key"], queue.as_str());
    let received = report.one(&good.id, "task-received");
    assert_eq!(received["name"], "echo.echo");
    assert_eq!(received["kwargs"], "{'n': 1}");
    assert_eq!(received["retries"], 0);
    let succeeded = report.one(&good.id, "task-succeeded");
    assert_eq!(succeeded["result"], "{'n': 1}");
    assert!(succeeded["runtime"].as_f64().is_some_and(|r| r >= 0.0));
    assert_eq!(report.state(&good.id), "SUCCESS");

    // A failing job: task-failed with the exception as Python prints it, and the traceback.
    let failed = report.one(&bad.id, "task-failed");
    assert_eq!(failed["exception"], "EchoFailure('boom')");
    assert!(failed["traceback"].as_str().unwrap().contains("boom"));
    assert_eq!(report.state(&bad.id), "FAILURE");

    // A job that failed once: task-retried, then received again and succeeded.
    let retry = report.one(&retried.id, "task-retried");
    assert_eq!(retry["exception"], "EchoTransient('attempt 1')");
    // (task-sent comes over the producer's own connection: its place among these may vary.)
    let types: Vec<&str> = report
        .types_of(&retried.id)
        .into_iter()
        .filter(|t| *t != "task-sent")
        .collect();
    assert_eq!(
        types.iter().filter(|t| **t == "task-received").count(),
        2,
        "{types:?}"
    );
    assert_eq!(types.last(), Some(&"task-succeeded"), "{types:?}");
    assert_eq!(report.state(&retried.id), "SUCCESS");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_are_off_by_default_and_the_switch_turns_them_on_and_off() {
    let s = settings();
    assert!(!s.worker_send_task_events && !s.task_send_sent_event);
    let queue = unique_queue("events-off");
    let host = format!("test@{queue}");
    // After the worker stops, this sender's worker-offline ends the capture.
    let marker = format!("marker@{queue}");
    let receiver = Receiver::start(&s, &[&host, &marker], &marker).await;
    let farm = Farm::start_on(queue.clone(), s.clone(), echo_registry()).await;
    let opts = SendOptions {
        queue: Some(queue.clone()),
        ..Default::default()
    };
    let run = |n: u64| {
        let (client, opts) = (farm.client.clone(), opts.clone());
        async move {
            let r = client
                .send_task("echo.echo", kwargs(json!({ "n": n })), &opts)
                .await
                .unwrap();
            r.get(LIMIT).await.unwrap();
            r.id
        }
    };
    let events = farm.worker.events();
    let off_before = run(1).await;
    events.heartbeat_now();
    events.set_enabled(true);
    assert!(events.is_enabled());
    let on = run(2).await;
    events.set_enabled(false);
    let off_after = run(3).await;
    farm.stop().await;
    let sender = Events::start(&s, &marker, true, Default::default());
    sender
        .worker_offline(Default::default(), Duration::from_secs(10))
        .await;
    let report = receiver.finish().await;

    assert!(
        report.types_of(&off_before).is_empty(),
        "{:#?}",
        report.events
    );
    assert!(
        report.types_of(&off_after).is_empty(),
        "{:#?}",
        report.events
    );
    assert_eq!(
        report.types_of(&on),
        ["task-received", "task-started", "task-succeeded"]
    );
    let worker: Vec<&str> = report
        .from(&host)
        .iter()
        .filter_map(|e| e["type"].as_str())
        .filter(|t| t.starts_with("worker-"))
        .collect();
    // Turned on: worker-online (and maybe a heartbeat); turned off before the stop: no
    // worker-offline, as Celery's Heart sends none once events are disabled.
    assert_eq!(worker.first(), Some(&"worker-online"), "{worker:?}");
    assert!(!worker.contains(&"worker-offline"), "{worker:?}");
}

//! Interop with the real Python `celery` package, both ways: a Python producer's
//! `send_task` + `AsyncResult.get()` against a Rust worker, and a Rust producer against a
//! Python Celery worker.

use std::time::Duration;

use mediafarm::client::SendOptions;
use mediafarm::{Client, ClientError};
use mediafarm_tests::flower::{assert_shows, Flower};
use mediafarm_tests::{
    celery_cli, celery_reply, delete_queue, echo_registry, kwargs, python_env,
    python_producer_against_echo, settings, to, unique_queue, Farm, PythonWorker,
};
use serde_json::{json, Map, Value};

async fn python_producer(scenario: &str) -> Value {
    python_producer_with(scenario, settings()).await
}

async fn python_producer_with(scenario: &str, s: mediafarm::Settings) -> Value {
    let (out, q) = python_producer_against_echo(&s, "py", "interop@%h", scenario).await;
    delete_queue(&s, &q).await;
    // Scenarios that fail leave dead letters behind.
    delete_queue(&s, &format!("{q}.dead")).await;
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_send_task_gets_the_rust_result() {
    let out = python_producer("roundtrip").await;
    assert_eq!(out["state"], "SUCCESS");
    assert_eq!(
        out["ok"],
        json!({"x": 1, "s": "中文", "nested": {"l": [1, 2.5, null]}})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_failure_is_a_python_exception_with_the_message() {
    let out = python_producer("failure").await;
    assert_eq!(out["state"], "FAILURE");
    assert_eq!(out["exc_type"], "EchoFailure");
    assert_eq!(out["message"], "source image is 61 MP; the limit is 50 MP");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_positional_args_and_unknown_tasks_fail_clearly() {
    let out = python_producer("positional").await;
    assert_eq!(out["exc_type"], "InvalidArguments");
    assert!(
        out["message"]
            .as_str()
            .unwrap()
            .contains("keyword arguments only"),
        "{out}"
    );
    let out = python_producer("unknown").await;
    assert_eq!(out["exc_type"], "NotRegistered");
    assert!(
        out["message"].as_str().unwrap().contains("echo.nope"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_countdown_and_expires_are_honoured() {
    let out = python_producer("countdown").await;
    assert_eq!(out["ok"], json!({"c": 1}));
    assert!(
        out["elapsed"].as_f64().unwrap() >= 1.4,
        "ran before its countdown: {out}"
    );
    let out = python_producer("expired").await;
    assert_eq!(out["state"], "REVOKED", "{out}");
    assert_eq!(out["exc_type"], "TaskRevokedError", "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn result_extended_gives_python_the_task_details() {
    let mut s = settings();
    s.result_extended = true;
    let out = python_producer_with("extended", s).await;
    assert_eq!(out["ok"], json!({"k": 1}));
    assert_eq!(out["name"], "echo.echo");
    assert_eq!(out["kwargs"], json!({"k": 1}));
    assert_eq!(out["args"], json!([]));
    assert_eq!(out["retries"], 0);
    assert!(
        out["queue"].as_str().unwrap().starts_with("t-py-extended-"),
        "{out}"
    );
    assert_eq!(out["worker"], format!("interop@{}", mediafarm::hostname()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_many_jobs_all_answered() {
    let out = python_producer("many").await;
    assert_eq!(out["ok"], json!((0..50).collect::<Vec<_>>()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_producer_to_python_celery_worker() {
    let s = settings();
    let q = unique_queue("pyworker");
    let client = Client::connect(&s).await.unwrap();
    // Publish first: the Python worker must accept the queue mediafarm declared.
    let opts = SendOptions {
        queue: Some(q.clone()),
        countdown: Some(0.5),
        time_limit: Some(30.0),
        soft_time_limit: Some(20.0),
        ..Default::default()
    };
    let kwargs: Map<String, Value> = json!({"from": "rust", "t": "ü"})
        .as_object()
        .cloned()
        .unwrap();
    let ok = client.send_task("echo.echo", kwargs, &opts).await.unwrap();
    let fail_kwargs = json!({"message": "python says no"})
        .as_object()
        .cloned()
        .unwrap();
    let bad = client
        .send_task(
            "echo.fail",
            fail_kwargs,
            &SendOptions {
                queue: Some(q.clone()),
                ..Default::default()
            },
        )
        .await
        .unwrap();

    let _worker = PythonWorker::start(&q);
    let v = ok.get(Duration::from_secs(60)).await.unwrap();
    assert_eq!(v["worker"], "python");
    assert_eq!(v["kwargs"], json!({"from": "rust", "t": "ü"}));
    assert_eq!(v["timelimit"], json!([30.0, 20.0]));
    assert!(
        v["eta"].as_str().is_some_and(|e| e.ends_with("+00:00")),
        "{v}"
    );
    match bad.get(Duration::from_secs(60)).await {
        Err(ClientError::Failed { error, .. }) => {
            assert_eq!(error.exc_type, "ValueError");
            assert_eq!(error.exc_module, "builtins");
            assert_eq!(error.message, "python says no");
        }
        other => panic!("expected ValueError, got {other:?}"),
    }
    drop(_worker);
    delete_queue(&s, &q).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_time_limit_1e20_fails_clearly_and_leaves_a_two_slot_worker_working() {
    let mut s = settings();
    s.worker_concurrency = 2;
    let out = python_producer_with("huge-limits", s).await;
    let limits = out["limits"].as_array().expect("eight outcomes");
    assert_eq!(limits.len(), 8, "{out}");
    for (i, o) in limits.iter().enumerate() {
        let which = if i < 4 { "hard" } else { "soft" };
        assert_eq!(o["state"], "FAILURE", "{o}");
        assert_eq!(o["exc_type"], "InvalidMessage", "{o}");
        let message = o["message"].as_str().unwrap_or_default();
        assert!(
            message.contains(&format!("header `timelimit` has a bad {which} limit"))
                && message.contains("ten years"),
            "{message}"
        );
    }
    assert_eq!(out["after"]["ok"], json!({"after": true}), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_compressed_messages_decode_with_every_kombu_compression() {
    let out = python_producer("compressed").await;
    for method in ["gzip", "bzip2", "lzma", "zstd", "brotli"] {
        assert_eq!(out[method]["state"], "SUCCESS", "{method}: {}", out[method]);
        assert_eq!(out[method]["ok"]["method"], method);
        assert_eq!(out[method]["ok"]["pad"], "é".repeat(2000));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_raw_bytes_labelled_binary_are_read_as_json() {
    let out = python_producer("binary").await;
    assert_eq!(out["state"], "SUCCESS", "{out}");
    assert_eq!(out["ok"], json!({"raw": "bytes"}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_lone_surrogates_arrive_as_replacement_characters() {
    let out = python_producer("surrogate").await;
    assert!(
        out["sent"].as_str().unwrap_or_default().contains("\\ud800"),
        "Python wrote the escape: {out}"
    );
    assert_eq!(out["state"], "SUCCESS", "{out}");
    assert_eq!(out["ok"], json!({"s": "a\u{fffd}b", "pair": "\u{1f600}"}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn celery_inspect_ping_gets_a_pong_from_a_mediafarm_worker() {
    let farm = Farm::start("inspect-ping", settings(), echo_registry()).await;
    let node = format!("test@{}", farm.queue);
    let env = python_env(&farm.settings);
    let out = tokio::task::spawn_blocking({
        let node = node.clone();
        move || {
            std::process::Command::new(mediafarm_tests::python())
                .current_dir(mediafarm_tests::workspace_root().join("tests/py"))
                .args(["-m", "celery", "-A", "celery_app", "inspect", "ping"])
                .args(["--destination", &node, "--timeout", "10", "--json"])
                .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
                .output()
                .expect("the celery command runs")
        }
    })
    .await
    .expect("ran");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "celery inspect ping failed ({}): {stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let replies: Value = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("celery printed {stdout:?}: {e}"));
    assert_eq!(replies, json!({ node: {"ok": "pong"} }));
    farm.stop().await;
}

/// Asks `node` `method` through the mailbox until `done(reply)` (at most 60 s).
async fn until_reply(
    s: &mediafarm::Settings,
    node: &str,
    method: &str,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let ask = async {
        loop {
            let replies = mediafarm::amqp::pidbox::mailbox::call(
                s,
                method,
                json!({}),
                Some(&[node.to_owned()]),
                Duration::from_secs(5),
            )
            .await
            .expect("the mailbox call is sent");
            if let Some((_, reply)) = replies.into_iter().find(|(n, _)| n == node) {
                if done(&reply) {
                    return reply;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(60), ask)
        .await
        .unwrap_or_else(|_| panic!("{node} never answered {method} as expected"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn celery_inspect_shows_a_mediafarm_workers_jobs_stats_tasks_and_queues() {
    let mut s = settings();
    s.worker_concurrency = 1;
    let farm = Farm::start("inspect-jobs", s, echo_registry()).await;
    let node = format!("test@{}", farm.queue);
    let s = &farm.settings;
    let long = farm
        .client
        .send_task(
            "echo.echo",
            kwargs(json!({"sleep_ms": 120_000, "tag": "long"})),
            &to(&farm.queue),
        )
        .await
        .expect("sent");
    // The second job is sent once the first holds the only slot, so it waits for it.
    until_reply(s, &node, "active", |r| {
        r.as_array().is_some_and(|a| a.len() == 1)
    })
    .await;
    let waiting = farm
        .client
        .send_task(
            "echo.echo",
            kwargs(json!({"tag": "waiting"})),
            &to(&farm.queue),
        )
        .await
        .expect("sent");
    until_reply(s, &node, "reserved", |r| {
        r.as_array().is_some_and(|a| a.len() == 1)
    })
    .await;

    let active = celery_reply(s, &node, &["inspect", "active"]).await;
    let active = active.as_array().expect("a list");
    assert_eq!(active.len(), 1, "{active:?}");
    let job = &active[0];
    assert_eq!(job["id"], json!(long.id));
    assert_eq!(job["name"], "echo.echo");
    assert_eq!(job["type"], "echo.echo");
    assert_eq!(job["kwargs"], json!({"sleep_ms": 120_000, "tag": "long"}));
    assert_eq!(job["args"], json!([]));
    assert_eq!(job["hostname"], json!(node));
    assert_eq!(job["acknowledged"], false);
    assert_eq!(job["worker_pid"], json!(std::process::id()));
    assert_eq!(job["delivery_info"]["routing_key"], json!(farm.queue));
    assert_eq!(job["delivery_info"]["redelivered"], false);
    assert!(
        job["time_start"].as_f64().is_some_and(|t| t > 1.0e9),
        "{job}"
    );

    let reserved = celery_reply(s, &node, &["inspect", "reserved"]).await;
    assert_eq!(reserved.as_array().map(Vec::len), Some(1), "{reserved}");
    assert_eq!(reserved[0]["id"], json!(waiting.id));
    assert_eq!(reserved[0]["time_start"], Value::Null);

    let query = celery_reply(
        s,
        &node,
        &["inspect", "query_task", &long.id, &waiting.id, "not-held"],
    )
    .await;
    assert_eq!(query[&long.id][0], "active", "{query}");
    assert_eq!(query[&long.id][1]["id"], json!(long.id));
    assert_eq!(query[&waiting.id][0], "reserved", "{query}");
    assert!(query.get("not-held").is_none(), "{query}");

    let registered = celery_reply(s, &node, &["inspect", "registered"]).await;
    assert_eq!(registered, json!(["echo.echo"]));

    let queues = celery_reply(s, &node, &["inspect", "active_queues"]).await;
    assert_eq!(queues.as_array().map(Vec::len), Some(1), "{queues}");
    assert_eq!(queues[0]["name"], json!(farm.queue));
    assert_eq!(queues[0]["exchange"]["name"], json!(farm.queue));
    assert_eq!(queues[0]["exchange"]["type"], "direct");
    assert_eq!(queues[0]["routing_key"], json!(farm.queue));
    assert_eq!(queues[0]["durable"], true);

    let stats = celery_reply(s, &node, &["inspect", "stats"]).await;
    assert_eq!(stats["pid"], json!(std::process::id()));
    assert_eq!(stats["total"], json!({"echo.echo": 1}), "{stats}");
    assert_eq!(stats["pool"]["max-concurrency"], 1);
    assert_eq!(stats["pool"]["processes"], json!([std::process::id()]));
    assert_eq!(stats["prefetch_count"], json!(s.prefetch_count()));
    assert_eq!(stats["broker"]["transport"], "amqp");
    assert!(stats["broker"].get("password").is_none(), "{stats}");
    assert!(stats["uptime"].as_u64().is_some(), "{stats}");
    assert!(stats["clock"].as_str().is_some(), "{stats}");
    assert!(
        stats["rusage"]["maxrss"].as_u64().is_some_and(|m| m > 0),
        "{stats}"
    );

    let conf = celery_reply(s, &node, &["inspect", "conf", "true"]).await;
    assert_eq!(conf["worker_concurrency"], 1, "{conf}");
    let broker_url = conf["broker_url"].as_str().expect("a string");
    assert!(
        !broker_url.contains(":guest@") && broker_url.contains(":********@"),
        "the password is masked: {broker_url}"
    );
    let changed = celery_reply(s, &node, &["inspect", "conf"]).await;
    assert_eq!(changed["worker_concurrency"], 1, "{changed}");
    assert!(changed.get("task_max_retries").is_none(), "{changed}");
    let report = celery_reply(s, &node, &["inspect", "report"]).await;
    assert!(
        report["ok"]
            .as_str()
            .is_some_and(|t| t.contains("mediafarm:")),
        "{report}"
    );

    // Celery's terminate (a revoke that stops the running job): the waiting job then runs.
    let stopped = celery_reply(s, &node, &["control", "terminate", "SIGTERM", &long.id]).await;
    assert_eq!(stopped, json!({"ok": format!("terminate: {}", long.id)}));
    assert_eq!(
        waiting.get(Duration::from_secs(30)).await.expect("runs"),
        json!({"tag": "waiting"})
    );
    let revoked = celery_reply(s, &node, &["inspect", "revoked"]).await;
    assert!(
        revoked
            .as_array()
            .is_some_and(|ids| ids.contains(&json!(long.id))),
        "{revoked}"
    );
    let stats = celery_reply(s, &node, &["inspect", "stats"]).await;
    assert_eq!(stats["total"], json!({"echo.echo": 2}), "{stats}");
    assert_eq!(
        celery_reply(s, &node, &["inspect", "active"]).await,
        json!([])
    );
    farm.stop().await;
}

/// How many consumers RabbitMQ counts on `queue`.
async fn consumers_on(s: &mediafarm::Settings, queue: &str) -> u32 {
    let conn = mediafarm::amqp::broker::connect(s, "test consumers")
        .await
        .expect("connects");
    let ch = conn.create_channel().await.expect("channel");
    let q = ch
        .queue_declare(
            queue.into(),
            lapin::options::QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await
        .expect("the queue exists");
    mediafarm::amqp::broker::close_quietly(&conn, &[&ch], "done").await;
    q.consumer_count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn celery_control_add_and_cancel_consumer_change_what_a_mediafarm_worker_consumes() {
    let farm = Farm::start("control-consumer", settings(), echo_registry()).await;
    let node = format!("test@{}", farm.queue);
    let s = &farm.settings;
    let extra = unique_queue("control-extra");

    let added = celery_reply(s, &node, &["control", "add_consumer", &extra]).await;
    assert_eq!(added, json!({"ok": format!("add consumer {extra}")}));
    let r = farm
        .client
        .send_task("echo.echo", kwargs(json!({"on": "extra"})), &to(&extra))
        .await
        .expect("sent");
    assert_eq!(
        r.get(Duration::from_secs(30))
            .await
            .expect("run from the added queue"),
        json!({"on": "extra"})
    );
    let queues = celery_reply(s, &node, &["inspect", "active_queues"]).await;
    let names: Vec<&str> = queues
        .as_array()
        .expect("a list")
        .iter()
        .filter_map(|q| q["name"].as_str())
        .collect();
    assert_eq!(names, [farm.queue.as_str(), extra.as_str()]);

    let cancelled = celery_reply(s, &node, &["control", "cancel_consumer", &extra]).await;
    assert_eq!(
        cancelled,
        json!({"ok": format!("no longer consuming from {extra}")})
    );
    let gone = async {
        while consumers_on(s, &extra).await > 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(30), gone)
        .await
        .expect("the consumer on the cancelled queue goes");
    let left = farm
        .client
        .send_task("echo.echo", kwargs(json!({"on": "cancelled"})), &to(&extra))
        .await
        .expect("sent");
    // A job sent later to the queue still consumed runs; the one on the cancelled queue waits.
    let r = farm
        .client
        .send_task(
            "echo.echo",
            kwargs(json!({"on": "first"})),
            &to(&farm.queue),
        )
        .await
        .expect("sent");
    assert_eq!(
        r.get(Duration::from_secs(30)).await.expect("runs"),
        json!({"on": "first"})
    );
    assert_eq!(mediafarm_tests::ready_count(s, &extra).await, 1);
    assert!(farm
        .client
        .backend()
        .get(&left.id)
        .await
        .expect("reads")
        .is_none());
    let queues = celery_reply(s, &node, &["inspect", "active_queues"]).await;
    assert_eq!(queues.as_array().map(Vec::len), Some(1), "{queues}");
    // A name RabbitMQ cannot take is refused in Celery's error shape.
    let refused = celery_reply(s, &node, &["control", "add_consumer", "has space"]).await;
    assert!(
        refused["error"]
            .as_str()
            .is_some_and(|e| e.contains("has space")),
        "{refused}"
    );
    delete_queue(s, &extra).await;
    farm.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn celery_control_time_limit_applies_to_later_jobs_of_that_task() {
    let farm = Farm::start("control-time-limit", settings(), echo_registry()).await;
    let node = format!("test@{}", farm.queue);
    let s = &farm.settings;
    let set = celery_reply(
        s,
        &node,
        &["control", "time_limit", "echo.echo", "0.5", "1"],
    )
    .await;
    assert_eq!(set, json!({"ok": "time limits set successfully"}));
    let unknown = celery_reply(s, &node, &["control", "time_limit", "no.such", "1", "2"]).await;
    assert_eq!(unknown, json!({"error": "unknown task"}));
    // rate_limit is answered by the runtime's rate limits (registered on the pidbox at start).
    let rate = celery_reply(s, &node, &["control", "rate_limit", "echo.echo", "100/m"]).await;
    assert_eq!(rate, json!({"ok": "new rate limit set successfully"}));
    let off = celery_reply(s, &node, &["control", "rate_limit", "echo.echo", "0"]).await;
    assert_eq!(off, json!({"ok": "rate limit disabled successfully"}));
    // enable_events / disable_events flip the runtime's event switch, answered as Celery does.
    let on = celery_reply(s, &node, &["control", "enable_events"]).await;
    assert_eq!(on, json!({"ok": "task events enabled"}));
    let again = celery_reply(s, &node, &["control", "enable_events"]).await;
    assert_eq!(again, json!({"ok": "task events already enabled"}));
    let off = celery_reply(s, &node, &["control", "disable_events"]).await;
    assert_eq!(off, json!({"ok": "task events disabled"}));
    let bad = celery_reply(
        s,
        &node,
        &["control", "rate_limit", "echo.echo", "9/fortnight"],
    )
    .await;
    assert!(
        bad["error"]
            .as_str()
            .is_some_and(|e| e.starts_with("Invalid rate limit string")),
        "{bad}"
    );
    // heartbeat is handled (Celery's handler returns None: the reply is null, not a KeyError).
    let replies = mediafarm::amqp::pidbox::mailbox::call(
        s,
        "heartbeat",
        json!({}),
        Some(std::slice::from_ref(&node)),
        Duration::from_secs(10),
    )
    .await
    .expect("sent");
    assert_eq!(replies, [(node.clone(), Value::Null)]);
    // A method without a handler is answered as Celery's kombu Node answers one.
    let replies = mediafarm::amqp::pidbox::mailbox::call(
        s,
        "no_such_method",
        json!({}),
        Some(std::slice::from_ref(&node)),
        Duration::from_secs(10),
    )
    .await
    .expect("sent");
    assert_eq!(
        replies,
        [(node.clone(), json!({"error": "KeyError('no_such_method')"}))]
    );
    let r = farm
        .client
        .send_task(
            "echo.echo",
            kwargs(json!({"sleep_ms": 60_000})),
            &to(&farm.queue),
        )
        .await
        .expect("sent");
    let e = mediafarm_tests::failed(r.get(Duration::from_secs(30)).await);
    assert_eq!(e.exc_type, "TimeLimitExceeded", "{e:?}");
    assert!(e.message.contains("hard time limit of 1 s"), "{e:?}");
    let r = farm
        .client
        .send_task(
            "echo.echo",
            kwargs(json!({"sleep_ms": 60_000, "until_soft": true})),
            &to(&farm.queue),
        )
        .await
        .expect("sent");
    let out = r
        .get(Duration::from_secs(30))
        .await
        .expect("stops at the soft limit");
    assert_eq!(out["stopped_at_soft_limit"], true, "{out}");
    farm.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn celery_control_shutdown_stops_a_mediafarm_worker() {
    let farm = Farm::start("control-shutdown", settings(), echo_registry()).await;
    let node = format!("test@{}", farm.queue);
    let s = farm.settings.clone();
    let (code, stdout, stderr) = celery_cli(
        &s,
        &[
            "control",
            "shutdown",
            "--destination",
            &node,
            "--timeout",
            "2",
            "--json",
        ],
    )
    .await;
    // As a Celery worker, mediafarm stops without replying; celery then exits EX_UNAVAILABLE.
    assert_eq!(code, 69, "{stdout}\n{stderr}");
    tokio::time::timeout(Duration::from_secs(30), farm.worker.wait())
        .await
        .expect("the worker stops after shutdown");
    assert_eq!(consumers_on(&s, &farm.queue).await, 0);
    delete_queue(&s, &farm.queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn celery_status_and_mediafarm_inspect_list_mediafarm_and_python_workers() {
    let farm = Farm::start("status", settings(), echo_registry()).await;
    let node = format!("test@{}", farm.queue);
    let py_queue = unique_queue("status-py");
    let py = PythonWorker::start(&py_queue);
    let py_node = format!("py-{py_queue}@{}", mediafarm::hostname());
    let s = &farm.settings;
    let both = format!("{node},{py_node}");
    // The Python worker needs a few seconds to start; ask until both answer.
    let status = async {
        loop {
            let (code, stdout, _) = celery_cli(
                s,
                &["status", "--destination", &both, "--timeout", "5", "--json"],
            )
            .await;
            if code == 0 {
                let replies: Value =
                    serde_json::from_str(stdout.lines().next().unwrap_or_default())
                        .unwrap_or_else(|e| panic!("celery status printed {stdout:?}: {e}"));
                if replies.get(&py_node).is_some() {
                    return replies;
                }
            }
        }
    };
    let replies = tokio::time::timeout(Duration::from_secs(90), status)
        .await
        .expect("both workers answer celery status");
    assert_eq!(replies[&node], json!({"ok": "pong"}), "{replies}");
    assert_eq!(replies[&py_node], json!({"ok": "pong"}), "{replies}");

    let mediafarm_cli = |args: Vec<String>| {
        let env = python_env(s);
        async move {
            let run = tokio::task::spawn_blocking(move || {
                std::process::Command::new(mediafarm_tests::binary("mediafarm"))
                    .args(&args)
                    .env("MEDIAFARM_BROKER_URL", &env[0].1)
                    .env("MEDIAFARM_RESULT_BACKEND", &env[1].1)
                    .output()
                    .expect("mediafarm runs")
            });
            tokio::time::timeout(Duration::from_secs(300), run)
                .await
                .expect("mediafarm ends")
                .expect("ran")
        }
    };
    let args = |a: &[&str]| a.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
    let out = mediafarm_cli(args(&[
        "inspect",
        "ping",
        "--destination",
        &both,
        "--timeout",
        "10",
        "--json",
    ]))
    .await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pongs: Value = serde_json::from_str(stdout.trim()).expect("json");
    assert_eq!(
        pongs,
        json!({ node.clone(): {"ok": "pong"}, py_node.clone(): {"ok": "pong"} })
    );
    let out = mediafarm_cli(args(&[
        "inspect",
        "registered",
        "--destination",
        &both,
        "--timeout",
        "10",
    ]))
    .await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains(&format!("->  {node}: OK\n        * echo.echo\n")),
        "{text}"
    );
    assert!(text.contains(&format!("->  {py_node}: OK")), "{text}");
    assert!(
        text.contains("* pyside.wrap"),
        "the Python worker's tasks: {text}"
    );
    assert!(text.contains("2 nodes online."), "{text}");
    let out = mediafarm_cli(args(&[
        "control",
        "time_limit",
        "echo.echo",
        "5",
        "10",
        "--destination",
        &node,
        "--timeout",
        "10",
        "--json",
    ]))
    .await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let set: Value = serde_json::from_str(stdout.trim()).expect("json");
    assert_eq!(
        set,
        json!([{ node.clone(): {"ok": "time limits set successfully"} }])
    );
    let out = mediafarm_cli(args(&[
        "inspect",
        "ping",
        "--destination",
        "nobody@nowhere",
        "--timeout",
        "0.5",
    ]))
    .await;
    assert_eq!(out.status.code(), Some(69));
    assert!(String::from_utf8_lossy(&out.stderr).contains("No nodes replied"));
    drop(py);
    delete_queue(s, &py_queue).await;
    farm.stop().await;
}

/// Flower 2.x, unmodified, watching a mediafarm worker with events on: its API lists the worker
/// and the tasks with their states, runtime and exception, and its Workers and Tasks pages show
/// them in Debian's Chromium (screenshots kept in `var/flower/`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flower_shows_a_mediafarm_worker_and_its_tasks() {
    let mut s = settings();
    s.worker_send_task_events = true;
    let farm = Farm::start("flower", s, echo_registry()).await;
    let node = format!("test@{}", farm.queue);
    let flower = Flower::start(&farm.settings).await;
    let ok = farm
        .client
        .send_task(
            "echo.echo",
            kwargs(json!({"shown": "in flower"})),
            &to(&farm.queue),
        )
        .await
        .expect("sent");
    let bad = farm
        .client
        .send_task(
            "echo.echo",
            kwargs(json!({"fail": "flower sees this"})),
            &to(&farm.queue),
        )
        .await
        .expect("sent");
    ok.get(Duration::from_secs(30)).await.expect("ok job ends");
    let _ = bad.get(Duration::from_secs(30)).await;
    let report = flower.check("flower", &node, &ok.id, &bad.id).await;
    assert_shows(&report, &node, "in flower", "flower sees this");
    assert!(mediafarm_tests::workspace_root()
        .join("var/flower/flower-tasks.png")
        .exists());
    farm.stop().await;
}

//! Interop with the real Python `celery` package, both ways: a Python producer's
//! `send_task` + `AsyncResult.get()` against a Rust worker, and a Rust producer against a
//! Python Celery worker.

use std::time::Duration;

use mediafarm::client::SendOptions;
use mediafarm::{Client, ClientError, Worker};
use mediafarm_tests::{
    delete_queue, echo_registry, python_env, run_python, settings, unique_queue, Farm, PythonWorker,
};
use serde_json::{json, Map, Value};

async fn python_producer(scenario: &str) -> Value {
    python_producer_with(scenario, settings()).await
}

async fn python_producer_with(scenario: &str, s: mediafarm::Settings) -> Value {
    let q = unique_queue(&format!("py-{scenario}"));
    let worker = Worker::new(s.clone(), echo_registry(), vec![q.clone()])
        .hostname("interop@%h")
        .start()
        .await
        .expect("worker starts");
    let env = python_env(&s);
    let (q2, scenario2) = (q.clone(), scenario.to_owned());
    let out =
        tokio::task::spawn_blocking(move || run_python("producer.py", &[&q2, &scenario2], &env))
            .await
            .unwrap();
    worker.shutdown().await;
    delete_queue(&s, &q).await;
    // Scenarios that fail leave dead letters behind.
    delete_queue(&s, &format!("{q}.dead")).await;
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("producer.py printed {out:?}: {e}"))
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

//! Whole processes: the `echo-worker` binary under SIGTERM with jobs in flight, start-up
//! refusals with their messages and exit codes, and the `mediafarm` CLI.

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use mediafarm::client::SendOptions;
use mediafarm::{Client, TaskState, Worker};
use mediafarm_tests::process::sigterm;
use mediafarm_tests::{binary, delete_queue, echo_registry, ready_count, settings, unique_queue};
use serde_json::{json, Value};

fn worker_cmd(queue: &str) -> Command {
    let mut cmd = Command::new(binary("echo-worker"));
    cmd.args([
        "--concurrency",
        "8",
        "--queues",
        queue,
        "--loglevel",
        "info",
    ])
    .env("MEDIAFARM_METRICS_ADDR", "127.0.0.1:0")
    .env("MEDIAFARM_WORKER_SHUTDOWN_GRACE", "15")
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::piped());
    cmd
}

fn wait_exit(child: &mut std::process::Child, limit: Duration) -> std::process::ExitStatus {
    let end = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > end {
            let _ = child.kill();
            panic!("worker did not exit within {limit:?} of SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_loses_nothing() {
    let s = settings();
    let q = unique_queue("sigterm");
    let client = Client::connect(&s).await.unwrap();
    let opts = SendOptions {
        queue: Some(q.clone()),
        ..Default::default()
    };
    let mut results = Vec::new();
    for i in 0..300 {
        let kwargs = json!({"i": i, "sleep_ms": 40})
            .as_object()
            .cloned()
            .unwrap();
        results.push(client.send_task("echo.echo", kwargs, &opts).await.unwrap());
    }

    let mut first = worker_cmd(&q).spawn().unwrap();
    results[30].get(Duration::from_secs(30)).await.unwrap();
    sigterm(first.id());
    let status = tokio::task::spawn_blocking(move || {
        let status = wait_exit(&mut first, Duration::from_secs(30));
        let mut log = String::new();
        use std::io::Read;
        let _ = first.stderr.take().unwrap().read_to_string(&mut log);
        (status, log)
    })
    .await
    .unwrap();
    assert!(status.0.success(), "exit {:?}\n{}", status.0, status.1);
    assert!(status.1.contains("stop requested"), "{}", status.1);

    let mut done = 0;
    for r in &results {
        if r.state().await.unwrap() == TaskState::Success {
            done += 1;
        }
    }
    assert!(
        done < 300,
        "the worker finished everything before SIGTERM; nothing was tested"
    );
    assert_eq!(
        ready_count(&s, &q).await as usize,
        300 - done,
        "unfinished jobs went back to the queue"
    );

    // The rest on a worker whose async side runs on one thread (`worker_async_threads`).
    let mut second = worker_cmd(&q)
        .env("MEDIAFARM_WORKER_ASYNC_THREADS", "1")
        .spawn()
        .unwrap();
    for (i, r) in results.iter().enumerate() {
        assert_eq!(r.get(Duration::from_secs(60)).await.unwrap()["i"], i);
    }
    sigterm(second.id());
    let status =
        tokio::task::spawn_blocking(move || wait_exit(&mut second, Duration::from_secs(30)))
            .await
            .unwrap();
    assert!(status.success());
    assert_eq!(ready_count(&s, &q).await, 0);
    delete_queue(&s, &q).await;
}

fn run(cmd: &mut Command) -> (Option<i32>, String, String) {
    let Output {
        status,
        stdout,
        stderr,
    } = cmd.stdin(Stdio::null()).output().unwrap();
    (
        status.code(),
        String::from_utf8_lossy(&stdout).into_owned(),
        String::from_utf8_lossy(&stderr).into_owned(),
    )
}

#[test]
fn worker_start_up_refuses_bad_settings_naming_them() {
    let cases: &[(&str, &str, &str)] = &[
        (
            "MEDIAFARM_WORKER_CONCURRENCY",
            "0",
            "setting `worker_concurrency` = \"0\" (from the environment) is not accepted",
        ),
        (
            "MEDIAFARM_TASK_SERIALIZER",
            "pickle",
            "runs code chosen by whoever wrote the message",
        ),
        (
            "MEDIAFARM_BROKER_URL",
            "http://127.0.0.1",
            "a URL starting with amqp://",
        ),
        (
            "MEDIAFARM_TASK_ACKS_LATE",
            "false",
            "after its result is stored",
        ),
    ];
    for (var, value, want) in cases {
        let (code, _, err) = run(Command::new(binary("echo-worker")).env(var, value));
        assert_eq!(code, Some(2), "{var}={value}: {err}");
        assert!(err.contains(want), "{var}={value}: {err}");
    }
    let (code, _, err) =
        run(Command::new(binary("echo-worker")).args(["--config", "/nonexistent/farm.toml"]));
    assert_eq!(code, Some(2));
    assert!(err.contains("/nonexistent/farm.toml"), "{err}");
    let (code, _, err) = run(Command::new(binary("echo-worker")).args(["--loglevel", "loud"]));
    assert_eq!(code, Some(2));
    assert!(err.contains("--loglevel"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_submit_result_and_purge() {
    let s = settings();
    let q = unique_queue("cli");
    let worker = Worker::new(s.clone(), echo_registry(), vec![q.clone()])
        .start()
        .await
        .unwrap();
    let cli = binary("mediafarm");
    let cli2 = cli.clone();
    let q2 = q.clone();
    let (ok, failed, bad_json) = tokio::task::spawn_blocking(move || {
        let ok = run(Command::new(&cli2).args([
            "submit",
            "echo.echo",
            "--queue",
            &q2,
            "--json",
            r#"{"a": "ß"}"#,
            "--wait",
            "--timeout",
            "20",
        ]));
        let failed = run(Command::new(&cli2).args([
            "submit",
            "echo.echo",
            "--queue",
            &q2,
            "--json",
            r#"{"fail": "no space left"}"#,
            "--wait",
        ]));
        let bad_json =
            run(Command::new(&cli2).args(["submit", "echo.echo", "--queue", &q2, "--json", "[1]"]));
        (ok, failed, bad_json)
    })
    .await
    .unwrap();
    assert_eq!(ok.0, Some(0), "{ok:?}");
    assert_eq!(
        serde_json::from_str::<Value>(&ok.1).unwrap(),
        json!({"a": "ß"})
    );
    let id = ok.2.trim().to_owned();
    assert_eq!(failed.0, Some(1), "{failed:?}");
    assert!(
        failed.2.contains("EchoFailure: no space left"),
        "{failed:?}"
    );
    assert_eq!(bad_json.0, Some(2));
    assert!(bad_json.2.contains("must be a JSON object"), "{bad_json:?}");

    let (code, out, _) = run(Command::new(&cli).args(["result", &id]));
    assert_eq!(code, Some(0));
    let meta: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (meta["status"].as_str(), meta["task_id"].as_str()),
        (Some("SUCCESS"), Some(id.as_str()))
    );
    let (_, out, _) = run(Command::new(&cli).args(["result", "no-such-id"]));
    assert_eq!(
        serde_json::from_str::<Value>(&out).unwrap()["status"],
        "PENDING"
    );

    worker.shutdown().await;
    for _ in 0..3 {
        let (code, out, err) = run(Command::new(&cli).args(["submit", "echo.echo", "--queue", &q]));
        assert_eq!(code, Some(0), "{err}");
        assert_eq!(out.trim().len(), 36, "prints the job id: {out}");
    }
    let (code, out, _) = run(Command::new(&cli).args(["purge", &q]));
    assert_eq!(code, Some(0));
    assert_eq!(out.trim(), format!("purged 3 message(s) from {q}"));
    assert_eq!(ready_count(&s, &q).await, 0);
    delete_queue(&s, &q).await;
    // The failed submission left a dead letter.
    delete_queue(&s, &format!("{q}.dead")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_lists_and_replays_dead_letters_and_revokes() {
    let s = settings();
    let q = unique_queue("cli-dead");
    let worker = Worker::new(s.clone(), echo_registry(), vec![q.clone()])
        .start()
        .await
        .unwrap();
    let client = Client::connect(&s).await.unwrap();
    let opts = SendOptions {
        queue: Some(q.clone()),
        ..Default::default()
    };
    let kwargs = json!({"fail": "disk full"}).as_object().cloned().unwrap();
    let r = client.send_task("echo.echo", kwargs, &opts).await.unwrap();
    assert!(r.get(Duration::from_secs(30)).await.is_err());
    let cli = binary("mediafarm");
    let list = |json: bool| {
        let mut cmd = Command::new(&cli);
        cmd.args(["dead", "list", &q]);
        if json {
            cmd.arg("--json");
        }
        run(&mut cmd)
    };
    // The dead letter is published right after the FAILURE is stored.
    let end = Instant::now() + Duration::from_secs(10);
    let listed = |out: &(Option<i32>, String, String)| -> Vec<Value> {
        serde_json::from_str(out.1.trim()).expect("--json prints one JSON array")
    };
    let mut out = list(true);
    while out.0 == Some(0) && listed(&out).is_empty() && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(100));
        out = list(true);
    }
    assert_eq!(out.0, Some(0), "{out:?}");
    let letters = listed(&out);
    assert_eq!(letters.len(), 1, "{out:?}");
    let letter = &letters[0];
    assert_eq!(letter["id"], r.id.as_str());
    assert_eq!(letter["kind"], "EchoFailure");
    assert_eq!(letter["reason"], "disk full");
    let table = list(false);
    assert!(
        table.1.contains(&r.id) && table.1.contains("EchoFailure: disk full"),
        "{table:?}"
    );
    // Listing leaves the letter where it was; replaying an unknown id replays nothing.
    let (code, out, _) = run(Command::new(&cli).args(["dead", "replay", &q, "--id", "nope"]));
    assert_eq!(
        (code, out.trim()),
        (
            Some(1),
            format!("replayed 0 message(s) from {q}.dead to {q}").as_str()
        )
    );
    let (code, out, _) = run(Command::new(&cli).args(["dead", "replay", &q, "--id", &r.id]));
    assert_eq!(code, Some(0));
    assert!(out.contains("replayed 1 message(s)"), "{out}");
    // It fails again (the cause is still there) and is back in the dead-letter queue.
    let end = Instant::now() + Duration::from_secs(10);
    while list(true).1.trim().is_empty() {
        assert!(
            Instant::now() < end,
            "the replayed job did not come back dead"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(r.state().await.unwrap(), TaskState::Failure);

    let (code, out, _) = run(Command::new(&cli).args(["revoke", "some-id", "--terminate"]));
    assert_eq!(code, Some(0));
    assert_eq!(out.trim(), "revoked some-id (terminating if running)");
    worker.shutdown().await;
    delete_queue(&s, &q).await;
    delete_queue(&s, &format!("{q}.dead")).await;
}

#[test]
fn sigterm_stops_a_worker_whose_log_reader_has_gone() {
    // Found by hand: a worker logging into a pipe whose reader exited (`| head`) ignored
    // SIGTERM, because the log subscriber's own error report panicked the signal task.
    let queue = unique_queue("closed-stderr");
    let mut cmd = worker_cmd(&queue);
    let mut child = cmd.env("MEDIAFARM_LOG_FORMAT", "json").spawn().unwrap();
    drop(child.stderr.take());
    std::thread::sleep(Duration::from_millis(1500));
    sigterm(child.id());
    let status = wait_exit(&mut child, Duration::from_secs(30));
    assert!(status.success(), "{status:?}");
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(delete_queue(&settings(), &queue));
}

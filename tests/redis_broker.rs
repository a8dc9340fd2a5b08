//! Redis as the broker (kombu's Redis transport), against the real Redis and the real Python
//! `celery` package: a Python producer's `send_task` + `AsyncResult.get()` against a Rust
//! worker (countdowns through the delayed set included), a Rust producer against a Python
//! Celery worker, kombu's envelope and priority lists as Python writes them, and a worker
//! killed with SIGKILL mid-job whose messages come back after the visibility timeout and
//! run once.
//!
//! Redis databases 9 and 10 hold the broker keys of these tests only (`unacked` and
//! `unacked_index` are per database, as in kombu); nothing here flushes a database.

use std::time::Duration;

use mediafarm::client::SendOptions;
use mediafarm::redis_broker::{list_key, RedisBroker, DELAYED_KEY};
use mediafarm::{Client, ClientError, Settings, TaskState, Worker};
use mediafarm_tests::process::{sigterm, Proc};
use mediafarm_tests::{
    binary, echo_registry, kwargs, python, python_env, python_producer_against_echo, settings,
    unique_queue, workspace_root,
};
use serde_json::{json, Value};

const BROKER: &str = "redis://127.0.0.1:6379/9";
const KILL_BROKER: &str = "redis://127.0.0.1:6379/10";

fn redis_settings(url: &str) -> Settings {
    let mut s = settings();
    s.broker_url = url.into();
    s
}

/// The values of kombu's `unacked` hash: the messages some worker holds unacknowledged.
async fn unacked(conn: &mut redis::aio::MultiplexedConnection) -> Vec<String> {
    redis::cmd("HVALS")
        .arg("unacked")
        .query_async(conn)
        .await
        .expect("hvals")
}

/// An echo worker on queue `q` of the Redis-broker settings `s`.
async fn echo_worker(s: &Settings, q: &str, hostname: &str) -> mediafarm::WorkerHandle {
    Worker::new(s.clone(), echo_registry(), vec![q.to_owned()])
        .hostname(hostname)
        .start()
        .await
        .expect("worker starts")
}

async fn redis(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .expect("url")
        .get_multiplexed_async_connection()
        .await
        .expect("redis up")
}

/// Deletes the lists of `queue` (every priority and the dead letters) and its binding.
async fn forget_queue(s: &Settings, queue: &str) {
    let mut conn = redis(&s.broker_url).await;
    let o = &s.broker_transport_options;
    let mut keys: Vec<String> = o
        .priority_steps
        .iter()
        .map(|p| list_key(o, queue, *p))
        .collect();
    keys.push(format!("{queue}.dead"));
    keys.push(format!("_kombu.binding.{queue}"));
    // kombu 5.7's Python side also records its bindings here.
    keys.push(format!("_kombu.binding_permanent.{queue}"));
    let _: Result<(), _> = redis::cmd("DEL").arg(keys).query_async(&mut conn).await;
    let _: Result<(), _> = redis::cmd("ZREM")
        .arg("_kombu.binding_deadlines")
        .arg(queue)
        .query_async(&mut conn)
        .await;
}

async fn python_producer(scenario: &str) -> Value {
    let s = redis_settings(BROKER);
    let (out, q) = python_producer_against_echo(&s, "rb", "redis-interop@%h", scenario).await;
    forget_queue(&s, &q).await;
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_send_task_over_redis_gets_the_rust_result() {
    let out = python_producer("roundtrip").await;
    assert_eq!(out["state"], "SUCCESS", "{out}");
    assert_eq!(
        out["ok"],
        json!({"x": 1, "s": "中文", "nested": {"l": [1, 2.5, null]}})
    );
    let out = python_producer("failure").await;
    assert_eq!(out["state"], "FAILURE", "{out}");
    assert_eq!(out["exc_type"], "EchoFailure");
    assert_eq!(out["message"], "source image is 61 MP; the limit is 50 MP");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_countdown_over_redis_waits_in_the_delayed_set_not_the_worker() {
    let out = python_producer("countdown").await;
    assert_eq!(out["ok"], json!({"c": 1}), "{out}");
    assert!(
        out["elapsed"].as_f64().unwrap_or_default() >= 1.4,
        "ran before its countdown: {out}"
    );
    let out = python_producer("expired").await;
    assert_eq!(out["state"], "REVOKED", "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delayed_job_is_parked_in_redis_and_acknowledged() {
    let s = redis_settings(BROKER);
    let q = unique_queue("rb-parked");
    let worker = echo_worker(&s, &q, "redis-parked@%h").await;
    let client = Client::connect(&s).await.expect("client");
    let opts = SendOptions {
        queue: Some(q.clone()),
        countdown: Some(3.0),
        ..Default::default()
    };
    let r = client
        .send_task("echo.echo", kwargs(json!({"parked": 1})), &opts)
        .await
        .expect("sent");
    // While it waits, it is in the delayed set and not unacknowledged by any worker.
    let mut conn = redis(BROKER).await;
    let mut parked = false;
    for _ in 0..100 {
        let entries: Vec<String> = redis::cmd("ZRANGE")
            .arg(DELAYED_KEY)
            .arg(0)
            .arg(-1)
            .query_async(&mut conn)
            .await
            .expect("zrange");
        if entries.iter().any(|e| e.contains(&r.id)) {
            parked = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(parked, "the countdown job never reached {DELAYED_KEY}");
    let unacked = unacked(&mut conn).await;
    assert!(
        !unacked.iter().any(|m| m.contains(&r.id)),
        "a parked job must not stay unacknowledged (it would be restored and run twice)"
    );
    assert_eq!(
        r.get(Duration::from_secs(30)).await.expect("ran"),
        json!({"parked": 1})
    );
    worker.shutdown().await;
    forget_queue(&s, &q).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_producer_to_python_celery_worker_over_redis() {
    let s = redis_settings(BROKER);
    let q = unique_queue("rb-pyworker");
    let client = Client::connect(&s).await.expect("client");
    let ok = client
        .send_task(
            "echo.echo",
            kwargs(json!({"from": "rust", "t": "ü"})),
            &SendOptions {
                queue: Some(q.clone()),
                countdown: Some(0.5),
                priority: Some(6),
                ..Default::default()
            },
        )
        .await
        .expect("sent");
    let bad = client
        .send_task(
            "echo.fail",
            kwargs(json!({"message": "python says no"})),
            &SendOptions {
                queue: Some(q.clone()),
                ..Default::default()
            },
        )
        .await
        .expect("sent");
    // Priority 6 goes to kombu's `<queue>\x06\x166` list.
    let broker = RedisBroker::connect(&s).await.expect("broker");
    assert_eq!(broker.len(&q).await.expect("len"), 2);
    let mut conn = redis(BROKER).await;
    let six: u64 = redis::cmd("LLEN")
        .arg(format!("{q}\x06\x166"))
        .query_async(&mut conn)
        .await
        .expect("llen");
    assert_eq!(six, 1);

    let _worker = Proc::spawn(
        std::process::Command::new(python())
            .current_dir(workspace_root().join("tests/py"))
            .args(["-m", "celery", "-A", "celery_app", "worker", "-P", "solo"])
            .args(["-Q", &q, "-l", "warning", "-n", &format!("py-{q}@%h")])
            .args([
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
            ])
            .envs(python_env(&s))
            .stdout(std::process::Stdio::null()),
    );
    let v = ok
        .get(Duration::from_secs(60))
        .await
        .expect("python ran it");
    assert_eq!(v["worker"], "python");
    assert_eq!(v["kwargs"], json!({"from": "rust", "t": "ü"}));
    match bad.get(Duration::from_secs(60)).await {
        Err(ClientError::Failed { error, .. }) => {
            assert_eq!(error.exc_type, "ValueError");
            assert_eq!(error.message, "python says no");
        }
        other => panic!("expected ValueError, got {other:?}"),
    }
    // SIGTERM, as a supervisor stops it: a warm shutdown acknowledges what it ran (SIGKILL
    // could leave its last acknowledgement unsent, and the message in `unacked`).
    let mut worker = _worker;
    sigterm(worker.0.id());
    let exited = tokio::task::spawn_blocking(move || {
        for _ in 0..400 {
            if matches!(worker.0.try_wait(), Ok(Some(_))) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    })
    .await
    .expect("waited");
    assert!(
        exited,
        "the Python worker did not stop within 20 s of SIGTERM"
    );
    let mut conn = redis(BROKER).await;
    let unacked = unacked(&mut conn).await;
    assert!(
        !unacked.iter().any(|m| m.contains(&q)),
        "the Python worker left a message unacknowledged: {unacked:?}"
    );
    forget_queue(&s, &q).await;
}

/// `celery_task_started_total` of `queue` on the worker serving metrics at `addr`.
async fn started(addr: std::net::SocketAddr, queue: &str) -> u64 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("metrics");
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    let mut text = String::new();
    stream.read_to_string(&mut text).await.expect("read");
    text.lines()
        .filter(|l| l.starts_with("celery_task_started_total{") && l.contains(queue))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|n| n as u64)
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_job_returns_after_the_visibility_timeout_and_runs_once() {
    let mut s = redis_settings(KILL_BROKER);
    s.broker_transport_options.visibility_timeout = Duration::from_secs(5);
    s.task_time_limit = Some(Duration::from_secs(3));
    s.task_track_started = true;
    s.result_extended = true;
    s.worker_concurrency = 2;
    s.worker_prefetch_multiplier = 1;
    let q = unique_queue("rb-kill9");
    let client = Client::connect(&s).await.expect("client");
    let mut jobs = Vec::new();
    for i in 0..6 {
        let r = client
            .send_task(
                "echo.echo",
                kwargs(json!({"i": i, "sleep_ms": 1500})),
                &SendOptions {
                    queue: Some(q.clone()),
                    ..Default::default()
                },
            )
            .await
            .expect("sent");
        jobs.push(r);
    }
    let mut first = Proc::spawn(
        std::process::Command::new(binary("echo-worker"))
            .args(["--concurrency", "2", "--queues", &q, "--loglevel", "warn"])
            .env("MEDIAFARM_BROKER_URL", KILL_BROKER)
            .env(
                "MEDIAFARM_BROKER_TRANSPORT_OPTIONS",
                "{\"visibility_timeout\": 5}",
            )
            .env("MEDIAFARM_TASK_TIME_LIMIT", "3")
            .env("MEDIAFARM_TASK_TRACK_STARTED", "true")
            .env("MEDIAFARM_RESULT_EXTENDED", "true")
            .env("MEDIAFARM_WORKER_PREFETCH_MULTIPLIER", "1")
            .env("MEDIAFARM_METRICS_ADDR", "127.0.0.1:0")
            .env("MEDIAFARM_RESULT_BACKEND", &s.result_backend)
            .stdout(std::process::Stdio::null()),
    );
    // Kill it while its first two jobs run.
    let mut running = 0;
    for _ in 0..1000 {
        running = 0;
        for r in &jobs {
            if r.state().await.expect("state") == TaskState::Started {
                running += 1;
            }
        }
        if running == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(running, 2, "the first worker never ran two jobs at once");
    first.kill9();
    let broker = RedisBroker::connect(&s).await.expect("broker");
    let mut done_by_first = 0;
    for r in &jobs {
        if r.state().await.expect("state") == TaskState::Success {
            done_by_first += 1;
        }
    }

    let second = Worker::new(s.clone(), echo_registry(), vec![q.clone()])
        .hostname("second@%h")
        .start()
        .await
        .expect("second worker starts");
    for r in &jobs {
        let v = r.get(Duration::from_secs(60)).await.expect("nothing lost");
        assert_eq!(v["sleep_ms"], 1500);
    }
    let ran_by_second = started(second.metrics_addr, &q).await;
    assert_eq!(
        done_by_first + ran_by_second,
        6,
        "each job ran once: {done_by_first} by the killed worker, {ran_by_second} after"
    );
    // Nothing left that could run again: no list, no unacknowledged entry, no delayed entry.
    assert_eq!(broker.len(&q).await.expect("len"), 0);
    let mut conn = redis(KILL_BROKER).await;
    let unacked = unacked(&mut conn).await;
    assert!(
        !unacked.iter().any(|m| m.contains(&q)),
        "left unacknowledged: {unacked:?}"
    );
    second.shutdown().await;
    forget_queue(&s, &q).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_returns_unfinished_jobs_to_their_queue_at_once() {
    let mut s = redis_settings(BROKER);
    s.worker_shutdown_grace = Duration::from_secs(1);
    let q = unique_queue("rb-stop");
    let worker = echo_worker(&s, &q, "redis-stop@%h").await;
    let client = Client::connect(&s).await.expect("client");
    let r = client
        .send_task(
            "echo.echo",
            kwargs(json!({"sleep_ms": 60_000})),
            &SendOptions {
                queue: Some(q.clone()),
                ..Default::default()
            },
        )
        .await
        .expect("sent");
    let broker = RedisBroker::connect(&s).await.expect("broker");
    while broker.len(&q).await.expect("len") > 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Taken; the job sleeps far past the grace period, so it cannot finish before the stop.
    worker.shutdown().await;
    assert_eq!(
        broker.len(&q).await.expect("len"),
        1,
        "the unfinished job's message is back on its queue, not left to the visibility timeout"
    );
    let mut conn = redis(BROKER).await;
    let unacked = unacked(&mut conn).await;
    assert!(!unacked.iter().any(|m| m.contains(&r.id)));
    forget_queue(&s, &q).await;
}

/// A kombu message whose body cannot be read, but whose headers name the job: its FAILURE is
/// stored for the producer to see, and the message waits in `<queue>.dead` with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_body_stores_a_failure_and_is_dead_lettered() {
    let s = redis_settings(BROKER);
    let q = unique_queue("rb-unreadable");
    let worker = echo_worker(&s, &q, "redis-unreadable@%h").await;
    let id = uuid::Uuid::new_v4().to_string();
    let envelope = json!({
        "body": "%%% not base64 %%%",
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {"lang": "py", "task": "echo.echo", "id": id, "root_id": id},
        "properties": {
            "correlation_id": id,
            "body_encoding": "base64",
            "delivery_tag": uuid::Uuid::new_v4().to_string(),
            "delivery_info": {"exchange": "", "routing_key": q},
            "priority": 0,
        },
    });
    let mut conn = redis(BROKER).await;
    let list = list_key(&s.broker_transport_options, &q, 0);
    let _: () = redis::cmd("LPUSH")
        .arg(&list)
        .arg(envelope.to_string())
        .query_async(&mut conn)
        .await
        .expect("lpush");
    let client = Client::connect(&s).await.expect("client");
    match client.result(&id).get(Duration::from_secs(30)).await {
        Err(ClientError::Failed { error, .. }) => {
            assert_eq!(error.exc_type, "InvalidMessage");
            assert!(error.message.contains("base64"), "{}", error.message);
        }
        other => panic!("expected a stored InvalidMessage failure, got {other:?}"),
    }
    let dead: Vec<String> = redis::cmd("LRANGE")
        .arg(format!("{q}.dead"))
        .arg(0)
        .arg(-1)
        .query_async(&mut conn)
        .await
        .expect("lrange");
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert!(
        dead[0].contains(&id) && dead[0].contains("base64"),
        "{}",
        dead[0]
    );
    let unacked = unacked(&mut conn).await;
    assert!(
        !unacked.iter().any(|m| m.contains(&id)),
        "left unacknowledged"
    );
    worker.shutdown().await;
    forget_queue(&s, &q).await;
}

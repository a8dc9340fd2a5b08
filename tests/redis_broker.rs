//! Redis as the broker (kombu's Redis transport), against the real Redis and the real Python
//! `celery` package: a Python producer's `send_task` + `AsyncResult.get()` against a Rust
//! worker (countdowns through the delayed set included), a Rust producer against a Python
//! Celery worker, kombu's envelope and priority lists as Python writes them, and a worker
//! killed with SIGKILL mid-job whose messages come back after the visibility timeout and
//! run once. Also what travels beside the queues: the pidbox (`celery inspect`/`control` and
//! Python's revokes against a Rust worker, `mediafarm`'s mailbox call answered by Python and
//! Rust workers), Celery events read by Python's `app.events.Receiver`, and the `mediafarm`
//! CLI's `purge` and `dead list`/`dead replay`.
//!
//! Flower (from the project's venv) watches a Rust worker on the Redis broker as it does on AMQP.
//! Redis Sentinel: a `sentinel://` URL, and a running worker following a failover of a private
//! master/replica/sentinel set started by the test.
//!
//! Redis databases 9, 10 and 11 hold the broker keys of these tests only (`unacked` and
//! `unacked_index` are per database, as in kombu); nothing here flushes a database.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use mediafarm::client::SendOptions;
use mediafarm::redis_broker::{list_key, RedisBroker, DELAYED_KEY};
use mediafarm::{Client, ClientError, Registry, Settings, TaskState, Worker};
use mediafarm_tests::flower::{assert_shows, Flower};
use mediafarm_tests::gate::Gate;
use mediafarm_tests::process::{sigterm, Proc};
use mediafarm_tests::{
    binary, celery_reply, echo_registry, kwargs, python, python_env, python_producer_against_echo,
    settings, unique_queue, workspace_root, Counted,
};
use serde_json::{json, Value};

const BROKER: &str = "redis://127.0.0.1:6379/9";
const KILL_BROKER: &str = "redis://127.0.0.1:6379/10";
/// Flower's and the Sentinel test's (Flower reads every queue length of its database).
const FLOWER_BROKER: &str = "redis://127.0.0.1:6379/11";

/// A Python Celery worker (`tests/py/celery_app.py`, solo pool, no gossip, mingle or
/// heartbeat) on queue `q` as node `node`, with `s`'s broker and backend; killed on drop.
fn python_celery_worker(s: &Settings, q: &str, node: &str) -> Proc {
    Proc::spawn(
        std::process::Command::new(python())
            .current_dir(workspace_root().join("tests/py"))
            .args(["-m", "celery", "-A", "celery_app", "worker", "-P", "solo"])
            .args(["-Q", q, "-l", "warning", "-n", node])
            .args([
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
            ])
            .envs(python_env(s))
            .stdout(std::process::Stdio::null()),
    )
}

/// What `tests/py/producer.py`'s `roundtrip` scenario gets back from the echo worker.
fn assert_roundtrip(out: &Value) {
    assert_eq!(out["state"], "SUCCESS", "{out}");
    assert_eq!(
        out["ok"],
        json!({"x": 1, "s": "中文", "nested": {"l": [1, 2.5, null]}})
    );
}

/// Whether `key` exists in the Redis at `url`.
async fn key_exists(url: &str, key: &str) -> bool {
    redis::cmd("EXISTS")
        .arg(key)
        .query_async(&mut redis(url).await)
        .await
        .expect("exists")
}

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
    assert_roundtrip(&out);
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

    let _worker = python_celery_worker(&s, &q, &format!("py-{q}@%h"));
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

/// On the Redis broker too, a job that only waits for its result store (a Redis the test
/// holds) lends its place in the prefetch window: more messages are taken and run, up to
/// `prefetch_count + worker_finishing_limit` in all (here 2 + 2), and each runs once after the
/// store comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_waiting_for_their_result_store_do_not_hold_the_prefetch_window() {
    let mut s = redis_settings(BROKER);
    let gate = Gate::start(Gate::upstream_of(&s.result_backend)).await;
    let direct = s.clone();
    s.result_backend = gate.redis_url(&s.result_backend);
    s.worker_concurrency = 1;
    s.worker_prefetch_multiplier = 2;
    s.worker_finishing_limit = Some(2);
    let q = unique_queue("rb-window");
    let runs = Arc::new(AtomicUsize::new(0));
    let worker = Worker::new(
        s,
        Registry::new().register(Counted(runs.clone())),
        vec![q.clone()],
    )
    .hostname("redis-window@%h")
    .start()
    .await
    .expect("worker starts");
    let client = Client::connect(&direct).await.expect("client");
    let broker = RedisBroker::connect(&direct).await.expect("broker");
    gate.hold();
    let mut results = Vec::new();
    for _ in 0..10 {
        let opts = SendOptions {
            queue: Some(q.clone()),
            ..Default::default()
        };
        results.push(
            client
                .send_task("test.counted", Default::default(), &opts)
                .await
                .expect("sent"),
        );
    }
    // A window of 2 (-c 1 × 2), widened by the two jobs that wait for Redis: four taken.
    let end = std::time::Instant::now() + Duration::from_secs(20);
    while broker.len(&q).await.expect("len") != 6 || runs.load(Ordering::SeqCst) != 4 {
        assert!(
            std::time::Instant::now() < end,
            "four jobs never ran: {} did",
            runs.load(Ordering::SeqCst)
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        broker.len(&q).await.expect("len"),
        6,
        "no more than prefetch + the finishing limit taken"
    );
    assert_eq!(runs.load(Ordering::SeqCst), 4);
    gate.release();
    for r in &results {
        r.get(Duration::from_secs(20)).await.expect("stored");
    }
    assert_eq!(runs.load(Ordering::SeqCst), 10, "each job ran once");
    worker.shutdown().await;
    let mut conn = redis(BROKER).await;
    let unacked = unacked(&mut conn).await;
    assert!(
        !results
            .iter()
            .any(|r| unacked.iter().any(|m| m.contains(&r.id))),
        "every message acknowledged"
    );
    forget_queue(&direct, &q).await;
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
    // The dead letter is written after the FAILURE is stored (then the message is acked).
    let mut dead: Vec<String> = Vec::new();
    for _ in 0..100 {
        dead = redis::cmd("LRANGE")
            .arg(format!("{q}.dead"))
            .arg(0)
            .arg(-1)
            .query_async(&mut conn)
            .await
            .expect("lrange");
        if !dead.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert!(
        dead[0].contains(&id) && dead[0].contains("base64"),
        "{}",
        dead[0]
    );
    // And acknowledged after its dead letter.
    let mut acked = false;
    for _ in 0..100 {
        if !unacked(&mut conn).await.iter().any(|m| m.contains(&id)) {
            acked = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(acked, "left unacknowledged");
    worker.shutdown().await;
    forget_queue(&s, &q).await;
}

/// `LLEN` or `HLEN` (`cmd`) of `key`.
async fn length(conn: &mut redis::aio::MultiplexedConnection, cmd: &str, key: &str) -> u64 {
    redis::cmd(cmd)
        .arg(key)
        .query_async(conn)
        .await
        .expect("length")
}

/// Values Redis's JSON reader (`cjson`, which the take script uses to find the delivery tag)
/// accepts and serde_json refuses — bytes that are not UTF-8, `NaN`, nesting past 128 levels —
/// were taken into `unacked` and then dead-lettered without their tag, so they stayed there;
/// and the visibility sweep, reading `unacked` as text, stopped at the first that was not
/// UTF-8, so no message held by a dead worker after it was ever put back. Now both paths
/// dead-letter them under their tag, and a good message behind one is restored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_redis_reads_but_serde_refuses_are_dead_lettered_and_leave_nothing_unacked() {
    let mut s = redis_settings(BROKER);
    // Keys of this test's own (`<prefix>unacked` …): its sweep sees no other test's entries.
    let prefix = format!("{}:", unique_queue("rb-poison"));
    s.broker_transport_options.global_keyprefix = prefix.clone();
    let q = unique_queue("rb-poison");
    let (unacked_key, index_key) = (format!("{prefix}unacked"), format!("{prefix}unacked_index"));
    let dead_key = format!("{prefix}{q}.dead");
    let poison = |tag: &str, extra: &[u8]| -> Vec<u8> {
        let mut v = format!(r#"{{"body": "W10=", "properties": {{"delivery_tag": "{tag}", "body_encoding": "base64", "delivery_info": {{"exchange": "", "routing_key": "{q}"}}}}, "headers": {{"x": "#).into_bytes();
        v.extend_from_slice(extra);
        v.extend_from_slice(b"}}");
        v
    };
    let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
    let tags = ["p-utf8", "p-nan", "p-deep"].map(|t| format!("{t}-{q}"));
    let mut bad_tag = poison("@@", b"1");
    let at = bad_tag
        .windows(2)
        .position(|w| w == b"@@")
        .expect("the tag");
    bad_tag.splice(at..at + 2, *b"\xff\xfe");
    let values = [
        poison(&tags[0], b"\"\xff\xfe\""),
        poison(&tags[1], b"NaN"),
        poison(&tags[2], deep.as_bytes()),
        // A tag that is not UTF-8: not recorded in `unacked` at all (no reader could name it).
        bad_tag,
        // Nor one with a space: valid JSON, but not a tag the take keys `unacked` with.
        poison("a tag", b"1"),
    ];
    let mut conn = redis(BROKER).await;
    let list = list_key(&s.broker_transport_options, &q, 0);
    for v in &values {
        let _: () = redis::cmd("LPUSH")
            .arg(&list)
            .arg(v.as_slice())
            .query_async(&mut conn)
            .await
            .expect("lpush");
    }
    let worker = echo_worker(&s, &q, "redis-poison@%h").await;
    let client = Client::connect(&s).await.expect("client");
    let after = client
        .send_task(
            "echo.echo",
            kwargs(json!({"after": "poison"})),
            &SendOptions {
                queue: Some(q.clone()),
                ..Default::default()
            },
        )
        .await
        .expect("sent");
    after
        .get(Duration::from_secs(30))
        .await
        .expect("the worker runs the message after the poison");
    let held = |conn: &mut redis::aio::MultiplexedConnection| {
        let mut pipe = redis::pipe();
        for t in &tags {
            pipe.hexists(&unacked_key, t);
        }
        let mut conn = conn.clone();
        async move {
            pipe.query_async::<Vec<bool>>(&mut conn)
                .await
                .expect("hexists")
        }
    };
    let mut still = Vec::new();
    for _ in 0..100 {
        still = held(&mut conn).await;
        if length(&mut conn, "LLEN", &dead_key).await == 5 && still.iter().all(|h| !h) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(still, vec![false; 3], "poison left in unacked");
    let left = length(&mut conn, "HLEN", &unacked_key).await;
    assert_eq!(left, 0, "entries left in unacked");
    let dead = length(&mut conn, "LLEN", &dead_key).await;
    assert_eq!(dead, 5, "every poison value is a dead letter");
    // Kept byte for byte (they used to be stored with U+FFFD for what was not UTF-8) …
    let mut kept = dead_values(&mut conn, &dead_key).await;
    let mut sent = values.to_vec();
    kept.sort();
    sent.sort();
    assert_eq!(
        kept, sent,
        "the dead letters are not the values as they were"
    );
    // … and `mediafarm dead list` says why each could not be read.
    let letters = mediafarm::amqp::dead_letters::list(&s, &q, 10)
        .await
        .expect("dead list");
    assert_eq!(letters.len(), 5);
    for letter in &letters {
        assert_eq!(letter.kind.as_deref(), Some("InvalidMessage"), "{letter:?}");
        let reason = letter.reason.as_deref().unwrap_or_default();
        assert!(
            reason.contains("kept as it was taken") && reason.len() > 60,
            "{letter:?}"
        );
    }
    assert!(
        letters.iter().any(|l| l
            .reason
            .as_deref()
            .is_some_and(|r| r.contains("delivery_tag"))),
        "the letter refused for its tag says so: {letters:?}"
    );
    worker.shutdown().await;

    // The sweep: a poison entry whose taker died before dead-lettering it, the oldest, and a
    // good message held by a dead worker behind it.
    let _: () = redis::cmd("DEL")
        .arg(&dead_key)
        .query_async(&mut conn)
        .await
        .expect("del");
    let good_id = uuid::Uuid::new_v4().to_string();
    let good = json!({
        "body": "W1tdLCB7ImFmdGVyIjogInN3ZWVwIn0sIHt9XQ==",
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {"lang": "py", "task": "echo.echo", "id": good_id, "root_id": good_id},
        "properties": {
            "correlation_id": good_id,
            "body_encoding": "base64",
            "delivery_tag": "good-tag",
            "delivery_info": {"exchange": "", "routing_key": q},
            "priority": 0,
        },
    });
    let mut entry = b"[".to_vec();
    entry.extend_from_slice(&values[0]);
    entry.extend_from_slice(format!(r#","","{q}"]"#).as_bytes());
    let _: () = redis::pipe()
        .hset(&unacked_key, &tags[0], entry.as_slice())
        .ignore()
        .zadd(&index_key, &tags[0], 1)
        .ignore()
        .hset(&unacked_key, "good-tag", format!(r#"[{good},"","{q}"]"#))
        .ignore()
        .zadd(&index_key, "good-tag", 2)
        .ignore()
        .query_async(&mut conn)
        .await
        .expect("held by a dead worker");
    let broker = RedisBroker::connect(&s).await.expect("broker");
    let restored = broker.restore_visible().await.expect("the sweep runs");
    assert_eq!(restored, 1, "the good message is put back");
    let left = length(&mut conn, "HLEN", &unacked_key).await;
    assert_eq!(left, 0, "the sweep left entries in unacked");
    let dead = dead_values(&mut conn, &dead_key).await;
    assert_eq!(
        dead,
        vec![values[0].clone()],
        "the poison entry, as it was, is a dead letter"
    );
    let worker = echo_worker(&s, &q, "redis-poison-2@%h").await;
    let put_back = client
        .result(&good_id)
        .get(Duration::from_secs(30))
        .await
        .expect("the restored message runs");
    assert_eq!(put_back, json!({"after": "sweep"}));
    worker.shutdown().await;
    forget_queue(&s, &q).await;
}

/// Every value of list `key`, as bytes.
async fn dead_values(conn: &mut redis::aio::MultiplexedConnection, key: &str) -> Vec<Vec<u8>> {
    redis::cmd("LRANGE")
        .arg(key)
        .arg(0)
        .arg(-1)
        .query_async(conn)
        .await
        .expect("lrange")
}

/// Waits (at most 30 s) until `job` is in `state`.
async fn until_state(job: &mediafarm::AsyncResult, state: TaskState) {
    for _ in 0..3000 {
        if job.state().await.expect("state") == state {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("job {} never reached {state:?}", job.id);
}

/// Python Celery's remote control against a Rust worker on the Redis broker: requests come by
/// `PUBLISH` on `/9.celery.pidbox`, replies go onto the requester's reply list, and Python's
/// `app.control.revoke` skips a job still waiting in its list and stops a running one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn celery_inspect_control_and_revoke_reach_a_rust_worker_over_redis() {
    let mut s = redis_settings(BROKER);
    s.worker_concurrency = 1;
    s.worker_prefetch_multiplier = 1;
    s.task_track_started = true;
    let q = unique_queue("rb-pidbox");
    let node = format!("pidbox@{q}");
    let worker = echo_worker(&s, &q, &node).await;

    assert_eq!(
        celery_reply(&s, &node, &["inspect", "ping"]).await,
        json!({"ok": "pong"})
    );
    let registered = celery_reply(&s, &node, &["inspect", "registered"]).await;
    assert!(
        registered
            .as_array()
            .is_some_and(|r| r.iter().any(|t| t == "echo.echo")),
        "{registered}"
    );

    // One job runs (concurrency 1, prefetch 1); the next waits in the Redis list.
    let client = Client::connect(&s).await.expect("client");
    let opts = SendOptions {
        queue: Some(q.clone()),
        ..Default::default()
    };
    let running = client
        .send_task("echo.echo", kwargs(json!({"sleep_ms": 60_000})), &opts)
        .await
        .expect("sent");
    until_state(&running, TaskState::Started).await;
    let queued = client
        .send_task("echo.echo", kwargs(json!({"queued": 1})), &opts)
        .await
        .expect("sent");
    let broker = RedisBroker::connect(&s).await.expect("broker");
    assert_eq!(
        broker.len(&q).await.expect("len"),
        1,
        "the second job waits"
    );

    let active = celery_reply(&s, &node, &["inspect", "active"]).await;
    assert!(
        active
            .as_array()
            .is_some_and(|a| a.len() == 1 && a[0]["id"] == running.id.as_str()),
        "{active}"
    );
    let stats = celery_reply(&s, &node, &["inspect", "stats"]).await;
    assert_eq!(stats["pool"]["max-concurrency"], 1, "{stats}");
    let control = celery_reply(
        &s,
        &node,
        &["control", "time_limit", "echo.echo", "40", "50"],
    )
    .await;
    assert_eq!(control, json!({"ok": "time limits set successfully"}));
    // add_consumer with a direct exchange writes kombu's binding; a fanout is refused.
    let extra = format!("{q}-extra");
    let exchange = format!("{q}-ex");
    let added = celery_reply(
        &s,
        &node,
        &["control", "add_consumer", &extra, &exchange, "direct", "rk"],
    )
    .await;
    assert_eq!(added, json!({"ok": format!("add consumer {extra}")}));
    let mut conn = redis(BROKER).await;
    let bound: Vec<String> = redis::cmd("SMEMBERS")
        .arg(format!("_kombu.binding.{exchange}"))
        .query_async(&mut conn)
        .await
        .expect("smembers");
    assert_eq!(bound, [format!("rk\x06\x16\x06\x16{extra}")]);
    let refused = celery_reply(
        &s,
        &node,
        &["control", "add_consumer", &extra, "fan", "fanout"],
    )
    .await;
    assert!(
        refused["error"]
            .as_str()
            .is_some_and(|e| e.contains("direct exchange")),
        "{refused}"
    );
    let _: () = redis::cmd("DEL")
        .arg(format!("_kombu.binding.{exchange}"))
        .query_async(&mut conn)
        .await
        .expect("del");

    // Python's revoke (a broadcast with no reply, and not written to the revoked set in the
    // result backend): the worker learns it from the pidbox alone.
    let env = python_env(&s);
    let id = queued.id.clone();
    tokio::task::spawn_blocking(move || {
        mediafarm_tests::run_python("control.py", &["revoke", &id], &env)
    })
    .await
    .expect("revoke sent");
    let revoked = celery_reply(&s, &node, &["inspect", "revoked"]).await;
    assert!(
        revoked
            .as_array()
            .is_some_and(|r| r.iter().any(|i| i == queued.id.as_str())),
        "{revoked}"
    );
    // terminate stops the running one; the worker then takes the revoked one and skips it.
    let env = python_env(&s);
    let id = running.id.clone();
    tokio::task::spawn_blocking(move || {
        mediafarm_tests::run_python("control.py", &["revoke", &id, "--terminate"], &env)
    })
    .await
    .expect("terminate sent");
    until_state(&running, TaskState::Revoked).await;
    until_state(&queued, TaskState::Revoked).await;
    assert_eq!(broker.len(&q).await.expect("len"), 0);
    worker.shutdown().await;
    forget_queue(&s, &q).await;
    forget_queue(&s, &extra).await;
}

/// `mediafarm inspect` (the requester side of the pidbox on Redis) gathers the replies of a
/// Python Celery worker and a Rust worker on the same Redis broker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mediafarm_inspect_over_redis_hears_python_and_rust_workers() {
    let s = redis_settings(BROKER);
    let q = unique_queue("rb-ping");
    let rust_node = format!("rust@{q}");
    let py_node = format!("py@{q}");
    let worker = echo_worker(&s, &q, &rust_node).await;
    let _python = python_celery_worker(&s, &q, &py_node);
    let nodes = [rust_node.clone(), py_node.clone()];
    let mut heard = Vec::new();
    for _ in 0..60 {
        let replies = mediafarm::amqp::pidbox::mailbox::call(
            &s,
            "ping",
            json!({}),
            Some(&nodes),
            Duration::from_secs(2),
        )
        .await
        .expect("the mailbox call is sent");
        heard = replies;
        if heard.len() == 2 {
            break;
        }
    }
    heard.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        heard,
        vec![
            (py_node.clone(), json!({"ok": "pong"})),
            (rust_node.clone(), json!({"ok": "pong"})),
        ]
    );
    worker.shutdown().await;
    forget_queue(&s, &q).await;
}

/// The receiver's next line (at most a minute away).
async fn next_line(
    lines: &mut tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
) -> String {
    match tokio::time::timeout(Duration::from_secs(60), lines.next_line()).await {
        Ok(Ok(Some(line))) => line,
        other => panic!("the receiver said nothing more: {other:?}"),
    }
}

/// Celery events from a Rust worker on the Redis broker, read by Python's
/// `app.events.Receiver` (tests/py/events.py, which Flower's state runs on): Celery makes
/// `celeryev` a fanout on Redis, so they go by `PUBLISH` on `/9.celeryev/<routing key>`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn celery_events_from_a_rust_worker_over_redis_reach_a_python_receiver() {
    use tokio::io::{AsyncBufReadExt, BufReader};
    let mut s = redis_settings(BROKER);
    s.worker_send_task_events = true;
    s.worker_heartbeat_interval = Duration::from_millis(500);
    let q = unique_queue("rb-events");
    let node = format!("events@{q}");
    let mut receiver = tokio::process::Command::new(python())
        .arg(workspace_root().join("tests/py/events.py"))
        .args(["--hosts", &node, "--until", &node, "--deadline", "60"])
        .envs(python_env(&s))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("python runs");
    let mut lines = BufReader::new(receiver.stdout.take().expect("piped")).lines();
    assert_eq!(next_line(&mut lines).await, "ready");
    let worker = echo_worker(&s, &q, &node).await;
    // The receiver subscribes as it starts polling, after "ready": a heartbeat it reports
    // means it hears everything from now on.
    let mut events: Vec<Value> = Vec::new();
    loop {
        let line: Value = serde_json::from_str(&next_line(&mut lines).await).expect("a JSON line");
        let event = line["event"].clone();
        events.push(event.clone());
        if event["type"] == "worker-heartbeat" {
            assert_eq!(line["alive"], true, "{line}");
            break;
        }
    }
    let client = Client::connect(&s).await.expect("client");
    let r = client
        .send_task(
            "echo.echo",
            kwargs(json!({"ev": 1})),
            &SendOptions {
                queue: Some(q.clone()),
                ..Default::default()
            },
        )
        .await
        .expect("sent");
    assert_eq!(
        r.get(Duration::from_secs(30)).await.expect("ran"),
        json!({"ev": 1})
    );
    worker.shutdown().await;
    let report = loop {
        let line: Value = serde_json::from_str(&next_line(&mut lines).await).expect("a JSON line");
        if let Some(report) = line.get("report") {
            break report.clone();
        }
        events.push(line["event"].clone());
    };
    assert_eq!(report["timed_out"], false, "no worker-offline: {events:#?}");
    let of_job: Vec<&str> = events
        .iter()
        .filter(|e| e["uuid"] == r.id.as_str())
        .filter_map(|e| e["type"].as_str())
        .collect();
    assert_eq!(
        of_job,
        ["task-received", "task-started", "task-succeeded"],
        "{events:#?}"
    );
    assert_eq!(report["states"][&r.id], "SUCCESS", "{report}");
    assert!(events.iter().any(|e| e["type"] == "worker-offline"));
    let _ = receiver.wait().await;
    forget_queue(&s, &q).await;
}

/// Flower 2.x, unmodified, watching a Rust worker on the Redis broker (database 11, its own):
/// as on AMQP (`celery_interop::flower_shows_a_mediafarm_worker_and_its_tasks`), its API lists
/// the worker and both jobs with their states, runtime, result and exception, and its Workers,
/// Tasks and worker pages show them in Debian's Chromium (the worker page renders the
/// worker's `stats`, whose `broker` is kombu's description of the Redis transport).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flower_shows_a_rust_worker_and_its_tasks_over_redis() {
    let mut s = redis_settings(FLOWER_BROKER);
    s.worker_send_task_events = true;
    let q = unique_queue("rb-flower");
    let node = format!("flower@{q}");
    let flower = Flower::start(&s).await;
    let worker = echo_worker(&s, &q, &node).await;
    let client = Client::connect(&s).await.expect("client");
    let opts = SendOptions {
        queue: Some(q.clone()),
        ..Default::default()
    };
    let ok = client
        .send_task("echo.echo", kwargs(json!({"shown": "on redis"})), &opts)
        .await
        .expect("sent");
    let bad = client
        .send_task(
            "echo.echo",
            kwargs(json!({"fail": "flower on redis"})),
            &opts,
        )
        .await
        .expect("sent");
    ok.get(Duration::from_secs(30)).await.expect("ok job ends");
    let _ = bad.get(Duration::from_secs(30)).await;
    let report = flower.check("flower-redis", &node, &ok.id, &bad.id).await;
    assert_shows(&report, &node, "on redis", "flower on redis");
    assert!(
        report["browser"]["worker_page_broker"]
            .as_str()
            .is_some_and(|t| t.contains("redis")),
        "{report:#}"
    );
    assert!(workspace_root()
        .join("var/flower/flower-redis-tasks.png")
        .exists());
    worker.shutdown().await;
    drop(flower);
    forget_queue(&s, &q).await;
}

/// Runs the `mediafarm` CLI against the Redis broker of `s`; (exit code, stdout, stderr).
fn cli(s: &Settings, args: &[&str]) -> (Option<i32>, String, String) {
    let out = std::process::Command::new(binary("mediafarm"))
        .args(args)
        .env("MEDIAFARM_BROKER_URL", &s.broker_url)
        .env("MEDIAFARM_RESULT_BACKEND", &s.result_backend)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("the CLI runs");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `mediafarm purge`, `dead list` and `dead replay` on the Redis broker: `<queue>.dead` is
/// listed oldest first without change, a replay moves the letter back onto its queue (where it
/// fails again and comes back), and a purge empties every priority list of a queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_purges_lists_and_replays_dead_letters_on_redis() {
    let s = redis_settings(BROKER);
    let q = unique_queue("rb-cli");
    let worker = echo_worker(&s, &q, "redis-cli@%h").await;
    let client = Client::connect(&s).await.expect("client");
    let opts = SendOptions {
        queue: Some(q.clone()),
        ..Default::default()
    };
    let r = client
        .send_task("echo.echo", kwargs(json!({"fail": "disk full"})), &opts)
        .await
        .expect("sent");
    assert!(r.get(Duration::from_secs(30)).await.is_err());
    let s2 = s.clone();
    let q2 = q.clone();
    let list = move || {
        let out = cli(&s2, &["dead", "list", &q2, "--json"]);
        assert_eq!(out.0, Some(0), "{out:?}");
        serde_json::from_str::<Vec<Value>>(out.1.trim()).expect("--json prints one JSON array")
    };
    // The dead letter is pushed right after the FAILURE is stored.
    let mut letters = Vec::new();
    for _ in 0..100 {
        letters = tokio::task::spawn_blocking(list.clone())
            .await
            .expect("ran");
        if !letters.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0]["id"], r.id.as_str());
    assert_eq!(letters[0]["kind"], "EchoFailure");
    assert_eq!(letters[0]["reason"], "disk full");
    let (code, out, err) = cli(&s, &["dead", "list", &q]);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.contains(&r.id) && out.contains("EchoFailure: disk full"),
        "{out}"
    );

    let (code, out, _) = cli(&s, &["dead", "replay", &q, "--id", "nope"]);
    assert_eq!(
        (code, out.trim()),
        (
            Some(1),
            format!("replayed 0 message(s) from {q}.dead to {q}").as_str()
        )
    );
    let (code, out, err) = cli(&s, &["dead", "replay", &q, "--id", &r.id]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("replayed 1 message(s)"), "{out}");
    // Forgotten, run again, failed again, dead again: one letter, without the old headers
    // doubled.
    let mut again = Vec::new();
    for _ in 0..100 {
        again = tokio::task::spawn_blocking(list.clone())
            .await
            .expect("ran");
        if !again.is_empty() && r.state().await.expect("state") == TaskState::Failure {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(again.len(), 1, "{again:?}");
    assert_eq!(again[0]["id"], r.id.as_str());
    worker.shutdown().await;

    // Purge: jobs on two priority lists, all removed.
    for priority in [0, 9] {
        client
            .send_task(
                "echo.echo",
                kwargs(json!({})),
                &SendOptions {
                    queue: Some(q.clone()),
                    priority: Some(priority),
                    ..Default::default()
                },
            )
            .await
            .expect("sent");
    }
    let broker = RedisBroker::connect(&s).await.expect("broker");
    assert_eq!(broker.len(&q).await.expect("len"), 2);
    let (code, out, err) = cli(&s, &["purge", &q]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(out.trim(), format!("purged 2 message(s) from {q}"));
    assert_eq!(broker.len(&q).await.expect("len"), 0);
    forget_queue(&s, &q).await;
}

type LogLines = tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStderr>>;

/// `echo-worker` named `node` on queue `q` of `s`'s Redis broker, its log on a pipe: warnings,
/// and the outcome of its check for another worker with its name (debug).
fn named_echo_worker(s: &Settings, q: &str, node: &str) -> (tokio::process::Child, LogLines) {
    use tokio::io::{AsyncBufReadExt, BufReader};
    let mut child = tokio::process::Command::new(binary("echo-worker"))
        .args(["--queues", q, "-n", node, "--loglevel", "warn"])
        .env("MEDIAFARM_BROKER_URL", &s.broker_url)
        .env("MEDIAFARM_RESULT_BACKEND", &s.result_backend)
        .env("MEDIAFARM_METRICS_ADDR", "127.0.0.1:0")
        .env("RUST_LOG", "warn,mediafarm::amqp::pidbox::over_redis=debug")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("echo-worker starts");
    let lines = BufReader::new(child.stderr.take().expect("piped")).lines();
    (child, lines)
}

/// The log lines up to the first containing `needle` (at most a minute away).
async fn log_until(lines: &mut LogLines, needle: &str) -> Vec<String> {
    let mut seen = Vec::new();
    loop {
        match tokio::time::timeout(Duration::from_secs(60), lines.next_line()).await {
            Ok(Ok(Some(line))) => {
                let found = line.contains(needle);
                seen.push(line);
                if found {
                    return seen;
                }
            }
            other => panic!("no log line with {needle:?} ({other:?}); before it: {seen:#?}"),
        }
    }
}

const NO_DUPLICATE: &str = "no other worker has this node name";

/// Two workers given one node name on the Redis broker: both get every pidbox request (a
/// fanout has no exclusive mailbox queue to refuse the second, as AMQP's does), so a starting
/// worker pings its own name and logs Celery's `DuplicateNodenameWarning` when another worker
/// — Rust or Python Celery — answers; a worker with a name of its own does not. And
/// `mediafarm inspect` warns as Celery's `flatten_reply` does when one name answers twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_worker_with_a_taken_node_name_warns_over_redis() {
    let s = redis_settings(BROKER);
    let q = unique_queue("rb-dupname");
    let node = format!("dup@{q}");
    let (_first, mut first_log) = named_echo_worker(&s, &q, &node);
    let seen = log_until(&mut first_log, NO_DUPLICATE).await;
    assert!(
        !seen.iter().any(|l| l.contains("DuplicateNodename")),
        "{seen:#?}"
    );
    let (_second, mut second_log) = named_echo_worker(&s, &q, &node);
    let seen = log_until(&mut second_log, "DuplicateNodenameWarning").await;
    let warning = seen.last().expect("a line");
    assert!(warning.contains(&node), "{warning}");
    assert!(!seen.iter().any(|l| l.contains(NO_DUPLICATE)), "{seen:#?}");

    // The requester side: both answer a broadcast ping, and the CLI says so.
    let (code, stdout, stderr) = cli(&s, &["inspect", "ping", "--timeout", "3"]);
    assert_eq!(code, Some(0), "{stdout}\n{stderr}");
    assert!(
        stderr.contains(&format!(
            "DuplicateNodenameWarning: Received multiple replies from node name: {node}."
        )),
        "{stdout}\n{stderr}"
    );

    // A Python Celery worker holding a name: a Rust worker given it warns too.
    let py_node = format!("pydup@{q}");
    let _python = python_celery_worker(&s, &q, &py_node);
    let mut answered = false;
    for _ in 0..60 {
        let replies = mediafarm::amqp::pidbox::mailbox::call(
            &s,
            "ping",
            json!({}),
            Some(std::slice::from_ref(&py_node)),
            Duration::from_secs(1),
        )
        .await
        .expect("the mailbox call is sent");
        if !replies.is_empty() {
            answered = true;
            break;
        }
    }
    assert!(answered, "the Python worker never answered a ping");
    let (_rust, mut rust_log) = named_echo_worker(&s, &q, &py_node);
    let seen = log_until(&mut rust_log, "DuplicateNodenameWarning").await;
    assert!(seen.last().expect("a line").contains(&py_node), "{seen:#?}");
    forget_queue(&s, &q).await;
}

/// kombu's `global_keyprefix`, given to both sides: a Python producer's job reaches a Rust
/// worker and its result comes back; a Rust producer's job (priority 6) waits in the prefixed
/// priority list and a Python Celery worker runs it; `celery inspect ping` reaches the Rust
/// worker through the prefixed pidbox channel and reply binding. Every key either side wrote
/// for the queue carries the prefix, and none exists without it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn global_keyprefix_is_kombus_both_ways() {
    let mut s = redis_settings(BROKER);
    let prefix = format!("{}:", unique_queue("rb-kp"));
    s.broker_transport_options.global_keyprefix = prefix.clone();
    // Python → Rust.
    let (out, q) = python_producer_against_echo(&s, "rb-kp", "keyprefix@%h", "roundtrip").await;
    assert_roundtrip(&out);
    let mut conn = redis(BROKER).await;
    let bound = key_exists(BROKER, &format!("{prefix}_kombu.binding.{q}")).await;
    assert!(bound, "no prefixed binding for {q}");

    // Rust → Python, and the pidbox both ways.
    let rust_node = format!("keyprefix@{q}");
    let worker = echo_worker(&s, &format!("{q}-rust"), &rust_node).await;
    let reply = celery_reply(&s, &rust_node, &["inspect", "ping"]).await;
    assert_eq!(reply, json!({"ok": "pong"}));
    let client = Client::connect(&s).await.expect("client");
    let job = client
        .send_task(
            "echo.echo",
            kwargs(json!({"from": "rust", "prefixed": true})),
            &SendOptions {
                queue: Some(q.clone()),
                priority: Some(6),
                ..Default::default()
            },
        )
        .await
        .expect("sent");
    let six: u64 = redis::cmd("LLEN")
        .arg(format!("{prefix}{q}\x06\x166"))
        .query_async(&mut conn)
        .await
        .expect("llen");
    assert_eq!(six, 1, "not on the prefixed priority-6 list");
    let _python = python_celery_worker(&s, &q, &format!("py-{q}@%h"));
    let v = job
        .get(Duration::from_secs(60))
        .await
        .expect("python ran it");
    assert_eq!(v["worker"], "python");
    assert_eq!(v["kwargs"], json!({"from": "rust", "prefixed": true}));
    worker.shutdown().await;

    // Nothing of this queue was written without the prefix.
    let unprefixed: Vec<String> = redis::cmd("KEYS")
        .arg(format!("*{q}*"))
        .query_async(&mut conn)
        .await
        .expect("keys");
    let stray: Vec<&String> = unprefixed
        .iter()
        .filter(|k| !k.starts_with(&prefix))
        .collect();
    assert!(stray.is_empty(), "keys without the prefix: {stray:?}");
    let mut keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}*"))
        .query_async(&mut conn)
        .await
        .expect("keys");
    keys.sort();
    assert!(
        keys.contains(&format!("{prefix}_kombu.binding.{q}-rust")),
        "{keys:?}"
    );
    if !keys.is_empty() {
        let _: Result<(), _> = redis::cmd("DEL").arg(&keys).query_async(&mut conn).await;
    }
}

/// kombu's `sentinel://` broker URL through a real Redis Sentinel, started here on a free port
/// of 127.0.0.1 monitoring the shared Redis under a group name of its own (never failed over;
/// killed when the test ends): a Python producer given the same URL and `master_name` reaches
/// a Rust worker that found the master through it, in the URL's database, and gets the result;
/// a group no sentinel knows fails the connection, naming it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sentinel_url_finds_the_broker_as_kombu_does() {
    let port = mediafarm_tests::free_port();
    let group = unique_queue("mf-sentinel");
    let dir = mediafarm_tests::temp_dir("sentinel");
    let conf = dir.join("sentinel.conf");
    std::fs::write(
        &conf,
        format!(
            "port {port}\nbind 127.0.0.1\ndaemonize no\ndir {}\n\
             sentinel monitor {group} 127.0.0.1 6379 1\n\
             sentinel down-after-milliseconds {group} 600000\n\
             sentinel failover-timeout {group} 600000\n",
            dir.display()
        ),
    )
    .expect("config written");
    let _sentinel = Proc::spawn(
        std::process::Command::new("redis-server")
            .arg(&conf)
            .arg("--sentinel")
            .stdout(std::process::Stdio::null()),
    );
    tokio::task::spawn_blocking(move || mediafarm_tests::process::wait_port(port))
        .await
        .expect("the sentinel listens");

    let mut s = redis_settings(&format!("sentinel://127.0.0.1:{port}/11"));
    s.broker_transport_options.master_name = Some(group.clone());
    let (out, q) =
        python_producer_against_echo(&s, "rb-sentinel", "sentinel@%h", "roundtrip").await;
    assert_roundtrip(&out);
    // The worker used the URL's database: its binding is in database 11.
    let bound = key_exists(FLOWER_BROKER, &format!("_kombu.binding.{q}")).await;
    assert!(bound, "no binding for {q} in database 11");
    forget_queue(&redis_settings(FLOWER_BROKER), &q).await;

    let mut unknown = s.clone();
    unknown.broker_transport_options.master_name = Some(format!("{group}-unknown"));
    let e = match RedisBroker::connect(&unknown).await {
        Err(e) => e.to_string(),
        Ok(_) => panic!("connected through a group no sentinel knows"),
    };
    assert!(e.contains(&format!("{group}-unknown")), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Asks `redis-server` on `port` one command, `None` while it cannot be reached.
async fn ask_port(port: u16, cmd: &redis::Cmd) -> Option<redis::Value> {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}")).ok()?;
    let mut conn = client.get_multiplexed_async_connection().await.ok()?;
    cmd.query_async(&mut conn).await.ok()
}

/// Polls `check` every 200 ms, at most `tries` times; panics with `what` when it never holds.
async fn poll_until<F, Fut>(what: &str, tries: u32, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..tries {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("gave up waiting until {what}");
}

/// A running worker follows a Sentinel failover, as kombu does by asking the sentinels at each
/// reconnection. Everything runs on private ports of 127.0.0.1 (the shared Redis is not
/// touched as the broker; it stays the result backend): a `redis-server` master, a replica of
/// it, and one sentinel (quorum 1) monitoring the master under a group name of its own. A
/// Rust worker on the `sentinel://` URL runs a job; the master is then killed, the sentinel
/// promotes the replica, and without any restart the same worker takes a job published by a
/// new client (which finds the new master through the sentinels), a job published by the
/// client that was connected before the failover (its publisher follows too), and answers a
/// pidbox ping (its control subscription moved to the new master). Every process started here
/// is killed when the test ends, passing or not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_worker_follows_a_sentinel_failover() {
    follows_a_failover(Failover::KillMaster).await;
}

/// The same, with the failover asked of the sentinel (`SENTINEL FAILOVER`): the old master
/// stays up, demoted to a replica that refuses writes (`READONLY`), and the worker, whose
/// connection is dropped by the demotion, must not settle back on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_worker_leaves_a_demoted_master() {
    follows_a_failover(Failover::AskTheSentinel).await;
}

#[derive(Clone, Copy, PartialEq)]
enum Failover {
    KillMaster,
    AskTheSentinel,
}

async fn follows_a_failover(how: Failover) {
    let dir = mediafarm_tests::temp_dir("sentinel-failover");
    let mut ports = Vec::new();
    while ports.len() < 3 {
        let p = mediafarm_tests::free_port();
        if !ports.contains(&p) {
            ports.push(p);
        }
    }
    let (master_port, replica_port, sentinel_port) = (ports[0], ports[1], ports[2]);
    let server = |port: u16, name: &str| {
        let data = dir.join(name);
        std::fs::create_dir_all(&data).expect("data dir");
        let mut cmd = std::process::Command::new("redis-server");
        cmd.args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--dir"])
            .arg(&data)
            .stdout(std::process::Stdio::null());
        cmd
    };
    let mut master = Proc::spawn(&mut server(master_port, "master"));
    let _replica = Proc::spawn(server(replica_port, "replica").args([
        "--replicaof",
        "127.0.0.1",
        &master_port.to_string(),
    ]));
    let group = unique_queue("mf-failover");
    let conf = dir.join("sentinel.conf");
    std::fs::write(
        &conf,
        format!(
            "port {sentinel_port}\nbind 127.0.0.1\ndaemonize no\ndir {}\n\
             sentinel monitor {group} 127.0.0.1 {master_port} 1\n\
             sentinel down-after-milliseconds {group} 1000\n\
             sentinel failover-timeout {group} 10000\n",
            dir.display()
        ),
    )
    .expect("config written");
    let _sentinel = Proc::spawn(
        std::process::Command::new("redis-server")
            .arg(&conf)
            .arg("--sentinel")
            .stdout(std::process::Stdio::null()),
    );
    for port in [master_port, replica_port, sentinel_port] {
        tokio::task::spawn_blocking(move || mediafarm_tests::process::wait_port(port))
            .await
            .expect("listening");
    }
    // The sentinel learns of the replica from the master's INFO (every 10 s at first).
    poll_until("the sentinel knows the replica, in sync", 150, || async {
        let replicas = ask_port(
            sentinel_port,
            redis::cmd("SENTINEL").arg("REPLICAS").arg(&group),
        )
        .await;
        format!("{replicas:?}").contains(&replica_port.to_string())
            && format!("{replicas:?}").contains("master-link-status")
            && !format!("{replicas:?}").contains("disconnected")
    })
    .await;

    let mut s = redis_settings(&format!("sentinel://127.0.0.1:{sentinel_port}/3"));
    s.broker_transport_options.master_name = Some(group.clone());
    let q = unique_queue("rb-failover");
    let node = format!("failover@{q}");
    let worker = echo_worker(&s, &q, &node).await;
    let opts = SendOptions {
        queue: Some(q.clone()),
        ..Default::default()
    };
    let before = Client::connect(&s).await.expect("client");
    let r = before
        .send_task("echo.echo", kwargs(json!({"x": 1})), &opts)
        .await
        .expect("sent");
    assert_eq!(
        r.get(Duration::from_secs(30)).await.expect("ran"),
        json!({"x": 1})
    );

    match how {
        Failover::KillMaster => master.kill9(),
        Failover::AskTheSentinel => {
            let ok = ask_port(
                sentinel_port,
                redis::cmd("SENTINEL").arg("FAILOVER").arg(&group),
            )
            .await;
            assert!(ok.is_some(), "SENTINEL FAILOVER refused");
        }
    }
    let replica_port_s = replica_port.to_string();
    poll_until("the sentinel names the replica as master", 300, || async {
        let addr = ask_port(
            sentinel_port,
            redis::cmd("SENTINEL")
                .arg("get-master-addr-by-name")
                .arg(&group),
        )
        .await;
        matches!(&addr, Some(redis::Value::Array(a)) if format!("{:?}", a.get(1)).contains(&replica_port_s))
    })
    .await;

    let after = Client::connect(&s)
        .await
        .expect("client after the failover");
    let r = after
        .send_task("echo.echo", kwargs(json!({"x": 2})), &opts)
        .await
        .expect("sent through the new master");
    assert_eq!(
        r.get(Duration::from_secs(60))
            .await
            .expect("the same worker ran it"),
        json!({"x": 2})
    );
    let r = before
        .send_task("echo.echo", kwargs(json!({"x": 3})), &opts)
        .await
        .expect("the earlier client's publisher followed the master");
    assert_eq!(
        r.get(Duration::from_secs(60)).await.expect("ran"),
        json!({"x": 3})
    );
    let destination = [node.clone()];
    let mut answered = false;
    for _ in 0..30 {
        let replies = mediafarm::amqp::pidbox::mailbox::call(
            &s,
            "ping",
            json!({}),
            Some(&destination),
            Duration::from_secs(1),
        )
        .await;
        if replies.is_ok_and(|r| !r.is_empty()) {
            answered = true;
            break;
        }
    }
    assert!(
        answered,
        "the worker's control subscription did not follow the master"
    );
    worker.shutdown().await;
    drop(master);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A batch larger than one publishing round trip arrives whole and in order; one fetch takes
/// as many messages as asked (each recorded unacknowledged), in that order; and the doorbell an
/// idle worker waits on rings when a message lands without taking it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_are_fetched_in_order_and_the_doorbell_rings_without_taking() {
    use mediafarm::protocol::TaskMessage;
    use mediafarm::redis_broker::doorbell::Doorbell;

    let s = redis_settings(BROKER);
    let q = unique_queue("rb-batch");
    let broker = RedisBroker::connect(&s).await.expect("broker");
    let mut bell = Doorbell::default();
    let queues = vec![q.clone()];
    assert!(
        !bell.wait(&broker, &queues, Duration::from_millis(50)).await,
        "rang on an empty queue"
    );

    let client = Client::connect(&s).await.expect("client");
    let msgs: Vec<TaskMessage> = (0..150)
        .map(|i| TaskMessage::new("echo.echo", kwargs(json!({ "n": i }))))
        .collect();
    let ids: Vec<String> = msgs.iter().map(|m| m.id.clone()).collect();
    let publish = {
        let (client, q) = (client.clone(), q.clone());
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            client.publish_batch(&q, &msgs).await.expect("published");
        })
    };
    assert!(
        bell.wait(&broker, &queues, Duration::from_secs(30)).await,
        "the doorbell did not ring when messages landed"
    );
    publish.await.expect("publisher");
    assert_eq!(
        broker.len(&q).await.expect("len"),
        150,
        "the doorbell took a message"
    );

    let mut taken = broker.fetch(&queues, 100).await.expect("fetch");
    assert_eq!(taken.len(), 100);
    taken.extend(broker.fetch(&queues, 100).await.expect("fetch"));
    assert_eq!(taken.len(), 150);
    assert!(broker.fetch(&queues, 100).await.expect("fetch").is_empty());
    let mut conn = redis(BROKER).await;
    let held = unacked(&mut conn).await;
    let mut got = Vec::new();
    for t in &taken {
        assert_eq!(t.queue, q);
        let env = t.message.as_ref().expect("a kombu envelope");
        let tag = env.tag().expect("tag").to_owned();
        assert!(
            held.iter().any(|h| h.contains(&tag)),
            "{tag} not recorded as unacknowledged"
        );
        let (_, headers) = env.properties();
        got.push(headers["id"].as_str().expect("id").to_owned());
        broker.ack(&tag).await.expect("ack");
    }
    assert_eq!(got, ids, "not taken in the order published");
    forget_queue(&s, &q).await;
}

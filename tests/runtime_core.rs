//! The worker runtime against the real RabbitMQ and Redis on 127.0.0.1: results, failures,
//! bad messages, limits, concurrency, graceful stop, metrics and the producer pool.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use lapin::BasicProperties;
use mediafarm::client::SendOptions;
use mediafarm::{Client, Job, Registry, Task, TaskContext, TaskError, TaskState, Worker};
use mediafarm_tests::gate::Gate;
use mediafarm_tests::{
    celery_props, delete_queue, echo_registry, failed, kwargs, publish_raw, ready_count, settings,
    to, unique_queue, Counted, Farm,
};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

const WAIT: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_producer_to_rust_worker_success_and_failure() {
    let s = settings();
    let farm = Farm::start("rt", s, echo_registry()).await;
    let (q, client) = (&farm.queue, &farm.client);

    let r = client
        .send_task("echo.echo", kwargs(json!({"a": 1, "t": "日本語"})), &to(q))
        .await
        .unwrap();
    assert_eq!(r.get(WAIT).await.unwrap(), json!({"a": 1, "t": "日本語"}));
    assert_eq!(r.state().await.unwrap(), TaskState::Success);
    let meta = r.meta().await.unwrap().unwrap();
    assert!(meta.date_done.is_some());
    assert_eq!(meta.task_id, r.id);

    let r = client
        .send_task("echo.echo", kwargs(json!({"fail": "disk full"})), &to(q))
        .await
        .unwrap();
    let err = failed(r.get(WAIT).await);
    assert_eq!(
        (err.exc_type.as_ref(), err.message.as_str()),
        ("EchoFailure", "disk full")
    );
    let meta = r.meta().await.unwrap().unwrap();
    assert_eq!(meta.status, TaskState::Failure);
    assert!(meta
        .traceback
        .unwrap()
        .contains(&format!("echo.echo[{}]", r.id)));

    farm.stop().await;
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Resize {
    width: u32,
    label: Option<String>,
}

impl Job for Resize {
    const TASK: &'static str = "test.resize";
    // Only the typed-kwargs test consumes this queue.
    const QUEUE: &'static str = "t-typed-resize";
}

struct ResizeTask;

impl Task for ResizeTask {
    const NAME: &'static str = "test.resize";
    const POSITIONAL: &'static [&'static str] = &["width"];
    type Args = Resize;
    type Output = Value;

    async fn run(&self, ctx: TaskContext, args: Resize) -> Result<Value, TaskError> {
        let doubled = ctx.cpu(move || args.width * 2).await?;
        Ok(json!({"doubled": doubled, "label": args.label, "id": ctx.id}))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typed_kwargs_are_checked_and_documented_positionals_accepted() {
    let s = settings();
    let farm = Farm::start_on(
        Resize::QUEUE.into(),
        s,
        Registry::new().register(ResizeTask),
    )
    .await;
    let (q, client) = (&farm.queue, &farm.client);

    let typed = Resize {
        width: 21,
        label: Some("typed".into()),
    };
    let r = client.send(&typed).await.unwrap();
    let v = r.get(WAIT).await.unwrap();
    assert_eq!(v["label"], "typed");
    assert_eq!(v["doubled"], 42);
    assert_eq!(v["id"], json!(r.id));

    let r = client
        .send_task("test.resize", kwargs(json!({"width": "wide"})), &to(q))
        .await
        .unwrap();
    let err = failed(r.get(WAIT).await);
    assert_eq!(err.exc_type, "InvalidArguments");
    assert!(err.message.contains("kwarg `width`"), "{}", err.message);

    let r = client
        .send_task(
            "test.resize",
            kwargs(json!({"width": 1, "hieght": 2})),
            &to(q),
        )
        .await
        .unwrap();
    assert!(failed(r.get(WAIT).await)
        .message
        .contains("unknown field `hieght`"));

    // A documented positional argument, as Python's send_task(args=[5]) sends it.
    let mut msg =
        mediafarm::client::build_message("test.resize", Map::new(), &SendOptions::default());
    msg.args = vec![json!(5)];
    client
        .publish_batch(q, std::slice::from_ref(&msg))
        .await
        .unwrap();
    assert_eq!(
        client.result(&msg.id).get(WAIT).await.unwrap()["doubled"],
        10
    );

    farm.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_messages_fail_with_a_reason_and_the_worker_keeps_going() {
    let mut s = settings();
    s.task_message_max_bytes = 4096;
    let farm = Farm::start("bad", s, echo_registry()).await;
    let (s, q, client) = (&farm.settings, &farm.queue, &farm.client);

    let cases: Vec<(&str, BasicProperties, Vec<u8>, &str)> = vec![
        (
            "not-json",
            celery_props("bad-1", "echo.echo"),
            b"{nope".to_vec(),
            "not valid JSON",
        ),
        (
            "not-a-list",
            celery_props("bad-2", "echo.echo"),
            b"{\"a\": 1}".to_vec(),
            "must be a JSON list",
        ),
        (
            "two-items",
            celery_props("bad-3", "echo.echo"),
            b"[[], {}]".to_vec(),
            "3 items",
        ),
        (
            "pickle",
            celery_props("bad-4", "echo.echo")
                .with_content_type("application/x-python-serialize".into()),
            b"\x80\x04N.".to_vec(),
            "runs code chosen by whoever",
        ),
        (
            "unknown-task",
            celery_props("bad-5", "echo.nope"),
            b"[[], {}, {}]".to_vec(),
            "unknown task \"echo.nope\"",
        ),
        (
            "oversized",
            celery_props("bad-6", "echo.echo"),
            vec![b' '; 5000],
            "task_message_max_bytes",
        ),
        (
            "kwargs-list",
            celery_props("bad-7", "echo.echo"),
            b"[[], [1], {}]".to_vec(),
            "(kwargs) must be an object",
        ),
    ];
    let mut ids = Vec::new();
    for (label, props, body, _) in &cases {
        let id = format!("{label}-{}", uuid::Uuid::new_v4());
        let props = props.clone().with_correlation_id(id.as_str().into());
        let mut headers = props.headers().clone().unwrap_or_default();
        headers.insert(
            "id".into(),
            lapin::types::AMQPValue::LongString(id.as_str().into()),
        );
        publish_raw(s, q, props.with_headers(headers), body).await;
        ids.push(id);
    }
    // No `id` header and no correlation id: nothing to store under, only a rejection.
    publish_raw(
        s,
        q,
        BasicProperties::default().with_content_type("application/json".into()),
        b"[]",
    )
    .await;

    for ((label, _, _, want), id) in cases.iter().zip(&ids) {
        let err = failed(client.result(id).get(WAIT).await);
        assert!(err.message.contains(want), "{label}: {}", err.message);
    }
    // Still consuming, and every bad message left the queue.
    let r = client
        .send_task("echo.echo", kwargs(json!({"after": true})), &to(q))
        .await
        .unwrap();
    assert_eq!(r.get(WAIT).await.unwrap(), json!({"after": true}));
    assert_eq!(ready_count(s, q).await, 0);

    farm.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_panics_expiry_and_started_state() {
    let mut s = settings();
    s.task_track_started = true;
    let farm = Farm::start("limits", s, echo_registry()).await;
    let (q, client) = (&farm.queue, &farm.client);

    let slow = SendOptions {
        time_limit: Some(0.3),
        ..to(q)
    };
    let r = client
        .send_task("echo.echo", kwargs(json!({"sleep_ms": 5000})), &slow)
        .await
        .unwrap();
    let err = failed(r.get(WAIT).await);
    assert_eq!(
        (err.exc_type.as_ref(), err.exc_module.as_ref()),
        ("TimeLimitExceeded", "celery.exceptions")
    );

    let r = client
        .send_task("echo.echo", kwargs(json!({"panic": 1})), &to(q))
        .await
        .unwrap();
    let err = failed(r.get(WAIT).await);
    assert_eq!(err.exc_type, "InternalError");
    assert!(
        err.message.contains("echo was asked to panic"),
        "{}",
        err.message
    );

    let expired = SendOptions {
        expires: Some(-1.0),
        ..to(q)
    };
    let r = client
        .send_task("echo.echo", Map::new(), &expired)
        .await
        .unwrap();
    let err = failed(r.get(WAIT).await);
    assert_eq!(r.state().await.unwrap(), TaskState::Revoked);
    assert_eq!(err.exc_type, "TaskRevokedError");

    let r = client
        .send_task("echo.echo", kwargs(json!({"sleep_ms": 1500})), &to(q))
        .await
        .unwrap();
    let mut saw_started = false;
    for _ in 0..100 {
        match r.state().await.unwrap() {
            TaskState::Started => {
                saw_started = true;
                break;
            }
            TaskState::Success => break,
            _ => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    assert!(
        saw_started,
        "STARTED was never stored with task_track_started"
    );
    r.get(WAIT).await.unwrap();

    farm.stop().await;
}

struct Gauge {
    now: AtomicUsize,
    peak: AtomicUsize,
}

struct Measured(Arc<Gauge>);

impl Task for Measured {
    const NAME: &'static str = "test.measured";
    type Args = Map<String, Value>;
    type Output = ();

    async fn run(&self, _ctx: TaskContext, _args: Self::Args) -> Result<(), TaskError> {
        let now = self.0.now.fetch_add(1, Ordering::SeqCst) + 1;
        self.0.peak.fetch_max(now, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(100)).await;
        self.0.now.fetch_sub(1, Ordering::SeqCst);
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrency_bounds_running_jobs() {
    let mut s = settings();
    s.worker_concurrency = 3;
    let gauge = Arc::new(Gauge {
        now: AtomicUsize::new(0),
        peak: AtomicUsize::new(0),
    });
    let farm = Farm::start("conc", s, Registry::new().register(Measured(gauge.clone()))).await;
    let (q, client) = (&farm.queue, &farm.client);
    let mut results = Vec::new();
    for _ in 0..12 {
        results.push(
            client
                .send_task("test.measured", Map::new(), &to(q))
                .await
                .unwrap(),
        );
    }
    for r in results {
        r.get(WAIT).await.unwrap();
    }
    assert_eq!(gauge.peak.load(Ordering::SeqCst), 3);
    farm.stop().await;
}

/// Hands itself on `hops` times, carrying the first job's id, then reports where it ran.
struct Relay;

impl Task for Relay {
    const NAME: &'static str = "test.relay";
    type Args = Map<String, Value>;
    type Output = Value;

    async fn run(&self, ctx: TaskContext, args: Self::Args) -> Result<Value, TaskError> {
        let hops = args.get("hops").and_then(Value::as_u64).unwrap_or(0);
        let first = args
            .get("first")
            .and_then(Value::as_str)
            .unwrap_or(&ctx.id)
            .to_owned();
        if hops == 0 {
            return Ok(json!({"first": first, "queue": &*ctx.queue, "id": ctx.id}));
        }
        let next = ctx
            .continue_with(kwargs(json!({"hops": hops - 1, "first": first})))
            .await?;
        Ok(json!({"continued_as": next}))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_hands_itself_on_to_the_queue_it_came_from() {
    let farm = Farm::start("relay", settings(), Registry::new().register(Relay)).await;
    let (q, client) = (&farm.queue, &farm.client);
    let r = client
        .send_task("test.relay", kwargs(json!({"hops": 2})), &to(q))
        .await
        .unwrap();
    let mut ids = vec![r.id.clone()];
    let mut out = r.get(WAIT).await.unwrap();
    while let Some(next) = out.get("continued_as").and_then(Value::as_str) {
        assert!(
            !ids.iter().any(|id| id == next),
            "a new id each hop: {ids:?}"
        );
        ids.push(next.to_owned());
        out = client.result(next).get(WAIT).await.unwrap();
    }
    assert_eq!(ids.len(), 3, "two hand-offs: {ids:?}");
    assert_eq!(out["first"], r.id.as_str(), "{out}");
    assert_eq!(out["queue"], q.as_str(), "{out}");
    assert_eq!(out["id"], ids[2].as_str(), "{out}");
    farm.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_finishes_running_jobs_and_returns_the_rest() {
    let mut s = settings();
    s.worker_concurrency = 4;
    let Farm {
        settings: s,
        queue: q,
        client,
        worker,
    } = Farm::start("stop", s, echo_registry()).await;
    let mut results = Vec::new();
    for i in 0..40 {
        let r = client
            .send_task(
                "echo.echo",
                kwargs(json!({"i": i, "sleep_ms": 150})),
                &to(&q),
            )
            .await
            .unwrap();
        results.push(r);
    }
    // Stop once some jobs are done and others are running or waiting in prefetch.
    results[3].get(WAIT).await.unwrap();
    worker.shutdown().await;
    let mut done = 0;
    for r in &results {
        if r.state().await.unwrap() == TaskState::Success {
            done += 1;
        }
    }
    assert!(done < 40, "the stop came too late to test anything");
    assert_eq!(
        ready_count(&s, &q).await as usize,
        40 - done,
        "every unfinished job is back in the queue"
    );

    let farm = Farm::start_on(q.clone(), s.clone(), echo_registry()).await;
    for (i, r) in results.iter().enumerate() {
        assert_eq!(r.get(WAIT).await.unwrap()["i"], i);
    }
    farm.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_readiness_are_served() {
    let s = settings();
    let farm = Farm::start("metrics", s, echo_registry()).await;
    let (q, client) = (&farm.queue, &farm.client);
    client
        .send_task("echo.echo", Map::new(), &to(q))
        .await
        .unwrap()
        .get(WAIT)
        .await
        .unwrap();
    let r = client
        .send_task("echo.echo", kwargs(json!({"fail": "x"})), &to(q))
        .await
        .unwrap();
    let _ = r.get(WAIT).await;
    let r = client
        .send_task("no.such.task", Map::new(), &to(q))
        .await
        .unwrap();
    let _ = r.get(WAIT).await;

    let get = |path: &'static str| {
        let addr = farm.worker.metrics_addr;
        async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
            c.write_all(
                format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").as_bytes(),
            )
            .await
            .unwrap();
            let mut out = String::new();
            c.read_to_string(&mut out).await.unwrap();
            out
        }
    };
    let ready = get("/readyz").await;
    assert!(ready.starts_with("HTTP/1.1 200"), "{ready}");
    let m = get("/metrics").await;
    // celery-exporter's hostname label is the host part of the node name ("test@<q>").
    let labels = format!(r#"name="echo.echo",hostname="{q}",queue_name="{q}""#);
    assert!(
        m.contains(&format!("celery_task_succeeded_total{{{labels}}} 1")),
        "{m}"
    );
    assert!(
        m.contains(&format!(
            r#"celery_task_failed_total{{name="echo.echo",hostname="{q}",exception="EchoFailure",queue_name="{q}"}} 1"#
        )),
        "{m}"
    );
    assert!(
        m.contains(&format!("celery_task_received_total{{{labels}}} 2")),
        "{m}"
    );
    assert!(
        m.contains(&format!("celery_task_runtime_count{{{labels}}} 2")),
        "{m}"
    );
    // Names from the wire never become labels unless a task of that name is registered.
    let unknown = format!(r#"name="unknown",hostname="{q}",queue_name="{q}""#);
    assert!(
        m.contains(&format!("celery_task_rejected_total{{{unknown}}} 1")),
        "{m}"
    );
    assert!(!m.contains("no.such.task"), "{m}");
    farm.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producer_pool_honours_broker_pool_limit() {
    let mut s = settings();
    s.broker_pool_limit = 2;
    let q = unique_queue("pool");
    let publisher = mediafarm::amqp::broker::Publisher::new(&s);
    let sends = (0..40).map(|i| {
        let (publisher, q) = (publisher.clone(), q.clone());
        tokio::spawn(async move {
            let msg = mediafarm::client::build_message(
                "echo.echo",
                kwargs(json!({"i": i})),
                &SendOptions::default(),
            );
            publisher.publish(&q, &msg).await
        })
    });
    for send in sends.collect::<Vec<_>>() {
        send.await.unwrap().unwrap();
    }
    assert!(
        publisher.connections_opened() <= 2,
        "opened {}",
        publisher.connections_opened()
    );
    assert_eq!(ready_count(&s, &q).await, 40);
    delete_queue(&s, &q).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_up_refuses_bad_settings() {
    let mut s = settings();
    s.result_backend = "redis://127.0.0.1:1/0".into();
    let err = Worker::new(s, echo_registry(), vec!["x".into()])
        .start()
        .await
        .err()
        .unwrap();
    assert!(err.to_string().contains("redis://127.0.0.1:1/0"), "{err}");
    let err = Worker::new(settings(), echo_registry(), vec![])
        .start()
        .await
        .err()
        .unwrap();
    assert!(err.to_string().contains("--queues"), "{err}");
}

/// Closes the AMQP connections whose client-given name is `name`, as an operator or a broker
/// failover would; returns how many were closed.
fn close_connections_named(name: &str) -> usize {
    let rabbitmqctl = |args: &[&str]| {
        let out = std::process::Command::new("rabbitmqctl")
            .args(args)
            .output()
            .expect("rabbitmqctl runs");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    // JSON shows the client-given name, but prints pids in a form close_connection refuses;
    // the plain listing gives usable pids. The peer address ("name") joins the two.
    let json = rabbitmqctl(&[
        "list_connections",
        "name",
        "client_properties",
        "--formatter",
        "json",
    ]);
    let rows: Vec<Value> = serde_json::from_str(&json).expect("rabbitmqctl prints JSON");
    let peers: Vec<String> = rows
        .iter()
        .filter(|row| {
            row["client_properties"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|p| p[0] == "connection_name" && p[2] == name)
        })
        .filter_map(|row| row["name"].as_str().map(str::to_owned))
        .collect();
    let plain = rabbitmqctl(&["list_connections", "-q", "pid", "name"]);
    let mut closed = 0;
    for line in plain.lines() {
        let Some((pid, peer)) = line.split_once('\t') else {
            continue;
        };
        if peers.iter().any(|p| p == peer) {
            rabbitmqctl(&["close_connection", pid, "test: simulated broker-side close"]);
            closed += 1;
        }
    }
    closed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_reconnects_after_the_broker_drops_its_connection() {
    let farm = Farm::start("reconnect", settings(), echo_registry()).await;
    let (q, client) = (&farm.queue, &farm.client);
    client
        .send_task("echo.echo", Map::new(), &to(q))
        .await
        .unwrap()
        .get(WAIT)
        .await
        .unwrap();

    // The fixture names the worker test@<queue>; its connection is "<node> worker".
    let name = format!("test@{q} worker");
    let closed = tokio::task::spawn_blocking(move || close_connections_named(&name))
        .await
        .unwrap();
    assert_eq!(closed, 1, "the worker's connection was found and closed");

    let r = client
        .send_task("echo.echo", kwargs(json!({"after": "reconnect"})), &to(q))
        .await
        .unwrap();
    assert_eq!(
        r.get(Duration::from_secs(30)).await.unwrap(),
        json!({"after": "reconnect"})
    );
    farm.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producer_reconnects_after_the_broker_drops_its_connection() {
    let s = settings();
    let q = unique_queue("prod-reconnect");
    let name = format!("test-producer-{}", uuid::Uuid::new_v4().simple());
    let publisher = mediafarm::amqp::broker::Publisher::named(&s, &name);
    let msg = |i: i32| {
        mediafarm::client::build_message(
            "echo.echo",
            kwargs(json!({"i": i})),
            &SendOptions::default(),
        )
    };
    publisher.publish(&q, &msg(1)).await.unwrap();
    let closed = tokio::task::spawn_blocking(move || close_connections_named(&name))
        .await
        .unwrap();
    assert_eq!(closed, 1);
    publisher.publish(&q, &msg(2)).await.unwrap();
    assert_eq!(
        publisher.connections_opened(),
        2,
        "a new connection replaced the closed one"
    );
    assert_eq!(ready_count(&s, &q).await, 2);
    delete_queue(&s, &q).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_waiting_for_their_eta_do_not_block_ready_jobs() {
    let mut s = settings();
    s.worker_concurrency = 1;
    s.worker_prefetch_multiplier = 1;
    let farm = Farm::start("eta", s, echo_registry()).await;
    let (q, client) = (&farm.queue, &farm.client);
    let later = SendOptions {
        countdown: Some(4.0),
        ..to(q)
    };
    let mut waiting = Vec::new();
    for i in 0..3 {
        let kw = kwargs(json!({"later": i}));
        waiting.push(client.send_task("echo.echo", kw, &later).await.unwrap());
    }
    let now = client
        .send_task("echo.echo", kwargs(json!({"now": true})), &to(q))
        .await
        .unwrap();
    // The ready job is answered while all three countdown jobs still wait for their ETA.
    assert_eq!(now.get(WAIT).await.unwrap(), json!({"now": true}));
    for r in &waiting {
        assert_eq!(r.state().await.unwrap(), TaskState::Pending);
    }
    for (i, r) in waiting.iter().enumerate() {
        assert_eq!(r.get(WAIT).await.unwrap(), json!({"later": i}));
    }
    farm.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefetch_is_shared_by_all_queues_of_a_worker() {
    let mut s = settings();
    s.worker_concurrency = 1;
    s.worker_prefetch_multiplier = 1;
    s.worker_shutdown_grace = Duration::from_secs(3);
    let (q1, q2) = (unique_queue("pf1"), unique_queue("pf2"));
    let client = Client::connect(&s).await.unwrap();
    for q in [&q1, &q2] {
        for i in 0..5 {
            let kw = kwargs(json!({"i": i, "sleep_ms": 1500}));
            client.send_task("echo.echo", kw, &to(q)).await.unwrap();
        }
    }
    let worker = Worker::new(s.clone(), echo_registry(), vec![q1.clone(), q2.clone()])
        .start()
        .await
        .unwrap();
    // Once a job runs (1.5 s each), the worker holds one message across both queues.
    let ready = || async { ready_count(&s, &q1).await + ready_count(&s, &q2).await };
    for _ in 0..200 {
        if ready().await < 10 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        ready().await,
        9,
        "one message held in all, not one per queue"
    );
    worker.shutdown().await;
    delete_queue(&s, &q1).await;
    delete_queue(&s, &q2).await;
}

/// `test.limited`: returns its kwargs; at most 5 jobs a second start on one worker.
struct Limited;

impl Task for Limited {
    const NAME: &'static str = "test.limited";
    const RATE_LIMIT: Option<&'static str> = Some("5/s");
    type Args = Map<String, Value>;
    type Output = Map<String, Value>;

    async fn run(&self, _: TaskContext, args: Self::Args) -> Result<Self::Output, TaskError> {
        Ok(args)
    }
}

/// The worker's `/metrics` text.
async fn scrape(addr: std::net::SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
    c.write_all(b"GET /metrics HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    c.read_to_string(&mut out).await.unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limit_spaces_its_tasks_jobs_and_leaves_other_tasks_alone() {
    let mut s = settings();
    s.worker_concurrency = 2;
    // Room in prefetch for the limited jobs that wait and the other task's jobs.
    s.worker_prefetch_multiplier = 10;
    // A job may wait in the worker for its rate as long as it can still finish before
    // RabbitMQ's consumer_timeout: here 1740 s less this hard limit.
    s.task_time_limit = Some(Duration::from_secs(60));
    let registry = || echo_registry().register(Limited);
    let farm = Farm::start("rate", s, registry()).await;
    let (q, client) = (&farm.queue, &farm.client);

    // Ten jobs at once at 5/s: the first starts at once, each next one 200 ms later.
    let mut limited = Vec::new();
    for i in 0..10 {
        let kw = kwargs(json!({"i": i}));
        limited.push(client.send_task("test.limited", kw, &to(q)).await.unwrap());
    }
    let mut done = Vec::new();
    for (i, r) in limited.iter().enumerate() {
        assert_eq!(r.get(WAIT).await.unwrap(), json!({"i": i}));
        let meta = r.meta().await.unwrap().unwrap();
        let at = meta
            .date_done
            .as_deref()
            .and_then(mediafarm::protocol::parse_time);
        done.push(at.expect("a stored date_done"));
    }
    let spread = (*done.iter().max().unwrap() - *done.iter().min().unwrap())
        .to_std()
        .unwrap();
    // 9 intervals of 200 ms between the first start and the last; unlimited, these ten
    // echo jobs on two slots take a few milliseconds.
    assert!(
        spread >= Duration::from_millis(1600),
        "10 jobs at 5/s finished within {spread:?}"
    );

    // Slowed to one per 6 minutes while the worker runs: the next two wait in the worker
    // (their turns, at most 12 min away, fit the ack deadline), holding no slot, and the other
    // task's jobs run meanwhile.
    let rates = farm.worker.rate_limits();
    assert_eq!(
        rates.set("test.limited", Some("10/h")),
        Ok(mediafarm::runtime::rate::SET_REPLY)
    );
    let mut waiting = Vec::new();
    for i in 0..2 {
        let kw = kwargs(json!({"waits": i}));
        waiting.push(client.send_task("test.limited", kw, &to(q)).await.unwrap());
    }
    for i in 0..4 {
        let r = client
            .send_task("echo.echo", kwargs(json!({"other": i})), &to(q))
            .await
            .unwrap();
        assert_eq!(r.get(WAIT).await.unwrap(), json!({"other": i}));
    }
    let gauge =
        format!(r#"mediafarm_task_rate_limit_waiting{{name="test.limited",hostname="{q}"}} 2"#);
    tokio::time::timeout(WAIT, async {
        while !scrape(farm.worker.metrics_addr).await.contains(&gauge) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the gauge shows both waiting jobs");
    for r in &waiting {
        assert_eq!(r.state().await.unwrap(), TaskState::Pending);
    }

    // A stop returns the waiting jobs to the broker; a new worker (5/s again) runs them.
    let Farm {
        settings: s,
        queue: q,
        client,
        worker,
    } = farm;
    worker.shutdown().await;
    assert_eq!(ready_count(&s, &q).await, 2, "both waiting jobs went back");
    let farm = Farm::start_on(q.clone(), s.clone(), registry()).await;
    for (i, r) in waiting.iter().enumerate() {
        assert_eq!(r.get(WAIT).await.unwrap(), json!({"waits": i}));
    }
    drop(client);
    farm.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_that_does_not_parse_stops_start_up() {
    struct Typo;
    impl Task for Typo {
        const NAME: &'static str = "test.typo";
        const RATE_LIMIT: Option<&'static str> = Some("10/min");
        type Args = Map<String, Value>;
        type Output = ();
        async fn run(&self, _: TaskContext, _: Self::Args) -> Result<(), TaskError> {
            Ok(())
        }
    }
    let q = unique_queue("rate-typo");
    let err = Worker::new(settings(), Registry::new().register(Typo), vec![q])
        .start()
        .await
        .err()
        .expect("start-up refused");
    let text = err.to_string();
    assert!(
        text.contains("test.typo") && text.contains("\"10/min\" is not a rate"),
        "{text}"
    );
}

/// `test.limited_farm`: returns its kwargs; at most 5 jobs a second start across the farm.
struct LimitedFarm;

impl Task for LimitedFarm {
    const NAME: &'static str = "test.limited_farm";
    const RATE_LIMIT: Option<&'static str> = Some("5/s");
    type Args = Map<String, Value>;
    type Output = Map<String, Value>;

    async fn run(&self, _: TaskContext, args: Self::Args) -> Result<Self::Output, TaskError> {
        Ok(args)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_wide_rate_limit_holds_across_two_workers() {
    let mut s = settings();
    s.worker_concurrency = 2;
    // Two messages held per worker: the jobs are spread over both workers.
    s.worker_prefetch_multiplier = 1;
    s.task_rate_limit_scope = "cluster".into();
    let registry = || Registry::new().register(LimitedFarm);
    let farm = Farm::start("rate-farm", s.clone(), registry()).await;
    let (q, client) = (&farm.queue, &farm.client);
    let second = Worker::new(s.clone(), registry(), vec![q.clone()])
        .hostname(format!("second@{q}"))
        .start()
        .await
        .unwrap();
    let mut jobs = Vec::new();
    for i in 0..10 {
        let kw = kwargs(json!({"i": i}));
        jobs.push(
            client
                .send_task("test.limited_farm", kw, &to(q))
                .await
                .unwrap(),
        );
    }
    let mut done = Vec::new();
    for (i, r) in jobs.iter().enumerate() {
        assert_eq!(r.get(WAIT).await.unwrap(), json!({"i": i}));
        let meta = r.meta().await.unwrap().unwrap();
        let at = meta
            .date_done
            .as_deref()
            .and_then(mediafarm::protocol::parse_time);
        done.push(at.expect("a stored date_done"));
    }
    let spread = (*done.iter().max().unwrap() - *done.iter().min().unwrap())
        .to_std()
        .unwrap();
    // One bucket for both workers: 9 intervals of 200 ms. Each worker on its own bucket would
    // let its half through in about 4 intervals.
    assert!(
        spread >= Duration::from_millis(1600),
        "10 jobs at 5/s across two workers finished within {spread:?}"
    );
    second.shutdown().await;
    farm.stop().await;
}

/// `test.limited_park`: returns its kwargs; at most 20 jobs a minute (one per 3 s).
struct LimitedPark;

impl Task for LimitedPark {
    const NAME: &'static str = "test.limited_park";
    const RATE_LIMIT: Option<&'static str> = Some("20/m");
    type Args = Map<String, Value>;
    type Output = Map<String, Value>;

    async fn run(&self, _: TaskContext, args: Self::Args) -> Result<Self::Output, TaskError> {
        Ok(args)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_turn_beyond_the_ack_deadline_parks_the_job_in_a_delay_queue() {
    let mut s = settings();
    // A job may start at most 1.75 s after delivery: 10 s less 1.25 s (half the margin) less
    // its 7 s hard limit. The rate's 3 s interval is longer.
    s.broker_consumer_timeout = Duration::from_secs(10);
    s.task_time_limit = Some(Duration::from_secs(7));
    let farm = Farm::start("rate-park", s, Registry::new().register(LimitedPark)).await;
    let (q, client) = (&farm.queue, &farm.client);
    let mut jobs = Vec::new();
    for i in 0..2 {
        let kw = kwargs(json!({"i": i}));
        jobs.push(
            client
                .send_task("test.limited_park", kw, &to(q))
                .await
                .unwrap(),
        );
    }
    let mut done = Vec::new();
    for (i, r) in jobs.iter().enumerate() {
        assert_eq!(r.get(WAIT).await.unwrap(), json!({"i": i}));
        let meta = r.meta().await.unwrap().unwrap();
        let at = meta
            .date_done
            .as_deref()
            .and_then(mediafarm::protocol::parse_time);
        done.push(at.expect("a stored date_done"));
    }
    // Delivered together, either may take the first turn; the other is parked.
    let gap = (done[1] - done[0]).abs().to_std().unwrap();
    assert!(
        gap >= Duration::from_millis(2500),
        "the second job ran {gap:?} after the first"
    );
    // The other job went back through the broker (a delay queue) and was received again.
    let m = scrape(farm.worker.metrics_addr).await;
    let received = format!(
        r#"celery_task_received_total{{name="test.limited_park",hostname="{q}",queue_name="{q}"}} 3"#
    );
    assert!(m.contains(&received), "{m}");
    farm.stop().await;
}

/// Polls `check` every 10 ms until it holds, for up to [`WAIT`]; panics with `what` if it never
/// does.
async fn until<F: std::future::Future<Output = bool>>(what: &str, mut check: impl FnMut() -> F) {
    let end = std::time::Instant::now() + WAIT;
    while !check().await {
        assert!(std::time::Instant::now() < end, "never happened: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A job whose task returned and that only waits for its result store (here: a Redis the test
/// holds) lends its place in the prefetch window, so the next messages are delivered and run;
/// the window widens by `worker_finishing_limit` at most (here 2), and every job still runs
/// once, acknowledged only after its result is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_waiting_for_their_result_store_do_not_hold_the_prefetch_window() {
    let mut s = settings();
    let gate = Gate::start(Gate::upstream_of(&s.result_backend)).await;
    let direct = s.clone();
    s.result_backend = gate.redis_url(&s.result_backend);
    s.worker_concurrency = 1;
    s.worker_prefetch_multiplier = 2;
    s.worker_finishing_limit = Some(2);
    let runs = Arc::new(AtomicUsize::new(0));
    let farm = Farm::start("window", s, Registry::new().register(Counted(runs.clone()))).await;
    let q = farm.queue.clone();
    // Publishing needs no Redis; reading the results goes around the gate.
    let client = Client::connect(&direct).await.unwrap();
    gate.hold();
    let mut results = Vec::new();
    for _ in 0..10 {
        results.push(
            client
                .send_task("test.counted", Map::new(), &to(&q))
                .await
                .unwrap(),
        );
    }
    // A window of 2 (-c 1 × 2): the first two jobs run and wait for Redis; each lends its
    // place, so two more are delivered and run; those two keep theirs (2 lent at most).
    until("four jobs delivered", || async {
        ready_count(&direct, &q).await == 6
    })
    .await;
    until("four jobs run", || async {
        runs.load(Ordering::SeqCst) == 4
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        ready_count(&direct, &q).await,
        6,
        "no more than prefetch + the finishing limit held"
    );
    assert_eq!(runs.load(Ordering::SeqCst), 4);
    for r in &results {
        assert_ne!(
            r.state().await.unwrap(),
            TaskState::Success,
            "nothing is stored while Redis is held"
        );
    }
    gate.release();
    for r in &results {
        r.get(WAIT).await.unwrap();
    }
    assert_eq!(runs.load(Ordering::SeqCst), 10, "each job ran once");
    farm.stop().await;
}

/// `worker_finishing_limit` bounds how far finishing jobs widen the window: with 1, a window of
/// 2 lets one more message in while both jobs wait for Redis, and no more; every job still runs
/// once, acknowledged only after its result is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_finishing_limit_bounds_how_far_finishing_jobs_widen_the_window() {
    let mut s = settings();
    let gate = Gate::start(Gate::upstream_of(&s.result_backend)).await;
    let direct = s.clone();
    s.result_backend = gate.redis_url(&s.result_backend);
    s.worker_concurrency = 1;
    s.worker_prefetch_multiplier = 2;
    s.worker_finishing_limit = Some(1);
    let runs = Arc::new(AtomicUsize::new(0));
    let farm = Farm::start(
        "lendlimit",
        s,
        Registry::new().register(Counted(runs.clone())),
    )
    .await;
    let q = farm.queue.clone();
    let client = Client::connect(&direct).await.unwrap();
    gate.hold();
    let mut results = Vec::new();
    for _ in 0..10 {
        results.push(
            client
                .send_task("test.counted", Map::new(), &to(&q))
                .await
                .unwrap(),
        );
    }
    // The first two run and wait for Redis; one of them is lent the one place, so a third is
    // delivered and runs; the other waits in line.
    until("three jobs delivered", || async {
        ready_count(&direct, &q).await == 7
    })
    .await;
    until("three jobs run", || async {
        runs.load(Ordering::SeqCst) == 3
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        ready_count(&direct, &q).await,
        7,
        "no more than prefetch + the finishing limit held"
    );
    assert_eq!(runs.load(Ordering::SeqCst), 3);
    gate.release();
    for r in &results {
        r.get(WAIT).await.unwrap();
    }
    assert_eq!(runs.load(Ordering::SeqCst), 10, "each job ran once");
    farm.stop().await;
}

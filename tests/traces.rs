//! OpenTelemetry traces across processes: a Python producer instrumented with
//! opentelemetry-instrumentation-celery, mediafarm workers, and a real OTLP/HTTP receiver
//! (tests/py/otlp_receiver.py, decoding with opentelemetry-proto) that both export to. The
//! worker's span must be the child of the producer's publish span, and what a job publishes
//! (a chain's next step, a `send_task`) or requests (outbound HTTP) must carry the job's span.
//!
//! The exporter is process-wide, so every test here shares one receiver and one exporter.

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use mediafarm::net::outbound::{OutboundPolicy, SettingNames};
use mediafarm::observe::trace::{self, ExportConfig};
use mediafarm::{Client, Registry, Task, TaskContext, TaskError, Worker};
use mediafarm_tests::http_fake::HttpFake;
use mediafarm_tests::process::{wait_port, Proc};
use mediafarm_tests::{
    delete_queue, free_port, kwargs, python, python_env, run_python, settings, temp_dir, to,
    unique_queue, workspace_root, Echo,
};
use serde_json::{json, Map, Value};

const SERVICE: &str = "mediafarm-trace-test";
const WAIT: Duration = Duration::from_secs(40);

struct Receiver {
    port: u16,
    spans: PathBuf,
    _proc: Proc,
}

impl Receiver {
    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}/v1/traces", self.port)
    }
}

/// Starts the receiver and installs this process's exporter, once.
fn receiver() -> &'static Receiver {
    static R: OnceLock<Receiver> = OnceLock::new();
    R.get_or_init(|| {
        let port = free_port();
        let spans = temp_dir("otlp").join("spans.json");
        let proc = Proc::spawn(
            Command::new(python())
                .arg(workspace_root().join("tests/py/otlp_receiver.py"))
                .arg(port.to_string())
                .arg(&spans),
        );
        wait_port(port);
        let r = Receiver {
            port,
            spans,
            _proc: proc,
        };
        let installed = trace::install(ExportConfig {
            endpoint: r.endpoint(),
            service_name: SERVICE.into(),
            headers: Vec::new(),
            schedule_delay: Duration::from_millis(100),
        });
        assert!(
            installed,
            "nothing else installs an exporter in this test binary"
        );
        r
    })
}

/// The spans received so far, once `ready` holds for them (bounded by [`WAIT`]).
async fn spans_when(r: &Receiver, ready: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let waited = tokio::time::timeout(WAIT, async {
        loop {
            if let Ok(text) = std::fs::read_to_string(&r.spans) {
                let spans: Vec<Value> =
                    serde_json::from_str(&text).expect("the receiver writes JSON");
                if ready(&spans) {
                    return spans;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    waited.unwrap_or_else(|_| {
        let seen = std::fs::read_to_string(&r.spans).unwrap_or_default();
        panic!("the expected spans did not arrive within {WAIT:?}; received: {seen}")
    })
}

/// The span named `name` for message `id`, if received.
fn span<'a>(spans: &'a [Value], name: &str, id: &str) -> Option<&'a Value> {
    spans
        .iter()
        .find(|s| s["name"] == name && s["attributes"]["messaging.message.id"] == id)
}

fn assert_child(child: &Value, parent: &Value) {
    assert_eq!(
        child["trace_id"], parent["trace_id"],
        "same trace: {child} / {parent}"
    );
    assert_eq!(
        child["parent_span_id"], parent["span_id"],
        "{child} is a child of {parent}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_producers_trace_continues_in_the_rust_worker_and_its_chain() {
    let r = receiver();
    let s = settings();
    let q = unique_queue("otel-py");
    let worker = Worker::new(s.clone(), Registry::new().register(Echo), vec![q.clone()])
        .hostname("otel@%h")
        .start()
        .await
        .expect("worker starts");
    let mut env = python_env(&s);
    env.push(("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", r.endpoint()));
    env.push(("OTEL_BSP_SCHEDULE_DELAY", "100".into()));
    let q2 = q.clone();
    let out = tokio::time::timeout(
        WAIT * 2,
        tokio::task::spawn_blocking(move || run_python("traced_producer.py", &[&q2], &env)),
    )
    .await
    .expect("the producer ends")
    .unwrap();
    let out: Value = serde_json::from_str(out.trim()).expect("the producer prints JSON");
    assert_eq!(out["results"]["single"], json!({"x": 1}), "{out}");
    assert_eq!(out["results"]["chain"], json!({"b": 2}), "{out}");
    assert_eq!(out["results"]["failing"], "EchoFailure", "{out}");
    let id = |v: &Value| v.as_str().expect("an id").to_owned();
    let (single, failing) = (id(&out["single"]), id(&out["failing"]));
    let (step1, step2) = (id(&out["chain"][0]), id(&out["chain"][1]));

    let spans = spans_when(r, |spans| {
        [&single, &step1, &failing]
            .iter()
            .all(|id| span(spans, "apply_async/echo.echo", id).is_some())
            && [&single, &step1, &step2, &failing]
                .iter()
                .all(|id| span(spans, "run/echo.echo", id).is_some())
    })
    .await;
    let get = |name: &str, id: &str| span(&spans, name, id).expect("waited for").clone();

    // A job Python sent: the Rust worker's span is the child of Python's publish span, and
    // carries the instrumentation's names.
    let (published, ran) = (
        get("apply_async/echo.echo", &single),
        get("run/echo.echo", &single),
    );
    assert_eq!(published["service"], "python-producer");
    assert_eq!(published["kind"], 4, "PRODUCER");
    assert_child(&ran, &published);
    assert_eq!(ran["service"], SERVICE);
    assert_eq!(ran["scope"], "mediafarm");
    assert_eq!(ran["kind"], 5, "CONSUMER");
    let attrs = &ran["attributes"];
    assert_eq!(attrs["celery.action"], "run");
    assert_eq!(attrs["celery.task_name"], "echo.echo");
    assert_eq!(attrs["celery.state"], "SUCCESS");
    assert_eq!(attrs["celery.queue"], q.as_str());
    assert!(
        attrs["celery.hostname"]
            .as_str()
            .unwrap()
            .starts_with("otel@"),
        "{attrs}"
    );
    assert_eq!(ran["status_code"], 0, "UNSET: {ran}");
    assert!(ran["start"].as_u64() <= ran["end"].as_u64());

    // A chain: its first step as above; the second, published by the Rust worker when the
    // first ended, is the first's child in the same trace.
    let first = get("run/echo.echo", &step1);
    assert_child(&first, &get("apply_async/echo.echo", &step1));
    assert_child(&get("run/echo.echo", &step2), &first);

    // A failure: ERROR status with the task's message, as the Python worker's span has it.
    let failed = get("run/echo.echo", &failing);
    assert_child(&failed, &get("apply_async/echo.echo", &failing));
    assert_eq!(failed["attributes"]["celery.state"], "FAILURE");
    assert_eq!(failed["status_code"], 2, "ERROR: {failed}");
    assert!(
        failed["status_message"]
            .as_str()
            .unwrap()
            .contains("source image is 61 MP"),
        "{failed}"
    );
    assert_eq!(failed["events"], json!(["exception"]));

    worker.shutdown().await;
    delete_queue(&s, &q).await;
    delete_queue(&s, &format!("{q}.dead")).await;
}

/// Inside a job: a request through the outbound policy (as web sources and webhooks make
/// them) and a `send_task` through the producer client.
struct Fanout {
    client: Client,
    url: String,
}

impl Task for Fanout {
    const NAME: &'static str = "otel.fanout";
    type Args = Map<String, Value>;
    type Output = Value;

    async fn run(&self, ctx: TaskContext, _: Self::Args) -> Result<Value, TaskError> {
        let mut policy = OutboundPolicy::new(SettingNames {
            allow_http: "allow_http",
            allowed_hosts: "allowed_hosts",
            allow_private: "allow_private",
        });
        policy.allow_http = true;
        policy.allow_private = true;
        policy.allowed_hosts = vec!["127.0.0.1".into()];
        policy.timeout = Some(Duration::from_secs(10));
        let url = self.url.parse().expect("a URL");
        let fail = |e: String| TaskError::permanent("FanoutFailed", e);
        policy
            .send(&url, |c, u| c.get(u))
            .await
            .map_err(|e| fail(e.to_string()))?;
        let sent = self
            .client
            .send_task(
                "echo.echo",
                kwargs(json!({"from": "fanout"})),
                &to(&ctx.queue),
            )
            .await
            .map_err(|e| fail(e.to_string()))?;
        Ok(json!({"sent": sent.id}))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_passes_its_span_to_send_task_and_outbound_http() {
    let r = receiver();
    let s = settings();
    let q = unique_queue("otel-rust");
    let http = HttpFake::start(|_| (200, Vec::new(), "ok".into())).await;
    let fanout = Fanout {
        client: Client::connect(&s).await.expect("client connects"),
        url: http.url("/source.jpg"),
    };
    let registry = Registry::new().register(Echo).register(fanout);
    let worker = Worker::new(s.clone(), registry, vec![q.clone()])
        .hostname("otel-rust@%h")
        .start()
        .await
        .expect("worker starts");
    // Sent from outside any job: no trace to join, so the job's span starts one.
    let client = Client::connect(&s).await.expect("client connects");
    let job = client
        .send_task("otel.fanout", Map::new(), &to(&q))
        .await
        .expect("sent");
    let result = job.get(WAIT).await.expect("the job succeeds");
    let sent = result["sent"].as_str().expect("the id it sent").to_owned();

    let spans = spans_when(r, |spans| {
        span(spans, "run/otel.fanout", &job.id).is_some()
            && span(spans, "run/echo.echo", &sent).is_some()
    })
    .await;
    let parent = span(&spans, "run/otel.fanout", &job.id).unwrap();
    assert_eq!(parent["parent_span_id"], "", "a new trace: {parent}");
    assert_child(span(&spans, "run/echo.echo", &sent).unwrap(), parent);

    let requests = http.requests();
    assert_eq!(requests.len(), 1);
    let expected = format!(
        "00-{}-{}-01",
        parent["trace_id"].as_str().unwrap(),
        parent["span_id"].as_str().unwrap()
    );
    assert_eq!(requests[0].header("traceparent"), Some(expected.as_str()));

    worker.shutdown().await;
    delete_queue(&s, &q).await;
}

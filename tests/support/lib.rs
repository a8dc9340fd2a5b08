//! Helpers shared by the end-to-end tests: settings pointed at the real RabbitMQ and Redis on
//! 127.0.0.1, unique queue names and ids, scratch directories, the Python interpreter that has
//! `celery`, built binaries, an in-process echo task. Each harness lives once, in its module:
//!
//! | module | what it starts or builds |
//! | --- | --- |
//! | [`process`] | child processes killed on drop, SIGTERM, waiting for a port |
//! | [`media`] | FFmpeg test media, HLS/RTMP/RTSP/HTTP servers, a silent TCP server |
//! | [`webhook`] | a receiver checking snapshot-worker's signed frame deliveries |
//! | [`smtp`] | an aiosmtpd sink and Python's MIME parser |
//! | [`http_fake`] | a scripted HTTP server recording requests (SMS providers, webhooks) |
//! | [`certs`] | a test CA, a `localhost` certificate and a client certificate (openssl) |
//! | [`mtls`] | an HTTPS receiver that demands a client certificate of a [`certs`] CA |
//! | [`raw_amqp`] | a raw AMQP publisher for messages lapin cannot send |
//! | [`gate`] | a TCP relay in front of Redis that a test holds and releases (a slow backend) |
//! | [`fixtures`] | the bad-input corpus in `fixtures/` and its table of expected errors |
//! | [`flower`] | Flower from the venv against a farm (either broker), read by API and browser |
//! | [`s3`] | moto's S3-compatible server, and settings with a bucket in it as storage |

pub mod certs;
pub mod fixtures;
pub mod flower;
pub mod gate;
pub mod http_fake;
pub mod media;
pub mod mtls;
pub mod process;
pub mod raw_amqp;
pub mod s3;
pub mod smtp;
pub mod webhook;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use mediafarm::{Client, Registry, Settings, Task, TaskContext, TaskError, Worker, WorkerHandle};
use serde_json::{Map, Value};

/// How long one test binary may run before [`arm_watchdog`] ends it. The slowest binary takes
/// a few minutes; a hang would otherwise hold CI until its own limit, with no word of which
/// test hung (libtest only says a test "has been running for over 60 seconds").
const BINARY_LIMIT: Duration = Duration::from_secs(15 * 60);

/// Starts, once per test binary, a thread that aborts the process with a message if the binary
/// outlives [`BINARY_LIMIT`] (`MEDIAFARM_TEST_BINARY_LIMIT` seconds overrides it). Called by the
/// helpers nearly every test uses, so a hung test fails the run instead of stalling it.
pub fn arm_watchdog() {
    static ARMED: OnceLock<()> = OnceLock::new();
    ARMED.get_or_init(|| {
        let limit = std::env::var("MEDIAFARM_TEST_BINARY_LIMIT")
            .ok()
            .and_then(|v| v.parse().ok())
            .map(Duration::from_secs)
            .unwrap_or(BINARY_LIMIT);
        let spawned = std::thread::Builder::new()
            .name("test-watchdog".into())
            .spawn(move || {
                std::thread::sleep(limit);
                eprintln!(
                    "\n[test watchdog] this test binary has run for {} s, past its limit: a test \
                     hangs (see the tests libtest reports as running for over 60 seconds); \
                     aborting so the run fails instead of stalling",
                    limit.as_secs()
                );
                std::process::abort();
            });
        if let Err(e) = spawned {
            eprintln!("[test watchdog] could not start: {e}");
        }
    });
}

/// Sends the worker's own logs to the test's output when `MEDIAFARM_TEST_LOG` holds a filter
/// (`warn`, `mediafarm=debug`, ...): without it a test shows nothing of what a worker under it
/// logged, which is what a hang or a lost message needs. Off by default; set once per binary.
pub fn init_test_log() {
    static SET: OnceLock<()> = OnceLock::new();
    SET.get_or_init(|| {
        let Ok(filter) = std::env::var("MEDIAFARM_TEST_LOG") else {
            return;
        };
        let filter = tracing_subscriber::EnvFilter::try_new(&filter).unwrap_or_else(|e| {
            panic!("MEDIAFARM_TEST_LOG={filter:?} is not a tracing filter: {e}")
        });
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .try_init();
    });
}

/// Settings for tests: the machine's RabbitMQ and Redis (or `MEDIAFARM_*` overrides), any free
/// metrics port, short grace period.
pub fn settings() -> Settings {
    arm_watchdog();
    init_test_log();
    let mut s = Settings::load(Path::new("/nonexistent/mediafarm.toml"), false)
        .expect("MEDIAFARM_* variables in the test environment are valid");
    s.metrics_addr = "127.0.0.1:0".parse().expect("static address");
    s.worker_shutdown_grace = Duration::from_secs(10);
    s.worker_concurrency = 4;
    s
}

/// A queue name no other test uses.
pub fn unique_queue(prefix: &str) -> String {
    arm_watchdog();
    format!(
        "t-{prefix}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..10]
    )
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ sits in the workspace")
        .to_owned()
}

/// A new empty directory under the system temp dir, named after `label` (tests remove it).
pub fn temp_dir(label: &str) -> PathBuf {
    arm_watchdog();
    let dir = std::env::temp_dir().join(format!("mf-{label}-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).expect("the temp dir is writable");
    dir
}

/// A job id no other test uses, starting with `label` (found quickly in logs).
pub fn new_id(label: &str) -> String {
    arm_watchdog();
    format!("{label}-{}", uuid::Uuid::new_v4())
}

/// The Python that has `celery`: `MEDIAFARM_TEST_PYTHON`, else the project's `.venv`, else
/// `python3`. Panics with the fix when celery is missing, so interop tests never pass vacuously.
pub fn python() -> PathBuf {
    static PY: OnceLock<PathBuf> = OnceLock::new();
    PY.get_or_init(|| {
        let candidate = std::env::var_os("MEDIAFARM_TEST_PYTHON")
            .map(PathBuf::from)
            .or_else(|| {
                let venv = workspace_root().join(".venv/bin/python");
                venv.exists().then_some(venv)
            })
            .unwrap_or_else(|| PathBuf::from("python3"));
        let ok = Command::new(&candidate)
            .args(["-c", "import celery, redis"])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(
            ok,
            "{} cannot import celery and redis: run scripts/setup.sh (it creates .venv with them)",
            candidate.display()
        );
        candidate
    })
    .clone()
}

/// Runs `cargo build -q <args>` in the workspace, without the variables `cargo test` gives this
/// process (such as CARGO_MANIFEST_DIR) that a plain `cargo build` does not have: build scripts
/// watching them (ring's) would rebuild. `CARGO_BUILD_JOBS` is kept, so a machine that limits
/// the test run's build jobs limits this build's too.
fn cargo_build(args: &[&str]) {
    const KEPT: [&str; 3] = ["CARGO_HOME", "CARGO_TARGET_DIR", "CARGO_BUILD_JOBS"];
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    for (var, _) in std::env::vars_os() {
        let var = var.to_string_lossy().into_owned();
        if var.starts_with("CARGO_") && !KEPT.contains(&var.as_str()) {
            cmd.env_remove(var);
        }
    }
    let status = cmd
        .current_dir(workspace_root())
        .arg("build")
        .arg("-q")
        .args(args)
        .status()
        .expect("cargo runs");
    assert!(status.success(), "cargo build {} failed", args.join(" "));
}

/// The debug build directory (`CARGO_TARGET_DIR` honoured).
fn debug_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
        .join("debug")
}

/// Path to a built binary (`mediafarm`) or example (`echo-worker`), building it if needed.
pub fn binary(name: &str) -> PathBuf {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        cargo_build(&[
            "-p",
            "mediafarm",
            "--bin",
            "mediafarm",
            "--example",
            "echo-worker",
        ])
    });
    let debug = debug_dir();
    let path = if name == "mediafarm" {
        debug.join(name)
    } else {
        debug.join("examples").join(name)
    };
    assert!(path.exists(), "{} was not built", path.display());
    path
}

/// Path to a worker binary whose package and binary share a name (`notify-worker`), built
/// (once per test process) if needed.
pub fn worker_binary(package: &'static str) -> PathBuf {
    static BUILT: std::sync::Mutex<Vec<&'static str>> = std::sync::Mutex::new(Vec::new());
    {
        let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
        if !built.contains(&package) {
            cargo_build(&["-p", package, "--bin", package]);
            built.push(package);
        }
    }
    let path = debug_dir().join(package);
    assert!(path.exists(), "{} was not built", path.display());
    path
}

/// Path to binary `bin` of workspace package `package` (`snapshot-hooks` of `snapshot-worker`),
/// built (once per test process) if needed.
pub fn package_binary(package: &'static str, bin: &'static str) -> PathBuf {
    static BUILT: std::sync::Mutex<Vec<&'static str>> = std::sync::Mutex::new(Vec::new());
    {
        let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
        if !built.contains(&bin) {
            cargo_build(&["-p", package, "--bin", bin]);
            built.push(bin);
        }
    }
    let path = debug_dir().join(bin);
    assert!(path.exists(), "{} was not built", path.display());
    path
}

/// Deletes a queue and its exchange when a test is done with them.
pub async fn delete_queue(settings: &Settings, queue: &str) {
    if let Ok(conn) = mediafarm::amqp::broker::connect(settings, "test cleanup").await {
        if let Ok(ch) = conn.create_channel().await {
            let _ = ch
                .queue_delete(queue.into(), lapin::options::QueueDeleteOptions::default())
                .await;
            let _ = ch
                .exchange_delete(
                    queue.into(),
                    lapin::options::ExchangeDeleteOptions::default(),
                )
                .await;
            mediafarm::amqp::broker::close_quietly(&conn, &[&ch], "done").await;
        } else {
            mediafarm::amqp::broker::close_quietly(&conn, &[], "done").await;
        }
    }
}

/// Messages ready in `queue` (declaring it as kombu would if it does not exist).
pub async fn ready_count(settings: &Settings, queue: &str) -> u32 {
    let conn = mediafarm::amqp::broker::connect(settings, "test count")
        .await
        .expect("broker up");
    let ch = conn.create_channel().await.expect("channel");
    let shape = mediafarm::amqp::broker::QueueShape::of(settings);
    mediafarm::amqp::broker::declare_queue(&ch, queue, &shape)
        .await
        .expect("declare");
    let q = ch
        .queue_declare(
            queue.into(),
            lapin::options::QueueDeclareOptions {
                durable: true,
                passive: true,
                ..Default::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await
        .expect("passive declare");
    mediafarm::amqp::broker::close_quietly(&conn, &[&ch], "done").await;
    q.message_count()
}

/// `echo.echo`: returns its kwargs. On request it misbehaves: `sleep_ms` waits first (with
/// `until_soft: true` it returns early at the soft time limit), `spin_ms` burns CPU on the
/// blocking pool (with `cooperative: true` it stops at the job's stop signal), `fail` fails
/// permanently, `fail_times: n` fails transiently while `retries < n` (`retry_after_s` asks
/// for that delay), `require_key` fails permanently unless that Redis key exists, and `panic`
/// panics.
pub struct Echo;

impl Task for Echo {
    const NAME: &'static str = "echo.echo";
    type Args = Map<String, Value>;
    type Output = Map<String, Value>;

    async fn run(&self, ctx: TaskContext, kwargs: Self::Args) -> Result<Self::Output, TaskError> {
        let flag = |k: &str| kwargs.get(k).and_then(Value::as_bool).unwrap_or(false);
        if let Some(ms) = kwargs.get("sleep_ms").and_then(Value::as_u64) {
            let sleep = tokio::time::sleep(Duration::from_millis(ms));
            if flag("until_soft") {
                tokio::select! {
                    _ = sleep => {},
                    _ = ctx.soft_time_limit_reached() => {
                        let mut out = kwargs.clone();
                        out.insert("stopped_at_soft_limit".into(), Value::Bool(true));
                        return Ok(out);
                    }
                }
            } else {
                sleep.await;
            }
        }
        if let Some(ms) = kwargs.get("block_ms").and_then(Value::as_u64) {
            // A task that wrongly blocks its async thread: no timer can stop it meanwhile.
            std::thread::sleep(Duration::from_millis(ms));
        }
        if let Some(ms) = kwargs.get("spin_ms").and_then(Value::as_u64) {
            let stop = flag("cooperative").then(|| ctx.cancel_flag());
            let finished = ctx
                .cpu(move || {
                    let Some(end) =
                        std::time::Instant::now().checked_add(Duration::from_millis(ms))
                    else {
                        return false;
                    };
                    while std::time::Instant::now() < end {
                        if stop.as_ref().is_some_and(|s| s.is_set()) {
                            return false;
                        }
                        std::hint::spin_loop();
                    }
                    true
                })
                .await?;
            if !finished {
                return Err(TaskError::permanent(
                    "SoftTimeLimitExceeded",
                    "stopped spinning when told to",
                ));
            }
        }
        if let Some(times) = kwargs.get("fail_times").and_then(Value::as_u64) {
            if u64::from(ctx.retries) < times {
                let mut e =
                    TaskError::transient("EchoTransient", format!("attempt {}", ctx.retries + 1));
                if let Some(secs) = kwargs.get("retry_after_s").and_then(Value::as_f64) {
                    if let Ok(d) = Duration::try_from_secs_f64(secs.max(0.0)) {
                        e = e.retry_after(d);
                    }
                }
                return Err(e);
            }
        }
        if let Some(key) = kwargs.get("require_key").and_then(Value::as_str) {
            let mut conn = ctx.backend().connection();
            let exists: bool = redis::cmd("EXISTS")
                .arg(key)
                .query_async(&mut conn)
                .await
                .map_err(|e| TaskError::transient("BackendError", e.to_string()))?;
            if !exists {
                return Err(TaskError::permanent(
                    "MissingKey",
                    format!("Redis key {key} does not exist"),
                ));
            }
        }
        if let Some(msg) = kwargs.get("fail").and_then(Value::as_str) {
            return Err(TaskError::permanent("EchoFailure", msg.to_owned()));
        }
        if kwargs.get("panic").is_some() {
            panic!("echo was asked to panic");
        }
        Ok(kwargs)
    }
}

pub fn echo_registry() -> Registry {
    Registry::new().register(Echo)
}

/// `test.counted`: counts its runs in `runs` and returns `null` at once.
pub struct Counted(pub std::sync::Arc<std::sync::atomic::AtomicUsize>);

impl Task for Counted {
    const NAME: &'static str = "test.counted";
    type Args = Map<String, Value>;
    type Output = ();

    async fn run(&self, _: TaskContext, _: Self::Args) -> Result<(), TaskError> {
        self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }
}

/// Runs a Python script from tests/py with arguments; returns stdout, panicking with stderr
/// when it fails.
pub fn run_python(script: &str, args: &[&str], env: &[(&str, String)]) -> String {
    let out = Command::new(python())
        .arg(workspace_root().join("tests/py").join(script))
        .args(args)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdin(Stdio::null())
        .output()
        .expect("python runs");
    assert!(
        out.status.success(),
        "{script} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The URLs the Python side should use: the same as the Rust side's settings, and the Redis
/// transport's `global_keyprefix` and `master_name` when set (tests/py/celery_app.py and producer.py read
/// `BROKER_TRANSPORT_OPTIONS`).
pub fn python_env(settings: &Settings) -> Vec<(&'static str, String)> {
    let mut env = vec![
        ("BROKER_URL", settings.broker_url.clone()),
        ("RESULT_BACKEND", settings.result_backend.clone()),
    ];
    let o = &settings.broker_transport_options;
    let mut options = Map::new();
    if !o.global_keyprefix.is_empty() {
        options.insert("global_keyprefix".into(), o.global_keyprefix.clone().into());
    }
    if let Some(name) = &o.master_name {
        options.insert("master_name".into(), name.clone().into());
    }
    if !options.is_empty() {
        env.push((
            "BROKER_TRANSPORT_OPTIONS",
            Value::Object(options).to_string(),
        ));
    }
    if !settings
        .result_backend_transport_options
        .result_chord_ordered
    {
        env.push((
            "RESULT_BACKEND_TRANSPORT_OPTIONS",
            serde_json::json!({"result_chord_ordered": false}).to_string(),
        ));
    }
    env
}

/// Runs `python -m celery -A celery_app ARGS` from tests/py against `s`'s broker (AMQP or
/// Redis), bounded in time; returns (exit code, stdout, stderr).
pub async fn celery_cli(s: &Settings, args: &[&str]) -> (i32, String, String) {
    let env = python_env(s);
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    let run = tokio::task::spawn_blocking(move || {
        std::process::Command::new(python())
            .current_dir(workspace_root().join("tests/py"))
            .args(["-m", "celery", "-A", "celery_app"])
            .args(&args)
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdin(std::process::Stdio::null())
            .output()
            .expect("the celery command runs")
    });
    let out = tokio::time::timeout(std::time::Duration::from_secs(120), run)
        .await
        .expect("the celery command ends within 2 minutes")
        .expect("ran");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `celery inspect|control ARGS --json` for one node (AMQP or Redis broker): that node's reply.
pub async fn celery_reply(s: &Settings, node: &str, args: &[&str]) -> Value {
    let mut all: Vec<&str> = args.to_vec();
    all.extend(["--destination", node, "--timeout", "10", "--json"]);
    let (code, stdout, stderr) = celery_cli(s, &all).await;
    assert_eq!(code, 0, "celery {args:?} failed: {stdout}\n{stderr}");
    let replies: Value = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("celery {args:?} printed {stdout:?}: {e}"));
    // inspect prints one object by node; control a list of one-node objects.
    let found = match &replies {
        Value::Array(items) => items.iter().find_map(|r| r.get(node)),
        other => other.get(node),
    };
    found
        .cloned()
        .unwrap_or_else(|| panic!("no reply from {node} to {args:?}: {replies}"))
}

/// Runs `producer.py <queue> <scenario>` (the Python celery client) against an echo worker
/// named `hostname` on a fresh queue `<prefix>-<scenario>-…` of `settings`; returns what the
/// script printed, as JSON, and the queue, which the caller cleans up as its broker needs.
pub async fn python_producer_against_echo(
    settings: &Settings,
    prefix: &str,
    hostname: &str,
    scenario: &str,
) -> (Value, String) {
    let q = unique_queue(&format!("{prefix}-{scenario}"));
    let worker = Worker::new(settings.clone(), echo_registry(), vec![q.clone()])
        .hostname(hostname)
        .start()
        .await
        .expect("worker starts");
    let env = python_env(settings);
    let (q2, scenario2) = (q.clone(), scenario.to_owned());
    let out =
        tokio::task::spawn_blocking(move || run_python("producer.py", &[&q2, &scenario2], &env))
            .await
            .expect("python ran");
    worker.shutdown().await;
    let printed = serde_json::from_str(out.trim())
        .unwrap_or_else(|e| panic!("producer.py printed {out:?}: {e}"));
    (printed, q)
}

/// The fixture most tests start from: a worker consuming a fresh queue, and a client.
pub struct Farm {
    pub settings: Settings,
    pub queue: String,
    pub client: Client,
    pub worker: WorkerHandle,
}

impl Farm {
    /// Starts a worker named `test@<queue>` on a new queue named after `prefix`.
    pub async fn start(prefix: &str, settings: Settings, registry: Registry) -> Farm {
        Farm::start_on(unique_queue(prefix), settings, registry).await
    }

    pub async fn start_on(queue: String, settings: Settings, registry: Registry) -> Farm {
        let worker = Worker::new(settings.clone(), registry, vec![queue.clone()])
            .hostname(format!("test@{queue}"))
            .start()
            .await
            .expect("worker starts");
        let client = Client::connect(&settings).await.expect("client connects");
        Farm {
            settings,
            queue,
            client,
            worker,
        }
    }

    /// Stops the worker as on SIGTERM and deletes the queue and its dead-letter queue. Each
    /// step is bounded and a stuck one panics naming itself and the queue: a stop that hung
    /// once left a test waiting with no word of which step it was in.
    pub async fn stop(self) {
        let queue = self.queue.clone();
        let dead = mediafarm::amqp::reroute::dead_queue(&queue);
        // The worker's own bounds (grace, 5 s per close step, 2 s for worker-offline) add up
        // to well under this.
        within(&queue, "stopping the worker", 90, self.worker.shutdown()).await;
        within(
            &queue,
            "deleting the queue",
            30,
            delete_queue(&self.settings, &queue),
        )
        .await;
        within(
            &queue,
            "deleting the dead-letter queue",
            30,
            delete_queue(&self.settings, &dead),
        )
        .await;
    }
}

/// Awaits `step` of `queue`'s farm for at most `seconds`, and panics naming both if it is
/// still pending then.
async fn within(
    queue: &str,
    what: &str,
    seconds: u64,
    step: impl std::future::Future<Output = ()>,
) {
    if tokio::time::timeout(Duration::from_secs(seconds), step)
        .await
        .is_err()
    {
        panic!("{queue}: {what} did not end within {seconds} s");
    }
}

/// Publishes a hand-made message straight to `queue` (declared as kombu does), confirmed.
pub async fn publish_raw(s: &Settings, queue: &str, props: lapin::BasicProperties, body: &[u8]) {
    let conn = mediafarm::amqp::broker::connect(s, "test raw")
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(Default::default()).await.unwrap();
    let shape = mediafarm::amqp::broker::QueueShape::of(s);
    mediafarm::amqp::broker::declare_queue(&ch, queue, &shape)
        .await
        .unwrap();
    let confirm = ch
        .basic_publish(
            "".into(),
            queue.into(),
            lapin::options::BasicPublishOptions::default(),
            body,
            props,
        )
        .await
        .unwrap();
    assert!(confirm.await.unwrap().is_ack());
    mediafarm::amqp::broker::close_quietly(&conn, &[&ch], "done").await;
}

/// The properties and headers Celery would send for job `id` of `task`.
pub fn celery_props(id: &str, task: &str) -> lapin::BasicProperties {
    let (props, mut headers, _) =
        mediafarm::client::build_message(task, Map::new(), &mediafarm::SendOptions::default())
            .encode();
    headers.insert("id".into(), Value::String(id.to_owned()));
    mediafarm::amqp::table::write_properties(&props, &headers).with_correlation_id(id.into())
}

/// A JSON object literal as kwargs.
pub fn kwargs(v: Value) -> Map<String, Value> {
    v.as_object().cloned().expect("an object")
}

/// Send options for `queue`.
pub fn to(queue: &str) -> mediafarm::SendOptions {
    mediafarm::SendOptions {
        queue: Some(queue.to_owned()),
        ..Default::default()
    }
}

/// The error of a job that was expected to fail.
pub fn failed(outcome: Result<Value, mediafarm::ClientError>) -> TaskError {
    match outcome {
        Err(mediafarm::ClientError::Failed { error, .. }) => error,
        other => panic!("expected a failed job, got {other:?}"),
    }
}

/// Waits until `<queue>.dead` holds `n` letters (up to 30 s); returns them. On a mismatch the
/// panic shows each letter's kind and the start of its reason.
pub async fn dead_letters(
    s: &Settings,
    queue: &str,
    n: usize,
) -> Vec<mediafarm::amqp::dead_letters::DeadLetter> {
    let end = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let letters = mediafarm::amqp::dead_letters::list(s, queue, n + 100)
            .await
            .expect("dead list");
        if letters.len() >= n || std::time::Instant::now() > end {
            let shown: Vec<String> = letters
                .iter()
                .map(|l| {
                    let reason = l.reason.as_deref().unwrap_or("");
                    let cut: String = reason.chars().take(120).collect();
                    format!("{:?}: {cut}", l.kind)
                })
                .collect();
            assert_eq!(letters.len(), n, "dead letters of {queue}: {shown:#?}");
            return letters;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A free TCP port on the loopback interface (free when this returns).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// After a bad message: the farm's worker still answers a good job.
pub async fn still_consuming(farm: &Farm) {
    let r = farm
        .client
        .send_task(
            "echo.echo",
            kwargs(serde_json::json!({"after": 1})),
            &to(&farm.queue),
        )
        .await
        .expect("a good job is published");
    assert_eq!(
        r.get(Duration::from_secs(30))
            .await
            .expect("a good job succeeds"),
        serde_json::json!({"after": 1})
    );
}

/// A Python Celery worker (`-P solo`, tests/py/celery_app.py) consuming `queue`; killed on drop.
pub struct PythonWorker(std::process::Child);

impl PythonWorker {
    pub fn start(queue: &str) -> PythonWorker {
        PythonWorker::start_with(queue, &settings())
    }

    /// A Python worker whose Celery app is configured as `settings` (`python_env`).
    pub fn start_with(queue: &str, settings: &Settings) -> PythonWorker {
        let child = std::process::Command::new(python())
            .current_dir(workspace_root().join("tests/py"))
            .args(["-m", "celery", "-A", "celery_app", "worker", "-P", "solo"])
            .args([
                "-Q",
                queue,
                "-l",
                "warning",
                "-n",
                &format!("py-{queue}@%h"),
            ])
            .args([
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
            ])
            .envs(python_env(settings))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("python celery worker starts");
        PythonWorker(child)
    }
}

impl Drop for PythonWorker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

//! Faults injected into a running farm of `echo-worker` processes: `kill -9` of a worker
//! mid-batch, a RabbitMQ restart (`rabbitmqctl stop_app` / `start_app`) and a Redis restart (a
//! private `redis-server` with an fsync'd AOF) under load, and a retry countdown that must
//! outlive the worker that scheduled it. Every job must end SUCCESS with its own result, and
//! (where Redis stays up) exactly once: every stored result is also PUBLISHed, so a
//! PSUBSCRIBE on `celery-task-meta-*` counts SUCCESS writes per job.
//!
//! Figures are printed on lines starting with `FIGURE ` for scripts to collect. The tests run
//! one at a time (a lock in this binary) because one of them stops the machine's RabbitMQ,
//! which also disturbs anything else using it while it runs.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use mediafarm::client::{build_message, SendOptions};
use mediafarm::{Client, Settings, TaskState};
use mediafarm_tests::process::sigterm;
use mediafarm_tests::{binary, delete_queue, free_port, ready_count, settings, unique_queue};
use serde_json::{json, Map, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const RESULT_PREFIX: &str = "celery-task-meta-";

/// Serialises the tests of this binary: one of them takes RabbitMQ away.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A scratch directory for logs and data, removed when the test passes and kept (its path
/// printed) when it fails.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        Scratch(mediafarm_tests::temp_dir(&format!("faults-{name}")))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("scratch directory kept: {}", self.0.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// Deletes a test's queue (and its exchange) when dropped, also when the test fails.
struct QueueCleanup {
    settings: Settings,
    queue: String,
}

impl Drop for QueueCleanup {
    fn drop(&mut self) {
        let (settings, queue) = (self.settings.clone(), self.queue.clone());
        // Its own thread and runtime: this may run while the test's runtime is unwinding.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let _ =
                    tokio::time::timeout(Duration::from_secs(10), delete_queue(&settings, &queue))
                        .await;
            });
        })
        .join();
    }
}

/// Waits for a child to exit; `None` if it is still running after `limit`.
async fn wait_exit(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let end = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        if Instant::now() > end {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// An `echo-worker` process logging to a file; killed when dropped, its log printed if the
/// test is failing.
struct WorkerProc {
    label: String,
    child: Option<Child>,
    log: PathBuf,
}

impl WorkerProc {
    fn spawn(
        scratch: &Scratch,
        label: &str,
        queue: &str,
        concurrency: usize,
        metrics_port: u16,
        env: &[(&str, &str)],
    ) -> WorkerProc {
        let log = scratch.0.join(format!("{label}.log"));
        let stderr = File::create(&log).unwrap();
        let child = Command::new(binary("echo-worker"))
            .args([
                "--concurrency",
                &concurrency.to_string(),
                "--queues",
                queue,
                "--loglevel",
                "info",
                "--metrics-addr",
                &format!("127.0.0.1:{metrics_port}"),
            ])
            .env("MEDIAFARM_WORKER_SHUTDOWN_GRACE", "15")
            .env("MEDIAFARM_TASK_DEFAULT_RETRY_DELAY", "1")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(stderr))
            .spawn()
            .unwrap();
        WorkerProc {
            label: label.to_owned(),
            child: Some(child),
            log,
        }
    }

    /// `kill -9` and reap.
    fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }

    /// SIGTERM, then waits for a clean exit.
    async fn stop(&mut self) {
        let mut child = self.child.take().expect("worker is running");
        sigterm(child.id());
        let status = wait_exit(&mut child, Duration::from_secs(30)).await;
        if status.is_none() {
            let _ = child.kill();
            let _ = child.wait();
        }
        assert!(
            status.is_some_and(|s| s.success()),
            "{} did not exit cleanly within 30 s of SIGTERM: {status:?}\n{}",
            self.label,
            self.log_text()
        );
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for WorkerProc {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            let log = self.log_text();
            let lines: Vec<&str> = log.lines().collect();
            let tail = lines[lines.len().saturating_sub(150)..].join("\n");
            eprintln!("---- {} stderr (last 150 lines) ----\n{tail}", self.label);
        }
    }
}

/// GET /readyz on the worker's metrics port: the HTTP status, or `None` if nothing answers.
async fn readyz(port: u16) -> Option<u16> {
    let get = async {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .ok()?;
        stream
            .write_all(b"GET /readyz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            .await
            .ok()?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await.ok()?;
        let text = String::from_utf8_lossy(&response);
        text.split_whitespace().nth(1)?.parse().ok()
    };
    tokio::time::timeout(Duration::from_secs(2), get)
        .await
        .ok()
        .flatten()
}

/// Polls /readyz until it answers `want`; how long that took, or `None` within `limit`.
async fn wait_readyz(port: u16, want: u16, limit: Duration) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if readyz(port).await == Some(want) {
            return Some(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}

/// Job lengths for the restart tests, 60 to 180 ms: at 16 at once a batch then outlasts, by
/// several seconds, the time `rabbitmqctl stop_app` takes to close connections on a loaded
/// machine (with 5 to 20 ms jobs every job finished before the broker went away, and with
/// 20 to 80 ms jobs now and then too, once a finished job's slot was freed before its ack).
fn restart_sleep_ms(i: usize) -> u64 {
    60 + pseudo(i) % 121
}

/// Deterministic pseudo-random numbers (splitmix64 of the index).
fn pseudo(i: usize) -> u64 {
    let mut x = (i as u64)
        .wrapping_add(1)
        .wrapping_mul(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

fn new_ids(n: usize) -> Vec<String> {
    (0..n).map(|_| uuid::Uuid::new_v4().to_string()).collect()
}

/// Publishes `echo.echo` jobs `{"i": i, "sleep_ms": sleep_ms(i)}` with the given ids.
async fn publish_jobs(
    client: &Client,
    queue: &str,
    ids: &[String],
    sleep_ms: impl Fn(usize) -> u64,
) {
    let msgs: Vec<_> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            let opts = SendOptions {
                queue: Some(queue.to_owned()),
                task_id: Some(id.clone()),
                ..Default::default()
            };
            let kwargs = json!({"i": i, "sleep_ms": sleep_ms(i)});
            build_message("echo.echo", kwargs.as_object().cloned().unwrap(), &opts)
        })
        .collect();
    for chunk in msgs.chunks(250) {
        client.publish_batch(queue, chunk).await.unwrap();
    }
}

/// SUCCESS publications seen on `celery-task-meta-*` for a known set of jobs.
#[derive(Default)]
struct Tally {
    /// SUCCESS writes per job id.
    successes: HashMap<String, u32>,
    /// When each job's first SUCCESS was seen, in order.
    first_seen: Vec<Instant>,
}

/// PSUBSCRIBEs to result publications and tallies SUCCESS writes for `ids`.
struct Watcher {
    tally: Arc<Mutex<Tally>>,
    task: tokio::task::JoinHandle<()>,
}

impl Watcher {
    /// Returns once the subscription is in place.
    async fn start(redis_url: &str, ids: &[String]) -> Watcher {
        let ids: HashSet<String> = ids.iter().cloned().collect();
        let client = redis::Client::open(redis_url).unwrap();
        let mut pubsub = client.get_async_pubsub().await.unwrap();
        pubsub
            .psubscribe(format!("{RESULT_PREFIX}*"))
            .await
            .unwrap();
        let tally = Arc::new(Mutex::new(Tally::default()));
        let counts = tally.clone();
        let task = tokio::spawn(async move {
            let mut messages = pubsub.into_on_message();
            while let Some(msg) = messages.next().await {
                let Some(id) = msg.get_channel_name().strip_prefix(RESULT_PREFIX) else {
                    continue;
                };
                if !ids.contains(id) {
                    continue;
                }
                let Ok(payload) = msg.get_payload::<String>() else {
                    continue;
                };
                let meta: Value = serde_json::from_str(&payload).unwrap_or_default();
                if meta["status"] == "SUCCESS" {
                    let mut t = counts.lock().unwrap();
                    let n = t.successes.entry(id.to_owned()).or_insert(0);
                    *n += 1;
                    if *n == 1 {
                        t.first_seen.push(Instant::now());
                    }
                }
            }
        });
        Watcher { tally, task }
    }

    /// Jobs with at least one SUCCESS seen.
    fn done(&self) -> usize {
        self.tally.lock().unwrap().successes.len()
    }

    /// Jobs with more than one SUCCESS seen.
    fn duplicated(&self) -> Vec<(String, u32)> {
        let t = self.tally.lock().unwrap();
        let mut dups: Vec<_> = t
            .successes
            .iter()
            .filter(|(_, n)| **n > 1)
            .map(|(id, n)| (id.clone(), *n))
            .collect();
        dups.sort();
        dups
    }

    /// The first job finishing for the first time after `t`.
    fn first_new_after(&self, t: Instant) -> Option<Instant> {
        let tally = self.tally.lock().unwrap();
        tally.first_seen.iter().copied().find(|seen| *seen > t)
    }

    /// Waits until `n` jobs have succeeded; false at the deadline.
    async fn wait_done(&self, n: usize, limit: Duration) -> bool {
        let end = Instant::now() + limit;
        while Instant::now() < end {
            if self.done() >= n {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        self.done() >= n
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The stored result record of each job (`None`: nothing stored, or Redis unreachable).
async fn stored(redis_url: &str, ids: &[String]) -> Vec<Option<Value>> {
    let read = async {
        let client = redis::Client::open(redis_url).ok()?;
        let mut conn = client.get_multiplexed_async_connection().await.ok()?;
        let keys: Vec<String> = ids
            .iter()
            .map(|id| format!("{RESULT_PREFIX}{id}"))
            .collect();
        let raw: Vec<Option<String>> = redis::cmd("MGET")
            .arg(&keys)
            .query_async(&mut conn)
            .await
            .ok()?;
        Some(
            raw.into_iter()
                .map(|r| r.and_then(|text| serde_json::from_str(&text).ok()))
                .collect(),
        )
    };
    match tokio::time::timeout(Duration::from_secs(5), read).await {
        Ok(Some(records)) => records,
        _ => vec![None; ids.len()],
    }
}

/// Jobs whose stored status is SUCCESS, checking each returned its own kwargs.
fn succeeded(records: &[Option<Value>]) -> usize {
    let mut n = 0;
    for (i, record) in records.iter().enumerate() {
        let Some(meta) = record else { continue };
        if meta["status"] == "SUCCESS" {
            assert_eq!(
                meta["result"]["i"], i,
                "job {i} returned another job's kwargs: {meta}"
            );
            n += 1;
        }
    }
    n
}

/// Polls the stored results until `n` jobs have succeeded; the last count.
async fn wait_stored(redis_url: &str, ids: &[String], n: usize, limit: Duration) -> usize {
    let end = Instant::now() + limit;
    loop {
        let done = succeeded(&stored(redis_url, ids).await);
        if done >= n || Instant::now() > end {
            return done;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Statuses of jobs that did not succeed, for failure messages.
fn not_succeeded(records: &[Option<Value>]) -> Vec<String> {
    records
        .iter()
        .enumerate()
        .filter(|(_, r)| r.as_ref().is_none_or(|m| m["status"] != "SUCCESS"))
        .take(5)
        .map(|(i, r)| match r {
            Some(m) => format!("job {i}: {}", m["status"]),
            None => format!("job {i}: no record"),
        })
        .collect()
}

fn rabbitmqctl(args: &[&str]) -> Result<(), String> {
    let out = Command::new("rabbitmqctl")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("rabbitmqctl {args:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "rabbitmqctl {args:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// The machine's RabbitMQ application, stopped on request and always started again: the
/// broker is shared with everything else on the machine.
struct RabbitApp {
    stopped: bool,
}

impl RabbitApp {
    fn stop(&mut self) {
        self.stopped = true;
        rabbitmqctl(&["stop_app"]).unwrap();
    }

    fn start(&mut self) {
        rabbitmqctl(&["start_app"]).unwrap();
        self.stopped = false;
    }
}

impl Drop for RabbitApp {
    fn drop(&mut self) {
        if self.stopped {
            eprintln!("restarting RabbitMQ left stopped by a failing test");
            if let Err(e) =
                rabbitmqctl(&["start_app"]).and_then(|()| rabbitmqctl(&["await_startup"]))
            {
                eprintln!("RabbitMQ COULD NOT BE RESTARTED: {e}");
            }
        }
    }
}

/// A `redis-server` of the test's own on a free port, with an AOF fsync'd on every write.
struct PrivateRedis {
    port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl PrivateRedis {
    fn new(port: u16, dir: &Path) -> PrivateRedis {
        std::fs::create_dir_all(dir).unwrap();
        PrivateRedis {
            port,
            dir: dir.to_owned(),
            child: None,
        }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Starts the server and waits until it answers PING (its AOF loaded).
    async fn start(&mut self) {
        assert!(self.child.is_none(), "private redis already running");
        let log = append_file(&self.dir.join("redis.log"));
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1", "--daemonize", "no"])
            .args(["--appendonly", "yes", "--appendfsync", "always"])
            .args(["--save", ""])
            .arg("--dir")
            .arg(&self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap();
        self.child = Some(child);
        let end = Instant::now() + Duration::from_secs(15);
        while !self.pong() {
            assert!(
                Instant::now() < end,
                "private redis-server did not answer PING within 15 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn pong(&self) -> bool {
        let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
        let mut buf = [0u8; 16];
        s.write_all(b"PING\r\n").is_ok()
            && s.read(&mut buf)
                .is_ok_and(|n| buf[..n].starts_with(b"+PONG"))
    }

    /// SIGTERM (Redis finishes its AOF and exits), then waits for the exit.
    async fn stop(&mut self) {
        let mut child = self.child.take().expect("private redis is running");
        sigterm(child.id());
        let status = wait_exit(&mut child, Duration::from_secs(15)).await;
        assert!(
            status.is_some(),
            "private redis-server did not exit within 15 s of SIGTERM"
        );
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Opens a file for appending, creating it.
fn append_file(path: &Path) -> File {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::await_holding_lock)] // Each test has its own runtime; the lock only orders tests.
async fn kill_9_mid_batch_loses_and_duplicates_nothing() {
    let _serial = serial();
    const JOBS: usize = 1000;
    let scratch = Scratch::new("kill9");
    let s = settings();
    let q = unique_queue("kill9");
    let _cleanup = QueueCleanup {
        settings: s.clone(),
        queue: q.clone(),
    };
    let ids = new_ids(JOBS);
    let watcher = Watcher::start(&s.result_backend, &ids).await;
    let client = Client::connect(&s).await.unwrap();
    publish_jobs(&client, &q, &ids, |i| pseudo(i) % 41).await;

    let mut a = WorkerProc::spawn(&scratch, "worker-a", &q, 16, free_port(), &[]);
    assert!(
        watcher.wait_done(300, Duration::from_secs(60)).await,
        "worker A finished only {} jobs within 60 s",
        watcher.done()
    );
    a.kill9();
    let done_at_kill = watcher.done();
    assert!(
        done_at_kill < JOBS,
        "worker A finished all {JOBS} jobs before kill -9; nothing was tested"
    );

    let mut b = WorkerProc::spawn(&scratch, "worker-b", &q, 16, free_port(), &[]);
    watcher.wait_done(JOBS, Duration::from_secs(120)).await;
    // Let B finish any redelivered job it is still running (a duplicate in the making), then
    // give the last publications time to arrive.
    b.stop().await;
    tokio::time::sleep(Duration::from_secs(1)).await;

    let records = stored(&s.result_backend, &ids).await;
    let lost = JOBS - succeeded(&records);
    let dups = watcher.duplicated();
    println!(
        "FIGURE kill9 jobs={JOBS} lost={lost} duplicated={} done_at_kill={done_at_kill}",
        dups.len()
    );
    assert_eq!(
        lost,
        0,
        "jobs without SUCCESS: {:?}",
        not_succeeded(&records)
    );
    assert!(
        dups.is_empty(),
        "jobs that succeeded more than once (id, SUCCESS writes): {:?}",
        &dups[..dups.len().min(5)]
    );
    assert_eq!(watcher.done(), JOBS);
    assert_eq!(ready_count(&s, &q).await, 0, "messages left in the queue");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::await_holding_lock)] // Each test has its own runtime; the lock only orders tests.
async fn rabbitmq_restart_mid_batch_recovers() {
    let _serial = serial();
    const JOBS: usize = 1000;
    let scratch = Scratch::new("rabbit");
    let s = settings();
    let q = unique_queue("rabbit-restart");
    let _cleanup = QueueCleanup {
        settings: s.clone(),
        queue: q.clone(),
    };
    // Declared after the queue's cleanup, so dropped (RabbitMQ started again) before it.
    let mut rabbit = RabbitApp { stopped: false };
    let ids = new_ids(JOBS);
    let watcher = Watcher::start(&s.result_backend, &ids).await;
    let client = Client::connect(&s).await.unwrap();
    publish_jobs(&client, &q, &ids, restart_sleep_ms).await;
    // Its connections die with the broker; everything is published already.
    drop(client);

    let port = free_port();
    let mut worker = WorkerProc::spawn(&scratch, "worker", &q, 16, port, &[]);
    assert!(
        watcher.wait_done(300, Duration::from_secs(60)).await,
        "the worker finished only {} jobs within 60 s",
        watcher.done()
    );
    assert_eq!(readyz(port).await, Some(200), "ready before the restart");

    rabbit.stop();
    let done_at_stop = watcher.done();
    let went_unready = wait_readyz(port, 503, Duration::from_secs(15)).await;
    assert!(
        went_unready.is_some(),
        "/readyz did not turn 503 within 15 s of RabbitMQ stopping (now {:?})",
        readyz(port).await
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    rabbit.start();
    let restarted = Instant::now();
    let awaited = tokio::task::spawn_blocking(|| rabbitmqctl(&["await_startup"]));
    let ready_after = wait_readyz(port, 200, Duration::from_secs(60)).await;
    awaited.await.unwrap().unwrap();
    assert!(
        ready_after.is_some(),
        "/readyz did not return to 200 within 60 s of RabbitMQ starting (now {:?})",
        readyz(port).await
    );
    assert!(
        done_at_stop < JOBS,
        "all {JOBS} jobs finished before RabbitMQ stopped; nothing was tested"
    );

    watcher.wait_done(JOBS, Duration::from_secs(120)).await;
    let first_result_after = watcher.first_new_after(restarted).map(|t| t - restarted);
    worker.stop().await;
    tokio::time::sleep(Duration::from_secs(1)).await;

    let records = stored(&s.result_backend, &ids).await;
    let lost = JOBS - succeeded(&records);
    let dups = watcher.duplicated();
    let secs = |d: Option<Duration>| d.map_or("none".into(), |d| format!("{:.2}", d.as_secs_f64()));
    println!(
        "FIGURE rabbit_restart jobs={JOBS} lost={lost} duplicated={} ready_after_s={} \
         first_result_after_s={} done_at_stop={done_at_stop}",
        dups.len(),
        secs(ready_after),
        secs(first_result_after)
    );
    assert_eq!(
        lost,
        0,
        "jobs without SUCCESS: {:?}",
        not_succeeded(&records)
    );
    assert!(
        dups.is_empty(),
        "jobs that succeeded more than once (id, SUCCESS writes): {:?}",
        &dups[..dups.len().min(5)]
    );
    assert_eq!(ready_count(&s, &q).await, 0, "messages left in the queue");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::await_holding_lock)] // Each test has its own runtime; the lock only orders tests.
async fn redis_restart_mid_batch_recovers() {
    let _serial = serial();
    const JOBS: usize = 600;
    let scratch = Scratch::new("redis");
    let mut redis = PrivateRedis::new(free_port(), &scratch.0.join("redis"));
    redis.start().await;
    let url = redis.url();
    let mut s = settings();
    s.result_backend = url.clone();
    let q = unique_queue("redis-restart");
    let _cleanup = QueueCleanup {
        settings: s.clone(),
        queue: q.clone(),
    };
    let ids = new_ids(JOBS);
    let client = Client::connect(&s).await.unwrap();
    publish_jobs(&client, &q, &ids, restart_sleep_ms).await;

    let port = free_port();
    let env = [("MEDIAFARM_RESULT_BACKEND", url.as_str())];
    let mut worker = WorkerProc::spawn(&scratch, "worker", &q, 16, port, &env);
    let done = wait_stored(&url, &ids, 200, Duration::from_secs(60)).await;
    assert!(
        done >= 200,
        "the worker finished only {done} jobs within 60 s"
    );
    assert_eq!(readyz(port).await, Some(200), "ready before the restart");

    redis.stop().await;
    let went_unready = wait_readyz(port, 503, Duration::from_secs(15)).await;
    assert!(
        went_unready.is_some(),
        "/readyz did not turn 503 within 15 s of Redis stopping (now {:?})",
        readyz(port).await
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    redis.start().await;
    let ready_after = wait_readyz(port, 200, Duration::from_secs(60)).await;
    assert!(
        ready_after.is_some(),
        "/readyz did not return to 200 within 60 s of Redis starting (now {:?})",
        readyz(port).await
    );
    let done_after_restart = succeeded(&stored(&url, &ids).await);
    assert!(
        done_after_restart >= done,
        "results stored before the restart were lost: {done} before, {done_after_restart} after"
    );

    wait_stored(&url, &ids, JOBS, Duration::from_secs(120)).await;
    worker.stop().await;
    let records = stored(&url, &ids).await;
    let lost = JOBS - succeeded(&records);
    let ready_after_s = ready_after.map_or(0.0, |d| d.as_secs_f64());
    println!(
        "FIGURE redis_restart jobs={JOBS} lost={lost} ready_after_s={ready_after_s:.2} \
         done_at_stop={done}"
    );
    assert_eq!(
        lost,
        0,
        "jobs without SUCCESS: {:?}",
        not_succeeded(&records)
    );
    assert!(
        done < JOBS,
        "all {JOBS} jobs finished before Redis stopped; nothing was tested"
    );
    assert_eq!(ready_count(&s, &q).await, 0, "messages left in the queue");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::await_holding_lock)] // Each test has its own runtime; the lock only orders tests.
async fn retry_countdown_survives_worker_restart() {
    let _serial = serial();
    let scratch = Scratch::new("retry");
    let s = settings();
    let q = unique_queue("retry-restart");
    let _cleanup = QueueCleanup {
        settings: s.clone(),
        queue: q.clone(),
    };
    let client = Client::connect(&s).await.unwrap();
    let opts = SendOptions {
        queue: Some(q.clone()),
        ..Default::default()
    };
    let kwargs: Map<String, Value> = json!({"fail_times": 1, "retry_after_s": 4})
        .as_object()
        .cloned()
        .unwrap();
    let job = client.send_task("echo.echo", kwargs, &opts).await.unwrap();

    let mut a = WorkerProc::spawn(&scratch, "worker-a", &q, 2, free_port(), &[]);
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        let meta = job.meta().await.unwrap();
        match meta.as_ref().map(|m| &m.status) {
            Some(TaskState::Retry) => break,
            Some(state) if state.is_ready() => {
                panic!("the job ended {state} instead of waiting to retry: {meta:?}")
            }
            _ => {}
        }
        assert!(
            Instant::now() < end,
            "no RETRY state within 20 s; last record: {meta:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Well inside the 4 s countdown: the retry must be parked in the broker by now.
    tokio::time::sleep(Duration::from_secs(1)).await;
    a.kill9();
    let killed = Instant::now();
    assert_eq!(
        ready_count(&s, &q).await,
        0,
        "the retry should wait in a broker delay queue, not back in the work queue"
    );
    tokio::time::sleep(Duration::from_secs(5).saturating_sub(killed.elapsed())).await;

    let mut b = WorkerProc::spawn(&scratch, "worker-b", &q, 2, free_port(), &[]);
    let result = match job.get(Duration::from_secs(30)).await {
        Ok(result) => result,
        Err(e) => panic!(
            "the job did not succeed within 30 s of a new worker starting: {e}; record: {:?}",
            job.meta().await
        ),
    };
    assert_eq!(result["fail_times"], 1, "{result}");
    b.stop().await;
}

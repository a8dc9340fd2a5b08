//! `mediafarm beat` end to end: the real `mediafarm` binary (beat and schedule commands) against
//! the machine's RabbitMQ and Redis. Every test has its own queue and its own beat key prefix,
//! and entries tick every second, so a test takes a few seconds. The ticks published are read
//! back from the queue (each message carries its entry and due time in headers) and checked
//! for duplicates, gaps, grid alignment and their deterministic task ids.

use std::fs::File;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use lapin::options::BasicGetOptions;
use mediafarm::beat::{tick_task_id, unix_ms};
use mediafarm::Settings;
use mediafarm_tests::{
    binary, delete_queue, python, python_env, ready_count, settings, unique_queue, workspace_root,
};
use serde_json::{json, Value};

/// Entries in these tests tick every second.
const EVERY_MS: u64 = 1000;
/// The lease TTL the beats run with: a dead leader is replaced within about a second.
const LEASE_TTL: &str = "1";
/// Liveness bound for waiting on a condition (a failure guard, not a timing assertion).
const PATIENCE: Duration = Duration::from_secs(40);

/// One published tick, as read back from the queue.
#[derive(Debug, Clone)]
struct Tick {
    id: String,
    entry: String,
    due_ms: u64,
    kwargs: Value,
    expires: Option<String>,
}

/// A test's queue, key prefix, settings file and beat processes.
struct BeatTest {
    settings: Settings,
    queue: String,
    prefix: String,
    dir: PathBuf,
    config: PathBuf,
    beats: Vec<Child>,
}

impl BeatTest {
    /// `config` is the settings file's text; `{queue}` in it becomes the test's queue.
    fn new(label: &str, config: &str) -> BeatTest {
        let queue = unique_queue(label);
        let prefix = format!(
            "t-beat-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..10]
        );
        let dir = std::env::temp_dir().join(&prefix);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("mediafarm.toml");
        std::fs::write(&path, config.replace("{queue}", &queue)).unwrap();
        BeatTest {
            settings: settings(),
            queue,
            prefix,
            dir,
            config: path,
            beats: Vec::new(),
        }
    }

    fn command(&self) -> Command {
        let mut cmd = Command::new(binary("mediafarm"));
        cmd.arg("--config")
            .arg(&self.config)
            .env("MEDIAFARM_BEAT_KEY_PREFIX", &self.prefix)
            .env("MEDIAFARM_BEAT_LEASE_TTL", LEASE_TTL)
            // Every beat serves its endpoints on a port of its own choosing.
            .env("MEDIAFARM_METRICS_ADDR", "127.0.0.1:0")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null());
        cmd
    }

    /// Runs `mediafarm <args>` to the end.
    fn cli(&self, args: &[&str]) -> Output {
        self.command().args(args).output().expect("mediafarm runs")
    }

    /// Starts `mediafarm beat`; returns its index. Its log goes to `beat-<i>.log`.
    fn start_beat(&mut self) -> usize {
        self.start_beat_with(&[])
    }

    /// Starts `mediafarm beat` with extra environment variables.
    fn start_beat_with(&mut self, env: &[(&str, &str)]) -> usize {
        self.start_beat_with_args(env, &[])
    }

    /// Starts `mediafarm beat ARGS` with extra environment variables.
    fn start_beat_with_args(&mut self, env: &[(&str, &str)], args: &[&str]) -> usize {
        let i = self.beats.len();
        let log = File::create(self.log_path(i)).unwrap();
        let child = self
            .command()
            .envs(env.iter().copied())
            .arg("beat")
            .args(args)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("mediafarm beat starts");
        self.beats.push(child);
        i
    }

    fn log_path(&self, i: usize) -> PathBuf {
        self.dir.join(format!("beat-{i}.log"))
    }

    fn log(&self, i: usize) -> String {
        std::fs::read_to_string(self.log_path(i)).unwrap_or_default()
    }

    /// Where beat `i` (started with JSON logs) serves its endpoints, once it says so.
    async fn metrics_addr(&self, i: usize) -> std::net::SocketAddr {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let found = self.log(i).lines().find_map(|line| {
                let v: Value = serde_json::from_str(line).ok()?;
                v["fields"]["metrics_addr"].as_str()?.parse().ok()
            });
            if let Some(addr) = found {
                return addr;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "beat {i} never logged its metrics_addr:\n{}",
                self.log(i)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn pid(&self, i: usize) -> u32 {
        self.beats[i].id()
    }

    fn signal(&self, i: usize, sig: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid(i).to_string())
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig} beat {i}");
    }

    /// SIGTERM, then the exit status (a clean stop is success).
    async fn stop(&mut self, i: usize) -> std::process::ExitStatus {
        self.signal(i, "TERM");
        let child = &mut self.beats[i];
        for _ in 0..400 {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!(
            "beat {i} did not stop within 20 s of SIGTERM:\n{}",
            self.log(i)
        );
    }

    async fn redis(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.settings.result_backend.as_str())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    }

    /// The lease's holder now: (fencing epoch, pid), if any.
    async fn leader(&self) -> Option<(u64, u32)> {
        let mut conn = self.redis().await;
        let token: Option<String> = redis::cmd("GET")
            .arg(format!("{}:leader", self.prefix))
            .query_async(&mut conn)
            .await
            .unwrap();
        let token = token?;
        let parts: Vec<&str> = token.split(':').collect();
        Some((parts[0].parse().unwrap(), parts[2].parse().unwrap()))
    }

    /// Which of the beats holds the lease, once one does.
    async fn wait_leader(&self, not: Option<usize>) -> usize {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        while tokio::time::Instant::now() < deadline {
            if let Some((_, pid)) = self.leader().await {
                if let Some(i) = (0..self.beats.len()).find(|&i| self.pid(i) == pid) {
                    if Some(i) != not {
                        return i;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("no beat (other than {not:?}) took the lease");
    }

    /// The record of an entry's last claimed tick: (tick, state).
    async fn last_tick(&self, entry: &str) -> Option<(u64, String)> {
        let mut conn = self.redis().await;
        let (tick, state): (Option<u64>, Option<String>) = redis::cmd("HMGET")
            .arg(format!("{}:tick:{entry}", self.prefix))
            .arg("tick")
            .arg("state")
            .query_async(&mut conn)
            .await
            .unwrap();
        tick.map(|t| (t, state.unwrap_or_default()))
    }

    /// Waits until the queue holds at least `n` messages.
    async fn wait_messages(&self, n: u32) -> u32 {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let have = ready_count(&self.settings, &self.queue).await;
            if have >= n {
                return have;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "only {have} of {n} messages arrived; beat logs:\n{}",
                (0..self.beats.len())
                    .map(|i| self.log(i))
                    .collect::<Vec<_>>()
                    .join("\n---\n")
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Takes every message off the queue, sorted by due time.
    async fn drain(&self) -> Vec<Tick> {
        let conn = mediafarm::amqp::broker::connect(&self.settings, "beat test drain")
            .await
            .unwrap();
        let ch = conn.create_channel().await.unwrap();
        let mut ticks = Vec::new();
        while let Some(msg) = ch
            .basic_get(self.queue.as_str().into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap()
        {
            let (_, headers) = mediafarm::amqp::table::read_properties(&msg.delivery.properties);
            let body: Value = serde_json::from_slice(&msg.delivery.data).unwrap();
            let due = headers["beat_due"].as_str().expect("beat_due header");
            ticks.push(Tick {
                id: headers["id"].as_str().unwrap().to_owned(),
                entry: headers["beat_entry"].as_str().unwrap().to_owned(),
                due_ms: chrono::DateTime::parse_from_rfc3339(due)
                    .unwrap()
                    .timestamp_millis() as u64,
                kwargs: body[1].clone(),
                expires: headers["expires"].as_str().map(str::to_owned),
            });
        }
        mediafarm::amqp::broker::close_quietly(&conn, &[&ch], "done").await;
        ticks.sort_by_key(|t| t.due_ms);
        ticks
    }

    /// Kills what is left, deletes the queue and every Redis key under the prefix.
    async fn cleanup(mut self) {
        for child in &mut self.beats {
            let _ = child.kill();
            let _ = child.wait();
        }
        delete_queue(&self.settings, &self.queue).await;
        let mut conn = self.redis().await;
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{}:*", self.prefix))
            .query_async(&mut conn)
            .await
            .unwrap();
        if !keys.is_empty() {
            let _: () = redis::cmd("DEL")
                .arg(keys)
                .query_async(&mut conn)
                .await
                .unwrap();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Checks the ticks of `entry` are on the grid, each once, with the derived task id; returns
/// the missing ticks between the first and the last.
fn check_ticks(prefix: &str, entry: &str, ticks: &[Tick]) -> Vec<u64> {
    assert!(!ticks.is_empty());
    let mut ids = std::collections::HashSet::new();
    for t in ticks {
        assert_eq!(t.entry, entry);
        assert_eq!(t.due_ms % EVERY_MS, 0, "off the grid: {t:?}");
        assert!(ids.insert(t.id.clone()), "task id published twice: {t:?}");
        assert_eq!(t.id, tick_task_id(prefix, entry, t.due_ms));
    }
    for pair in ticks.windows(2) {
        assert!(
            pair[1].due_ms > pair[0].due_ms,
            "tick due {} published twice",
            pair[0].due_ms
        );
    }
    let (first, last) = (
        ticks[0].due_ms / EVERY_MS,
        ticks[ticks.len() - 1].due_ms / EVERY_MS,
    );
    let have: std::collections::HashSet<u64> = ticks.iter().map(|t| t.due_ms / EVERY_MS).collect();
    (first..=last).filter(|k| !have.contains(k)).collect()
}

#[tokio::test]
async fn settings_entries_are_published_once_per_tick_on_the_grid() {
    let mut t = BeatTest::new(
        "beat-settings",
        "[beat_schedule.grid]\ntask = \"echo.echo\"\nevery = \"1s\"\nqueue = \"{queue}\"\n\
         expires = 30\nkwargs = { room = 7, name = \"lobby\" }\n",
    );
    let started_ms = unix_ms();
    let beat = t.start_beat();
    t.wait_messages(3).await;
    let status = t.stop(beat).await;
    assert!(status.success(), "{status}: {}", t.log(beat));
    assert_eq!(t.leader().await, None, "SIGTERM releases the lease");

    let ticks = t.drain().await;
    let missing = check_ticks(&t.prefix, "grid", &ticks);
    assert_eq!(missing, Vec::<u64>::new(), "{ticks:?}");
    // The grid starts at the first tick after the beat first saw the entry.
    assert!(ticks[0].due_ms > started_ms, "{ticks:?}");
    for tick in &ticks {
        assert_eq!(tick.kwargs, json!({"room": 7, "name": "lobby"}));
        // Expiry counts from the tick's due time, not from when it was published.
        let expires = chrono::DateTime::parse_from_rfc3339(tick.expires.as_deref().unwrap())
            .unwrap()
            .timestamp_millis() as u64;
        assert_eq!(expires, tick.due_ms + 30_000);
    }
    let last = ticks.last().unwrap().due_ms / EVERY_MS;
    assert_eq!(t.last_tick("grid").await, Some((last, "sent".into())));
    assert!(t.log(beat).contains("released the beat lease"));
    t.cleanup().await;
}

#[tokio::test]
async fn a_bad_entry_stops_start_up_naming_entry_field_value_and_what_is_accepted() {
    let t = BeatTest::new(
        "beat-bad",
        "[beat_schedule.snap]\ntask = \"snapshot.capture\"\nevery = \"20x\"\n",
    );
    let out = t.cli(&["beat"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("setting `beat_schedule.snap.every` = \"20x\" is not accepted")
            && err.contains("\"20s\", \"5m\""),
        "{err}"
    );
    std::fs::write(
        &t.config,
        "[beat_schedule.snap]\ntask = \"snapshot.capture\"\nevery = 20\nargs = [1]\n",
    )
    .unwrap();
    let out = t.cli(&["beat"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        err.contains("`beat_schedule.snap.args` = [1]")
            && err.contains("one of task, every, crontab, kwargs, queue, expires"),
        "{err}"
    );
    t.cleanup().await;
}

#[tokio::test]
async fn schedule_commands_add_list_remove_and_a_running_beat_follows_them() {
    let mut t = BeatTest::new(
        "beat-dyn",
        // A settings entry that does not tick while the test runs: ticks sit on a grid from the
        // Unix epoch, and an hourly one ticked into a run that crossed the hour.
        "[beat_schedule.annual]\ntask = \"echo.echo\"\nevery = \"365d\"\nqueue = \"{queue}\"\n",
    );
    let beat = t.start_beat();
    t.wait_leader(None).await;

    let bad = t.cli(&["schedule", "add", "x", "echo.echo", "--every", "20x"]);
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("`every` = \"20x\" is not accepted"), "{err}");
    let bad_cron = t.cli(&[
        "schedule",
        "add",
        "x",
        "echo.echo",
        "--crontab",
        "* 24 * * *",
    ]);
    assert!(!bad_cron.status.success());
    let err = String::from_utf8_lossy(&bad_cron.stderr);
    assert!(err.contains("the hour field \"24\""), "{err}");
    let both = t.cli(&[
        "schedule",
        "add",
        "x",
        "echo.echo",
        "--crontab",
        "* * * * *",
        "--every",
        "1s",
    ]);
    assert!(!both.status.success());
    // A crontab entry (UTC), listed with its schedule; it never matches within this test.
    let q = t.queue.clone();
    let cron = t.cli(&[
        "schedule",
        "add",
        "yearly",
        "echo.echo",
        "--crontab",
        "0 0 1 1 *",
        "--queue",
        &q,
    ]);
    assert!(cron.status.success(), "{cron:?}");
    let clash = t.cli(&["schedule", "add", "annual", "echo.echo", "--every", "1s"]);
    assert!(!clash.status.success());
    assert!(String::from_utf8_lossy(&clash.stderr).contains("settings file"));

    let before_add = unix_ms();
    let added = t.cli(&[
        "schedule",
        "add",
        "dyn",
        "echo.echo",
        "--every",
        "1s",
        "--json",
        r#"{"n": 1}"#,
        "--queue",
        &q,
    ]);
    let after_add = unix_ms();
    assert!(added.status.success(), "{added:?}");
    t.wait_messages(2).await;

    // An entry written into Redis by hand that does not parse is reported and skipped; the
    // others keep going.
    let mut conn = t.redis().await;
    let _: () = redis::cmd("HSET")
        .arg(format!("{}:entries", t.prefix))
        .arg("broken")
        .arg(r#"{"task": "echo.echo", "every": "often"}"#)
        .query_async(&mut conn)
        .await
        .unwrap();
    // Hand edits are read within 30 s, or at the next tick once the version moves.
    let _: () = redis::cmd("INCR")
        .arg(format!("{}:version", t.prefix))
        .query_async(&mut conn)
        .await
        .unwrap();
    let list = t.cli(&["schedule", "list", "--json"]);
    assert!(list.status.success());
    let err = String::from_utf8_lossy(&list.stderr);
    assert!(
        err.contains("schedule entry `broken`: `every` = \"often\" is not accepted"),
        "{err}"
    );
    let rows: Vec<Value> =
        serde_json::from_slice(&list.stdout).expect("--json prints one JSON array");
    let names: Vec<(&str, &str)> = rows
        .iter()
        .map(|r| (r["name"].as_str().unwrap(), r["source"].as_str().unwrap()))
        .collect();
    assert_eq!(
        names,
        [
            ("annual", "settings"),
            ("dyn", "redis"),
            ("yearly", "redis")
        ]
    );
    assert_eq!(rows[2]["crontab"], "0 0 1 1 *");
    assert_eq!(rows[1]["kwargs"], json!({"n": 1}));
    assert_eq!(rows[1]["queue"], json!(t.queue));
    assert!(rows[1]["last_due"].is_string());

    let have = ready_count(&t.settings, &t.queue).await;
    t.wait_messages(have + 1).await;
    assert!(
        t.log(beat)
            .contains("skipping a bad schedule entry in Redis"),
        "{}",
        t.log(beat)
    );
    assert!(t.cli(&["schedule", "remove", "broken"]).status.success());
    let removed = t.cli(&["schedule", "remove", "dyn"]);
    assert!(removed.status.success(), "{removed:?}");
    let count_at_remove = ready_count(&t.settings, &t.queue).await;
    // Two more ticks' time: a claim checks the entry still exists, so at most one tick
    // claimed just before the removal can still arrive.
    tokio::time::sleep(Duration::from_millis(2 * EVERY_MS + 500)).await;
    let ticks = t.drain().await;
    assert!(
        ticks.len() as u32 <= count_at_remove + 1,
        "{} ticks after removal at {count_at_remove}",
        ticks.len()
    );
    assert_eq!(check_ticks(&t.prefix, "dyn", &ticks), Vec::<u64>::new());
    // The grid starts at the first tick after `schedule add`.
    let first = ticks[0].due_ms / EVERY_MS;
    assert!(
        (before_add / EVERY_MS + 1..=after_add / EVERY_MS + 1).contains(&first),
        "first tick {first} for an add between {before_add} and {after_add}"
    );
    let again = t.cli(&["schedule", "remove", "dyn"]);
    assert_eq!(again.status.code(), Some(1));
    assert_eq!(t.stop(beat).await.code(), Some(0));
    t.cleanup().await;
}

#[tokio::test]
async fn two_beats_publish_each_tick_exactly_once() {
    let mut t = BeatTest::new("beat-ha", "");
    let a = t.start_beat();
    let b = t.start_beat();
    let leader = t.wait_leader(None).await;
    let q = t.queue.clone();
    let added = t.cli(&[
        "schedule",
        "add",
        "ha",
        "echo.echo",
        "--every",
        "1s",
        "--queue",
        &q,
    ]);
    assert!(added.status.success(), "{added:?}");
    t.wait_messages(3).await;

    // A clean handover: the leader stops and releases the lease; the other takes over.
    let follower = if leader == a { b } else { a };
    assert!(t.stop(leader).await.success());
    let have = ready_count(&t.settings, &t.queue).await;
    assert_eq!(t.wait_leader(Some(leader)).await, follower);
    t.wait_messages(have + 3).await;
    assert!(t.stop(follower).await.success());

    let ticks = t.drain().await;
    let missing = check_ticks(&t.prefix, "ha", &ticks);
    assert_eq!(missing, Vec::<u64>::new(), "{ticks:?}");
    let (first, last) = (
        ticks[0].due_ms / EVERY_MS,
        ticks[ticks.len() - 1].due_ms / EVERY_MS,
    );
    assert_eq!(ticks.len() as u64, last - first + 1);
    assert_eq!(t.last_tick("ha").await, Some((last, "sent".into())));
    // Both beats published: the follower's ticks follow the leader's.
    assert!(t.log(leader).contains("published") && t.log(follower).contains("published"));
    t.cleanup().await;
}

/// Waits for beat `i` to exit by itself; its exit status.
async fn wait_exit(t: &mut BeatTest, i: usize) -> std::process::ExitStatus {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        if let Some(status) = t.beats[i].try_wait().unwrap() {
            return status;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "beat {i} is still running:\n{}",
            t.log(i)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_beat_with_another_schedule_under_the_leaders_prefix_refuses_to_start() {
    let mut t = BeatTest::new(
        "beat-fingerprint",
        "[beat_schedule.grid]\ntask = \"echo.echo\"\nevery = \"1s\"\nqueue = \"{queue}\"\n",
    );
    let leader = t.start_beat();
    assert_eq!(t.wait_leader(None).await, leader);
    let mut conn = t.redis().await;
    let recorded: Option<String> = redis::cmd("GET")
        .arg(format!("{}:leader-schedule", t.prefix))
        .query_async(&mut conn)
        .await
        .unwrap();
    let recorded = recorded.expect("the leader records its schedule's fingerprint");

    // Another environment's schedule (another period) under the same prefix: refused, naming
    // the prefix and both fingerprints; the leader is untouched.
    let other = json!({"grid": {"task": "echo.echo", "every": 2, "queue": t.queue}}).to_string();
    let refused = t.start_beat_with(&[("MEDIAFARM_BEAT_SCHEDULE", &other)]);
    let status = wait_exit(&mut t, refused).await;
    assert!(!status.success(), "{status}: {}", t.log(refused));
    let log = t.log(refused);
    assert!(
        log.contains("different schedule")
            && log.contains(&format!("beat_key_prefix = \"{}\"", t.prefix))
            && log.contains(&recorded),
        "{log}"
    );
    assert!(!log.contains("beat started"), "{log}");
    assert_eq!(t.wait_leader(None).await, leader);

    // The same schedule (given through the environment this time, so only its content counts)
    // stands by as a follower and takes over when the leader stops.
    let same = json!({"grid": {"task": "echo.echo", "every": 1, "queue": t.queue}}).to_string();
    let follower = t.start_beat_with(&[("MEDIAFARM_BEAT_SCHEDULE", &same)]);
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !t.log(follower).contains("waiting for the leader lease") {
        assert!(
            t.beats[follower].try_wait().unwrap().is_none(),
            "the follower stopped: {}",
            t.log(follower)
        );
        assert!(
            tokio::time::Instant::now() < deadline,
            "{}",
            t.log(follower)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(t.log(follower).contains(&recorded), "{}", t.log(follower));
    assert!(t.stop(leader).await.success());
    assert_eq!(t.wait_leader(Some(leader)).await, follower);
    assert!(t.stop(follower).await.success());
    // Released with the lease: a beat of the other schedule may lead once none of these runs.
    let left: Option<String> = redis::cmd("GET")
        .arg(format!("{}:leader-schedule", t.prefix))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(left, None);
    let next = t.start_beat_with(&[("MEDIAFARM_BEAT_SCHEDULE", &other)]);
    assert_eq!(t.wait_leader(None).await, next);
    assert!(t.stop(next).await.success());
    t.cleanup().await;
}

#[tokio::test]
async fn a_paused_then_a_killed_leader_cause_no_duplicates_and_at_most_one_missed_tick() {
    let mut t = BeatTest::new("beat-fence", "");
    let a = t.start_beat();
    let b = t.start_beat();
    let first_leader = t.wait_leader(None).await;
    let other = if first_leader == a { b } else { a };
    let q = t.queue.clone();
    let added = t.cli(&[
        "schedule",
        "add",
        "fence",
        "echo.echo",
        "--every",
        "1s",
        "--queue",
        &q,
    ]);
    assert!(added.status.success(), "{added:?}");
    let have = t.wait_messages(2).await;

    // Paused past its lease: the other beat takes over; when the paused one resumes it still
    // believes it leads until its next renewal, and any claim it makes is fenced off.
    t.signal(first_leader, "STOP");
    assert_eq!(t.wait_leader(Some(first_leader)).await, other);
    let have = t.wait_messages(have + 2).await;
    t.signal(first_leader, "CONT");
    let have = t.wait_messages(have + 2).await;

    // Killed outright: the other beat takes over once the lease runs out. (Normally the
    // leader now is `other`; on a starved machine the lease may have moved back already, so
    // kill whichever beat holds it.)
    let (epoch_before, pid) = t.leader().await.unwrap();
    let killed = (0..2).find(|&i| t.pid(i) == pid).unwrap();
    t.beats[killed].kill().unwrap();
    t.beats[killed].wait().unwrap();
    let survivor = t.wait_leader(Some(killed)).await;
    let (epoch_after, _) = t.leader().await.unwrap();
    assert!(
        epoch_after > epoch_before,
        "each acquisition takes a new fencing token"
    );
    t.wait_messages(have + 3).await;
    assert!(t.stop(survivor).await.success());

    let ticks = t.drain().await;
    let missing = check_ticks(&t.prefix, "fence", &ticks);
    assert!(
        missing.len() <= 1,
        "missed ticks {missing:?} in {:?}",
        ticks
            .iter()
            .map(|t| t.due_ms / EVERY_MS)
            .collect::<Vec<_>>()
    );
    let (first, last) = (
        ticks[0].due_ms / EVERY_MS,
        ticks[ticks.len() - 1].due_ms / EVERY_MS,
    );
    assert_eq!(ticks.len() as u64 + missing.len() as u64, last - first + 1);
    let log = t.log(first_leader);
    assert!(
        log.contains("lost the beat lease") || log.contains("tick claim refused"),
        "the resumed beat noticed it no longer leads:\n{log}"
    );
    t.cleanup().await;
}

#[tokio::test]
async fn a_leader_stuck_on_an_unanswering_broker_hands_the_lease_on() {
    // A broker address that accepts connections and never says a word: the stuck beat's
    // publish waits there (10 s per connection attempt, retried), far longer than its lease.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_url = format!("amqp://guest:guest@{}//", silent.local_addr().unwrap());
    let mut t = BeatTest::new("beat-stuck", "");
    let stuck = t.start_beat_with(&[("MEDIAFARM_BROKER_URL", &silent_url)]);
    assert_eq!(t.wait_leader(None).await, stuck);
    let healthy = t.start_beat();
    let q = t.queue.clone();
    let added = t.cli(&[
        "schedule",
        "add",
        "stuck",
        "echo.echo",
        "--every",
        "1s",
        "--queue",
        &q,
    ]);
    assert!(added.status.success(), "{added:?}");

    // Without the hand-over nothing would arrive for the best part of a minute.
    assert_eq!(t.wait_leader(Some(stuck)).await, healthy);
    t.wait_messages(3).await;
    assert!(t.stop(healthy).await.success());
    let ticks = t.drain().await;
    // The stuck leader's claimed tick never left it: at most that one is missing.
    assert!(
        check_ticks(&t.prefix, "stuck", &ticks).len() <= 1,
        "{ticks:?}"
    );
    assert!(
        t.log(stuck).contains("handing the lease to another beat"),
        "{}",
        t.log(stuck)
    );
    drop(silent);
    t.cleanup().await;
}

#[tokio::test]
async fn a_python_celery_worker_runs_what_beat_publishes() {
    let mut t = BeatTest::new(
        "beat-py",
        "[beat_schedule.py]\ntask = \"echo.echo\"\nevery = 1\nqueue = \"{queue}\"\n\
         expires = 60\nkwargs = { from = \"beat\" }\n",
    );
    let beat = t.start_beat();
    let mut worker = Command::new(python())
        .current_dir(workspace_root().join("tests/py"))
        .args([
            "-m",
            "celery",
            "-A",
            "celery_app",
            "worker",
            "-P",
            "solo",
            "-Q",
        ])
        .arg(&t.queue)
        .args(["-l", "warning", "--without-gossip", "--without-mingle"])
        .args(["--without-heartbeat", "-n", &format!("py-{}@%h", t.queue)])
        .envs(python_env(&t.settings))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .expect("python celery worker starts");

    // The tick recorded as sent has the task id derived from it; Python stores its result there.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let tick = loop {
        if let Some((tick, state)) = t.last_tick("py").await {
            if state == "sent" {
                break tick;
            }
        }
        assert!(tokio::time::Instant::now() < deadline, "{}", t.log(beat));
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let id = tick_task_id(&t.prefix, "py", tick * EVERY_MS);
    let client = mediafarm::Client::connect(&t.settings).await.unwrap();
    let result = client.result(&id).get(PATIENCE).await.unwrap();
    assert_eq!(result["worker"], "python");
    assert_eq!(result["kwargs"], json!({"from": "beat"}));
    let _ = worker.kill();
    let _ = worker.wait();
    assert!(t.stop(beat).await.success());
    client.backend().forget(&id).await.unwrap();
    t.cleanup().await;
}

/// `GET path` on `addr`: the status code and the body.
async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: beat\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let status = out
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {out:?}"));
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    (status, body.to_owned())
}

/// The value of an unlabelled metric (or of one exact `name{labels}`) in a Prometheus text.
fn metric(text: &str, series: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("{series} not in\n{text}"))
}

#[tokio::test]
async fn two_beats_serve_metrics_health_and_readiness_and_count_what_they_publish() {
    let mut t = BeatTest::new("beat-metrics", "");
    let json_logs = [("MEDIAFARM_LOG_FORMAT", "json")];
    // One by the flag, one by the setting (the environment's 127.0.0.1:0).
    let a = t.start_beat_with_args(&json_logs, &["--metrics-addr", "127.0.0.1:0"]);
    let b = t.start_beat_with(&json_logs);
    let addrs = [t.metrics_addr(a).await, t.metrics_addr(b).await];
    assert_ne!(addrs[0], addrs[1]);
    let q = t.queue.clone();
    let added = t.cli(&[
        "schedule",
        "add",
        "m",
        "echo.echo",
        "--every",
        "1s",
        "--queue",
        &q,
    ]);
    assert!(added.status.success(), "{added:?}");
    t.wait_messages(3).await;

    // Exactly one beat reports leading, and it is the lease's holder in Redis. Re-read
    // while the lease is moving (a starved host can let it lapse for a moment).
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let leader = loop {
        let holder = t.wait_leader(None).await;
        let mut flags = Vec::new();
        for addr in addrs {
            flags.push(metric(
                &http_get(addr, "/metrics").await.1,
                "mediafarm_beat_leader",
            ));
        }
        if flags.iter().sum::<u64>() == 1 && flags[holder] == 1 {
            break holder;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "leader flags {flags:?}, lease held by beat {holder}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let text = http_get(addrs[leader], "/metrics").await.1;
    assert_eq!(metric(&text, "mediafarm_beat_entries"), 1, "{text}");
    assert!(
        metric(&text, "mediafarm_beat_lease_acquisitions_total") >= 1,
        "{text}"
    );
    for reason in ["no_leader", "unconfirmed", "publish_failed"] {
        metric(
            &text,
            &format!("mediafarm_beat_ticks_missed_total{{reason=\"{reason}\"}}"),
        );
    }
    for addr in addrs {
        assert_eq!(http_get(addr, "/healthz").await, (200, "ok\n".into()));
        // Readiness is checked every 2 s from the start; both answered long ago.
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let (status, body) = http_get(addr, "/readyz").await;
            if status == 200 {
                assert_eq!(body, "ready\n");
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "{status} {body}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(http_get(addr, "/nope").await.0, 404);
    }

    // With the entry removed, publishing stops; then the beats' counters add up to the
    // messages in the queue.
    assert!(t.cli(&["schedule", "remove", "m"]).status.success());
    let published = || async {
        let mut sum = 0;
        for addr in addrs {
            sum += metric(
                &http_get(addr, "/metrics").await.1,
                "mediafarm_beat_ticks_published_total",
            );
        }
        sum
    };
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while published().await != u64::from(ready_count(&t.settings, &t.queue).await) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "counters never matched the queue"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let ticks = t.drain().await;
    assert_eq!(published().await, ticks.len() as u64);
    assert!(ticks.len() >= 3);
    assert_eq!(check_ticks(&t.prefix, "m", &ticks), Vec::<u64>::new());
    for i in [a, b] {
        assert!(t.stop(i).await.success());
    }
    t.cleanup().await;
}

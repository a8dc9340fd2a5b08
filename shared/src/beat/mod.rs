//! `mediafarm beat`: Celery-beat-style periodic publishing that several processes can run at
//! once for high availability, publishing each tick once.
//!
//! Ticks sit on a fixed grid: tick k of an entry is due at k·every after the Unix epoch, so
//! they never drift and every beat numbers them alike (a crontab entry sits on the one-minute
//! grid, and only the minutes it matches are due). One beat leads (the Redis lease in
//! `beat_lease`); for each due tick the leader first *claims* it in Redis with a Lua
//! compare-and-set that also checks the leader's fencing token, then publishes it (publisher
//! confirms), then marks it sent. A tick is claimed at most once, by the one leader Redis
//! recognised at that instant, so two beats never both publish it, whatever their pauses.
//!
//! Beats share a schedule through their key prefix: one with a schedule other than the
//! current leader's refuses to start (`fingerprint`, `BeatError::ScheduleConflict`).
//!
//! The beat serves `/metrics`, `/healthz` and `/readyz` on `metrics_addr` (`beat_metrics`,
//! `beat_probe`).
//!
//! Crash windows (documented in README, "mediafarm beat"):
//! - leader dies after the claim, before the confirm: that tick is lost, not sent twice
//!   (at-most-once per tick); the next leader logs it as a probable gap.
//! - leader paused past its lease after claiming: its publish arrives late, still once; the
//!   job's `expires` counts from the tick's due time, so workers drop a stale one.
//! - no leader for a while (the lease running out after a crash): the next leader publishes,
//!   late, the ticks due within the catch-up window (lease TTL + 1 s, longer than a failover)
//!   and logs older ones as missed (a beat restarted after an hour does not send an hour).
//! - the broker connection drops after the broker took a message but before the confirm: the
//!   publisher sends it again (at-least-once on the wire) under the same task id, which is
//!   derived from the entry and the tick, so consumers can drop the repeat.

pub mod fingerprint;
pub mod lease;
pub mod metrics;
pub mod probe;
pub mod settings;
pub mod store;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use redis::aio::ConnectionManager;
use serde_json::Value;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::backend::BackendError;
use crate::beat::fingerprint::schedule_fingerprint;
use crate::beat::lease::{node_name, Lease};
use crate::beat::metrics::{BeatMetrics, Miss};
use crate::beat::probe::BeatProbe;
use crate::beat::settings::BeatSettings;
use crate::beat::store::{BeatKeys, ScheduleStore};
use crate::client::{build_message, Client, ClientError, SendOptions};
use crate::protocol::TaskMessage;
use crate::schedule::ScheduleEntry;
use crate::settings::Settings;

#[derive(Debug, thiserror::Error)]
pub enum BeatError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error("beat's Redis state: {0}")]
    Redis(#[from] redis::RedisError),
    #[error(transparent)]
    Http(#[from] crate::observe::http::BindError),
    #[error("timezone = {0:?} is not a time zone this build knows (an IANA name such as \"UTC\" or \"Europe/Berlin\")")]
    UnknownTimezone(String),
    #[error(
        "another beat leads under beat_key_prefix = {prefix:?} (lease {holder}) with a different \
         schedule (fingerprint {theirs}; this beat's is {ours}): beats sharing a prefix share one \
         schedule. Give each environment its own beat_key_prefix, or stop the beats running the \
         other schedule first (on Kubernetes the beat Deployment uses the Recreate strategy for \
         this)"
    )]
    ScheduleConflict {
        prefix: String,
        holder: String,
        theirs: String,
        ours: String,
    },
}

pub use crate::beat::store::unix_ms;

/// The task id of tick `due_ms` of entry `name`: a UUID (v5) derived from both, the same in
/// every beat, so a consumer can recognise a repeated tick.
pub fn tick_task_id(prefix: &str, name: &str, due_ms: u64) -> String {
    const NAMESPACE: uuid::Uuid = uuid::Uuid::from_u128(0x6d65_6469_6166_6172_6d2d_6265_6174_0001);
    uuid::Uuid::new_v5(&NAMESPACE, format!("{prefix}\n{name}\n{due_ms}").as_bytes()).to_string()
}

/// Claims due ticks for many entries in one round trip, only while `ARGV[1]` holds the lease.
/// Per entry (4 ARGV: tick, every_ms, dynamic, name) it answers `start` (first sight: the
/// grid starts here, nothing to publish), `done` (this tick or a later one was claimed
/// already), `gone` (a Redis entry removed meanwhile) or `claimed`, with the previous tick
/// and its state.
const CLAIM: &str = r#"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return {'fenced'} end
local out = {'ok'}
local function answer(code, tick, state)
  table.insert(out, code); table.insert(out, tick or ''); table.insert(out, state or '')
end
for i = 1, tonumber(ARGV[2]) do
  local key = KEYS[i + 2]
  local base = 2 + (i - 1) * 4
  local tick, every, dynamic, name = ARGV[base + 1], ARGV[base + 2], ARGV[base + 3], ARGV[base + 4]
  if dynamic == '1' and redis.call('HEXISTS', KEYS[2], name) == 0 then
    answer('gone')
  else
    local cur = redis.call('HMGET', key, 'tick', 'every_ms', 'state')
    if not cur[1] or cur[2] ~= every then
      redis.call('HSET', key, 'tick', tick, 'every_ms', every, 'state', 'start', 'by', ARGV[1])
      answer('start', cur[1], cur[3])
    elseif tonumber(cur[1]) >= tonumber(tick) then
      answer('done', cur[1], cur[3])
    else
      redis.call('HSET', key, 'tick', tick, 'state', 'claimed', 'by', ARGV[1])
      answer('claimed', cur[1], cur[3])
    end
  end
end
return out
"#;

/// Records what became of claimed ticks (`ARGV[2]`: `sent` once the broker confirmed them,
/// `not-due` for a crontab minute that does not match), for the gap report and `schedule list`.
const MARK: &str = r#"
for i = 1, #KEYS do
  local cur = redis.call('HMGET', KEYS[i], 'tick', 'by')
  if cur[1] == ARGV[i + 2] and cur[2] == ARGV[1] then
    redis.call('HSET', KEYS[i], 'state', ARGV[2])
  end
end
return 1
"#;

/// How often a leader looks for changed entries when no tick is due sooner.
const REFRESH: Duration = Duration::from_secs(1);
/// Ticks claimed by one Lua script at most.
const CLAIM_SLICE: usize = 2000;
/// How often a leader re-reads every Redis entry even if their version did not move.
const FULL_REFRESH: Duration = Duration::from_secs(30);

/// The entries as last read, and the Redis entries' version then.
struct EntryCache {
    version: u64,
    read_at: tokio::time::Instant,
    entries: Arc<Vec<(ScheduleEntry, bool)>>,
}

/// A running beat's parts.
pub struct Beat {
    settings: Settings,
    beat: BeatSettings,
    client: Client,
    conn: ConnectionManager,
    keys: BeatKeys,
    store: ScheduleStore,
    lease: Lease,
    /// Redis entries already reported as bad or shadowed, so each is logged once.
    reported: HashSet<String>,
    /// Entry name → (every_ms, last tick handled), to skip claims already made.
    known: HashMap<String, (u64, u64)>,
    cache: Option<EntryCache>,
    metrics: BeatMetrics,
    /// The `timezone` setting, whose wall clock crontab entries match.
    tz: chrono_tz::Tz,
}

/// An entry that is due, with where it came from.
struct Due<'a> {
    entry: &'a ScheduleEntry,
    /// The tick to claim, or (after the claim) to publish.
    tick: u64,
    /// The tick the claim recorded in Redis (for a late catch-up tick, a later one).
    claimed: u64,
    dynamic: bool,
}

impl Beat {
    /// Connects to the broker (lazily, on first publish) and to Redis.
    pub async fn connect(settings: &Settings, beat: &BeatSettings) -> Result<Beat, BeatError> {
        let tz = settings
            .timezone
            .parse()
            .map_err(|_| BeatError::UnknownTimezone(settings.timezone.clone()))?;
        let client = Client::connect(settings).await?;
        let conn = client.backend().connection();
        let keys = BeatKeys::new(&beat.beat_key_prefix);
        let lease = Lease::new(
            conn.clone(),
            keys.clone(),
            node_name(),
            beat.beat_lease_ttl,
            schedule_fingerprint(&beat.beat_schedule),
        );
        Ok(Beat {
            settings: settings.clone(),
            beat: beat.clone(),
            store: ScheduleStore::new(conn.clone(), keys.clone()),
            client,
            conn,
            keys,
            lease,
            reported: HashSet::new(),
            known: HashMap::new(),
            cache: None,
            metrics: BeatMetrics::new(),
            tz,
        })
    }

    /// Refuses a schedule other than the current leader's under the same prefix. A leader
    /// that records no fingerprint (an older beat) is let be.
    async fn check_leader_schedule(&self) -> Result<(), BeatError> {
        let Some(holder) = self.lease.holder().await? else {
            return Ok(());
        };
        match holder.fingerprint {
            Some(theirs) if theirs != self.lease.fingerprint() => {
                Err(BeatError::ScheduleConflict {
                    prefix: self.keys.prefix().to_owned(),
                    holder: holder.token,
                    theirs,
                    ours: self.lease.fingerprint().to_owned(),
                })
            }
            _ => Ok(()),
        }
    }

    /// Runs until `shutdown` resolves, then finishes the tick in hand and releases the lease.
    /// Fails at once, before serving anything, when the current leader under the same prefix
    /// runs a different schedule (`BeatError::ScheduleConflict`).
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) -> Result<(), BeatError> {
        self.check_leader_schedule().await?;
        let (token_tx, mut token_rx) = watch::channel(None::<String>);
        let stop_keeper = CancellationToken::new();
        let busy = Busy::default();
        // The loop turns at least once per lease TTL (leader: once a second); a few TTLs
        // without a turn is stuck. Never under 10 s, so a short TTL on a busy host does not
        // get beats restarted for a slow moment.
        let stuck_after = (self.lease.ttl() * 3).max(Duration::from_secs(10));
        let probe = BeatProbe::new(self.metrics.clone(), stuck_after);
        probe.turned();
        self.metrics
            .entries
            .set(self.beat.beat_schedule.len() as i64);
        let metrics_addr = crate::observe::http::serve_probe(
            self.settings.metrics_addr,
            Arc::new(probe.clone()),
            stop_keeper.clone(),
        )
        .await?;
        tokio::spawn(probe.clone().watch_connections(
            self.settings.clone(),
            self.conn.clone(),
            stop_keeper.clone(),
        ));
        let keeper = tokio::spawn(keep_lease(
            self.lease.clone(),
            token_tx,
            busy.clone(),
            self.metrics.clone(),
            stop_keeper.clone(),
        ));
        tracing::info!(
            entries = self.beat.beat_schedule.len(),
            prefix = self.keys.prefix(),
            schedule_fingerprint = self.lease.fingerprint(),
            lease_ttl_s = self.lease.ttl().as_secs_f64(),
            %metrics_addr,
            "beat started; waiting for the leader lease"
        );
        tokio::pin!(shutdown);
        let mut wake = tokio::time::Instant::now();
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                _ = tokio::time::sleep_until(wake) => {}
                changed = token_rx.changed() => {
                    if changed.is_err() {
                        break;
                    }
                }
            }
            probe.turned();
            let token = token_rx.borrow_and_update().clone();
            let Some(token) = token else {
                self.known.clear();
                // A follower turns too, so /healthz sees its loop alive.
                wake = tokio::time::Instant::now() + self.lease.ttl();
                continue;
            };
            busy.start();
            let outcome = self.step(&token).await;
            busy.end();
            probe.turned();
            let next = match outcome {
                Ok(next) => next,
                Err(e) => {
                    tracing::warn!(error = %e, "beat step failed; retrying");
                    Duration::from_millis(500)
                }
            };
            wake = tokio::time::Instant::now() + next;
        }
        stop_keeper.cancel();
        let _ = keeper.await;
        tracing::info!("beat stopped");
        Ok(())
    }

    /// Claims and publishes what is due; how long to sleep before the next step.
    async fn step(&mut self, token: &str) -> Result<Duration, BeatError> {
        let entries = self.entries().await?;
        self.metrics.entries.set(entries.len() as i64);
        let now = unix_ms();
        let due: Vec<Due> = entries
            .iter()
            .filter_map(|(entry, dynamic)| {
                let every = entry.every_ms();
                let tick = now / every;
                let handled = self
                    .known
                    .get(&entry.name)
                    .is_some_and(|&(e, t)| e == every && t >= tick);
                (!handled).then_some(Due {
                    entry,
                    tick,
                    claimed: tick,
                    dynamic: *dynamic,
                })
            })
            .collect();
        // In slices, so one script never holds Redis for long and the first jobs go out
        // while later ones are still being claimed.
        for slice in due.chunks(CLAIM_SLICE) {
            let claimed = self.claim(token, slice).await?;
            self.publish(token, claimed).await;
        }
        let now = unix_ms();
        let next_due = entries
            .iter()
            .map(|(e, _)| {
                let every = e.every_ms();
                (now / every + 1) * every - now
            })
            .min()
            .unwrap_or(u64::MAX);
        Ok(Duration::from_millis(next_due).min(REFRESH))
    }

    /// The settings entries, then the Redis entries whose names the settings do not use.
    /// The entries, re-read only when the Redis entries' version moved (and at least every
    /// `FULL_REFRESH`, for entries written into Redis by hand).
    async fn entries(&mut self) -> Result<Arc<Vec<(ScheduleEntry, bool)>>, BeatError> {
        let version = self.store.version().await?;
        if let Some(cached) = &self.cache {
            if cached.version == version && cached.read_at.elapsed() < FULL_REFRESH {
                return Ok(cached.entries.clone());
            }
        }
        let entries = Arc::new(self.read_entries().await?);
        self.cache = Some(EntryCache {
            version,
            read_at: tokio::time::Instant::now(),
            entries: entries.clone(),
        });
        Ok(entries)
    }

    async fn read_entries(&mut self) -> Result<Vec<(ScheduleEntry, bool)>, BeatError> {
        let mut all: BTreeMap<String, (ScheduleEntry, bool)> = self
            .beat
            .beat_schedule
            .iter()
            .map(|e| (e.name.clone(), (e.clone(), false)))
            .collect();
        for stored in self.store.list().await? {
            match stored {
                Ok(entry) if all.contains_key(&entry.name) => {
                    if self.reported.insert(format!("shadowed {}", entry.name)) {
                        tracing::warn!(
                            entry = %entry.name,
                            "a Redis schedule entry has the name of a settings entry; the settings one is used"
                        );
                    }
                }
                Ok(entry) => {
                    all.insert(entry.name.clone(), (entry, true));
                }
                Err(e) => {
                    if self.reported.insert(e.to_string()) {
                        tracing::error!(error = %e, "skipping a bad schedule entry in Redis");
                    }
                }
            }
        }
        Ok(all.into_values().collect())
    }

    /// Claims the due ticks; those to publish now.
    async fn claim<'a>(&mut self, token: &str, due: &[Due<'a>]) -> Result<Vec<Due<'a>>, BeatError> {
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(CLAIM)
            .arg(due.len() + 2)
            .arg(self.keys.leader())
            .arg(self.keys.entries());
        for d in due {
            cmd.arg(self.keys.tick(&d.entry.name));
        }
        cmd.arg(token).arg(due.len());
        for d in due {
            cmd.arg(d.tick)
                .arg(d.entry.every_ms())
                .arg(if d.dynamic { "1" } else { "0" })
                .arg(&d.entry.name);
        }
        let mut conn = self.conn.clone();
        let answer: Vec<String> = cmd.query_async(&mut conn).await?;
        if answer.first().map(String::as_str) != Some("ok") {
            tracing::warn!("tick claim refused: this beat no longer holds the lease");
            self.known.clear();
            return Ok(Vec::new());
        }
        let mut to_publish = Vec::new();
        let mut idle = Vec::new();
        let now_ms = unix_ms();
        for (d, parts) in due.iter().zip(answer[1..].chunks(3)) {
            let [code, prev, prev_state] = parts else {
                continue;
            };
            let name = &d.entry.name;
            let every = d.entry.every_ms();
            let prev_tick: Option<u64> = prev.parse().ok();
            match code.as_str() {
                "start" => {
                    self.known.insert(name.clone(), (every, d.tick));
                    // A crontab's next match is looked for a day ahead at most (cheap).
                    let first =
                        (d.tick + 1..=d.tick + 1440).find(|&t| d.entry.is_due_tick(t, self.tz));
                    tracing::info!(
                        entry = %name,
                        schedule = %d.entry.describe(),
                        first_due = ?first.map(|t| due_time(t, every)),
                        "schedule entry starts"
                    );
                }
                "done" => {
                    let t = prev_tick.unwrap_or(d.tick);
                    self.known.insert(name.clone(), (every, t));
                }
                "gone" => {
                    self.known.remove(name);
                }
                _ => {
                    self.known.insert(name.clone(), (every, d.tick));
                    let prev = prev_tick.unwrap_or(d.tick.saturating_sub(1));
                    // The claim covers every tick after the previous one; those still inside
                    // the catch-up window (a failover's length) are published late rather
                    // than lost, older ones are reported as missed.
                    let oldest = now_ms
                        .saturating_sub(self.catch_up().as_millis() as u64)
                        .div_ceil(every);
                    let first = (prev + 1).max(oldest).min(d.tick);
                    report_gap(&self.metrics, self.tz, d.entry, prev, prev_state, first);
                    let before = to_publish.len();
                    for tick in (first..=d.tick).filter(|&t| d.entry.is_due_tick(t, self.tz)) {
                        to_publish.push(Due {
                            entry: d.entry,
                            tick,
                            claimed: d.tick,
                            dynamic: d.dynamic,
                        });
                    }
                    if to_publish.len() == before {
                        // A crontab minute that does not match: nothing to send, done.
                        idle.push((name.as_str(), d.tick));
                    }
                }
            }
        }
        if !idle.is_empty() {
            self.mark(token, "not-due", &idle).await?;
        }
        Ok(to_publish)
    }

    /// Publishes claimed ticks, one confirmed batch per queue, and marks them sent.
    async fn publish(&self, token: &str, claimed: Vec<Due<'_>>) {
        let mut by_queue: BTreeMap<String, Vec<(TaskMessage, &Due)>> = BTreeMap::new();
        for d in &claimed {
            let msg = self.message(d);
            by_queue.entry(d.entry.queue()).or_default().push((msg, d));
        }
        for (queue, batch) in by_queue {
            let msgs: Vec<TaskMessage> = batch.iter().map(|(m, _)| m.clone()).collect();
            match self.client.publish_batch(&queue, &msgs).await {
                Ok(()) => {
                    self.metrics.published.inc_by(batch.len() as u64);
                    for (m, d) in &batch {
                        tracing::info!(
                            entry = %d.entry.name,
                            task = %d.entry.task,
                            queue = %queue,
                            id = %m.id,
                            due = %due_time(d.tick, d.entry.every_ms()),
                            "published"
                        );
                    }
                    let sent: Vec<(&str, u64)> = batch
                        .iter()
                        .map(|(_, d)| (d.entry.name.as_str(), d.claimed))
                        .collect();
                    if let Err(e) = self.mark(token, "sent", &sent).await {
                        tracing::warn!(error = %e, "could not record published ticks");
                    }
                }
                Err(e) => {
                    self.metrics.missed(Miss::PublishFailed, batch.len() as u64);
                    for (_, d) in &batch {
                        tracing::error!(
                            entry = %d.entry.name,
                            queue = %queue,
                            due = %due_time(d.tick, d.entry.every_ms()),
                            error = %e,
                            "publish failed: this tick is lost (claimed ticks are never sent twice)"
                        );
                    }
                }
            }
        }
    }

    /// How far back a new claim still publishes missed ticks: the longest a failover takes
    /// (the lease running out, then the next acquisition attempt and entry refresh).
    fn catch_up(&self) -> Duration {
        self.lease.ttl() + REFRESH
    }

    fn message(&self, d: &Due) -> TaskMessage {
        let every = d.entry.every_ms();
        let due_ms = d.tick * every;
        let opts = SendOptions {
            task_id: Some(tick_task_id(self.keys.prefix(), &d.entry.name, due_ms)),
            ..Default::default()
        };
        let mut msg = build_message(&d.entry.task, d.entry.kwargs.clone(), &opts);
        let due = due_time(d.tick, every);
        msg.expires = d
            .entry
            .expires
            .and_then(|e| chrono::Duration::from_std(e).ok())
            .map(|e| due + e);
        msg.extra_headers
            .insert("beat_entry".into(), Value::String(d.entry.name.clone()));
        msg.extra_headers.insert(
            "beat_due".into(),
            Value::String(due.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)),
        );
        msg
    }

    /// Records `state` for `(entry, tick)` claims; one whose record moved on since is left alone.
    async fn mark(
        &self,
        token: &str,
        state: &str,
        sent: &[(&str, u64)],
    ) -> Result<(), redis::RedisError> {
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(MARK).arg(sent.len());
        for (name, _) in sent {
            cmd.arg(self.keys.tick(name));
        }
        cmd.arg(token).arg(state);
        for (_, tick) in sent {
            cmd.arg(*tick);
        }
        let mut conn = self.conn.clone();
        cmd.query_async::<i64>(&mut conn).await.map(drop)
    }
}

/// When tick `tick` of a grid of `every_ms` is due.
pub fn due_time(tick: u64, every_ms: u64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(tick.saturating_mul(every_ms) as i64).unwrap_or_default()
}

/// Logs what a new claim shows about the ticks before it; `first` is the first it publishes.
fn report_gap(
    metrics: &BeatMetrics,
    tz: chrono_tz::Tz,
    entry: &ScheduleEntry,
    prev: u64,
    prev_state: &str,
    first: u64,
) {
    let (name, every) = (&entry.name, entry.every_ms());
    if prev_state == "claimed" && entry.is_due_tick(prev, tz) {
        metrics.missed(Miss::Unconfirmed, 1);
        tracing::warn!(
            entry = %name,
            due = %due_time(prev, every),
            "a beat claimed this tick but never confirmed its publish (it stopped or lost the \
             broker in between): the tick was probably not sent"
        );
    }
    let missed = match entry.crontab {
        None => first.saturating_sub(prev + 1),
        Some(_) => (prev + 1..first)
            .filter(|&t| entry.is_due_tick(t, tz))
            .count() as u64,
    };
    if missed > 0 {
        metrics.missed(Miss::NoLeader, missed);
        tracing::warn!(
            entry = %name,
            missed,
            from = %due_time(prev + 1, every),
            "ticks were missed while no beat was leading (older than the catch-up window)"
        );
    }
}

/// When the scheduler entered the step it is in, if it is in one. The lease keeper renews only
/// while the scheduler makes progress: a leader stuck in a step longer than the lease TTL
/// (a publish waiting on a broker that stopped answering) hands the lease on instead of
/// keeping it with no ticks going out.
#[derive(Clone, Default)]
struct Busy(Arc<Mutex<Option<tokio::time::Instant>>>);

impl Busy {
    fn start(&self) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(tokio::time::Instant::now());
    }

    fn end(&self) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// How long the current step has taken so far.
    fn stuck_for(&self) -> Duration {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .map(|since| since.elapsed())
            .unwrap_or_default()
    }
}

/// Holds the lease while it can: acquires it when free, renews it every third of its TTL
/// while the scheduler makes progress, publishes the current token (or `None`) to the
/// scheduler, and releases it when stopped.
async fn keep_lease(
    lease: Lease,
    tx: watch::Sender<Option<String>>,
    busy: Busy,
    metrics: BeatMetrics,
    stop: CancellationToken,
) {
    let period = lease.ttl() / 3;
    let mut token: Option<String> = None;
    let mut renewed_at = tokio::time::Instant::now();
    loop {
        match &token {
            // A scheduler still stuck does not take the lease back.
            None if busy.stuck_for() >= lease.ttl() => {}
            None => match lease.acquire().await {
                Ok(Some(t)) => {
                    tracing::info!(token = %t, "this beat is the leader now");
                    metrics.lease_acquisitions.inc();
                    metrics.leader.set(1);
                    renewed_at = tokio::time::Instant::now();
                    token = Some(t);
                    tx.send_replace(token.clone());
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(error = %e, "cannot reach Redis for the beat lease"),
            },
            Some(t) if busy.stuck_for() >= lease.ttl() => {
                tracing::warn!(
                    stuck_s = busy.stuck_for().as_secs_f64(),
                    "the scheduler is stuck in a step (broker or Redis not answering); \
                     handing the lease to another beat"
                );
                if let Err(e) = lease.release(t).await {
                    tracing::warn!(error = %e, "could not release the beat lease; it expires by itself");
                }
                token = None;
                metrics.leader.set(0);
                tx.send_replace(None);
            }
            Some(t) => {
                let lost = match lease.renew(t).await {
                    Ok(true) => {
                        renewed_at = tokio::time::Instant::now();
                        false
                    }
                    Ok(false) => true,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot renew the beat lease");
                        renewed_at.elapsed() >= lease.ttl()
                    }
                };
                if lost {
                    tracing::warn!(token = %t, "lost the beat lease; another beat leads now");
                    metrics.leader.set(0);
                    token = None;
                    tx.send_replace(None);
                }
            }
        }
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(period) => {}
        }
    }
    tx.send_replace(None);
    metrics.leader.set(0);
    if let Some(t) = token {
        match lease.release(&t).await {
            Ok(()) => tracing::info!("released the beat lease"),
            Err(e) => {
                tracing::warn!(error = %e, "could not release the beat lease; it expires by itself")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tick_ids_are_stable_and_distinct() {
        let a = tick_task_id("p", "room", 20_000);
        assert_eq!(a, tick_task_id("p", "room", 20_000));
        assert_ne!(a, tick_task_id("p", "room", 40_000));
        assert_ne!(a, tick_task_id("p", "room2", 20_000));
        assert_ne!(a, tick_task_id("q", "room", 20_000));
        assert_eq!(uuid::Uuid::parse_str(&a).unwrap().get_version_num(), 5);
    }

    #[test]
    fn due_times_sit_on_the_grid() {
        assert_eq!(
            due_time(3, 20_000).to_rfc3339(),
            "1970-01-01T00:01:00+00:00"
        );
    }
}

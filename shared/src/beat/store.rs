//! Beat's Redis keys, and the dynamic entries kept there (`mediafarm schedule add/list/remove`).
//! Every key starts with `beat_key_prefix`, so separate farms (or tests) can share one Redis.
//!
//! - `<prefix>:entries`: hash, entry name → entry JSON
//! - `<prefix>:version`: counter, raised by every add and remove, so beats re-read the entries
//!   only when they changed
//! - `<prefix>:leader`: the leader lease, `"<epoch>:<node>"`, with a TTL
//! - `<prefix>:leader-schedule`: the leader's schedule fingerprint (`beat::fingerprint`),
//!   written and expiring with the lease
//! - `<prefix>:epoch`: counter; each lease acquisition takes the next number (fencing token)
//! - `<prefix>:tick:<name>`: hash `tick`, `every_ms`, `state`, `by`: the last tick claimed

use redis::aio::ConnectionManager;

use crate::schedule::{parse_entry, EntryError, ScheduleEntry};

/// The names of beat's Redis keys under one prefix.
#[derive(Debug, Clone)]
pub struct BeatKeys {
    prefix: String,
}

impl BeatKeys {
    pub fn new(prefix: &str) -> BeatKeys {
        BeatKeys {
            prefix: prefix.to_owned(),
        }
    }

    pub fn entries(&self) -> String {
        format!("{}:entries", self.prefix)
    }

    pub fn version(&self) -> String {
        format!("{}:version", self.prefix)
    }

    pub fn leader(&self) -> String {
        format!("{}:leader", self.prefix)
    }

    pub fn leader_schedule(&self) -> String {
        format!("{}:leader-schedule", self.prefix)
    }

    pub fn epoch(&self) -> String {
        format!("{}:epoch", self.prefix)
    }

    pub fn tick(&self, entry: &str) -> String {
        format!("{}:tick:{entry}", self.prefix)
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }
}

/// Adds an entry and starts its grid at the current tick: the first one published is the
/// next grid point, not a catch-up of the past (also when an entry is replaced). A replaced
/// entry on the same period keeps a later tick already claimed, so a clock behind the beats'
/// cannot make a tick due again.
const ADD: &str = r#"
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
local cur = redis.call('HMGET', KEYS[2], 'tick', 'every_ms')
local tick = tonumber(ARGV[3])
if cur[1] and cur[2] == ARGV[4] and tonumber(cur[1]) > tick then tick = tonumber(cur[1]) end
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[2], 'tick', tick, 'every_ms', ARGV[4], 'state', 'start', 'by', 'schedule add')
redis.call('INCR', KEYS[3])
return 1
"#;

const REMOVE: &str = r#"
local n = redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('DEL', KEYS[2])
redis.call('INCR', KEYS[3])
return n
"#;

/// The dynamic entries in Redis.
#[derive(Clone)]
pub struct ScheduleStore {
    conn: ConnectionManager,
    keys: BeatKeys,
}

impl ScheduleStore {
    pub fn new(conn: ConnectionManager, keys: BeatKeys) -> ScheduleStore {
        ScheduleStore { conn, keys }
    }

    /// Adds or replaces `entry`; beats pick it up at their next tick.
    pub async fn add(&self, entry: &ScheduleEntry) -> Result<(), redis::RedisError> {
        let now_ms = unix_ms();
        let every = entry.every_ms();
        let mut conn = self.conn.clone();
        redis::cmd("EVAL")
            .arg(ADD)
            .arg(3)
            .arg(self.keys.entries())
            .arg(self.keys.tick(&entry.name))
            .arg(self.keys.version())
            .arg(&entry.name)
            .arg(entry.to_json().to_string())
            .arg(now_ms / every)
            .arg(every)
            .query_async::<()>(&mut conn)
            .await
    }

    /// Removes an entry; `false` when there was none by that name. No tick of it is claimed
    /// after this returns (a claim checks that the entry still exists).
    pub async fn remove(&self, name: &str) -> Result<bool, redis::RedisError> {
        let mut conn = self.conn.clone();
        let n: i64 = redis::cmd("EVAL")
            .arg(REMOVE)
            .arg(3)
            .arg(self.keys.entries())
            .arg(self.keys.tick(name))
            .arg(self.keys.version())
            .arg(name)
            .query_async(&mut conn)
            .await?;
        Ok(n == 1)
    }

    /// The last tick claimed for an entry: (tick, every_ms, state), if any.
    pub async fn last_tick(
        &self,
        name: &str,
    ) -> Result<Option<(u64, u64, String)>, redis::RedisError> {
        let mut conn = self.conn.clone();
        let (tick, every, state): (Option<u64>, Option<u64>, Option<String>) = redis::cmd("HMGET")
            .arg(self.keys.tick(name))
            .arg("tick")
            .arg("every_ms")
            .arg("state")
            .query_async(&mut conn)
            .await?;
        Ok(match (tick, every) {
            (Some(t), Some(e)) => Some((t, e, state.unwrap_or_default())),
            _ => None,
        })
    }

    /// The entries' version: it changes whenever `add` or `remove` runs.
    pub async fn version(&self) -> Result<u64, redis::RedisError> {
        let mut conn = self.conn.clone();
        let v: Option<u64> = redis::cmd("GET")
            .arg(self.keys.version())
            .query_async(&mut conn)
            .await?;
        Ok(v.unwrap_or(0))
    }

    /// Every stored entry, by name; one that does not parse is returned as its error (so a
    /// bad entry written by hand is reported, not silently skipped).
    pub async fn list(&self) -> Result<Vec<Result<ScheduleEntry, EntryError>>, redis::RedisError> {
        let mut conn = self.conn.clone();
        let raw: Vec<(String, String)> = redis::cmd("HGETALL")
            .arg(self.keys.entries())
            .query_async(&mut conn)
            .await?;
        let mut entries: Vec<_> = raw
            .into_iter()
            .map(|(name, text)| match serde_json::from_str(&text) {
                Ok(v) => parse_entry(&name, &v),
                Err(e) => Err(EntryError {
                    entry: name,
                    field: "(stored JSON)".into(),
                    value: format!("{text:?}"),
                    accepted: format!("a JSON object ({e})"),
                }),
            })
            .collect();
        entries.sort_by(|a, b| entry_name(a).cmp(entry_name(b)));
        Ok(entries)
    }
}

fn entry_name(e: &Result<ScheduleEntry, EntryError>) -> &str {
    match e {
        Ok(e) => &e.name,
        Err(e) => &e.entry,
    }
}

/// Milliseconds since the Unix epoch by this machine's clock (beat hosts must keep NTP time).
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

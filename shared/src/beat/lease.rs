//! The beat leader lease in Redis. One beat at a time holds `<prefix>:leader` (SET NX PX);
//! each acquisition takes the next number of `<prefix>:epoch`, and the lease's value
//! `"<epoch>:<node>"` is the fencing token: tick claims succeed only while Redis still holds
//! exactly this token, so a leader that was paused past its lease cannot claim anything after
//! another beat took over. Renewal and release are check-and-act Lua scripts for the same
//! reason. Beside the lease, with the same expiry, the leader keeps its schedule's
//! fingerprint (`<prefix>:leader-schedule`), which a starting beat compares with its own
//! (`Lease::holder`).

use std::time::Duration;

use redis::aio::ConnectionManager;

use crate::beat::store::BeatKeys;

const ACQUIRE: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 1 then return false end
local epoch = redis.call('INCR', KEYS[2])
local token = epoch .. ':' .. ARGV[1]
redis.call('SET', KEYS[1], token, 'PX', ARGV[2])
redis.call('SET', KEYS[3], ARGV[3], 'PX', ARGV[2])
return token
"#;

const RENEW: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[2], ARGV[3], 'PX', ARGV[2])
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"#;

const RELEASE: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[2])
  return redis.call('DEL', KEYS[1])
end
return 0
"#;

/// Who holds the lease now, and the fingerprint of the schedule it runs.
#[derive(Debug, Clone, PartialEq)]
pub struct Holder {
    /// The lease's value, `"<epoch>:<node>"`.
    pub token: String,
    /// `None` when the holder records none (a beat older than the fingerprint).
    pub fingerprint: Option<String>,
}

/// One beat process's side of the lease.
#[derive(Clone)]
pub struct Lease {
    conn: ConnectionManager,
    keys: BeatKeys,
    node: String,
    ttl: Duration,
    /// This beat's schedule fingerprint, recorded beside the lease while it leads.
    fingerprint: String,
}

impl Lease {
    /// `node` names this process in the token (`host:pid:random`); `fingerprint` is its
    /// schedule's (`beat::fingerprint`).
    pub fn new(
        conn: ConnectionManager,
        keys: BeatKeys,
        node: String,
        ttl: Duration,
        fingerprint: String,
    ) -> Lease {
        Lease {
            conn,
            keys,
            node,
            ttl,
            fingerprint,
        }
    }

    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// The current holder of the lease, if any (one read of both keys).
    pub async fn holder(&self) -> Result<Option<Holder>, redis::RedisError> {
        let mut conn = self.conn.clone();
        let (token, fingerprint): (Option<String>, Option<String>) = redis::cmd("MGET")
            .arg(self.keys.leader())
            .arg(self.keys.leader_schedule())
            .query_async(&mut conn)
            .await?;
        Ok(token.map(|token| Holder { token, fingerprint }))
    }

    fn ttl_ms(&self) -> u64 {
        self.ttl.as_millis().max(1) as u64
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Takes the lease if nobody holds it; the new fencing token, or `None`.
    pub async fn acquire(&self) -> Result<Option<String>, redis::RedisError> {
        let mut conn = self.conn.clone();
        redis::cmd("EVAL")
            .arg(ACQUIRE)
            .arg(3)
            .arg(self.keys.leader())
            .arg(self.keys.epoch())
            .arg(self.keys.leader_schedule())
            .arg(&self.node)
            .arg(self.ttl_ms())
            .arg(&self.fingerprint)
            .query_async(&mut conn)
            .await
    }

    /// Extends the lease while `token` still holds it; `false` when it was lost.
    pub async fn renew(&self, token: &str) -> Result<bool, redis::RedisError> {
        let mut conn = self.conn.clone();
        let n: i64 = redis::cmd("EVAL")
            .arg(RENEW)
            .arg(2)
            .arg(self.keys.leader())
            .arg(self.keys.leader_schedule())
            .arg(token)
            .arg(self.ttl_ms())
            .arg(&self.fingerprint)
            .query_async(&mut conn)
            .await?;
        Ok(n == 1)
    }

    /// Gives the lease up (if `token` still holds it), so another beat takes over at once.
    pub async fn release(&self, token: &str) -> Result<(), redis::RedisError> {
        let mut conn = self.conn.clone();
        redis::cmd("EVAL")
            .arg(RELEASE)
            .arg(2)
            .arg(self.keys.leader())
            .arg(self.keys.leader_schedule())
            .arg(token)
            .query_async::<i64>(&mut conn)
            .await?;
        Ok(())
    }
}

/// This process's node name in lease tokens: `host:pid:random`.
pub fn node_name() -> String {
    format!(
        "{}:{}:{}",
        crate::hostname(),
        std::process::id(),
        &uuid::Uuid::new_v4().simple().to_string()[..6]
    )
}

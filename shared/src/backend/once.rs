//! Once-only side effects across redeliveries. A job that sends an email or charges a card
//! claims a key in Redis before the effect and marks it done after, so a redelivered copy
//! (its worker died before the ack, a replayed dead letter) finds the claim and does not
//! repeat the effect. A claim is a lease: if its holder dies mid-effect the lease runs out and
//! a later attempt may claim again (at-least-once, never twice at the same time).

use std::time::Duration;

use redis::aio::ConnectionManager;
use serde_json::{json, Value};

use crate::backend::{BackendError, ResultBackend};

pub const KEY_PREFIX: &str = "mediafarm-once-";

/// How long a finished claim is remembered.
const DONE_TTL: Duration = Duration::from_secs(7 * 86_400);

/// What claiming a key found.
#[derive(Debug)]
pub enum Claim {
    /// Nobody has done it: do the effect, then `complete` the guard.
    Run(OnceGuard),
    /// It was done before; this is what `complete` recorded then.
    Done(Value),
    /// Another attempt holds the lease right now; try again later (a transient failure).
    Busy { retry_in: Duration },
}

/// The lease on a claimed key.
#[derive(Debug)]
pub struct OnceGuard {
    conn: ConnectionManager,
    key: String,
    token: String,
}

/// Claims `key` for `lease`.
pub async fn claim(
    backend: &ResultBackend,
    key: &str,
    lease: Duration,
) -> Result<Claim, BackendError> {
    let mut conn = backend.connection();
    let key = format!("{KEY_PREFIX}{key}");
    let token = uuid::Uuid::new_v4().simple().to_string();
    let running = json!({"state": "running", "token": token}).to_string();
    let lease_ms = lease.as_millis().clamp(1, u64::MAX as u128) as u64;
    let set: Option<String> = redis::cmd("SET")
        .arg(&key)
        .arg(&running)
        .arg("NX")
        .arg("PX")
        .arg(lease_ms)
        .query_async(&mut conn)
        .await?;
    if set.is_some() {
        return Ok(Claim::Run(OnceGuard { conn, key, token }));
    }
    let (current, ttl_ms): (Option<String>, i64) = redis::pipe()
        .cmd("GET")
        .arg(&key)
        .cmd("PTTL")
        .arg(&key)
        .query_async(&mut conn)
        .await?;
    let record: Value = current
        .as_deref()
        .and_then(|s| serde_json::from_str(s).ok())
        .unwrap_or(Value::Null);
    if record["state"] == "done" {
        return Ok(Claim::Done(record["output"].clone()));
    }
    // The key vanished between SET and GET (lease ran out): tell the caller to come back soon.
    let retry_in = Duration::from_millis(ttl_ms.clamp(100, 60_000) as u64);
    Ok(Claim::Busy { retry_in })
}

/// Replaces the value only while it still holds this claim's token.
const COMPLETE: &str = r#"
local cur = redis.call('GET', KEYS[1])
if cur and string.find(cur, ARGV[1], 1, true) then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return 1
end
return 0
"#;

const RELEASE: &str = r#"
local cur = redis.call('GET', KEYS[1])
if cur and string.find(cur, ARGV[1], 1, true) then
  return redis.call('DEL', KEYS[1])
end
return 0
"#;

impl OnceGuard {
    /// Records that the effect happened, with what a repeat should return instead.
    /// `false` means the lease had run out and another attempt may have claimed the key.
    pub async fn complete(mut self, output: &Value) -> Result<bool, BackendError> {
        let done = json!({"state": "done", "output": output}).to_string();
        let n: i64 = redis::cmd("EVAL")
            .arg(COMPLETE)
            .arg(1)
            .arg(&self.key)
            .arg(&self.token)
            .arg(done)
            .arg(DONE_TTL.as_millis() as u64)
            .query_async(&mut self.conn)
            .await?;
        Ok(n == 1)
    }

    /// Gives the claim up (the effect did not happen), so a retry may claim it at once.
    pub async fn release(mut self) -> Result<(), BackendError> {
        let _: i64 = redis::cmd("EVAL")
            .arg(RELEASE)
            .arg(1)
            .arg(&self.key)
            .arg(&self.token)
            .query_async(&mut self.conn)
            .await?;
        Ok(())
    }
}

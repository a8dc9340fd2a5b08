//! A cluster-wide rate limit per provider: a token bucket in Redis, updated atomically by a
//! Lua script with Redis's own clock, so every worker on every machine draws from one bucket.

use std::time::Duration;

use mediafarm::settings::RateLimit;
use mediafarm::{TaskContext, TaskError};

/// Longest wait served inside the job; a longer one goes back through the broker.
const MAX_IN_JOB_WAIT: Duration = Duration::from_secs(2);

/// Refills `capacity` tokens per `period_ms`; takes one if there is one. Returns 0 when a token
/// was taken, else the milliseconds until one will be there.
const TAKE: &str = r#"
local capacity = tonumber(ARGV[1])
local period = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(state[1]) or capacity
local at = tonumber(state[2]) or now
if now > at then
  tokens = math.min(capacity, tokens + (now - at) * capacity / period)
end
local wait = 0
if tokens >= 1 then
  tokens = tokens - 1
else
  wait = math.ceil((1 - tokens) * period / capacity)
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', tostring(now))
redis.call('PEXPIRE', KEYS[1], period * 2)
return wait
"#;

/// The Redis key of a provider's bucket.
pub fn bucket_key(provider: &str) -> String {
    format!("mediafarm-rate-notify-{provider}")
}

/// Takes one token from the bucket at `key` if there is one: 0, else the milliseconds until
/// there will be one.
pub async fn take<C: redis::aio::ConnectionLike>(
    conn: &mut C,
    key: &str,
    limit: RateLimit,
) -> Result<u64, redis::RedisError> {
    let period_ms = limit.per.as_millis().max(1) as u64;
    redis::cmd("EVAL")
        .arg(TAKE)
        .arg(1)
        .arg(key)
        .arg(limit.count)
        .arg(period_ms)
        .query_async(conn)
        .await
}

/// Takes one token from `provider`'s bucket, waiting briefly when the bucket is about to
/// refill; a longer wait becomes a transient `RateLimited` retried after that wait.
pub async fn acquire(
    ctx: &TaskContext,
    provider: &str,
    limit: Option<RateLimit>,
) -> Result<(), TaskError> {
    let Some(limit) = limit else { return Ok(()) };
    loop {
        let mut conn = ctx.backend().connection();
        let wait_ms = take(&mut conn, &bucket_key(provider), limit)
            .await
            .map_err(|e| TaskError::transient("BackendError", format!("rate limit: {e}")))?;
        if wait_ms == 0 {
            return Ok(());
        }
        let wait = Duration::from_millis(wait_ms);
        if wait > MAX_IN_JOB_WAIT {
            return Err(TaskError::transient(
                "RateLimited",
                format!(
                    "{provider} is limited to {} per {} s cluster-wide; next slot in {:.1} s",
                    limit.count,
                    limit.per.as_secs_f64(),
                    wait.as_secs_f64()
                ),
            )
            .retry_after(wait));
        }
        tokio::time::sleep(wait).await;
    }
}

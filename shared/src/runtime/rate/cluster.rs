//! The cluster-wide variant of a task's bucket (`task_rate_limit_scope = "cluster"`, beyond
//! Celery, whose limits are per worker): one bucket per task in Redis, shared by every worker
//! that uses the same result backend, so N workers together start at most the task's rate.
//! The bucket is one key holding when the last job was let through, by Redis's own clock, read
//! and set atomically by a Lua script; a worker takes its turn there only for the first of its
//! own waiting jobs (the rest wait in order behind it, as in the per-worker bucket).

use std::time::Duration;

use crate::backend::ResultBackend;

/// Lets a job through when one interval has passed since the last one (by Redis's clock):
/// returns 0 and records now; else the milliseconds left and records nothing. The key expires
/// one interval after the last start, when the bucket is full again (capacity 1).
const TAKE: &str = r#"
local interval = tonumber(ARGV[1])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local last = tonumber(redis.call('GET', KEYS[1]))
if last and now < last + interval then
  return last + interval - now
end
redis.call('SET', KEYS[1], now, 'PX', interval)
return 0
"#;

/// Longest a Redis round trip may take before the worker falls back to its own bucket.
const REDIS_TIMEOUT: Duration = Duration::from_secs(2);

/// Why the shared bucket could not be asked.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("Redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("Redis did not answer within {REDIS_TIMEOUT:?}")]
    Timeout,
}

/// One task's bucket in Redis.
pub struct SharedBucket {
    backend: ResultBackend,
    key: String,
}

impl SharedBucket {
    pub fn new(backend: ResultBackend, task: &str) -> SharedBucket {
        SharedBucket {
            backend,
            key: bucket_key(task),
        }
    }

    /// Takes the turn if it is there (`Duration::ZERO`), else says how long until it is.
    pub async fn take(&self, interval: Duration) -> Result<Duration, ClusterError> {
        let interval_ms = u64::try_from(interval.as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        let mut conn = self.backend.connection();
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(TAKE).arg(1).arg(&self.key).arg(interval_ms);
        let wait_ms = tokio::time::timeout(REDIS_TIMEOUT, cmd.query_async::<u64>(&mut conn))
            .await
            .map_err(|_| ClusterError::Timeout)??;
        Ok(Duration::from_millis(wait_ms))
    }
}

/// The Redis key of `task`'s cluster-wide bucket.
pub fn bucket_key(task: &str) -> String {
    format!("mediafarm-rate-{task}")
}

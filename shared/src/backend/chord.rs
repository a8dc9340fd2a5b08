//! Celery's Redis-backend chord join, the keys and commands only, as Celery 5.7's
//! `celery/backends/redis.py` reads and writes them, so Python and Rust workers sharing a
//! chord join it exactly once. Under `celery-taskset-meta-<group>`:
//!
//! - `.j`: the header results, a sorted set of `[1, id, state, result]` scored by `group_index`
//!   (a list in the order the header tasks ended with `result_chord_ordered = false`, as
//!   Celery's `result_backend_transport_options` allow);
//! - `.d`: the set of `<task id>:<group_index>` already counted, so a header task that runs
//!   again (redelivered) counts once even if it returned something else the second time;
//! - `.t`: tasks added to the chord after it was sent (`add_to_chord`); `.s`: the header's size,
//!   set by the producer (`set_chord_size`, which also deletes `.c`);
//! - `.c`: the body's dispatch claim. The header whose return completes the count takes it
//!   (SET NX with a random token and a lease) in the same script that counts; it extends the
//!   lease before sending the body and, once sent, deletes `.j`, `.t`, `.s` and `.d` and sets
//!   `.c` to `done` (for [`DONE_SECS`] by default: [`ChordTimes`]), so late copies of a header are ignored instead of
//!   starting the chord again. A header that completes the count while another worker holds the
//!   claim sends nothing.
//!
//! Each step is one Lua script, as Celery's (`CHORD_PART_RETURN_LUA`, `CHORD_CLAIM_EXTEND_LUA`,
//! `CHORD_CLEANUP_LUA`). Two additions of mediafarm's own speak the same keys: a worker that
//! claimed the dispatch but could not carry it out gives the claim back ([`release`]) before its
//! header's message returns to the broker, so the redelivered header can claim it again; and a
//! header that completed the count without the claim can wait for the claim to end
//! ([`take_over`]), taking it when it expired with the chord unfinished (its holder died).
//!
//! A chord a worker sends is also marked `.started` when its size is set, so a job run again
//! after its chord finished does not start the same chord a second time. Deciding what the
//! counts mean is `canvas::chord`'s job; this module only speaks Redis.
//!
//! [`release`]: ResultBackend::chord_release
//! [`take_over`]: ResultBackend::chord_take_over

use std::time::Duration;

use redis::AsyncCommands;

use crate::backend::{BackendError, ResultBackend};

/// Celery's `group_keyprefix`: `GroupResult.save()` and the chord counters live under it.
pub const GROUP_PREFIX: &str = "celery-taskset-meta-";

/// How long a chord's `.started` mark is kept when results never expire (`result_expires = 0`).
const STARTED_DEFAULT_SECS: u64 = 86_400;

/// `celery-taskset-meta-<group><suffix>`, as Celery's `get_key_for_group` builds it.
pub fn group_key(group: &str, suffix: &str) -> String {
    format!("{GROUP_PREFIX}{group}{suffix}")
}

/// How long the dispatch claim of a header that completed the count lasts while it reads the
/// results, with Celery's default `result_chord_join_timeout` (3 s, doubled, at least 5 s).
pub const CLAIM_SECS: u64 = 6;

/// How long the claim lasts once extended to send the body (mediafarm's publish waits for the
/// broker's confirm; Celery's estimate for its publish retries with default settings is 21 s),
/// or the claim itself if longer.
pub const PUBLISH_CLAIM_SECS: u64 = 30;

/// How long `.c` says `done` after the body was sent, with Celery's defaults (twice the claim,
/// at least 300 s): a copy of a header arriving later is ignored.
pub const DONE_SECS: u64 = 300;

/// A chord's expiries and leases, as Celery 5.7's Redis backend derives them from its settings
/// (`on_chord_part_return`, `chord_expires`, `_chord_result_expires`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChordTimes {
    /// The counters' expiry, renewed at each header's return (`None`: kept for ever).
    pub expires: Option<u64>,
    /// The group record's expiry: the longer of the counters' and the results' (`None`: for
    /// ever, when either is).
    pub group_expires: Option<u64>,
    /// The dispatch claim's lease while the results are read, and when taken over.
    pub claim_secs: u64,
    /// How long `.c` says `done` after the body was sent.
    pub done_secs: u64,
}

impl ChordTimes {
    /// From `result_chord_join_timeout` (0: Celery's `None`, counted as 5 s),
    /// `result_chord_expires` (`None`: as results; zero: for ever) and the results' expiry.
    pub fn celery(
        join_timeout: Duration,
        chord_expires: Option<Duration>,
        result_expires: Option<u64>,
    ) -> ChordTimes {
        let join = if join_timeout.is_zero() {
            5.0
        } else {
            join_timeout.as_secs_f64()
        };
        // Python's int(): towards zero.
        let claim_secs = ((join * 2.0) as u64).max(5);
        let expires = match chord_expires {
            None => result_expires,
            Some(d) => Some(d.as_secs()).filter(|s| *s > 0),
        };
        ChordTimes {
            expires,
            group_expires: expires.zip(result_expires).map(|(c, r)| c.max(r)),
            claim_secs,
            done_secs: (claim_secs * 2).max(300),
        }
    }

    /// Celery's defaults with results kept for `result_expires` seconds.
    pub fn with_result_expires(result_expires: Option<u64>) -> ChordTimes {
        ChordTimes::celery(Duration::from_secs(3), None, result_expires)
    }

    pub fn from_settings(settings: &crate::settings::Settings) -> ChordTimes {
        ChordTimes::celery(
            settings.result_chord_join_timeout,
            settings.result_chord_expires,
            settings.result_expires_secs(),
        )
    }
}

/// What one header task's return saw, atomically with adding itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PartReturn {
    /// The chord's body was already sent (`.c` is `done`): nothing was added.
    Done,
    Counted(PartCount),
}

/// The counters after a header task's return was added.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartCount {
    /// Members of the `.j` set after adding this one.
    pub ready: u64,
    /// The `.t` difference (tasks added to the chord after it was sent); 0 when absent.
    pub diff: i64,
    /// The `.s` size; `None` when the producer never set one (or it expired).
    pub size: Option<i64>,
    /// This return completed the count and took the dispatch claim with the caller's token.
    pub claimed: bool,
}

/// What [`ResultBackend::chord_take_over`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TakeOver {
    /// The body was sent (`.c` is `done`), or the chord ended without one (its size is gone).
    Finished,
    /// The claim had ended with the chord unfinished; the caller's token holds it now.
    Claimed,
    /// Another worker holds the claim for this much longer.
    Held(Duration),
}

/// Adds a header's return unless `<id>:<index>` was counted, reads the counters, renews their
/// expiry and, when the count is complete, takes the dispatch claim. KEYS: `.j .t .s .d`, the
/// group record, `.c`. ARGV: task id, member, score, expiry, group record expiry, claim lease,
/// token, `1` when `.j` is ordered (a sorted set) or `0` (a list). Returns
/// `{ready, diff, size, claimed}`, ready -1 when the chord is done.
const PART_RETURN: &str = r#"
if redis.call('GET', KEYS[6]) == 'done' then
  return {-1, false, false, 0}
end
local ordered = ARGV[8] == '1'
local seen = ARGV[1] .. ':' .. ARGV[3]
if redis.call('SISMEMBER', KEYS[4], seen) == 0 then
  if ordered then
    redis.call('ZADD', KEYS[1], ARGV[3], ARGV[2])
  else
    redis.call('RPUSH', KEYS[1], ARGV[2])
  end
  redis.call('SADD', KEYS[4], seen)
end
local ready
if ordered then
  ready = redis.call('ZCOUNT', KEYS[1], '-inf', '+inf')
else
  ready = redis.call('LLEN', KEYS[1])
end
local ttl, group_ttl = tonumber(ARGV[4]), tonumber(ARGV[5])
if ttl > 0 then
  for i = 1, 4 do redis.call('EXPIRE', KEYS[i], ttl) end
  if group_ttl > 0 then redis.call('EXPIRE', KEYS[5], group_ttl) end
end
local diff = redis.call('GET', KEYS[2])
local size = redis.call('GET', KEYS[3])
local claimed = 0
if size and ready == tonumber(size) + tonumber(diff or 0) then
  if redis.call('SET', KEYS[6], ARGV[7], 'NX', 'EX', ARGV[6]) then claimed = 1 end
end
return {ready, diff, size, claimed}
"#;

/// Extends the claim while `token` holds it, or takes it again when it lapsed with the chord
/// unfinished (`.s` still there). KEYS: `.c .s`. ARGV: token, lease.
const CLAIM_EXTEND: &str = r#"
local cur = redis.call('GET', KEYS[1])
if cur == ARGV[1] then
  return redis.call('EXPIRE', KEYS[1], ARGV[2])
end
if not cur and redis.call('EXISTS', KEYS[2]) == 1 then
  if redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2], 'NX') then return 1 end
end
return 0
"#;

/// Once the body is sent by `token`'s holder: deletes the join's keys and marks `.c` done.
/// KEYS: `.c .j .t .s .d`. ARGV: token, done expiry.
const CLEANUP: &str = r#"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
redis.call('DEL', KEYS[2], KEYS[3], KEYS[4], KEYS[5])
redis.call('SET', KEYS[1], 'done', 'EX', ARGV[2])
return 1
"#;

/// Gives the claim up when `token` holds it. KEYS: `.c`. ARGV: token.
const RELEASE: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"#;

/// For a header that completed the count without the claim: `{state, ttl_ms}`, state 0 when
/// the chord is finished (`.c` done, or `.s` gone), 1 when the lapsed claim was taken for
/// `token`, 2 while another holds it (for `ttl_ms`). KEYS: `.c .s`. ARGV: token, lease.
const TAKE_OVER: &str = r#"
local cur = redis.call('GET', KEYS[1])
if cur == 'done' or redis.call('EXISTS', KEYS[2]) == 0 then
  return {0, 0}
end
if not cur then
  if redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2], 'NX') then return {1, 0} end
  return {2, 0}
end
return {2, redis.call('PTTL', KEYS[1])}
"#;

/// A new claim token, as Celery's (`uuid4().hex`).
pub fn claim_token() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

fn eval(script: &str, keys: &[String]) -> redis::Cmd {
    let mut cmd = redis::cmd("EVAL");
    cmd.arg(script).arg(keys.len());
    for k in keys {
        cmd.arg(k);
    }
    cmd
}

impl ResultBackend {
    /// Adds `member` for header task `task_id` with score `index` (`None`: `+inf`, as Celery
    /// scores a part without a `group_index`), unless that task and index were counted before,
    /// and reads the counters; when the count is complete, takes the dispatch claim for
    /// `token`. One script, as Celery's `on_chord_part_return`.
    pub async fn chord_part_return(
        &self,
        group: &str,
        task_id: &str,
        member: &str,
        index: Option<i64>,
        token: &str,
    ) -> Result<PartReturn, BackendError> {
        let (jkey, tkey, skey) = (
            group_key(group, ".j"),
            group_key(group, ".t"),
            group_key(group, ".s"),
        );
        let keys = [
            jkey,
            tkey.clone(),
            skey.clone(),
            group_key(group, ".d"),
            group_key(group, ""),
            group_key(group, ".c"),
        ];
        let score = index.map_or_else(|| "+inf".to_owned(), |i| i.to_string());
        let times = self.fixed.chord;
        let mut conn = self.conn.clone();
        let (ready, diff, size, claimed): (i64, Option<String>, Option<String>, i64) =
            eval(PART_RETURN, &keys)
                .arg(task_id)
                .arg(member)
                .arg(&score)
                .arg(times.expires.unwrap_or(0))
                .arg(times.group_expires.unwrap_or(0))
                .arg(times.claim_secs)
                .arg(token)
                .arg(u8::from(self.fixed.chord_ordered))
                .query_async(&mut conn)
                .await?;
        let Ok(ready) = u64::try_from(ready) else {
            return Ok(PartReturn::Done);
        };
        let number = |key: &str, v: Option<String>| -> Result<Option<i64>, BackendError> {
            v.map(|text| {
                text.trim()
                    .parse::<i64>()
                    .map_err(|_| BackendError::ChordCounter {
                        key: key.to_owned(),
                        value: crate::protocol::preview_str(&text),
                    })
            })
            .transpose()
        };
        Ok(PartReturn::Counted(PartCount {
            ready,
            diff: number(&tkey, diff)?.unwrap_or(0),
            size: number(&skey, size)?,
            claimed: claimed == 1,
        }))
    }

    /// Extends `token`'s dispatch claim to `secs` before the body is sent (or takes it again if
    /// it lapsed with the chord unfinished); `false`: another worker holds it, or the chord is
    /// done, and this one must not send the body.
    pub async fn chord_claim_extend(
        &self,
        group: &str,
        token: &str,
        secs: u64,
    ) -> Result<bool, BackendError> {
        let keys = [group_key(group, ".c"), group_key(group, ".s")];
        let mut conn = self.conn.clone();
        let n: i64 = eval(CLAIM_EXTEND, &keys)
            .arg(token)
            .arg(secs)
            .query_async(&mut conn)
            .await?;
        Ok(n == 1)
    }

    /// Once the body was sent by `token`'s holder: deletes `.j`, `.t`, `.s` and `.d` and sets
    /// `.c` to `done` for [`ChordTimes::done_secs`]. `false`: the claim was lost first (the keys are left
    /// to expire).
    pub async fn chord_cleanup(&self, group: &str, token: &str) -> Result<bool, BackendError> {
        let keys = [
            group_key(group, ".c"),
            group_key(group, ".j"),
            group_key(group, ".t"),
            group_key(group, ".s"),
            group_key(group, ".d"),
        ];
        let mut conn = self.conn.clone();
        let n: i64 = eval(CLEANUP, &keys)
            .arg(token)
            .arg(self.fixed.chord.done_secs)
            .query_async(&mut conn)
            .await?;
        Ok(n == 1)
    }

    /// Gives `token`'s claim up: the body could not be carried out, and the header's message
    /// goes back to the broker to claim it again when redelivered.
    pub async fn chord_release(&self, group: &str, token: &str) -> Result<(), BackendError> {
        let mut conn = self.conn.clone();
        let _: i64 = eval(RELEASE, &[group_key(group, ".c")])
            .arg(token)
            .query_async(&mut conn)
            .await?;
        Ok(())
    }

    /// After a header failed and the body's `ChordError` was stored: deletes the size, as
    /// Celery does, so a copy of a header arriving later does not fail the chord again.
    pub async fn chord_drop_size(&self, group: &str) -> Result<(), BackendError> {
        let mut conn = self.conn.clone();
        conn.del::<_, ()>(group_key(group, ".s")).await?;
        Ok(())
    }

    /// For a header whose return completed the count while another worker held the claim:
    /// whether the chord finished, or the claim lapsed unfinished and `token` took it
    /// ([`ChordTimes::claim_secs`]), or how long the holder's lease still runs.
    pub async fn chord_take_over(
        &self,
        group: &str,
        token: &str,
    ) -> Result<TakeOver, BackendError> {
        let keys = [group_key(group, ".c"), group_key(group, ".s")];
        let mut conn = self.conn.clone();
        let (state, ttl_ms): (i64, i64) = eval(TAKE_OVER, &keys)
            .arg(token)
            .arg(self.fixed.chord.claim_secs)
            .query_async(&mut conn)
            .await?;
        Ok(match state {
            0 => TakeOver::Finished,
            1 => TakeOver::Claimed,
            _ => TakeOver::Held(Duration::from_millis(u64::try_from(ttl_ms).unwrap_or(0))),
        })
    }

    /// Sets a chord's header size before its header is sent, as Celery's `set_chord_size`
    /// does (the `.c` dispatch claim of a previous run of the same frozen chord deleted, the
    /// `.s` size set with the results' expiry), for a worker that sends a chord as a chain
    /// step or callback, and marks the chord started (`.started`, with the same expiry).
    ///
    /// `rerun`: the job sending the chord was delivered before (its result was never stored,
    /// so it runs again and sends the same chord, the same group id). If the chord was
    /// already started, its size is left alone and `false` returned: the first run's header
    /// joins with the size it set, and once that chord has finished (its counters deleted)
    /// the copies of the header the rerun sends join a set with no size, which never
    /// completes, instead of running the body a second time. A job delivered for the first
    /// time always starts the chord, as Celery does for a frozen chord applied again.
    pub async fn chord_set_size(
        &self,
        group: &str,
        size: usize,
        rerun: bool,
    ) -> Result<bool, BackendError> {
        let skey = group_key(group, ".s");
        let started = group_key(group, ".started");
        // Kept as long as results, or a day when they are kept for ever: far longer than a
        // message waits to be delivered again.
        let marked = self.fixed.expires.unwrap_or(STARTED_DEFAULT_SECS);
        let mut conn = self.conn.clone();
        if rerun {
            let first: Option<String> = redis::cmd("SET")
                .arg(&started)
                .arg(1)
                .arg("NX")
                .arg("EX")
                .arg(marked)
                .query_async(&mut conn)
                .await?;
            if first.is_none() {
                return Ok(false);
            }
        }
        let mut pipe = redis::pipe();
        pipe.atomic()
            .del(group_key(group, ".c"))
            .ignore()
            .set_ex(&started, 1, marked)
            .ignore();
        match self.fixed.chord.expires {
            Some(secs) => pipe.set_ex(&skey, size, secs).ignore(),
            None => pipe.set(&skey, size).ignore(),
        };
        pipe.query_async::<()>(&mut conn).await?;
        Ok(true)
    }

    /// The header results, as encoded by whoever added them: in `group_index` order, or in
    /// the order they were added with `result_chord_ordered = false`.
    pub async fn chord_members(&self, group: &str) -> Result<Vec<String>, BackendError> {
        let mut conn = self.conn.clone();
        let jkey = group_key(group, ".j");
        Ok(if self.fixed.chord_ordered {
            conn.zrange(jkey, 0, -1).await?
        } else {
            conn.lrange(jkey, 0, -1).await?
        })
    }
}

#[cfg(test)]
mod tests {
    use super::ChordTimes;
    use std::time::Duration;

    #[test]
    fn chord_times_are_derived_as_celerys_redis_backend_derives_them() {
        let secs = Duration::from_secs;
        let defaults = ChordTimes::celery(secs(3), None, Some(86_400));
        assert_eq!(defaults, ChordTimes::with_result_expires(Some(86_400)));
        assert_eq!(
            defaults,
            ChordTimes {
                expires: Some(86_400),
                group_expires: Some(86_400),
                claim_secs: super::CLAIM_SECS,
                done_secs: super::DONE_SECS,
            }
        );
        // join_timeout: claim = max(5, int(2 × t)), done = max(2 × claim, 300); 0 is Celery's
        // None, counted as 5 s.
        let claim = |t: Duration| {
            let c = ChordTimes::celery(t, None, Some(60));
            (c.claim_secs, c.done_secs)
        };
        assert_eq!(claim(secs(0)), (10, 300));
        assert_eq!(claim(Duration::from_millis(1200)), (5, 300));
        assert_eq!(claim(Duration::from_millis(3700)), (7, 300));
        assert_eq!(claim(secs(200)), (400, 800));
        // chord_expires: the counters' expiry; the group record keeps the longer of it and the
        // results'; 0 (or results kept for ever) means no expiry.
        let exp = |chord: Option<u64>, results: Option<u64>| {
            let c = ChordTimes::celery(secs(3), chord.map(secs), results);
            (c.expires, c.group_expires)
        };
        assert_eq!(exp(Some(120), Some(86_400)), (Some(120), Some(86_400)));
        assert_eq!(
            exp(Some(90_000), Some(86_400)),
            (Some(90_000), Some(90_000))
        );
        assert_eq!(exp(Some(0), Some(86_400)), (None, None));
        assert_eq!(exp(Some(120), None), (Some(120), None));
        assert_eq!(exp(None, None), (None, None));
    }
}

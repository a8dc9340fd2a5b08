//! Celery's Redis-backend chord join, the keys and commands only (`celery/backends/redis.py`,
//! `on_chord_part_return`): each finished header task adds `[1, id, state, result]` to the
//! sorted set `celery-taskset-meta-<group>.j` scored by its `group_index`, and in the same
//! MULTI/EXEC reads the count, the `.t` difference (`add_to_chord`) and the `.s` size that the
//! producer's `apply_chord` set, and renews the expiry of all three. A chord a worker sends is
//! marked `.started` when its size is set, so a job run again after its chord finished does
//! not start the same chord a second time. Deciding what the counts mean is `canvas::chord`'s
//! job; this module only speaks Redis.

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

/// What one header task's return saw, atomically with adding itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartCount {
    /// Members of the `.j` set after adding this one.
    pub ready: u64,
    /// The `.t` difference (tasks added to the chord after it was sent); 0 when absent.
    pub diff: i64,
    /// The `.s` size; `None` when the producer never set one (or it expired).
    pub size: Option<i64>,
}

impl ResultBackend {
    /// Adds `member` with score `index` (`None`: `+inf`, as Celery scores a part without a
    /// `group_index`) and reads the counters, in one MULTI/EXEC. Adding a member that is
    /// already there changes nothing, so a header task returning twice is counted once.
    pub async fn chord_part_return(
        &self,
        group: &str,
        member: &str,
        index: Option<i64>,
    ) -> Result<PartCount, BackendError> {
        let (jkey, tkey, skey) = (
            group_key(group, ".j"),
            group_key(group, ".t"),
            group_key(group, ".s"),
        );
        let score = index.map_or_else(|| "+inf".to_owned(), |i| i.to_string());
        let mut pipe = redis::pipe();
        pipe.atomic()
            .zadd(&jkey, member, &score)
            .ignore()
            .zcount(&jkey, "-inf", "+inf")
            .get(&tkey)
            .get(&skey);
        if let Some(secs) = self.fixed.expires {
            let secs = i64::try_from(secs).unwrap_or(i64::MAX);
            pipe.expire(&jkey, secs)
                .ignore()
                .expire(&tkey, secs)
                .ignore()
                .expire(&skey, secs)
                .ignore();
        }
        let mut conn = self.conn.clone();
        let (ready, diff, size): (u64, Option<String>, Option<String>) =
            pipe.query_async(&mut conn).await?;
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
        Ok(PartCount {
            ready,
            diff: number(&tkey, diff)?.unwrap_or(0),
            size: number(&skey, size)?,
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
        match self.fixed.expires {
            Some(secs) => pipe.set_ex(&skey, size, secs).ignore(),
            None => pipe.set(&skey, size).ignore(),
        };
        pipe.query_async::<()>(&mut conn).await?;
        Ok(true)
    }

    /// The header results in `group_index` order, as encoded by whoever added them.
    pub async fn chord_members(&self, group: &str) -> Result<Vec<String>, BackendError> {
        let mut conn = self.conn.clone();
        Ok(conn.zrange(group_key(group, ".j"), 0, -1).await?)
    }

    /// Deletes the three counters once the body is sent (or failed): a header task delivered
    /// again afterwards starts a set with no size, which never completes, instead of sending
    /// the body a second time.
    pub async fn chord_forget(&self, group: &str) -> Result<(), BackendError> {
        let mut conn = self.conn.clone();
        conn.del::<_, ()>(&[
            group_key(group, ".j"),
            group_key(group, ".t"),
            group_key(group, ".s"),
        ])
        .await?;
        Ok(())
    }
}

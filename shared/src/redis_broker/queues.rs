//! The `mediafarm` CLI's queue commands on the Redis broker: purging a queue (kombu's
//! `_purge`: every priority list of it, in one transaction) and reading and replaying its dead
//! letters, the list `<queue>.dead` (newest at the head, as the worker `LPUSH`es them). What a
//! dead letter's headers mean is the caller's business; a replay here is one atomic move.

use super::{dead_list, eval, list_key, scripts, Envelope, RedisBroker, RedisBrokerError};

impl RedisBroker {
    /// Removes every waiting message of `queue` (all its priority lists); how many there were.
    /// Messages taken and not yet acknowledged are not waiting, and stay.
    pub async fn purge(&self, queue: &str) -> Result<u64, RedisBrokerError> {
        let mut pipe = redis::pipe();
        pipe.atomic();
        for p in &self.opts.priority_steps {
            let key = list_key(&self.opts, queue, *p);
            pipe.llen(&key).del(&key).ignore();
        }
        let mut conn = self.conn();
        let sizes: Vec<u64> = pipe.query_async(&mut conn).await?;
        Ok(sizes.iter().sum())
    }

    /// Up to `limit` dead letters of `queue` as stored (bytes: a value that was not a kombu
    /// message is kept as it was taken, UTF-8 or not), oldest first, left where they are.
    pub async fn dead_letters(
        &self,
        queue: &str,
        limit: usize,
    ) -> Result<Vec<Vec<u8>>, RedisBrokerError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let from = -isize::try_from(limit).unwrap_or(isize::MAX);
        let mut conn = self.conn();
        let mut letters: Vec<Vec<u8>> = redis::cmd("LRANGE")
            .arg(dead_list(&self.opts, queue))
            .arg(from)
            .arg(-1)
            .query_async(&mut conn)
            .await?;
        letters.reverse();
        Ok(letters)
    }

    /// Moves dead letter `stored` (as [`dead_letters`](Self::dead_letters) returned it) from
    /// `<queue>.dead` onto `queue` as `replay`, in one step; `false` when it was gone.
    pub async fn replay_dead(
        &self,
        queue: &str,
        stored: &[u8],
        replay: &Envelope,
    ) -> Result<bool, RedisBrokerError> {
        let mut conn = self.conn();
        let target = self.list_key(queue, replay.priority());
        let moved: i64 = eval(scripts::REPLAY, &[dead_list(&self.opts, queue), target])
            .arg(stored)
            .arg(replay.to_json())
            .query_async(&mut conn)
            .await?;
        Ok(moved == 1)
    }
}

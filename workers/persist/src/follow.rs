//! The continuous stream readers (`persist_stream_continuous = true`): background work of the
//! worker (see `mediafarm::runtime::background`), one reader per declared table, each on a Redis
//! connection of its own (a blocking read would hold up every job's result on the shared one).
//! A reader waits for new entries with `XREADGROUP … BLOCK`, so rows reach the database within
//! a batch's wait of being added, with no `persist.flush` jobs from beat.
//!
//! It keeps `persist.flush`'s promises ([`crate::stream`]): an entry is acknowledged only after
//! its row is committed or it is dead-lettered with its reason; every `persist_stream_claim_idle`
//! it claims the entries a dead worker read and never acknowledged (`XAUTOCLAIM`). When the
//! database is down, the entries read stay pending; the reader backs off, then writes its own
//! pending entries again (`XREADGROUP … 0`) before reading new ones. On stop it finishes the
//! batch it holds and returns; a batch it cannot finish stays pending and is claimed later.
//!
//! **Overlap.** While batches are written (one per lane of the batcher), the reader reads and
//! checks the next and hands it to the batcher, then acknowledges the oldest once it is
//! committed. After a failure, the batches read behind the failed one are not
//! acknowledged even if they committed: all are written again, in stream order, so a table
//! without a version column still ends with the later write.
//!
//! Several workers may read one stream (each is a consumer of the group): a table with a
//! version column keeps the order of its writes (stream ids as versions), one without keeps it
//! only with a single reader.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mediafarm::runtime::background::Background;
use mediafarm::TaskError;
use redis::aio::ConnectionManager;

use crate::stream::{Started, Streams};

/// Longest one blocking read waits for new entries: how soon a reader sees a stop.
const BLOCK: Duration = Duration::from_secs(1);
/// Longest pause after a failure (Redis or the database unreachable).
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Runs one reader per declared table until the worker stops.
pub async fn run(streams: Arc<Streams>, bg: Background) {
    let bg = &bg;
    let readers = streams
        .tables()
        .into_iter()
        .map(|table| follow(&streams, table, bg));
    futures_util::future::join_all(readers).await;
}

/// A pause that grows with consecutive failures: 0.2 s, 0.4 s, … up to [`MAX_BACKOFF`].
fn backoff(failures: u32) -> Duration {
    let ms = 200u64.saturating_mul(1 << failures.min(10));
    Duration::from_millis(ms).min(MAX_BACKOFF)
}

async fn follow(streams: &Streams, table: String, bg: &Background) {
    let mut failures = 0u32;
    let mut conn = loop {
        match bg.backend().dedicated_connection().await {
            Ok(c) => break c,
            Err(e) => {
                failures = failures.saturating_add(1);
                tracing::warn!(table, error = %e, "stream reader cannot reach Redis");
                if !bg.pause(backoff(failures)).await {
                    return;
                }
            }
        }
    };
    let consumer = bg.hostname().to_owned();
    let mut reader = Reader {
        streams,
        table: &table,
        consumer: &consumer,
        own_pending: true,
        next_claim: Instant::now(),
        group_ready: false,
        writing: VecDeque::new(),
    };
    tracing::info!(table, stream = %streams.stream(&table), "reading the stream continuously");
    while !bg.is_stopping() {
        match reader.step(&mut conn).await {
            Ok(()) => failures = 0,
            Err(e) => {
                failures = failures.saturating_add(1);
                // What was read after the failed batch is written again after it, in order.
                reader.writing.clear();
                reader.own_pending = true;
                if e.message.contains("NOGROUP") {
                    reader.group_ready = false;
                }
                tracing::warn!(table, error = %e.message, retry_in = ?backoff(failures),
                               "stream entries left pending; retrying");
                if !bg.pause(backoff(failures)).await {
                    break;
                }
            }
        }
    }
    while let Some(last) = reader.writing.pop_front() {
        if let Err(e) = streams.finish(&mut conn, last).await {
            tracing::warn!(table, error = %e.message, "last batches left pending");
            break;
        }
    }
    tracing::info!(table, "stream reader stopped");
}

/// One table's reader state.
struct Reader<'a> {
    streams: &'a Streams,
    table: &'a str,
    consumer: &'a str,
    /// Whether this consumer may hold entries it read and did not acknowledge (at start,
    /// after a failure): they are written before new ones, in stream order.
    own_pending: bool,
    next_claim: Instant,
    group_ready: bool,
    /// The batches being written while the next one is read, oldest first: each is
    /// acknowledged once the batches behind it fill the pipeline.
    writing: VecDeque<Started>,
}

impl Reader<'_> {
    /// Own pending entries when there may be some, a dead consumer's when due, then one read
    /// of new entries, handed to the batcher while earlier batches are written; then the
    /// oldest beyond the pipeline's depth are acknowledged. The read blocks only when nothing
    /// is being written.
    async fn step(&mut self, conn: &mut ConnectionManager) -> Result<(), TaskError> {
        let (streams, table, consumer) = (self.streams, self.table, self.consumer);
        let claim_due = Instant::now() >= self.next_claim;
        if self.own_pending || claim_due || !self.group_ready {
            while let Some(previous) = self.writing.pop_front() {
                streams.finish(conn, previous).await?;
            }
        }
        if !self.group_ready {
            streams.ensure_group(conn, &streams.stream(table)).await?;
            self.group_ready = true;
        }
        while self.own_pending {
            let handled = streams.read(conn, consumer, table, "0", None).await?;
            self.own_pending = handled.read > 0;
        }
        if claim_due {
            let mut cursor = "0-0".to_owned();
            loop {
                let (_, next) = streams.claim(conn, consumer, table, &cursor).await?;
                if next == "0-0" {
                    break;
                }
                cursor = next;
            }
            let every = (streams.claim_idle / 2).max(Duration::from_millis(500));
            self.next_claim = Instant::now() + every;
        }
        let block = if self.writing.is_empty() {
            Some(BLOCK)
        } else {
            None
        };
        let batch = streams.fetch(conn, consumer, table, ">", block).await?;
        // Nothing new: acknowledge what is written before waiting for more.
        let depth = if batch.is_empty() { 0 } else { self.depth() };
        if !batch.is_empty() {
            self.writing.push_back(streams.start(table, batch).await?);
        }
        while self.writing.len() > depth {
            if let Some(oldest) = self.writing.pop_front() {
                streams.finish(conn, oldest).await?;
            }
        }
        Ok(())
    }

    /// Batches kept in flight: one per lane writing, and the one being read.
    fn depth(&self) -> usize {
        self.streams.batcher.writer.lanes.max(1) + 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_bounded() {
        assert_eq!(backoff(0), Duration::from_millis(200));
        assert_eq!(backoff(1), Duration::from_millis(400));
        assert_eq!(backoff(40), MAX_BACKOFF);
    }
}

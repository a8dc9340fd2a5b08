//! The Redis write-behind buffer and `persist.flush`. A web app adds a row to the stream of
//! its table (`persist_stream_prefix` + table, e.g. `persist:profiles`) and returns at once:
//!
//! ```python
//! r.xadd("persist:profiles", {"key": json.dumps({"user_id": 42}),
//!                             "values": json.dumps({"avatar_url": url})})  # "version": optional
//! ```
//!
//! `persist.flush` (from beat, or on demand) — or, with `persist_stream_continuous`, the
//! worker's own readers ([`crate::follow`]) — reads each table's stream in the consumer group
//! `persist_stream_group` — first the entries another worker read and never acknowledged for
//! `persist_stream_claim_idle` (`XAUTOCLAIM`: that worker died), then new ones (`XREADGROUP`)
//! — writes them through the batcher like `persist.write` rows, and `XACK`s an entry only once
//! its row is committed. An entry that cannot be written (bad JSON, an unknown column, a value
//! the database refuses) goes to `persist_stream_dead` with its stream, id and reason, and is
//! acknowledged. When the database is down nothing is acknowledged and the job is retried.
//!
//! **Version.** An entry without `version`, in a table that declares a version column, takes
//! its stream id as version: `milliseconds × 1,000,000 + sequence`, so later entries win —
//! also when several workers flush one stream at once. A table without a version column keeps
//! the order of its stream only while one flush runs at a time.

use std::sync::Arc;
use std::time::Duration;

use mediafarm::{FailureKind, Task, TaskContext, TaskError};
use redis::aio::ConnectionManager;
use redis::Value as Redis;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::batch::{Batcher, Outcome};
use crate::schema::Row;
use crate::settings::PersistSettings;

/// Most reads of one stream in one flush (each up to `persist_batch_size` entries).
const MAX_READS: usize = 1000;

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FlushArgs {
    /// One declared table; none: every declared table.
    #[serde(default)]
    pub table: Option<String>,
}

/// Entries committed and entries sent to the dead-letter stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FlushResult {
    pub rows: u64,
    pub dead: u64,
}

/// Reading the tables' streams: what `persist.flush` and the continuous readers share.
pub struct Streams {
    pub batcher: Arc<Batcher>,
    prefix: String,
    pub group: String,
    dead: String,
    pub claim_idle: Duration,
    count: usize,
    /// Acknowledged entries are trimmed from the streams.
    pub trim: bool,
}

/// What one read (or claim) of a stream handled.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Handled {
    /// Entries the read returned.
    pub read: usize,
    /// Entries committed.
    pub rows: u64,
    /// Entries sent to the dead-letter stream.
    pub dead: u64,
}

impl Streams {
    pub fn new(batcher: Arc<Batcher>, p: &PersistSettings) -> Streams {
        Streams {
            batcher,
            prefix: p.persist_stream_prefix.clone(),
            group: p.persist_stream_group.clone(),
            dead: p.persist_stream_dead.clone(),
            claim_idle: p.persist_stream_claim_idle,
            count: p.persist_batch_size as usize,
            trim: p.persist_stream_trim,
        }
    }

    /// The stream of `table`'s buffered rows.
    pub fn stream(&self, table: &str) -> String {
        format!("{}{table}", self.prefix)
    }

    /// The declared tables, in order.
    pub fn tables(&self) -> Vec<String> {
        self.batcher.writer.tables.0.keys().cloned().collect()
    }

    /// Creates the consumer group (and the stream) unless they exist.
    pub async fn ensure_group(
        &self,
        conn: &mut ConnectionManager,
        stream: &str,
    ) -> Result<(), TaskError> {
        let created = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(stream)
            .arg(&self.group)
            .arg("0")
            .arg("MKSTREAM")
            .query_async::<Redis>(conn)
            .await;
        match created {
            Err(e) if !e.to_string().contains("BUSYGROUP") => Err(redis_error(e)),
            _ => Ok(()),
        }
    }

    /// Claims for `consumer` and writes up to a batch of entries read by any consumer and left
    /// unacknowledged for `persist_stream_claim_idle`, from `cursor`; returns what it handled
    /// and the next cursor (`0-0`: the end). A database that is down is an error, and the
    /// entries stay pending.
    pub async fn claim(
        &self,
        conn: &mut ConnectionManager,
        consumer: &str,
        table: &str,
        cursor: &str,
    ) -> Result<(Handled, String), TaskError> {
        let stream = self.stream(table);
        let reply: Redis = redis::cmd("XAUTOCLAIM")
            .arg(&stream)
            .arg(&self.group)
            .arg(consumer)
            .arg(self.claim_idle.as_millis() as u64)
            .arg(cursor)
            .arg("COUNT")
            .arg(self.count)
            .query_async(conn)
            .await
            .map_err(redis_error)?;
        let Redis::Array(parts) = reply else {
            return Ok((Handled::default(), "0-0".into()));
        };
        let mut parts = parts.into_iter();
        let next = parts
            .next()
            .and_then(into_text)
            .unwrap_or_else(|| "0-0".into());
        let batch = parts.next().map(entries).unwrap_or_default();
        let handled = self.handle(conn, table, batch).await?;
        Ok((handled, next))
    }

    /// Reads up to a batch of entries for `consumer` (see [`Self::read`]) without writing them.
    pub async fn fetch(
        &self,
        conn: &mut ConnectionManager,
        consumer: &str,
        table: &str,
        from: &str,
        block: Option<Duration>,
    ) -> Result<Vec<Entry>, TaskError> {
        let stream = self.stream(table);
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(&self.group)
            .arg(consumer)
            .arg("COUNT")
            .arg(self.count);
        if let Some(wait) = block {
            cmd.arg("BLOCK").arg(wait.as_millis().max(1) as u64);
        }
        let reply: Redis = cmd
            .arg("STREAMS")
            .arg(&stream)
            .arg(from)
            .query_async(conn)
            .await
            .map_err(redis_error)?;
        Ok(read_reply(reply))
    }

    /// Reads and writes up to a batch of entries for `consumer`: `from` = `>` for entries no
    /// consumer has read yet, `0` for those this consumer read and has not acknowledged;
    /// `block` waits that long for new entries (use a dedicated connection for it).
    pub async fn read(
        &self,
        conn: &mut ConnectionManager,
        consumer: &str,
        table: &str,
        from: &str,
        block: Option<Duration>,
    ) -> Result<Handled, TaskError> {
        let batch = self.fetch(conn, consumer, table, from, block).await?;
        self.handle(conn, table, batch).await
    }

    /// Writes `batch` and acknowledges it ([`Self::start`], then [`Self::finish`]).
    async fn handle(
        &self,
        conn: &mut ConnectionManager,
        table: &str,
        batch: Vec<Entry>,
    ) -> Result<Handled, TaskError> {
        if batch.is_empty() {
            return Ok(Handled::default());
        }
        let started = self.start(table, batch).await?;
        self.finish(conn, started).await
    }
}

/// `persist.flush`: drains the streams now.
pub struct Flush {
    streams: Arc<Streams>,
}

impl Flush {
    pub fn new(streams: Arc<Streams>) -> Flush {
        Flush { streams }
    }
}

/// An entry's fields, in order.
type Fields = Vec<(String, String)>;

/// One stream entry: its id and fields (`None`: deleted since it was read).
pub struct Entry {
    id: String,
    fields: Option<Fields>,
}

/// A reply value as text, taking its bytes rather than copying them.
fn into_text(v: Redis) -> Option<String> {
    match v {
        Redis::BulkString(b) => String::from_utf8(b).ok(),
        Redis::SimpleString(s) => Some(s),
        Redis::Int(n) => Some(n.to_string()),
        _ => None,
    }
}

fn pairs(v: Redis) -> Option<Vec<(String, String)>> {
    match v {
        Redis::Array(items) => {
            let mut out = Vec::with_capacity(items.len() / 2);
            let mut items = items.into_iter();
            while let (Some(k), Some(v)) = (items.next(), items.next()) {
                if let (Some(k), Some(v)) = (into_text(k), into_text(v)) {
                    out.push((k, v));
                }
            }
            Some(out)
        }
        Redis::Map(items) => Some(
            items
                .into_iter()
                .filter_map(|(k, v)| Some((into_text(k)?, into_text(v)?)))
                .collect(),
        ),
        _ => None,
    }
}

fn entries(v: Redis) -> Vec<Entry> {
    let Redis::Array(items) = v else {
        return Vec::new();
    };
    items
        .into_iter()
        .filter_map(|e| match e {
            Redis::Array(p) if p.len() == 2 => {
                let mut p = p.into_iter();
                let id = into_text(p.next()?)?;
                Some(Entry {
                    id,
                    fields: pairs(p.next()?),
                })
            }
            _ => None,
        })
        .collect()
}

/// The entries of an `XREADGROUP` reply for one stream (RESP2 arrays or RESP3 maps).
fn read_reply(v: Redis) -> Vec<Entry> {
    match v {
        Redis::Array(streams) => streams
            .into_iter()
            .filter_map(|s| match s {
                Redis::Array(p) if p.len() == 2 => p.into_iter().nth(1).map(entries),
                _ => None,
            })
            .flatten()
            .collect(),
        Redis::Map(streams) => streams.into_iter().flat_map(|(_, e)| entries(e)).collect(),
        _ => Vec::new(),
    }
}

/// A stream id as a version: `ms × 1,000,000 + seq`.
pub fn id_version(id: &str) -> Option<i64> {
    let (ms, seq) = id.split_once('-')?;
    let (ms, seq): (i64, i64) = (ms.parse().ok()?, seq.parse().ok()?);
    ms.checked_mul(1_000_000)?.checked_add(seq.min(999_999))
}

fn redis_error(e: redis::RedisError) -> TaskError {
    TaskError::transient("BackendError", format!("Redis: {e}"))
}

impl Streams {
    /// The row an entry asks for, or why it cannot be written.
    fn row(&self, table: &str, entry: &[(String, String)], id: &str) -> Result<Row, String> {
        let field = |name: &str| entry.iter().find(|(k, _)| k == name).map(|(_, v)| v);
        let object = |name: &str| -> Result<Map<String, Value>, String> {
            match field(name) {
                None if name == "values" => Ok(Map::new()),
                None => Err(format!("the entry has no `{name}` field")),
                Some(t) => serde_json::from_str(t)
                    .map_err(|e| format!("`{name}` is not a JSON object: {e}")),
            }
        };
        for (k, _) in entry {
            if !["key", "values", "version"].contains(&k.as_str()) {
                return Err(format!(
                    "unknown field `{k}` (an entry has key, values and optional version)"
                ));
            }
        }
        let spec = self.batcher.writer.tables.0.get(table);
        let version = match field("version") {
            Some(v) => Some(
                v.trim()
                    .parse::<i64>()
                    .map_err(|_| format!("`version` = {v:?} is not a whole number"))?,
            ),
            None if spec.is_some_and(|s| s.version.is_some()) => id_version(id),
            None => None,
        };
        self.batcher
            .writer
            .tables
            .row(table, &object("key")?, &object("values")?, version)
            .map_err(|e| e.0)
    }

    /// Checks `batch`'s entries and hands their rows to the batcher, in stream order, without
    /// waiting for them to be written: the caller may read the next batch meanwhile.
    pub async fn start(&self, table: &str, batch: Vec<Entry>) -> Result<Started, TaskError> {
        let mut started = Started {
            stream: self.stream(table),
            read: batch.len(),
            ack: Vec::new(),
            dead: Vec::new(),
            writing: Vec::with_capacity(batch.len()),
        };
        for e in batch {
            match e.fields {
                None => started.ack.push(e.id),
                Some(fields) => match self.row(table, &fields, &e.id) {
                    Ok(row) => {
                        let outcome = self.batcher.enqueue(table, row).await?;
                        started.writing.push((e.id, fields, outcome));
                    }
                    Err(why) => started.dead.push((e.id, why, fields)),
                },
            }
        }
        Ok(started)
    }

    /// Waits for a started batch's rows, dead-letters the refused entries and acknowledges
    /// the committed and refused ones. A transient failure (the database down) is an error,
    /// returned after acknowledging what could be; the other entries stay pending.
    pub async fn finish(
        &self,
        conn: &mut ConnectionManager,
        started: Started,
    ) -> Result<Handled, TaskError> {
        let Started {
            stream,
            read,
            mut ack,
            mut dead,
            writing,
        } = started;
        let (mut committed, mut transient) = (0, None);
        for (id, fields, outcome) in writing {
            match outcome.wait().await {
                Ok(()) => {
                    committed += 1;
                    ack.push(id);
                }
                Err(e) if matches!(e.kind, FailureKind::Transient { .. }) => transient = Some(e),
                Err(e) => dead.push((id, e.message, fields)),
            }
        }
        let dead_count = dead.len() as u64;
        for (id, reason, fields) in dead {
            let mut cmd = redis::cmd("XADD");
            cmd.arg(&self.dead)
                .arg("*")
                .arg("stream")
                .arg(&stream)
                .arg("id")
                .arg(&id)
                .arg("reason")
                .arg(&reason);
            for (k, v) in &fields {
                cmd.arg(k).arg(v);
            }
            cmd.query_async::<Redis>(conn).await.map_err(redis_error)?;
            tracing::warn!(stream, id, reason, "stream entry refused: dead-lettered");
            ack.push(id);
        }
        if !ack.is_empty() {
            redis::cmd("XACK")
                .arg(&stream)
                .arg(&self.group)
                .arg(&ack)
                .query_async::<Redis>(conn)
                .await
                .map_err(redis_error)?;
        }
        match transient {
            Some(e) => Err(e),
            None => Ok(Handled {
                read,
                rows: committed,
                dead: dead_count,
            }),
        }
    }
}

/// A batch of entries handed to the batcher ([`Streams::start`]), not yet acknowledged.
pub struct Started {
    stream: String,
    /// Entries the read returned.
    pub read: usize,
    /// Entries deleted since they were read: nothing to write.
    ack: Vec<String>,
    /// (entry id, reason, the entry's fields) of the entries refused before writing.
    dead: Vec<(String, String, Fields)>,
    /// (entry id, its fields, its row's outcome), in stream order.
    writing: Vec<(String, Fields, Outcome)>,
}

impl Task for Flush {
    const NAME: &'static str = "persist.flush";
    type Args = FlushArgs;
    type Output = FlushResult;

    async fn run(&self, ctx: TaskContext, args: FlushArgs) -> Result<FlushResult, TaskError> {
        let streams = &self.streams;
        let tables: Vec<String> = match args.table {
            Some(t) if streams.batcher.writer.tables.0.contains_key(&t) => vec![t],
            Some(t) => {
                return Err(TaskError::invalid(
                    "RowRefused",
                    format!("table {t:?} is not declared in persist_tables"),
                ))
            }
            None => streams.tables(),
        };
        let mut conn = ctx.backend().connection();
        let consumer = ctx.hostname.to_string();
        let mut out = FlushResult { rows: 0, dead: 0 };
        let mut add = |h: Handled| {
            out.rows += h.rows;
            out.dead += h.dead;
        };
        for table in tables {
            streams
                .ensure_group(&mut conn, &streams.stream(&table))
                .await?;
            // A dead consumer's entries first, then new ones.
            let mut cursor = "0-0".to_owned();
            let mut reads = 0;
            while reads < MAX_READS {
                reads += 1;
                let (handled, next) = streams.claim(&mut conn, &consumer, &table, &cursor).await?;
                add(handled);
                if next == "0-0" {
                    break;
                }
                cursor = next;
            }
            while reads < MAX_READS {
                reads += 1;
                let handled = streams
                    .read(&mut conn, &consumer, &table, ">", None)
                    .await?;
                add(handled);
                if handled.read == 0 {
                    break;
                }
            }
        }
        tracing::info!(job = %ctx.id, rows = out.rows, dead = out.dead, "streams flushed");
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_ids_order_as_versions() {
        let a = id_version("1764464523000-0").unwrap();
        let b = id_version("1764464523000-7").unwrap();
        let c = id_version("1764464523001-0").unwrap();
        assert!(a < b && b < c);
        assert_eq!(id_version("nonsense"), None);
    }

    #[test]
    fn replies_are_read_in_both_protocols() {
        let bulk = |s: &str| Redis::BulkString(s.as_bytes().to_vec());
        let entry = Redis::Array(vec![
            bulk("1-0"),
            Redis::Array(vec![bulk("key"), bulk("{\"id\":1}")]),
        ]);
        let resp2 = Redis::Array(vec![Redis::Array(vec![
            bulk("persist:t"),
            Redis::Array(vec![entry.clone()]),
        ])]);
        let got = read_reply(resp2);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].id, "1-0");
        assert_eq!(
            got[0].fields.as_deref(),
            Some(&[("key".to_owned(), "{\"id\":1}".to_owned())][..])
        );
        let resp3 = Redis::Map(vec![(bulk("persist:t"), Redis::Array(vec![entry]))]);
        assert_eq!(read_reply(resp3).len(), 1);
        assert!(read_reply(Redis::Nil).is_empty());
    }
}

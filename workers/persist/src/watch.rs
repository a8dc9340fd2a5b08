//! What persist-worker shows of its databases and its backlog, refreshed every
//! [`EVERY`] by background work of the worker (`mediafarm::runtime::background`):
//!
//! - `/readyz` answers 503 naming the tables whose database does not answer `SELECT 1` (each
//!   database is probed on a connection of its own, so busy batches never look like an outage);
//! - per declared table, Prometheus gauges on `/metrics` of its Redis Stream:
//!   `mediafarm_persist_stream_length` (entries in the stream, acknowledged or not),
//!   `mediafarm_persist_stream_unread` (entries the consumer group has not read yet; Redis'
//!   `lag`), `mediafarm_persist_stream_pending` (read by a worker, not yet acknowledged: not
//!   committed) and `mediafarm_persist_stream_oldest_pending_seconds` (age of the oldest of
//!   those, from its stream id's time). With the database down, `pending` and `unread` grow.
//!   A stream or group that does not exist yet reads as 0.
//! - with `persist_stream_trim`, each stream loses the entries its group acknowledged:
//!   `XTRIM <stream> MINID <id>`, `<id>` the oldest pending entry, or when none is pending
//!   the group's last delivered one. Every entry below it was read and acknowledged (ids only
//!   grow, and a claim keeps an entry's id), so only committed rows go. The trim is exact
//!   (not `~`, which drops whole nodes of 100 entries only): it costs what it removes.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use mediafarm::runtime::background::Background;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use redis::aio::ConnectionManager;
use redis::Value as Redis;

use crate::db::Pool;
use crate::stream::Streams;

/// How often the databases are probed and the gauges refreshed.
pub const EVERY: Duration = Duration::from_secs(2);
/// Longest a probe waits for its database.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TableLabels {
    pub table: String,
}

/// The backlog gauges, by table.
#[derive(Clone, Default)]
struct Gauges {
    length: Family<TableLabels, Gauge>,
    unread: Family<TableLabels, Gauge>,
    pending: Family<TableLabels, Gauge>,
    oldest_pending: Family<TableLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
}

impl Gauges {
    fn register(bg: &Background) -> Gauges {
        let g = Gauges::default();
        let m = bg.metrics();
        m.register(
            "mediafarm_persist_stream_length",
            "Entries in a table's Redis Stream, acknowledged or not",
            g.length.clone(),
        );
        m.register(
            "mediafarm_persist_stream_unread",
            "Entries of a table's stream the consumer group has not read yet",
            g.unread.clone(),
        );
        m.register(
            "mediafarm_persist_stream_pending",
            "Entries of a table's stream read by a worker and not yet acknowledged (not committed)",
            g.pending.clone(),
        );
        m.register(
            "mediafarm_persist_stream_oldest_pending_seconds",
            "Age of the oldest entry read and not yet acknowledged, by its stream id's time",
            g.oldest_pending.clone(),
        );
        g
    }
}

/// Probes and gauges until the worker stops.
pub async fn run(streams: Arc<Streams>, bg: Background) {
    let gauges = Gauges::register(&bg);
    let writer = &streams.batcher.writer;
    // One single-connection pool per database, and the tables each one holds.
    let mut probes: Vec<(Pool, Vec<String>)> = Vec::new();
    let mut tables_of: BTreeMap<&String, Vec<String>> = BTreeMap::new();
    for (table, url) in &writer.by_table {
        tables_of.entry(url).or_default().push(table.clone());
    }
    for (url, mut tables) in tables_of {
        if let Some(target) = writer.targets.get(url) {
            tables.sort();
            probes.push((target.pool(1, PROBE_TIMEOUT), tables));
        }
    }
    let mut conn = bg.backend().connection();
    loop {
        let mut down = Vec::new();
        for (pool, tables) in &probes {
            let ok = tokio::time::timeout(PROBE_TIMEOUT, pool.ping())
                .await
                .unwrap_or(false);
            if !ok {
                down.push(tables.join("`, `"));
            }
        }
        bg.set_not_ready((!down.is_empty()).then(|| {
            format!(
                "the database of table(s) `{}` is unreachable",
                down.join("`, `")
            )
        }));
        for table in streams.tables() {
            let labels = TableLabels {
                table: table.clone(),
            };
            match backlog(&mut conn, &streams.stream(&table), &streams.group).await {
                Ok(b) => {
                    if let (true, Some(below)) = (streams.trim, &b.acknowledged_below) {
                        trim(&mut conn, &streams.stream(&table), below).await;
                    }
                    gauges.length.get_or_create(&labels).set(b.length);
                    gauges.unread.get_or_create(&labels).set(b.unread);
                    gauges.pending.get_or_create(&labels).set(b.pending);
                    gauges
                        .oldest_pending
                        .get_or_create(&labels)
                        .set(b.oldest_pending_s);
                }
                Err(e) => tracing::debug!(table, error = %e, "cannot read the stream's backlog"),
            }
        }
        if !bg.pause(EVERY).await {
            break;
        }
    }
    bg.set_not_ready(None);
}

/// A stream's backlog, as the gauges show it.
#[derive(Debug, Default, PartialEq)]
pub struct Backlog {
    pub length: i64,
    pub unread: i64,
    pub pending: i64,
    pub oldest_pending_s: f64,
    /// Every entry with a smaller id is acknowledged by the group (`None`: the group is not
    /// made yet, or the stream is empty).
    pub acknowledged_below: Option<String>,
}

/// Drops a stream's acknowledged entries below `below` (a failure is only logged: the next
/// round tries again).
async fn trim(conn: &mut ConnectionManager, stream: &str, below: &str) {
    let trimmed: Result<i64, _> = redis::cmd("XTRIM")
        .arg(stream)
        .arg("MINID")
        .arg(below)
        .query_async(conn)
        .await;
    match trimmed {
        Ok(n) if n > 0 => tracing::debug!(stream, n, "trimmed acknowledged entries"),
        Ok(_) => {}
        Err(e) => tracing::warn!(stream, error = %e, "cannot trim the stream"),
    }
}

fn int(v: &Redis) -> Option<i64> {
    match v {
        Redis::Int(n) => Some(*n),
        Redis::BulkString(b) => std::str::from_utf8(b).ok()?.parse().ok(),
        Redis::SimpleString(s) => s.parse().ok(),
        _ => None,
    }
}

fn text(v: &Redis) -> Option<String> {
    match v {
        Redis::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Redis::SimpleString(s) => Some(s.clone()),
        _ => None,
    }
}

/// The fields of one `XINFO GROUPS` entry (RESP2 flat array or RESP3 map).
fn fields(v: &Redis) -> HashMap<String, &Redis> {
    match v {
        Redis::Array(items) => items
            .chunks(2)
            .filter_map(|p| Some((text(p.first()?)?, p.get(1)?)))
            .collect(),
        Redis::Map(items) => items
            .iter()
            .filter_map(|(k, v)| Some((text(k)?, v)))
            .collect(),
        _ => HashMap::new(),
    }
}

/// Reads `stream`'s backlog for `group` (`XLEN`, `XINFO GROUPS`, `XPENDING`).
pub async fn backlog(
    conn: &mut ConnectionManager,
    stream: &str,
    group: &str,
) -> Result<Backlog, redis::RedisError> {
    let mut b = Backlog {
        length: redis::cmd("XLEN").arg(stream).query_async(conn).await?,
        ..Backlog::default()
    };
    if b.length == 0 {
        return Ok(b);
    }
    let groups: Redis = match redis::cmd("XINFO")
        .arg("GROUPS")
        .arg(stream)
        .query_async(conn)
        .await
    {
        Ok(g) => g,
        // No such key (deleted since XLEN): nothing to show.
        Err(_) => return Ok(b),
    };
    let info = match &groups {
        Redis::Array(all) => all
            .iter()
            .map(fields)
            .find(|f| f.get("name").and_then(|v| text(v)).as_deref() == Some(group)),
        _ => None,
    };
    let Some(info) = info else {
        // The group is not made yet: no worker has read any of it.
        b.unread = b.length;
        return Ok(b);
    };
    // `lag` is nil when Redis cannot tell (entries deleted from the middle): show the length.
    b.unread = info.get("lag").and_then(|v| int(v)).unwrap_or(b.length);
    let last_delivered = info.get("last-delivered-id").and_then(|v| text(v));
    let summary: Redis = redis::cmd("XPENDING")
        .arg(stream)
        .arg(group)
        .query_async(conn)
        .await?;
    if let Redis::Array(parts) = &summary {
        b.pending = parts.first().and_then(int).unwrap_or(0);
        let oldest = parts.get(1).and_then(text);
        let ms = oldest
            .as_deref()
            .and_then(|id| id.split_once('-'))
            .and_then(|(ms, _)| ms.parse::<i64>().ok());
        if let (Some(ms), true) = (ms, b.pending > 0) {
            let now = chrono::Utc::now().timestamp_millis();
            b.oldest_pending_s = (now - ms).max(0) as f64 / 1000.0;
        }
        b.acknowledged_below = if b.pending > 0 {
            oldest
        } else {
            last_delivered.filter(|id| id != "0-0")
        };
    }
    Ok(b)
}

//! The batcher: one task per worker that gathers checked rows from every running job, up to
//! `persist_batch_size` rows or `persist_batch_wait` after the first, and writes them one
//! transaction per table. A job's future waits for its row's outcome, so the runtime stores
//! the job's result — and acknowledges its message — only after the row is committed.
//!
//! **Order.** A batch's rows are split by key into `persist_write_lanes` lanes (a hash of
//! table and key): each lane writes its parts one after another, on a connection of its own,
//! while the other lanes write theirs, so every write to one key goes through one lane in
//! the order it arrived. Inside a lane's part, writes to one key are ordered by version (then
//! arrival) and written in rounds — the first write of every key, then the second, … — in the
//! one transaction, so the outcome is that of writing them one by one. Rows are never merged.
//!
//! **A bad row.** When the database refuses a batch for its data, the batch is rolled back and
//! its rows are written one per transaction, in the same order: the refused ones fail alone
//! (permanently), the others commit. When the database is down, every job of the batch gets a
//! transient error and is retried by the runtime.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use mediafarm::TaskError;
use tokio::sync::{mpsc, oneshot};

use crate::db::{Failure, Pool, Target};
use crate::schema::{Row, TableSpec, Tables};

/// One row waiting for its batch.
pub struct Pending {
    pub table: String,
    pub row: Row,
    pub done: oneshot::Sender<Result<(), TaskError>>,
}

/// What the batcher writes with: the declarations and a pool per table.
pub struct Writer {
    pub tables: Tables,
    /// Each database URL's parsed options.
    pub targets: HashMap<String, Target>,
    /// Each table's database URL.
    pub by_table: HashMap<String, String>,
    pub pool_size: u32,
    pub connect_timeout: Duration,
    /// Each table's pool (tables on one database share it), made inside the runtime.
    pub pools: OnceLock<HashMap<String, Arc<Pool>>>,
    pub batch_size: usize,
    pub batch_wait: Duration,
    /// Parts of batches written at once (at least 1).
    pub lanes: usize,
}

impl Writer {
    /// Each table's pool, made on the first call.
    pub fn pools(&self) -> &HashMap<String, Arc<Pool>> {
        self.pools.get_or_init(|| {
            let by_url: HashMap<&String, Arc<Pool>> = self
                .targets
                .iter()
                .map(|(url, t)| (url, Arc::new(t.pool(self.pool_size, self.connect_timeout))))
                .collect();
            self.by_table
                .iter()
                .filter_map(|(table, url)| Some((table.clone(), by_url.get(url)?.clone())))
                .collect()
        })
    }
}

/// The tasks' handle on the batcher, started by the first row (the runtime does not exist
/// when the tasks are built).
pub struct Batcher {
    pub writer: Arc<Writer>,
    sender: OnceLock<mpsc::Sender<Pending>>,
}

impl Batcher {
    pub fn new(writer: Arc<Writer>) -> Batcher {
        Batcher {
            writer,
            sender: OnceLock::new(),
        }
    }

    /// Hands `row` to the batcher and waits until its batch has committed (or failed).
    pub async fn submit(&self, table: &str, row: Row) -> Result<(), TaskError> {
        self.enqueue(table, row).await?.wait().await
    }

    /// Hands `row` to the batcher without waiting for its batch: rows are written in the
    /// order they are enqueued, so a caller may read on while earlier rows are written.
    pub async fn enqueue(&self, table: &str, row: Row) -> Result<Outcome, TaskError> {
        let (done, outcome) = oneshot::channel();
        let sender = self.sender.get_or_init(|| spawn(self.writer.clone()));
        let pending = Pending {
            table: table.to_owned(),
            row,
            done,
        };
        if sender.send(pending).await.is_err() {
            return Err(TaskError::transient(
                "WorkerStopping",
                "the batcher has stopped",
            ));
        }
        Ok(Outcome(outcome))
    }
}

/// An enqueued row's outcome, known once its batch has committed (or failed).
pub struct Outcome(oneshot::Receiver<Result<(), TaskError>>);

impl Outcome {
    pub async fn wait(self) -> Result<(), TaskError> {
        self.0.await.unwrap_or_else(|_| {
            Err(TaskError::transient(
                "WorkerStopping",
                "the batcher stopped before the row's batch committed",
            ))
        })
    }
}

/// Starts the batcher; it ends when every sender is dropped.
pub fn spawn(writer: Arc<Writer>) -> mpsc::Sender<Pending> {
    let (tx, rx) = mpsc::channel(writer.batch_size.saturating_mul(2).max(16));
    tokio::spawn(run(writer, rx));
    tx
}

async fn run(writer: Arc<Writer>, mut rx: mpsc::Receiver<Pending>) {
    // A lane holds one part waiting beside the one it writes, so the next batch can gather
    // while every lane is busy, and a slow lane holds the gathering back instead of piling up.
    let lanes: Vec<mpsc::Sender<Vec<Pending>>> = (0..writer.lanes.max(1))
        .map(|_| {
            let (tx, rx) = mpsc::channel(1);
            tokio::spawn(lane(writer.clone(), rx));
            tx
        })
        .collect();
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        let deadline = tokio::time::Instant::now() + writer.batch_wait;
        while batch.len() < writer.batch_size {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(p)) => batch.push(p),
                _ => break,
            }
        }
        let mut parts: Vec<Vec<Pending>> = (0..lanes.len()).map(|_| Vec::new()).collect();
        for p in batch {
            let i = lane_of(&p, lanes.len());
            parts[i].push(p);
        }
        for (part, lane) in parts.into_iter().zip(&lanes) {
            if !part.is_empty() {
                // A lane ends only with the batcher: a failed send cannot happen while it runs.
                let _ = lane.send(part).await;
            }
        }
    }
}

/// The lane of a row: the same table and key always go to the same lane.
fn lane_of(p: &Pending, lanes: usize) -> usize {
    use std::hash::{Hash, Hasher};
    if lanes <= 1 {
        return 0;
    }
    let mut h = std::collections::hash_map::DefaultHasher::new();
    p.table.hash(&mut h);
    p.row.key.hash(&mut h);
    (h.finish() % lanes as u64) as usize
}

/// Writes the parts handed to one lane, one after another, a transaction per table.
async fn lane(writer: Arc<Writer>, mut parts: mpsc::Receiver<Vec<Pending>>) {
    while let Some(part) = parts.recv().await {
        let mut by_table: BTreeMap<String, Vec<Pending>> = BTreeMap::new();
        for p in part {
            by_table.entry(p.table.clone()).or_default().push(p);
        }
        let writes = by_table
            .into_iter()
            .map(|(table, rows)| write_table(&writer, table, rows));
        futures_util::future::join_all(writes).await;
    }
}

/// The order rows are written in: rounds of distinct keys (see the module doc), each round's
/// rows grouped by their columns. Returns indices into `rows`.
pub fn plan(rows: &[&Row]) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..rows.len()).collect();
    order.sort_by(|&a, &b| {
        (&rows[a].key, rows[a].version, a).cmp(&(&rows[b].key, rows[b].version, b))
    });
    let mut round_of = vec![0usize; rows.len()];
    for w in 1..order.len() {
        let (prev, cur) = (order[w - 1], order[w]);
        if rows[prev].key == rows[cur].key {
            round_of[cur] = round_of[prev] + 1;
        }
    }
    let rounds = round_of.iter().max().map_or(0, |m| m + 1);
    let mut statements = Vec::new();
    for round in 0..rounds {
        let mut groups: BTreeMap<&[String], Vec<usize>> = BTreeMap::new();
        for (i, row) in rows.iter().enumerate() {
            if round_of[i] == round {
                groups.entry(&row.columns).or_default().push(i);
            }
        }
        statements.extend(groups.into_values());
    }
    statements
}

async fn write_table(writer: &Writer, table: String, pending: Vec<Pending>) {
    let (Some(spec), Some(pool)) = (writer.tables.0.get(&table), writer.pools().get(&table)) else {
        for p in pending {
            let _ = p.done.send(Err(TaskError::permanent(
                "UnknownTable",
                format!("table {table:?} has no declaration"),
            )));
        }
        return;
    };
    let rows: Vec<&Row> = pending.iter().map(|p| &p.row).collect();
    let plan = plan(&rows);
    let statements: Vec<Vec<&Row>> = plan
        .iter()
        .map(|s| s.iter().map(|&i| rows[i]).collect())
        .collect();
    let outcome = pool.write(&table, spec, &statements).await;
    let mut results: Vec<Option<Result<(), TaskError>>> = match outcome {
        Ok(()) => {
            tracing::debug!(table, rows = rows.len(), "batch committed");
            vec![Some(Ok(())); rows.len()]
        }
        Err(Failure::Down(why)) => {
            tracing::warn!(table, rows = rows.len(), error = %why, "database unavailable");
            vec![Some(Err(down(&table, &why))); rows.len()]
        }
        Err(Failure::Row(why)) => {
            tracing::info!(table, error = %why, "batch refused; writing its rows one by one");
            one_by_one(&table, spec, pool, &rows, &plan).await
        }
    };
    for (i, p) in pending.into_iter().enumerate() {
        let r = results[i]
            .take()
            .unwrap_or_else(|| Err(down(&table, "the batch ended early")));
        let _ = p.done.send(r);
    }
}

fn down(table: &str, why: &str) -> TaskError {
    TaskError::transient(
        "DatabaseUnavailable",
        format!("table `{table}`: the database is unavailable: {why}"),
    )
}

async fn one_by_one(
    table: &str,
    spec: &TableSpec,
    pool: &Pool,
    rows: &[&Row],
    plan: &[Vec<usize>],
) -> Vec<Option<Result<(), TaskError>>> {
    let mut results = vec![None; rows.len()];
    let mut unavailable: Option<String> = None;
    for &i in plan.iter().flatten() {
        if let Some(why) = &unavailable {
            results[i] = Some(Err(down(table, why)));
            continue;
        }
        results[i] = Some(match pool.write(table, spec, &[vec![rows[i]]]).await {
            Ok(()) => Ok(()),
            Err(Failure::Down(why)) => {
                let e = down(table, &why);
                unavailable = Some(why);
                Err(e)
            }
            Err(Failure::Row(why)) => Err(refused(table, rows[i], &why)),
        });
    }
    results
}

fn refused(table: &str, row: &Row, why: &str) -> TaskError {
    let cells: Vec<String> = row
        .columns
        .iter()
        .zip(&row.cells)
        .map(|(c, v)| format!("{c} = {v:?}"))
        .collect();
    TaskError::permanent(
        "RowRefused",
        format!(
            "table `{table}` refused the row ({}): {why}",
            cells.join(", ")
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(key: &str, version: Option<i64>, columns: &[&str]) -> Row {
        Row {
            columns: columns.iter().map(|c| (*c).to_owned()).collect(),
            cells: Vec::new(),
            key: vec![key.to_owned()],
            version,
        }
    }

    #[test]
    fn writes_to_one_key_go_in_rounds_by_version() {
        let rows = [
            row("1", Some(5), &["id", "a"]),
            row("2", Some(1), &["id", "a"]),
            row("1", Some(3), &["id", "a"]),
            row("3", Some(1), &["id", "b"]),
            row("1", Some(4), &["id", "b"]),
        ];
        let refs: Vec<&Row> = rows.iter().collect();
        // Round 0: key 1 v3, key 2, key 3 (two column sets); round 1: key 1 v4; round 2: v5.
        assert_eq!(plan(&refs), vec![vec![1, 2], vec![3], vec![4], vec![0]]);
    }

    #[test]
    fn without_versions_arrival_decides() {
        let rows = [row("1", None, &["id"]), row("1", None, &["id"])];
        let refs: Vec<&Row> = rows.iter().collect();
        assert_eq!(plan(&refs), vec![vec![0], vec![1]]);
    }
}

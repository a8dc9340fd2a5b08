//! `persist.write`: one row (`table`, `key`, `values`, optional `version`) checked against the
//! declared tables, handed to the batcher, and answered `{table, rows}` once its batch has
//! committed. A row that cannot be written fails alone, naming table, column and value; a
//! database that is down makes the job retry (the runtime's backoff) — the message is never
//! acknowledged before its row is committed.

use std::sync::Arc;

use crate::batch::Batcher;
use mediafarm::{Task, TaskContext, TaskError};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct WriteArgs {
    /// A table declared in `persist_tables`.
    pub table: String,
    /// The key columns' values.
    pub key: Map<String, Value>,
    /// The other columns' values (only these columns are written).
    #[serde(default)]
    pub values: Map<String, Value>,
    /// Decides the last writer when the table declares a version column.
    #[serde(default)]
    pub version: Option<i64>,
}

/// What a committed write answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WriteResult {
    pub table: String,
    pub rows: u32,
}

pub struct Write {
    batcher: Arc<Batcher>,
}

impl Write {
    pub fn new(batcher: Arc<Batcher>) -> Write {
        Write { batcher }
    }
}

impl Task for Write {
    const NAME: &'static str = "persist.write";
    type Args = WriteArgs;
    type Output = WriteResult;

    async fn run(&self, ctx: TaskContext, args: WriteArgs) -> Result<WriteResult, TaskError> {
        let row = self
            .batcher
            .writer
            .tables
            .row(&args.table, &args.key, &args.values, args.version)
            .map_err(|e| TaskError::invalid("RowRefused", e.0))?;
        self.batcher.submit(&args.table, row).await?;
        tracing::debug!(job = %ctx.id, table = %args.table, "row committed");
        Ok(WriteResult {
            table: args.table,
            rows: 1,
        })
    }
}

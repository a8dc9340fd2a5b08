//! `persist.write`: one row (`table`, `key`, `values`, optional `version`) checked against the
//! declared tables, handed to the batcher, and answered `{table, rows}` once its batch has
//! committed. A row that cannot be written fails alone, naming table, column and value; a
//! database that is down makes the job retry (the runtime's backoff) — the message is never
//! acknowledged before its row is committed.
//!
//! In a workflow, a parent's result arrives in `parent` and `from_parent` names, per column,
//! the JSON Pointer (RFC 6901) of the value to write there: `image.transform` → `persist.write`
//! with `from_parent = {"avatar_url": "/outputs/0/url"}` stores the new avatar's URL.

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
    /// A workflow parent's result (the chain's previous step).
    #[serde(default)]
    pub parent: Option<Value>,
    /// Column → JSON Pointer into `parent` of the value written there (over `values`).
    #[serde(default)]
    pub from_parent: Map<String, Value>,
}

impl WriteArgs {
    /// `values` with the columns `from_parent` takes from the parent's result.
    fn values(&self) -> Result<Map<String, Value>, String> {
        let mut values = self.values.clone();
        if self.from_parent.is_empty() {
            return Ok(values);
        }
        let Some(parent) = &self.parent else {
            return Err(
                "`from_parent` is set but no parent result came (send persist.write \
                        as a chain step or callback, not immutable)"
                    .into(),
            );
        };
        for (column, pointer) in &self.from_parent {
            let Some(pointer) = pointer.as_str() else {
                return Err(format!(
                    "`from_parent.{column}` must be a JSON Pointer string such as \"/outputs/0/url\""
                ));
            };
            let Some(value) = parent.pointer(pointer) else {
                return Err(format!(
                    "`from_parent.{column}`: the parent's result has nothing at {pointer:?}"
                ));
            };
            values.insert(column.clone(), value.clone());
        }
        Ok(values)
    }
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
    const PARENT_RESULT: Option<&'static str> = Some("parent");
    type Args = WriteArgs;
    type Output = WriteResult;

    async fn run(&self, ctx: TaskContext, args: WriteArgs) -> Result<WriteResult, TaskError> {
        let values = args
            .values()
            .map_err(|e| TaskError::invalid("RowRefused", e))?;
        let row = self
            .batcher
            .writer
            .tables
            .row(&args.table, &args.key, &values, args.version)
            .map_err(|e| TaskError::invalid("RowRefused", e.0))?;
        self.batcher.submit(&args.table, row).await?;
        tracing::debug!(job = %ctx.id, table = %args.table, "row committed");
        Ok(WriteResult {
            table: args.table,
            rows: 1,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn args(v: Value) -> WriteArgs {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn columns_are_taken_from_the_parent_result_by_pointer() {
        let a = args(json!({
            "table": "profiles", "key": {"id": 7}, "values": {"name": "a", "avatar": "old"},
            "parent": {"outputs": [{"url": "s3://b/7-large.jpg"}, {"url": "s3://b/7-small.jpg"}]},
            "from_parent": {"avatar": "/outputs/0/url", "thumb": "/outputs/1/url"},
        }));
        assert_eq!(
            Value::Object(a.values().unwrap()),
            json!({"name": "a", "avatar": "s3://b/7-large.jpg", "thumb": "s3://b/7-small.jpg"})
        );
    }

    #[test]
    fn a_missing_parent_or_path_is_named() {
        let a = args(json!({"table": "t", "key": {"id": 1}, "from_parent": {"c": "/x"}}));
        assert!(a.values().unwrap_err().contains("no parent result"));
        let a = args(
            json!({"table": "t", "key": {"id": 1}, "parent": {"y": 1}, "from_parent": {"c": "/x"}}),
        );
        let e = a.values().unwrap_err();
        assert!(e.contains("from_parent.c") && e.contains("/x"), "{e}");
        let a =
            args(json!({"table": "t", "key": {"id": 1}, "parent": {}, "from_parent": {"c": 3}}));
        assert!(a.values().unwrap_err().contains("JSON Pointer"));
        let a = args(json!({"table": "t", "key": {"id": 1}, "values": {"c": 1}}));
        assert_eq!(Value::Object(a.values().unwrap()), json!({"c": 1}));
    }
}

//! The databases: one lazily connecting pool per URL, and the write of a batch's statements in
//! one transaction. A failure is sorted into [`Failure::Row`] (the data was refused: retrying
//! the same row cannot help) or [`Failure::Down`] (the server or the connection: retry later).

use std::str::FromStr;
use std::time::Duration;

use sqlx::mysql::{MySqlConnectOptions, MySqlPoolOptions};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

use crate::schema::{Cell, ColumnType, Row, TableSpec};
use crate::sql::{self, Dialect};

/// A database's connection options, parsed at start-up.
#[derive(Debug, Clone)]
pub enum Target {
    Pg(PgConnectOptions),
    My(MySqlConnectOptions),
}

impl Target {
    pub fn parse(url: &str) -> Result<Target, String> {
        if url.starts_with("mysql://") {
            MySqlConnectOptions::from_str(url)
                .map(Target::My)
                .map_err(|e| e.to_string())
        } else {
            PgConnectOptions::from_str(url)
                .map(Target::Pg)
                .map_err(|e| e.to_string())
        }
    }

    /// A pool that connects on first use (must be called inside the Tokio runtime).
    pub fn pool(&self, size: u32, timeout: Duration) -> Pool {
        match self {
            Target::Pg(o) => Pool::Pg(
                PgPoolOptions::new()
                    .max_connections(size)
                    .acquire_timeout(timeout)
                    .connect_lazy_with(o.clone()),
            ),
            Target::My(o) => Pool::My(
                MySqlPoolOptions::new()
                    .max_connections(size)
                    .acquire_timeout(timeout)
                    .connect_lazy_with(o.clone()),
            ),
        }
    }
}

pub enum Pool {
    Pg(sqlx::PgPool),
    My(sqlx::MySqlPool),
}

/// Why a write did not commit.
#[derive(Debug, Clone)]
pub enum Failure {
    /// The database refused the data (a constraint, a value out of range, a missing column).
    Row(String),
    /// The database could not be reached or gave up for reasons of its own.
    Down(String),
}

/// SQLSTATE classes that say nothing about the data: connection (08), rollback (40),
/// resources (53), operator intervention (57), system (58).
const PASSING: &[&str] = &["08", "40", "53", "57", "58"];

impl From<sqlx::Error> for Failure {
    fn from(e: sqlx::Error) -> Failure {
        match &e {
            sqlx::Error::Database(db) => {
                let code = db.code().unwrap_or_default();
                if PASSING.iter().any(|c| code.starts_with(c)) {
                    Failure::Down(e.to_string())
                } else {
                    Failure::Row(db.message().to_owned())
                }
            }
            _ => Failure::Down(e.to_string()),
        }
    }
}

type MyQuery<'q> = sqlx::query::Query<'q, sqlx::MySql, sqlx::mysql::MySqlArguments>;

/// Binds every cell of `rows`, row by row, for MySQL's multi-row `VALUES`.
fn bind_cells<'q>(mut q: MyQuery<'q>, rows: &[&Row]) -> MyQuery<'q> {
    for row in rows {
        for cell in &row.cells {
            q = match cell {
                Cell::Null(ColumnType::Int) => q.bind(None::<i64>),
                Cell::Null(ColumnType::Float) => q.bind(None::<f64>),
                Cell::Null(ColumnType::Bool) => q.bind(None::<bool>),
                Cell::Null(_) => q.bind(None::<String>),
                Cell::Int(n) => q.bind(*n),
                Cell::Float(f) => q.bind(*f),
                Cell::Bool(b) => q.bind(*b),
                Cell::Text(s) | Cell::Json(s) => q.bind(s.clone()),
                Cell::Timestamp(t) => q.bind(Cell::mysql_datetime(t)),
            };
        }
    }
    q
}

impl Pool {
    pub fn dialect(&self) -> Dialect {
        match self {
            Pool::Pg(_) => Dialect::Postgres,
            Pool::My(_) => Dialect::MySql,
        }
    }

    /// Writes `statements` (each a list of rows with the same columns) in order, in one
    /// transaction; nothing is kept unless all of them are. PostgreSQL gets one statement of
    /// column arrays per list ([`sql::upsert_arrays`]); MySQL multi-row `VALUES`, in chunks
    /// under its parameter limit.
    pub async fn write(
        &self,
        table: &str,
        spec: &TableSpec,
        statements: &[Vec<&Row>],
    ) -> Result<(), Failure> {
        match self {
            Pool::Pg(pool) => {
                let mut tx = pool.begin().await?;
                for rows in statements.iter().filter(|r| !r.is_empty()) {
                    let columns = &rows[0].columns;
                    let text = sql::upsert_arrays(table, spec, columns);
                    let mut q = sqlx::query(&text);
                    for (i, ty) in sql::column_types(spec, columns).into_iter().enumerate() {
                        q = bind_column(q, ty, rows, i)?;
                    }
                    q.execute(&mut *tx).await?;
                }
                tx.commit().await?;
            }
            Pool::My(pool) => {
                let mut tx = pool.begin().await?;
                for rows in statements {
                    for chunk in chunks(rows) {
                        let text = sql::upsert(
                            Dialect::MySql,
                            table,
                            spec,
                            &chunk[0].columns,
                            chunk.len(),
                        );
                        let q = bind_cells(sqlx::query(&text), chunk);
                        q.execute(&mut *tx).await?;
                    }
                }
                tx.commit().await?;
            }
        }
        Ok(())
    }

    /// Whether the database answers (for readiness).
    pub async fn ping(&self) -> bool {
        match self {
            Pool::Pg(p) => sqlx::query("SELECT 1").execute(p).await.is_ok(),
            Pool::My(p) => sqlx::query("SELECT 1").execute(p).await.is_ok(),
        }
    }
}

type PgQuery<'q> = sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>;

/// Binds column `i` of `rows` as one array of its declared type (see [`sql::array_type`]).
/// Every row of a statement has the same columns, each cell of its column's type
/// ([`crate::schema`] checked it); a cell of another type is refused, not guessed.
fn bind_column<'q>(
    q: PgQuery<'q>,
    ty: ColumnType,
    rows: &[&Row],
    i: usize,
) -> Result<PgQuery<'q>, Failure> {
    fn collect<T>(
        rows: &[&Row],
        i: usize,
        pick: impl Fn(&Cell) -> Option<Option<T>>,
    ) -> Result<Vec<Option<T>>, Failure> {
        rows.iter()
            .map(|row| {
                let cell = row.cells.get(i);
                cell.and_then(|c| match c {
                    Cell::Null(_) => Some(None),
                    other => pick(other),
                })
                .ok_or_else(|| {
                    Failure::Row(format!(
                        "column `{}` holds {cell:?}, not a value of its declared type",
                        row.columns.get(i).map_or("?", String::as_str)
                    ))
                })
            })
            .collect()
    }
    Ok(match ty {
        ColumnType::Int => q.bind(collect(rows, i, |c| match c {
            Cell::Int(n) => Some(Some(*n)),
            _ => None,
        })?),
        ColumnType::Float => q.bind(collect(rows, i, |c| match c {
            Cell::Float(f) => Some(Some(*f)),
            _ => None,
        })?),
        ColumnType::Bool => q.bind(collect(rows, i, |c| match c {
            Cell::Bool(b) => Some(Some(*b)),
            _ => None,
        })?),
        ColumnType::Text | ColumnType::Json | ColumnType::Timestamp => {
            q.bind(collect(rows, i, |c| match c {
                Cell::Text(s) | Cell::Json(s) => Some(Some(s.clone())),
                Cell::Timestamp(t) => Some(Some(Cell::rfc3339(t))),
                _ => None,
            })?)
        }
    })
}

/// Rows split into statements of a power of two rows each (largest first), none binding more
/// than [`sql::MAX_PARAMS`] values. The driver prepares each statement text once per
/// connection and keeps it: with any row count allowed, nearly every batch would be a text of
/// its own, prepared and closed again, which costs the server more than the write.
fn chunks<'a>(rows: &'a [&'a Row]) -> impl Iterator<Item = &'a [&'a Row]> {
    let width = rows.first().map_or(1, |r| r.cells.len().max(1));
    let cap = prev_power_of_two((sql::MAX_PARAMS / width).clamp(1, MAX_CHUNK_ROWS));
    let mut rest = rows;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let (chunk, tail) = rest.split_at(prev_power_of_two(rest.len()).min(cap));
        rest = tail;
        Some(chunk)
    })
}

/// Most rows in one MySQL statement.
const MAX_CHUNK_ROWS: usize = 1024;

/// The largest power of two not above `n` (n ≥ 1).
fn prev_power_of_two(n: usize) -> usize {
    1 << (usize::BITS - 1 - n.max(1).leading_zeros())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statements_come_in_powers_of_two() {
        let row = Row {
            columns: vec!["id".into()],
            cells: vec![Cell::Int(1)],
            key: vec!["1".into()],
            version: None,
        };
        let rows: Vec<&Row> = std::iter::repeat_n(&row, 2_500).collect();
        let sizes: Vec<usize> = chunks(&rows).map(<[_]>::len).collect();
        assert_eq!(sizes, vec![1024, 1024, 256, 128, 64, 4]);
        assert_eq!(prev_power_of_two(1), 1);
        assert_eq!(prev_power_of_two(1000), 512);
    }
}

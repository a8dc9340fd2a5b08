//! The tables persist-worker may write, as declared in `[persist_tables.<name>]`, and the check
//! of one incoming write against them. Nothing reaches SQL that is not in a declaration:
//! table and column names come from settings (checked here to be plain identifiers), and each
//! value must have its column's declared type; a write that fails names its table, column and
//! value.
//!
//! ```toml
//! [persist_tables.profiles]
//! key = ["user_id"]                # the conflict target: a primary key or unique index
//! version = "version"              # optional: the bigint column that decides the last writer
//! mode = "upsert"                  # or "append": insert, leave an existing key alone
//! database_url = "mysql://..."     # optional: over `persist_database_url`
//! columns = { user_id = "int", avatar_url = "text", version = "int" }
//! ```
//!
//! **Last writer.** With `version` set, a row is written only when its version is at least the
//! stored one (`>=`, so replaying a write changes nothing and a late, older write is ignored);
//! a write gives it as the job's `version` (or as that column in `values`). Without it, the
//! last write to arrive wins, which is right only for tables written by one producer in order.

use std::collections::BTreeMap;

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value as Json};

/// The type a column's values must have in a write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ColumnType {
    /// A JSON integer (64-bit).
    Int,
    /// Any JSON number.
    Float,
    /// A JSON string.
    Text,
    /// `true` or `false`.
    Bool,
    /// An RFC 3339 string (`2026-11-30T01:02:03Z`), stored as UTC.
    Timestamp,
    /// Any JSON value, stored as its text (`jsonb`/`json` in PostgreSQL, `JSON` in MySQL).
    Json,
}

/// What a write does to a key that is already stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Update the given columns (guarded by the version column, when there is one).
    #[default]
    Upsert,
    /// Insert only; a key already stored is left as it is (so a replay adds nothing).
    Append,
}

/// One `[persist_tables.<name>]` declaration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TableSpec {
    /// The key columns: the table's primary key or a unique index over exactly these.
    pub key: Vec<String>,
    /// Every column a write may set, with its type (key and version columns included).
    pub columns: BTreeMap<String, ColumnType>,
    /// The `int` column that decides the last writer; see the module doc.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    #[serde(default)]
    pub mode: Mode,
    /// The database of this table (`postgres://…` or `mysql://…`), over `persist_database_url`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub database_url: Option<String>,
}

/// Every declared table by name.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Tables(pub BTreeMap<String, TableSpec>);

/// Whether `name` is a plain SQL identifier: ASCII letters, digits and `_`, not starting with
/// a digit, at most 63 bytes (PostgreSQL's limit; MySQL's is 64).
pub fn is_identifier(name: &str) -> bool {
    let mut bytes = name.bytes();
    matches!(bytes.next(), Some(b) if b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
        && name.len() <= 63
}

/// URL schemes a table's database may have.
pub const DATABASE_SCHEMES: &[&str] = &["postgres", "postgresql", "mysql"];

impl Tables {
    /// Checks every declaration; the message says which table and what is wrong.
    pub fn check(&self) -> Result<(), String> {
        for (name, spec) in &self.0 {
            spec.check(name)?;
        }
        Ok(())
    }
}

impl TableSpec {
    fn check(&self, table: &str) -> Result<(), String> {
        let at = format!("[persist_tables.{table}]");
        if !is_identifier(table) {
            return Err(format!(
                "{at}: the table name must be letters, digits and _ (not starting with a digit)"
            ));
        }
        if self.key.is_empty() {
            return Err(format!("{at}: `key` names no column"));
        }
        for column in self.columns.keys() {
            if !is_identifier(column) {
                return Err(format!(
                    "{at}: column {column:?} must be letters, digits and _ (not starting with a digit)"
                ));
            }
        }
        for k in &self.key {
            if !self.columns.contains_key(k) {
                return Err(format!(
                    "{at}: key column `{k}` is not in `columns`; add it with its type"
                ));
            }
        }
        if let Some(v) = &self.version {
            match self.columns.get(v) {
                Some(ColumnType::Int) if !self.key.contains(v) => {}
                Some(ColumnType::Int) => {
                    return Err(format!("{at}: version column `{v}` is also a key column"))
                }
                Some(other) => {
                    return Err(format!(
                        "{at}: version column `{v}` is {other:?}; it must be \"int\""
                    ))
                }
                None => return Err(format!("{at}: version column `{v}` is not in `columns`")),
            }
        }
        if let Some(url) = &self.database_url {
            if !scheme_ok(url) {
                return Err(format!(
                    "{at}: database_url must start with postgres://, postgresql:// or mysql://"
                ));
            }
        }
        Ok(())
    }
}

/// Whether `url` has one of [`DATABASE_SCHEMES`].
pub fn scheme_ok(url: &str) -> bool {
    url.split_once("://")
        .is_some_and(|(s, rest)| DATABASE_SCHEMES.contains(&s) && !rest.is_empty())
}

/// One value, checked against its column's type.
#[derive(Debug, Clone, PartialEq)]
pub enum Cell {
    Null(ColumnType),
    Int(i64),
    Float(f64),
    Text(String),
    Bool(bool),
    Timestamp(DateTime<Utc>),
    /// The value's JSON text.
    Json(String),
}

impl Cell {
    /// `value` as a cell of type `ty`, or why not.
    pub fn check(ty: ColumnType, value: &Json) -> Result<Cell, &'static str> {
        Ok(match (ty, value) {
            (ColumnType::Json, v) => Cell::Json(v.to_string()),
            (ty, Json::Null) => Cell::Null(ty),
            (ColumnType::Int, Json::Number(n)) => {
                Cell::Int(n.as_i64().ok_or("not a whole number within 64 bits")?)
            }
            (ColumnType::Float, Json::Number(n)) => {
                Cell::Float(n.as_f64().ok_or("not a finite number")?)
            }
            (ColumnType::Text, Json::String(s)) => Cell::Text(s.clone()),
            (ColumnType::Bool, Json::Bool(b)) => Cell::Bool(*b),
            (ColumnType::Timestamp, Json::String(s)) => Cell::Timestamp(
                DateTime::parse_from_rfc3339(s)
                    .map_err(|_| "not an RFC 3339 time stamp such as 2026-11-30T01:02:03Z")?
                    .with_timezone(&Utc),
            ),
            (ColumnType::Int, _) => return Err("not an int"),
            (ColumnType::Float, _) => return Err("not a float"),
            (ColumnType::Text, _) => return Err("not a string"),
            (ColumnType::Bool, _) => return Err("not true or false"),
            (ColumnType::Timestamp, _) => return Err("not an RFC 3339 time stamp string"),
        })
    }

    /// The time stamp as PostgreSQL reads it (`::timestamptz`).
    pub fn rfc3339(t: &DateTime<Utc>) -> String {
        t.to_rfc3339_opts(SecondsFormat::Micros, true)
    }

    /// The time stamp as MySQL's DATETIME/TIMESTAMP read it (UTC, no zone).
    pub fn mysql_datetime(t: &DateTime<Utc>) -> String {
        t.format("%Y-%m-%d %H:%M:%S%.6f").to_string()
    }
}

/// A write checked against its table: the columns (keys first, the version column last), the
/// values in the same order, and the version.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub columns: Vec<String>,
    pub cells: Vec<Cell>,
    /// The key's values, for grouping writes to one key.
    pub key: Vec<String>,
    pub version: Option<i64>,
}

/// Why a write was refused: it names the table, the column and the value.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct Refused(pub String);

fn shown(v: &Json) -> String {
    let text = v.to_string();
    if text.chars().count() > 80 {
        format!("{}…", text.chars().take(80).collect::<String>())
    } else {
        text
    }
}

impl Tables {
    /// Checks a write of `key` and `values` (column → JSON value) to `table`.
    pub fn row(
        &self,
        table: &str,
        key: &Map<String, Json>,
        values: &Map<String, Json>,
        version: Option<i64>,
    ) -> Result<Row, Refused> {
        let spec = self.0.get(table).ok_or_else(|| {
            let known: Vec<&str> = self.0.keys().map(String::as_str).collect();
            Refused(format!(
                "table {:?} is not declared in persist_tables (declared: {})",
                table,
                if known.is_empty() {
                    "none".to_owned()
                } else {
                    known.join(", ")
                }
            ))
        })?;
        let cell = |column: &str, value: &Json| -> Result<Cell, Refused> {
            let ty = spec.columns.get(column).ok_or_else(|| {
                Refused(format!(
                    "table `{table}`: column {column:?} is not declared (value {})",
                    shown(value)
                ))
            })?;
            Cell::check(*ty, value).map_err(|why| {
                Refused(format!(
                    "table `{table}`, column `{column}`: value {} is {why} (declared {})",
                    shown(value),
                    serde_json::to_string(ty).unwrap_or_default()
                ))
            })
        };
        for column in key.keys() {
            if !spec.key.contains(column) {
                return Err(Refused(format!(
                    "table `{table}`: {column:?} in `key` is not a key column (keys: {})",
                    spec.key.join(", ")
                )));
            }
        }
        let mut row = Row {
            columns: Vec::new(),
            cells: Vec::new(),
            key: Vec::new(),
            version: None,
        };
        for k in &spec.key {
            let value = key.get(k).ok_or_else(|| {
                Refused(format!("table `{table}`: key column `{k}` has no value"))
            })?;
            let c = cell(k, value)?;
            if matches!(c, Cell::Null(_)) {
                return Err(Refused(format!(
                    "table `{table}`, column `{k}`: a key value cannot be null"
                )));
            }
            row.key.push(value.to_string());
            row.columns.push(k.clone());
            row.cells.push(c);
        }
        for (column, value) in values {
            if spec.key.contains(column) {
                return Err(Refused(format!(
                    "table `{table}`: key column `{column}` belongs in `key`, not `values`"
                )));
            }
            if spec.version.as_deref() == Some(column.as_str()) {
                continue;
            }
            row.cells.push(cell(column, value)?);
            row.columns.push(column.clone());
        }
        if let Some(vcol) = &spec.version {
            let given = values.get(vcol);
            let from_values = match given {
                None => None,
                Some(v) => match cell(vcol, v)? {
                    Cell::Int(n) => Some(n),
                    _ => {
                        return Err(Refused(format!(
                            "table `{table}`, column `{vcol}`: the version cannot be null"
                        )))
                    }
                },
            };
            let v = match (version, from_values) {
                (Some(a), Some(b)) if a != b => {
                    return Err(Refused(format!(
                        "table `{table}`: `version` = {a} and values.{vcol} = {b} disagree"
                    )))
                }
                (Some(a), _) | (None, Some(a)) => a,
                (None, None) => {
                    return Err(Refused(format!(
                        "table `{table}` decides the last writer by column `{vcol}`: give \
                         `version` (a whole number that grows with each write of a key)"
                    )))
                }
            };
            row.version = Some(v);
            row.columns.push(vcol.clone());
            row.cells.push(Cell::Int(v));
        } else if version.is_some() {
            return Err(Refused(format!(
                "table `{table}` declares no version column, so `version` cannot be used"
            )));
        }
        Ok(row)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn tables() -> Tables {
        let spec: TableSpec = toml::from_str(
            "key = [\"id\"]\nversion = \"v\"\ncolumns = { id = \"int\", name = \"text\", \
             v = \"int\", at = \"timestamp\", doc = \"json\", ok = \"bool\", x = \"float\" }",
        )
        .unwrap();
        Tables(BTreeMap::from([("users".to_owned(), spec)]))
    }

    fn obj(v: Json) -> Map<String, Json> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn a_good_write_puts_keys_first_and_the_version_last() {
        let row = tables()
            .row(
                "users",
                &obj(json!({"id": 7})),
                &obj(json!({"name": "ann", "ok": true, "at": "2026-01-02T03:04:05+01:00"})),
                Some(3),
            )
            .unwrap();
        assert_eq!(row.columns, ["id", "at", "name", "ok", "v"]);
        assert_eq!(row.cells[0], Cell::Int(7));
        assert_eq!(row.cells[4], Cell::Int(3));
        match &row.cells[1] {
            Cell::Timestamp(t) => assert_eq!(Cell::mysql_datetime(t), "2026-01-02 02:04:05.000000"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn refusals_name_table_column_and_value() {
        let t = tables();
        let e = t
            .row(
                "users",
                &obj(json!({"id": 1})),
                &obj(json!({"name": 5})),
                Some(1),
            )
            .unwrap_err()
            .0;
        assert!(
            e.contains("`users`") && e.contains("`name`") && e.contains('5'),
            "{e}"
        );
        let e = t
            .row(
                "users",
                &obj(json!({"id": 1})),
                &obj(json!({"nope": "x"})),
                Some(1),
            )
            .unwrap_err()
            .0;
        assert!(e.contains("\"nope\"") && e.contains("\"x\""), "{e}");
        let e = t
            .row("people", &obj(json!({"id": 1})), &Map::new(), Some(1))
            .unwrap_err()
            .0;
        assert!(e.contains("people") && e.contains("users"), "{e}");
        let e = t
            .row("users", &obj(json!({"id": 1.5})), &Map::new(), Some(1))
            .unwrap_err()
            .0;
        assert!(e.contains("`id`") && e.contains("1.5"), "{e}");
        let e = t
            .row("users", &obj(json!({"id": 1})), &Map::new(), None)
            .unwrap_err()
            .0;
        assert!(e.contains("version"), "{e}");
    }

    #[test]
    fn declarations_are_checked() {
        let mut t = tables();
        assert!(t.check().is_ok());
        t.0.get_mut("users").unwrap().version = Some("name".into());
        assert!(t.check().unwrap_err().contains("must be \"int\""));
        let mut t = tables();
        t.0.get_mut("users").unwrap().key = vec!["missing".into()];
        assert!(t.check().unwrap_err().contains("`missing`"));
        let mut t = tables();
        let spec = t.0.remove("users").unwrap();
        t.0.insert("users; drop".into(), spec);
        assert!(t.check().unwrap_err().contains("letters, digits"));
        assert!(!is_identifier("a\"b") && is_identifier("_a1"));
    }
}

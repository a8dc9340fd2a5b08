//! The SQL text of a multi-row upsert, per dialect. Identifiers come from settings (checked to
//! be plain identifiers by [`crate::schema`]) and are quoted all the same; every value is a
//! bound parameter, so nothing from a message is ever spliced into SQL.
//!
//! - PostgreSQL: `INSERT INTO "t" AS t (…) SELECT … FROM unnest($1::int8[], …) ON CONFLICT
//!   (key) DO UPDATE SET c = excluded.c, … WHERE excluded.version >= t.version` (append: `DO
//!   NOTHING`): one array per column, whatever the number of rows ([`upsert_arrays`]).
//! - MySQL / MariaDB: `INSERT INTO `t` (…) VALUES (…) ON DUPLICATE KEY UPDATE c =
//!   IF(VALUES(version) >= version, VALUES(c), c), …, version = IF(…)` — MySQL assigns left to
//!   right, so the version column comes last or the later tests would see the new version.

use crate::schema::{ColumnType, Mode, TableSpec};

/// Which server's SQL to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Postgres,
    MySql,
}

/// Most parameters one statement may bind (both servers count them in 16 bits).
pub const MAX_PARAMS: usize = 65_535;

impl Dialect {
    pub fn quote(self, ident: &str) -> String {
        match self {
            Dialect::Postgres => format!("\"{}\"", ident.replace('"', "\"\"")),
            Dialect::MySql => format!("`{}`", ident.replace('`', "``")),
        }
    }

    /// The placeholder of parameter `n` (from 1) of a column of type `ty`.
    fn param(self, n: usize, ty: ColumnType) -> String {
        match (self, ty) {
            (Dialect::MySql, _) => "?".into(),
            (Dialect::Postgres, ColumnType::Timestamp) => format!("${n}::timestamptz"),
            (Dialect::Postgres, ColumnType::Json) => format!("${n}::jsonb"),
            (Dialect::Postgres, _) => format!("${n}"),
        }
    }
}

/// The statement writing `rows` rows of `columns` (keys first, version last, as
/// [`crate::schema::Row`] orders them) into `table`, one bound parameter per value.
pub fn upsert(
    dialect: Dialect,
    table: &str,
    spec: &TableSpec,
    columns: &[String],
    rows: usize,
) -> String {
    let mut sql = insert_into(dialect, table, columns);
    sql.push_str(" VALUES ");
    let types = column_types(spec, columns);
    let mut n = 0;
    for r in 0..rows {
        if r > 0 {
            sql.push_str(", ");
        }
        sql.push('(');
        for (i, ty) in types.iter().enumerate() {
            if i > 0 {
                sql.push_str(", ");
            }
            n += 1;
            sql.push_str(&dialect.param(n, *ty));
        }
        sql.push(')');
    }
    sql.push_str(&on_conflict(dialect, spec, columns));
    sql
}

/// PostgreSQL's statement writing any number of rows of `columns` into `table` from one array
/// parameter per column (`SELECT … FROM unnest($1::int8[], …)`): its text does not depend on
/// the number of rows, so the server parses and plans it once per connection, and a batch
/// binds a handful of arrays instead of thousands of values. Arrays are bound as
/// [`array_type`] says; JSON and time stamp columns travel as text and are cast per element.
pub fn upsert_arrays(table: &str, spec: &TableSpec, columns: &[String]) -> String {
    let dialect = Dialect::Postgres;
    let mut sql = insert_into(dialect, table, columns);
    let types = column_types(spec, columns);
    let selected: Vec<String> = types
        .iter()
        .enumerate()
        .map(|(i, ty)| match ty {
            ColumnType::Json => format!("u.c{i}::jsonb"),
            ColumnType::Timestamp => format!("u.c{i}::timestamptz"),
            _ => format!("u.c{i}"),
        })
        .collect();
    let arrays: Vec<String> = types
        .iter()
        .enumerate()
        .map(|(i, ty)| format!("${}::{}", i + 1, array_type(*ty)))
        .collect();
    let aliases: Vec<String> = (0..types.len()).map(|i| format!("c{i}")).collect();
    sql.push_str(&format!(
        " SELECT {} FROM unnest({}) AS u({})",
        selected.join(", "),
        arrays.join(", "),
        aliases.join(", ")
    ));
    sql.push_str(&on_conflict(dialect, spec, columns));
    sql
}

/// The PostgreSQL array type a column's values are bound as in [`upsert_arrays`].
pub fn array_type(ty: ColumnType) -> &'static str {
    match ty {
        ColumnType::Int => "int8[]",
        ColumnType::Float => "float8[]",
        ColumnType::Bool => "bool[]",
        ColumnType::Text | ColumnType::Json | ColumnType::Timestamp => "text[]",
    }
}

/// Each column's declared type (text for a column the declaration does not name).
pub fn column_types(spec: &TableSpec, columns: &[String]) -> Vec<ColumnType> {
    columns
        .iter()
        .map(|c| spec.columns.get(c).copied().unwrap_or(ColumnType::Text))
        .collect()
}

/// `INSERT INTO "t" AS t ("a", "b")` (MySQL: no alias).
fn insert_into(dialect: Dialect, table: &str, columns: &[String]) -> String {
    let q = |c: &str| dialect.quote(c);
    let mut sql = format!("INSERT INTO {}", q(table));
    if dialect == Dialect::Postgres {
        sql.push_str(" AS t");
    }
    let names: Vec<String> = columns.iter().map(|c| q(c)).collect();
    sql.push_str(&format!(" ({})", names.join(", ")));
    sql
}

/// What a row whose key exists already does: the version decides (see the module doc).
fn on_conflict(dialect: Dialect, spec: &TableSpec, columns: &[String]) -> String {
    let q = |c: &str| dialect.quote(c);
    let mut sql = String::new();
    let updated: Vec<&String> = columns
        .iter()
        .filter(|c| !spec.key.contains(c) && spec.version.as_ref() != Some(*c))
        .collect();
    let version = spec
        .version
        .as_deref()
        .filter(|v| columns.iter().any(|c| c == v));
    match dialect {
        Dialect::Postgres => {
            let keys: Vec<String> = spec.key.iter().map(|k| q(k)).collect();
            sql.push_str(&format!(" ON CONFLICT ({}) DO ", keys.join(", ")));
            let mut sets: Vec<String> = updated
                .iter()
                .map(|c| format!("{0} = excluded.{0}", q(c)))
                .collect();
            if let Some(v) = version {
                sets.push(format!("{0} = excluded.{0}", q(v)));
            }
            if spec.mode == Mode::Append || sets.is_empty() {
                sql.push_str("NOTHING");
            } else {
                sql.push_str(&format!("UPDATE SET {}", sets.join(", ")));
                if let Some(v) = version {
                    sql.push_str(&format!(" WHERE excluded.{0} >= t.{0}", q(v)));
                }
            }
        }
        Dialect::MySql => {
            sql.push_str(" ON DUPLICATE KEY UPDATE ");
            let guard = |value: String, c: &str| match version {
                Some(v) => format!("IF(VALUES({0}) >= {0}, {value}, {1})", q(v), q(c)),
                None => value,
            };
            let mut sets: Vec<String> = Vec::new();
            if spec.mode == Mode::Upsert {
                sets = updated
                    .iter()
                    .map(|c| format!("{} = {}", q(c), guard(format!("VALUES({})", q(c)), c)))
                    .collect();
                // Last: every test above must still see the stored version.
                if let Some(v) = version {
                    sets.push(format!(
                        "{} = {}",
                        q(v),
                        guard(format!("VALUES({})", q(v)), v)
                    ));
                }
            }
            if sets.is_empty() {
                let k = q(&spec.key[0]);
                sets.push(format!("{k} = {k}"));
            }
            sql.push_str(&sets.join(", "));
        }
    }
    sql
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn spec(version: Option<&str>, mode: Mode) -> TableSpec {
        TableSpec {
            key: vec!["id".into()],
            columns: BTreeMap::from([
                ("id".into(), ColumnType::Int),
                ("name".into(), ColumnType::Text),
                ("at".into(), ColumnType::Timestamp),
                ("v".into(), ColumnType::Int),
            ]),
            version: version.map(Into::into),
            mode,
            database_url: None,
        }
    }

    fn cols(c: &[&str]) -> Vec<String> {
        c.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn postgres_upsert_is_guarded_by_the_version() {
        let sql = upsert(
            Dialect::Postgres,
            "users",
            &spec(Some("v"), Mode::Upsert),
            &cols(&["id", "at", "name", "v"]),
            2,
        );
        assert_eq!(
            sql,
            "INSERT INTO \"users\" AS t (\"id\", \"at\", \"name\", \"v\") VALUES \
             ($1, $2::timestamptz, $3, $4), ($5, $6::timestamptz, $7, $8) \
             ON CONFLICT (\"id\") DO UPDATE SET \"at\" = excluded.\"at\", \
             \"name\" = excluded.\"name\", \"v\" = excluded.\"v\" WHERE excluded.\"v\" >= t.\"v\""
        );
        let sql = upsert(
            Dialect::Postgres,
            "users",
            &spec(None, Mode::Append),
            &cols(&["id", "name"]),
            1,
        );
        assert!(sql.ends_with("ON CONFLICT (\"id\") DO NOTHING"), "{sql}");
    }

    #[test]
    fn postgres_arrays_cast_json_and_time_stamps_per_element() {
        let mut spec = spec(Some("v"), Mode::Upsert);
        spec.columns.insert("doc".into(), ColumnType::Json);
        let sql = upsert_arrays("users", &spec, &cols(&["id", "at", "doc", "v"]));
        assert_eq!(
            sql,
            "INSERT INTO \"users\" AS t (\"id\", \"at\", \"doc\", \"v\") \
             SELECT u.c0, u.c1::timestamptz, u.c2::jsonb, u.c3 \
             FROM unnest($1::int8[], $2::text[], $3::text[], $4::int8[]) AS u(c0, c1, c2, c3) \
             ON CONFLICT (\"id\") DO UPDATE SET \"at\" = excluded.\"at\", \
             \"doc\" = excluded.\"doc\", \"v\" = excluded.\"v\" WHERE excluded.\"v\" >= t.\"v\""
        );
    }

    #[test]
    fn mysql_updates_the_version_column_last() {
        let sql = upsert(
            Dialect::MySql,
            "users",
            &spec(Some("v"), Mode::Upsert),
            &cols(&["id", "name", "v"]),
            1,
        );
        assert_eq!(
            sql,
            "INSERT INTO `users` (`id`, `name`, `v`) VALUES (?, ?, ?) ON DUPLICATE KEY UPDATE \
             `name` = IF(VALUES(`v`) >= `v`, VALUES(`name`), `name`), \
             `v` = IF(VALUES(`v`) >= `v`, VALUES(`v`), `v`)"
        );
        let sql = upsert(
            Dialect::MySql,
            "users",
            &spec(None, Mode::Append),
            &cols(&["id", "name"]),
            1,
        );
        assert!(
            sql.ends_with("ON DUPLICATE KEY UPDATE `id` = `id`"),
            "{sql}"
        );
    }

    #[test]
    fn identifiers_are_quoted() {
        assert_eq!(Dialect::Postgres.quote("a\"b"), "\"a\"\"b\"");
        assert_eq!(Dialect::MySql.quote("a`b"), "`a``b`");
    }
}

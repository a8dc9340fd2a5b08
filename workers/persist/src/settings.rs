//! persist-worker's settings, declared once (see `mediafarm::settings::declare`): the tables it
//! may write (`[persist_tables.<name>]`, see [`crate::schema`]), the database, and the batch
//! bounds, and how the Redis Streams are read. Names start with `persist_`.

use std::time::Duration;

use mediafarm::settings::kinds::*;
use mediafarm::settings::{Reader, SettingsError, Value};

use crate::schema::{self, Tables};

mediafarm::settings_group! {
    /// The settings persist-worker reads beside the core ones.
    pub struct PersistSettings checked_by check {
        owner = "persist-worker";
        prefixes = ["persist_"];
        /// The database tables are written to: `postgres://user:pw@host:5432/db` or
        /// `mysql://user:pw@host:3306/db` (MySQL and MariaDB); a table's own `database_url`
        /// wins. Best given as `MEDIAFARM_PERSIST_DATABASE_URL`.
        persist_database_url: Option<String> = None, Url(schema::DATABASE_SCHEMES);
        /// The tables writes may reach, each as `[persist_tables.<name>]` with `key`, `columns`
        /// (name = "int" | "float" | "text" | "bool" | "timestamp" | "json"), optional
        /// `version` (the int column that decides the last writer), `mode` ("upsert" or
        /// "append") and `database_url`. In the environment: the same as a JSON object.
        persist_tables: Tables = Tables::default(), Custom(read_tables);
        /// Most rows in one batch (one transaction per table).
        persist_batch_size: u32 = 2000, Int(1, 50_000);
        /// Longest a row waits for its batch to fill before the batch is written anyway.
        persist_batch_wait: Duration = Duration::from_millis(50), Seconds;
        /// Connections kept to each database.
        persist_pool_size: u32 = 4, Int(1, 200);
        /// Batches written at once, each on its own connection: a batch's rows are split
        /// by key into this many lanes, and each lane writes its part in order, so writes to
        /// one key keep their order while other keys commit beside them.
        persist_write_lanes: u32 = 2, Int(1, 64);
        /// Longest a batch waits for a database connection before its jobs are retried.
        persist_connect_timeout: Duration = Duration::from_secs(5), SecondsOrDefault;
        /// Redis Stream of a table's buffered rows: this prefix + the table's name.
        persist_stream_prefix: String = "persist:".into(), Str;
        /// The consumer group the workers read the streams in.
        persist_stream_group: String = "persist-worker".into(), Str;
        /// The stream refused entries go to, each with its stream, id and reason.
        persist_stream_dead: String = "persist:dead".into(), Str;
        /// An entry read but not acknowledged for this long (its worker died) is claimed by
        /// the next `persist.flush`.
        persist_stream_claim_idle: Duration = Duration::from_secs(60), SecondsOrDefault;
        /// Read the streams continuously (`XREADGROUP … BLOCK`, one reader per table) instead
        /// of only on `persist.flush` jobs; the same acknowledgement, dead-letter and claim
        /// rules apply.
        persist_stream_continuous: bool = false, Bool;
        /// Trim each stream of the entries its group has acknowledged (`XTRIM … MINID`
        /// below the oldest entry read and not acknowledged, or not read yet), every few
        /// seconds; without it a stream keeps every row ever written. Turn it off when
        /// another consumer group reads the same streams.
        persist_stream_trim: bool = true, Bool;
    }
}

fn read_tables(reader: &Reader, name: &str, default: Tables) -> Result<Tables, SettingsError> {
    const ACCEPTED: &str = "tables as [persist_tables.<name>] with key, columns and optional \
                            version, mode, database_url (in the environment, a JSON object)";
    let Some(tables) = reader.named_tables::<Tables>(name, ACCEPTED)? else {
        return Ok(default);
    };
    tables.check().map_err(|why| reader.invalid(name, why))?;
    Ok(tables)
}

impl Value for Tables {
    fn shown(&self) -> String {
        Reader::shown_tables(self, self.0.is_empty())
    }
}

/// Every declared table has a database.
fn check(s: &PersistSettings) -> Result<(), SettingsError> {
    if s.persist_database_url.is_some() {
        return Ok(());
    }
    if let Some((table, _)) = s
        .persist_tables
        .0
        .iter()
        .find(|(_, spec)| spec.database_url.is_none())
    {
        return Err(SettingsError::Invalid {
            name: "persist_database_url".into(),
            value: "(unset)".into(),
            accepted: format!(
                "a postgres:// or mysql:// URL: table `{table}` gives no database_url of its own"
            ),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::{ColumnType, Mode};
    use mediafarm::settings::Sources;

    fn read(text: &str, env: &[(&str, &str)]) -> Result<PersistSettings, SettingsError> {
        let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string()));
        Sources::from_text(
            std::path::Path::new("t.toml"),
            text,
            env.collect::<Vec<_>>(),
        )?
        .read::<PersistSettings>()
        .map(|(_, p)| p)
    }

    #[test]
    fn every_name_has_an_owned_prefix() {
        mediafarm::settings::sources::assert_prefixes_owned::<PersistSettings>();
    }

    #[test]
    fn the_example_settings_file_has_the_defaults() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../deploy/mediafarm.example.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        let (_, persist) = Sources::from_text(&path, &text, [])
            .unwrap()
            .read::<PersistSettings>()
            .unwrap();
        assert_eq!(persist, PersistSettings::default());
    }

    #[test]
    fn tables_are_read_from_the_file_and_the_environment() {
        let s = read(
            "persist_database_url = \"postgres://u@h/db\"\npersist_batch_wait = 0.2\n\
             [persist_tables.profiles]\nkey = [\"user_id\"]\nversion = \"v\"\n\
             columns = { user_id = \"int\", url = \"text\", v = \"int\" }\n\
             [persist_tables.events]\nkey = [\"id\"]\nmode = \"append\"\n\
             database_url = \"mysql://root@h/test\"\ncolumns = { id = \"text\", body = \"json\" }\n",
            &[],
        )
        .unwrap();
        assert_eq!(s.persist_batch_wait, Duration::from_millis(200));
        let p = &s.persist_tables.0["profiles"];
        assert_eq!(p.columns["url"], ColumnType::Text);
        assert_eq!(p.version.as_deref(), Some("v"));
        assert_eq!(s.persist_tables.0["events"].mode, Mode::Append);
        let env = read(
            "",
            &[
                ("MEDIAFARM_PERSIST_DATABASE_URL", "mysql://root@h/test"),
                (
                    "MEDIAFARM_PERSIST_TABLES",
                    r#"{"t": {"key": ["k"], "columns": {"k": "int"}}}"#,
                ),
            ],
        )
        .unwrap();
        assert_eq!(env.persist_tables.0["t"].key, ["k"]);
    }

    #[test]
    fn wrong_declarations_stop_start_up_with_the_reason() {
        let err = read(
            "persist_database_url = \"postgres://h/db\"\n[persist_tables.t]\nkey = [\"k\"]\n\
             columns = { k = \"integer\" }\n",
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("persist_tables") && err.contains("integer"),
            "{err}"
        );
        let err = read(
            "[persist_tables.t]\nkey = [\"k\"]\ncolumns = { k = \"int\" }\n",
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("persist_database_url") && err.contains("`t`"),
            "{err}"
        );
        let err = read("persist_database_url = \"sqlite://x\"", &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("postgres://"), "{err}");
    }
}

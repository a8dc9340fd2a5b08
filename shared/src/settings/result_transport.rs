//! `result_backend_transport_options`, as Celery's Redis result backend reads them
//! (`celery/backends/redis.py`): only `result_chord_ordered`, which decides how a chord's
//! header results are collected (`.j` a sorted set scored by `group_index`, Celery's default,
//! or a list in arrival order). Every worker joining the same chords, Python or Rust, must be
//! given the same value: the two shapes are different Redis types. Celery's other backend
//! transport options (`retry_policy`, …) are refused by name rather than ignored.

use super::reader::Reader;
use super::{SettingsError, Value};

/// The options of the Redis result backend mediafarm implements (Celery's defaults).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResultTransportOptions {
    /// Celery's `result_chord_ordered` (default true): a chord's header results in
    /// `group_index` order (ZADD into a sorted set); false: in the order the header tasks
    /// ended (RPUSH onto a list), as Celery's Redis backend stores them then.
    pub result_chord_ordered: bool,
}

impl Default for ResultTransportOptions {
    fn default() -> Self {
        ResultTransportOptions {
            result_chord_ordered: true,
        }
    }
}

const ACCEPTED: &str = "a table of result_chord_ordered (true or false); Celery's other result \
    backend transport options (retry_policy, …) are not supported";

impl Value for ResultTransportOptions {
    fn shown(&self) -> String {
        let mut t = toml::Table::new();
        t.insert(
            "result_chord_ordered".into(),
            toml::Value::Boolean(self.result_chord_ordered),
        );
        toml::Value::Table(t).to_string()
    }
}

impl Reader {
    pub fn result_backend_transport_options(
        &self,
        name: &str,
        default: ResultTransportOptions,
    ) -> Result<ResultTransportOptions, SettingsError> {
        self.options_table(name, default, ACCEPTED, read_table)
    }
}

fn read_table(
    table: &toml::Table,
    mut options: ResultTransportOptions,
) -> Result<ResultTransportOptions, String> {
    for (key, v) in table {
        match (key.as_str(), v) {
            ("result_chord_ordered", toml::Value::Boolean(b)) => options.result_chord_ordered = *b,
            ("result_chord_ordered", _) => {
                return Err("result_chord_ordered must be true or false".into())
            }
            (other, _) => return Err(format!("unknown key {other}")),
        }
    }
    Ok(options)
}

#[cfg(test)]
mod tests {
    use crate::settings::tests::from;

    #[test]
    fn result_chord_ordered_is_read_as_celery_names_it_and_other_keys_are_refused() {
        let s = from("", &[]).unwrap();
        assert!(s.result_backend_transport_options.result_chord_ordered);
        let s = from(
            "result_backend_transport_options = { result_chord_ordered = false }",
            &[],
        )
        .unwrap();
        assert!(!s.result_backend_transport_options.result_chord_ordered);
        let s = from(
            "",
            &[(
                "MEDIAFARM_RESULT_BACKEND_TRANSPORT_OPTIONS",
                r#"{"result_chord_ordered": false}"#,
            )],
        )
        .unwrap();
        assert!(!s.result_backend_transport_options.result_chord_ordered);
        let err = from(
            "result_backend_transport_options = { retry_policy = { max_retries = 3 } }",
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("unknown key retry_policy"), "{err}");
        let err = from(
            "result_backend_transport_options = { result_chord_ordered = \"no\" }",
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("must be true or false"), "{err}");
    }
}

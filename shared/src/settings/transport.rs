//! `broker_transport_options` for a `redis://` broker, named and defaulted as kombu's Redis
//! transport names them (`kombu/transport/redis.py`, `Channel`): the visibility timeout, the
//! priority steps and separator, and the keys of the unacknowledged-message index. A Python
//! worker and a mediafarm worker given the same table see the same keys, `global_keyprefix`
//! included (before every key and `PUBLISH` channel, as kombu's `PrefixedStrictRedis` puts
//! it). Options kombu has that mediafarm does not implement are refused by name rather than
//! ignored.

use std::time::Duration;

use super::reader::{Raw, Reader};
use super::{SettingsError, Value};

/// The Redis transport's options (kombu's defaults).
#[derive(Debug, Clone, PartialEq)]
pub struct TransportOptions {
    /// How long a message taken but not acknowledged stays invisible before any worker puts it
    /// back on its queue (kombu: 3600 s). Every job's hard time limit is kept below it.
    pub visibility_timeout: Duration,
    /// The priority lists of a queue, in the order they are consumed (kombu: 0, 3, 6, 9; on
    /// Redis a lower number is consumed first).
    pub priority_steps: Vec<u8>,
    /// Between a queue's name and its priority in a priority list's key (kombu: `\x06\x16`).
    pub sep: String,
    /// Hash of taken, unacknowledged messages by delivery tag (kombu: `unacked`).
    pub unacked_key: String,
    /// Sorted set of their delivery tags by the time they were taken (kombu: `unacked_index`).
    pub unacked_index_key: String,
    /// Lock held while putting back messages past their visibility timeout (`unacked_mutex`).
    pub unacked_mutex_key: String,
    /// How long that lock holds at most (kombu: 300 s).
    pub unacked_mutex_expire: Duration,
    /// At most this many expired messages are put back per pass (kombu: no limit).
    pub unacked_restore_limit: Option<usize>,
    /// Before the exchange's name in the `PUBLISH` channel of a fanout exchange (the pidbox,
    /// and `celeryev` on Redis), `{db}` replaced by the broker's database number (kombu:
    /// `fanout_prefix = true`, i.e. `/{db}.`; `false` is no prefix).
    pub fanout_prefix: String,
    /// The routing key is appended to that channel as `/<routing key>` (kombu: true).
    pub fanout_patterns: bool,
    /// Before every key (queue lists, `unacked`, `unacked_index`, `unacked_mutex`, the binding
    /// sets, and mediafarm's delayed set and dead-letter lists) and every `PUBLISH` /
    /// `PSUBSCRIBE` channel: kombu's `global_keyprefix` (default none), so several
    /// applications share one Redis database. Not inside messages: a routing key or a queue
    /// name in `delivery_info` stays unprefixed, as kombu writes it.
    pub global_keyprefix: String,
    /// The Sentinel group whose master is the broker, with a `sentinel://` `broker_url`
    /// (kombu's `master_name`, required there; unused otherwise).
    pub master_name: Option<String>,
}

impl TransportOptions {
    /// `name` as stored in Redis: with the `global_keyprefix` before it.
    pub fn key(&self, name: &str) -> String {
        format!("{}{name}", self.global_keyprefix)
    }
}

impl Default for TransportOptions {
    fn default() -> Self {
        TransportOptions {
            visibility_timeout: Duration::from_secs(3600),
            priority_steps: vec![0, 3, 6, 9],
            sep: "\x06\x16".into(),
            unacked_key: "unacked".into(),
            unacked_index_key: "unacked_index".into(),
            unacked_mutex_key: "unacked_mutex".into(),
            unacked_mutex_expire: Duration::from_secs(300),
            unacked_restore_limit: None,
            fanout_prefix: DEFAULT_FANOUT_PREFIX.into(),
            fanout_patterns: true,
            global_keyprefix: String::new(),
            master_name: None,
        }
    }
}

/// kombu's `keyprefix_fanout`.
pub const DEFAULT_FANOUT_PREFIX: &str = "/{db}.";

/// The keys accepted, for the error message.
const ACCEPTED: &str = "a table of visibility_timeout (seconds), priority_steps (a list of \
    0..=9, ascending), sep, unacked_key, unacked_index_key, unacked_mutex_key, \
    unacked_mutex_expire (seconds), unacked_restore_limit, fanout_prefix (true, false or a \
    string), fanout_patterns (true or false), global_keyprefix (a string), master_name (a \
    string, for a sentinel:// broker_url); kombu's other Redis options \
    (queue_order_strategy, sentinel_kwargs, …) are not supported yet";

impl Value for TransportOptions {
    fn shown(&self) -> String {
        let mut t = toml::Table::new();
        let secs = |d: Duration| toml::Value::Float(d.as_secs_f64());
        t.insert("visibility_timeout".into(), secs(self.visibility_timeout));
        t.insert(
            "priority_steps".into(),
            toml::Value::Array(
                self.priority_steps
                    .iter()
                    .map(|p| toml::Value::Integer(i64::from(*p)))
                    .collect(),
            ),
        );
        t.insert("sep".into(), toml::Value::String(self.sep.clone()));
        for (k, v) in [
            ("unacked_key", &self.unacked_key),
            ("unacked_index_key", &self.unacked_index_key),
            ("unacked_mutex_key", &self.unacked_mutex_key),
        ] {
            t.insert(k.into(), toml::Value::String(v.clone()));
        }
        t.insert(
            "unacked_mutex_expire".into(),
            secs(self.unacked_mutex_expire),
        );
        t.insert(
            "fanout_prefix".into(),
            if self.fanout_prefix.is_empty() {
                toml::Value::Boolean(false)
            } else {
                toml::Value::String(self.fanout_prefix.clone())
            },
        );
        t.insert(
            "fanout_patterns".into(),
            toml::Value::Boolean(self.fanout_patterns),
        );
        if !self.global_keyprefix.is_empty() {
            t.insert(
                "global_keyprefix".into(),
                toml::Value::String(self.global_keyprefix.clone()),
            );
        }
        if let Some(name) = &self.master_name {
            t.insert("master_name".into(), toml::Value::String(name.clone()));
        }
        if let Some(n) = self.unacked_restore_limit {
            t.insert(
                "unacked_restore_limit".into(),
                toml::Value::Integer(i64::try_from(n).unwrap_or(i64::MAX)),
            );
        }
        toml::Value::Table(t).to_string()
    }
}

impl Reader {
    pub fn broker_transport_options(
        &self,
        name: &str,
        default: TransportOptions,
    ) -> Result<TransportOptions, SettingsError> {
        self.options_table(name, default, ACCEPTED, read_table)
    }

    /// A table of options (Celery's `*_transport_options`): from the file as a TOML table, or
    /// from the environment as JSON or a TOML inline table, each key read by `read` over
    /// `default`; any error names the setting and `accepted`.
    pub(super) fn options_table<T>(
        &self,
        name: &str,
        default: T,
        accepted: &str,
        read: impl FnOnce(&toml::Table, T) -> Result<T, String>,
    ) -> Result<T, SettingsError> {
        let Some(raw) = self.get(name) else {
            return Ok(default);
        };
        let invalid = |why: String| SettingsError::Invalid {
            name: name.into(),
            value: raw.shown(),
            accepted: why,
        };
        let table = match raw {
            Raw::Toml(toml::Value::Table(t)) => t.clone(),
            Raw::Env(s) => parse_env(s).ok_or_else(|| {
                invalid(format!(
                    "{accepted}; from the environment as JSON or a TOML inline table"
                ))
            })?,
            Raw::Toml(_) => return Err(invalid(accepted.into())),
        };
        read(&table, default).map_err(|why| invalid(format!("{why}; {accepted}")))
    }
}

fn parse_env(text: &str) -> Option<toml::Table> {
    if let Ok(json) = serde_json::from_str::<serde_json::Value>(text) {
        return toml::Value::try_from(json).ok()?.as_table().cloned();
    }
    let doc: toml::Table = toml::from_str(&format!("v = {text}")).ok()?;
    doc.get("v")?.as_table().cloned()
}

fn seconds(key: &str, v: &toml::Value) -> Result<Duration, String> {
    let s = match v {
        toml::Value::Integer(i) => *i as f64,
        toml::Value::Float(f) => *f,
        _ => return Err(format!("{key} must be a number of seconds")),
    };
    Duration::try_from_secs_f64(s)
        .ok()
        .filter(|d| !d.is_zero())
        .ok_or_else(|| format!("{key} must be a positive number of seconds"))
}

fn text(key: &str, v: &toml::Value) -> Result<String, String> {
    match v.as_str() {
        Some(s) if !s.is_empty() && !s.contains('\n') => Ok(s.to_owned()),
        _ => Err(format!("{key} must be a non-empty string on one line")),
    }
}

fn read_table(table: &toml::Table, mut o: TransportOptions) -> Result<TransportOptions, String> {
    for (key, v) in table {
        match key.as_str() {
            "visibility_timeout" => o.visibility_timeout = seconds(key, v)?,
            "unacked_mutex_expire" => o.unacked_mutex_expire = seconds(key, v)?,
            "sep" => o.sep = text(key, v)?,
            "unacked_key" => o.unacked_key = text(key, v)?,
            "unacked_index_key" => o.unacked_index_key = text(key, v)?,
            "unacked_mutex_key" => o.unacked_mutex_key = text(key, v)?,
            "fanout_prefix" => {
                o.fanout_prefix = match v {
                    toml::Value::Boolean(true) => DEFAULT_FANOUT_PREFIX.into(),
                    toml::Value::Boolean(false) => String::new(),
                    toml::Value::String(_) => text(key, v)?,
                    _ => return Err("fanout_prefix must be true, false or a string".into()),
                }
            }
            "global_keyprefix" => {
                o.global_keyprefix = match v.as_str() {
                    Some(s) if !s.contains('\n') => s.to_owned(),
                    _ => return Err("global_keyprefix must be a string on one line".into()),
                }
            }
            "master_name" => o.master_name = Some(text(key, v)?),
            "fanout_patterns" => {
                o.fanout_patterns = v.as_bool().ok_or("fanout_patterns must be true or false")?
            }
            "unacked_restore_limit" => {
                o.unacked_restore_limit = match v.as_integer() {
                    Some(n) if n > 0 => Some(usize::try_from(n).unwrap_or(usize::MAX)),
                    _ => return Err("unacked_restore_limit must be a positive whole number".into()),
                }
            }
            "priority_steps" => {
                let steps: Option<Vec<u8>> = v.as_array().and_then(|a| {
                    a.iter()
                        .map(|p| p.as_integer().and_then(|p| u8::try_from(p).ok()))
                        .collect()
                });
                match steps {
                    Some(s)
                        if !s.is_empty()
                            && s[0] == 0
                            && s.windows(2).all(|w| w[0] < w[1])
                            && s.iter().all(|p| *p <= 9) =>
                    {
                        o.priority_steps = s
                    }
                    _ => {
                        return Err(
                            "priority_steps must be ascending whole numbers from 0 to 9, \
                             starting at 0"
                                .into(),
                        )
                    }
                }
            }
            other => return Err(format!("unknown or unsupported option {other:?}")),
        }
    }
    Ok(o)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kombus_defaults_and_overrides() {
        let o = TransportOptions::default();
        assert_eq!(o.priority_steps, [0, 3, 6, 9]);
        assert_eq!(o.sep, "\x06\x16");
        let t: toml::Table =
            toml::from_str("visibility_timeout = 5\npriority_steps = [0, 5]").expect("toml");
        let o = read_table(&t, o).expect("valid");
        assert_eq!(o.visibility_timeout, Duration::from_secs(5));
        assert_eq!(o.priority_steps, [0, 5]);
        let t: toml::Table = toml::from_str("global_keyprefix = \"app1:\"").expect("toml");
        let o = read_table(&t, TransportOptions::default()).expect("valid");
        assert_eq!(o.key("unacked"), "app1:unacked");
        assert_eq!(TransportOptions::default().key("unacked"), "unacked");
        let t: toml::Table = toml::from_str("global_keyprefix = 1").expect("toml");
        assert!(read_table(&t, TransportOptions::default()).is_err());
        // What stays unsupported is still refused by name.
        let t: toml::Table = toml::from_str("queue_order_strategy = \"sorted\"").expect("toml");
        let e = read_table(&t, TransportOptions::default()).expect_err("refused");
        assert!(e.contains("queue_order_strategy"), "{e}");
        let t: toml::Table =
            toml::from_str("fanout_prefix = false\nfanout_patterns = false").expect("toml");
        let o = read_table(&t, TransportOptions::default()).expect("valid");
        assert_eq!((o.fanout_prefix.as_str(), o.fanout_patterns), ("", false));
        let t: toml::Table = toml::from_str("fanout_prefix = \"ev:\"").expect("toml");
        assert_eq!(
            read_table(&t, TransportOptions::default())
                .expect("valid")
                .fanout_prefix,
            "ev:"
        );
        let t: toml::Table = toml::from_str("fanout_patterns = 1").expect("toml");
        assert!(read_table(&t, TransportOptions::default()).is_err());
        let from_env = parse_env("{\"visibility_timeout\": 7}").expect("json");
        let o = read_table(&from_env, TransportOptions::default()).expect("valid");
        assert_eq!(o.visibility_timeout, Duration::from_secs(7));
    }

    #[test]
    fn a_redis_broker_bounds_time_limits_by_its_visibility_timeout_and_allows_events() {
        use crate::settings::Settings;
        let file = |extra: &str| -> toml::Table {
            toml::from_str(&format!(
                "broker_url = \"redis://127.0.0.1:6379/5\"\n\
                 broker_transport_options = {{ visibility_timeout = 60 }}\n{extra}"
            ))
            .expect("toml")
        };
        let s = Settings::from_sources(file(""), "t.toml", std::iter::empty()).expect("valid");
        assert!(s.broker_is_redis());
        assert_eq!(s.ack_timeout(), Duration::from_secs(60));
        assert_eq!(s.longest_hard_limit(), Duration::from_secs(45));
        let e = Settings::from_sources(file("task_time_limit = 50"), "t.toml", std::iter::empty())
            .expect_err("over the visibility timeout")
            .to_string();
        assert!(e.contains("visibility_timeout"), "{e}");
        // Celery events go out by PUBLISH on Redis (Celery makes `celeryev` a fanout there).
        let env = [(
            "MEDIAFARM_WORKER_SEND_TASK_EVENTS".to_owned(),
            "true".to_owned(),
        )];
        let s = Settings::from_sources(file(""), "t.toml", env).expect("events on Redis");
        assert!(s.worker_send_task_events);
    }
}

//! Reading one setting's value of each kind (numbers in a range, seconds, URLs with given
//! schemes, booleans, lists, rates, ...) from the file or the environment, and the
//! `SettingsError::Invalid` that names the setting, the value given and what is accepted.
//! [`Kind`] is how a declaration in [`settings_group!`](crate::settings_group) says which one.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use super::{check_content_type, RateLimit, SettingsError, TaskRate, RATE_FORMS};

/// A value as it was written: in the TOML file, or as an environment variable's text.
pub enum Raw {
    Toml(toml::Value),
    Env(String),
}

impl Raw {
    pub fn shown(&self) -> String {
        match self {
            Raw::Toml(v) => v.to_string(),
            Raw::Env(s) => format!("{s:?} (from the environment)"),
        }
    }
}

pub struct Reader {
    pub(super) values: BTreeMap<String, Raw>,
}

impl Reader {
    pub fn invalid(&self, name: &str, accepted: impl Into<String>) -> SettingsError {
        SettingsError::Invalid {
            name: name.into(),
            value: self
                .values
                .get(name)
                .map(Raw::shown)
                .unwrap_or_else(|| "(unset)".into()),
            accepted: accepted.into(),
        }
    }

    pub fn string(&self, name: &str) -> Result<Option<String>, SettingsError> {
        match self.values.get(name) {
            None => Ok(None),
            Some(Raw::Env(s)) => Ok(Some(s.clone())),
            Some(Raw::Toml(toml::Value::String(s))) => Ok(Some(s.clone())),
            Some(Raw::Toml(_)) => Err(self.invalid(name, "a string")),
        }
    }

    pub fn int<T>(&self, name: &str, default: T, min: T, max: T) -> Result<T, SettingsError>
    where
        T: TryFrom<i64> + TryInto<i64> + Copy + std::fmt::Display,
    {
        let accepted = || format!("a whole number from {min} to {max}");
        let n: i64 = match self.values.get(name) {
            None => return Ok(default),
            Some(Raw::Toml(toml::Value::Integer(n))) => *n,
            Some(Raw::Env(s)) => s
                .trim()
                .parse()
                .map_err(|_| self.invalid(name, accepted()))?,
            Some(Raw::Toml(_)) => return Err(self.invalid(name, accepted())),
        };
        let (lo, hi) = (
            min.try_into().unwrap_or(i64::MIN),
            max.try_into().unwrap_or(i64::MAX),
        );
        if n < lo || n > hi {
            return Err(self.invalid(name, accepted()));
        }
        T::try_from(n).map_err(|_| self.invalid(name, accepted()))
    }

    pub fn bool(&self, name: &str, default: bool) -> Result<bool, SettingsError> {
        const ACCEPTED: &str = "true or false (the environment also takes 1/0, yes/no, on/off)";
        match self.values.get(name) {
            None => Ok(default),
            Some(Raw::Toml(toml::Value::Boolean(b))) => Ok(*b),
            Some(Raw::Env(s)) => match s.trim().to_ascii_lowercase().as_str() {
                "true" | "1" | "yes" | "on" => Ok(true),
                "false" | "0" | "no" | "off" => Ok(false),
                _ => Err(self.invalid(name, ACCEPTED)),
            },
            Some(Raw::Toml(_)) => Err(self.invalid(name, ACCEPTED)),
        }
    }

    /// Seconds as a number (Celery's form); `0` or an empty variable means "none".
    pub fn seconds(
        &self,
        name: &str,
        default: Option<Duration>,
    ) -> Result<Option<Duration>, SettingsError> {
        const ACCEPTED: &str = "a number of seconds, 0 or more (0 means none)";
        let secs: f64 = match self.values.get(name) {
            None => return Ok(default),
            Some(Raw::Toml(toml::Value::Integer(n))) => *n as f64,
            Some(Raw::Toml(toml::Value::Float(f))) => *f,
            Some(Raw::Env(s)) if s.trim().is_empty() || s.trim() == "none" => return Ok(None),
            Some(Raw::Env(s)) => s.trim().parse().map_err(|_| self.invalid(name, ACCEPTED))?,
            Some(Raw::Toml(_)) => return Err(self.invalid(name, ACCEPTED)),
        };
        if !secs.is_finite() || !(0.0..=31_536_000.0 * 10.0).contains(&secs) {
            return Err(self.invalid(name, ACCEPTED));
        }
        Ok((secs > 0.0).then(|| Duration::from_secs_f64(secs)))
    }

    pub fn url(
        &self,
        name: &str,
        default: String,
        schemes: &[&str],
    ) -> Result<String, SettingsError> {
        let Some(url) = self.string(name)? else {
            return Ok(default);
        };
        let scheme_ok = url
            .split_once("://")
            .is_some_and(|(scheme, rest)| schemes.contains(&scheme) && !rest.is_empty());
        if !scheme_ok {
            let list: Vec<String> = schemes.iter().map(|s| format!("{s}://…")).collect();
            return Err(self.invalid(name, format!("a URL starting with {}", list.join(" or "))));
        }
        Ok(url)
    }

    pub fn serializer(&self, name: &str, default: String) -> Result<String, SettingsError> {
        let Some(value) = self.string(name)? else {
            return Ok(default);
        };
        check_content_type(&value).map_err(|why| self.invalid(name, why))?;
        Ok("json".into())
    }

    /// An exchange name as RabbitMQ takes it: 1 to 127 characters of letters, digits, `-`,
    /// `_`, `.` and `:`, and not `amq.`-prefixed (reserved by the broker).
    pub fn exchange_name(&self, name: &str, default: String) -> Result<String, SettingsError> {
        let Some(value) = self.string(name)? else {
            return Ok(default);
        };
        let ok = !value.is_empty()
            && value.len() <= 127
            && !value.starts_with("amq.")
            && value
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':'));
        if !ok {
            return Err(self.invalid(
                name,
                "an exchange name: 1 to 127 letters, digits, '-', '_', '.' or ':', not starting \
                 with \"amq.\" (Celery's default is \"celeryev\")",
            ));
        }
        Ok(value)
    }

    /// A list: a TOML array of strings; in the environment a JSON array of strings
    /// (`["a.example", "b.example"]`) or comma-separated (`a.example,b.example`). Items with
    /// brackets, quotes or spaces are refused: they are a JSON array gone wrong, never a value.
    pub fn list(&self, name: &str) -> Result<Vec<String>, SettingsError> {
        const ACCEPTED: &str = "a JSON array of strings such as [\"a.example\", \"b.example\"], \
                                or a comma-separated list such as a.example,b.example";
        match self.values.get(name) {
            None => Ok(Vec::new()),
            Some(Raw::Env(s)) if s.trim_start().starts_with('[') => {
                serde_json::from_str::<Vec<String>>(s.trim())
                    .map(|items| {
                        items
                            .into_iter()
                            .map(|i| i.trim().to_owned())
                            .filter(|i| !i.is_empty())
                            .collect()
                    })
                    .map_err(|_| self.invalid(name, ACCEPTED))
            }
            Some(Raw::Env(s)) => {
                let items: Vec<String> = s
                    .split(',')
                    .map(|p| p.trim().to_owned())
                    .filter(|p| !p.is_empty())
                    .collect();
                let stray =
                    |i: &String| i.contains(|c: char| "[]\"'".contains(c) || c.is_whitespace());
                if items.iter().any(stray) {
                    return Err(self.invalid(name, ACCEPTED));
                }
                Ok(items)
            }
            Some(Raw::Toml(toml::Value::Array(a))) => a
                .iter()
                .map(|v| v.as_str().map(str::to_owned))
                .collect::<Option<_>>()
                .ok_or_else(|| self.invalid(name, "a list of strings")),
            Some(Raw::Toml(_)) => Err(self.invalid(name, "a list of strings")),
        }
    }

    pub fn accept_content(
        &self,
        name: &str,
        default: Vec<String>,
    ) -> Result<Vec<String>, SettingsError> {
        let items: Vec<String> = match self.values.get(name) {
            None => return Ok(default),
            Some(Raw::Env(_)) => self.list(name)?,
            Some(Raw::Toml(toml::Value::Array(a))) => a
                .iter()
                .map(|v| v.as_str().map(str::to_owned))
                .collect::<Option<_>>()
                .ok_or_else(|| self.invalid(name, "a list of content types, e.g. [\"json\"]"))?,
            Some(Raw::Toml(_)) => {
                return Err(self.invalid(name, "a list of content types, e.g. [\"json\"]"))
            }
        };
        for item in &items {
            check_content_type(item).map_err(|why| self.invalid(name, why))?;
        }
        if items.is_empty() {
            return Err(self.invalid(name, "[\"json\"]"));
        }
        Ok(vec!["json".into()])
    }

    pub fn acks_late(&self, name: &str, default: bool) -> Result<bool, SettingsError> {
        let v = self.bool(name, default)?;
        if !v {
            return Err(self.invalid(
                name,
                "true only: mediafarm acknowledges a message after its result is stored, so a \
                 worker that dies loses nothing (make side effects idempotent instead)",
            ));
        }
        Ok(v)
    }

    pub fn timezone(&self, name: &str, default: String) -> Result<String, SettingsError> {
        let Some(tz) = self.string(name)? else {
            return Ok(default);
        };
        // The zone data beat matches crontabs with (built in, so images need no tzdata).
        if tz.parse::<chrono_tz::Tz>().is_err() {
            return Err(self.invalid(
                name,
                "an IANA time zone name such as \"UTC\" or \"Europe/Berlin\"",
            ));
        }
        Ok(tz)
    }

    pub fn rate_limit(&self, name: &str) -> Result<Option<RateLimit>, SettingsError> {
        match self.string(name)? {
            None => Ok(None),
            Some(t) if t.trim().is_empty() => Ok(None),
            Some(t) => RateLimit::parse(&t).map(Some).ok_or_else(|| {
                self.invalid(
                    name,
                    "a rate such as \"10/s\", \"600/m\" or \"1000/h\" (count above 0)",
                )
            }),
        }
    }

    pub fn one_of(
        &self,
        name: &str,
        default: String,
        choices: &[&str],
    ) -> Result<String, SettingsError> {
        match self.string(name)? {
            None => Ok(default),
            Some(v) if choices.contains(&v.trim()) => Ok(v.trim().to_owned()),
            Some(_) => Err(self.invalid(name, format!("one of {}", choices.join(", ")))),
        }
    }

    pub fn socket_addr(
        &self,
        name: &str,
        default: SocketAddr,
    ) -> Result<SocketAddr, SettingsError> {
        let Some(text) = self.string(name)? else {
            return Ok(default);
        };
        text.parse().map_err(|_| {
            self.invalid(
                name,
                "host:port with a numeric address, e.g. \"0.0.0.0:9808\"",
            )
        })
    }
}

impl Reader {
    /// The value given for `name`, as written.
    pub fn get(&self, name: &str) -> Option<&Raw> {
        self.values.get(name)
    }

    /// How a setting of named entries ([`Reader::named_tables`]) is shown: its TOML, `{}` when
    /// it has none.
    pub fn shown_tables<T: serde::Serialize>(value: &T, is_empty: bool) -> String {
        if is_empty {
            return "{}".into();
        }
        toml::Value::try_from(value)
            .map(|v| v.to_string())
            .unwrap_or_else(|e| format!("({e})"))
    }

    /// A setting of named entries, `[<name>.<entry>]` tables in the file or the same as one
    /// JSON object in the environment; `None` when it is not given (or given empty). A value
    /// that does not fit `T` is refused with `accepted` (what fits) and why not.
    pub fn named_tables<T: serde::de::DeserializeOwned>(
        &self,
        name: &str,
        accepted: &str,
    ) -> Result<Option<T>, SettingsError> {
        match self.get(name) {
            None => Ok(None),
            Some(Raw::Toml(v)) => v
                .clone()
                .try_into()
                .map(Some)
                .map_err(|e: toml::de::Error| {
                    self.invalid(name, format!("{accepted}: {}", e.message()))
                }),
            Some(Raw::Env(s)) if s.trim().is_empty() => Ok(None),
            Some(Raw::Env(s)) => serde_json::from_str(s)
                .map(Some)
                .map_err(|e| self.invalid(name, format!("{accepted}: {e}"))),
        }
    }
}

/// How one declared setting is read: `read` gets the setting's name and its default.
pub trait Kind<T> {
    fn read(&self, reader: &Reader, name: &str, default: T) -> Result<T, SettingsError>;
}

/// A whole number from `.0` to `.1`.
pub struct Int<T>(pub T, pub T);

impl<T> Kind<T> for Int<T>
where
    T: TryFrom<i64> + TryInto<i64> + Copy + std::fmt::Display,
{
    fn read(&self, reader: &Reader, name: &str, default: T) -> Result<T, SettingsError> {
        reader.int(name, default, self.0, self.1)
    }
}

/// An optional whole number from `.0` to `.1`; an empty variable means unset.
pub struct OptInt<T>(pub T, pub T);

impl<T> Kind<Option<T>> for OptInt<T>
where
    T: TryFrom<i64> + TryInto<i64> + Copy + std::fmt::Display,
{
    fn read(
        &self,
        reader: &Reader,
        name: &str,
        default: Option<T>,
    ) -> Result<Option<T>, SettingsError> {
        match reader.get(name) {
            None => Ok(default),
            Some(Raw::Env(s)) if s.trim().is_empty() => Ok(None),
            Some(_) => reader.int(name, self.0, self.0, self.1).map(Some),
        }
    }
}

/// Seconds, Celery's form; `0` (or an empty variable) is zero, which means "none".
pub struct Seconds;

impl Kind<Duration> for Seconds {
    fn read(
        &self,
        reader: &Reader,
        name: &str,
        default: Duration,
    ) -> Result<Duration, SettingsError> {
        Ok(reader
            .seconds(name, Some(default))?
            .unwrap_or(Duration::ZERO))
    }
}

/// Seconds where `0` (or an empty variable) keeps the default: a timeout that cannot be off.
pub struct SecondsOrDefault;

impl Kind<Duration> for SecondsOrDefault {
    fn read(
        &self,
        reader: &Reader,
        name: &str,
        default: Duration,
    ) -> Result<Duration, SettingsError> {
        Ok(reader.seconds(name, Some(default))?.unwrap_or(default))
    }
}

/// Seconds or nothing (`0` or an empty variable: nothing).
pub struct OptSeconds;

impl Kind<Option<Duration>> for OptSeconds {
    fn read(
        &self,
        reader: &Reader,
        name: &str,
        default: Option<Duration>,
    ) -> Result<Option<Duration>, SettingsError> {
        reader.seconds(name, default)
    }
}

pub struct Bool;

impl Kind<bool> for Bool {
    fn read(&self, reader: &Reader, name: &str, default: bool) -> Result<bool, SettingsError> {
        reader.bool(name, default)
    }
}

/// Any string.
pub struct Str;

impl Kind<String> for Str {
    fn read(&self, reader: &Reader, name: &str, default: String) -> Result<String, SettingsError> {
        Ok(reader.string(name)?.unwrap_or(default))
    }
}

impl Kind<Option<String>> for Str {
    fn read(
        &self,
        reader: &Reader,
        name: &str,
        default: Option<String>,
    ) -> Result<Option<String>, SettingsError> {
        Ok(reader.string(name)?.or(default))
    }
}

/// A URL with one of these schemes (optional when the field is an `Option`).
pub struct Url(pub &'static [&'static str]);

impl Kind<String> for Url {
    fn read(&self, reader: &Reader, name: &str, default: String) -> Result<String, SettingsError> {
        reader.url(name, default, self.0)
    }
}

impl Kind<Option<String>> for Url {
    fn read(
        &self,
        reader: &Reader,
        name: &str,
        default: Option<String>,
    ) -> Result<Option<String>, SettingsError> {
        match reader.string(name)? {
            Some(u) => reader.url(name, u, self.0).map(Some),
            None => Ok(default),
        }
    }
}

/// A list: a TOML array of strings, in the environment a JSON array or comma-separated.
pub struct List;

impl Kind<Vec<String>> for List {
    fn read(
        &self,
        reader: &Reader,
        name: &str,
        default: Vec<String>,
    ) -> Result<Vec<String>, SettingsError> {
        match reader.get(name) {
            None => Ok(default),
            Some(_) => reader.list(name),
        }
    }
}

/// A send rate such as `"10/s"`; unset or empty: none.
pub struct Rate;

impl Kind<Option<RateLimit>> for Rate {
    fn read(
        &self,
        reader: &Reader,
        name: &str,
        default: Option<RateLimit>,
    ) -> Result<Option<RateLimit>, SettingsError> {
        match reader.get(name) {
            None => Ok(default),
            Some(_) => reader.rate_limit(name),
        }
    }
}

/// Celery's task `rate_limit`: `"100/m"`, `"10/s"`, `"1000/h"`, a number per second; unset,
/// empty or 0: none.
pub struct CeleryRate;

impl Kind<Option<TaskRate>> for CeleryRate {
    fn read(
        &self,
        reader: &Reader,
        name: &str,
        default: Option<TaskRate>,
    ) -> Result<Option<TaskRate>, SettingsError> {
        let parsed = match reader.get(name) {
            None => return Ok(default),
            Some(Raw::Toml(toml::Value::Integer(n))) => TaskRate::per_second(*n as f64),
            Some(Raw::Toml(toml::Value::Float(n))) => TaskRate::per_second(*n),
            Some(_) => match reader.string(name)? {
                Some(text) => TaskRate::parse(&text),
                None => return Ok(default),
            },
        };
        parsed.map_err(|_| reader.invalid(name, RATE_FORMS))
    }
}

/// One of these words.
pub struct OneOf(pub &'static [&'static str]);

impl Kind<String> for OneOf {
    fn read(&self, reader: &Reader, name: &str, default: String) -> Result<String, SettingsError> {
        reader.one_of(name, default, self.0)
    }
}

/// `host:port` with a numeric address.
pub struct Addr;

impl Kind<SocketAddr> for Addr {
    fn read(
        &self,
        reader: &Reader,
        name: &str,
        default: SocketAddr,
    ) -> Result<SocketAddr, SettingsError> {
        reader.socket_addr(name, default)
    }
}

/// A setting with a reader of its own (`fn(&Reader, name, default)`).
pub struct Custom<T>(pub fn(&Reader, &str, T) -> Result<T, SettingsError>);

impl<T> Kind<T> for Custom<T> {
    fn read(&self, reader: &Reader, name: &str, default: T) -> Result<T, SettingsError> {
        (self.0)(reader, name, default)
    }
}

/// A setting's value as it would be written in the settings file, and its items if it is a
/// list (what `check-settings` prints).
pub trait Value {
    fn shown(&self) -> String;
    fn as_list(&self) -> Option<&[String]> {
        None
    }
}

macro_rules! shown_by_display {
    ($($t:ty),*) => {$(
        impl Value for $t {
            fn shown(&self) -> String {
                self.to_string()
            }
        }
    )*};
}
shown_by_display!(bool, u8, u16, u32, u64, usize);

impl Value for String {
    fn shown(&self) -> String {
        toml::Value::String(self.clone()).to_string()
    }
}

impl Value for SocketAddr {
    fn shown(&self) -> String {
        self.to_string().shown()
    }
}

impl Value for Duration {
    fn shown(&self) -> String {
        self.as_secs_f64().to_string()
    }
}

impl Value for TaskRate {
    fn shown(&self) -> String {
        self.as_str().to_owned().shown()
    }
}

impl Value for RateLimit {
    fn shown(&self) -> String {
        let unit = match self.per.as_secs() {
            60 => "m",
            3600 => "h",
            _ => "s",
        };
        format!("{}/{unit}", self.count).shown()
    }
}

impl<T: Value> Value for Option<T> {
    fn shown(&self) -> String {
        match self {
            Some(v) => v.shown(),
            None => "(unset)".into(),
        }
    }
}

impl Value for Vec<String> {
    fn shown(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
    fn as_list(&self) -> Option<&[String]> {
        Some(self)
    }
}

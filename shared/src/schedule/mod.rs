//! Periodic entries for `mediafarm beat`: what to publish (task, kwargs, queue) and how often.
//! Entries come from the settings file (`[beat_schedule.<name>]`) or from Redis (`mediafarm
//! schedule add`); both go through the same checks, and a bad entry is reported with its name,
//! the field, the value given and what is accepted.

pub mod cron;

use std::time::Duration;

use serde_json::{json, Map, Value};

use crate::schedule::cron::{Cron, CRON_ACCEPTED};

/// Shortest and longest period accepted.
pub const MIN_EVERY: Duration = Duration::from_millis(100);
pub const MAX_EVERY: Duration = Duration::from_secs(365 * 86_400);

const EVERY_ACCEPTED: &str = "a period from 100 ms to 365 days: seconds as a number (20, 2.5) \
     or a string with a unit (\"500ms\", \"20s\", \"5m\", \"1h\", \"1d\")";
const FIELDS: &str = "task, every, crontab, kwargs, queue, expires";

/// One periodic entry: `task` with `kwargs`, published once per tick of `every`, or at the
/// minutes its `crontab` matches.
#[derive(Debug, Clone, PartialEq)]
pub struct ScheduleEntry {
    pub name: String,
    pub task: String,
    /// The period; tick k is due at k·every after the Unix epoch (a fixed grid, no drift).
    /// One minute for a crontab entry.
    pub every: Duration,
    /// Only the ticks (minutes) this matches are due.
    pub crontab: Option<Cron>,
    pub kwargs: Map<String, Value>,
    /// Queue; default: the task name's prefix, as for `mediafarm submit`.
    pub queue: Option<String>,
    /// A tick's job is dropped by workers this long after the tick was due (not after it was
    /// published, so a late publish does not make a stale job look fresh).
    pub expires: Option<Duration>,
}

/// A field of an entry that cannot be used.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("schedule entry `{entry}`: `{field}` = {value} is not accepted: {accepted}")]
pub struct EntryError {
    pub entry: String,
    pub field: String,
    pub value: String,
    pub accepted: String,
}

impl ScheduleEntry {
    /// The period in whole milliseconds (the unit of the tick grid).
    pub fn every_ms(&self) -> u64 {
        self.every.as_millis() as u64
    }

    /// Whether tick `tick` of the grid is due (every tick, unless a crontab says otherwise).
    /// A crontab matches the wall clock of `tz` (the `timezone` setting).
    pub fn is_due_tick(&self, tick: u64, tz: chrono_tz::Tz) -> bool {
        self.crontab
            .as_ref()
            .is_none_or(|c| c.matches_minute(tick, tz))
    }

    /// `every 20s` or `crontab */5 * * * *`, for people.
    pub fn describe(&self) -> String {
        match &self.crontab {
            Some(c) => format!("crontab {c}"),
            None => format!("every {}", format_every(self.every)),
        }
    }

    /// The queue the entry's jobs go to.
    pub fn queue(&self) -> String {
        self.queue
            .clone()
            .unwrap_or_else(|| crate::protocol::default_queue(&self.task))
    }

    /// The entry as the JSON object `parse_entry` reads (how Redis keeps it).
    pub fn to_json(&self) -> Value {
        let mut v = json!({"task": self.task, "kwargs": self.kwargs});
        match &self.crontab {
            Some(c) => v["crontab"] = json!(c.to_string()),
            None => v["every"] = json!(self.every.as_secs_f64()),
        }
        if let Some(q) = &self.queue {
            v["queue"] = json!(q);
        }
        if let Some(e) = self.expires {
            v["expires"] = json!(e.as_secs_f64());
        }
        v
    }
}

/// Checks an entry's name: 1 to 200 characters, no whitespace or control characters.
pub fn check_name(name: &str) -> Result<(), EntryError> {
    if name.is_empty()
        || name.chars().count() > 200
        || name.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(EntryError {
            entry: name.to_owned(),
            field: "name".into(),
            value: format!("{name:?}"),
            accepted: "1 to 200 characters without spaces or control characters".into(),
        });
    }
    Ok(())
}

/// Reads one entry from its JSON (or TOML converted to JSON) object.
pub fn parse_entry(name: &str, value: &Value) -> Result<ScheduleEntry, EntryError> {
    check_name(name)?;
    let bad = |field: &str, value: &Value, accepted: &str| EntryError {
        entry: name.to_owned(),
        field: field.to_owned(),
        value: value.to_string(),
        accepted: accepted.to_owned(),
    };
    let Value::Object(fields) = value else {
        return Err(bad(
            "(entry)",
            value,
            &format!("a table with the fields {FIELDS}"),
        ));
    };
    if let Some(unknown) = fields.keys().find(|k| !FIELDS.split(", ").any(|f| f == *k)) {
        return Err(bad(unknown, &fields[unknown], &format!("one of {FIELDS}")));
    }
    let task = match fields.get("task") {
        Some(Value::String(t)) if !t.is_empty() && !t.chars().any(char::is_whitespace) => t.clone(),
        Some(other) => {
            return Err(bad(
                "task",
                other,
                "a task name without spaces, e.g. \"snapshot.capture\"",
            ))
        }
        None => {
            return Err(bad(
                "task",
                &Value::Null,
                "a task name, e.g. \"snapshot.capture\" (required)",
            ))
        }
    };
    let (every, crontab) = match (fields.get("every"), fields.get("crontab")) {
        (Some(v), None) => (
            parse_every(v).ok_or_else(|| bad("every", v, EVERY_ACCEPTED))?,
            None,
        ),
        (None, Some(Value::String(text))) => match Cron::parse(text) {
            Ok(cron) => (Duration::from_secs(60), Some(cron)),
            Err(why) => {
                let accepted = format!("{CRON_ACCEPTED}; here: {why}");
                return Err(bad("crontab", &fields["crontab"], &accepted));
            }
        },
        (None, Some(other)) => return Err(bad("crontab", other, CRON_ACCEPTED)),
        (None, None) => {
            return Err(bad(
                "every",
                &Value::Null,
                &format!("{EVERY_ACCEPTED} (required, or a crontab)"),
            ))
        }
        (Some(_), Some(c)) => return Err(bad("crontab", c, "either every or crontab, not both")),
    };
    let kwargs = match fields.get("kwargs") {
        None => Map::new(),
        Some(Value::Object(m)) => m.clone(),
        Some(other) => {
            return Err(bad(
                "kwargs",
                other,
                "a table (JSON object) of keyword arguments; positional args are not supported",
            ))
        }
    };
    let queue = match fields.get("queue") {
        None => None,
        Some(Value::String(q)) if crate::protocol::is_valid_queue_name(q) => Some(q.clone()),
        Some(other) => {
            return Err(bad(
                "queue",
                other,
                "a queue name: 1 to 200 characters, no spaces",
            ))
        }
    };
    let expires = match fields.get("expires") {
        None => None,
        Some(v) => Some(
            parse_every(v)
                .ok_or_else(|| bad("expires", v, &EVERY_ACCEPTED.replace("a period", "a time")))?,
        ),
    };
    Ok(ScheduleEntry {
        name: name.to_owned(),
        task,
        every,
        crontab,
        kwargs,
        queue,
        expires,
    })
}

/// Reads a period: seconds as a JSON number, or a string with an optional unit
/// (`ms`, `s`, `m`, `h`, `d`). `None` when it is not one, or outside 100 ms to 365 days.
pub fn parse_every(value: &Value) -> Option<Duration> {
    let secs = match value {
        Value::Number(n) => n.as_f64()?,
        Value::String(s) => parse_every_text(s)?,
        _ => return None,
    };
    if !secs.is_finite() {
        return None;
    }
    let every = Duration::try_from_secs_f64(secs).ok()?;
    // The grid is in whole milliseconds.
    let every = Duration::from_millis(every.as_millis() as u64);
    (MIN_EVERY..=MAX_EVERY).contains(&every).then_some(every)
}

/// `"20s"`, `"5m"`, `"500ms"`, `"1.5h"`, `"2d"` or a bare number of seconds, in seconds.
pub fn parse_every_text(text: &str) -> Option<f64> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let n: f64 = number.parse().ok()?;
    let scale = match unit.trim() {
        "" | "s" | "sec" | "secs" => 1.0,
        "ms" => 0.001,
        "m" | "min" | "mins" => 60.0,
        "h" => 3600.0,
        "d" => 86_400.0,
        _ => return None,
    };
    Some(n * scale)
}

/// Reads the `beat_schedule` table: entry name → entry.
pub fn parse_table(value: &Value) -> Result<Vec<ScheduleEntry>, EntryError> {
    let Value::Object(entries) = value else {
        return Err(EntryError {
            entry: "(all)".into(),
            field: "beat_schedule".into(),
            value: value.to_string(),
            accepted: "a table of entries: [beat_schedule.<name>] with task and every".into(),
        });
    };
    entries
        .iter()
        .map(|(name, entry)| parse_entry(name, entry))
        .collect()
}

/// A period for people: `20s`, `5m`, `1.5h`, `500ms`.
pub fn format_every(every: Duration) -> String {
    let ms = every.as_millis();
    let (n, unit) = [
        (86_400_000, "d"),
        (3_600_000, "h"),
        (60_000, "m"),
        (1000, "s"),
    ]
    .into_iter()
    .find(|(size, _)| ms.is_multiple_of(*size))
    .map(|(size, unit)| (ms / size, unit))
    .unwrap_or((ms, "ms"));
    format!("{n}{unit}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn periods_in_numbers_and_units() {
        let secs = |v: Value| parse_every(&v).map(|d| d.as_secs_f64());
        assert_eq!(secs(json!(20)), Some(20.0));
        assert_eq!(secs(json!(2.5)), Some(2.5));
        assert_eq!(secs(json!("20s")), Some(20.0));
        assert_eq!(secs(json!("5m")), Some(300.0));
        assert_eq!(secs(json!("500ms")), Some(0.5));
        assert_eq!(secs(json!("1h")), Some(3600.0));
        assert_eq!(secs(json!("1d")), Some(86_400.0));
        assert_eq!(secs(json!("20")), Some(20.0));
        for bad in [
            json!("20x"),
            json!("s"),
            json!(""),
            json!(0),
            json!("10ms"),
            json!(-5),
            json!("400d"),
            json!(true),
        ] {
            assert_eq!(parse_every(&bad), None, "{bad}");
        }
        assert_eq!(format_every(Duration::from_secs(20)), "20s");
        assert_eq!(format_every(Duration::from_secs(300)), "5m");
        assert_eq!(format_every(Duration::from_millis(1500)), "1500ms");
    }

    #[test]
    fn an_entry_round_trips_through_json() {
        let e = parse_entry(
            "room-42",
            &json!({"task": "snapshot.capture", "every": "20s", "kwargs": {"stream_url": "rtmp://x"},
                    "queue": "snapshot", "expires": 15}),
        )
        .unwrap();
        assert_eq!(e.every, Duration::from_secs(20));
        assert_eq!(e.expires, Some(Duration::from_secs(15)));
        assert_eq!(e.queue(), "snapshot");
        assert_eq!(parse_entry("room-42", &e.to_json()).unwrap(), e);
        let plain = parse_entry("p", &json!({"task": "image.transform", "every": 60})).unwrap();
        assert_eq!(plain.queue(), "image");
        assert!(plain.kwargs.is_empty());
    }

    #[test]
    fn bad_entries_name_entry_field_value_and_what_is_accepted() {
        let err = |v: Value| parse_entry("snap", &v).unwrap_err().to_string();
        let e = err(json!({"task": "snapshot.capture", "every": "20x"}));
        assert!(
            e.starts_with("schedule entry `snap`: `every` = \"20x\" is not accepted: a period"),
            "{e}"
        );
        assert!(e.contains("\"5m\""), "{e}");
        let e = err(json!({"every": 20}));
        assert!(e.contains("`task`") && e.contains("required"), "{e}");
        let e = err(json!({"task": "a.b", "every": 20, "evry": 3}));
        assert!(
            e.contains("`evry` = 3") && e.contains("one of task, every"),
            "{e}"
        );
        let e = err(json!({"task": "a.b", "every": 20, "kwargs": [1]}));
        assert!(
            e.contains("`kwargs` = [1]") && e.contains("positional"),
            "{e}"
        );
        let e = err(json!({"task": "a.b", "every": 20, "queue": "a b"}));
        assert!(e.contains("`queue`"), "{e}");
        let e = parse_entry("a b", &json!({})).unwrap_err().to_string();
        assert!(e.contains("`name`"), "{e}");
    }

    #[test]
    fn crontab_entries_sit_on_the_minute_grid() {
        let e = parse_entry(
            "digest",
            &json!({"task": "notify.email", "crontab": "0 9 * * mon-fri"}),
        )
        .unwrap();
        assert_eq!(e.every, Duration::from_secs(60));
        assert_eq!(e.describe(), "crontab 0 9 * * mon-fri");
        assert_eq!(parse_entry("digest", &e.to_json()).unwrap(), e);
        // Wednesday 25 November 2026, 09:00 and 09:01 UTC, as minutes since the epoch.
        let nine = 1_795_597_200 / 60;
        assert!(e.is_due_tick(nine, chrono_tz::Tz::UTC));
        assert!(!e.is_due_tick(nine + 1, chrono_tz::Tz::UTC));
        let every = parse_entry("x", &json!({"task": "a.b", "every": 5})).unwrap();
        assert!(every.is_due_tick(nine + 1, chrono_tz::Tz::UTC));
        assert_eq!(every.describe(), "every 5s");

        let err = |v: Value| parse_entry("c", &v).unwrap_err().to_string();
        let e = err(json!({"task": "a.b", "crontab": "61 * * * *"}));
        assert!(
            e.contains("`crontab` = \"61 * * * *\"") && e.contains("the minute field \"61\""),
            "{e}"
        );
        let e = err(json!({"task": "a.b", "crontab": "* * * * *", "every": 5}));
        assert!(e.contains("either every or crontab"), "{e}");
        let e = err(json!({"task": "a.b"}));
        assert!(e.contains("or a crontab"), "{e}");
    }

    fn settings(
        toml_text: &str,
        env: &[(&str, &str)],
    ) -> Result<crate::beat::settings::BeatSettings, String> {
        let table: toml::Table = toml_text.parse().expect("test TOML parses");
        crate::settings::Sources::new(
            table,
            "test.toml",
            env.iter().map(|(k, v)| (k.to_string(), v.to_string())),
        )
        .read()
        .map(|(_, beat)| beat)
        .map_err(|e| e.to_string())
    }

    #[test]
    fn settings_read_entry_tables_and_name_a_bad_field() {
        let s = settings(
            "worker_concurrency = 2\n[beat_schedule.room-42]\ntask = \"snapshot.capture\"\n\
             every = \"20s\"\nkwargs = { stream_url = \"rtmp://h/a\" }\n\
             [beat_schedule.digest]\ntask = \"notify.email\"\nevery = 3600\nqueue = \"mail\"\n",
            &[],
        )
        .unwrap();
        let names: Vec<&str> = s.beat_schedule.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["digest", "room-42"]);
        assert_eq!(s.beat_schedule[1].kwargs["stream_url"], "rtmp://h/a");
        assert_eq!(s.beat_schedule[0].queue(), "mail");

        let s = settings(
            "",
            &[(
                "MEDIAFARM_BEAT_SCHEDULE",
                r#"{"tick": {"task": "echo.echo", "every": 1}}"#,
            )],
        )
        .unwrap();
        assert_eq!(s.beat_schedule[0].every, Duration::from_secs(1));

        let err = settings(
            "[beat_schedule.snap]\ntask = \"snapshot.capture\"\nevery = \"20x\"\n",
            &[],
        )
        .unwrap_err();
        assert!(
            err.starts_with(
                "setting `beat_schedule.snap.every` = \"20x\" is not accepted: a period"
            ),
            "{err}"
        );
        let err = settings("beat_schedule = 5", &[]).unwrap_err();
        assert!(
            err.contains("`beat_schedule` = 5") && err.contains("[beat_schedule.<name>]"),
            "{err}"
        );
        let err = settings("[beat_schedule]\nsnap = 3\n", &[]).unwrap_err();
        assert!(err.contains("`beat_schedule.snap` = 3"), "{err}");
        let err = settings("beat_lease_ttl = 0.1", &[]).unwrap_err();
        assert!(
            err.contains("`beat_lease_ttl`") && err.contains("0.5 to 3600"),
            "{err}"
        );
        let err = settings("beat_key_prefix = \"a b\"", &[]).unwrap_err();
        assert!(err.contains("`beat_key_prefix`"), "{err}");
    }
}

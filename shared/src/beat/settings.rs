//! `mediafarm beat`'s settings, declared once: its schedule, the prefix of its Redis keys and
//! the leader's lease. Names start with `beat_` (see `settings::OWNERS`).

use std::time::Duration;

use crate::schedule::{parse_table, ScheduleEntry};
use crate::settings::kinds::Custom;
use crate::settings::{Raw, Reader, SettingsError, Value};

crate::settings_group! {
    /// The settings `mediafarm beat` reads beside the core ones.
    pub struct BeatSettings {
        owner = "mediafarm beat";
        prefixes = ["beat_"];
        /// `mediafarm beat`'s periodic entries: `[beat_schedule.<name>]` tables in the file, or a
        /// JSON object of entries in `MEDIAFARM_BEAT_SCHEDULE`.
        beat_schedule: Vec<ScheduleEntry> = Vec::new(), Custom(read_schedule);
        /// Prefix of beat's Redis keys (lease, tick records, `mediafarm schedule` entries); beats
        /// sharing a prefix share one schedule and elect one leader.
        beat_key_prefix: String = "mediafarm-beat".into(), Custom(read_key_prefix);
        /// How long the beat leader's lease lasts unrenewed (it is renewed every third of this):
        /// within it, another beat replaces a leader that died.
        beat_lease_ttl: Duration = Duration::from_secs(10), Custom(read_lease_ttl);
    }
}

impl Value for Vec<ScheduleEntry> {
    fn shown(&self) -> String {
        let names: Vec<&str> = self.iter().map(|e| e.name.as_str()).collect();
        format!("{names:?}")
    }
}

/// Entries as TOML tables, or a JSON object in the environment; an entry's bad field is
/// named as `beat_schedule.<entry>.<field>`.
fn read_schedule(
    reader: &Reader,
    name: &str,
    default: Vec<ScheduleEntry>,
) -> Result<Vec<ScheduleEntry>, SettingsError> {
    const ACCEPTED: &str = "a table of entries, [beat_schedule.<name>] with task = \"...\" and \
             every = \"20s\" (in the environment: a JSON object of such entries)";
    let json = match reader.get(name) {
        None => return Ok(default),
        Some(Raw::Toml(v)) => {
            serde_json::to_value(v).map_err(|_| reader.invalid(name, ACCEPTED))?
        }
        Some(Raw::Env(s)) => serde_json::from_str(s).map_err(|_| reader.invalid(name, ACCEPTED))?,
    };
    parse_table(&json).map_err(|e| {
        let name = match (e.entry.as_str(), e.field.as_str()) {
            ("(all)", _) => name.to_owned(),
            (entry, field) if field.starts_with('(') => format!("{name}.{entry}"),
            (entry, field) => format!("{name}.{entry}.{field}"),
        };
        SettingsError::Invalid {
            name,
            value: e.value,
            accepted: e.accepted,
        }
    })
}

fn read_key_prefix(reader: &Reader, name: &str, default: String) -> Result<String, SettingsError> {
    let Some(prefix) = reader.string(name)? else {
        return Ok(default);
    };
    if prefix.is_empty()
        || prefix.len() > 100
        || prefix.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(reader.invalid(
            name,
            "1 to 100 characters without spaces, e.g. \"mediafarm-beat\"",
        ));
    }
    Ok(prefix)
}

fn read_lease_ttl(
    reader: &Reader,
    name: &str,
    default: Duration,
) -> Result<Duration, SettingsError> {
    const ACCEPTED: &str = "seconds from 0.5 to 3600 (the leader renews it every third)";
    match reader.seconds(name, Some(default)) {
        Ok(Some(ttl)) if (0.5..=3600.0).contains(&ttl.as_secs_f64()) => Ok(ttl),
        _ => Err(reader.invalid(name, ACCEPTED)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_has_an_owned_prefix() {
        crate::settings::sources::assert_prefixes_owned::<BeatSettings>();
    }
}

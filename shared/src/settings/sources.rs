//! Where values come from (one TOML file, then `MEDIAFARM_<NAME>` variables over it) and which
//! names a program reads. One settings file serves every program, so a program reads the core
//! settings and its own groups, leaves names that another program owns (by prefix, [`OWNERS`])
//! to that program, and refuses anything else as unknown, with a "did you mean" over what it
//! reads.

use std::collections::BTreeMap;
use std::path::Path;

use super::declare::{Declared, Group, Groups};
use super::reader::{Raw, Reader};
use super::{Settings, SettingsError};

/// Name prefix → the program that reads settings with it. Each group's unit test checks that
/// every name it declares has one of its prefixes and that the prefix points at its owner here.
pub const OWNERS: &[(&str, &str)] = &[
    ("image_", "image-worker"),
    ("snapshot_", "snapshot-worker"),
    ("smtp_", "notify-worker"),
    ("email_", "notify-worker"),
    ("notify_", "notify-worker"),
    ("sms_", "notify-worker"),
    ("twilio_", "notify-worker"),
    // Also read by snapshot-worker, whose sessions deliver frames to webhooks.
    ("webhook_", "notify-worker"),
    ("persist_", "persist-worker"),
    ("beat_", "mediafarm beat"),
    ("hooks_", "snapshot-hooks"),
];

const ENV_PREFIX: &str = "MEDIAFARM_";

/// The owner [`OWNERS`] gives `name`'s prefix, if any.
pub fn owner_of(name: &str) -> Option<&'static str> {
    OWNERS
        .iter()
        .find(|(prefix, _)| name.starts_with(prefix))
        .map(|(_, owner)| *owner)
}

/// Asserts (for a group's unit test) that every name of `G` has one of its prefixes and that
/// [`OWNERS`] gives each of those prefixes to `G`'s owner.
pub fn assert_prefixes_owned<G: Group>() {
    for prefix in G::PREFIXES {
        let owner = OWNERS.iter().find(|(p, _)| p == prefix).map(|(_, o)| *o);
        assert_eq!(
            owner,
            Some(G::OWNER),
            "prefix {prefix} of {}'s settings is not given to it in settings::OWNERS",
            G::OWNER
        );
    }
    for name in G::NAMES {
        assert!(
            G::PREFIXES.iter().any(|p| name.starts_with(p)),
            "setting {name} of {} has none of its prefixes {:?}",
            G::OWNER,
            G::PREFIXES
        );
    }
}

/// A settings file and an environment, not yet parsed.
pub struct Sources {
    file: toml::Table,
    origin: String,
    /// `MEDIAFARM_<NAME>` variables by lower-case name.
    env: BTreeMap<String, String>,
}

impl Sources {
    /// Reads `path` (a missing file is an error only when `required`) and the process
    /// environment.
    pub fn load(path: &Path, required: bool) -> Result<Sources, SettingsError> {
        let file = match std::fs::read_to_string(path) {
            Ok(text) => parse_toml(path, &text)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => toml::Table::new(),
            Err(source) => {
                return Err(SettingsError::Read {
                    path: path.to_owned(),
                    source,
                })
            }
        };
        Ok(Self::new(
            file,
            &path.display().to_string(),
            std::env::vars(),
        ))
    }

    /// A parsed file (named `origin` in messages) and an environment.
    pub fn new(
        file: toml::Table,
        origin: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Sources {
        let env = env
            .into_iter()
            .filter_map(|(var, value)| {
                let name = var.strip_prefix(ENV_PREFIX)?.to_ascii_lowercase();
                Some((name, value))
            })
            .collect();
        Sources {
            file,
            origin: origin.to_owned(),
            env,
        }
    }

    /// The text of a settings file (`path` names it in messages) and an environment.
    pub fn from_text(
        path: &Path,
        text: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Sources, SettingsError> {
        Ok(Self::new(
            parse_toml(path, text)?,
            &path.display().to_string(),
            env,
        ))
    }

    /// Whether the file or the environment gives `name`.
    pub fn is_set(&self, name: &str) -> bool {
        self.file.contains_key(name) || self.env.contains_key(name)
    }

    /// Parses the core settings and the groups `G`; the environment wins over the file.
    pub fn read<G: Groups>(&self) -> Result<(Settings, G), SettingsError> {
        let mut loaded = vec![Declared::of::<Settings>()];
        loaded.extend(G::declared());
        let known = |name: &str| loaded.iter().any(|g| g.names.contains(&name));
        let mut values: BTreeMap<String, Raw> = BTreeMap::new();
        for (name, value) in &self.file {
            if known(name) {
                values.insert(name.clone(), Raw::Toml(value.clone()));
            } else if !left_to_another_program(name, &loaded) {
                return Err(unknown(name, &self.origin, &loaded));
            }
        }
        for (name, value) in &self.env {
            if known(name) {
                values.insert(name.clone(), Raw::Env(value.clone()));
            }
        }
        let reader = Reader { values };
        Ok((<Settings as Group>::read(&reader)?, G::read(&reader)?))
    }
}

/// A name whose prefix belongs to a program that is not this one: that program checks it.
fn left_to_another_program(name: &str, loaded: &[Declared]) -> bool {
    let Some((prefix, _)) = OWNERS.iter().find(|(p, _)| name.starts_with(p)) else {
        return false;
    };
    !loaded.iter().any(|g| g.prefixes.contains(prefix))
}

fn parse_toml(path: &Path, text: &str) -> Result<toml::Table, SettingsError> {
    text.parse::<toml::Table>()
        .map_err(|e| SettingsError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })
}

fn unknown(name: &str, origin: &str, loaded: &[Declared]) -> SettingsError {
    let hint = loaded
        .iter()
        .flat_map(|g| g.names.iter())
        .map(|known| (edit_distance(name, known), known))
        .filter(|(d, _)| *d <= 3)
        .min()
        .map(|(_, known)| format!("; did you mean `{known}`?"))
        .unwrap_or_else(|| "; see deploy/mediafarm.example.toml for every setting".into());
    SettingsError::Unknown {
        name: name.into(),
        origin: origin.into(),
        hint,
    }
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            cur.push((prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

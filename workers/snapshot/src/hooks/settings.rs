//! `snapshot-hooks`' settings, declared once (see `mediafarm::settings::declare`): where it
//! listens, how callers prove who they are, and the per-application policy that says which
//! published streams are watched and how (`[hooks_apps.<app>]`). Names start with `hooks_`.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

use mediafarm::settings::kinds::*;
use mediafarm::settings::{Reader, SettingsError, Value};
use serde::{Deserialize, Serialize};

use crate::media::Format;
use crate::watch::DEFAULT_INTERVAL_S;

mediafarm::settings_group! {
    /// The settings `snapshot-hooks` reads beside the core ones.
    pub struct HooksSettings checked_by check {
        owner = "snapshot-hooks";
        prefixes = ["hooks_"];
        /// Where the hooks endpoint listens (`/nginx-rtmp`, `/srs`, `/healthz`).
        hooks_addr: std::net::SocketAddr = ([127, 0, 0, 1], 8087).into(), Addr;
        /// The shared secret every hook URL must carry as `?token=…` (compared in constant
        /// time). Best given as `MEDIAFARM_HOOKS_TOKEN`. At least one of `hooks_token` and
        /// `hooks_allow_from` must be set; with both, a call must pass both.
        hooks_token: Option<String> = None, Str;
        /// Callers allowed by their address (the TCP peer, never a forwarded header): IPs or
        /// CIDR blocks, e.g. ["10.0.0.0/8", "127.0.0.1"]. Empty: any address (then
        /// `hooks_token` is required).
        hooks_allow_from: Vec<String> = Vec::new(), List;
        /// What a publish to an application without a `[hooks_apps.<app>]` policy gets:
        /// "allow" (the publish goes ahead, no session is started, the log says so) or
        /// "refuse" (403: only watched applications may publish).
        hooks_unknown_app: String = "allow".into(), OneOf(&["allow", "refuse"]);
        /// The applications whose streams are watched, each as `[hooks_apps.<app>]` with
        /// `stream_url` (where the worker reads, `{app}` and `{name}` filled in), `key` (the
        /// storage key template of `snapshot.watch`; `{app}` and `{name}` filled in here,
        /// `{stream_id}`, `{seq}`, `{time}` by the worker), optional `interval_s` (20),
        /// `deliver` (webhook of each frame), `authority` (a name in the worker's
        /// `snapshot_authorities`: each frame uploaded over mutual TLS), `stream_id`
        /// (template, default "{app}.{name}"), `queue` ("snapshot"), `format`, `quality`,
        /// `max_width`. In the environment: the same as a JSON object.
        hooks_apps: Apps = Apps::default(), Custom(read_apps);
        /// Largest hook body accepted, in bytes.
        hooks_max_body: usize = 16_384, Int(1024, 1 << 20);
        /// How long a publish's start guard is kept: a repeated `on_publish` within this time
        /// (before the session has claimed its stream) starts nothing.
        hooks_start_guard: Duration = Duration::from_secs(120), SecondsOrDefault;
        /// How long an `on_publish` waits for the previous session of the same stream to end
        /// after its stop (a quick republish) before it refuses the publish (503).
        hooks_takeover_wait: Duration = Duration::from_secs(10), SecondsOrDefault;
    }
}

/// One application's policy: how a stream published to it is watched.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppPolicy {
    /// Where the worker reads the stream: `rtmp://media:1935/{app}/{name}`.
    pub stream_url: String,
    /// Storage key template (`{app}`, `{name}`, `{stream_id}`, `{seq}`, `{time}`).
    pub key: String,
    #[serde(default = "default_interval")]
    pub interval_s: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deliver: Option<String>,
    /// The authority (a name in the worker's `snapshot_authorities`) each frame is uploaded
    /// to over mutual TLS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authority: Option<String>,
    /// The session's stream id (`{app}`, `{name}`): what `mediafarm streams stop` takes.
    #[serde(default = "default_stream_id")]
    pub stream_id: String,
    #[serde(default = "default_queue")]
    pub queue: String,
    #[serde(default)]
    pub format: Format,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quality: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_width: Option<u32>,
}

fn default_interval() -> f64 {
    DEFAULT_INTERVAL_S
}

fn default_stream_id() -> String {
    "{app}.{name}".into()
}

fn default_queue() -> String {
    "snapshot".into()
}

/// The policies by application name.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Apps(pub BTreeMap<String, AppPolicy>);

/// What an application or stream name may be: it becomes part of a stream id and a key.
pub fn name_ok(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 60
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_".contains(&b))
}

impl Apps {
    /// Each policy checked as the job it would send for a stream named `x`.
    fn check(&self) -> Result<(), String> {
        for (app, policy) in &self.0 {
            if !name_ok(app) {
                return Err(format!(
                    "application name {app:?}: 1 to 60 of A-Z a-z 0-9 - _"
                ));
            }
            let args = policy.watch_args(app, "x");
            crate::watch::check_args(&args).map_err(|e| {
                let also = if e.exc_type == "InvalidKeyTemplate" {
                    " ({app} and {name} too, filled in by snapshot-hooks)"
                } else {
                    ""
                };
                format!("[hooks_apps.{app}]: {}{also}", e.message)
            })?;
            if let Some(authority) = policy.authority.as_deref().filter(|a| !name_ok(a)) {
                return Err(format!(
                    "[hooks_apps.{app}]: authority {authority:?} is not a name of \
                     snapshot_authorities (1 to 60 of A-Z a-z 0-9 - _)"
                ));
            }
            if policy.queue.is_empty() {
                return Err(format!("[hooks_apps.{app}]: queue is empty"));
            }
        }
        Ok(())
    }
}

impl AppPolicy {
    /// The `snapshot.watch` arguments for stream `name` of application `app`.
    pub fn watch_args(&self, app: &str, name: &str) -> crate::watch::WatchArgs {
        let fill = |t: &str| t.replace("{app}", app).replace("{name}", name);
        crate::watch::WatchArgs {
            stream_id: fill(&self.stream_id),
            stream_url: fill(&self.stream_url),
            interval_s: self.interval_s,
            duration_s: None,
            key: fill(&self.key),
            format: self.format,
            quality: self.quality,
            max_width: self.max_width,
            deliver: self.deliver.clone(),
            authority: self.authority.clone(),
            realtime: false,
            looped: false,
            session: None,
        }
    }
}

fn read_apps(reader: &Reader, name: &str, default: Apps) -> Result<Apps, SettingsError> {
    const ACCEPTED: &str = "applications as [hooks_apps.<app>] with stream_url, key and optional \
                            interval_s, deliver, authority, stream_id, queue, format, quality, \
                            max_width \
                            (in the environment, a JSON object)";
    let Some(apps) = reader.named_tables::<Apps>(name, ACCEPTED)? else {
        return Ok(default);
    };
    apps.check().map_err(|why| reader.invalid(name, why))?;
    Ok(apps)
}

impl Value for Apps {
    fn shown(&self) -> String {
        Reader::shown_tables(self, self.0.is_empty())
    }
}

/// An allowed caller: one address or a CIDR block.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Block {
    net: IpAddr,
    bits: u8,
}

impl Block {
    pub fn parse(text: &str) -> Option<Block> {
        let (addr, bits) = match text.trim().split_once('/') {
            Some((a, b)) => (a.parse::<IpAddr>().ok()?, Some(b.parse::<u8>().ok()?)),
            None => (text.trim().parse::<IpAddr>().ok()?, None),
        };
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let bits = bits.unwrap_or(max);
        (bits <= max).then_some(Block { net: addr, bits })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        match (self.net, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.bits)).unwrap_or(0);
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.bits))
                    .unwrap_or(0);
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

impl HooksSettings {
    /// The allowed callers, parsed (checked at start-up).
    pub fn allowed(&self) -> Vec<Block> {
        self.hooks_allow_from
            .iter()
            .filter_map(|t| Block::parse(t))
            .collect()
    }
}

fn check(s: &HooksSettings) -> Result<(), SettingsError> {
    if let Some(bad) = s
        .hooks_allow_from
        .iter()
        .find(|t| Block::parse(t).is_none())
    {
        return Err(SettingsError::Invalid {
            name: "hooks_allow_from".into(),
            value: format!("{:?}", s.hooks_allow_from),
            accepted: format!("IP addresses or CIDR blocks (\"10.0.0.0/8\"); {bad:?} is neither"),
        });
    }
    if s.hooks_token.as_deref().is_some_and(|t| t.len() < 16) {
        return Err(SettingsError::Invalid {
            name: "hooks_token".into(),
            value: "(hidden)".into(),
            accepted: "a secret of 16 characters or more".into(),
        });
    }
    if s.hooks_token.is_none() && s.hooks_allow_from.is_empty() {
        return Err(SettingsError::Invalid {
            name: "hooks_token".into(),
            value: "(unset)".into(),
            accepted: "a secret the hook URLs carry as ?token=, or callers listed in \
                       hooks_allow_from: the endpoint starts and stops sessions, so it is \
                       never open to everyone"
                .into(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use mediafarm::settings::Sources;

    #[test]
    fn every_name_has_an_owned_prefix() {
        mediafarm::settings::sources::assert_prefixes_owned::<HooksSettings>();
    }

    fn read(text: &str, env: &[(&str, &str)]) -> Result<HooksSettings, String> {
        Sources::from_text(
            std::path::Path::new("t.toml"),
            text,
            env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
        )
        .map_err(|e| e.to_string())?
        .read::<HooksSettings>()
        .map(|(_, h)| h)
        .map_err(|e| e.to_string())
    }

    #[test]
    fn the_example_settings_file_has_the_defaults() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../deploy/mediafarm.example.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        let token = "0123456789abcdef";
        let (_, hooks) = Sources::from_text(
            &path,
            &text,
            [("MEDIAFARM_HOOKS_TOKEN".to_owned(), token.to_owned())],
        )
        .unwrap()
        .read::<HooksSettings>()
        .unwrap();
        let expected = HooksSettings {
            hooks_token: Some(token.into()),
            ..HooksSettings::default()
        };
        assert_eq!(hooks, expected);
    }

    #[test]
    fn apps_are_read_from_toml_and_from_json() {
        let text = r#"
hooks_token = "0123456789abcdef"
[hooks_apps.live]
stream_url = "rtmp://media:1935/{app}/{name}"
key = "snaps/{stream_id}/{seq}.jpg"
interval_s = 20
authority = "city"
"#;
        let h = read(text, &[]).unwrap();
        let live = &h.hooks_apps.0["live"];
        let args = live.watch_args("live", "room7");
        assert_eq!(args.authority.as_deref(), Some("city"));
        assert_eq!(args.stream_id, "live.room7");
        assert_eq!(args.stream_url, "rtmp://media:1935/live/room7");
        assert_eq!(live.queue, "snapshot");
        let json = r#"{"cams": {"stream_url": "rtmp://m/{app}/{name}", "key": "{app}/{name}/{seq}.jpg", "stream_id": "{name}"}}"#;
        let h = read(
            "",
            &[
                ("MEDIAFARM_HOOKS_APPS", json),
                ("MEDIAFARM_HOOKS_ALLOW_FROM", "127.0.0.1,10.0.0.0/8"),
            ],
        )
        .unwrap();
        let args = h.hooks_apps.0["cams"].watch_args("cams", "c1");
        assert_eq!(args.authority, None);
        assert_eq!(
            (args.stream_id.as_str(), args.key.as_str()),
            ("c1", "cams/c1/{seq}.jpg")
        );
    }

    #[test]
    fn an_open_endpoint_and_bad_policies_are_refused_with_the_setting_named() {
        let err = read("", &[]).unwrap_err();
        assert!(err.contains("hooks_token"), "{err}");
        let err = read("hooks_allow_from = [\"10.0.0.0/33\"]", &[]).unwrap_err();
        assert!(err.contains("10.0.0.0/33"), "{err}");
        let err = read(
            "hooks_token = \"0123456789abcdef\"\n[hooks_apps.live]\nstream_url = \"rtmp://m/{app}/{name}\"\nkey = \"s/{nope}.jpg\"\n",
            &[],
        )
        .unwrap_err();
        assert!(
            err.contains("hooks_apps") && err.contains("{nope}"),
            "{err}"
        );
        let err = read(
            "hooks_token = \"0123456789abcdef\"\n[hooks_apps.live]\nstream_url = \"rtmp://m/{app}/{name}\"\nkey = \"s/{seq}.jpg\"\ninterval = 3\n",
            &[],
        )
        .unwrap_err();
        assert!(err.contains("interval"), "{err}");
        let err = read(
            "hooks_token = \"0123456789abcdef\"\n[hooks_apps.live]\nstream_url = \"rtmp://m/{app}/{name}\"\nkey = \"s/{seq}.jpg\"\nauthority = \"a b\"\n",
            &[],
        )
        .unwrap_err();
        assert!(err.contains("snapshot_authorities"), "{err}");
    }

    #[test]
    fn blocks_match_addresses_and_cidrs() {
        let b = Block::parse("10.1.0.0/16").unwrap();
        assert!(b.contains("10.1.200.3".parse().unwrap()));
        assert!(!b.contains("10.2.0.1".parse().unwrap()));
        assert!(b.contains("::ffff:10.1.0.9".parse().unwrap()));
        let one = Block::parse("127.0.0.1").unwrap();
        assert!(one.contains("127.0.0.1".parse().unwrap()));
        assert!(!one.contains("127.0.0.2".parse().unwrap()));
        assert!(Block::parse("0.0.0.0/0")
            .unwrap()
            .contains("8.8.8.8".parse().unwrap()));
        assert!(Block::parse("::1")
            .unwrap()
            .contains("::1".parse().unwrap()));
        assert!(Block::parse("nope").is_none());
    }
}

//! kombu's `sentinel://` broker URL, read: `sentinel://[:password@]host[:port][/db]`, several
//! `;`-separated for several sentinels (port 26379 when left out, kombu's default). As kombu's
//! `SentinelChannel` reads it, the credentials and database of the first URL are the master's.
//! Asking the sentinels is the Redis broker's business (`redis_broker::sentinel`).

/// kombu's `SentinelTransport.default_port`.
pub const DEFAULT_PORT: u16 = 26379;

/// A parsed `sentinel://` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SentinelUrl {
    /// The sentinels, in the order given.
    pub sentinels: Vec<(String, u16)>,
    pub username: Option<String>,
    pub password: Option<String>,
    pub db: i64,
}

/// Whether `url` is a Sentinel broker URL.
pub fn is_sentinel(url: &str) -> bool {
    url.starts_with("sentinel://")
}

/// Reads `sentinel://…[;sentinel://…]`; the error says what is wrong, without the password.
pub fn parse(url: &str) -> Result<SentinelUrl, String> {
    let mut parsed = SentinelUrl {
        sentinels: Vec::new(),
        username: None,
        password: None,
        db: 0,
    };
    for (i, part) in url.split(';').map(str::trim).enumerate() {
        if part.is_empty() {
            continue;
        }
        if !is_sentinel(part) {
            return Err(format!(
                "each `;`-separated part must be a sentinel:// URL; part {} is not",
                i + 1
            ));
        }
        let u = url::Url::parse(part).map_err(|e| format!("part {}: {e}", i + 1))?;
        let host = u
            .host_str()
            .filter(|h| !h.is_empty())
            .ok_or_else(|| format!("part {} names no sentinel host", i + 1))?;
        parsed
            .sentinels
            .push((host.to_owned(), u.port().unwrap_or(DEFAULT_PORT)));
        if i == 0 {
            parsed.username = Some(u.username().to_owned()).filter(|n| !n.is_empty());
            parsed.password = u.password().map(str::to_owned);
            let path = u.path().trim_matches('/');
            if !path.is_empty() {
                parsed.db = path
                    .parse::<i64>()
                    .ok()
                    .filter(|d| *d >= 0)
                    .ok_or_else(|| format!("the database {path:?} is not a whole number"))?;
            }
        }
    }
    if parsed.sentinels.is_empty() {
        return Err("no sentinel named".into());
    }
    Ok(parsed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_kombus_sentinel_urls() {
        let u = parse("sentinel://:pw@10.0.0.1:26380/5;sentinel://10.0.0.2").expect("valid");
        assert_eq!(
            u.sentinels,
            [
                ("10.0.0.1".to_owned(), 26380),
                ("10.0.0.2".to_owned(), 26379)
            ]
        );
        assert_eq!(u.password.as_deref(), Some("pw"));
        assert_eq!(u.username, None);
        assert_eq!(u.db, 5);
        assert_eq!(parse("sentinel://s1").expect("valid").db, 0);
        assert!(parse("sentinel://s1;redis://s2").is_err());
        assert!(parse("sentinel://s1/x").is_err());
        let e = parse("sentinel://:secret@s1/x").expect_err("bad db");
        assert!(!e.contains("secret"), "{e}");
    }

    #[test]
    fn a_sentinel_broker_needs_kombus_master_name() {
        use crate::settings::Settings;
        let file = |options: &str| -> toml::Table {
            toml::from_str(&format!(
                "broker_url = \"sentinel://127.0.0.1:26379/3;sentinel://127.0.0.1:26380\"\n\
                 broker_transport_options = {{ {options} }}"
            ))
            .expect("toml")
        };
        let e = Settings::from_sources(file(""), "t.toml", std::iter::empty())
            .expect_err("no master_name")
            .to_string();
        assert!(e.contains("master_name"), "{e}");
        let s = Settings::from_sources(
            file("master_name = \"mymaster\""),
            "t.toml",
            std::iter::empty(),
        )
        .expect("valid");
        assert!(s.broker_is_redis());
        assert_eq!(
            s.broker_transport_options.master_name.as_deref(),
            Some("mymaster")
        );
    }
}

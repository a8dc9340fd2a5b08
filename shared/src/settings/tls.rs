//! TLS settings named as Celery's: `broker_use_ssl` (`ca_certs`, `certfile`, `keyfile`,
//! `cert_reqs`) and `redis_backend_use_ssl` (the same with `ssl_` before each key), each `true`
//! (the system's CAs, verified) or a table; and the `?ssl_cert_reqs=…` query form Celery takes
//! on a `rediss://` URL. Only what was written is read and checked here; files are opened
//! when a connection is made (the top-level `tls` module).

use std::path::PathBuf;

use super::reader::{Raw, Reader};
use super::{SettingsError, Value};

/// How the server's certificate is checked: Python's `ssl.CERT_*` as Celery takes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CertReqs {
    /// Verified against the CA file (or the system's CAs) and the URL's host name.
    #[default]
    Required,
    /// Python's client-side `CERT_OPTIONAL`, which verifies as `CERT_REQUIRED` does (a server
    /// always shows a certificate); so does mediafarm.
    Optional,
    /// Not verified at all: anyone on the path can read and change the traffic.
    None,
}

/// The words and numbers accepted for a `cert_reqs` value.
pub const CERT_REQS_ACCEPTED: &str = "CERT_REQUIRED, CERT_OPTIONAL or CERT_NONE (Celery's \
     required/optional/none and Python's 2/1/0 are taken too)";

impl CertReqs {
    /// Celery's names (`CERT_REQUIRED`, `required`) and Python's constants (2, 1, 0).
    pub fn parse(text: &str) -> Option<CertReqs> {
        match text.trim() {
            "CERT_REQUIRED" | "required" | "2" => Some(CertReqs::Required),
            "CERT_OPTIONAL" | "optional" | "1" => Some(CertReqs::Optional),
            "CERT_NONE" | "none" | "0" => Some(CertReqs::None),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            CertReqs::Required => "CERT_REQUIRED",
            CertReqs::Optional => "CERT_OPTIONAL",
            CertReqs::None => "CERT_NONE",
        }
    }

    /// The server's certificate is checked.
    pub fn verifies(self) -> bool {
        self != CertReqs::None
    }
}

/// CA, client certificate and verification of one TLS connection kind.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TlsOptions {
    /// PEM file of the CAs that signed the server's certificate; unset: the system's CAs.
    pub ca_certs: Option<PathBuf>,
    /// PEM file of the client certificate (chain), for servers that ask for one.
    pub certfile: Option<PathBuf>,
    /// PEM file of the client certificate's private key (PKCS#8, PKCS#1 or SEC1).
    pub keyfile: Option<PathBuf>,
    pub cert_reqs: CertReqs,
}

/// How one setting names the keys of [`TlsOptions`]: Celery's own names for each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TlsKeys {
    pub setting: &'static str,
    pub ca_certs: &'static str,
    pub certfile: &'static str,
    pub keyfile: &'static str,
    pub cert_reqs: &'static str,
}

/// `broker_use_ssl`'s keys (kombu's `ssl` dict).
pub const BROKER_KEYS: TlsKeys = TlsKeys {
    setting: "broker_use_ssl",
    ca_certs: "ca_certs",
    certfile: "certfile",
    keyfile: "keyfile",
    cert_reqs: "cert_reqs",
};

/// `redis_backend_use_ssl`'s keys (redis-py's), also the query keys of a `rediss://` URL.
pub const REDIS_KEYS: TlsKeys = TlsKeys {
    setting: "redis_backend_use_ssl",
    ca_certs: "ssl_ca_certs",
    certfile: "ssl_certfile",
    keyfile: "ssl_keyfile",
    cert_reqs: "ssl_cert_reqs",
};

impl TlsKeys {
    fn accepted(&self) -> String {
        format!(
            "true, false, or a table of {}, {}, {} (paths of PEM files) and {} ({})",
            self.ca_certs, self.certfile, self.keyfile, self.cert_reqs, CERT_REQS_ACCEPTED
        )
    }

    /// Sets `key` of `options` from its text; `Err` says what the key takes.
    pub fn set(&self, options: &mut TlsOptions, key: &str, value: &str) -> Result<(), String> {
        let path = || Some(PathBuf::from(value));
        if key == self.ca_certs {
            options.ca_certs = path();
        } else if key == self.certfile {
            options.certfile = path();
        } else if key == self.keyfile {
            options.keyfile = path();
        } else if key == self.cert_reqs {
            options.cert_reqs = CertReqs::parse(value)
                .ok_or_else(|| format!("{key} takes {CERT_REQS_ACCEPTED}, not {value:?}"))?;
        } else {
            return Err(format!("unknown key {key:?}"));
        }
        Ok(())
    }

    /// A client certificate needs its key and the other way round.
    pub fn check_pair(&self, options: &TlsOptions) -> Result<(), String> {
        match (&options.certfile, &options.keyfile) {
            (Some(_), None) => Err(format!("{} is set without {}", self.certfile, self.keyfile)),
            (None, Some(_)) => Err(format!("{} is set without {}", self.keyfile, self.certfile)),
            _ => Ok(()),
        }
    }

    /// The options as a TOML inline table with this setting's key names.
    pub fn shown(&self, options: &TlsOptions) -> String {
        let mut table = toml::Table::new();
        let mut put = |key: &str, path: &Option<PathBuf>| {
            if let Some(p) = path {
                table.insert(key.into(), p.display().to_string().into());
            }
        };
        put(self.ca_certs, &options.ca_certs);
        put(self.certfile, &options.certfile);
        put(self.keyfile, &options.keyfile);
        table.insert(self.cert_reqs.into(), options.cert_reqs.as_str().into());
        toml::Value::Table(table).to_string()
    }

    /// Reads the setting: unset or false is `None`; true is the defaults (system CAs,
    /// verified); a table (a JSON object in the environment) sets the keys it names.
    pub fn read(&self, reader: &Reader, name: &str) -> Result<Option<TlsOptions>, SettingsError> {
        let invalid = |why: Option<String>| {
            let accepted = match why {
                Some(why) => format!("{} ({why})", self.accepted()),
                None => self.accepted(),
            };
            reader.invalid(name, accepted)
        };
        let pairs: Vec<(String, String)> = match reader.get(name) {
            None => return Ok(None),
            Some(Raw::Toml(toml::Value::Boolean(on))) => {
                return Ok(on.then(TlsOptions::default));
            }
            Some(Raw::Toml(toml::Value::Table(t))) => t
                .iter()
                .map(|(k, v)| match v {
                    toml::Value::String(s) => Ok((k.clone(), s.clone())),
                    toml::Value::Integer(n) if k == self.cert_reqs => {
                        Ok((k.clone(), n.to_string()))
                    }
                    _ => Err(invalid(Some(format!("{k} must be a string")))),
                })
                .collect::<Result<_, _>>()?,
            Some(Raw::Toml(_)) => return Err(invalid(None)),
            Some(Raw::Env(s)) => match s.trim().to_ascii_lowercase().as_str() {
                "" | "false" | "0" | "no" | "off" => return Ok(None),
                "true" | "1" | "yes" | "on" => return Ok(Some(TlsOptions::default())),
                _ => {
                    let object: serde_json::Map<String, serde_json::Value> =
                        serde_json::from_str(s.trim())
                            .map_err(|e| invalid(Some(format!("not a JSON object: {e}"))))?;
                    object
                        .into_iter()
                        .map(|(k, v)| match v {
                            serde_json::Value::String(s) => Ok((k, s)),
                            serde_json::Value::Number(n) if k == self.cert_reqs => {
                                Ok((k, n.to_string()))
                            }
                            _ => Err(invalid(Some(format!("{k} must be a string")))),
                        })
                        .collect::<Result<_, _>>()?
                }
            },
        };
        let mut options = TlsOptions::default();
        for (key, value) in &pairs {
            self.set(&mut options, key, value)
                .map_err(|why| invalid(Some(why)))?;
        }
        self.check_pair(&options)
            .map_err(|why| invalid(Some(why)))?;
        Ok(Some(options))
    }
}

/// `broker_use_ssl`: TLS to RabbitMQ (also on an `amqp://` URL, as kombu does).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BrokerSsl(pub TlsOptions);

/// `redis_backend_use_ssl`: TLS options of a `rediss://` result backend.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RedisBackendSsl(pub TlsOptions);

impl Value for BrokerSsl {
    fn shown(&self) -> String {
        BROKER_KEYS.shown(&self.0)
    }
}

impl Value for RedisBackendSsl {
    fn shown(&self) -> String {
        REDIS_KEYS.shown(&self.0)
    }
}

impl Reader {
    pub fn broker_use_ssl(
        &self,
        name: &str,
        default: Option<BrokerSsl>,
    ) -> Result<Option<BrokerSsl>, SettingsError> {
        match self.get(name) {
            None => Ok(default),
            Some(_) => Ok(BROKER_KEYS.read(self, name)?.map(BrokerSsl)),
        }
    }

    pub fn redis_backend_use_ssl(
        &self,
        name: &str,
        default: Option<RedisBackendSsl>,
    ) -> Result<Option<RedisBackendSsl>, SettingsError> {
        match self.get(name) {
            None => Ok(default),
            Some(_) => Ok(REDIS_KEYS.read(self, name)?.map(RedisBackendSsl)),
        }
    }
}

/// The TLS options of result backend `url`: `redis_backend_use_ssl`, then the URL's own
/// `ssl_*` query keys over it (Celery's order). `Ok(None)` for a URL without TLS; an error
/// for TLS options on a `redis://` URL (Celery refuses them too) or a bad query value.
pub fn redis_tls_options(
    url: &str,
    setting: Option<&RedisBackendSsl>,
) -> Result<Option<TlsOptions>, String> {
    let parsed = url::Url::parse(url).map_err(|e| format!("not a valid URL: {e}"))?;
    let query_keys: Vec<(String, String)> = parsed
        .query_pairs()
        .filter(|(k, _)| k.starts_with("ssl_"))
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    if parsed.scheme() != "rediss" {
        if setting.is_some() || !query_keys.is_empty() {
            return Err(
                "TLS options (redis_backend_use_ssl or ssl_* in the URL) are given, but \
                        the URL's scheme is not rediss://; a Redis TLS URL starts with \
                        rediss:// (Celery refuses this mix too)"
                    .into(),
            );
        }
        return Ok(None);
    }
    let mut options = setting.map(|s| s.0.clone()).unwrap_or_default();
    for (key, value) in &query_keys {
        REDIS_KEYS
            .set(&mut options, key, value)
            .map_err(|why| format!("URL query: {why}"))?;
    }
    REDIS_KEYS.check_pair(&options)?;
    Ok(Some(options))
}

/// `url` with its password replaced by `***`, for messages (the backend module's `redact`
/// is out of this module's reach: settings come before the backend).
pub fn without_password(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cert_reqs_take_celerys_names_and_pythons_numbers() {
        for (text, want) in [
            ("CERT_REQUIRED", CertReqs::Required),
            ("required", CertReqs::Required),
            ("2", CertReqs::Required),
            ("CERT_OPTIONAL", CertReqs::Optional),
            ("CERT_NONE", CertReqs::None),
            ("none", CertReqs::None),
        ] {
            assert_eq!(CertReqs::parse(text), Some(want), "{text}");
        }
        assert_eq!(CertReqs::parse("CERT_MAYBE"), None);
        assert_eq!(CertReqs::parse("3"), None);
    }

    #[test]
    fn redis_url_query_overrides_the_setting_and_plain_urls_refuse_tls_options() {
        let setting = RedisBackendSsl(TlsOptions {
            ca_certs: Some("/etc/ca.pem".into()),
            ..Default::default()
        });
        let o = redis_tls_options(
            "rediss://:pw@h:6380/3?ssl_cert_reqs=CERT_NONE&ssl_ca_certs=%2Fother.pem",
            Some(&setting),
        )
        .unwrap()
        .unwrap();
        assert_eq!(o.cert_reqs, CertReqs::None);
        assert_eq!(o.ca_certs, Some(PathBuf::from("/other.pem")));
        let o = redis_tls_options("rediss://h:6380/0", None)
            .unwrap()
            .unwrap();
        assert_eq!(o, TlsOptions::default());
        assert_eq!(redis_tls_options("redis://h/0", None).unwrap(), None);
        let err = redis_tls_options("redis://h/0?ssl_cert_reqs=required", None).unwrap_err();
        assert!(err.contains("rediss://"), "{err}");
        let err = redis_tls_options("redis://h/0", Some(&setting)).unwrap_err();
        assert!(err.contains("rediss://"), "{err}");
        let err = redis_tls_options("rediss://h/0?ssl_cert_reqs=maybe", None).unwrap_err();
        assert!(err.contains("CERT_REQUIRED"), "{err}");
        let err = redis_tls_options("rediss://h/0?ssl_certfile=/c.pem", None).unwrap_err();
        assert!(
            err.contains("ssl_certfile is set without ssl_keyfile"),
            "{err}"
        );
    }
}

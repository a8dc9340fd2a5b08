//! Upload of each frame to an authority's HTTPS endpoint over mutual TLS: the frame's own bytes
//! as the body of a `PUT`, with a client certificate the authority checks.
//!
//! **Settings: one table per authority.** `snapshot_authorities` names the authorities this
//! worker may upload to, each `[snapshot_authorities.<name>]` with `url`, `ca_certs`,
//! `certfile`, `keyfile` (the key names of Celery's `broker_use_ssl`, so whoever set up TLS to
//! RabbitMQ knows them) and `timeout_s`. A session picks one by name (`authority` in
//! `snapshot.watch`'s kwargs or a `[hooks_apps.<app>]` policy). A table rather than three flat
//! `snapshot_authority_*` settings because (1) the job names no URL and no file: what a
//! producer can send decides only *which* of the operator's endpoints gets the frames, never
//! where this worker's client certificate is presented, and (2) one worker can serve streams
//! bound for different authorities, each with its own certificate. Every authority's files are
//! read and its rustls configuration built when the worker starts ([`Uploader::new`]): an
//! unreadable certificate or key stops start-up with a message naming the authority, the key
//! and the file.
//!
//! **The request.** `PUT <url>` with `{stream_id}`, `{session_id}` and `{seq}` filled in — PUT
//! because the delivery is at least once: a frame sent again (a worker killed after the 2xx,
//! before the outbox entry was removed) replaces the same resource instead of adding a second.
//! Body: the stored frame, its `Content-Type` (`image/jpeg` unless the session asked for
//! another format); headers `X-Mediafarm-Delivery-Id` (`<stream_id>/<session_id>/<seq>`, the
//! webhook's id), `X-Mediafarm-Stream-Id`, `X-Mediafarm-Session-Id`, `X-Mediafarm-Seq`,
//! `X-Mediafarm-Captured-At` (RFC 3339, UTC) and `X-Mediafarm-Sha256` (hex, as in the audit
//! manifest). The bytes are read from storage at send time and checked against the SHA-256
//! recorded at capture, so the outbox entry holds only the frame's reference (a thousand waiting
//! frames are a thousand short lines in Redis, not a thousand pictures).
//!
//! **Durability and failures.** Entries wait in the stream's upload outbox
//! ([`super::outbox::Lane::Upload`]) and a courier of their own sends them
//! ([`super::deliver::Courier`]) under the webhook's rules (tried again on network errors, 408,
//! 429 and 5xx until `snapshot_delivery_deadline`). What trying again cannot change becomes a
//! dead letter at once: reason `tls` when the handshake was refused or a certificate not
//! accepted (the detail says which side and what to change), `refused` for any other answer
//! than 2xx/408/429/5xx or an authority this worker does not know, `frame` when the stored
//! frame is gone or changed.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use mediafarm::net::{OutboundPolicy, Redirects, SettingNames};
use mediafarm::settings::tls::TlsKeys;
use mediafarm::settings::{CertReqs, Reader, SettingsError, TlsOptions, Value};
use mediafarm::storage::{Storage, StorageError};
use mediafarm::tls::{ClientConfig, TlsError};
use mediafarm::TaskError;
use serde::{Deserialize, Serialize};
use url::Url;

use super::deliver::{Refusal, Target, DELIVERY_ID_HEADER};
use super::outbox::{self, Entry};
use super::state::LastFrame;

/// The setting's name.
pub const SETTING: &str = "snapshot_authorities";

/// One authority's endpoint and TLS files.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Authority {
    /// `https://…`, with `{stream_id}`, `{session_id}` and `{seq}` filled in per frame.
    pub url: String,
    /// PEM file of the CA(s) that signed the authority's server certificate; unset: the
    /// system's CAs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_certs: Option<PathBuf>,
    /// PEM file of this worker's client certificate (chain) for the authority.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certfile: Option<PathBuf>,
    /// PEM file of the client certificate's private key (PKCS#8, PKCS#1 or SEC1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keyfile: Option<PathBuf>,
    /// How long one upload (connect, handshake, body, answer) may take.
    #[serde(default = "default_timeout")]
    pub timeout_s: f64,
}

fn default_timeout() -> f64 {
    30.0
}

/// The authorities by name.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Authorities(pub BTreeMap<String, Authority>);

impl Value for Authorities {
    fn shown(&self) -> String {
        Reader::shown_tables(self, self.0.is_empty())
    }
}

/// The key names of an authority's TLS files, naming it in errors
/// (`snapshot_authorities.<name> certfile: cannot read …`).
fn tls_keys(name: &str) -> TlsKeys {
    TlsKeys {
        // Made only when the settings are read and when the worker starts (never per upload),
        // so the few bytes kept for the process's life are bounded by the settings file.
        setting: Box::leak(format!("{SETTING}.{name}").into_boxed_str()),
        ca_certs: "ca_certs",
        certfile: "certfile",
        keyfile: "keyfile",
        cert_reqs: "cert_reqs",
    }
}

/// `url` with a frame's values filled in.
fn fill(url: &str, stream_id: &str, session_id: &str, seq: u64) -> String {
    url.replace("{stream_id}", stream_id)
        .replace("{session_id}", session_id)
        .replace("{seq}", &seq.to_string())
}

impl Authority {
    fn options(&self) -> TlsOptions {
        TlsOptions {
            ca_certs: self.ca_certs.clone(),
            certfile: self.certfile.clone(),
            keyfile: self.keyfile.clone(),
            // An authority's server is always verified: frames go to it signed by nobody else.
            cert_reqs: CertReqs::Required,
        }
    }

    /// What can be checked without opening a file.
    fn check(&self, name: &str) -> Result<(), String> {
        let here = format!("[{SETTING}.{name}]");
        if !crate::hooks::settings::name_ok(name) {
            return Err(format!(
                "authority name {name:?}: 1 to 60 of A-Z a-z 0-9 - _"
            ));
        }
        let sample = fill(&self.url, "stream", "session", 0);
        let url = Url::parse(&sample).map_err(|e| format!("{here} url {:?}: {e}", self.url))?;
        if url.scheme() != "https" || url.host_str().is_none() {
            return Err(format!(
                "{here} url {:?}: an https:// URL with a host (a client certificate is shown \
                 over TLS only)",
                self.url
            ));
        }
        tls_keys(name)
            .check_pair(&self.options())
            .map_err(|why| format!("{here} {why}"))?;
        if !(self.timeout_s.is_finite() && self.timeout_s > 0.0 && self.timeout_s <= 3600.0) {
            return Err(format!(
                "{here} timeout_s {}: more than 0, at most 3600",
                self.timeout_s
            ));
        }
        Ok(())
    }
}

/// Reads `snapshot_authorities` (tables, or a JSON object in the environment).
pub fn read_authorities(
    reader: &Reader,
    name: &str,
    default: Authorities,
) -> Result<Authorities, SettingsError> {
    const ACCEPTED: &str = "authorities as [snapshot_authorities.<name>] with url (https://, \
                            {stream_id} {session_id} {seq} filled in) and optional ca_certs, \
                            certfile, keyfile (PEM files) and timeout_s (in the environment, a \
                            JSON object)";
    let Some(all) = reader.named_tables::<Authorities>(name, ACCEPTED)? else {
        return Ok(default);
    };
    for (authority, a) in &all.0 {
        a.check(authority)
            .map_err(|why| reader.invalid(name, why))?;
    }
    Ok(all)
}

/// Why the authorities could not be prepared at start-up.
#[derive(Debug, thiserror::Error)]
pub enum UploadSetupError {
    #[error(transparent)]
    Tls(#[from] TlsError),
}

/// An authority ready to be called: its URL template and a policy carrying its TLS.
struct Prepared {
    url: String,
    policy: OutboundPolicy,
    /// Its TLS key names, for the hints of handshake failures.
    keys: TlsKeys,
}

/// Sends authority uploads: the prepared authorities, and where the frames are read.
#[derive(Clone)]
pub struct Uploader {
    authorities: Arc<BTreeMap<String, Prepared>>,
    storage: Storage,
    deadline: Duration,
    backoff_max: Duration,
}

/// A frame as its upload entry keeps it (the entry's body).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct FrameRef {
    key: String,
    sha256: String,
    bytes: u64,
    content_type: String,
    captured_at: String,
}

impl Uploader {
    /// Reads every authority's CA, certificate and key and builds its rustls configuration.
    pub fn new(
        authorities: &Authorities,
        storage: Storage,
        deadline: Duration,
        backoff_max: Duration,
    ) -> Result<Uploader, UploadSetupError> {
        let mut prepared = BTreeMap::new();
        for (name, a) in &authorities.0 {
            let keys = tls_keys(name);
            let tls: ClientConfig = mediafarm::tls::client_config(&keys, &a.options())?;
            let policy = OutboundPolicy {
                // The URL is the operator's, not a job's: any host, internal ones included
                // (authorities are often reached inside a private network).
                any_host_when_empty: true,
                allow_private: true,
                refuse_credentials: true,
                timeout: Some(Duration::from_secs_f64(a.timeout_s)),
                redirects: Redirects::Return,
                tls: Some(Arc::new(tls)),
                ..OutboundPolicy::new(SettingNames {
                    allow_http: SETTING,
                    allowed_hosts: SETTING,
                    allow_private: SETTING,
                })
            };
            prepared.insert(
                name.clone(),
                Prepared {
                    url: a.url.clone(),
                    policy,
                    keys,
                },
            );
        }
        Ok(Uploader {
            authorities: Arc::new(prepared),
            storage,
            deadline,
            backoff_max,
        })
    }

    pub(super) fn timing(&self) -> (Duration, Duration) {
        (self.deadline, self.backoff_max)
    }

    fn unknown(&self, name: &str) -> String {
        let known: Vec<&str> = self.authorities.keys().map(String::as_str).collect();
        format!(
            "authority {name:?} is not in this worker's {SETTING} (it has: {})",
            if known.is_empty() {
                "none".to_owned()
            } else {
                known.join(", ")
            }
        )
    }

    /// Refuses a session naming an authority this worker does not have.
    pub fn check(&self, name: &str) -> Result<(), TaskError> {
        if self.authorities.contains_key(name) {
            Ok(())
        } else {
            Err(TaskError::invalid("UnknownAuthority", self.unknown(name)))
        }
    }

    /// A frame's upload, made when the frame is recorded.
    pub fn entry(
        &self,
        stream_id: &str,
        session_id: &str,
        authority: &str,
        last: &LastFrame,
        content_type: &str,
    ) -> Option<Entry> {
        let prepared = self.authorities.get(authority)?;
        let body = FrameRef {
            key: last.key.clone(),
            sha256: last.sha256.clone(),
            bytes: last.bytes,
            content_type: content_type.to_owned(),
            captured_at: last.captured_at.clone(),
        };
        Some(Entry {
            id: outbox::delivery_id(stream_id, session_id, last.seq),
            stream_id: stream_id.to_owned(),
            session_id: session_id.to_owned(),
            seq: last.seq,
            url: fill(&prepared.url, stream_id, session_id, last.seq),
            authority: Some(authority.to_owned()),
            // Serializing a struct of strings and numbers cannot fail.
            body: serde_json::to_string(&body).unwrap_or_default(),
            offered_at: last.wall_s,
            due_at: last.due_at,
        })
    }

    /// Checks an entry's authority and URL and builds its client (with the authority's TLS).
    pub(super) async fn vet(&self, entry: &Entry) -> Result<Target, TaskError> {
        let refused = |why: String| TaskError::invalid("DeliverRefused", why);
        let name = entry.authority.as_deref().unwrap_or_default();
        let prepared = self
            .authorities
            .get(name)
            .ok_or_else(|| refused(self.unknown(name)))?;
        let url = Url::parse(&entry.url)
            .map_err(|e| refused(format!("upload URL {}: {e}", entry.url)))?;
        let client = async {
            let checked = prepared.policy.resolve(&url).await?;
            prepared.policy.client(&checked)
        }
        .await
        .map_err(|e| {
            let text = format!("authority {name}: upload URL {url}: {e}");
            if e.is_refusal() {
                refused(text)
            } else {
                TaskError::permanent("DeliverUnreachable", text)
            }
        })?;
        Ok(Target { url, client })
    }

    /// One try at uploading the frame `entry` refers to.
    pub(super) async fn put(&self, to: &Target, entry: &Entry) -> Result<(), Refusal> {
        let frame: FrameRef = serde_json::from_str(&entry.body)
            .map_err(|e| Refusal::lasting("unreadable", format!("upload entry: {e}")))?;
        let data = match self.storage.get(&frame.key, frame.bytes).await {
            Ok(data) => data,
            Err(e @ (StorageError::NotFound { .. } | StorageError::TooLarge { .. })) => {
                return Err(Refusal::lasting(
                    "frame",
                    format!("the frame's stored object is gone or changed: {e}"),
                ))
            }
            Err(e) => return Err(Refusal::passing(format!("reading the frame: {e}"))),
        };
        let sha256 = super::manifest::hex_sha256(&data);
        if sha256 != frame.sha256 {
            return Err(Refusal::lasting(
                "frame",
                format!(
                    "the stored object {} changed since the frame was taken: SHA-256 {sha256}, \
                     recorded {}",
                    frame.key, frame.sha256
                ),
            ));
        }
        let req = to
            .client
            .put(to.url.clone())
            .header("Content-Type", &frame.content_type)
            .header(DELIVERY_ID_HEADER, &entry.id)
            .header("X-Mediafarm-Stream-Id", &entry.stream_id)
            .header("X-Mediafarm-Session-Id", &entry.session_id)
            .header("X-Mediafarm-Seq", entry.seq.to_string())
            .header("X-Mediafarm-Captured-At", &frame.captured_at)
            .header("X-Mediafarm-Sha256", &frame.sha256)
            .body(data);
        let name = entry.authority.as_deref().unwrap_or_default();
        let hint = |tls: &str| match self.authorities.get(name) {
            Some(p) => mediafarm::tls::explain(tls, &p.keys),
            None => String::new(),
        };
        let resp = mediafarm::observe::trace::inject_http(req)
            .send()
            .await
            .map_err(|e| match mediafarm::tls::tls_failure(&e) {
                Some(tls) => Refusal::lasting(
                    "tls",
                    format!(
                        "{}: the TLS handshake with authority {name} failed: {tls}{}",
                        to.url,
                        hint(&tls)
                    ),
                ),
                None => Refusal::passing(format!("{}: {e}", to.url)),
            })?;
        if resp.status().is_success() {
            return Ok(());
        }
        Err(Refusal::of_answer(&to.url, &resp))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mediafarm::settings::Sources;

    fn read(text: &str) -> Result<Authorities, SettingsError> {
        let (_, (snapshot, _)) = Sources::from_text(std::path::Path::new("t.toml"), text, [])?
            .read::<crate::settings::SnapshotGroups>()?;
        Ok(snapshot.snapshot_authorities)
    }

    #[test]
    fn authorities_are_read_as_tables_and_bad_ones_are_named() {
        let a = read(
            "[snapshot_authorities.city]\nurl = \"https://a.example/frames/{stream_id}/{seq}\"\n\
             certfile = \"/c.pem\"\nkeyfile = \"/k.pem\"\n",
        )
        .unwrap();
        let city = &a.0["city"];
        assert_eq!(city.timeout_s, 30.0);
        assert_eq!(city.certfile, Some(PathBuf::from("/c.pem")));
        let err = read("[snapshot_authorities.city]\nurl = \"http://a.example/\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("https://"), "{err}");
        let err = read("[snapshot_authorities.city]\nurl = \"https://a/\"\ncertfile = \"/c\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("certfile is set without keyfile"), "{err}");
        let err = read("[snapshot_authorities.city]\nurl = \"https://a/\"\ncert = \"/c\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown field"), "{err}");
    }

    #[tokio::test]
    async fn a_bad_certificate_file_stops_the_start_naming_the_authority_and_file() {
        let dir = std::env::temp_dir().join(format!("mf-upload-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let cert = dir.join("c.pem");
        std::fs::write(&cert, "not a certificate\n").unwrap();
        let authorities = Authorities(BTreeMap::from([(
            "city".to_owned(),
            Authority {
                url: "https://a.example/".into(),
                ca_certs: None,
                certfile: Some(cert.clone()),
                keyfile: Some(dir.join("missing.key")),
                timeout_s: 30.0,
            },
        )]));
        let storage = Storage::from_settings(&mediafarm::Settings {
            storage_url: format!("file://{}", dir.display()),
            ..Default::default()
        })
        .unwrap();
        let err = Uploader::new(
            &authorities,
            storage,
            Duration::from_secs(1),
            Duration::from_secs(1),
        )
        .err()
        .unwrap()
        .to_string();
        assert!(
            err.starts_with("snapshot_authorities.city certfile:") && err.contains("c.pem"),
            "{err}"
        );
        let _ = std::fs::remove_dir_all(dir);
    }
}

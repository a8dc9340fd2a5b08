//! Reading a job's source media from where the job says it is — a storage key, `s3://bucket/key`,
//! `file://` under an allowed root, or a web URL from an allowed host — without letting a job
//! reach what it should not: web hosts must be on `source_allowed_hosts`, every address a host
//! resolves to (and every redirect hop) is checked against loopback, private, link-local and
//! other internal ranges, and the download connects to the addresses that were checked (no
//! DNS rebinding). Every read is capped at `max_bytes` before it is buffered and web reads at
//! `source_timeout`.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path as FsPath, PathBuf};

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use object_store::path::Path;
use object_store::ObjectStore;
use url::Url;

use crate::backend::result::TaskError;
use crate::settings::Settings;
use crate::storage::{check_key, s3_builder, Storage, StorageError};

const MAX_REDIRECTS: usize = 5;

/// Where a job's source is.
#[derive(Debug, Clone, PartialEq)]
pub enum Source {
    /// A key in the configured storage.
    Key(String),
    S3 {
        bucket: String,
        key: String,
    },
    File(PathBuf),
    Web(Url),
}

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The job asked for something it may not have, or that cannot be a source.
    #[error("source {source_ref} refused: {reason}")]
    Refused { source_ref: String, reason: String },
    #[error("source {source_ref} is {bytes} bytes; the limit is {limit}")]
    TooLarge {
        source_ref: String,
        bytes: u64,
        limit: u64,
    },
    #[error("source {source_ref} not found{detail}")]
    NotFound { source_ref: String, detail: String },
    /// A fault that may pass (a server error, a timeout, a network problem).
    #[error("source {source_ref} could not be read: {reason}")]
    Unreachable { source_ref: String, reason: String },
    #[error(transparent)]
    Storage(#[from] StorageError),
}

impl From<SourceError> for TaskError {
    fn from(e: SourceError) -> TaskError {
        match e {
            SourceError::Storage(e) => e.into(),
            SourceError::Refused { .. } => TaskError::invalid("SourceRefused", e.to_string()),
            SourceError::TooLarge { .. } => TaskError::invalid("SourceTooLarge", e.to_string()),
            SourceError::NotFound { .. } => TaskError::invalid("SourceNotFound", e.to_string()),
            SourceError::Unreachable { .. } => {
                TaskError::transient("SourceUnreachable", e.to_string())
            }
        }
    }
}

fn refused(source_ref: &str, reason: impl Into<String>) -> SourceError {
    SourceError::Refused {
        source_ref: source_ref.to_owned(),
        reason: reason.into(),
    }
}

impl Source {
    /// Reads a job's `source` field.
    pub fn parse(text: &str) -> Result<Source, SourceError> {
        let Some((scheme, _)) = text.split_once("://") else {
            check_key(text)?;
            return Ok(Source::Key(text.to_owned()));
        };
        match scheme.to_ascii_lowercase().as_str() {
            "s3" => {
                let rest = &text[5..];
                let (bucket, key) = rest
                    .split_once('/')
                    .ok_or_else(|| refused(text, "use s3://<bucket>/<key>"))?;
                if bucket.is_empty() {
                    return Err(refused(text, "no bucket after s3://"));
                }
                check_key(key)?;
                Ok(Source::S3 {
                    bucket: bucket.to_owned(),
                    key: key.to_owned(),
                })
            }
            "file" => {
                let url = Url::parse(text).map_err(|e| refused(text, e.to_string()))?;
                let path = url
                    .to_file_path()
                    .map_err(|()| refused(text, "not a local absolute path"))?;
                Ok(Source::File(path))
            }
            "http" | "https" => Ok(Source::Web(
                Url::parse(text).map_err(|e| refused(text, e.to_string()))?,
            )),
            other => Err(refused(
                text,
                format!("scheme {other}:// is not a source; use a storage key, s3://, file:// or https://"),
            )),
        }
    }
}

/// Reads sources under the settings' rules.
#[derive(Clone)]
pub struct Sources {
    settings: Settings,
    storage: Storage,
}

impl Sources {
    pub fn new(settings: &Settings, storage: Storage) -> Sources {
        Sources {
            settings: settings.clone(),
            storage,
        }
    }

    /// The bytes of `source`, at most `max_bytes` of them.
    pub async fn read(&self, source: &Source, max_bytes: u64) -> Result<Bytes, SourceError> {
        match source {
            Source::Key(key) => Ok(self.storage.get(key, max_bytes).await?),
            Source::S3 { bucket, key } => self.read_s3(bucket, key, max_bytes).await,
            Source::File(path) => self.read_file(path, max_bytes).await,
            Source::Web(url) => self.read_web(url, max_bytes).await,
        }
    }

    async fn read_s3(&self, bucket: &str, key: &str, max: u64) -> Result<Bytes, SourceError> {
        let shown = format!("s3://{bucket}/{key}");
        let store = s3_builder(&self.settings, bucket)
            .build()
            .map_err(|e| refused(&shown, e.to_string()))?;
        let path = Path::parse(key).map_err(|e| refused(&shown, e.to_string()))?;
        let unreachable = |e: object_store::Error| match e {
            object_store::Error::NotFound { .. } => SourceError::NotFound {
                source_ref: shown.clone(),
                detail: String::new(),
            },
            e => SourceError::Unreachable {
                source_ref: shown.clone(),
                reason: e.to_string(),
            },
        };
        let meta = store.head(&path).await.map_err(unreachable)?;
        if meta.size > max {
            return Err(SourceError::TooLarge {
                source_ref: shown,
                bytes: meta.size,
                limit: max,
            });
        }
        let mut stream = store.get(&path).await.map_err(unreachable)?.into_stream();
        let mut out = BytesMut::new();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(unreachable)?;
            capped_extend(&mut out, &chunk, max, &shown)?;
        }
        Ok(out.freeze())
    }

    async fn read_file(&self, path: &FsPath, max: u64) -> Result<Bytes, SourceError> {
        let shown = format!("file://{}", path.display());
        let real = tokio::fs::canonicalize(path)
            .await
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => SourceError::NotFound {
                    source_ref: shown.clone(),
                    detail: String::new(),
                },
                _ => refused(&shown, e.to_string()),
            })?;
        // Symlinks and `..` are resolved first, so the check is on where the file really is.
        let mut allowed = false;
        for root in &self.settings.source_allowed_roots {
            if let Ok(root) = tokio::fs::canonicalize(root).await {
                allowed |= real.starts_with(&root);
            }
        }
        if !allowed {
            return Err(refused(
                &shown,
                "not under a directory in source_allowed_roots",
            ));
        }
        let meta = tokio::fs::metadata(&real)
            .await
            .map_err(|e| refused(&shown, e.to_string()))?;
        if !meta.is_file() {
            return Err(refused(&shown, "not a regular file"));
        }
        if meta.len() > max {
            return Err(SourceError::TooLarge {
                source_ref: shown,
                bytes: meta.len(),
                limit: max,
            });
        }
        let data = tokio::fs::read(&real)
            .await
            .map_err(|e| refused(&shown, e.to_string()))?;
        if data.len() as u64 > max {
            return Err(SourceError::TooLarge {
                source_ref: shown,
                bytes: data.len() as u64,
                limit: max,
            });
        }
        Ok(Bytes::from(data))
    }

    async fn read_web(&self, url: &Url, max: u64) -> Result<Bytes, SourceError> {
        let first = url.as_str().to_owned();
        let work = async {
            let mut url = url.clone();
            for _ in 0..=MAX_REDIRECTS {
                let addrs = self.vet(&url, &first).await?;
                let host = url.host_str().unwrap_or_default().to_owned();
                let client = reqwest::Client::builder()
                    .redirect(reqwest::redirect::Policy::none())
                    .no_proxy()
                    .resolve_to_addrs(&host, &addrs)
                    .build()
                    .map_err(|e| SourceError::Unreachable {
                        source_ref: first.clone(),
                        reason: e.to_string(),
                    })?;
                let response =
                    client
                        .get(url.clone())
                        .send()
                        .await
                        .map_err(|e| SourceError::Unreachable {
                            source_ref: first.clone(),
                            reason: e.to_string(),
                        })?;
                let status = response.status();
                if status.is_redirection() {
                    let location = response
                        .headers()
                        .get(reqwest::header::LOCATION)
                        .and_then(|v| v.to_str().ok())
                        .ok_or_else(|| refused(&first, format!("{status} without a Location")))?;
                    url = url
                        .join(location)
                        .map_err(|e| refused(&first, format!("bad redirect: {e}")))?;
                    continue;
                }
                if status == reqwest::StatusCode::NOT_FOUND || status == reqwest::StatusCode::GONE {
                    return Err(SourceError::NotFound {
                        source_ref: first.clone(),
                        detail: format!(" (HTTP {status})"),
                    });
                }
                if status.is_server_error() || status == reqwest::StatusCode::TOO_MANY_REQUESTS {
                    return Err(SourceError::Unreachable {
                        source_ref: first.clone(),
                        reason: format!("the server answered {status}"),
                    });
                }
                if !status.is_success() {
                    return Err(refused(&first, format!("the server answered {status}")));
                }
                if let Some(len) = response.content_length() {
                    if len > max {
                        return Err(SourceError::TooLarge {
                            source_ref: first.clone(),
                            bytes: len,
                            limit: max,
                        });
                    }
                }
                let mut stream = response.bytes_stream();
                let mut out = BytesMut::new();
                while let Some(chunk) = stream.next().await {
                    let chunk = chunk.map_err(|e| SourceError::Unreachable {
                        source_ref: first.clone(),
                        reason: e.to_string(),
                    })?;
                    capped_extend(&mut out, &chunk, max, &first)?;
                }
                return Ok(out.freeze());
            }
            Err(refused(
                &first,
                format!("more than {MAX_REDIRECTS} redirects"),
            ))
        };
        match tokio::time::timeout(self.settings.source_timeout, work).await {
            Ok(result) => result,
            Err(_) => Err(SourceError::Unreachable {
                source_ref: first,
                reason: format!(
                    "no complete answer within {} s (source_timeout)",
                    self.settings.source_timeout.as_secs_f64()
                ),
            }),
        }
    }

    /// Checks a web URL (the first or a redirect hop) and returns the addresses to connect to.
    async fn vet(&self, url: &Url, first: &str) -> Result<Vec<SocketAddr>, SourceError> {
        match url.scheme() {
            "https" => {}
            "http" if self.settings.source_allow_http => {}
            other => {
                return Err(refused(
                    first,
                    format!("{other}:// is not allowed (https only; see source_allow_http)"),
                ))
            }
        }
        let host = url
            .host_str()
            .ok_or_else(|| refused(first, "no host"))?
            .trim_end_matches('.')
            .to_ascii_lowercase();
        if !host_allowed(&host, &self.settings.source_allowed_hosts) {
            return Err(refused(
                first,
                format!("host {host} is not in source_allowed_hosts"),
            ));
        }
        let port = url.port_or_known_default().unwrap_or(443);
        let lookup_host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host((lookup_host.as_str(), port))
            .await
            .map_err(|e| SourceError::Unreachable {
                source_ref: first.to_owned(),
                reason: format!("cannot resolve {host}: {e}"),
            })?
            .collect();
        if addrs.is_empty() {
            return Err(SourceError::Unreachable {
                source_ref: first.to_owned(),
                reason: format!("{host} has no addresses"),
            });
        }
        if !self.settings.source_allow_private {
            if let Some(bad) = addrs.iter().find(|a| is_internal(a.ip())) {
                return Err(refused(
                    first,
                    format!(
                        "{host} resolves to {}, an internal address (loopback, private, link-local \
                         or reserved); see source_allow_private",
                        bad.ip()
                    ),
                ));
            }
        }
        Ok(addrs)
    }
}

fn capped_extend(
    out: &mut BytesMut,
    chunk: &[u8],
    max: u64,
    shown: &str,
) -> Result<(), SourceError> {
    let total = out.len() as u64 + chunk.len() as u64;
    if total > max {
        return Err(SourceError::TooLarge {
            source_ref: shown.to_owned(),
            bytes: total,
            limit: max,
        });
    }
    out.extend_from_slice(chunk);
    Ok(())
}

/// Exact names, or `*.example.com` for any subdomain of example.com (not example.com itself).
pub fn host_allowed(host: &str, allowed: &[String]) -> bool {
    allowed.iter().any(|pattern| {
        let pattern = pattern.trim_end_matches('.').to_ascii_lowercase();
        match pattern.strip_prefix("*.") {
            Some(domain) => host
                .strip_suffix(domain)
                .is_some_and(|sub| sub.len() > 1 && sub.ends_with('.')),
            None => host == pattern,
        }
    })
}

/// Addresses a job must not make a worker reach: loopback, private, link-local, shared
/// (CGNAT), unspecified, multicast, broadcast and reserved ranges, in IPv4 and IPv6 (including
/// IPv4 addresses embedded in IPv6).
pub fn is_internal(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_multicast()
                || v4.is_broadcast()
                || a == 0
                || (a == 100 && (64..128).contains(&b)) // shared address space (CGNAT)
                || (a == 198 && (b == 18 || b == 19)) // benchmarking
                || a >= 240 // reserved
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_internal(IpAddr::V4(v4));
            }
            let seg = v6.segments();
            v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (seg[0] & 0xfe00) == 0xfc00 // unique local
                || (seg[0] & 0xffc0) == 0xfe80 // link-local
                || (seg[0] == 0x64 && seg[1] == 0xff9b) // NAT64: the IPv4 inside decides; refuse
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_parse_by_scheme() {
        assert_eq!(
            Source::parse("uploads/1.jpg").unwrap(),
            Source::Key("uploads/1.jpg".into())
        );
        assert_eq!(
            Source::parse("s3://bkt/a/b.png").unwrap(),
            Source::S3 {
                bucket: "bkt".into(),
                key: "a/b.png".into()
            }
        );
        assert_eq!(
            Source::parse("file:///srv/media/x.gif").unwrap(),
            Source::File("/srv/media/x.gif".into())
        );
        assert!(matches!(
            Source::parse("https://h/x.jpg").unwrap(),
            Source::Web(_)
        ));
        for bad in ["ftp://h/x", "../x", "s3://", "s3:///k", "gopher://x"] {
            assert!(Source::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn internal_addresses_are_recognised() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "255.255.255.255",
            "::1",
            "::",
            "fd00::1",
            "fe80::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
        ] {
            assert!(is_internal(ip.parse().unwrap()), "{ip}");
        }
        for ip in ["93.184.216.34", "2606:2800:220:1::1", "::ffff:8.8.8.8"] {
            assert!(!is_internal(ip.parse().unwrap()), "{ip}");
        }
    }

    #[test]
    fn host_patterns_match_exactly_or_subdomains() {
        let allowed = vec!["img.example.com".to_owned(), "*.cdn.example.net".to_owned()];
        assert!(host_allowed("img.example.com", &allowed));
        assert!(host_allowed("a.cdn.example.net", &allowed));
        assert!(host_allowed("a.b.cdn.example.net", &allowed));
        assert!(!host_allowed("cdn.example.net", &allowed));
        assert!(!host_allowed("evilcdn.example.net", &allowed));
        assert!(!host_allowed("img.example.com.evil.org", &allowed));
        assert!(!host_allowed("example.com", &allowed));
    }
}

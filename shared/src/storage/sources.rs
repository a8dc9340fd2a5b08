//! Reading a job's source media from where the job says it is — a storage key, `s3://bucket/key`,
//! `file://` under an allowed root, or a web URL from an allowed host — without letting a job
//! reach what it should not: web URLs go through [`crate::net::outbound`] with the `source_*`
//! settings — hosts must be on `source_allowed_hosts`, every address a host resolves to (and
//! every redirect hop, up to 5) is checked against loopback, private, link-local and other
//! internal ranges, and the download connects to the addresses that were checked (no DNS
//! rebinding). Every read is capped at `max_bytes` before it is buffered and web reads at
//! `source_timeout`.

use std::path::{Path as FsPath, PathBuf};

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use object_store::path::Path;
use object_store::ObjectStore;
use url::Url;

use crate::backend::result::TaskError;
use crate::net::{OutboundPolicy, Redirects, SettingNames};
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

    /// The policy web sources are held to (see [`crate::net::outbound`]).
    fn web_policy(&self) -> OutboundPolicy {
        OutboundPolicy {
            allow_http: self.settings.source_allow_http,
            allowed_hosts: self.settings.source_allowed_hosts.clone(),
            allow_private: self.settings.source_allow_private,
            redirects: Redirects::Follow { max: MAX_REDIRECTS },
            ..OutboundPolicy::new(SettingNames {
                allow_http: "source_allow_http",
                allowed_hosts: "source_allowed_hosts",
                allow_private: "source_allow_private",
            })
        }
    }

    async fn read_web(&self, url: &Url, max: u64) -> Result<Bytes, SourceError> {
        let first = url.as_str().to_owned();
        let work = async {
            let response = self
                .web_policy()
                .send(url, |client, url| client.get(url))
                .await
                .map_err(|e| {
                    if e.is_refusal() {
                        refused(&first, e.to_string())
                    } else {
                        SourceError::Unreachable {
                            source_ref: first.clone(),
                            reason: e.to_string(),
                        }
                    }
                })?;
            let status = response.status();
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
            Ok(out.freeze())
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
}

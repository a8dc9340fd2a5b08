//! Object storage for media: a local directory (`file://`) or any S3-compatible bucket
//! (`s3://bucket/prefix`), behind one API that workers use to read sources and write variants,
//! and the URL a result hands back for each stored object (a public base URL, a presigned S3
//! URL, or a `file://` URL). Keys are checked so no key escapes its root or prefix.

pub mod sources;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::signer::Signer;
use object_store::{Attribute, ObjectStore, PutOptions, PutPayload};

use crate::backend::result::TaskError;
use crate::settings::Settings;

/// Longest key accepted (S3's own limit).
const MAX_KEY_BYTES: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("storage_url {url:?} is not usable: {reason}")]
    Config { url: String, reason: String },
    #[error("storage key {key:?} is not valid: {reason}")]
    InvalidKey { key: String, reason: String },
    #[error("no object at storage key {key:?}")]
    NotFound { key: String },
    #[error("object {key:?} is {bytes} bytes; the limit is {limit}")]
    TooLarge { key: String, bytes: u64, limit: u64 },
    #[error("cannot write {key:?}: the bucket of storage_url does not exist ({source})")]
    NoBucket {
        key: String,
        source: object_store::Error,
    },
    #[error("storage error on {key:?}: {source}")]
    Backend {
        key: String,
        source: object_store::Error,
    },
}

impl StorageError {
    fn backend(key: &str, source: object_store::Error) -> StorageError {
        match source {
            object_store::Error::NotFound { .. } => StorageError::NotFound {
                key: key.to_owned(),
            },
            source => StorageError::Backend {
                key: key.to_owned(),
                source,
            },
        }
    }
}

impl From<StorageError> for TaskError {
    /// Bad keys and missing or oversized objects are the job's fault; the rest may pass.
    fn from(e: StorageError) -> TaskError {
        match &e {
            StorageError::InvalidKey { .. } => {
                TaskError::invalid("InvalidStorageKey", e.to_string())
            }
            StorageError::NotFound { .. } => TaskError::invalid("SourceNotFound", e.to_string()),
            StorageError::TooLarge { .. } => TaskError::invalid("SourceTooLarge", e.to_string()),
            StorageError::Config { .. } => TaskError::permanent("StorageConfig", e.to_string()),
            StorageError::Backend { .. } | StorageError::NoBucket { .. } => {
                TaskError::transient("StorageError", e.to_string())
            }
        }
    }
}

/// An object just written: its key, where to fetch it, and its size.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Stored {
    pub key: String,
    pub url: String,
    pub bytes: u64,
}

enum Kind {
    Local { root: PathBuf },
    S3 { store: Arc<AmazonS3> },
}

/// A handle to the configured storage; cheap to clone.
#[derive(Clone)]
pub struct Storage {
    inner: Arc<Inner>,
}

struct Inner {
    store: Arc<dyn ObjectStore>,
    kind: Kind,
    prefix: Option<Path>,
    public_base: Option<String>,
    url_expires: Duration,
}

impl Storage {
    /// Opens the storage `storage_url` names (creating a local directory if missing).
    pub fn from_settings(settings: &Settings) -> Result<Storage, StorageError> {
        let url = settings.storage_url.as_str();
        let config = |reason: String| StorageError::Config {
            url: url.to_owned(),
            reason,
        };
        let (store, kind, prefix): (Arc<dyn ObjectStore>, Kind, Option<Path>) =
            if let Some(dir) = url.strip_prefix("file://") {
                let root = if dir.is_empty() {
                    return Err(config("no directory after file://".into()));
                } else {
                    std::env::current_dir()
                        .map_err(|e| config(e.to_string()))?
                        .join(dir)
                };
                std::fs::create_dir_all(&root)
                    .map_err(|e| config(format!("cannot create {}: {e}", root.display())))?;
                let root = root
                    .canonicalize()
                    .map_err(|e| config(format!("{}: {e}", root.display())))?;
                let store = LocalFileSystem::new_with_prefix(&root)
                    .map_err(|e| config(e.to_string()))?
                    .with_automatic_cleanup(true);
                (Arc::new(store), Kind::Local { root }, None)
            } else if let Some(rest) = url.strip_prefix("s3://") {
                let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
                if bucket.is_empty() {
                    return Err(config("no bucket after s3://".into()));
                }
                let store = Arc::new(
                    s3_builder(settings, bucket)
                        .build()
                        .map_err(|e| config(e.to_string()))?,
                );
                let prefix = prefix.trim_matches('/');
                let prefix = if prefix.is_empty() {
                    None
                } else {
                    Some(Path::parse(prefix).map_err(|e| config(e.to_string()))?)
                };
                (store.clone(), Kind::S3 { store }, prefix)
            } else {
                return Err(config(
                    "use file://<dir> or s3://<bucket>[/<prefix>]".into(),
                ));
            };
        Ok(Storage {
            inner: Arc::new(Inner {
                store,
                kind,
                prefix,
                public_base: settings
                    .storage_public_base_url
                    .as_ref()
                    .map(|u| u.trim_end_matches('/').to_owned()),
                url_expires: settings.storage_url_expires,
            }),
        })
    }

    fn path(&self, key: &str) -> Result<Path, StorageError> {
        let key_path = check_key(key)?;
        Ok(match &self.inner.prefix {
            Some(prefix) => prefix.parts().chain(key_path.parts()).collect(),
            None => key_path,
        })
    }

    /// Writes `data` under `key` with its content type; returns where to fetch it.
    pub async fn put(
        &self,
        key: &str,
        data: Bytes,
        content_type: &str,
    ) -> Result<Stored, StorageError> {
        let path = self.path(key)?;
        let bytes = data.len() as u64;
        let mut opts = PutOptions::default();
        // The local store keeps no attributes; it refuses them rather than dropping them.
        if let Kind::S3 { .. } = self.inner.kind {
            opts.attributes
                .insert(Attribute::ContentType, content_type.to_owned().into());
        }
        self.inner
            .store
            .put_opts(&path, PutPayload::from_bytes(data), opts)
            .await
            .map_err(|e| match e {
                // Writing never finds "no object": a 404 here is the bucket.
                e @ object_store::Error::NotFound { .. } => StorageError::NoBucket {
                    key: key.to_owned(),
                    source: e,
                },
                e => StorageError::backend(key, e),
            })?;
        Ok(Stored {
            key: key.to_owned(),
            url: self.url(key).await?,
            bytes,
        })
    }

    /// Reads the object at `key`, refusing it unread when it is larger than `max_bytes`.
    pub async fn get(&self, key: &str, max_bytes: u64) -> Result<Bytes, StorageError> {
        let path = self.path(key)?;
        let meta = self
            .inner
            .store
            .head(&path)
            .await
            .map_err(|e| StorageError::backend(key, e))?;
        if meta.size > max_bytes {
            return Err(StorageError::TooLarge {
                key: key.to_owned(),
                bytes: meta.size,
                limit: max_bytes,
            });
        }
        let data = self
            .inner
            .store
            .get(&path)
            .await
            .map_err(|e| StorageError::backend(key, e))?
            .bytes()
            .await
            .map_err(|e| StorageError::backend(key, e))?;
        // The object may have grown between HEAD and GET.
        if data.len() as u64 > max_bytes {
            return Err(StorageError::TooLarge {
                key: key.to_owned(),
                bytes: data.len() as u64,
                limit: max_bytes,
            });
        }
        Ok(data)
    }

    pub async fn delete(&self, key: &str) -> Result<(), StorageError> {
        let path = self.path(key)?;
        self.inner
            .store
            .delete(&path)
            .await
            .map_err(|e| StorageError::backend(key, e))
    }

    /// Where a reader fetches `key`: the public base URL plus the key when one is set, else a
    /// presigned GET URL (S3, valid `storage_url_expires`) or the file's `file://` URL.
    pub async fn url(&self, key: &str) -> Result<String, StorageError> {
        let path = self.path(key)?;
        if let Some(base) = &self.inner.public_base {
            return Ok(format!("{base}/{path}"));
        }
        match &self.inner.kind {
            Kind::Local { root } => {
                let file = root.join(path.as_ref());
                url::Url::from_file_path(&file)
                    .map(String::from)
                    .map_err(|()| StorageError::InvalidKey {
                        key: key.to_owned(),
                        reason: format!("{} is not an absolute path", file.display()),
                    })
            }
            Kind::S3 { store } => store
                .signed_url(http::Method::GET, &path, self.inner.url_expires)
                .await
                .map(String::from)
                .map_err(|e| StorageError::backend(key, e)),
        }
    }
}

/// A client for `bucket` on the configured S3 endpoint, region and addressing style, with
/// credentials from the environment; used for the storage bucket and for `s3://` sources.
pub fn s3_builder(settings: &Settings, bucket: &str) -> AmazonS3Builder {
    let mut builder = AmazonS3Builder::from_env()
        .with_bucket_name(bucket)
        .with_region(&settings.storage_s3_region)
        .with_virtual_hosted_style_request(!settings.storage_s3_path_style);
    if let Some(endpoint) = &settings.storage_s3_endpoint {
        builder = builder
            .with_endpoint(endpoint)
            .with_allow_http(endpoint.starts_with("http://"));
    }
    builder
}

/// A key is a relative `/`-separated path: no empty, `.` or `..` segments, no backslashes or
/// control characters, at most 1,024 bytes.
pub fn check_key(key: &str) -> Result<Path, StorageError> {
    let bad = |reason: &str| StorageError::InvalidKey {
        key: key.to_owned(),
        reason: reason.to_owned(),
    };
    if key.is_empty() {
        return Err(bad("it is empty"));
    }
    if key.len() > MAX_KEY_BYTES {
        return Err(bad("it is longer than 1024 bytes"));
    }
    if key.starts_with('/') {
        return Err(bad("it starts with `/`; keys are relative"));
    }
    if key.contains('\\') || key.chars().any(char::is_control) {
        return Err(bad("it contains a backslash or a control character"));
    }
    if key
        .split('/')
        .any(|s| s.is_empty() || s == "." || s == "..")
    {
        return Err(bad("it has an empty, `.` or `..` segment"));
    }
    Path::parse(key).map_err(|e| bad(&e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_cannot_escape_their_root() {
        for key in [
            "",
            "/etc/passwd",
            "../x",
            "a/../../b",
            "a//b",
            "a/./b",
            "a\\b",
            "a\nb",
        ] {
            assert!(check_key(key).is_err(), "{key:?} was accepted");
        }
        assert_eq!(
            check_key("avatars/42/512.webp").unwrap().as_ref(),
            "avatars/42/512.webp"
        );
        assert!(check_key(&"k".repeat(1025)).is_err());
    }

    #[test]
    fn storage_errors_say_whose_fault_they_are() {
        let e: TaskError = StorageError::NotFound { key: "k".into() }.into();
        assert_eq!(e.kind, crate::backend::result::FailureKind::Invalid);
        let e: TaskError = StorageError::Backend {
            key: "k".into(),
            source: object_store::Error::NotImplemented,
        }
        .into();
        assert!(matches!(
            e.kind,
            crate::backend::result::FailureKind::Transient { .. }
        ));
    }
}

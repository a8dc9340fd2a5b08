//! Attachments from object storage: each a storage key (its last segment names the file) or
//! `{key, filename?, content_type?}`. The content type comes from the file name's extension,
//! else from the first bytes, else `application/octet-stream`. All of them together are capped.

use bytes::Bytes;
use lettre::message::header::ContentType;
use mediafarm::storage::Storage;
use mediafarm::TaskError;
use serde::Deserialize;

use crate::validate;

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum AttachmentSpec {
    Key(String),
    Detailed {
        key: String,
        #[serde(default)]
        filename: Option<String>,
        #[serde(default)]
        content_type: Option<String>,
    },
}

/// An attachment read and typed, ready for the message.
pub struct File {
    pub filename: String,
    pub content_type: ContentType,
    pub data: Bytes,
}

/// Reads every attachment, refusing the email when together they exceed `max_total` bytes.
pub async fn load(
    storage: &Storage,
    specs: &[AttachmentSpec],
    max_total: u64,
) -> Result<Vec<File>, TaskError> {
    let mut files = Vec::with_capacity(specs.len());
    let mut total: u64 = 0;
    for spec in specs {
        let (key, filename, content_type) = match spec {
            AttachmentSpec::Key(key) => (key.as_str(), None, None),
            AttachmentSpec::Detailed {
                key,
                filename,
                content_type,
            } => (key.as_str(), filename.as_deref(), content_type.as_deref()),
        };
        let filename = filename
            .unwrap_or_else(|| key.rsplit('/').next().unwrap_or(key))
            .to_owned();
        validate::header_value("attachments[].filename", &filename)?;
        let remaining = max_total.saturating_sub(total);
        let data = storage.get(key, remaining).await.map_err(|e| match e {
            mediafarm::storage::StorageError::TooLarge { bytes, .. } => TaskError::invalid(
                "AttachmentsTooLarge",
                format!(
                    "attachment {key:?} ({bytes} bytes) takes the email's attachments past \
                     {max_total} bytes (email_attachment_max_bytes)"
                ),
            ),
            mediafarm::storage::StorageError::NotFound { .. } => TaskError::invalid(
                "AttachmentNotFound",
                format!("attachment {key:?}: no object at that storage key"),
            ),
            other => other.into(),
        })?;
        total += data.len() as u64;
        let content_type = match content_type {
            Some(given) => ContentType::parse(given).map_err(|_| {
                TaskError::invalid(
                    "InvalidArguments",
                    format!("attachment {key:?}: content_type {given:?} is not a MIME type"),
                )
            })?,
            None => guess(&filename, &data),
        };
        files.push(File {
            filename,
            content_type,
            data,
        });
    }
    Ok(files)
}

/// By extension, then by magic bytes, then `application/octet-stream`.
pub fn guess(filename: &str, data: &[u8]) -> ContentType {
    let by_name = mime_guess::from_path(filename)
        .first()
        .map(|m| m.essence_str().to_owned());
    let by_bytes = || infer::get(data).map(|t| t.mime_type().to_owned());
    by_name
        .or_else(by_bytes)
        .and_then(|m| ContentType::parse(&m).ok())
        .unwrap_or_else(|| {
            ContentType::parse("application/octet-stream").expect("a valid MIME type")
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn types_by_extension_then_bytes() {
        let t = |s: &str| ContentType::parse(s).unwrap();
        assert_eq!(guess("report.pdf", b""), t("application/pdf"));
        let png = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR";
        assert_eq!(guess("noext", png), t("image/png"));
        assert_eq!(guess("noext", b"plain"), t("application/octet-stream"));
    }
}

//! Which stream URLs a job may name, checked before FFmpeg sees them: `file://` under
//! `source_allowed_roots`; HLS over `https://` (or `http://` with `source_allow_http`), `rtmp://`
//! and `rtsp://` from hosts on `source_allowed_hosts`, refusing internal addresses unless
//! `source_allow_private` — the same rules as `mediafarm::storage::sources` applies to web sources.

use std::net::IpAddr;
use std::path::PathBuf;

use mediafarm::storage::sources::{host_allowed, is_internal};
use mediafarm::{Settings, TaskError};
use url::Url;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceKind {
    File,
    Hls,
    Rtmp,
    Rtsp,
}

/// A vetted stream: what FFmpeg opens and what messages show.
#[derive(Debug, Clone)]
pub struct StreamSource {
    pub url: String,
    pub shown: String,
    pub kind: SourceKind,
}

fn refused(url: &str, reason: impl std::fmt::Display) -> TaskError {
    TaskError::invalid(
        "SourceRefused",
        format!("stream_url {} refused: {reason}", crate::media::shown(url)),
    )
}

impl StreamSource {
    /// Checks `text` under the settings' source rules.
    pub async fn vet(text: &str, settings: &Settings) -> Result<StreamSource, TaskError> {
        let url = Url::parse(text).map_err(|e| refused(text, e))?;
        let shown = crate::media::shown(text);
        match url.scheme() {
            "file" => {
                let path = url
                    .to_file_path()
                    .map_err(|()| refused(text, "not a local absolute path"))?;
                let path = check_root(text, path, &settings.source_allowed_roots)?;
                Ok(StreamSource {
                    url: path.display().to_string(),
                    shown,
                    kind: SourceKind::File,
                })
            }
            scheme @ ("http" | "https" | "rtmp" | "rtsp") => {
                if scheme == "http" && !settings.source_allow_http {
                    return Err(refused(
                        text,
                        "http:// is not allowed (https only; see source_allow_http)",
                    ));
                }
                check_host(text, &url, settings).await?;
                let kind = match scheme {
                    "rtmp" => SourceKind::Rtmp,
                    "rtsp" => SourceKind::Rtsp,
                    _ => SourceKind::Hls,
                };
                Ok(StreamSource {
                    url: text.to_owned(),
                    shown,
                    kind,
                })
            }
            other => Err(refused(
                text,
                format!("scheme {other}:// is not a stream source; use file://, https:// (HLS), rtmp:// or rtsp://"),
            )),
        }
    }
}

fn check_root(text: &str, path: PathBuf, roots: &[String]) -> Result<PathBuf, TaskError> {
    if roots.is_empty() {
        return Err(refused(
            text,
            "file:// sources are off (source_allowed_roots is empty)",
        ));
    }
    let real = path.canonicalize().map_err(|e| {
        TaskError::invalid(
            "SourceNotFound",
            format!("stream_url {text} cannot be read: {e}"),
        )
    })?;
    let inside = roots.iter().any(|root| {
        std::path::Path::new(root)
            .canonicalize()
            .is_ok_and(|root| real.starts_with(root))
    });
    if !inside {
        return Err(refused(text, "not under any of source_allowed_roots"));
    }
    Ok(real)
}

async fn check_host(text: &str, url: &Url, settings: &Settings) -> Result<(), TaskError> {
    let host = url
        .host_str()
        .ok_or_else(|| refused(text, "no host"))?
        .trim_end_matches('.')
        .to_ascii_lowercase();
    if !host_allowed(&host, &settings.source_allowed_hosts) {
        return Err(refused(
            text,
            format!("host {host} is not in source_allowed_hosts"),
        ));
    }
    if settings.source_allow_private {
        return Ok(());
    }
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let port = url.port_or_known_default().unwrap_or(1935);
    let addrs: Vec<IpAddr> = match bare.parse::<IpAddr>() {
        Ok(ip) => vec![ip],
        Err(_) => tokio::net::lookup_host((bare, port))
            .await
            .map_err(|e| {
                TaskError::permanent(
                    "SourceUnreachable",
                    format!("stream_url {text}: cannot resolve {host}: {e}"),
                )
            })?
            .map(|a| a.ip())
            .collect(),
    };
    if let Some(bad) = addrs.iter().find(|ip| is_internal(**ip)) {
        return Err(refused(
            text,
            format!(
                "{host} resolves to {bad}, an internal address (loopback, private, link-local or reserved); see source_allow_private"
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn hosts_schemes_and_roots_are_checked() {
        let mut s = Settings::default();
        let err = StreamSource::vet("rtmp://10.0.0.1/live/x", &s)
            .await
            .unwrap_err();
        assert!(
            err.message.contains("source_allowed_hosts"),
            "{}",
            err.message
        );
        s.source_allowed_hosts = vec!["10.0.0.1".into()];
        let err = StreamSource::vet("rtmp://10.0.0.1/live/x", &s)
            .await
            .unwrap_err();
        assert!(err.message.contains("internal address"), "{}", err.message);
        s.source_allow_private = true;
        let ok = StreamSource::vet("rtmp://10.0.0.1/live/x", &s)
            .await
            .unwrap();
        assert_eq!(ok.kind, SourceKind::Rtmp);
        let err = StreamSource::vet("http://10.0.0.1/a.m3u8", &s)
            .await
            .unwrap_err();
        assert!(err.message.contains("source_allow_http"), "{}", err.message);
        let err = StreamSource::vet("gopher://10.0.0.1/", &s)
            .await
            .unwrap_err();
        assert!(
            err.message.contains("not a stream source"),
            "{}",
            err.message
        );
        let err = StreamSource::vet("file:///etc/passwd", &s)
            .await
            .unwrap_err();
        assert!(
            err.message.contains("source_allowed_roots"),
            "{}",
            err.message
        );
        s.source_allowed_roots = vec!["/tmp".into()];
        let err = StreamSource::vet("file:///etc/passwd", &s)
            .await
            .unwrap_err();
        assert!(err.message.contains("not under"), "{}", err.message);
        let shown = StreamSource::vet("rtsp://u:secret@10.0.0.1/cam", &s)
            .await
            .unwrap();
        assert!(!shown.shown.contains("secret"));
    }
}

//! Which stream URLs a job may name, checked before FFmpeg sees them: `file://` under
//! `source_allowed_roots`; HLS over `https://` (or `http://` with `source_allow_http`), `rtmp://`
//! and `rtsp://` from hosts on `source_allowed_hosts`, refusing internal addresses unless
//! `source_allow_private` — the same [`mediafarm::net::outbound`] rules as
//! `mediafarm::storage::sources` applies to web sources.

use std::path::PathBuf;

use mediafarm::net::{OutboundPolicy, SettingNames};
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

/// The outbound policy for stream URLs: the `source_*` rules of web sources, with `rtmp://` and
/// `rtsp://` beside `https://`. FFmpeg opens the URL itself, so only [`OutboundPolicy::vet`]
/// applies: the address cannot be pinned.
fn policy(settings: &Settings) -> OutboundPolicy {
    OutboundPolicy {
        allow_http: settings.source_allow_http,
        other_schemes: &["rtmp", "rtsp"],
        allowed_hosts: settings.source_allowed_hosts.clone(),
        allow_private: settings.source_allow_private,
        ..OutboundPolicy::new(SettingNames {
            allow_http: "source_allow_http",
            allowed_hosts: "source_allowed_hosts",
            allow_private: "source_allow_private",
        })
    }
}

async fn check_host(text: &str, url: &Url, settings: &Settings) -> Result<(), TaskError> {
    policy(settings).vet(url).await.map_err(|e| {
        if e.is_refusal() {
            refused(text, e)
        } else {
            TaskError::permanent("SourceUnreachable", format!("stream_url {text}: {e}"))
        }
    })
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

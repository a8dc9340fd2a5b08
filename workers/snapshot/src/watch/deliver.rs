//! Delivery of each frame to the session's webhook: a JSON POST signed like notify-worker's
//! webhooks — `X-Mediafarm-Timestamp: <unix seconds>` and
//! `X-Mediafarm-Signature: v1=<hex HMAC-SHA256(webhook_secret, "<timestamp>.<body>")>`. The URL
//! follows the webhook rules (`webhook_allowed_hosts`, `webhook_allow_http`,
//! `webhook_allow_private`); the request connects to the addresses that were checked (no DNS
//! rebinding) and follows no redirects.

use std::net::SocketAddr;
use std::time::Duration;

use hmac::{Hmac, Mac};
use mediafarm::sources::{host_allowed, is_internal};
use mediafarm::{Settings, TaskError};
use sha2::Sha256;
use url::Url;

use super::state::LastFrame;

pub struct Deliverer {
    secret: Option<String>,
    allowed_hosts: Vec<String>,
    allow_private: bool,
    allow_http: bool,
    timeout: Duration,
}

/// A checked webhook URL and the addresses to reach it at.
pub struct Target {
    url: Url,
    host: String,
    addrs: Vec<SocketAddr>,
}

fn refused(url: &str, why: impl std::fmt::Display) -> TaskError {
    TaskError::invalid(
        "DeliverRefused",
        format!("deliver URL {url} refused: {why}"),
    )
}

/// The signature header's value for `body` sent at `timestamp`.
pub fn sign(secret: &str, timestamp: u64, body: &[u8]) -> String {
    // HMAC takes keys of any length.
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC accepts any key");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    let digest = mac.finalize().into_bytes();
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("v1={hex}")
}

impl Deliverer {
    pub fn new(settings: &Settings) -> Deliverer {
        Deliverer {
            secret: settings.webhook_secret.clone(),
            allowed_hosts: settings.webhook_allowed_hosts.clone(),
            allow_private: settings.webhook_allow_private,
            allow_http: settings.webhook_allow_http,
            timeout: settings.webhook_timeout,
        }
    }

    /// Checks a webhook URL once, when the session starts.
    pub async fn vet(&self, text: &str) -> Result<Target, TaskError> {
        let url = Url::parse(text).map_err(|e| refused(text, e))?;
        match url.scheme() {
            "https" => {}
            "http" if self.allow_http => {}
            other => {
                return Err(refused(
                    text,
                    format!("{other}:// is not allowed (https only; see webhook_allow_http)"),
                ))
            }
        }
        let host = url
            .host_str()
            .ok_or_else(|| refused(text, "no host"))?
            .trim_end_matches('.')
            .to_ascii_lowercase();
        if !self.allowed_hosts.is_empty() && !host_allowed(&host, &self.allowed_hosts) {
            return Err(refused(
                text,
                format!("host {host} is not in webhook_allowed_hosts"),
            ));
        }
        let port = url.port_or_known_default().unwrap_or(443);
        let bare = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host((bare.as_str(), port))
            .await
            .map_err(|e| {
                TaskError::permanent(
                    "DeliverUnreachable",
                    format!("deliver URL {text}: cannot resolve {host}: {e}"),
                )
            })?
            .collect();
        if addrs.is_empty() {
            return Err(TaskError::permanent(
                "DeliverUnreachable",
                format!("deliver URL {text}: {host} has no addresses"),
            ));
        }
        if !self.allow_private {
            if let Some(bad) = addrs.iter().find(|a| is_internal(a.ip())) {
                return Err(refused(
                    text,
                    format!(
                        "{host} resolves to {}, an internal address; see webhook_allow_private",
                        bad.ip()
                    ),
                ));
            }
        }
        Ok(Target {
            url,
            host: bare,
            addrs,
        })
    }

    /// POSTs one frame's record; an error says why it was not accepted.
    pub async fn send(
        &self,
        to: &Target,
        stream_id: &str,
        session_id: &str,
        frame: &LastFrame,
    ) -> Result<(), String> {
        let body = serde_json::json!({
            "event": "snapshot.frame",
            "stream_id": stream_id,
            "session_id": session_id,
            "seq": frame.seq,
            "key": frame.key,
            "url": frame.url,
            "width": frame.width,
            "height": frame.height,
            "bytes": frame.bytes,
            "pts_s": frame.pts_s,
            "captured_at": frame.captured_at,
        })
        .to_string();
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(self.timeout)
            .resolve_to_addrs(&to.host, &to.addrs)
            .build()
            .map_err(|e| e.to_string())?;
        let timestamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let mut req = client
            .post(to.url.clone())
            .header("Content-Type", "application/json")
            .header("X-Mediafarm-Timestamp", timestamp.to_string());
        if let Some(secret) = &self.secret {
            req = req.header(
                "X-Mediafarm-Signature",
                sign(secret, timestamp, body.as_bytes()),
            );
        }
        let resp = req.body(body).send().await.map_err(|e| e.to_string())?;
        if resp.status().is_success() {
            Ok(())
        } else {
            Err(format!("{} answered {}", to.url, resp.status()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_match_an_independent_hmac() {
        // printf '1700000000.{"a":1}' | openssl dgst -sha256 -hmac k
        assert_eq!(
            sign("k", 1_700_000_000, br#"{"a":1}"#),
            "v1=1b6ad1bc9bf48c52ce01939866d5877c6cc4e87ddad27e16673cb8c4964394a3"
        );
    }
}

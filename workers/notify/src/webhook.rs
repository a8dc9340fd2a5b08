//! `notify.webhook`: POST `json` to `url`, signed (see [`mediafarm::net::signing`]) when
//! `webhook_secret` is set, sent once per idempotency key. The URL is held to the outbound
//! policy of image sources ([`mediafarm::net::outbound`]): `https://` only (unless
//! `webhook_allow_http`), no credentials in the URL, hosts from `webhook_allowed_hosts` when
//! that list is set, and no loopback, private, link-local or other internal addresses (unless
//! `webhook_allow_private`); the checked addresses are the ones connected to, and a redirect is
//! not followed but answered as a failure.

use std::collections::BTreeMap;
use std::time::Duration;

use mediafarm::net::{signing, Checked, OutboundError, OutboundPolicy, Redirects, SettingNames};
use mediafarm::settings::RateLimit;
use mediafarm::settings::WebhookSettings;
use mediafarm::{Task, TaskContext, TaskError};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use url::Url;

use crate::{http_status, validate};

/// Largest JSON body a webhook carries.
const MAX_BODY_BYTES: usize = 1 << 20;
/// Headers the worker sets itself.
const RESERVED: &[&str] = &[
    "host",
    "content-length",
    "content-type",
    "transfer-encoding",
    "connection",
    signing::TIMESTAMP_HEADER,
    signing::SIGNATURE_HEADER,
    signing::ID_HEADER,
];

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookArgs {
    pub url: String,
    pub json: Value,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    #[serde(default)]
    pub idempotency_key: Option<String>,
}

/// The receiver's status code and the size of the body sent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WebhookResult {
    pub status: u16,
    pub bytes: usize,
}

pub struct Webhook {
    secret: Option<Vec<u8>>,
    policy: OutboundPolicy,
    timeout: Duration,
    rate_limit: Option<RateLimit>,
}

impl Webhook {
    pub fn new(webhook: &WebhookSettings) -> Webhook {
        Webhook {
            secret: webhook
                .webhook_secret
                .as_ref()
                .filter(|s| !s.is_empty())
                .map(|s| s.as_bytes().to_vec()),
            policy: OutboundPolicy {
                allow_http: webhook.webhook_allow_http,
                allowed_hosts: webhook.webhook_allowed_hosts.clone(),
                any_host_when_empty: true,
                allow_private: webhook.webhook_allow_private,
                refuse_credentials: true,
                timeout: Some(webhook.webhook_timeout),
                redirects: Redirects::Return,
                ..OutboundPolicy::new(SettingNames {
                    allow_http: "webhook_allow_http",
                    allowed_hosts: "webhook_allowed_hosts",
                    allow_private: "webhook_allow_private",
                })
            },
            timeout: webhook.webhook_timeout,
            rate_limit: webhook.webhook_rate_limit,
        }
    }

    /// The task error for a URL the policy refused or could not reach.
    fn error(url: &Url, e: OutboundError) -> TaskError {
        match e {
            OutboundError::Unresolvable { host, error } => TaskError::transient(
                "ProviderUnreachable",
                format!("cannot resolve webhook host {host}: {error}"),
            ),
            OutboundError::NoAddresses { host } => TaskError::transient(
                "ProviderUnreachable",
                format!("webhook host {host} has no addresses"),
            ),
            OutboundError::Client(e) => TaskError::transient("ProviderUnreachable", e.to_string()),
            OutboundError::Request(e) => http_status::unreachable("the webhook receiver", &e),
            OutboundError::Credentials => TaskError::invalid(
                "WebhookRefused",
                format!(
                    "webhook URL {url} is refused: credentials in the URL; send them in `headers`"
                ),
            ),
            refusal => TaskError::invalid(
                "WebhookRefused",
                format!("webhook URL {url} is refused: {refusal}"),
            ),
        }
    }

    /// Checks the URL and resolves it to the addresses that may be connected to.
    async fn vet(&self, url: &Url) -> Result<Checked, TaskError> {
        self.policy
            .resolve(url)
            .await
            .map_err(|e| Self::error(url, e))
    }

    async fn post(
        &self,
        url: &Url,
        body: &[u8],
        headers: &BTreeMap<String, String>,
        delivery_id: &str,
    ) -> Result<WebhookResult, TaskError> {
        let signed = self.secret.as_ref().map(|secret| {
            let timestamp = signing::now();
            (timestamp, signing::sign(secret, timestamp, body))
        });
        let response = self
            .policy
            .send(url, |client, url| {
                let mut request = client
                    .post(url)
                    .header(reqwest::header::CONTENT_TYPE, "application/json")
                    .header(signing::ID_HEADER, delivery_id);
                for (name, value) in headers {
                    request = request.header(name, value);
                }
                if let Some((timestamp, signature)) = &signed {
                    request = request
                        .header(signing::TIMESTAMP_HEADER, timestamp.to_string())
                        .header(signing::SIGNATURE_HEADER, signature);
                }
                request.body(body.to_vec())
            })
            .await
            .map_err(|e| Self::error(url, e))?;
        let status = response.status();
        if !status.is_success() {
            let headers = response.headers().clone();
            let text = response.text().await.unwrap_or_default();
            let detail: String = text.chars().take(300).collect();
            return Err(http_status::failure(
                &format!("the webhook receiver at {url}"),
                status,
                &headers,
                &detail,
            ));
        }
        Ok(WebhookResult {
            status: status.as_u16(),
            bytes: body.len(),
        })
    }
}

fn check_headers(headers: &BTreeMap<String, String>) -> Result<(), TaskError> {
    for (name, value) in headers {
        validate::header_value(&format!("headers.{name}"), value)?;
        let lower = name.to_ascii_lowercase();
        let token = !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
        if !token {
            return Err(TaskError::invalid(
                "InvalidHeader",
                format!("header name {name:?} is not a valid HTTP header name"),
            ));
        }
        if RESERVED.contains(&lower.as_str()) {
            return Err(TaskError::invalid(
                "InvalidHeader",
                format!("header {name:?} is set by the worker, not by `headers`"),
            ));
        }
        if reqwest::header::HeaderValue::from_str(value).is_err() {
            return Err(TaskError::invalid(
                "InvalidHeader",
                format!("header {name:?} has a value HTTP cannot carry"),
            ));
        }
    }
    Ok(())
}

/// Everything checked before the host is resolved: the URL parses, the headers are ones HTTP
/// can carry and the worker does not set, the body is within [`MAX_BODY_BYTES`]. Returns the
/// URL and the body bytes.
pub fn prepare(args: &WebhookArgs) -> Result<(Url, Vec<u8>), TaskError> {
    let url = Url::parse(&args.url).map_err(|e| {
        TaskError::invalid(
            "InvalidArguments",
            format!("`url` = {:?} is not a URL: {e}", args.url),
        )
    })?;
    check_headers(&args.headers)?;
    let body = serde_json::to_vec(&args.json)
        .map_err(|e| TaskError::invalid("InvalidArguments", format!("`json`: {e}")))?;
    if body.len() > MAX_BODY_BYTES {
        return Err(TaskError::invalid(
            "BodyTooLarge",
            format!(
                "the webhook body is {} bytes; the limit is {MAX_BODY_BYTES}",
                body.len()
            ),
        ));
    }
    Ok((url, body))
}

impl Task for Webhook {
    const NAME: &'static str = "notify.webhook";
    /// In a chain, the previous step's return value is the body sent.
    const PARENT_RESULT: Option<&'static str> = Some("json");
    type Args = WebhookArgs;
    type Output = Value;

    async fn run(&self, ctx: TaskContext, args: WebhookArgs) -> Result<Value, TaskError> {
        let (url, body) = prepare(&args)?;
        // Refuse a bad URL before claiming anything.
        self.vet(&url).await?;
        let key =
            crate::once_only::once_key(&ctx, args.idempotency_key.as_deref(), &[url.as_str()]);
        let delivery_id = args
            .idempotency_key
            .clone()
            .unwrap_or_else(|| ctx.id.clone());
        validate::header_value("idempotency_key", &delivery_id)?;
        let lease = self.timeout * 3 + Duration::from_secs(10);
        crate::once_only::send_once(&ctx, &key, lease, || async {
            crate::rate_limit::acquire(&ctx, "webhook", self.rate_limit).await?;
            let sent = self.post(&url, &body, &args.headers, &delivery_id).await?;
            tracing::info!(job = %ctx.id, status = sent.status, "webhook delivered");
            serde_json::to_value(sent)
                .map_err(|e| TaskError::permanent("InternalError", e.to_string()))
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hook(tweak: impl FnOnce(&mut WebhookSettings)) -> Webhook {
        let mut s = WebhookSettings::default();
        tweak(&mut s);
        Webhook::new(&s)
    }

    #[tokio::test]
    async fn internal_and_plain_http_targets_are_refused_by_default() {
        let w = hook(|_| {});
        for url in [
            "https://127.0.0.1/x",
            "https://10.1.2.3/x",
            "https://[::1]/x",
            "https://169.254.169.254/latest/meta-data",
            "http://example.com/x",
            "ftp://example.com/x",
            "https://user:pw@example.com/x",
        ] {
            let e = w.vet(&Url::parse(url).unwrap()).await.unwrap_err();
            assert_eq!(e.exc_type, "WebhookRefused", "{url}: {}", e.message);
        }
        let w = hook(|s| s.webhook_allowed_hosts = vec!["hooks.example.com".into()]);
        let e = w
            .vet(&Url::parse("https://other.example.com/").unwrap())
            .await
            .unwrap_err();
        assert!(e.message.contains("webhook_allowed_hosts"), "{}", e.message);
        let w = hook(|s| {
            s.webhook_allow_private = true;
            s.webhook_allow_http = true;
        });
        assert!(w
            .vet(&Url::parse("http://127.0.0.1:9/x").unwrap())
            .await
            .is_ok());
    }

    #[test]
    fn header_rules() {
        let h = |k: &str, v: &str| BTreeMap::from([(k.to_owned(), v.to_owned())]);
        assert!(check_headers(&h("X-Event", "order.paid")).is_ok());
        assert_eq!(
            check_headers(&h("X-Event", "a\r\nX-Injected: 1"))
                .unwrap_err()
                .exc_type,
            "HeaderInjection"
        );
        assert_eq!(
            check_headers(&h("X-Mediafarm-Signature", "v1=forged"))
                .unwrap_err()
                .exc_type,
            "InvalidHeader"
        );
        assert_eq!(
            check_headers(&h("Bad Name", "x")).unwrap_err().exc_type,
            "InvalidHeader"
        );
    }
}

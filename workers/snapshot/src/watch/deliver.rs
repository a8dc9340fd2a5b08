//! Delivery of each frame to the session's webhook: a JSON POST signed like notify-worker's
//! webhooks ([`mediafarm::net::signing`]) — `X-Mediafarm-Timestamp: <unix seconds>` and
//! `X-Mediafarm-Signature: v1=<hex HMAC-SHA256(webhook_secret, "<timestamp>.<body>")>`. The URL
//! follows the webhook rules of [`mediafarm::net::outbound`] (`webhook_allowed_hosts`,
//! `webhook_allow_http`, `webhook_allow_private`); the request connects to the addresses that
//! were checked (no DNS rebinding) and follows no redirects. Each session's deliveries go out in order from their
//! own task ([`Courier`]), so a slow receiver never holds up the frames, and a delivery that
//! meets a network error, a timeout, 408, 429 or 5xx is tried again for up to a minute.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use mediafarm::net::{signing, OutboundError, OutboundPolicy, Redirects, SettingNames};
use mediafarm::settings::WebhookSettings;
use mediafarm::TaskError;
use tokio::sync::mpsc;
use tokio::time::Instant;
use url::Url;

use super::state::LastFrame;

/// How long one frame's delivery is retried before it counts as failed.
const DELIVERY_DEADLINE: Duration = Duration::from_secs(60);
/// The first pause between tries; it doubles, up to `MAX_BACKOFF`.
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(16);
/// Frames waiting for delivery per session; beyond that a frame's delivery is dropped (and
/// counted as failed) rather than the session waiting for the receiver.
const QUEUE: usize = 16;

#[derive(Clone)]
pub struct Deliverer {
    secret: Option<String>,
    policy: OutboundPolicy,
}

/// A checked webhook URL, and a client that connects only to the addresses checked.
#[derive(Clone)]
pub struct Target {
    url: Url,
    client: reqwest::Client,
}

/// Why one try did not deliver, and whether another may.
#[derive(Debug)]
struct Refusal {
    reason: String,
    /// `None`: trying again will not help (a 4xx other than 408 and 429).
    retry_after: Option<Duration>,
}

fn refused(url: &str, why: impl std::fmt::Display) -> TaskError {
    TaskError::invalid(
        "DeliverRefused",
        format!("deliver URL {url} refused: {why}"),
    )
}

/// The task error for a deliver URL the policy refused or could not reach.
fn policy_error(url: &str, e: OutboundError) -> TaskError {
    match e {
        // Shorter than the policy's own text, as it always was for deliveries.
        OutboundError::Internal { host, ip, setting } => refused(
            url,
            format!("{host} resolves to {ip}, an internal address; see {setting}"),
        ),
        e if e.is_refusal() => refused(url, e),
        e => TaskError::permanent("DeliverUnreachable", format!("deliver URL {url}: {e}")),
    }
}

impl Deliverer {
    pub fn new(webhook: &WebhookSettings) -> Deliverer {
        Deliverer {
            secret: webhook.webhook_secret.clone(),
            policy: OutboundPolicy {
                allow_http: webhook.webhook_allow_http,
                allowed_hosts: webhook.webhook_allowed_hosts.clone(),
                any_host_when_empty: true,
                allow_private: webhook.webhook_allow_private,
                timeout: Some(webhook.webhook_timeout),
                redirects: Redirects::Return,
                // Deliveries have always gone through a proxy set in the environment.
                system_proxy: true,
                ..OutboundPolicy::new(SettingNames {
                    allow_http: "webhook_allow_http",
                    allowed_hosts: "webhook_allowed_hosts",
                    allow_private: "webhook_allow_private",
                })
            },
        }
    }

    /// Checks a webhook URL once, when the session starts.
    pub async fn vet(&self, text: &str) -> Result<Target, TaskError> {
        let url = Url::parse(text).map_err(|e| refused(text, e))?;
        let checked = self
            .policy
            .resolve(&url)
            .await
            .map_err(|e| policy_error(text, e))?;
        let client = self
            .policy
            .client(&checked)
            .map_err(|e| policy_error(text, e))?;
        Ok(Target { url, client })
    }

    /// One try at POSTing `body`, signed now.
    async fn post(&self, to: &Target, id: &str, body: &str) -> Result<(), Refusal> {
        let timestamp = signing::now();
        let mut req = to
            .client
            .post(to.url.clone())
            .header("Content-Type", "application/json")
            .header(signing::ID_HEADER, id)
            .header(signing::TIMESTAMP_HEADER, timestamp.to_string());
        if let Some(secret) = &self.secret {
            req = req.header(
                signing::SIGNATURE_HEADER,
                signing::sign(secret.as_bytes(), timestamp, body.as_bytes()),
            );
        }
        let resp = mediafarm::observe::trace::inject_http(req.body(body.to_owned()))
            .send()
            .await
            .map_err(|e| Refusal {
                reason: format!("{}: {e}", to.url),
                retry_after: Some(Duration::ZERO),
            })?;
        let status = resp.status();
        if status.is_success() {
            return Ok(());
        }
        let retry_after = match status.as_u16() {
            429 => Some(
                resp.headers()
                    .get(reqwest::header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    // Capped: past the deadline it only means "give up", and an absurd value
                    // must not overflow the clock arithmetic.
                    .map_or(Duration::ZERO, |s| Duration::from_secs(s.min(3600))),
            ),
            408 | 500..=599 => Some(Duration::ZERO),
            _ => None,
        };
        Err(Refusal {
            reason: format!("{} answered {status}", to.url),
            retry_after,
        })
    }

    /// Delivers one frame, trying again on passing failures until `DELIVERY_DEADLINE`.
    async fn deliver(&self, to: &Target, frame: &Frame) -> Result<(), String> {
        let body = frame.body();
        let id = format!("{}-{}", frame.session_id, frame.last.seq);
        let deadline = frame.offered + DELIVERY_DEADLINE;
        let mut backoff = FIRST_BACKOFF;
        loop {
            let refusal = match self.post(to, &id, &body).await {
                Ok(()) => return Ok(()),
                Err(r) => r,
            };
            let Some(asked) = refusal.retry_after else {
                return Err(refusal.reason);
            };
            let wait = asked.max(backoff);
            if Instant::now() + wait > deadline {
                return Err(format!(
                    "{} (gave up after {:?})",
                    refusal.reason, DELIVERY_DEADLINE
                ));
            }
            tracing::debug!(reason = %refusal.reason, ?wait, "frame delivery will be tried again");
            tokio::time::sleep(wait).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }
}

/// One frame to deliver.
struct Frame {
    stream_id: String,
    session_id: String,
    last: LastFrame,
    offered: Instant,
}

impl Frame {
    fn body(&self) -> String {
        let f = &self.last;
        serde_json::json!({
            "event": "snapshot.frame",
            "stream_id": self.stream_id,
            "session_id": self.session_id,
            "seq": f.seq,
            "key": f.key,
            "url": f.url,
            "width": f.width,
            "height": f.height,
            "bytes": f.bytes,
            "pts_s": f.pts_s,
            "captured_at": f.captured_at,
        })
        .to_string()
    }
}

/// A session's delivery task: frames go out one at a time, in order.
pub struct Courier {
    frames: mpsc::Sender<Frame>,
    task: tokio::task::JoinHandle<()>,
    /// Frames offered and not yet delivered or given up.
    pending: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    stream_id: String,
    session_id: String,
}

impl Courier {
    pub fn start(deliverer: Deliverer, to: Target, stream_id: &str, session_id: &str) -> Courier {
        let (frames, mut queue) = mpsc::channel::<Frame>(QUEUE);
        let pending = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let (p, f) = (pending.clone(), failed.clone());
        let task = tokio::spawn(async move {
            while let Some(frame) = queue.recv().await {
                if let Err(reason) = deliverer.deliver(&to, &frame).await {
                    f.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(stream_id = %frame.stream_id, seq = frame.last.seq, %reason, "frame delivery failed");
                }
                p.fetch_sub(1, Ordering::Relaxed);
            }
        });
        Courier {
            frames,
            task,
            pending,
            failed,
            stream_id: stream_id.to_owned(),
            session_id: session_id.to_owned(),
        }
    }

    /// Queues a frame's delivery; with the queue full it is dropped and counted as failed.
    pub fn offer(&self, last: &LastFrame) {
        let frame = Frame {
            stream_id: self.stream_id.clone(),
            session_id: self.session_id.clone(),
            last: last.clone(),
            offered: Instant::now(),
        };
        self.pending.fetch_add(1, Ordering::Relaxed);
        if self.frames.try_send(frame).is_err() {
            self.pending.fetch_sub(1, Ordering::Relaxed);
            self.failed.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(stream_id = %self.stream_id, seq = last.seq, "frame delivery dropped: the receiver is {QUEUE} frames behind");
        }
    }

    /// Waits up to `grace` for the queued deliveries; returns how many failed (those still
    /// queued after `grace` included).
    pub async fn finish(self, grace: Duration) -> u64 {
        drop(self.frames);
        let mut task = self.task;
        if tokio::time::timeout(grace, &mut task).await.is_err() {
            task.abort();
            self.failed
                .fetch_add(self.pending.load(Ordering::Relaxed), Ordering::Relaxed);
        }
        self.failed.load(Ordering::Relaxed)
    }
}

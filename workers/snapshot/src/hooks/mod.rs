//! `snapshot-hooks`: the media server's publish hooks start and stop `snapshot.watch`
//! sessions. nginx-rtmp's `on_publish` / `on_publish_done` (POST `/nginx-rtmp`, form-encoded)
//! and SRS's `http_hooks` `on_publish` / `on_unpublish` (POST `/srs`, JSON) are read into one
//! [`calls::Call`]; the application's policy (`[hooks_apps.<app>]`, [`settings`]) turns a
//! publish into a job, and the end of publishing into the stop request `mediafarm streams
//! stop` makes ([`sessions`]).
//!
//! It lives in the snapshot crate, as its own small binary, because everything it decides is
//! snapshot-worker's: the task's arguments, the stream's claim and the stop scope. It is not
//! part of beat: beat runs one leader at a time, while hooks must be answered by whichever
//! replica the media server reaches, at once; this service keeps no state of its own (Redis
//! holds it), so any number of replicas may run side by side.
//!
//! Answers: 2xx lets the publish go ahead (SRS: HTTP 200 with body `0`); 403 refuses it (a
//! wrong or missing token, a caller not allowed, an unwatched application with
//! `hooks_unknown_app = "refuse"`); 400 is a malformed hook; 413 a body over `hooks_max_body`;
//! 503 when the session cannot be started (broker or Redis down, the previous session still
//! ending): the publish is refused rather than left without snapshots. SRS gets the same
//! status with a JSON body `{"code": <status>, "msg": …}`, which it treats as a refusal.

pub mod calls;
pub mod sessions;
pub mod settings;

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use mediafarm::{Client, Settings};
use serde_json::json;
use tokio::net::TcpListener;

use calls::{Call, Event};
use sessions::Started;
pub use settings::{AppPolicy, HooksSettings};

/// The media server a hook came from: how its body is read and how it is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dialect {
    NginxRtmp,
    Srs,
}

/// The service: settings, the producer client, the allowed callers.
pub struct Hooks {
    settings: Settings,
    hooks: HooksSettings,
    allowed: Vec<settings::Block>,
    client: Client,
}

/// An answer before it is written for a dialect.
struct Answer {
    status: StatusCode,
    msg: String,
}

impl Answer {
    fn ok(msg: impl Into<String>) -> Answer {
        Answer {
            status: StatusCode::OK,
            msg: msg.into(),
        }
    }

    fn refuse(status: StatusCode, msg: impl Into<String>) -> Answer {
        Answer {
            status,
            msg: msg.into(),
        }
    }

    fn write(self, dialect: Dialect) -> Response<Full<Bytes>> {
        match dialect {
            // SRS reads the body: 0 (or {"code": 0}) allows, anything else refuses.
            Dialect::Srs if self.status.is_success() => text(StatusCode::OK, "0".into()),
            Dialect::Srs => {
                let body = json!({"code": self.status.as_u16(), "msg": self.msg}).to_string();
                let mut r = text(self.status, body);
                r.headers_mut().insert(
                    hyper::header::CONTENT_TYPE,
                    hyper::header::HeaderValue::from_static("application/json"),
                );
                r
            }
            Dialect::NginxRtmp => text(self.status, format!("{}\n", self.msg)),
        }
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// Equal in time independent of where they differ (the lengths may show).
fn same_secret(given: &[u8], expected: &[u8]) -> bool {
    given.len() == expected.len()
        && given
            .iter()
            .zip(expected)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

impl Hooks {
    /// Connects the producer client (RabbitMQ, Redis).
    pub async fn connect(
        settings: &Settings,
        hooks: &HooksSettings,
    ) -> Result<Hooks, mediafarm::ClientError> {
        Ok(Hooks {
            settings: settings.clone(),
            hooks: hooks.clone(),
            allowed: hooks.allowed(),
            client: Client::connect(settings).await?,
        })
    }

    /// Binds `addr` and serves hooks until `stop` resolves; returns the bound address (port 0
    /// picks one) and the task serving.
    pub async fn serve(
        self,
        addr: SocketAddr,
        stop: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
        let listener = TcpListener::bind(addr).await?;
        let local = listener.local_addr()?;
        let this = Arc::new(self);
        let task = tokio::spawn(async move {
            tokio::pin!(stop);
            loop {
                let accepted = tokio::select! {
                    _ = &mut stop => break,
                    a = listener.accept() => a,
                };
                let Ok((stream, peer)) = accepted else {
                    continue;
                };
                let this = this.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| {
                        let this = this.clone();
                        async move { Ok::<_, Infallible>(this.route(req, peer.ip()).await) }
                    });
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
            tracing::info!("hooks endpoint stopped");
        });
        tracing::info!(%local, "hooks endpoint listening");
        Ok((local, task))
    }

    async fn route(&self, req: Request<Incoming>, peer: IpAddr) -> Response<Full<Bytes>> {
        let dialect = match req.uri().path() {
            "/healthz" if req.method() == Method::GET || req.method() == Method::HEAD => {
                return text(StatusCode::OK, "ok\n".into())
            }
            "/nginx-rtmp" => Dialect::NginxRtmp,
            "/srs" => Dialect::Srs,
            _ => {
                return text(
                    StatusCode::NOT_FOUND,
                    "hooks are POST /nginx-rtmp (nginx-rtmp) and POST /srs (SRS http_hooks); \
                     health is GET /healthz\n"
                        .into(),
                )
            }
        };
        self.hook(req, peer, dialect).await.write(dialect)
    }

    /// Whether the caller may use the endpoint: its address, then its token.
    fn authorised(&self, req: &Request<Incoming>, peer: IpAddr) -> Result<(), String> {
        if !self.allowed.is_empty() && !self.allowed.iter().any(|b| b.contains(peer)) {
            return Err(format!("caller {peer} is not in hooks_allow_from"));
        }
        let Some(expected) = &self.hooks.hooks_token else {
            return Ok(());
        };
        let given = req.uri().query().and_then(|q| {
            url::form_urlencoded::parse(q.as_bytes())
                .find(|(k, _)| k == "token")
                .map(|(_, v)| v.into_owned())
        });
        match given {
            Some(t) if same_secret(t.as_bytes(), expected.as_bytes()) => Ok(()),
            Some(_) => Err("wrong token".into()),
            None => Err("no ?token= in the hook URL".into()),
        }
    }

    async fn hook(&self, req: Request<Incoming>, peer: IpAddr, dialect: Dialect) -> Answer {
        if req.method() != Method::POST {
            return Answer::refuse(StatusCode::METHOD_NOT_ALLOWED, "hooks are POSTed");
        }
        if let Err(why) = self.authorised(&req, peer) {
            tracing::warn!(%peer, ?dialect, %why, "hook refused");
            return Answer::refuse(StatusCode::FORBIDDEN, format!("forbidden: {why}"));
        }
        let limit = self.hooks.hooks_max_body;
        let body = match Limited::new(req.into_body(), limit).collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                return Answer::refuse(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("the hook's body is over hooks_max_body = {limit} bytes"),
                )
            }
            Err(e) => {
                return Answer::refuse(StatusCode::BAD_REQUEST, format!("reading the body: {e}"))
            }
        };
        let call = match dialect {
            Dialect::NginxRtmp => calls::nginx_rtmp(&body),
            Dialect::Srs => calls::srs(&body),
        };
        let call = match call {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(%peer, ?dialect, error = %e, "malformed hook");
                return Answer::refuse(StatusCode::BAD_REQUEST, format!("malformed hook: {e}"));
            }
        };
        self.act(call, dialect).await
    }

    async fn act(&self, call: Call, dialect: Dialect) -> Answer {
        let (app, name) = (call.app.as_str(), call.name.as_str());
        if let Event::Other(what) = &call.event {
            tracing::debug!(?dialect, %what, %app, %name, "hook ignored");
            return Answer::ok("ignored");
        }
        let Some(policy) = self.hooks.hooks_apps.0.get(app) else {
            let refuse = self.hooks.hooks_unknown_app == "refuse";
            tracing::info!(?dialect, event = ?call.event, %app, %name, refuse, "no [hooks_apps] policy for this application: no session");
            return if refuse && call.event == Event::Publish {
                Answer::refuse(
                    StatusCode::FORBIDDEN,
                    format!(
                        "application {app:?} is not watched and hooks_unknown_app = \"refuse\""
                    ),
                )
            } else {
                Answer::ok("not watched")
            };
        };
        if !settings::name_ok(name) {
            tracing::warn!(?dialect, %app, %name, "stream name refused");
            return Answer::refuse(
                StatusCode::BAD_REQUEST,
                format!("stream name {name:?} is not accepted: 1 to 60 of A-Z a-z 0-9 - _"),
            );
        }
        let args = policy.watch_args(app, name);
        match call.event {
            Event::Publish => self.publish(policy, &args, &call).await,
            _ => self.unpublish(&args, &call).await,
        }
    }

    async fn publish(
        &self,
        policy: &AppPolicy,
        args: &crate::watch::WatchArgs,
        call: &Call,
    ) -> Answer {
        let stream_id = &args.stream_id;
        let started = sessions::start(
            &self.client,
            &policy.queue,
            args,
            self.hooks.hooks_start_guard,
            self.hooks.hooks_takeover_wait,
        )
        .await;
        match started {
            Ok(Started::Sent(job)) => {
                tracing::info!(%stream_id, %job, client = %call.client, "publish: session started");
                Answer::ok(format!("started {job}"))
            }
            Ok(Started::Watched(session)) => {
                tracing::info!(%stream_id, %session, "publish: the stream is watched already; nothing sent");
                Answer::ok(format!("watched by {session}"))
            }
            Ok(Started::Starting(job)) => {
                tracing::info!(%stream_id, %job, "publish: a session was started a moment ago; nothing sent");
                Answer::ok(format!("starting {job}"))
            }
            Err(e) => {
                tracing::error!(%stream_id, error = %e, "publish refused: no session could be started");
                Answer::refuse(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
            }
        }
    }

    async fn unpublish(&self, args: &crate::watch::WatchArgs, call: &Call) -> Answer {
        let stream_id = &args.stream_id;
        match sessions::stop(&self.settings, &self.client, stream_id).await {
            Ok(done) => {
                tracing::info!(%stream_id, revoked = ?done.revoked, client = %call.client, "publish ended: session asked to stop");
                Answer::ok("stopping")
            }
            Err(e) => {
                tracing::error!(%stream_id, error = %e, "publish ended but the session could not be asked to stop");
                Answer::refuse(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_compare_whole() {
        assert!(same_secret(b"0123456789abcdef", b"0123456789abcdef"));
        assert!(!same_secret(b"0123456789abcdeX", b"0123456789abcdef"));
        assert!(!same_secret(b"0123", b"0123456789abcdef"));
    }
}

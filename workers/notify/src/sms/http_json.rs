//! A generic SMS provider: a JSON POST to `sms_http_url`, the body rendered from the
//! `sms_http_body` template (over `to`, `from`, `body`), an optional `Authorization` header,
//! and the message id and status read from the answer by JSON pointers.

use mediafarm::TaskError;

use crate::settings::NotifySettings;
use minijinja::Environment;
use serde_json::Value;

use super::{Outgoing, SendFuture, SmsProvider, SmsResult};
use crate::{http_status, ConfigError};

pub struct HttpJson {
    http: reqwest::Client,
    url: String,
    authorization: Option<String>,
    from: String,
    body: Environment<'static>,
    id_pointer: String,
    status_pointer: String,
}

impl HttpJson {
    pub fn from_settings(
        notify: &NotifySettings,
        http: reqwest::Client,
    ) -> Result<Option<HttpJson>, ConfigError> {
        let Some(url) = &notify.sms_http_url else {
            return Ok(None);
        };
        let mut body = Environment::new();
        body.set_undefined_behavior(minijinja::UndefinedBehavior::Strict);
        body.add_template_owned("body", notify.sms_http_body.clone())
            .map_err(|e| ConfigError {
                name: "sms_http_body",
                reason: format!("not a valid template: {e}"),
            })?;
        for (name, pointer) in [
            ("sms_http_id_pointer", &notify.sms_http_id_pointer),
            ("sms_http_status_pointer", &notify.sms_http_status_pointer),
        ] {
            if !pointer.is_empty() && !pointer.starts_with('/') {
                return Err(ConfigError {
                    name: if name == "sms_http_id_pointer" {
                        "sms_http_id_pointer"
                    } else {
                        "sms_http_status_pointer"
                    },
                    reason: format!("{pointer:?} is not a JSON pointer (e.g. \"/messages/0/id\")"),
                });
            }
        }
        if let Some(a) = &notify.sms_http_authorization {
            crate::validate::header_value("sms_http_authorization", a).map_err(|e| {
                ConfigError {
                    name: "sms_http_authorization",
                    reason: e.message,
                }
            })?;
        }
        let provider = HttpJson {
            http,
            url: url.clone(),
            authorization: notify.sms_http_authorization.clone(),
            from: notify.sms_http_from.clone().unwrap_or_default(),
            body,
            id_pointer: notify.sms_http_id_pointer.clone(),
            status_pointer: notify.sms_http_status_pointer.clone(),
        };
        provider
            .render(&Outgoing {
                to: "+10000000000".into(),
                body: "check \"quotes\"\n".into(),
            })
            .map_err(|e| ConfigError {
                name: "sms_http_body",
                reason: e.message,
            })?;
        Ok(Some(provider))
    }

    /// The request body, which must come out as JSON.
    pub fn render(&self, message: &Outgoing) -> Result<Value, TaskError> {
        let text = self
            .body
            .get_template("body")
            .and_then(|t| {
                t.render(minijinja::context! {
                    to => &message.to, from => &self.from, body => &message.body
                })
            })
            .map_err(|e| {
                TaskError::permanent(
                    "ProviderConfig",
                    format!("sms_http_body cannot be rendered: {e}"),
                )
            })?;
        serde_json::from_str(&text).map_err(|e| {
            TaskError::permanent(
                "ProviderConfig",
                format!(
                    "sms_http_body does not render to JSON ({e}); write values as {{{{ body|tojson }}}}"
                ),
            )
        })
    }

    async fn post(&self, message: &Outgoing) -> Result<SmsResult, TaskError> {
        let json = self.render(message)?;
        let mut request = self
            .http
            .post(&self.url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(json.to_string());
        if let Some(a) = &self.authorization {
            request = request.header(reqwest::header::AUTHORIZATION, a);
        }
        let response = mediafarm::observe::trace::inject_http(request)
            .send()
            .await
            .map_err(|e| http_status::unreachable("the SMS provider", &e))?;
        let status = response.status();
        let headers = response.headers().clone();
        let body = response
            .bytes()
            .await
            .map_err(|e| http_status::unreachable("the SMS provider", &e))?;
        if !status.is_success() {
            let detail = String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned();
            return Err(http_status::failure(
                "the SMS provider",
                status,
                &headers,
                &detail,
            ));
        }
        let answer: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        let field = |pointer: &str| match answer.pointer(pointer) {
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Null) | None => None,
            Some(other) => Some(other.to_string()),
        };
        Ok(SmsResult {
            provider: "http".into(),
            provider_id: field(&self.id_pointer).unwrap_or_default(),
            status: field(&self.status_pointer).unwrap_or_else(|| "accepted".into()),
        })
    }
}

impl SmsProvider for HttpJson {
    fn name(&self) -> &'static str {
        "http"
    }

    fn send<'a>(&'a self, message: &'a Outgoing) -> SendFuture<'a> {
        Box::pin(self.post(message))
    }
}

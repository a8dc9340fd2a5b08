//! Twilio's Messages API: `POST {base}/2010-04-01/Accounts/{AccountSid}/Messages.json` with form
//! fields `To`, `From`, `Body` (and `StatusCallback`), HTTP basic auth with the account SID and
//! auth token. 201 answers `{sid, status, ...}`; errors answer `{code, message, more_info}`.

use mediafarm::TaskError;

use crate::settings::NotifySettings;
use serde::Deserialize;

use super::{Outgoing, SendFuture, SmsProvider, SmsResult};
use crate::{http_status, ConfigError};

pub struct Twilio {
    http: reqwest::Client,
    url: String,
    account_sid: String,
    auth_token: String,
    from: String,
    status_callback: Option<String>,
}

#[derive(Deserialize)]
struct Created {
    sid: String,
    #[serde(default)]
    status: Option<String>,
}

#[derive(Deserialize)]
struct Problem {
    #[serde(default)]
    code: Option<i64>,
    #[serde(default)]
    message: Option<String>,
    #[serde(default)]
    more_info: Option<String>,
}

impl Twilio {
    /// `None` when Twilio is not configured at all; an error when it is half configured.
    pub fn from_settings(
        notify: &NotifySettings,
        http: reqwest::Client,
    ) -> Result<Option<Twilio>, ConfigError> {
        let (sid, token, from) = match (
            &notify.twilio_account_sid,
            &notify.twilio_auth_token,
            &notify.twilio_from,
        ) {
            (None, None, None) => return Ok(None),
            (Some(s), Some(t), Some(f)) => (s.clone(), t.clone(), f.clone()),
            _ => {
                return Err(ConfigError {
                    name: "twilio_account_sid",
                    reason: "twilio_account_sid, twilio_auth_token and twilio_from go together"
                        .into(),
                })
            }
        };
        let sid_ok = !sid.is_empty() && sid.bytes().all(|b| b.is_ascii_alphanumeric());
        if !sid_ok {
            return Err(ConfigError {
                name: "twilio_account_sid",
                reason: "an account SID is letters and digits (AC...)".into(),
            });
        }
        let base = notify.twilio_base_url.trim_end_matches('/');
        Ok(Some(Twilio {
            http,
            url: format!("{base}/2010-04-01/Accounts/{sid}/Messages.json"),
            account_sid: sid,
            auth_token: token,
            from,
            status_callback: notify.twilio_status_callback.clone(),
        }))
    }

    /// The form fields Twilio documents, URL-encoded.
    fn form(&self, message: &Outgoing) -> String {
        let mut form = url::form_urlencoded::Serializer::new(String::new());
        form.append_pair("To", &message.to)
            .append_pair("From", &self.from)
            .append_pair("Body", &message.body);
        if let Some(cb) = &self.status_callback {
            form.append_pair("StatusCallback", cb);
        }
        form.finish()
    }

    async fn post(&self, message: &Outgoing) -> Result<SmsResult, TaskError> {
        let form = self.form(message);
        let request = self
            .http
            .post(&self.url)
            .basic_auth(&self.account_sid, Some(&self.auth_token))
            .header(
                reqwest::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            )
            .body(form);
        let response = mediafarm::observe::trace::inject_http(request)
            .send()
            .await
            .map_err(|e| http_status::unreachable("Twilio", &e))?;
        let status = response.status();
        let headers = response.headers().clone();
        let body = response
            .bytes()
            .await
            .map_err(|e| http_status::unreachable("Twilio", &e))?;
        if status.is_success() {
            let created: Created = serde_json::from_slice(&body).map_err(|e| {
                TaskError::transient(
                    "ProviderAnswerInvalid",
                    format!("Twilio answered {status} with a body that is not a message: {e}"),
                )
            })?;
            return Ok(SmsResult {
                provider: "twilio".into(),
                provider_id: created.sid,
                status: created.status.unwrap_or_else(|| "queued".into()),
            });
        }
        let detail = match serde_json::from_slice::<Problem>(&body) {
            Ok(p) => {
                let mut d = p.message.unwrap_or_default();
                if let Some(code) = p.code {
                    d.push_str(&format!(" (Twilio error {code}"));
                    if let Some(info) = p.more_info {
                        d.push_str(&format!(", {info}"));
                    }
                    d.push(')');
                }
                d
            }
            Err(_) => String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned(),
        };
        Err(http_status::failure("Twilio", status, &headers, &detail))
    }
}

impl SmsProvider for Twilio {
    fn name(&self) -> &'static str {
        "twilio"
    }

    fn send<'a>(&'a self, message: &'a Outgoing) -> SendFuture<'a> {
        Box::pin(self.post(message))
    }
}

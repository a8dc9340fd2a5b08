//! `notify.sms`: one text message to an E.164 number, literal `body` or a `template`
//! (`<name>.sms.txt`) with `context`, through a provider behind [`SmsProvider`]: Twilio, a
//! configurable JSON-over-HTTP provider, or the outbox directory. Sent once per idempotency key.

pub mod http_json;
pub mod outbox;
pub mod twilio;

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use mediafarm::settings::RateLimit;
use mediafarm::settings::WebhookSettings;
use mediafarm::{Task, TaskContext, TaskError};

use crate::settings::NotifySettings;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::templates::{Rendered, Templates};
use crate::{validate, ConfigError};

/// Longest body accepted (Twilio's limit; longer texts are split into segments by the carrier).
pub const MAX_BODY_CHARS: usize = 1600;

/// A message ready for a provider.
#[derive(Debug, Clone, PartialEq)]
pub struct Outgoing {
    pub to: String,
    pub body: String,
}

/// What a provider says about an accepted message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SmsResult {
    pub provider: String,
    pub provider_id: String,
    pub status: String,
}

pub type SendFuture<'a> = Pin<Box<dyn Future<Output = Result<SmsResult, TaskError>> + Send + 'a>>;

/// An SMS provider: sends one message, classifying its failures as passing or not.
pub trait SmsProvider: Send + Sync {
    fn name(&self) -> &'static str;
    fn send<'a>(&'a self, message: &'a Outgoing) -> SendFuture<'a>;
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SmsArgs {
    pub to: String,
    #[serde(default)]
    pub body: Option<String>,
    #[serde(default)]
    pub template: Option<String>,
    #[serde(default)]
    pub context: Map<String, Value>,
    /// `twilio`, `http` or `outbox`; default: the `sms_provider` setting.
    #[serde(default)]
    pub provider: Option<String>,
    #[serde(default)]
    pub idempotency_key: Option<String>,
}

pub struct Sms {
    providers: BTreeMap<&'static str, Arc<dyn SmsProvider>>,
    default_provider: String,
    templates: Arc<Templates>,
    rate_limit: Option<RateLimit>,
    lease: Duration,
}

impl Sms {
    pub fn new(
        notify: &NotifySettings,
        webhook: &WebhookSettings,
        templates: Arc<Templates>,
        http: reqwest::Client,
    ) -> Result<Sms, ConfigError> {
        let mut providers: BTreeMap<&'static str, Arc<dyn SmsProvider>> = BTreeMap::new();
        providers.insert("outbox", Arc::new(outbox::Outbox::new(notify)));
        if let Some(t) = twilio::Twilio::from_settings(notify, http.clone())? {
            providers.insert("twilio", Arc::new(t));
        }
        if let Some(h) = http_json::HttpJson::from_settings(notify, http)? {
            providers.insert("http", Arc::new(h));
        }
        if !providers.contains_key(notify.sms_provider.as_str()) {
            return Err(ConfigError {
                name: "sms_provider",
                reason: format!(
                    "{:?} is chosen but not configured (twilio needs twilio_account_sid, \
                     twilio_auth_token and twilio_from; http needs sms_http_url)",
                    notify.sms_provider
                ),
            });
        }
        Ok(Sms {
            providers,
            default_provider: notify.sms_provider.clone(),
            templates,
            rate_limit: notify.sms_rate_limit,
            lease: webhook.webhook_timeout * 3 + Duration::from_secs(10),
        })
    }
}

/// The text to send, checked: the number is E.164 and the body (literal, or rendered from
/// `<template>.sms.txt`) is neither empty nor longer than [`MAX_BODY_CHARS`].
pub fn check(args: &SmsArgs, templates: &Templates) -> Result<String, TaskError> {
    validate::e164("to", &args.to)?;
    let body = match (&args.body, &args.template) {
        (Some(body), None) => body.clone(),
        (None, Some(name)) => {
            Templates::check_name(name)?;
            let file = format!("{name}.sms.txt");
            match templates.render(&file, &args.context)? {
                Rendered::Text(t) => t,
                Rendered::Missing => return Err(templates.unknown(name, &[file])),
            }
        }
        (Some(_), Some(_)) => {
            return Err(TaskError::invalid(
                "InvalidArguments",
                "give either `body` or `template` (+ `context`), not both",
            ))
        }
        (None, None) => {
            return Err(TaskError::invalid(
                "EmptyBody",
                "notify.sms needs `body` or a `template`",
            ))
        }
    };
    validate::non_empty("the SMS body", &body)?;
    let chars = body.chars().count();
    if chars > MAX_BODY_CHARS {
        return Err(TaskError::invalid(
            "BodyTooLong",
            format!("the SMS body is {chars} characters; the limit is {MAX_BODY_CHARS}"),
        ));
    }
    Ok(body)
}

impl Task for Sms {
    const NAME: &'static str = "notify.sms";
    /// In a chain, the previous step's return value (an object) is the template context.
    const PARENT_RESULT: Option<&'static str> = Some("context");
    type Args = SmsArgs;
    type Output = Value;

    async fn run(&self, ctx: TaskContext, args: SmsArgs) -> Result<Value, TaskError> {
        let body = check(&args, &self.templates)?;
        let name = args.provider.as_deref().unwrap_or(&self.default_provider);
        let provider = self.providers.get(name).cloned().ok_or_else(|| {
            TaskError::invalid(
                "UnknownProvider",
                format!(
                    "SMS provider {name:?} is not configured on this worker; configured: {}",
                    self.providers
                        .keys()
                        .copied()
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            )
        })?;
        let key = crate::once_only::once_key(&ctx, args.idempotency_key.as_deref(), &[&args.to]);
        let message = Outgoing { to: args.to, body };
        let rate_limit = self.rate_limit;
        crate::once_only::send_once(&ctx, &key, self.lease, || async {
            let bucket = format!("sms-{}", provider.name());
            crate::rate_limit::acquire(&ctx, &bucket, rate_limit).await?;
            let sent = provider.send(&message).await?;
            tracing::info!(job = %ctx.id, provider = %sent.provider, id = %sent.provider_id, "SMS sent");
            serde_json::to_value(sent)
                .map_err(|e| TaskError::permanent("InternalError", e.to_string()))
        })
        .await
    }
}

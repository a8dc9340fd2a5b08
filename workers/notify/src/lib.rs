//! notify-worker: `notify.email` (SMTP through a pooled connection, or `.eml` files in an
//! outbox), `notify.sms` (Twilio, a configurable JSON-over-HTTP provider, or an outbox) and
//! `notify.webhook` (signed JSON POSTs). Each message is sent once per idempotency key, even
//! when its job is redelivered; see [`once_only`] for the one window where it may repeat.

pub mod email;
#[doc(hidden)]
pub mod fuzzing;
pub mod http_status;
pub mod once_only;
pub mod rate_limit;
pub mod settings;
pub mod sms;
pub mod templates;
pub mod validate;
pub mod webhook;

use std::sync::Arc;

use mediafarm::settings::WebhookSettings;
use mediafarm::{Registry, Settings};

pub use email::Email;
pub use settings::{NotifyGroups, NotifySettings, DEFAULT_SMS_HTTP_BODY};
pub use sms::Sms;
pub use webhook::Webhook;

/// A setting notify-worker cannot start with.
#[derive(Debug, thiserror::Error)]
#[error("setting `{name}` is not usable: {reason}")]
pub struct ConfigError {
    pub name: &'static str,
    pub reason: String,
}

/// The three notify tasks, built from one worker's settings: the core ones, its own and the
/// webhook rules.
pub fn registry(
    settings: &Settings,
    notify: &NotifySettings,
    webhook: &WebhookSettings,
) -> Result<Registry, ConfigError> {
    let templates = Arc::new(templates::Templates::new(&notify.notify_template_dir));
    let http = reqwest::Client::builder()
        .timeout(webhook.webhook_timeout)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(|e| ConfigError {
            name: "webhook_timeout",
            reason: format!("cannot build the HTTP client: {e}"),
        })?;
    Ok(Registry::new()
        .register(Email::new(settings, notify, templates.clone())?)
        .register(Sms::new(notify, webhook, templates, http)?)
        .register(Webhook::new(webhook)))
}

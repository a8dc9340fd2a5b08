//! `notify.email`: one email to `to` (and `cc`/`bcc`), from literal `subject` + `text`/`html` or
//! from a `template` + `context`, with attachments read from object storage, sent once per
//! idempotency key through a pooled SMTP connection (or written to the outbox directory).

pub mod attachments;
pub mod compose;
pub mod implicit_tls;
pub mod smtp_pool;
pub mod transport;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use mediafarm::settings::RateLimit;
use mediafarm::storage::Storage;
use mediafarm::{Settings, Task, TaskContext, TaskError};

use crate::settings::NotifySettings;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::templates::Templates;
use crate::ConfigError;
use attachments::AttachmentSpec;
use transport::Mailer;

/// One address or several: `"a@example.com"`, `"张三 <zhang@example.com>"` or a list of them.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(untagged)]
pub enum Recipients {
    #[default]
    None,
    One(String),
    Many(Vec<String>),
}

impl Recipients {
    pub fn list(&self) -> Vec<&str> {
        match self {
            Recipients::None => Vec::new(),
            Recipients::One(a) => vec![a.as_str()],
            Recipients::Many(v) => v.iter().map(String::as_str).collect(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmailArgs {
    pub to: Recipients,
    #[serde(default)]
    pub cc: Recipients,
    #[serde(default)]
    pub bcc: Recipients,
    #[serde(default)]
    pub reply_to: Option<String>,
    /// Default: the `email_from` setting.
    #[serde(default)]
    pub from: Option<String>,
    #[serde(default)]
    pub subject: Option<String>,
    #[serde(default)]
    pub text: Option<String>,
    #[serde(default)]
    pub html: Option<String>,
    #[serde(default)]
    pub template: Option<String>,
    #[serde(default)]
    pub context: Map<String, Value>,
    /// Extra headers (`X-...` and the like); never ones the message builds itself.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    #[serde(default)]
    pub attachments: Vec<AttachmentSpec>,
    #[serde(default)]
    pub idempotency_key: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EmailResult {
    pub message_id: String,
    pub accepted: Vec<String>,
    pub rejected: Vec<String>,
}

/// The task, with one worker's mail settings and its (lazily opened) SMTP pool.
pub struct Email {
    mailer: Mailer,
    templates: Arc<Templates>,
    storage: Storage,
    default_from: String,
    attachment_max_bytes: u64,
    rate_limit: Option<RateLimit>,
    lease: Duration,
}

impl Email {
    pub fn new(
        settings: &Settings,
        notify: &NotifySettings,
        templates: Arc<Templates>,
    ) -> Result<Email, ConfigError> {
        compose::mailbox("email_from", &notify.email_from).map_err(|e| ConfigError {
            name: "email_from",
            reason: e.message,
        })?;
        let storage = Storage::from_settings(settings).map_err(|e| ConfigError {
            name: "storage_url",
            reason: e.to_string(),
        })?;
        Ok(Email {
            mailer: Mailer::from_settings(notify)?,
            templates,
            storage,
            default_from: notify.email_from.clone(),
            attachment_max_bytes: notify.email_attachment_max_bytes,
            rate_limit: notify.smtp_rate_limit,
            // Covers connect, EHLO, MAIL, RCPT and DATA each taking their full timeout.
            lease: notify.smtp_timeout * 6 + Duration::from_secs(10),
        })
    }
}

impl Task for Email {
    const NAME: &'static str = "notify.email";
    /// In a chain, the previous step's return value (an object) is the template context.
    const PARENT_RESULT: Option<&'static str> = Some("context");
    type Args = EmailArgs;
    type Output = Value;

    async fn run(&self, ctx: TaskContext, args: EmailArgs) -> Result<Value, TaskError> {
        let draft = compose::draft(&args, &self.templates, &self.default_from)?;
        let recipients = draft.recipients();
        let key = crate::once_only::once_key(
            &ctx,
            args.idempotency_key.as_deref(),
            &recipients.iter().map(String::as_str).collect::<Vec<_>>(),
        );
        let files =
            attachments::load(&self.storage, &args.attachments, self.attachment_max_bytes).await?;
        let message = draft.build(&key, files)?;
        let mailer = &self.mailer;
        let rate_limit = self.rate_limit;
        crate::once_only::send_once(&ctx, &key, self.lease, || async {
            crate::rate_limit::acquire(&ctx, mailer.provider(), rate_limit).await?;
            let message_id = mailer.send(&message).await?;
            tracing::info!(job = %ctx.id, %message_id, recipients = recipients.len(), "email sent");
            let result = EmailResult {
                message_id,
                accepted: recipients.clone(),
                rejected: Vec::new(),
            };
            serde_json::to_value(result)
                .map_err(|e| TaskError::permanent("InternalError", e.to_string()))
        })
        .await
    }
}

//! Where emails go: an SMTP server through a pool of open connections (see [`super::smtp_pool`],
//! opened on first use and reused by every job after), or, with no `smtp_url`, `.eml` files in
//! `email_outbox_dir`. SMTP replies decide retries: 4xx passes, 5xx never will.

use std::path::PathBuf;

use lettre::Message;
use mediafarm::TaskError;

use crate::settings::NotifySettings;

use super::smtp_pool::{SendError, SmtpPool, Target};
use crate::ConfigError;

pub enum Mailer {
    Smtp(Box<SmtpPool>),
    Outbox { dir: PathBuf },
}

impl Mailer {
    pub fn from_settings(notify: &NotifySettings) -> Result<Mailer, ConfigError> {
        let Some(url) = &notify.smtp_url else {
            return Ok(Mailer::Outbox {
                dir: PathBuf::from(&notify.email_outbox_dir),
            });
        };
        let target = Target::parse(
            url,
            notify.smtp_username.as_deref(),
            notify.smtp_password.as_deref(),
            notify.smtp_timeout,
        )
        .map_err(|reason| ConfigError {
            name: "smtp_url",
            reason: format!(
                "{reason}; use smtp://host:25, smtp://host:587?tls=required (STARTTLS) or \
                 smtps://host:465"
            ),
        })?;
        Ok(Mailer::Smtp(Box::new(SmtpPool::new(
            target,
            notify.smtp_pool_size,
        ))))
    }

    /// The rate-limit bucket this mailer draws from.
    pub fn provider(&self) -> &'static str {
        match self {
            Mailer::Smtp(_) => "smtp",
            Mailer::Outbox { .. } => "email-outbox",
        }
    }

    /// Sends (or files) `message`; returns its Message-ID.
    pub async fn send(&self, message: &Message) -> Result<String, TaskError> {
        let message_id = message
            .headers()
            .get_raw("Message-ID")
            .unwrap_or_default()
            .to_owned();
        match self {
            Mailer::Smtp(pool) => {
                let response = pool
                    .send(message.envelope(), &message.formatted())
                    .await
                    .map_err(smtp_failure)?;
                tracing::debug!(code = %response.code(), "SMTP server accepted the message");
            }
            Mailer::Outbox { dir } => write_outbox(dir, &message_id, &message.formatted()).await?,
        }
        Ok(message_id)
    }
}

/// 4xx: the server asks to come back later; 5xx: it refused the message for good; no reply
/// (connection, TLS, timeout): passing. A client-side refusal (e.g. a non-ASCII address to a
/// server without SMTPUTF8) never works.
pub fn smtp_failure(e: SendError) -> TaskError {
    let e = match e {
        SendError::Smtp(e) => e,
        SendError::Network(why) => {
            return TaskError::transient(
                "SmtpUnavailable",
                format!("the SMTP server could not be reached ({why})"),
            )
        }
    };
    let code = e.status().map(|c| c.to_string());
    let shown = match &code {
        Some(code) => format!("SMTP {code}: {e}"),
        None => e.to_string(),
    };
    if e.is_permanent() {
        TaskError::permanent(
            "SmtpRejected",
            format!("the SMTP server refused the email ({shown})"),
        )
    } else if e.is_transient() {
        TaskError::transient(
            "SmtpDeferred",
            // The runtime says what became of it: RETRY, or "(gave up after N retries)".
            format!("the SMTP server deferred the email ({shown}), a temporary refusal"),
        )
    } else if e.is_client() {
        TaskError::permanent("SmtpRefused", format!("the email cannot be sent: {shown}"))
    } else {
        TaskError::transient(
            "SmtpUnavailable",
            format!("the SMTP server could not be reached or dropped the connection ({shown})"),
        )
    }
}

/// Writes one `.eml` file atomically (a temporary name, then a rename), named by time and
/// Message-ID so the outbox lists in sending order.
async fn write_outbox(dir: &PathBuf, message_id: &str, data: &[u8]) -> Result<(), TaskError> {
    let io = |e: std::io::Error| {
        TaskError::transient(
            "OutboxError",
            format!("cannot write to email_outbox_dir {}: {e}", dir.display()),
        )
    };
    tokio::fs::create_dir_all(dir).await.map_err(io)?;
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis();
    let local = message_id.trim_start_matches('<');
    let id: String = local
        .split('@')
        .next()
        .unwrap_or(local)
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .take(40)
        .collect();
    let name = format!("{stamp}-{id}.eml");
    let tmp = dir.join(format!(".{name}.tmp"));
    tokio::fs::write(&tmp, data).await.map_err(io)?;
    tokio::fs::rename(&tmp, dir.join(&name)).await.map_err(io)?;
    tracing::info!(file = %dir.join(name).display(), "email written to the outbox");
    Ok(())
}

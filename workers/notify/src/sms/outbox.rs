//! The SMS outbox: with no provider configured, each message becomes a JSON file in
//! `sms_outbox_dir` (`{"to", "body", "at"}`), the one-machine default.

use std::path::PathBuf;

use mediafarm::TaskError;

use crate::settings::NotifySettings;
use serde_json::json;

use super::{Outgoing, SendFuture, SmsProvider, SmsResult};

pub struct Outbox {
    dir: PathBuf,
}

impl Outbox {
    pub fn new(notify: &NotifySettings) -> Outbox {
        Outbox {
            dir: PathBuf::from(&notify.sms_outbox_dir),
        }
    }

    async fn write(&self, message: &Outgoing) -> Result<SmsResult, TaskError> {
        let io = |e: std::io::Error| {
            TaskError::transient(
                "OutboxError",
                format!("cannot write to sms_outbox_dir {}: {e}", self.dir.display()),
            )
        };
        tokio::fs::create_dir_all(&self.dir).await.map_err(io)?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let id = format!(
            "{}-{}",
            now.as_millis(),
            &uuid::Uuid::new_v4().simple().to_string()[..12]
        );
        let record = json!({
            "to": message.to,
            "body": message.body,
            "at": now.as_secs_f64(),
        });
        let name = format!("{id}.json");
        let tmp = self.dir.join(format!(".{name}.tmp"));
        tokio::fs::write(&tmp, record.to_string())
            .await
            .map_err(io)?;
        tokio::fs::rename(&tmp, self.dir.join(&name))
            .await
            .map_err(io)?;
        tracing::info!(file = %self.dir.join(&name).display(), "SMS written to the outbox");
        Ok(SmsResult {
            provider: "outbox".into(),
            provider_id: id,
            status: "written".into(),
        })
    }
}

impl SmsProvider for Outbox {
    fn name(&self) -> &'static str {
        "outbox"
    }

    fn send<'a>(&'a self, message: &'a Outgoing) -> SendFuture<'a> {
        Box::pin(self.write(message))
    }
}

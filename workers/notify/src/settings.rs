//! notify-worker's settings, declared once (see `mediafarm::settings::declare`): SMTP and the
//! email outbox, templates, the SMS providers. Read beside the core settings and the webhook
//! rules (`mediafarm::settings::WebhookSettings`, shared with snapshot-worker) from the shared
//! settings file; names start with `smtp_`, `email_`, `notify_`, `sms_` or `twilio_`.

use std::time::Duration;

use mediafarm::settings::kinds::*;
use mediafarm::settings::{RateLimit, WebhookSettings};

/// Everything notify-worker reads beside the core settings.
pub type NotifyGroups = (NotifySettings, WebhookSettings);

/// The generic SMS provider's default request body.
pub const DEFAULT_SMS_HTTP_BODY: &str =
    r#"{"to": {{ to|tojson }}, "from": {{ from|tojson }}, "body": {{ body|tojson }}}"#;

mediafarm::settings_group! {
    /// The settings notify-worker reads beside the core and webhook ones.
    pub struct NotifySettings {
        owner = "notify-worker";
        prefixes = ["smtp_", "email_", "notify_", "sms_", "twilio_"];
        /// SMTP server for notify-worker's email: `smtp://host:25` (plain), `smtp://host:587?tls=required`
        /// (STARTTLS), `smtps://host:465` (implicit TLS); user and password may sit in the URL.
        /// Unset: emails are written to `email_outbox_dir` as `.eml` files.
        smtp_url: Option<String> = None, Url(&["smtp", "smtps"]);
        /// SMTP login (over any user in `smtp_url`).
        smtp_username: Option<String> = None, Str;
        /// SMTP password; best given as `MEDIAFARM_SMTP_PASSWORD`.
        smtp_password: Option<String> = None, Str;
        /// SMTP connections one worker keeps open and reuses across jobs.
        smtp_pool_size: u32 = 4, Int(1, 1000);
        /// Time limit of one SMTP command (connect, EHLO, DATA, ...).
        smtp_timeout: Duration = Duration::from_secs(30), SecondsOrDefault;
        /// Cluster-wide cap on emails sent, e.g. `"50/s"`, `"1000/m"`; unset: none.
        smtp_rate_limit: Option<RateLimit> = None, Rate;
        /// The `From` of emails whose job gives none.
        email_from: String = "mediafarm <mediafarm@localhost>".into(), Str;
        /// Where emails go as `.eml` files when `smtp_url` is unset.
        email_outbox_dir: String = "./var/outbox/email".into(), Str;
        /// Largest total size of an email's attachments, in bytes.
        email_attachment_max_bytes: u64 = 10 << 20, Int(0, 1 << 30);
        /// Directory of notify templates (`<name>.subject.txt`, `<name>.txt`, `<name>.html`,
        /// `<name>.sms.txt`), in Jinja2 syntax.
        notify_template_dir: String = "./templates".into(), Str;
        /// `outbox` (files in `sms_outbox_dir`), `twilio` or `http` (the generic JSON provider).
        sms_provider: String = "outbox".into(), OneOf(&["outbox", "twilio", "http"]);
        /// Where SMS go as files with the `outbox` provider.
        sms_outbox_dir: String = "./var/outbox/sms".into(), Str;
        /// Cluster-wide cap on SMS sent per provider, e.g. `"10/s"`; unset: none.
        sms_rate_limit: Option<RateLimit> = None, Rate;
        /// Twilio's account SID (`AC...`).
        twilio_account_sid: Option<String> = None, Str;
        /// Best given as `MEDIAFARM_TWILIO_AUTH_TOKEN`.
        twilio_auth_token: Option<String> = None, Str;
        /// Sender number (E.164) or messaging service's sender.
        twilio_from: Option<String> = None, Str;
        /// Twilio's API base URL (tests point it at a local server).
        twilio_base_url: String = "https://api.twilio.com".into(), Url(&["http", "https"]);
        /// URL Twilio calls with delivery status updates (`StatusCallback`).
        twilio_status_callback: Option<String> = None, Url(&["http", "https"]);
        /// The generic provider's endpoint: a JSON POST per message.
        sms_http_url: Option<String> = None, Url(&["http", "https"]);
        /// The generic provider's `Authorization` header value (e.g. `Bearer ...`); best from env.
        sms_http_authorization: Option<String> = None, Str;
        /// The generic provider's sender.
        sms_http_from: Option<String> = None, Str;
        /// The generic provider's request body, a Jinja2 template over `to`, `from` and `body`.
        sms_http_body: String = DEFAULT_SMS_HTTP_BODY.into(), Str;
        /// JSON pointer to the message id in the generic provider's answer.
        sms_http_id_pointer: String = "/id".into(), Str;
        /// JSON pointer to the status in the generic provider's answer.
        sms_http_status_pointer: String = "/status".into(), Str;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mediafarm::settings::Sources;

    #[test]
    fn every_name_has_an_owned_prefix() {
        mediafarm::settings::sources::assert_prefixes_owned::<NotifySettings>();
    }

    #[test]
    fn the_example_settings_file_has_the_defaults() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../deploy/mediafarm.example.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        let (_, (notify, webhook)) = Sources::from_text(&path, &text, [])
            .unwrap()
            .read::<NotifyGroups>()
            .unwrap();
        assert_eq!(notify, NotifySettings::default());
        assert_eq!(webhook, WebhookSettings::default());
    }

    #[test]
    fn values_are_read_and_wrong_ones_named() {
        let path = std::path::Path::new("t.toml");
        let (_, (notify, _)) = Sources::from_text(
            path,
            "smtp_rate_limit = \"50/m\"\nsms_provider = \"twilio\"",
            [("MEDIAFARM_SMTP_TIMEOUT".to_owned(), "0".to_owned())],
        )
        .unwrap()
        .read::<NotifyGroups>()
        .unwrap();
        assert_eq!(notify.smtp_rate_limit, RateLimit::parse("50/m"));
        assert_eq!(notify.sms_provider, "twilio");
        assert_eq!(notify.smtp_timeout, Duration::from_secs(30));
        let err = Sources::from_text(path, "sms_provider = \"pigeon\"", [])
            .unwrap()
            .read::<NotifyGroups>()
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "setting `sms_provider` = \"pigeon\" is not accepted: one of outbox, twilio, http"
        );
        let err = Sources::from_text(path, "smtp_url = \"http://mail\"", [])
            .unwrap()
            .read::<NotifyGroups>()
            .unwrap_err()
            .to_string();
        assert!(err.contains("smtp://… or smtps://…"), "{err}");
    }
}

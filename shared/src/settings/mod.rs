//! Settings: one type read from a TOML file with `MEDIAFARM_<NAME>` environment variables over
//! it. Names follow Celery's where Celery has one. Every value is checked at start-up and a bad
//! one is reported with the setting's name, the value given and what is accepted.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A settings file or variable that cannot be used; start-up stops with this message.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("cannot read settings file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("settings file {path} is not valid TOML: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("setting `{name}` = {value} is not accepted: {accepted}")]
    Invalid {
        name: String,
        value: String,
        accepted: String,
    },
    #[error("unknown setting `{name}` in {origin}{hint}")]
    Unknown {
        name: String,
        origin: String,
        hint: String,
    },
}

pub use crate::protocol::PICKLE_REFUSAL;

/// Every setting mediafarm reads, with its default.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// AMQP URL of RabbitMQ (`amqp://user:pass@host:port/vhost`, Celery's `//` means vhost `/`).
    pub broker_url: String,
    /// Connections the producer side keeps open at most (kombu's pool limit).
    pub broker_pool_limit: usize,
    /// AMQP heartbeat in seconds (0 turns heartbeats off).
    pub broker_heartbeat: u16,
    /// Redis URL of the result backend.
    pub result_backend: String,
    /// How long results are kept.
    pub result_expires: Duration,
    pub task_serializer: String,
    pub result_serializer: String,
    pub accept_content: Vec<String>,
    /// IANA time zone used for schedules; timestamps on the wire are always UTC.
    pub timezone: String,
    /// Jobs a worker process runs at once.
    pub worker_concurrency: usize,
    /// Unacknowledged messages held per unit of concurrency.
    pub worker_prefetch_multiplier: u16,
    /// Always true: a message is acknowledged only after its result is stored.
    pub task_acks_late: bool,
    /// Store a STARTED state when a job begins.
    pub task_track_started: bool,
    /// Add the task name, args, kwargs, worker, retries and queue to stored results (Celery's
    /// `result_extended`, which Flower and `AsyncResult.name` read).
    pub result_extended: bool,
    pub task_time_limit: Option<Duration>,
    pub task_soft_time_limit: Option<Duration>,
    /// Base delay of a retry; each further retry doubles it, up to `task_retry_backoff_max`.
    pub task_default_retry_delay: Duration,
    /// Cap on the delay between retries.
    pub task_retry_backoff_max: Duration,
    /// Spread retry delays at random over their upper half, so a burst does not retry in step.
    pub task_retry_jitter: bool,
    pub task_max_retries: u32,
    /// RabbitMQ's `consumer_timeout`: a delivery not acknowledged within it closes the channel.
    /// Every job's hard time limit is kept below it (see `ack_deadline_margin`).
    pub broker_consumer_timeout: Duration,
    /// How long a stopping worker lets running jobs finish before returning them to the broker.
    pub worker_shutdown_grace: Duration,
    /// Where `/metrics`, `/healthz` and `/readyz` are served; port 0 picks a free port.
    pub metrics_addr: SocketAddr,
    /// Largest message body accepted, in bytes.
    pub task_message_max_bytes: usize,
    /// Where workers store media: `file://<dir>` (relative to the working directory) or
    /// `s3://<bucket>[/<prefix>]`. S3 credentials come from `AWS_ACCESS_KEY_ID`,
    /// `AWS_SECRET_ACCESS_KEY` (and `AWS_SESSION_TOKEN`) in the environment.
    pub storage_url: String,
    /// URLs in results are this base plus the key; unset: presigned URLs (S3) or `file://`.
    pub storage_public_base_url: Option<String>,
    /// An S3-compatible endpoint (MinIO, Ceph, R2, `http://127.0.0.1:9000`); unset: AWS.
    pub storage_s3_endpoint: Option<String>,
    pub storage_s3_region: String,
    /// Path-style requests (`endpoint/bucket/key`), which most S3-compatible servers need.
    pub storage_s3_path_style: bool,
    /// How long a presigned URL stays valid.
    pub storage_url_expires: Duration,
    /// Hosts `https://` sources may come from: exact names, or `*.example.com` for its
    /// subdomains. Empty: no web sources.
    pub source_allowed_hosts: Vec<String>,
    /// Directories `file://` sources may come from. Empty: no `file://` sources.
    pub source_allowed_roots: Vec<String>,
    /// Let web sources resolve to loopback, private, link-local or other internal addresses
    /// (off: a job cannot make the worker reach inside the network).
    pub source_allow_private: bool,
    /// Accept plain `http://` web sources (off: `https://` only).
    pub source_allow_http: bool,
    /// Whole-download time limit for a web source.
    pub source_timeout: Duration,
    /// snapshot-worker: the default `timeout_s` of `snapshot.capture` (open, read, decode).
    pub snapshot_capture_timeout: Duration,
    /// snapshot-worker: most `snapshot.watch` sessions one worker runs at once; the worker's
    /// concurrency defaults to this plus one per core (for captures).
    pub snapshot_max_sessions: usize,
    /// snapshot-worker: a session hands itself on as a continuation message after this long,
    /// so no delivery stays unacknowledged near RabbitMQ's consumer_timeout.
    pub snapshot_session_slice: Duration,
    /// snapshot-worker: how long a session keeps reconnecting to a dropped stream (with
    /// backoff) before it ends with its summary.
    pub snapshot_reconnect_window: Duration,
    /// Largest source image accepted, in bytes (checked before it is read).
    pub image_max_src_bytes: u64,
    /// Largest source image accepted, in pixels (checked from its header, before decoding).
    pub image_max_src_pixels: u64,
    /// `mediafarm beat`'s periodic entries: `[beat_schedule.<name>]` tables in the file, or a
    /// JSON object of entries in `MEDIAFARM_BEAT_SCHEDULE`.
    pub beat_schedule: Vec<crate::schedule::ScheduleEntry>,
    /// Prefix of beat's Redis keys (lease, tick records, `mediafarm schedule` entries); beats
    /// sharing a prefix share one schedule and elect one leader.
    pub beat_key_prefix: String,
    /// How long the beat leader's lease lasts unrenewed (it is renewed every third of this):
    /// within it, another beat replaces a leader that died.
    pub beat_lease_ttl: Duration,
    /// SMTP server for notify-worker's email: `smtp://host:25` (plain), `smtp://host:587?tls=required`
    /// (STARTTLS), `smtps://host:465` (implicit TLS); user and password may sit in the URL.
    /// Unset: emails are written to `email_outbox_dir` as `.eml` files.
    pub smtp_url: Option<String>,
    /// SMTP login (over any user in `smtp_url`).
    pub smtp_username: Option<String>,
    /// SMTP password; best given as `MEDIAFARM_SMTP_PASSWORD`.
    pub smtp_password: Option<String>,
    /// SMTP connections one worker keeps open and reuses across jobs.
    pub smtp_pool_size: u32,
    /// Time limit of one SMTP command (connect, EHLO, DATA, ...).
    pub smtp_timeout: Duration,
    /// Cluster-wide cap on emails sent, e.g. `"50/s"`, `"1000/m"`; unset: none.
    pub smtp_rate_limit: Option<RateLimit>,
    /// The `From` of emails whose job gives none.
    pub email_from: String,
    /// Where emails go as `.eml` files when `smtp_url` is unset.
    pub email_outbox_dir: String,
    /// Largest total size of an email's attachments, in bytes.
    pub email_attachment_max_bytes: u64,
    /// Directory of notify templates (`<name>.subject.txt`, `<name>.txt`, `<name>.html`,
    /// `<name>.sms.txt`), in Jinja2 syntax.
    pub notify_template_dir: String,
    /// `outbox` (files in `sms_outbox_dir`), `twilio` or `http` (the generic JSON provider).
    pub sms_provider: String,
    pub sms_outbox_dir: String,
    /// Cluster-wide cap on SMS sent per provider, e.g. `"10/s"`; unset: none.
    pub sms_rate_limit: Option<RateLimit>,
    pub twilio_account_sid: Option<String>,
    /// Best given as `MEDIAFARM_TWILIO_AUTH_TOKEN`.
    pub twilio_auth_token: Option<String>,
    /// Sender number (E.164) or messaging service's sender.
    pub twilio_from: Option<String>,
    /// Twilio's API base URL (tests point it at a local server).
    pub twilio_base_url: String,
    /// URL Twilio calls with delivery status updates (`StatusCallback`).
    pub twilio_status_callback: Option<String>,
    /// The generic provider's endpoint: a JSON POST per message.
    pub sms_http_url: Option<String>,
    /// The generic provider's `Authorization` header value (e.g. `Bearer ...`); best from env.
    pub sms_http_authorization: Option<String>,
    pub sms_http_from: Option<String>,
    /// The generic provider's request body, a Jinja2 template over `to`, `from` and `body`.
    pub sms_http_body: String,
    /// JSON pointers to the message id and status in the generic provider's answer.
    pub sms_http_id_pointer: String,
    pub sms_http_status_pointer: String,
    /// HMAC-SHA256 key signing webhook bodies; best given as `MEDIAFARM_WEBHOOK_SECRET`.
    pub webhook_secret: Option<String>,
    /// Hosts webhooks may go to (exact or `*.example.com`); empty: any public host.
    pub webhook_allowed_hosts: Vec<String>,
    /// Let webhooks reach loopback, private, link-local or other internal addresses.
    pub webhook_allow_private: bool,
    /// Accept plain `http://` webhook URLs (`https://` only when false).
    pub webhook_allow_http: bool,
    /// Whole-request time limit of a webhook or HTTP SMS provider call.
    pub webhook_timeout: Duration,
    /// Cluster-wide cap on webhook calls, e.g. `"20/s"`; unset: none.
    pub webhook_rate_limit: Option<RateLimit>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            broker_url: "amqp://guest:guest@127.0.0.1:5672//".into(),
            broker_pool_limit: 10,
            broker_heartbeat: 60,
            result_backend: "redis://127.0.0.1:6379/0".into(),
            result_expires: Duration::from_secs(86_400),
            task_serializer: "json".into(),
            result_serializer: "json".into(),
            accept_content: vec!["json".into()],
            timezone: "UTC".into(),
            worker_concurrency: default_concurrency(),
            worker_prefetch_multiplier: 4,
            task_acks_late: true,
            task_track_started: false,
            result_extended: false,
            task_time_limit: None,
            task_soft_time_limit: None,
            task_default_retry_delay: Duration::from_secs(180),
            task_retry_backoff_max: Duration::from_secs(600),
            task_retry_jitter: true,
            task_max_retries: 3,
            broker_consumer_timeout: Duration::from_secs(1800),
            worker_shutdown_grace: Duration::from_secs(30),
            metrics_addr: SocketAddr::from(([127, 0, 0, 1], 9808)),
            task_message_max_bytes: 1 << 20,
            storage_url: "file://./var/storage".into(),
            storage_public_base_url: None,
            storage_s3_endpoint: None,
            storage_s3_region: "us-east-1".into(),
            storage_s3_path_style: true,
            storage_url_expires: Duration::from_secs(3600),
            source_allowed_hosts: Vec::new(),
            source_allowed_roots: Vec::new(),
            source_allow_private: false,
            source_allow_http: false,
            source_timeout: Duration::from_secs(30),
            snapshot_capture_timeout: Duration::from_secs(15),
            snapshot_max_sessions: 100,
            snapshot_session_slice: Duration::from_secs(600),
            snapshot_reconnect_window: Duration::from_secs(60),
            image_max_src_bytes: 50 << 20,
            image_max_src_pixels: 50_000_000,
            beat_schedule: Vec::new(),
            beat_key_prefix: "mediafarm-beat".into(),
            beat_lease_ttl: Duration::from_secs(10),
            smtp_url: None,
            smtp_username: None,
            smtp_password: None,
            smtp_pool_size: 4,
            smtp_timeout: Duration::from_secs(30),
            smtp_rate_limit: None,
            email_from: "mediafarm <mediafarm@localhost>".into(),
            email_outbox_dir: "./var/outbox/email".into(),
            email_attachment_max_bytes: 10 << 20,
            notify_template_dir: "./templates".into(),
            sms_provider: "outbox".into(),
            sms_outbox_dir: "./var/outbox/sms".into(),
            sms_rate_limit: None,
            twilio_account_sid: None,
            twilio_auth_token: None,
            twilio_from: None,
            twilio_base_url: "https://api.twilio.com".into(),
            twilio_status_callback: None,
            sms_http_url: None,
            sms_http_authorization: None,
            sms_http_from: None,
            sms_http_body: DEFAULT_SMS_HTTP_BODY.into(),
            sms_http_id_pointer: "/id".into(),
            sms_http_status_pointer: "/status".into(),
            webhook_secret: None,
            webhook_allowed_hosts: Vec::new(),
            webhook_allow_private: false,
            webhook_allow_http: false,
            webhook_timeout: Duration::from_secs(10),
            webhook_rate_limit: None,
        }
    }
}

fn default_concurrency() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// Every setting name, for unknown-name checks and for the environment overlay.
pub const SETTING_NAMES: &[&str] = &[
    "broker_url",
    "broker_pool_limit",
    "broker_heartbeat",
    "result_backend",
    "result_expires",
    "task_serializer",
    "result_serializer",
    "accept_content",
    "timezone",
    "worker_concurrency",
    "worker_prefetch_multiplier",
    "task_acks_late",
    "task_track_started",
    "result_extended",
    "task_time_limit",
    "task_soft_time_limit",
    "task_default_retry_delay",
    "task_retry_backoff_max",
    "task_retry_jitter",
    "task_max_retries",
    "broker_consumer_timeout",
    "worker_shutdown_grace",
    "metrics_addr",
    "task_message_max_bytes",
    "storage_url",
    "storage_public_base_url",
    "storage_s3_endpoint",
    "storage_s3_region",
    "storage_s3_path_style",
    "storage_url_expires",
    "source_allowed_hosts",
    "source_allowed_roots",
    "source_allow_private",
    "source_allow_http",
    "source_timeout",
    "snapshot_capture_timeout",
    "snapshot_max_sessions",
    "snapshot_session_slice",
    "snapshot_reconnect_window",
    "image_max_src_bytes",
    "image_max_src_pixels",
    "beat_schedule",
    "beat_key_prefix",
    "beat_lease_ttl",
    "smtp_url",
    "smtp_username",
    "smtp_password",
    "smtp_pool_size",
    "smtp_timeout",
    "smtp_rate_limit",
    "email_from",
    "email_outbox_dir",
    "email_attachment_max_bytes",
    "notify_template_dir",
    "sms_provider",
    "sms_outbox_dir",
    "sms_rate_limit",
    "twilio_account_sid",
    "twilio_auth_token",
    "twilio_from",
    "twilio_base_url",
    "twilio_status_callback",
    "sms_http_url",
    "sms_http_authorization",
    "sms_http_from",
    "sms_http_body",
    "sms_http_id_pointer",
    "sms_http_status_pointer",
    "webhook_secret",
    "webhook_allowed_hosts",
    "webhook_allow_private",
    "webhook_allow_http",
    "webhook_timeout",
    "webhook_rate_limit",
];

const ENV_PREFIX: &str = "MEDIAFARM_";

impl Settings {
    /// The list-valued settings by name, as parsed (what `mediafarm check-settings` prints, so
    /// a list given in the environment can be checked item by item).
    pub fn lists(&self) -> [(&'static str, &[String]); 4] {
        [
            ("accept_content", &self.accept_content),
            ("source_allowed_hosts", &self.source_allowed_hosts),
            ("source_allowed_roots", &self.source_allowed_roots),
            ("webhook_allowed_hosts", &self.webhook_allowed_hosts),
        ]
    }

    /// Reads `path` (a missing file is an error only when `required`), then the process
    /// environment over it.
    pub fn load(path: &Path, required: bool) -> Result<Settings, SettingsError> {
        let table = match std::fs::read_to_string(path) {
            Ok(text) => parse_toml(path, &text)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => toml::Table::new(),
            Err(source) => {
                return Err(SettingsError::Read {
                    path: path.to_owned(),
                    source,
                })
            }
        };
        Self::from_sources(table, &path.display().to_string(), std::env::vars())
    }

    /// Builds settings from a parsed file and an environment; the environment wins.
    pub fn from_sources(
        file: toml::Table,
        origin: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Settings, SettingsError> {
        let mut values: BTreeMap<String, Raw> = BTreeMap::new();
        for (name, value) in file {
            if !SETTING_NAMES.contains(&name.as_str()) {
                return Err(unknown(&name, origin));
            }
            values.insert(name, Raw::Toml(value));
        }
        for (var, value) in env {
            let Some(suffix) = var.strip_prefix(ENV_PREFIX) else {
                continue;
            };
            let name = suffix.to_ascii_lowercase();
            if SETTING_NAMES.contains(&name.as_str()) {
                values.insert(name, Raw::Env(value));
            }
        }
        let reader = Reader { values };
        let d = Settings::default();
        let settings = Settings {
            broker_url: reader.url("broker_url", d.broker_url, &["amqp", "amqps"])?,
            broker_pool_limit: reader.int("broker_pool_limit", d.broker_pool_limit, 1, 1000)?,
            broker_heartbeat: reader.int("broker_heartbeat", d.broker_heartbeat, 0, 3600)?,
            result_backend: reader.url(
                "result_backend",
                d.result_backend,
                &["redis", "redis+unix", "unix"],
            )?,
            result_expires: reader
                .seconds("result_expires", Some(d.result_expires))?
                .unwrap_or(
                    // 0 or none: Celery keeps results forever; Redis needs no expiry then.
                    Duration::ZERO,
                ),
            task_serializer: reader.serializer("task_serializer", d.task_serializer)?,
            result_serializer: reader.serializer("result_serializer", d.result_serializer)?,
            accept_content: reader.accept_content(d.accept_content)?,
            timezone: reader.timezone(d.timezone)?,
            worker_concurrency: reader.int(
                "worker_concurrency",
                d.worker_concurrency,
                1,
                10_000,
            )?,
            worker_prefetch_multiplier: reader.int(
                "worker_prefetch_multiplier",
                d.worker_prefetch_multiplier,
                1,
                1000,
            )?,
            task_acks_late: reader.acks_late()?,
            task_track_started: reader.bool("task_track_started", d.task_track_started)?,
            result_extended: reader.bool("result_extended", d.result_extended)?,
            task_time_limit: reader.seconds("task_time_limit", None)?,
            task_soft_time_limit: reader.seconds("task_soft_time_limit", None)?,
            task_default_retry_delay: reader
                .seconds("task_default_retry_delay", Some(d.task_default_retry_delay))?
                .unwrap_or(Duration::ZERO),
            task_retry_backoff_max: reader
                .seconds("task_retry_backoff_max", Some(d.task_retry_backoff_max))?
                .unwrap_or(Duration::ZERO),
            task_retry_jitter: reader.bool("task_retry_jitter", d.task_retry_jitter)?,
            task_max_retries: reader.int("task_max_retries", d.task_max_retries, 0, 1_000_000)?,
            broker_consumer_timeout: reader
                .seconds("broker_consumer_timeout", Some(d.broker_consumer_timeout))?
                .unwrap_or(Duration::ZERO),
            worker_shutdown_grace: reader
                .seconds("worker_shutdown_grace", Some(d.worker_shutdown_grace))?
                .unwrap_or(Duration::ZERO),
            metrics_addr: reader.socket_addr("metrics_addr", d.metrics_addr)?,
            task_message_max_bytes: reader.int(
                "task_message_max_bytes",
                d.task_message_max_bytes,
                1024,
                512 << 20,
            )?,
            storage_url: reader.url("storage_url", d.storage_url, &["file", "s3"])?,
            storage_public_base_url: reader
                .string("storage_public_base_url")?
                .map(|u| reader.url("storage_public_base_url", u, &["http", "https"]))
                .transpose()?,
            storage_s3_endpoint: reader
                .string("storage_s3_endpoint")?
                .map(|u| reader.url("storage_s3_endpoint", u, &["http", "https"]))
                .transpose()?,
            storage_s3_region: reader
                .string("storage_s3_region")?
                .unwrap_or(d.storage_s3_region),
            storage_s3_path_style: reader.bool("storage_s3_path_style", d.storage_s3_path_style)?,
            storage_url_expires: reader
                .seconds("storage_url_expires", Some(d.storage_url_expires))?
                .unwrap_or(d.storage_url_expires),
            source_allowed_hosts: reader.list("source_allowed_hosts")?,
            source_allowed_roots: reader.list("source_allowed_roots")?,
            source_allow_private: reader.bool("source_allow_private", d.source_allow_private)?,
            source_allow_http: reader.bool("source_allow_http", d.source_allow_http)?,
            source_timeout: reader
                .seconds("source_timeout", Some(d.source_timeout))?
                .unwrap_or(d.source_timeout),
            snapshot_capture_timeout: reader
                .seconds("snapshot_capture_timeout", Some(d.snapshot_capture_timeout))?
                .unwrap_or(d.snapshot_capture_timeout),
            snapshot_max_sessions: reader.int(
                "snapshot_max_sessions",
                d.snapshot_max_sessions,
                1,
                100_000,
            )?,
            snapshot_session_slice: reader
                .seconds("snapshot_session_slice", Some(d.snapshot_session_slice))?
                .unwrap_or(d.snapshot_session_slice),
            snapshot_reconnect_window: reader
                .seconds(
                    "snapshot_reconnect_window",
                    Some(d.snapshot_reconnect_window),
                )?
                .unwrap_or(d.snapshot_reconnect_window),
            image_max_src_bytes: reader.int(
                "image_max_src_bytes",
                d.image_max_src_bytes,
                1024,
                1 << 32,
            )?,
            image_max_src_pixels: reader.int(
                "image_max_src_pixels",
                d.image_max_src_pixels,
                1,
                1 << 32,
            )?,
            beat_schedule: reader.beat_schedule()?,
            beat_key_prefix: reader.beat_key_prefix(d.beat_key_prefix)?,
            beat_lease_ttl: reader.beat_lease_ttl(d.beat_lease_ttl)?,
            smtp_url: reader
                .string("smtp_url")?
                .map(|u| reader.url("smtp_url", u, &["smtp", "smtps"]))
                .transpose()?,
            smtp_username: reader.string("smtp_username")?,
            smtp_password: reader.string("smtp_password")?,
            smtp_pool_size: reader.int("smtp_pool_size", d.smtp_pool_size, 1, 1000)?,
            smtp_timeout: reader
                .seconds("smtp_timeout", Some(d.smtp_timeout))?
                .unwrap_or(d.smtp_timeout),
            smtp_rate_limit: reader.rate_limit("smtp_rate_limit")?,
            email_from: reader.string("email_from")?.unwrap_or(d.email_from),
            email_outbox_dir: reader
                .string("email_outbox_dir")?
                .unwrap_or(d.email_outbox_dir),
            email_attachment_max_bytes: reader.int(
                "email_attachment_max_bytes",
                d.email_attachment_max_bytes,
                0,
                1 << 30,
            )?,
            notify_template_dir: reader
                .string("notify_template_dir")?
                .unwrap_or(d.notify_template_dir),
            sms_provider: reader.one_of(
                "sms_provider",
                d.sms_provider,
                &["outbox", "twilio", "http"],
            )?,
            sms_outbox_dir: reader.string("sms_outbox_dir")?.unwrap_or(d.sms_outbox_dir),
            sms_rate_limit: reader.rate_limit("sms_rate_limit")?,
            twilio_account_sid: reader.string("twilio_account_sid")?,
            twilio_auth_token: reader.string("twilio_auth_token")?,
            twilio_from: reader.string("twilio_from")?,
            twilio_base_url: reader.url(
                "twilio_base_url",
                d.twilio_base_url,
                &["http", "https"],
            )?,
            twilio_status_callback: reader
                .string("twilio_status_callback")?
                .map(|u| reader.url("twilio_status_callback", u, &["http", "https"]))
                .transpose()?,
            sms_http_url: reader
                .string("sms_http_url")?
                .map(|u| reader.url("sms_http_url", u, &["http", "https"]))
                .transpose()?,
            sms_http_authorization: reader.string("sms_http_authorization")?,
            sms_http_from: reader.string("sms_http_from")?,
            sms_http_body: reader.string("sms_http_body")?.unwrap_or(d.sms_http_body),
            sms_http_id_pointer: reader
                .string("sms_http_id_pointer")?
                .unwrap_or(d.sms_http_id_pointer),
            sms_http_status_pointer: reader
                .string("sms_http_status_pointer")?
                .unwrap_or(d.sms_http_status_pointer),
            webhook_secret: reader.string("webhook_secret")?,
            webhook_allowed_hosts: reader.list("webhook_allowed_hosts")?,
            webhook_allow_private: reader.bool("webhook_allow_private", d.webhook_allow_private)?,
            webhook_allow_http: reader.bool("webhook_allow_http", d.webhook_allow_http)?,
            webhook_timeout: reader
                .seconds("webhook_timeout", Some(d.webhook_timeout))?
                .unwrap_or(d.webhook_timeout),
            webhook_rate_limit: reader.rate_limit("webhook_rate_limit")?,
        };
        if let (Some(soft), Some(hard)) = (settings.task_soft_time_limit, settings.task_time_limit)
        {
            if soft >= hard {
                return Err(SettingsError::Invalid {
                    name: "task_soft_time_limit".into(),
                    value: format!("{}", soft.as_secs_f64()),
                    accepted: format!(
                        "a limit below task_time_limit ({} s), so the job is warned before it is stopped",
                        hard.as_secs_f64()
                    ),
                });
            }
        }
        if settings.broker_consumer_timeout < Duration::from_secs(10) {
            return Err(SettingsError::Invalid {
                name: "broker_consumer_timeout".into(),
                value: format!("{}", settings.broker_consumer_timeout.as_secs_f64()),
                accepted:
                    "RabbitMQ's consumer_timeout in seconds, 10 or more (its default is 1800)"
                        .into(),
            });
        }
        if let Some(hard) = settings.task_time_limit {
            let most = settings.longest_hard_limit();
            if hard > most {
                return Err(SettingsError::Invalid {
                    name: "task_time_limit".into(),
                    value: format!("{}", hard.as_secs_f64()),
                    accepted: format!(
                        "at most {} s: broker_consumer_timeout ({} s) less {} s to store the result \
                         and acknowledge, or RabbitMQ closes the channel under a long job",
                        most.as_secs_f64(),
                        settings.broker_consumer_timeout.as_secs_f64(),
                        settings.ack_deadline_margin().as_secs_f64()
                    ),
                });
            }
        }
        Ok(settings)
    }

    /// Time kept free between a job's hard limit and RabbitMQ's delivery-ack timeout, for
    /// storing the result and acknowledging: a quarter of the timeout, at most two minutes.
    pub fn ack_deadline_margin(&self) -> Duration {
        (self.broker_consumer_timeout / 4).min(Duration::from_secs(120))
    }

    /// The longest hard time limit any job may have (jobs with none get this one).
    pub fn longest_hard_limit(&self) -> Duration {
        self.broker_consumer_timeout
            .saturating_sub(self.ack_deadline_margin())
    }

    /// Unacknowledged messages the broker may hand this worker at once.
    pub fn prefetch_count(&self) -> u16 {
        let n = self
            .worker_concurrency
            .saturating_mul(self.worker_prefetch_multiplier as usize);
        n.min(u16::MAX as usize) as u16
    }

    /// Expiry in whole seconds for Redis, `None` when results are kept forever.
    pub fn result_expires_secs(&self) -> Option<u64> {
        let s = self.result_expires.as_secs();
        (s > 0).then_some(s)
    }
}

fn parse_toml(path: &Path, text: &str) -> Result<toml::Table, SettingsError> {
    text.parse::<toml::Table>()
        .map_err(|e| SettingsError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })
}

fn unknown(name: &str, origin: &str) -> SettingsError {
    let hint = SETTING_NAMES
        .iter()
        .map(|known| (edit_distance(name, known), known))
        .filter(|(d, _)| *d <= 3)
        .min()
        .map(|(_, known)| format!("; did you mean `{known}`?"))
        .unwrap_or_else(|| "; see deploy/mediafarm.example.toml for every setting".into());
    SettingsError::Unknown {
        name: name.into(),
        origin: origin.into(),
        hint,
    }
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            cur.push((prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

/// A value as it was written: in the TOML file, or as an environment variable's text.
enum Raw {
    Toml(toml::Value),
    Env(String),
}

impl Raw {
    fn shown(&self) -> String {
        match self {
            Raw::Toml(v) => v.to_string(),
            Raw::Env(s) => format!("{s:?} (from the environment)"),
        }
    }
}

struct Reader {
    values: BTreeMap<String, Raw>,
}

impl Reader {
    fn invalid(&self, name: &str, accepted: impl Into<String>) -> SettingsError {
        SettingsError::Invalid {
            name: name.into(),
            value: self
                .values
                .get(name)
                .map(Raw::shown)
                .unwrap_or_else(|| "(unset)".into()),
            accepted: accepted.into(),
        }
    }

    fn string(&self, name: &str) -> Result<Option<String>, SettingsError> {
        match self.values.get(name) {
            None => Ok(None),
            Some(Raw::Env(s)) => Ok(Some(s.clone())),
            Some(Raw::Toml(toml::Value::String(s))) => Ok(Some(s.clone())),
            Some(Raw::Toml(_)) => Err(self.invalid(name, "a string")),
        }
    }

    fn int<T>(&self, name: &str, default: T, min: T, max: T) -> Result<T, SettingsError>
    where
        T: TryFrom<i64> + TryInto<i64> + Copy + std::fmt::Display,
    {
        let accepted = || format!("a whole number from {min} to {max}");
        let n: i64 = match self.values.get(name) {
            None => return Ok(default),
            Some(Raw::Toml(toml::Value::Integer(n))) => *n,
            Some(Raw::Env(s)) => s
                .trim()
                .parse()
                .map_err(|_| self.invalid(name, accepted()))?,
            Some(Raw::Toml(_)) => return Err(self.invalid(name, accepted())),
        };
        let (lo, hi) = (
            min.try_into().unwrap_or(i64::MIN),
            max.try_into().unwrap_or(i64::MAX),
        );
        if n < lo || n > hi {
            return Err(self.invalid(name, accepted()));
        }
        T::try_from(n).map_err(|_| self.invalid(name, accepted()))
    }

    fn bool(&self, name: &str, default: bool) -> Result<bool, SettingsError> {
        const ACCEPTED: &str = "true or false (the environment also takes 1/0, yes/no, on/off)";
        match self.values.get(name) {
            None => Ok(default),
            Some(Raw::Toml(toml::Value::Boolean(b))) => Ok(*b),
            Some(Raw::Env(s)) => match s.trim().to_ascii_lowercase().as_str() {
                "true" | "1" | "yes" | "on" => Ok(true),
                "false" | "0" | "no" | "off" => Ok(false),
                _ => Err(self.invalid(name, ACCEPTED)),
            },
            Some(Raw::Toml(_)) => Err(self.invalid(name, ACCEPTED)),
        }
    }

    /// Seconds as a number (Celery's form); `0` or an empty variable means "none".
    fn seconds(
        &self,
        name: &str,
        default: Option<Duration>,
    ) -> Result<Option<Duration>, SettingsError> {
        const ACCEPTED: &str = "a number of seconds, 0 or more (0 means none)";
        let secs: f64 = match self.values.get(name) {
            None => return Ok(default),
            Some(Raw::Toml(toml::Value::Integer(n))) => *n as f64,
            Some(Raw::Toml(toml::Value::Float(f))) => *f,
            Some(Raw::Env(s)) if s.trim().is_empty() || s.trim() == "none" => return Ok(None),
            Some(Raw::Env(s)) => s.trim().parse().map_err(|_| self.invalid(name, ACCEPTED))?,
            Some(Raw::Toml(_)) => return Err(self.invalid(name, ACCEPTED)),
        };
        if !secs.is_finite() || !(0.0..=31_536_000.0 * 10.0).contains(&secs) {
            return Err(self.invalid(name, ACCEPTED));
        }
        Ok((secs > 0.0).then(|| Duration::from_secs_f64(secs)))
    }

    fn url(&self, name: &str, default: String, schemes: &[&str]) -> Result<String, SettingsError> {
        let Some(url) = self.string(name)? else {
            return Ok(default);
        };
        let scheme_ok = url
            .split_once("://")
            .is_some_and(|(scheme, rest)| schemes.contains(&scheme) && !rest.is_empty());
        if !scheme_ok {
            let list: Vec<String> = schemes.iter().map(|s| format!("{s}://…")).collect();
            let tls_note = if url.starts_with("rediss://") {
                " (TLS to Redis is not built into this release; reach Redis over a private network or a TLS sidecar)"
            } else {
                ""
            };
            return Err(self.invalid(
                name,
                format!("a URL starting with {}{tls_note}", list.join(" or ")),
            ));
        }
        Ok(url)
    }

    fn serializer(&self, name: &str, default: String) -> Result<String, SettingsError> {
        let Some(value) = self.string(name)? else {
            return Ok(default);
        };
        check_content_type(&value).map_err(|why| self.invalid(name, why))?;
        Ok("json".into())
    }

    /// A list: a TOML array of strings; in the environment a JSON array of strings
    /// (`["a.example", "b.example"]`) or comma-separated (`a.example,b.example`). Items with
    /// brackets, quotes or spaces are refused: they are a JSON array gone wrong, never a value.
    fn list(&self, name: &str) -> Result<Vec<String>, SettingsError> {
        const ACCEPTED: &str = "a JSON array of strings such as [\"a.example\", \"b.example\"], \
                                or a comma-separated list such as a.example,b.example";
        match self.values.get(name) {
            None => Ok(Vec::new()),
            Some(Raw::Env(s)) if s.trim_start().starts_with('[') => {
                serde_json::from_str::<Vec<String>>(s.trim())
                    .map(|items| {
                        items
                            .into_iter()
                            .map(|i| i.trim().to_owned())
                            .filter(|i| !i.is_empty())
                            .collect()
                    })
                    .map_err(|_| self.invalid(name, ACCEPTED))
            }
            Some(Raw::Env(s)) => {
                let items: Vec<String> = s
                    .split(',')
                    .map(|p| p.trim().to_owned())
                    .filter(|p| !p.is_empty())
                    .collect();
                let stray =
                    |i: &String| i.contains(|c: char| "[]\"'".contains(c) || c.is_whitespace());
                if items.iter().any(stray) {
                    return Err(self.invalid(name, ACCEPTED));
                }
                Ok(items)
            }
            Some(Raw::Toml(toml::Value::Array(a))) => a
                .iter()
                .map(|v| v.as_str().map(str::to_owned))
                .collect::<Option<_>>()
                .ok_or_else(|| self.invalid(name, "a list of strings")),
            Some(Raw::Toml(_)) => Err(self.invalid(name, "a list of strings")),
        }
    }

    fn accept_content(&self, default: Vec<String>) -> Result<Vec<String>, SettingsError> {
        const NAME: &str = "accept_content";
        let items: Vec<String> = match self.values.get(NAME) {
            None => return Ok(default),
            Some(Raw::Env(_)) => self.list(NAME)?,
            Some(Raw::Toml(toml::Value::Array(a))) => a
                .iter()
                .map(|v| v.as_str().map(str::to_owned))
                .collect::<Option<_>>()
                .ok_or_else(|| self.invalid(NAME, "a list of content types, e.g. [\"json\"]"))?,
            Some(Raw::Toml(_)) => {
                return Err(self.invalid(NAME, "a list of content types, e.g. [\"json\"]"))
            }
        };
        for item in &items {
            check_content_type(item).map_err(|why| self.invalid(NAME, why))?;
        }
        if items.is_empty() {
            return Err(self.invalid(NAME, "[\"json\"]"));
        }
        Ok(vec!["json".into()])
    }

    fn acks_late(&self) -> Result<bool, SettingsError> {
        let v = self.bool("task_acks_late", true)?;
        if !v {
            return Err(self.invalid(
                "task_acks_late",
                "true only: mediafarm acknowledges a message after its result is stored, so a \
                 worker that dies loses nothing (make side effects idempotent instead)",
            ));
        }
        Ok(v)
    }

    fn timezone(&self, default: String) -> Result<String, SettingsError> {
        let Some(tz) = self.string("timezone")? else {
            return Ok(default);
        };
        // The zone data beat matches crontabs with (built in, so images need no tzdata).
        if tz.parse::<chrono_tz::Tz>().is_err() {
            return Err(self.invalid(
                "timezone",
                "an IANA time zone name such as \"UTC\" or \"Europe/Berlin\"",
            ));
        }
        Ok(tz)
    }

    fn rate_limit(&self, name: &str) -> Result<Option<RateLimit>, SettingsError> {
        match self.string(name)? {
            None => Ok(None),
            Some(t) if t.trim().is_empty() => Ok(None),
            Some(t) => RateLimit::parse(&t).map(Some).ok_or_else(|| {
                self.invalid(
                    name,
                    "a rate such as \"10/s\", \"600/m\" or \"1000/h\" (count above 0)",
                )
            }),
        }
    }

    fn one_of(
        &self,
        name: &str,
        default: String,
        choices: &[&str],
    ) -> Result<String, SettingsError> {
        match self.string(name)? {
            None => Ok(default),
            Some(v) if choices.contains(&v.trim()) => Ok(v.trim().to_owned()),
            Some(_) => Err(self.invalid(name, format!("one of {}", choices.join(", ")))),
        }
    }

    fn socket_addr(&self, name: &str, default: SocketAddr) -> Result<SocketAddr, SettingsError> {
        let Some(text) = self.string(name)? else {
            return Ok(default);
        };
        text.parse().map_err(|_| {
            self.invalid(
                name,
                "host:port with a numeric address, e.g. \"0.0.0.0:9808\"",
            )
        })
    }
}

/// The generic SMS provider's default request body.
pub const DEFAULT_SMS_HTTP_BODY: &str =
    r#"{"to": {{ to|tojson }}, "from": {{ from|tojson }}, "body": {{ body|tojson }}}"#;

/// A cluster-wide send rate: `count` per `per` (Celery's `"10/s"`, `"100/m"`, `"1000/h"`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    pub count: u32,
    pub per: Duration,
}

impl RateLimit {
    /// Parses `"10/s"`, `"100/m"`, `"1000/h"` or a bare number (per second), as Celery does.
    pub fn parse(text: &str) -> Option<RateLimit> {
        let text = text.trim();
        let (count, unit) = text.split_once('/').unwrap_or((text, "s"));
        let per = match unit.trim() {
            "s" => Duration::from_secs(1),
            "m" => Duration::from_secs(60),
            "h" => Duration::from_secs(3600),
            _ => return None,
        };
        let count: u32 = count.trim().parse().ok()?;
        (count > 0).then_some(RateLimit { count, per })
    }
}

/// `mediafarm beat`'s settings.
impl Reader {
    /// Entries as TOML tables, or a JSON object in the environment; an entry's bad field is
    /// named as `beat_schedule.<entry>.<field>`.
    fn beat_schedule(&self) -> Result<Vec<crate::schedule::ScheduleEntry>, SettingsError> {
        const NAME: &str = "beat_schedule";
        const ACCEPTED: &str =
            "a table of entries, [beat_schedule.<name>] with task = \"...\" and \
             every = \"20s\" (in the environment: a JSON object of such entries)";
        let json = match self.values.get(NAME) {
            None => return Ok(Vec::new()),
            Some(Raw::Toml(v)) => {
                serde_json::to_value(v).map_err(|_| self.invalid(NAME, ACCEPTED))?
            }
            Some(Raw::Env(s)) => {
                serde_json::from_str(s).map_err(|_| self.invalid(NAME, ACCEPTED))?
            }
        };
        crate::schedule::parse_table(&json).map_err(|e| {
            let name = match (e.entry.as_str(), e.field.as_str()) {
                ("(all)", _) => NAME.to_owned(),
                (entry, field) if field.starts_with('(') => format!("{NAME}.{entry}"),
                (entry, field) => format!("{NAME}.{entry}.{field}"),
            };
            SettingsError::Invalid {
                name,
                value: e.value,
                accepted: e.accepted,
            }
        })
    }

    fn beat_key_prefix(&self, default: String) -> Result<String, SettingsError> {
        let Some(prefix) = self.string("beat_key_prefix")? else {
            return Ok(default);
        };
        if prefix.is_empty()
            || prefix.len() > 100
            || prefix.chars().any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(self.invalid(
                "beat_key_prefix",
                "1 to 100 characters without spaces, e.g. \"mediafarm-beat\"",
            ));
        }
        Ok(prefix)
    }

    fn beat_lease_ttl(&self, default: Duration) -> Result<Duration, SettingsError> {
        const NAME: &str = "beat_lease_ttl";
        const ACCEPTED: &str = "seconds from 0.5 to 3600 (the leader renews it every third)";
        match self.seconds(NAME, Some(default)) {
            Ok(Some(ttl)) if (0.5..=3600.0).contains(&ttl.as_secs_f64()) => Ok(ttl),
            _ => Err(self.invalid(NAME, ACCEPTED)),
        }
    }
}

/// Accepts JSON under its names and says why anything else is refused.
pub fn check_content_type(value: &str) -> Result<(), String> {
    match value.trim().to_ascii_lowercase().as_str() {
        "json" | "application/json" => Ok(()),
        "pickle" | "application/x-python-serialize" => Err(PICKLE_REFUSAL.into()),
        _ => Err("\"json\" (the only serializer mediafarm speaks)".into()),
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn hard_limits_must_fit_under_rabbitmqs_consumer_timeout() {
        let env = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect::<Vec<_>>()
        };
        let d = Settings::default();
        assert_eq!(d.longest_hard_limit(), Duration::from_secs(1680));
        let err = Settings::from_sources(
            toml::Table::new(),
            "test",
            env(&[("MEDIAFARM_TASK_TIME_LIMIT", "1700")]),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("task_time_limit") && err.contains("at most 1680 s"),
            "{err}"
        );
        let ok = Settings::from_sources(
            toml::Table::new(),
            "test",
            env(&[
                ("MEDIAFARM_BROKER_CONSUMER_TIMEOUT", "3600"),
                ("MEDIAFARM_TASK_TIME_LIMIT", "3000"),
            ]),
        )
        .unwrap();
        assert_eq!(ok.longest_hard_limit(), Duration::from_secs(3480));
        let err = Settings::from_sources(
            toml::Table::new(),
            "test",
            env(&[("MEDIAFARM_BROKER_CONSUMER_TIMEOUT", "5")]),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("broker_consumer_timeout"), "{err}");
    }

    use super::*;

    fn from(toml_text: &str, env: &[(&str, &str)]) -> Result<Settings, SettingsError> {
        let table: toml::Table = toml_text.parse().expect("test TOML parses");
        Settings::from_sources(
            table,
            "test.toml",
            env.iter().map(|(k, v)| (k.to_string(), v.to_string())),
        )
    }

    #[test]
    fn defaults_when_nothing_is_set() {
        let s = from("", &[]).unwrap();
        assert_eq!(s, Settings::default());
        assert_eq!(s.prefetch_count() as usize, s.worker_concurrency * 4);
    }

    #[test]
    fn file_values_are_read_and_env_wins() {
        let s = from(
            "worker_concurrency = 3\nresult_expires = 60\ntask_track_started = true\nmetrics_addr = \"0.0.0.0:9100\"",
            &[("MEDIAFARM_WORKER_CONCURRENCY", "7"), ("OTHER", "x")],
        )
        .unwrap();
        assert_eq!(s.worker_concurrency, 7);
        assert_eq!(s.result_expires, Duration::from_secs(60));
        assert!(s.task_track_started);
        assert_eq!(s.metrics_addr.port(), 9100);
    }

    #[test]
    fn env_lists_bools_and_seconds() {
        let s = from(
            "",
            &[
                ("MEDIAFARM_ACCEPT_CONTENT", "json, application/json"),
                ("MEDIAFARM_TASK_TRACK_STARTED", "yes"),
                ("MEDIAFARM_TASK_TIME_LIMIT", "2.5"),
                ("MEDIAFARM_TASK_SOFT_TIME_LIMIT", "1"),
            ],
        )
        .unwrap();
        assert_eq!(s.accept_content, vec!["json"]);
        assert!(s.task_track_started);
        assert_eq!(s.task_time_limit, Some(Duration::from_millis(2500)));
    }

    #[test]
    fn env_lists_are_a_json_array_or_comma_separated_and_nothing_else() {
        for given in [
            r#"["cdn.example.com", "img.example.org"]"#,
            " [\"cdn.example.com\",\"img.example.org\"] ",
            "cdn.example.com,img.example.org",
            " cdn.example.com , img.example.org ,",
        ] {
            let s = from("", &[("MEDIAFARM_SOURCE_ALLOWED_HOSTS", given)]).unwrap();
            assert_eq!(
                s.source_allowed_hosts,
                ["cdn.example.com", "img.example.org"],
                "{given}"
            );
        }
        let s = from("", &[("MEDIAFARM_ACCEPT_CONTENT", r#"["json"]"#)]).unwrap();
        assert_eq!(s.accept_content, ["json"]);
        for bad in [
            r#"["cdn.example.com""#,
            r#"[1, 2]"#,
            r#"'cdn.example.com'"#,
            "cdn.example.com img.example.org",
            r#"cdn.example.com,"img.example.org""#,
        ] {
            let e = from("", &[("MEDIAFARM_SOURCE_ALLOWED_HOSTS", bad)]).unwrap_err();
            let text = e.to_string();
            assert!(
                text.contains("source_allowed_hosts")
                    && text.contains("a JSON array of strings")
                    && text.contains("comma-separated"),
                "{bad}: {text}"
            );
        }
    }

    #[test]
    fn pickle_is_refused_with_the_reason() {
        for (toml_text, env) in [
            ("task_serializer = \"pickle\"", vec![]),
            ("accept_content = [\"json\", \"pickle\"]", vec![]),
            ("", vec![("MEDIAFARM_RESULT_SERIALIZER", "pickle")]),
            (
                "",
                vec![("MEDIAFARM_ACCEPT_CONTENT", "application/x-python-serialize")],
            ),
        ] {
            let err = from(toml_text, &env).unwrap_err().to_string();
            assert!(err.contains("runs code chosen by whoever"), "{err}");
        }
    }

    #[test]
    fn wrong_values_name_setting_value_and_what_is_accepted() {
        let err = from("worker_concurrency = 0", &[]).unwrap_err().to_string();
        assert_eq!(
            err,
            "setting `worker_concurrency` = 0 is not accepted: a whole number from 1 to 10000"
        );
        let err = from("", &[("MEDIAFARM_BROKER_URL", "http://x")])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`broker_url`") && err.contains("\"http://x\""),
            "{err}"
        );
        assert!(err.contains("amqp://"), "{err}");
        let err = from("result_backend = \"rediss://h:6380/0\"", &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("TLS to Redis is not built in"), "{err}");
        let err = from("task_acks_late = false", &[]).unwrap_err().to_string();
        assert!(err.contains("after its result is stored"), "{err}");
        let err = from("timezone = \"Mars/Olympus\"", &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("IANA"), "{err}");
        let berlin = from("timezone = \"Europe/Berlin\"", &[]).unwrap();
        assert_eq!(berlin.timezone, "Europe/Berlin");
        let err = from("metrics_addr = \"localhost\"", &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("host:port"), "{err}");
        let err = from("worker_prefetch_multiplier = \"4\"", &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("whole number"), "{err}");
    }

    #[test]
    fn soft_limit_must_be_below_hard_limit() {
        let err = from("task_time_limit = 10\ntask_soft_time_limit = 10", &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("below task_time_limit"), "{err}");
        assert!(from("task_time_limit = 10\ntask_soft_time_limit = 9", &[]).is_ok());
    }

    #[test]
    fn unknown_names_get_a_suggestion() {
        let err = from("worker_concurency = 2", &[]).unwrap_err().to_string();
        assert!(err.contains("did you mean `worker_concurrency`"), "{err}");
    }

    #[test]
    fn missing_optional_file_is_defaults_but_required_file_is_an_error() {
        let missing = Path::new("/nonexistent/mediafarm.toml");
        assert!(Settings::load(missing, false).is_ok());
        let err = Settings::load(missing, true).unwrap_err().to_string();
        assert!(err.contains("/nonexistent/mediafarm.toml"), "{err}");
    }

    #[test]
    fn the_example_settings_file_is_valid_and_all_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/mediafarm.example.toml");
        let table: toml::Table = std::fs::read_to_string(&path).unwrap().parse().unwrap();
        let s = Settings::from_sources(table, "example", std::iter::empty()).unwrap();
        assert_eq!(s, Settings::default());
    }

    #[test]
    fn bad_toml_names_the_file() {
        let dir = std::env::temp_dir().join(format!("mf-settings-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("bad.toml");
        std::fs::write(&path, "worker_concurrency = = 2").unwrap();
        let err = Settings::load(&path, true).unwrap_err().to_string();
        assert!(
            err.contains("bad.toml") && err.contains("not valid TOML"),
            "{err}"
        );
    }
}

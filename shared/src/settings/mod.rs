//! Settings: the core group every program reads (Celery's names where Celery has one, plus
//! storage, sources and metrics), read from a TOML file with `MEDIAFARM_<NAME>` environment
//! variables over it. Each worker and beat declare their own group the same way, in their own
//! crate or folder ([`settings_group!`](crate::settings_group)); one file serves them all
//! ([`sources`] says who reads which name). Every value is checked at start-up and a bad one is
//! reported with the setting's name, the value given and what is accepted.

pub mod declare;
mod rate;
mod reader;
pub mod result_transport;
pub mod sentinel;
pub mod sources;
pub mod tls;
pub mod transport;
pub mod webhook;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use declare::{Declared, Group, Groups, SettingInfo};
pub use rate::{RateLimit, RateParseError, TaskRate, RATE_FORMS};
pub use reader::{Kind, Raw, Reader, Value};
pub use result_transport::ResultTransportOptions;
pub use sources::{owner_of, Sources, OWNERS};
pub use tls::{BrokerSsl, CertReqs, RedisBackendSsl, TlsOptions};
pub use transport::TransportOptions;
pub use webhook::WebhookSettings;

/// The kinds a declaration reads its value as (`Int(1, 100)`, `Seconds`, `Url(&["https"])`...).
pub mod kinds {
    pub use super::reader::{
        Addr, Bool, CeleryRate, Custom, Int, List, OneOf, OptInt, OptSeconds, Rate, Seconds,
        SecondsOrDefault, Str, Url,
    };
}

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

use kinds::*;

crate::settings_group! {
    /// The settings every program reads, with their defaults.
    pub struct Settings checked_by check_core {
        owner = "every program";
        prefixes = [];
        /// AMQP URL of RabbitMQ (`amqp://user:pass@host:port/vhost`, Celery's `//` means vhost `/`;
        /// `amqps://` for TLS, port 5671 by default), or a Redis URL (`redis://host:port/db`,
        /// `redis+unix:///path?db=N`, `rediss://`) for kombu's Redis transport (README: "Redis
        /// as the broker"), or kombu's `sentinel://host:port[/db];sentinel://…` with
        /// `broker_transport_options.master_name`.
        broker_url: String = "amqp://guest:guest@127.0.0.1:5672//".into(),
            Url(&["amqp", "amqps", "redis", "rediss", "redis+unix", "unix", "sentinel"]);
        /// Options of the Redis broker transport, as Celery's `broker_transport_options` for
        /// kombu's Redis transport: `visibility_timeout` (seconds, default 3600),
        /// `priority_steps`, `sep`, `unacked_key`, `unacked_index_key`, `unacked_mutex_key`,
        /// `unacked_mutex_expire`, `unacked_restore_limit`, `fanout_prefix`, `fanout_patterns`,
        /// `global_keyprefix`, `master_name`. Unused with an AMQP broker.
        broker_transport_options: TransportOptions = TransportOptions::default(),
            Custom(Reader::broker_transport_options);
        /// TLS to RabbitMQ (Celery's `broker_use_ssl`): `true` (the system's CAs), or a table of
        /// `ca_certs`, `certfile`, `keyfile` (PEM files) and `cert_reqs` (`CERT_REQUIRED`, the
        /// default; `CERT_OPTIONAL` verifies the same; `CERT_NONE` verifies nothing and is
        /// logged as a warning). Set with an `amqp://` URL it turns TLS on, as kombu does.
        broker_use_ssl: Option<BrokerSsl> = None, Custom(Reader::broker_use_ssl);
        /// Connections the producer side keeps open at most (kombu's pool limit).
        broker_pool_limit: usize = 10, Int(1, 1000);
        /// AMQP heartbeat in seconds (0 turns heartbeats off).
        broker_heartbeat: u16 = 60, Int(0, 3600);
        /// `x-max-priority` of every work queue (Celery's `task_queue_max_priority`, 1 to 255;
        /// RabbitMQ advises 10 or less): a message's `priority` then counts. Unset: no argument,
        /// so priorities are carried but have no effect. Classic queues only (RabbitMQ before
        /// 3.13 has no priorities on quorum queues). An existing queue keeps its arguments: see
        /// the README on changing them.
        task_queue_max_priority: Option<u8> = None, OptInt(1, 255);
        /// Priority of a job published without one (Celery's `task_default_priority`, 0 to
        /// 255; unset: Celery's 0). Only a queue with `task_queue_max_priority` honours it.
        task_default_priority: Option<u8> = None, OptInt(0, 255);
        /// Celery's `task_inherit_parent_priority`: what a job sends on when it succeeds
        /// (callbacks, the next chain step, a group's members, a chord's header) is sent with
        /// the job's delivery priority, over its own, as Celery's worker does; errbacks and a
        /// chord's body keep their own.
        task_inherit_parent_priority: bool = false, Bool;
        /// The type of the work queues and their dead-letter queues (Celery's
        /// `task_default_queue_type`): `classic`, or `quorum` (replicated; RabbitMQ 3.10 or
        /// later). Delay queues and the control and reply queues stay classic.
        task_default_queue_type: String = "classic".into(), OneOf(&["classic", "quorum"]);
        /// Quorum queues only: deliveries of one message before RabbitMQ dead-letters it to
        /// `<queue>.dead` (`x-delivery-limit`, the guard against a message that kills every
        /// worker that takes it). 0: no limit and no dead-letter arguments, which is exactly
        /// Celery's own quorum declaration.
        task_quorum_delivery_limit: u32 = 20, Int(0, 1_000_000);
        /// Redis URL of the result backend; `rediss://` for TLS, where Celery's query keys
        /// `ssl_cert_reqs`, `ssl_ca_certs`, `ssl_certfile` and `ssl_keyfile` are taken too.
        result_backend: String = "redis://127.0.0.1:6379/0".into(),
            Url(&["redis", "rediss", "redis+unix", "unix"]);
        /// TLS options of a `rediss://` result backend (Celery's `redis_backend_use_ssl`):
        /// `true`, or a table of `ssl_ca_certs`, `ssl_certfile`, `ssl_keyfile` and
        /// `ssl_cert_reqs` as in `broker_use_ssl`; the URL's own query keys win.
        redis_backend_use_ssl: Option<RedisBackendSsl> = None,
            Custom(Reader::redis_backend_use_ssl);
        /// How long results are kept (0: Celery keeps them forever; Redis needs no expiry then).
        result_expires: Duration = Duration::from_secs(86_400), Seconds;
        /// Celery's `result_chord_join_timeout` (seconds; 0 stands for Celery's `None`, which its
        /// Redis backend counts as 5): a chord's dispatch claim lasts twice this (at least 5 s)
        /// before another header may take it over, and `.c` says `done` for twice the claim (at
        /// least 300 s) after the body was sent, as Celery 5.7's Redis backend derives them.
        result_chord_join_timeout: Duration = Duration::from_secs(3), Seconds;
        /// Celery's `result_chord_expires`: how long a chord's counters (`.j`, `.t`, `.s`, `.d`)
        /// are kept, renewed at each header's return; unset: `result_expires`; 0: for ever.
        result_chord_expires: Option<Duration> = None, OptSeconds;
        /// Celery's `result_backend_transport_options`: only `result_chord_ordered` (default
        /// true: a chord's header results are kept in a sorted set by `group_index`; false: in
        /// a list, in the order the header tasks ended). Give every worker of a chord, Python
        /// or Rust, the same value.
        result_backend_transport_options: ResultTransportOptions =
            ResultTransportOptions::default(), Custom(Reader::result_backend_transport_options);
        /// Always "json" (pickle is refused).
        task_serializer: String = "json".into(), Custom(Reader::serializer);
        /// Always "json" (pickle is refused).
        result_serializer: String = "json".into(), Custom(Reader::serializer);
        /// Content types accepted from the broker: JSON only.
        accept_content: Vec<String> = vec!["json".into()], Custom(Reader::accept_content);
        /// IANA time zone used for schedules; timestamps on the wire are always UTC.
        timezone: String = "UTC".into(), Custom(Reader::timezone);
        /// Jobs a worker process runs at once.
        worker_concurrency: usize = default_concurrency(), Int(1, 10_000);
        /// Threads running a worker's async side: the broker's and Redis's I/O and each job's
        /// awaits (CPU work runs on the bounded blocking pool). 0, the default: one per core,
        /// Tokio's default. On two cores shared with RabbitMQ and Redis, 1 suits a worker whose
        /// jobs only wait (a hand-off between async threads costs a context switch): 11–34 %
        /// less worker CPU per no-op chain step, 5 % more `echo.echo` jobs/s; but image-worker
        /// made 13 % fewer images/s with it (BENCHMARKS.md, issue 14).
        worker_async_threads: usize = 0, Int(0, 1_024);
        /// Unacknowledged messages held per unit of concurrency.
        worker_prefetch_multiplier: u16 = 4, Int(1, 1000);
        /// Messages a worker may hold beyond `concurrency × worker_prefetch_multiplier` for jobs
        /// whose task returned and that only wait for their finishing (the next step's publisher
        /// confirm, the result store, a chord join): the prefetch window widens by one for each,
        /// up to this many. It never lets more jobs wait to run or run. Unset:
        /// `concurrency × worker_prefetch_multiplier`. A finishing job waits for RabbitMQ, which
        /// confirms persistent messages in batches every few ms to 25 ms; on a loaded machine
        /// 128 gave chains 1.5× faster with a third less RabbitMQ CPU per step, with the cores
        /// free it was within noise (BENCHMARKS.md, issue 14); 0: the window never widens.
        worker_finishing_limit: Option<usize> = None, OptInt(0, 65_535);
        /// Always true: a message is acknowledged only after its result is stored.
        task_acks_late: bool = true, Custom(Reader::acks_late);
        /// Store a STARTED state when a job begins.
        task_track_started: bool = false, Bool;
        /// Add the task name, args, kwargs, worker, retries and queue to stored results (Celery's
        /// `result_extended`, which Flower and `AsyncResult.name` read).
        result_extended: bool = false, Bool;
        /// Hard time limit of a job (default and maximum: see `longest_hard_limit`).
        task_time_limit: Option<Duration> = None, OptSeconds;
        /// Soft time limit of a job; below `task_time_limit`.
        task_soft_time_limit: Option<Duration> = None, OptSeconds;
        /// Base delay of a retry; each further retry doubles it, up to `task_retry_backoff_max`.
        task_default_retry_delay: Duration = Duration::from_secs(180), Seconds;
        /// Cap on the delay between retries.
        task_retry_backoff_max: Duration = Duration::from_secs(600), Seconds;
        /// Spread retry delays at random over their upper half, so a burst does not retry in step.
        task_retry_jitter: bool = true, Bool;
        /// Retries before a job ends as FAILURE.
        task_max_retries: u32 = 3, Int(0, 1_000_000);
        /// Celery's `rate_limit` of every task that declares none (`"100/m"`, `"10/s"`, `"1000/h"`,
        /// a bare number per second; unset or 0: none): per task and per worker, jobs over it
        /// wait in the worker, in order, holding no concurrency slot.
        task_default_rate_limit: Option<TaskRate> = None, CeleryRate;
        /// Where rate limits hold: `worker` (Celery's: each worker allows the rate) or `cluster`
        /// (one bucket per task in the result backend's Redis, shared by every worker).
        task_rate_limit_scope: String = "worker".into(), OneOf(&["worker", "cluster"]);
        /// RabbitMQ's `consumer_timeout`: a delivery not acknowledged within it closes the channel.
        /// Every job's hard time limit is kept below it (see `ack_deadline_margin`).
        broker_consumer_timeout: Duration = Duration::from_secs(1800), Seconds;
        /// How long a stopping worker lets running jobs finish before returning them to the broker.
        worker_shutdown_grace: Duration = Duration::from_secs(30), Seconds;
        /// Send Celery's task events (`task-received` ... `task-succeeded`) and the worker's
        /// `worker-online`/`-heartbeat`/`-offline` on `event_exchange`, as `celery worker -E`.
        /// Off: nothing is sent (the `enable_events` control command turns them on at runtime).
        worker_send_task_events: bool = false, Bool;
        /// A producer (`mediafarm::Client`, `mediafarm submit`) sends `task-sent` for each job.
        task_send_sent_event: bool = false, Bool;
        /// Seconds between `worker-heartbeat` events (Celery's `--heartbeat-interval`; Flower
        /// counts a worker offline after two intervals without one).
        worker_heartbeat_interval: Duration = Duration::from_secs(2), SecondsOrDefault;
        /// The topic exchange events are published on (Celery's `event_exchange`).
        event_exchange: String = "celeryev".into(), Custom(Reader::exchange_name);
        /// Always "json" (pickle is refused).
        event_serializer: String = "json".into(), Custom(Reader::serializer);
        /// Where `/metrics`, `/healthz` and `/readyz` are served; port 0 picks a free port.
        metrics_addr: SocketAddr = SocketAddr::from(([127, 0, 0, 1], 9808)), Addr;
        /// Largest message body accepted, in bytes.
        task_message_max_bytes: usize = 1 << 20, Int(1024, 512 << 20);
        /// Where workers store media: `file://<dir>` (relative to the working directory) or
        /// `s3://<bucket>[/<prefix>]`. S3 credentials come from `AWS_ACCESS_KEY_ID`,
        /// `AWS_SECRET_ACCESS_KEY` (and `AWS_SESSION_TOKEN`) in the environment.
        storage_url: String = "file://./var/storage".into(), Url(&["file", "s3"]);
        /// URLs in results are this base plus the key; unset: presigned URLs (S3) or `file://`.
        storage_public_base_url: Option<String> = None, Url(&["http", "https"]);
        /// An S3-compatible endpoint (MinIO, Ceph, R2, `http://127.0.0.1:9000`); unset: AWS.
        storage_s3_endpoint: Option<String> = None, Url(&["http", "https"]);
        /// The S3 region.
        storage_s3_region: String = "us-east-1".into(), Str;
        /// Path-style requests (`endpoint/bucket/key`), which most S3-compatible servers need.
        storage_s3_path_style: bool = true, Bool;
        /// How long a presigned URL stays valid.
        storage_url_expires: Duration = Duration::from_secs(3600), SecondsOrDefault;
        /// Hosts `https://` sources may come from: exact names, or `*.example.com` for its
        /// subdomains. Empty: no web sources.
        source_allowed_hosts: Vec<String> = Vec::new(), List;
        /// Directories `file://` sources may come from. Empty: no `file://` sources.
        source_allowed_roots: Vec<String> = Vec::new(), List;
        /// Let web sources resolve to loopback, private, link-local or other internal addresses
        /// (off: a job cannot make the worker reach inside the network).
        source_allow_private: bool = false, Bool;
        /// Accept plain `http://` web sources (off: `https://` only).
        source_allow_http: bool = false, Bool;
        /// Whole-download time limit for a web source.
        source_timeout: Duration = Duration::from_secs(30), SecondsOrDefault;
    }
}

fn default_concurrency() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// Rules across the core settings: time limits fit each other and RabbitMQ's timeout; TLS
/// options of the result backend fit its URL.
fn check_core(settings: &Settings) -> Result<(), SettingsError> {
    if let Err(why) = tls::redis_tls_options(
        &settings.result_backend,
        settings.redis_backend_use_ssl.as_ref(),
    ) {
        return Err(SettingsError::Invalid {
            name: "result_backend".into(),
            value: format!("{:?}", tls::without_password(&settings.result_backend)),
            accepted: why,
        });
    }
    if let (Some(max), true) = (settings.task_queue_max_priority, settings.quorum()) {
        return Err(SettingsError::Invalid {
            name: "task_queue_max_priority".into(),
            value: max.to_string(),
            accepted: "unset while task_default_queue_type is \"quorum\": RabbitMQ refuses \
                       x-max-priority on a quorum queue (before 3.13, which has two fixed \
                       priorities instead); use classic queues for priorities, or a separate \
                       queue for urgent jobs"
                .into(),
        });
    }
    if let (Some(soft), Some(hard)) = (settings.task_soft_time_limit, settings.task_time_limit) {
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
    if sentinel::is_sentinel(&settings.broker_url) {
        let invalid = |accepted: String| SettingsError::Invalid {
            name: "broker_url".into(),
            value: format!("{:?}", tls::without_password(&settings.broker_url)),
            accepted,
        };
        sentinel::parse(&settings.broker_url).map_err(|why| {
            invalid(format!(
                "sentinel://[:password@]host[:port][/db], `;`-separated for several \
                 sentinels: {why}"
            ))
        })?;
        if settings.broker_transport_options.master_name.is_none() {
            return Err(invalid(
                "a sentinel:// URL together with broker_transport_options.master_name (the \
                 Sentinel group to ask for, as kombu requires)"
                    .into(),
            ));
        }
    }
    if settings.broker_consumer_timeout < Duration::from_secs(10) {
        return Err(SettingsError::Invalid {
            name: "broker_consumer_timeout".into(),
            value: format!("{}", settings.broker_consumer_timeout.as_secs_f64()),
            accepted: "RabbitMQ's consumer_timeout in seconds, 10 or more (its default is 1800)"
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
                    "at most {} s: {} ({} s) less {} s to store the result and acknowledge, \
                     or {}",
                    most.as_secs_f64(),
                    if settings.broker_is_redis() {
                        "broker_transport_options.visibility_timeout"
                    } else {
                        "broker_consumer_timeout"
                    },
                    settings.ack_timeout().as_secs_f64(),
                    settings.ack_deadline_margin().as_secs_f64(),
                    if settings.broker_is_redis() {
                        "another worker takes the message again under a long job"
                    } else {
                        "RabbitMQ closes the channel under a long job"
                    }
                ),
            });
        }
    }
    Ok(())
}

impl Settings {
    /// The list-valued settings by name, as parsed (what `mediafarm check-settings` prints, so
    /// a list given in the environment can be checked item by item).
    pub fn lists(&self) -> Vec<(&'static str, &[String])> {
        Group::lists(self)
    }

    /// Reads `path` (a missing file is an error only when `required`), then the process
    /// environment over it: the core settings only (see [`Settings::load_with`]).
    pub fn load(path: &Path, required: bool) -> Result<Settings, SettingsError> {
        Ok(Self::load_with::<()>(path, required)?.0)
    }

    /// Like [`Settings::load`], with the groups `G` a program reads beside the core.
    pub fn load_with<G: Groups>(
        path: &Path,
        required: bool,
    ) -> Result<(Settings, G), SettingsError> {
        Sources::load(path, required)?.read::<G>()
    }

    /// Builds the core settings from a parsed file and an environment; the environment wins.
    pub fn from_sources(
        file: toml::Table,
        origin: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Settings, SettingsError> {
        Ok(Sources::new(file, origin, env).read::<()>()?.0)
    }

    /// Time kept free between a job's hard limit and RabbitMQ's delivery-ack timeout, for
    /// storing the result and acknowledging: a quarter of the timeout, at most two minutes.
    pub fn ack_deadline_margin(&self) -> Duration {
        (self.ack_timeout() / 4).min(Duration::from_secs(120))
    }

    /// The longest hard time limit any job may have (jobs with none get this one).
    pub fn longest_hard_limit(&self) -> Duration {
        self.ack_timeout()
            .saturating_sub(self.ack_deadline_margin())
    }

    /// How long the broker waits for an acknowledgement before it gives the message to
    /// another worker: RabbitMQ's `consumer_timeout`, or on Redis the transport's
    /// `visibility_timeout`.
    pub fn ack_timeout(&self) -> Duration {
        if self.broker_is_redis() {
            self.broker_transport_options.visibility_timeout
        } else {
            self.broker_consumer_timeout
        }
    }

    /// The broker is Redis (kombu's Redis transport), not RabbitMQ.
    pub fn broker_is_redis(&self) -> bool {
        is_redis_url(&self.broker_url) || sentinel::is_sentinel(&self.broker_url)
    }

    /// Unacknowledged messages the broker may hand this worker at once.
    pub fn prefetch_count(&self) -> u16 {
        let n = self
            .worker_concurrency
            .saturating_mul(self.worker_prefetch_multiplier as usize);
        n.min(u16::MAX as usize) as u16
    }

    /// How many places the prefetch window lends at most to finishing jobs
    /// (`worker_finishing_limit`; by default `prefetch_count`).
    pub fn finishing_limit(&self) -> usize {
        self.worker_finishing_limit
            .unwrap_or_else(|| usize::from(self.prefetch_count()))
    }

    /// Work queues are quorum queues (`task_default_queue_type = "quorum"`).
    pub fn quorum(&self) -> bool {
        self.task_default_queue_type == "quorum"
    }

    /// Expiry in whole seconds for Redis, `None` when results are kept forever.
    pub fn result_expires_secs(&self) -> Option<u64> {
        let s = self.result_expires.as_secs();
        (s > 0).then_some(s)
    }
}

/// A `redis://`, `rediss://`, `redis+unix://` or `unix://` URL.
pub fn is_redis_url(url: &str) -> bool {
    ["redis://", "rediss://", "redis+unix://", "unix://"]
        .iter()
        .any(|p| url.starts_with(p))
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
pub(crate) mod tests {

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

    /// Settings from a TOML text and `MEDIAFARM_*` variables, for tests of this module's.
    pub(crate) fn from(toml_text: &str, env: &[(&str, &str)]) -> Result<Settings, SettingsError> {
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
        assert_eq!(s.finishing_limit(), usize::from(s.prefetch_count()));
        let wide = from("worker_finishing_limit = 128", &[]).unwrap();
        assert_eq!(wide.finishing_limit(), 128);
        let none = from("worker_finishing_limit = 0", &[]).unwrap();
        assert_eq!(none.finishing_limit(), 0);
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
    fn event_settings_take_celerys_names_and_refuse_what_rabbitmq_would() {
        let s = from(
            "worker_send_task_events = true\nworker_heartbeat_interval = 0.5\nevent_exchange = \"ev.farm\"",
            &[("MEDIAFARM_TASK_SEND_SENT_EVENT", "true")],
        )
        .unwrap();
        assert!(s.worker_send_task_events && s.task_send_sent_event);
        assert_eq!(s.worker_heartbeat_interval, Duration::from_millis(500));
        assert_eq!(s.event_exchange, "ev.farm");
        for bad in ["amq.topic", "", "two words"] {
            let err = from(&format!("event_exchange = {bad:?}"), &[])
                .unwrap_err()
                .to_string();
            assert!(err.contains("`event_exchange`"), "{err}");
        }
        let err = from("event_serializer = \"pickle\"", &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("pickle is refused"), "{err}");
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
        let err = from(
            "result_backend = \"redis://:pw@h:6380/0?ssl_cert_reqs=none\"",
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("`result_backend`") && err.contains("rediss://") && !err.contains("pw"),
            "{err}"
        );
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
    fn queue_settings_take_celerys_names_and_refuse_priorities_on_quorum_queues() {
        let s = from(
            "task_queue_max_priority = 10\ntask_default_priority = 3",
            &[],
        )
        .unwrap();
        assert_eq!(
            (s.task_queue_max_priority, s.task_default_priority),
            (Some(10), Some(3))
        );
        assert!(!s.quorum());
        let s = from("", &[("MEDIAFARM_TASK_DEFAULT_QUEUE_TYPE", "quorum")]).unwrap();
        assert!(s.quorum());
        assert_eq!(s.task_quorum_delivery_limit, 20);
        let s = from("", &[("MEDIAFARM_TASK_QUEUE_MAX_PRIORITY", "")]).unwrap();
        assert_eq!(s.task_queue_max_priority, None);
        let err = from("task_queue_max_priority = 0", &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("from 1 to 255"), "{err}");
        let err = from("task_default_queue_type = \"stream\"", &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("classic, quorum"), "{err}");
        let err = from(
            "task_default_queue_type = \"quorum\"\ntask_queue_max_priority = 10",
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("`task_queue_max_priority`") && err.contains("quorum"),
            "{err}"
        );
    }

    #[test]
    fn tls_settings_take_celerys_names_as_a_table_true_or_json() {
        let s = from(
            "broker_url = \"amqps://u:p@mq.example.com//\"\n\
             broker_use_ssl = { ca_certs = \"/etc/mf/ca.pem\", certfile = \"/etc/mf/c.pem\", \
             keyfile = \"/etc/mf/c.key\", cert_reqs = \"CERT_REQUIRED\" }\n\
             result_backend = \"rediss://:pw@cache.example.com:6380/0?ssl_cert_reqs=required\"\n\
             redis_backend_use_ssl = { ssl_ca_certs = \"/etc/mf/redis-ca.pem\" }",
            &[],
        )
        .unwrap();
        let broker = s.broker_use_ssl.clone().unwrap().0;
        assert_eq!(broker.ca_certs, Some(PathBuf::from("/etc/mf/ca.pem")));
        assert_eq!(broker.keyfile, Some(PathBuf::from("/etc/mf/c.key")));
        assert_eq!(broker.cert_reqs, CertReqs::Required);
        let redis = s.redis_backend_use_ssl.clone().unwrap().0;
        assert_eq!(redis.ca_certs, Some(PathBuf::from("/etc/mf/redis-ca.pem")));
        let shown = Value::shown(&s.broker_use_ssl);
        assert!(shown.contains("ca_certs = \"/etc/mf/ca.pem\""), "{shown}");
        assert!(Value::shown(&s.redis_backend_use_ssl).contains("ssl_ca_certs"));
        // true: the system's CAs, verified; the environment takes a JSON object.
        let s = from("broker_use_ssl = true", &[]).unwrap();
        assert_eq!(s.broker_use_ssl, Some(BrokerSsl::default()));
        let s = from(
            "broker_use_ssl = true",
            &[("MEDIAFARM_BROKER_USE_SSL", r#"{"cert_reqs": "CERT_NONE"}"#)],
        )
        .unwrap();
        assert_eq!(s.broker_use_ssl.unwrap().0.cert_reqs, CertReqs::None);
        let s = from("broker_use_ssl = false", &[]).unwrap();
        assert_eq!(s.broker_use_ssl, None);
        for (bad, says) in [
            (
                "broker_use_ssl = { cert_reqs = \"CERT_MAYBE\" }",
                "CERT_REQUIRED",
            ),
            (
                "broker_use_ssl = { ssl_ca_certs = \"/x\" }",
                "unknown key \"ssl_ca_certs\"",
            ),
            (
                "broker_use_ssl = { certfile = \"/c.pem\" }",
                "certfile is set without keyfile",
            ),
            ("broker_use_ssl = \"yes\"", "a table of ca_certs"),
            (
                "redis_backend_use_ssl = { ssl_cert_reqs = \"CERT_NONE\" }",
                "scheme is not rediss://",
            ),
        ] {
            let err = from(bad, &[]).unwrap_err().to_string();
            assert!(err.contains(says), "{bad}: {err}");
        }
        let err = from("", &[("MEDIAFARM_REDIS_BACKEND_USE_SSL", "{nope")])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`redis_backend_use_ssl`") && err.contains("JSON"),
            "{err}"
        );
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
    fn the_default_rate_limit_is_written_as_celery_writes_one() {
        let rate = |toml: &str, env: &[(&str, &str)]| {
            from(toml, env).map(|s| {
                s.task_default_rate_limit
                    .map(|r| (r.to_string(), r.interval()))
            })
        };
        let ms = Duration::from_millis;
        assert_eq!(
            rate("task_default_rate_limit = \"100/m\"", &[]).unwrap(),
            Some(("100/m".into(), ms(600)))
        );
        assert_eq!(
            rate("task_default_rate_limit = 4", &[]).unwrap(),
            Some(("4".into(), ms(250)))
        );
        assert_eq!(
            rate("task_default_rate_limit = 0.5", &[]).unwrap(),
            Some(("0.5".into(), ms(2000)))
        );
        let env = [("MEDIAFARM_TASK_DEFAULT_RATE_LIMIT", "10/s")];
        assert_eq!(rate("", &env).unwrap(), Some(("10/s".into(), ms(100))));
        assert_eq!(rate("task_default_rate_limit = \"0\"", &[]).unwrap(), None);
        assert_eq!(rate("", &[]).unwrap(), None);
        let err = rate("task_default_rate_limit = \"100/min\"", &[])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("task_default_rate_limit")
                && err.contains("\"100/min\"")
                && err.contains("\"10/s\""),
            "{err}"
        );
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

    /// Each worker crate checks its own group against the same file (its `settings.rs` tests).
    #[test]
    fn the_example_settings_file_is_valid_and_all_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/mediafarm.example.toml");
        let table: toml::Table = std::fs::read_to_string(&path).unwrap().parse().unwrap();
        for name in table.keys() {
            assert!(
                Settings::NAMES.contains(&name.as_str()) || owner_of(name).is_some(),
                "{name} in the example file is no core setting and has no owner's prefix"
            );
        }
        let (s, (beat, webhook)) = Sources::new(table, "example", std::iter::empty())
            .read::<(crate::beat::settings::BeatSettings, WebhookSettings)>()
            .unwrap();
        assert_eq!(s, Settings::default());
        assert_eq!(beat, Default::default());
        assert_eq!(webhook, WebhookSettings::default());
    }

    #[test]
    fn names_of_a_program_not_loaded_are_left_to_it_and_others_are_unknown() {
        let read = |text: &str| {
            let table: toml::Table = text.parse().unwrap();
            Sources::new(table, "shared.toml", std::iter::empty())
                .read::<WebhookSettings>()
                .map(|_| ())
                .map_err(|e| e.to_string())
        };
        // Another program's names (and its typos) are that program's to check.
        assert_eq!(
            read(
                "smtp_url = 5
image_max_src_bytez = 1
beat_lease_ttl = 0"
            ),
            Ok(())
        );
        let err = read("webhook_secrt = \"x\"").unwrap_err();
        assert!(err.contains("did you mean `webhook_secret`"), "{err}");
        let err = read("webhook_allow_http = 1").unwrap_err();
        assert!(err.contains("`webhook_allow_http` = 1"), "{err}");
        let err = read("storage_ur = \"file://x\"").unwrap_err();
        assert!(
            err == "unknown setting `storage_ur` in shared.toml; did you mean `storage_url`?",
            "{err}"
        );
        // The environment never names unknown settings: other programs' variables are ignored.
        let s = Sources::new(
            toml::Table::new(),
            "test",
            [("MEDIAFARM_SMTP_URL".to_owned(), "nonsense".to_owned())],
        );
        assert!(s.read::<()>().is_ok());
    }

    #[test]
    fn declared_settings_list_their_docs_and_defaults() {
        let all = Settings::describe();
        assert_eq!(all.len(), Settings::NAMES.len());
        let shown = |name: &str| all.iter().find(|i| i.name == name).unwrap().default.clone();
        assert_eq!(
            shown("broker_url"),
            "\"amqp://guest:guest@127.0.0.1:5672//\""
        );
        assert_eq!(shown("result_expires"), "86400");
        assert_eq!(shown("accept_content"), "[\"json\"]");
        assert_eq!(shown("task_time_limit"), "(unset)");
        assert_eq!(shown("metrics_addr"), "\"127.0.0.1:9808\"");
        let doc = &all.iter().find(|i| i.name == "storage_url").unwrap().doc;
        assert!(
            doc.starts_with("Where workers store media") && !doc.contains('\n'),
            "{doc}"
        );
        assert_eq!(
            Settings::default()
                .lists()
                .iter()
                .map(|(n, _)| *n)
                .collect::<Vec<_>>(),
            [
                "accept_content",
                "source_allowed_hosts",
                "source_allowed_roots"
            ]
        );
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

//! snapshot-worker's settings, declared once (see `mediafarm::settings::declare`): capture
//! timeouts and the limits of `snapshot.watch` sessions. Read beside the core settings and the
//! webhook rules (`mediafarm::settings::WebhookSettings`, for frame deliveries) from the shared
//! settings file; names start with `snapshot_`.

use std::time::Duration;

use mediafarm::settings::kinds::*;
use mediafarm::settings::WebhookSettings;
use mediafarm::Settings;

use crate::watch::upload::{read_authorities, Authorities};

/// Everything snapshot-worker reads beside the core settings.
pub type SnapshotGroups = (SnapshotSettings, WebhookSettings);

mediafarm::settings_group! {
    /// The settings snapshot-worker reads beside the core and webhook ones.
    pub struct SnapshotSettings {
        owner = "snapshot-worker";
        prefixes = ["snapshot_"];
        /// The default `timeout_s` of `snapshot.capture` (open, read, decode).
        snapshot_capture_timeout: Duration = Duration::from_secs(15), SecondsOrDefault;
        /// Most `snapshot.watch` sessions one worker runs at once; the worker's concurrency
        /// defaults to this plus one per core (for captures).
        snapshot_max_sessions: usize = 100, Int(1, 100_000);
        /// A session hands itself on as a continuation message after this long, so no delivery
        /// stays unacknowledged near RabbitMQ's consumer_timeout.
        snapshot_session_slice: Duration = Duration::from_secs(600), SecondsOrDefault;
        /// Run `snapshot.watch` sessions on `rtmp://` sources on the RTMP engine (Tokio tasks
        /// sharing a few threads, H.264 only); false: one thread per session running FFmpeg's
        /// demuxer, as for the other kinds of source (other FLV codecs, comparisons).
        snapshot_rtmp_engine: bool = true, Bool;
        /// How long a session keeps reconnecting to a dropped stream (with backoff) before it
        /// ends with its summary.
        snapshot_reconnect_window: Duration = Duration::from_secs(60), SecondsOrDefault;
        /// Frame deliveries waiting per stream in its Redis outbox; a frame taken beyond that
        /// is not queued but recorded as a dead letter (`outbox_full`).
        snapshot_outbox_max: usize = 1000, Int(1, 1_000_000);
        /// How long after a frame was taken its delivery is still tried; then it becomes a
        /// dead letter (`deadline`) and the next frame's delivery goes on.
        snapshot_delivery_deadline: Duration = Duration::from_secs(3600), SecondsOrDefault;
        /// The longest pause between two tries of one delivery (from 1 s, doubling).
        snapshot_delivery_backoff_max: Duration = Duration::from_secs(30), SecondsOrDefault;
        /// Where the audit manifests go in storage (`<prefix>/<stream_id>/<YYYY-MM-DD>/`:
        /// `index.json` and hour parts `<HH>.jsonl`); unset: no manifests.
        snapshot_manifest_prefix: Option<String> = None, Str;
        /// How often each worker looks for outboxes that no running session sends (their
        /// stream's session ended with deliveries left, and none followed) and sends them
        /// under the usual rules; 0: never (leftovers then wait for the stream's next session).
        snapshot_outbox_sweep: Duration = Duration::from_secs(60), Seconds;
        /// The authorities frames may be uploaded to over mutual TLS, each as
        /// `[snapshot_authorities.<name>]` with `url` (`https://`, `{stream_id}`,
        /// `{session_id}`, `{seq}` filled in; each frame is PUT there), optional `ca_certs`,
        /// `certfile`, `keyfile` (PEM files, read at start-up) and `timeout_s` (30). A session
        /// names one as `authority`. In the environment: the same as a JSON object.
        snapshot_authorities: Authorities = Authorities::default(), Custom(read_authorities);
    }
}

/// Sessions are long-running jobs that each hold a job slot, so unless the concurrency is set
/// (`-c`, `worker_concurrency` in the file or the environment) it is `snapshot_max_sessions`
/// plus one slot per core for captures.
pub fn default_concurrency(_: &Settings, (snapshot, _): &SnapshotGroups) -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    snapshot.snapshot_max_sessions + cores
}

#[cfg(test)]
mod tests {
    use super::*;
    use mediafarm::settings::Sources;

    #[test]
    fn every_name_has_an_owned_prefix() {
        mediafarm::settings::sources::assert_prefixes_owned::<SnapshotSettings>();
    }

    #[test]
    fn the_example_settings_file_has_the_defaults() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../deploy/mediafarm.example.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        let (_, (snapshot, webhook)) = Sources::from_text(&path, &text, [])
            .unwrap()
            .read::<SnapshotGroups>()
            .unwrap();
        assert_eq!(snapshot, SnapshotSettings::default());
        assert_eq!(webhook, WebhookSettings::default());
    }

    #[test]
    fn a_wrong_value_from_the_environment_is_named() {
        let err = Sources::from_text(
            std::path::Path::new("t.toml"),
            "",
            [("MEDIAFARM_SNAPSHOT_MAX_SESSIONS".to_owned(), "0".to_owned())],
        )
        .unwrap()
        .read::<SnapshotGroups>()
        .unwrap_err()
        .to_string();
        assert_eq!(
            err,
            "setting `snapshot_max_sessions` = \"0\" (from the environment) is not accepted: \
             a whole number from 1 to 100000"
        );
    }
}

//! The outbox sweeper: delivers what a stream's outboxes still hold when no session of that
//! stream is running to do it.
//!
//! A session's courier sends its stream's outboxes, and a session that ends waits only
//! `DELIVERY_GRACE` for them; what is left used to wait for the stream's *next* session. A
//! stream that never gets one (a camera removed, a publisher gone for good) kept its leftovers
//! until they expired unsent and unrecorded. Every `snapshot_outbox_sweep` each worker scans
//! Redis for non-empty outboxes (`mediafarm-snapshot-outbox-*`,
//! `mediafarm-snapshot-upload-outbox-*`) and, for a stream that no session claims
//! (`mediafarm-snapshot-owner-<stream_id>` absent), takes a sweep lease
//! (`mediafarm-snapshot-sweep-<stream_id>`, `SET NX` with a TTL, so one worker sweeps a stream
//! at a time and a dead sweeper's lease lapses) and runs the same [`Courier`] a session runs
//! for each lane, for at most [`BUDGET`]: entries are sent head first, in order, tried again
//! until `snapshot_delivery_deadline`, then dead-lettered — the same rules as in a session,
//! so a stranded delivery ends delivered or as a dead letter with its reason, never expired
//! unseen.
//!
//! A session that starts on the stream while it is swept takes over ([`super::deliver::Role`]):
//! the sweeper's courier stops before its next entry or try once the session's claim exists,
//! and the session's courier waits until the sweeper has let the lease go, so the head in
//! flight is not sent a second time beside the sweeper. The lease is deleted when the sweep
//! ends (compared with its holder), and lapses if the sweeper dies.

use std::time::Duration;

use mediafarm::runtime::background::Background;
use mediafarm::{ResultBackend, TaskError};

use super::deliver::{Courier, Deliverer, Sender};
use super::outbox::{self, Lane, OUTBOX_PREFIX, SWEEP_PREFIX, UPLOAD_OUTBOX_PREFIX};
use super::state::OWNER_PREFIX;
use super::upload::Uploader;

/// How long one sweep of one stream may deliver before it leaves the rest to the next round.
pub const BUDGET: Duration = Duration::from_secs(30);
/// Streams swept at once by one worker.
const AT_ONCE: usize = 32;

/// What the sweeper sends with: the worker's webhook deliverer and authority uploader.
#[derive(Clone)]
pub struct Sweeper {
    pub(super) webhook: Deliverer,
    pub(super) upload: Uploader,
    /// `snapshot_outbox_sweep`.
    pub(super) every: Duration,
}

fn backend_error(e: impl std::fmt::Display) -> TaskError {
    TaskError::transient("BackendError", e.to_string())
}

/// The stream ids whose outbox of `lane` holds something (SCAN, so Redis is never blocked).
async fn stranded(backend: &ResultBackend, lane: Lane) -> Result<Vec<String>, TaskError> {
    let prefix = match lane {
        Lane::Webhook => OUTBOX_PREFIX,
        Lane::Upload => UPLOAD_OUTBOX_PREFIX,
    };
    let mut conn = backend.connection();
    let mut cursor: u64 = 0;
    let mut ids = Vec::new();
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{prefix}*"))
            .arg("COUNT")
            .arg(500)
            .query_async(&mut conn)
            .await
            .map_err(backend_error)?;
        ids.extend(
            keys.iter()
                .filter_map(|k| k.strip_prefix(prefix))
                .map(str::to_owned),
        );
        if next == 0 {
            return Ok(ids);
        }
        cursor = next;
    }
}

/// Takes the stream's sweep lease if no session claims the stream and no sweeper holds it.
async fn lease(backend: &ResultBackend, stream_id: &str, holder: &str) -> Result<bool, TaskError> {
    // Both checks in one step, so a session's claim between them cannot be missed.
    const LEASE_LUA: &str = r"
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
return 0
";
    let mut conn = backend.connection();
    redis::cmd("EVAL")
        .arg(LEASE_LUA)
        .arg(2)
        .arg(format!("{OWNER_PREFIX}{stream_id}"))
        .arg(format!("{SWEEP_PREFIX}{stream_id}"))
        .arg(holder)
        // Past the budget, so the lease outlives this sweep; then it lapses.
        .arg((BUDGET + Duration::from_secs(5)).as_millis() as u64)
        .query_async::<i64>(&mut conn)
        .await
        .map(|n| n == 1)
        .map_err(backend_error)
}

/// Lets the stream's sweep lease go, if this worker still holds it.
async fn unlease(backend: &ResultBackend, stream_id: &str, holder: &str) {
    const UNLEASE_LUA: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
";
    let mut conn = backend.connection();
    if let Err(e) = redis::cmd("EVAL")
        .arg(UNLEASE_LUA)
        .arg(1)
        .arg(format!("{SWEEP_PREFIX}{stream_id}"))
        .arg(holder)
        .query_async::<i64>(&mut conn)
        .await
    {
        // It lapses by itself; a session on the stream waits for that.
        tracing::warn!(%stream_id, error = %e, "cannot let the sweep lease go");
    }
}

impl Sweeper {
    /// Sweeps every `every` until the worker stops.
    pub async fn run(self, bg: Background) {
        tracing::info!(every = ?self.every, "outbox sweeper running");
        while bg.pause(self.every).await {
            if let Err(e) = self.round(&bg).await {
                tracing::warn!(error = %e, "outbox sweep failed; trying again next round");
            }
        }
    }

    /// One round: finds stranded outboxes and sends them, [`AT_ONCE`] streams at a time.
    async fn round(&self, bg: &Background) -> Result<(), TaskError> {
        let backend = bg.backend();
        let mut streams = stranded(backend, Lane::Webhook).await?;
        streams.extend(stranded(backend, Lane::Upload).await?);
        streams.sort();
        streams.dedup();
        let mut running = tokio::task::JoinSet::new();
        for stream_id in streams {
            if bg.is_stopping() {
                break;
            }
            if !lease(backend, &stream_id, bg.hostname()).await? {
                continue;
            }
            while running.len() >= AT_ONCE {
                running.join_next().await;
            }
            let (this, backend) = (self.clone(), backend.clone());
            let holder = bg.hostname().to_owned();
            running.spawn(async move {
                this.sweep(backend.clone(), stream_id.clone()).await;
                unlease(&backend, &stream_id, &holder).await;
            });
        }
        while running.join_next().await.is_some() {}
        Ok(())
    }

    /// Sends what both of `stream_id`'s outboxes hold, side by side, for at most [`BUDGET`].
    async fn sweep(&self, backend: ResultBackend, stream_id: String) {
        let start = |sender: Sender| {
            let backend = backend.clone();
            let stream_id = stream_id.clone();
            async move {
                match outbox::len(&backend, sender.lane(), &stream_id).await {
                    Ok(0) => {}
                    Ok(waiting) => {
                        let lane = sender.lane();
                        tracing::info!(%stream_id, ?lane, waiting, "sweeping an outbox no session sends");
                        let courier = Courier::sweep(sender, backend, &stream_id);
                        // Closing at once: it returns when the outbox is empty, when a
                        // session claims the stream, or at the budget.
                        let (failed, pending) = courier.finish(BUDGET).await;
                        tracing::info!(%stream_id, ?lane, failed, pending, "outbox swept");
                    }
                    Err(e) => tracing::warn!(%stream_id, error = %e, "cannot count an outbox"),
                }
            }
        };
        tokio::join!(
            start(Sender::Webhook(self.webhook.clone())),
            start(Sender::Upload(self.upload.clone())),
        );
    }
}

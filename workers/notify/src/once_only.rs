//! Send once per idempotency key. Before a send the task claims
//! `mediafarm-once-<task>:<idempotency_key>:<recipients digest>` in Redis (a lease); after it,
//! the claim is replaced by the send's result, so a redelivered or repeated job with the same
//! key returns that stored result and sends nothing.
//!
//! The crash window: a worker that dies after the provider accepted the message but before the
//! result was recorded (a few milliseconds) leaves only the lease. Redeliveries wait while the
//! lease lasts (`SendInProgress`, retried later) and, once it has run out, send again: in that
//! window delivery is at-least-once. The repeat carries the same Message-ID (email) or
//! `X-Mediafarm-Id` (webhook), so receivers can drop it; Twilio has no such key.

use std::future::Future;
use std::time::Duration;

use mediafarm::backend::once::Claim;
use mediafarm::{TaskContext, TaskError};
use serde_json::Value;
use sha2::{Digest, Sha256};

/// The Redis key (after the runtime's prefix) of one message: its task, its idempotency key
/// (default: the job id) and a digest of its recipients, so a key reused for other recipients
/// sends to them.
pub fn once_key(ctx: &TaskContext, idempotency_key: Option<&str>, recipients: &[&str]) -> String {
    let key = idempotency_key.unwrap_or(&ctx.id);
    let mut sorted: Vec<&str> = recipients.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let digest = Sha256::digest(sorted.join("\n").as_bytes());
    format!("{}:{key}:{}", ctx.task, &hex::encode(digest)[..16])
}

/// Runs `send` unless a send under `key` already happened (then returns its stored result) or
/// is under way elsewhere (then a transient `SendInProgress`, retried after the lease).
pub async fn send_once<F, Fut>(
    ctx: &TaskContext,
    key: &str,
    lease: Duration,
    send: F,
) -> Result<Value, TaskError>
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = Result<Value, TaskError>>,
{
    match ctx.once(key, lease).await? {
        Claim::Done(output) => {
            tracing::info!(job = %ctx.id, key, "already sent under this idempotency key; returning the stored result");
            Ok(output)
        }
        Claim::Busy { retry_in } => Err(TaskError::transient(
            "SendInProgress",
            format!(
                "another attempt is sending under idempotency key {key:?} (or died while \
                 sending); trying again in {:.1} s",
                retry_in.as_secs_f64()
            ),
        )
        .retry_after(retry_in)),
        Claim::Run(guard) => match send().await {
            Ok(output) => {
                pause_for_fault_tests("MEDIAFARM_NOTIFY_PAUSE_BEFORE_RECORD_MS").await;
                match guard.complete(&output).await {
                    Ok(true) => {}
                    Ok(false) => tracing::warn!(
                        job = %ctx.id, key,
                        "the send outlasted its lease; another attempt may have sent too"
                    ),
                    Err(e) => tracing::warn!(
                        job = %ctx.id, key, error = %e,
                        "sent, but recording it failed; a redelivery after the lease would send again"
                    ),
                }
                pause_for_fault_tests("MEDIAFARM_NOTIFY_PAUSE_AFTER_SEND_MS").await;
                Ok(output)
            }
            Err(error) => {
                // Nothing was accepted (or it is unknown): let a retry claim the key at once.
                if let Err(e) = guard.release().await {
                    tracing::warn!(job = %ctx.id, key, error = %e, "could not release the send claim");
                }
                Err(error)
            }
        },
    }
}

/// Fault injection for the crash tests, in debug builds only, so a test can kill the worker
/// in a chosen gap: `MEDIAFARM_NOTIFY_PAUSE_BEFORE_RECORD_MS` waits between the provider's
/// acceptance and recording it (the crash window), `MEDIAFARM_NOTIFY_PAUSE_AFTER_SEND_MS`
/// between recording it and storing the result and acknowledging.
async fn pause_for_fault_tests(variable: &str) {
    #[cfg(debug_assertions)]
    if let Some(ms) = std::env::var(variable)
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        tracing::warn!(ms, variable, "pausing for a fault test");
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    #[cfg(not(debug_assertions))]
    let _ = variable;
}

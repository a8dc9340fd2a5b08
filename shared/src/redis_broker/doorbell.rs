//! Waking an idle consumer when a message lands, instead of at its next poll. Taking a message
//! is a script ([`super::scripts::FETCH`]), which cannot block, so an idle worker polls; the
//! doorbell makes the wait between two polls end early. It blocks on each queue's main list
//! with `BLMOVE list list RIGHT RIGHT`: moving a list's last element to its own end is a no-op,
//! so nothing is taken, but the command blocks while the list is empty and returns as soon as
//! a producer pushes. Every blocked worker is woken (Redis serves the next blocked client while
//! the list is still not empty), and whichever takes the message first takes it.
//!
//! The doorbell only shortens a wait: after a failure (a Redis older than 6.2 without `BLMOVE`,
//! a lost connection, a master demoted by a failover) the consumer waits out its poll intervals
//! as before, and the doorbell's connections are opened again [`RETRY_AFTER`] later. Messages
//! sent with a priority other than the lowest (their own lists) and delayed ones wait for the
//! poll.

use std::time::Duration;

use redis::aio::MultiplexedConnection;

use super::{RedisBroker, RedisBrokerError};

/// After a failure, how long the doorbell is left unused (plain polling) before it is tried
/// again, so that a Redis without `BLMOVE` is not sent a new connection at every poll.
const RETRY_AFTER: Duration = Duration::from_secs(30);

/// One blocking connection per queue being watched, opened on first use.
#[derive(Default)]
pub struct Doorbell {
    lines: Vec<(String, MultiplexedConnection)>,
    unused_until: Option<tokio::time::Instant>,
    warned: bool,
}

impl Doorbell {
    /// Waits until one of `queues`' main lists holds a message, or `wait` has passed. Returns
    /// `true` when rung. On an error, sleeps out the rest of `wait`.
    pub async fn wait(&mut self, broker: &RedisBroker, queues: &[String], wait: Duration) -> bool {
        let started = tokio::time::Instant::now();
        if self.unused_until.is_some_and(|t| started < t) {
            tokio::time::sleep(wait).await;
            return false;
        }
        match self.ring(broker, queues, wait).await {
            Ok(rung) => rung,
            Err(e) => {
                if !self.warned {
                    self.warned = true;
                    tracing::info!(error = %e, retry_in = ?RETRY_AFTER, "cannot wait for messages with BLMOVE; polling meanwhile");
                }
                self.lines.clear();
                self.unused_until = Some(started + RETRY_AFTER);
                tokio::time::sleep_until(started + wait).await;
                false
            }
        }
    }

    async fn ring(
        &mut self,
        broker: &RedisBroker,
        queues: &[String],
        wait: Duration,
    ) -> Result<bool, RedisBrokerError> {
        let keys: Vec<String> = queues.iter().map(|q| broker.list_key(q, 0)).collect();
        if keys.is_empty() {
            tokio::time::sleep(wait).await;
            return Ok(false);
        }
        self.lines.retain(|(key, _)| keys.contains(key));
        for key in &keys {
            if !self.lines.iter().any(|(k, _)| k == key) {
                let conn = broker.blocking_connection(wait).await?;
                self.lines.push((key.clone(), conn));
            }
        }
        // BLMOVE's 0 waits forever: at least a millisecond.
        let seconds = format!("{:.3}", wait.as_secs_f64().max(0.001));
        let waits = self.lines.iter_mut().map(|(key, conn)| {
            let seconds = seconds.clone();
            Box::pin(async move {
                let got: Option<Vec<u8>> = redis::cmd("BLMOVE")
                    .arg(&*key)
                    .arg(&*key)
                    .arg("RIGHT")
                    .arg("RIGHT")
                    .arg(seconds)
                    .query_async(conn)
                    .await?;
                Ok::<bool, RedisBrokerError>(got.is_some())
            })
        });
        // The first to answer decides; a line still blocked answers by its own timeout (at
        // most `wait`) before its next command.
        let (first, _, _) = futures_util::future::select_all(waits).await;
        first
    }
}

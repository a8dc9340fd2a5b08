//! What `mediafarm beat` answers on `/healthz` and `/readyz`: alive while its scheduler loop
//! keeps going round (a loop stuck in a publish or a Redis call for a few lease TTLs is not),
//! ready while Redis and RabbitMQ answer. Followers are ready too: they must be able to take
//! over at once.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use redis::aio::ConnectionManager;
use std::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::beat::metrics::BeatMetrics;
use crate::observe::http::Probe;
use crate::settings::Settings;

/// How often Redis and RabbitMQ are checked, and how long a check may take.
const CHECK_EVERY: Duration = Duration::from_secs(2);

/// The state behind a beat's endpoints; cheap to clone.
#[derive(Clone)]
pub struct BeatProbe {
    metrics: BeatMetrics,
    started: Instant,
    /// Milliseconds after `started` of the scheduler loop's last turn.
    last_turn_ms: Arc<AtomicU64>,
    /// How long the loop may go without a turn before the beat counts as stuck.
    stuck_after: Duration,
    redis: Arc<AtomicBool>,
    broker: Arc<AtomicBool>,
}

impl BeatProbe {
    /// `stuck_after`: a few lease TTLs (the loop turns at least once per TTL).
    pub fn new(metrics: BeatMetrics, stuck_after: Duration) -> BeatProbe {
        BeatProbe {
            metrics,
            started: Instant::now(),
            last_turn_ms: Arc::default(),
            stuck_after,
            redis: Arc::default(),
            broker: Arc::default(),
        }
    }

    /// Records a turn of the scheduler loop.
    pub fn turned(&self) {
        let ms = self.started.elapsed().as_millis() as u64;
        self.last_turn_ms.store(ms, Ordering::Relaxed);
    }

    /// Why the beat is stuck at `now`, if it is.
    fn stuck_at(&self, now: Instant) -> Option<String> {
        let last = Duration::from_millis(self.last_turn_ms.load(Ordering::Relaxed));
        let since = now
            .saturating_duration_since(self.started)
            .saturating_sub(last);
        (since > self.stuck_after).then(|| {
            format!(
                "the scheduler loop has not turned for {:.1} s (limit {:.1} s): stuck in a \
                 publish or a Redis call",
                since.as_secs_f64(),
                self.stuck_after.as_secs_f64()
            )
        })
    }

    /// Checks Redis and RabbitMQ every `CHECK_EVERY` until `stop`. RabbitMQ is checked on a
    /// connection of its own, kept open, so the check costs one connection per beat, not one
    /// per probe.
    pub async fn watch_connections(
        self,
        settings: Settings,
        mut redis: ConnectionManager,
        stop: CancellationToken,
    ) {
        let mut amqp: Option<lapin::Connection> = None;
        loop {
            let ping_cmd = redis::cmd("PING");
            let ping = ping_cmd.query_async::<String>(&mut redis);
            let redis_ok = matches!(tokio::time::timeout(CHECK_EVERY, ping).await, Ok(Ok(_)));
            self.redis.store(redis_ok, Ordering::Relaxed);
            if !amqp.as_ref().is_some_and(|c| c.status().connected()) {
                amqp = match crate::amqp::broker::connect(&settings, "mediafarm beat (readiness)")
                    .await
                {
                    Ok(c) => Some(c),
                    Err(e) => {
                        tracing::debug!(error = %e, "readiness: RabbitMQ not reachable");
                        None
                    }
                };
            }
            self.broker.store(amqp.is_some(), Ordering::Relaxed);
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep(CHECK_EVERY) => {}
            }
        }
        if let Some(c) = amqp {
            crate::amqp::broker::close_quietly(&c, &[], "beat stopping").await;
        }
    }
}

impl Probe for BeatProbe {
    fn metrics(&self) -> String {
        self.metrics.render()
    }

    fn unhealthy(&self) -> Option<String> {
        self.stuck_at(Instant::now())
    }

    fn not_ready(&self) -> Option<String> {
        let mut missing = Vec::new();
        if !self.redis.load(Ordering::Relaxed) {
            missing.push("Redis not reachable");
        }
        if !self.broker.load(Ordering::Relaxed) {
            missing.push("broker (RabbitMQ) not reachable");
        }
        (!missing.is_empty()).then(|| missing.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_loop_that_stops_turning_is_unhealthy() {
        let probe = BeatProbe::new(BeatMetrics::new(), Duration::from_secs(30));
        let start = probe.started;
        // Turned at about `start`: fine for 30 s, stuck after.
        assert_eq!(probe.stuck_at(start + Duration::from_secs(29)), None);
        let why = probe
            .stuck_at(start + Duration::from_secs(31))
            .expect("stuck");
        assert!(
            why.contains("has not turned for 31.0 s (limit 30.0 s)"),
            "{why}"
        );
        probe.last_turn_ms.store(20_000, Ordering::Relaxed);
        assert_eq!(probe.stuck_at(start + Duration::from_secs(31)), None);
    }

    #[test]
    fn not_ready_until_both_answer() {
        let probe = BeatProbe::new(BeatMetrics::new(), Duration::from_secs(30));
        assert_eq!(
            probe.not_ready().as_deref(),
            Some("Redis not reachable; broker (RabbitMQ) not reachable")
        );
        probe.redis.store(true, Ordering::Relaxed);
        assert_eq!(
            probe.not_ready().as_deref(),
            Some("broker (RabbitMQ) not reachable")
        );
        probe.broker.store(true, Ordering::Relaxed);
        assert_eq!(probe.not_ready(), None);
    }
}

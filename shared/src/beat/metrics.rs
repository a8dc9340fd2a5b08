//! Prometheus metrics of `mediafarm beat`. Counters carry no per-entry label: a schedule can
//! hold thousands of entries, and a series per entry would swamp the scrape; the log names the
//! entry of every published and missed tick instead.

use std::sync::Arc;

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Why ticks were not published; a closed set, so the label stays bounded.
#[derive(Clone, Copy, Debug)]
pub enum Miss {
    /// Due while no beat was leading, older than the catch-up window.
    NoLeader,
    /// Claimed by a beat that never confirmed its publish (it stopped or lost the broker).
    Unconfirmed,
    /// The broker refused or dropped the publish of a claimed tick.
    PublishFailed,
}

impl Miss {
    const ALL: [Miss; 3] = [Miss::NoLeader, Miss::Unconfirmed, Miss::PublishFailed];

    fn label(self) -> &'static str {
        match self {
            Miss::NoLeader => "no_leader",
            Miss::Unconfirmed => "unconfirmed",
            Miss::PublishFailed => "publish_failed",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MissLabels {
    reason: String,
}

/// Every metric a beat exports; cheap to clone.
#[derive(Clone)]
pub struct BeatMetrics {
    registry: Arc<Registry>,
    /// 1 while this beat holds the leader lease.
    pub leader: Gauge,
    /// Entries this beat schedules (settings and Redis), as last read.
    pub entries: Gauge,
    /// Ticks published and confirmed by the broker.
    pub published: Counter,
    /// Times this beat acquired the leader lease.
    pub lease_acquisitions: Counter,
    missed: Family<MissLabels, Counter>,
}

impl Default for BeatMetrics {
    fn default() -> Self {
        BeatMetrics::new()
    }
}

impl BeatMetrics {
    pub fn new() -> BeatMetrics {
        let mut registry = Registry::default();
        let leader = Gauge::default();
        registry.register(
            "mediafarm_beat_leader",
            "1 while this beat holds the leader lease",
            leader.clone(),
        );
        let entries = Gauge::default();
        registry.register(
            "mediafarm_beat_entries",
            "Schedule entries (settings and Redis) as last read",
            entries.clone(),
        );
        let published = Counter::default();
        registry.register(
            "mediafarm_beat_ticks_published",
            "Ticks published and confirmed by the broker",
            published.clone(),
        );
        let missed = Family::<MissLabels, Counter>::default();
        registry.register(
            "mediafarm_beat_ticks_missed",
            "Ticks not published, by reason",
            missed.clone(),
        );
        let lease_acquisitions = Counter::default();
        registry.register(
            "mediafarm_beat_lease_acquisitions",
            "Times this beat acquired the leader lease",
            lease_acquisitions.clone(),
        );
        let metrics = BeatMetrics {
            registry: Arc::new(registry),
            leader,
            entries,
            published,
            lease_acquisitions,
            missed,
        };
        // Every reason shows at 0 from the start, so alerts on increase() see the first miss.
        for reason in Miss::ALL {
            metrics.missed_series(reason);
        }
        metrics
    }

    fn missed_series(&self, reason: Miss) -> Counter {
        self.missed
            .get_or_create(&MissLabels {
                reason: reason.label().into(),
            })
            .clone()
    }

    /// Counts `n` ticks missed for `reason`.
    pub fn missed(&self, reason: Miss, n: u64) {
        self.missed_series(reason).inc_by(n);
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_metric_with_bounded_labels() {
        let m = BeatMetrics::new();
        m.leader.set(1);
        m.entries.set(3);
        m.published.inc_by(5);
        m.lease_acquisitions.inc();
        m.missed(Miss::NoLeader, 4);
        let text = m.render();
        for line in [
            "mediafarm_beat_leader 1",
            "mediafarm_beat_entries 3",
            "mediafarm_beat_ticks_published_total 5",
            "mediafarm_beat_lease_acquisitions_total 1",
            r#"mediafarm_beat_ticks_missed_total{reason="no_leader"} 4"#,
            r#"mediafarm_beat_ticks_missed_total{reason="unconfirmed"} 0"#,
            r#"mediafarm_beat_ticks_missed_total{reason="publish_failed"} 0"#,
        ] {
            assert!(text.lines().any(|l| l == line), "{line} not in\n{text}");
        }
    }
}

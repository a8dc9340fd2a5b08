//! How late each frame is against its tick's due time, at every stage of its way: the keyframe
//! read from the socket, decoded and encoded, stored, recorded with its delivery queued, and
//! delivered (the receiver's 2xx). Read off the worker's `/metrics` as
//! `mediafarm_snapshot_frame_late_seconds{stage="read"|"decoding"|"encoded"|"stored"|"queued"|"delivered"|"uploaded"}`
//! (a histogram; a stage's figure counts everything before it), and per frame as `due_at` in
//! the frame's record and its webhook body.
//!
//! **The due time.** A tick is due in stream time (`Schedule`); on a live connection the
//! worker turns that into wall-clock time with the connection's [`StreamClock`]: the smallest
//! `arrival − stream time` of every video message the connection read, i.e. the moment the
//! tick's stream time was live as the server delivered it at its promptest. So `read` holds the
//! engine's own delay (read batching, a busy runtime), not the network's; a clock that got
//! ahead of the wall (a publisher's burst) makes frames look later, never earlier. Only the RTMP
//! engine knows due times; frames of the thread path carry none and are not counted.

use std::sync::atomic::AtomicU64;
use std::sync::OnceLock;

use mediafarm::observe::metrics::Metrics;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;

/// Where a frame is on its way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Its keyframe was read from the socket and chosen for the tick.
    Read,
    /// Its decode began: it had its turn in the decode queue and a thread ran it.
    Decoding,
    /// Decoded and encoded.
    Encoded,
    /// Written to storage.
    Stored,
    /// Recorded with its delivery queued in the stream's outbox.
    Queued,
    /// The webhook answered 2xx.
    Delivered,
    /// The authority answered 2xx.
    Uploaded,
}

impl Stage {
    pub fn label(self) -> &'static str {
        match self {
            Stage::Read => "read",
            Stage::Decoding => "decoding",
            Stage::Encoded => "encoded",
            Stage::Stored => "stored",
            Stage::Queued => "queued",
            Stage::Delivered => "delivered",
            Stage::Uploaded => "uploaded",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StageLabels {
    stage: &'static str,
}

/// Lateness buckets in seconds: the 1 s target in the middle.
const BUCKETS: [f64; 14] = [
    0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0,
];

fn histogram() -> Histogram {
    Histogram::new(BUCKETS)
}

type Late = Family<StageLabels, Histogram, fn() -> Histogram>;

fn late() -> &'static Late {
    static LATE: OnceLock<Late> = OnceLock::new();
    LATE.get_or_init(|| Late::new_with_constructor(histogram as fn() -> Histogram))
}

/// The metric's name in `/metrics`.
pub const METRIC: &str = "mediafarm_snapshot_frame_late_seconds";

/// The decodes' time by clock (`_total{clock="cpu"|"wall"}`): a wall time well above the CPU
/// time means the decoding thread waited for a core (other threads had it), not that decoding
/// got dearer.
pub const DECODE_METRIC: &str = "mediafarm_snapshot_decode_seconds";
/// How many keyframes were decoded and encoded (`_total`).
pub const DECODES_METRIC: &str = "mediafarm_snapshot_decodes";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClockLabels {
    clock: &'static str,
}

type Seconds = Family<ClockLabels, Counter<f64, AtomicU64>>;

fn decode_seconds() -> &'static Seconds {
    static SECONDS: OnceLock<Seconds> = OnceLock::new();
    SECONDS.get_or_init(Seconds::default)
}

fn decodes() -> &'static Counter {
    static DECODES: OnceLock<Counter> = OnceLock::new();
    DECODES.get_or_init(Counter::default)
}

/// Adds the lateness histogram and the decode clocks to the worker's metrics (once per
/// worker start).
pub fn register(metrics: &Metrics) {
    metrics.register(
        METRIC,
        "How late a frame was at each stage against its tick's due time (RTMP engine)",
        late().clone(),
    );
    metrics.register(
        DECODE_METRIC,
        "Time the RTMP engine's keyframe decodes and encodes took, by clock (cpu: the decoding thread's)",
        decode_seconds().clone(),
    );
    metrics.register(
        DECODES_METRIC,
        "Keyframes the RTMP engine decoded and encoded",
        decodes().clone(),
    );
}

/// Records one keyframe's decode and encode: `cpu` seconds of its thread's CPU time over `wall`
/// seconds.
pub fn record_decode(cpu: f64, wall: f64) {
    let add = |clock, s: f64| {
        decode_seconds()
            .get_or_create(&ClockLabels { clock })
            .inc_by(s.max(0.0));
    };
    add("cpu", cpu);
    add("wall", wall);
    decodes().inc();
}

/// The calling thread's CPU time (seconds), to time a piece of work on it.
pub fn thread_cpu_s() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid clock id and a timespec to write into.
    let ok = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) } == 0;
    if ok {
        ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
    } else {
        0.0
    }
}

/// Records that a frame due at `due_at` (unix seconds) reached `stage` at `at`. Early is 0.
pub fn record(stage: Stage, due_at: Option<f64>, at: f64) {
    let Some(due) = due_at else { return };
    let late_s = (at - due).max(0.0);
    late()
        .get_or_create(&StageLabels {
            stage: stage.label(),
        })
        .observe(late_s);
    tracing::trace!(stage = stage.label(), late_s, "frame stage");
}

/// A live connection's stream time against the wall clock (see the module doc).
#[derive(Debug, Default, Clone, Copy)]
pub struct StreamClock {
    offset: Option<f64>,
}

impl StreamClock {
    /// A message at stream time `t` was read at unix time `now`.
    pub fn observe(&mut self, t: f64, now: f64) {
        let o = now - t;
        if o.is_finite() && self.offset.is_none_or(|best| o < best) {
            self.offset = Some(o);
        }
    }

    /// The unix time of stream time `t`, once anything was read.
    pub fn wall(&self, t: f64) -> Option<f64> {
        self.offset.map(|o| o + t).filter(|w| w.is_finite())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_clock_keeps_the_promptest_arrival() {
        let mut c = StreamClock::default();
        assert_eq!(c.wall(10.0), None);
        // Read 0.3 s after stream time 1.0 went live at wall 1000.0, then a prompt read.
        c.observe(1.0, 1000.3);
        c.observe(2.0, 1001.05);
        // A late (batched) read changes nothing.
        c.observe(3.0, 1002.9);
        assert_eq!(c.wall(20.0), Some(1019.05));
    }

    #[test]
    fn lateness_is_counted_per_stage_and_only_with_a_due_time() {
        let stage = |s: Stage| {
            late()
                .get_or_create(&StageLabels { stage: s.label() })
                .clone()
        };
        let before = render_count(&stage(Stage::Uploaded));
        record(Stage::Uploaded, Some(100.0), 100.4);
        record(Stage::Uploaded, None, 100.4);
        assert_eq!(render_count(&stage(Stage::Uploaded)), before + 1);
    }

    fn render_count(h: &Histogram) -> u64 {
        let mut reg = prometheus_client::registry::Registry::default();
        reg.register("h", "h", h.clone());
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &reg).unwrap_or_default();
        out.lines()
            .find_map(|l| l.strip_prefix("h_count "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    }
}

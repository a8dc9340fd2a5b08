//! Rates written as Celery writes them (`"100/m"`, `"10/s"`, `"1000/h"`, a bare number per
//! second), parsed once here for every reader: [`TaskRate`] is Celery's task `rate_limit`
//! (any count, `0` or nothing for none; the worker runtime spaces a task's jobs by it, see
//! `runtime::rate`), and [`RateLimit`] a whole-count send rate (notify's cluster-wide
//! provider limits). They live with the settings because settings are where both are read;
//! the runtime, which sits above the settings, takes them from here.

use std::time::Duration;

/// The grammar of Celery's `celery.utils.time.rate()`: `<count>[/<s|m|h>]`, the count a
/// decimal number, no unit meaning per second. `None`: not written that way.
fn split(text: &str) -> Option<(f64, Duration)> {
    let (count, unit) = text.trim().split_once('/').unwrap_or((text, "s"));
    let per = match unit.trim() {
        "s" | "" => Duration::from_secs(1),
        "m" => Duration::from_secs(60),
        "h" => Duration::from_secs(3600),
        _ => return None,
    };
    let count: f64 = count.trim().parse().ok()?;
    (count.is_finite() && count >= 0.0).then_some((count, per))
}

/// What a rate may look like, for error messages.
pub const RATE_FORMS: &str = "a count per second, minute or hour such as \"100/m\", \"10/s\", \
    \"0.5/s\" or \"1000/h\" (a bare number is per second; 0 or nothing: no limit)";

/// A task's `rate_limit` as Celery reads it: at most `count` jobs per `per`, spaced evenly
/// (Celery's token bucket of capacity 1). The text is kept as written, for replies that show it.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskRate {
    text: String,
    /// The time between two jobs' starts.
    interval: Duration,
}

/// A rate that is not written as Celery writes one.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{text:?} is not a rate: expected {RATE_FORMS}")]
pub struct RateParseError {
    pub text: String,
}

impl TaskRate {
    /// Parses a rate as Celery's `rate()` does: `Ok(None)` for no limit (empty, `"0"`,
    /// `"0/m"`), an error for anything that is not a rate (a negative count included, which
    /// Celery would take and then misbehave on).
    pub fn parse(text: &str) -> Result<Option<TaskRate>, RateParseError> {
        if text.trim().is_empty() {
            return Ok(None);
        }
        let bad = || RateParseError {
            text: text.to_owned(),
        };
        let (count, per) = split(text).ok_or_else(bad)?;
        if count == 0.0 {
            return Ok(None);
        }
        let interval = Duration::try_from_secs_f64(per.as_secs_f64() / count).map_err(|_| bad())?;
        Ok(Some(TaskRate {
            text: text.trim().to_owned(),
            interval,
        }))
    }

    /// A per-second rate given as a number (Celery accepts `rate_limit=10`).
    pub fn per_second(count: f64) -> Result<Option<TaskRate>, RateParseError> {
        TaskRate::parse(&count.to_string())
    }

    /// The time between two jobs' starts (`"5/s"`: 200 ms).
    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// The rate as it was written.
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl std::fmt::Display for TaskRate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

/// A cluster-wide send rate: `count` per `per` (Celery's `"10/s"`, `"100/m"`, `"1000/h"`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    pub count: u32,
    pub per: Duration,
}

impl RateLimit {
    /// Parses `"10/s"`, `"100/m"`, `"1000/h"` or a bare number (per second), as Celery does;
    /// the count must be a whole number above 0.
    pub fn parse(text: &str) -> Option<RateLimit> {
        let (count, per) = split(text)?;
        let whole = count.fract() == 0.0 && count >= 1.0 && count <= f64::from(u32::MAX);
        whole.then_some(RateLimit {
            count: count as u32,
            per,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn interval(text: &str) -> Option<Duration> {
        TaskRate::parse(text).unwrap().map(|r| r.interval())
    }

    #[test]
    fn task_rates_read_as_celerys_rate_reads_them() {
        assert_eq!(interval("10/s"), Some(Duration::from_millis(100)));
        assert_eq!(interval("100/m"), Some(Duration::from_millis(600)));
        assert_eq!(interval("1000/h"), Some(Duration::from_millis(3600)));
        assert_eq!(interval("2"), Some(Duration::from_millis(500)));
        assert_eq!(interval("0.5/s"), Some(Duration::from_secs(2)));
        assert_eq!(interval(" 5 / m "), Some(Duration::from_secs(12)));
        assert_eq!(interval("5/"), Some(Duration::from_millis(200)));
        assert_eq!(
            TaskRate::parse("100/m").unwrap().unwrap().to_string(),
            "100/m"
        );
        assert_eq!(
            TaskRate::per_second(4.0).unwrap().map(|r| r.interval()),
            Some(Duration::from_millis(250))
        );
        // No limit, as Celery's rate() returns 0 for these.
        for none in ["", "  ", "0", "0/m", "0.0/h"] {
            assert_eq!(TaskRate::parse(none), Ok(None), "{none:?}");
        }
        for bad in [
            "abc", "10/d", "10/sec", "-1/s", "nan", "inf/s", "1/s/s", "/s",
        ] {
            let err = TaskRate::parse(bad).unwrap_err();
            assert_eq!(err.text, bad);
            assert!(err.to_string().contains("\"100/m\""), "{err}");
        }
    }

    #[test]
    fn send_rates_take_whole_counts_only() {
        assert_eq!(
            RateLimit::parse("50/m"),
            Some(RateLimit {
                count: 50,
                per: Duration::from_secs(60)
            })
        );
        assert_eq!(RateLimit::parse("3").map(|r| r.count), Some(3));
        for bad in ["0", "0.5/s", "-2/s", "x/s", "5/d", ""] {
            assert_eq!(RateLimit::parse(bad), None, "{bad:?}");
        }
    }
}

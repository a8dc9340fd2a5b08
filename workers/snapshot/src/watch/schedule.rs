//! When each tick is due, in stream time. Tick k of a connection is due at `due_0 + k·interval`
//! and takes the first keyframe at or after it, so frames land `interval` apart within one GOP.
//! After a reconnect or a resume the first due time continues the last tick: in stream time when
//! the new connection is on the same clock (HLS, a file), else in wall time.

/// The last tick taken: its stream time and when (unix seconds) it was taken.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LastTick {
    pub pts_s: f64,
    pub wall_s: f64,
}

#[derive(Debug, Clone)]
pub struct Schedule {
    interval: f64,
    next_due: Option<f64>,
    last: Option<LastTick>,
    newest: Option<f64>,
}

impl Schedule {
    pub fn new(interval: f64, last: Option<LastTick>) -> Schedule {
        Schedule {
            interval,
            next_due: None,
            last,
            newest: None,
        }
    }

    /// A new connection: the next keyframe decides the first due time.
    pub fn reconnected(&mut self) {
        self.next_due = None;
    }

    /// How far a new connection's clock may sit from the last tick and still be the same clock.
    fn same_clock_window(&self) -> f64 {
        (2.0 * self.interval).max(30.0)
    }

    /// Whether a keyframe at stream time `t`, seen at unix time `now`, is taken for a tick.
    pub fn is_due(&mut self, t: f64, now: f64) -> bool {
        if self.next_due.is_none() {
            self.next_due = Some(self.first_due(t, now));
        }
        let due = self.next_due.unwrap_or(t);
        // A millisecond of slack for timestamps rounded by the container.
        t + 0.001 >= due
    }

    fn first_due(&self, t: f64, now: f64) -> f64 {
        let Some(last) = self.last else {
            return t;
        };
        let since = (now - last.wall_s).max(0.0);
        let window = self.same_clock_window();
        if t > last.pts_s - window && t < last.pts_s + since + window {
            last.pts_s + self.interval
        } else {
            t + (self.interval - since).max(0.0)
        }
    }

    /// The keyframe at `t` was taken at unix time `now`.
    pub fn taken(&mut self, t: f64, now: f64) {
        self.last = Some(LastTick {
            pts_s: t,
            wall_s: now,
        });
        let due = self.next_due.unwrap_or(t) + self.interval;
        self.next_due = Some(next_after(due, t, self.interval));
    }

    /// Records a packet time; true when it is new (the stream made progress), counting a
    /// clock that jumped far back as a new stream.
    pub fn progressed(&mut self, t: f64) -> bool {
        let window = self.same_clock_window();
        match self.newest {
            Some(n) if t <= n && t > n - window => false,
            _ => {
                self.newest = Some(t);
                true
            }
        }
    }

    /// The stream time the next tick is due at, once this connection's first keyframe set it.
    pub fn due(&self) -> Option<f64> {
        self.next_due
    }

    pub fn last(&self) -> Option<LastTick> {
        self.last
    }

    /// Where a file should be sought to on resume: just before the next due tick.
    pub fn resume_point(&self) -> Option<f64> {
        self.last
            .map(|l| (l.pts_s + self.interval - 0.001).max(0.0))
    }
}

/// The first of `due`, `due + interval`, `due + 2 interval`, … that is after `t`, computed
/// rather than stepped: timestamps come from the stream, and a wild one (1e18 s, where adding
/// 20 s changes nothing in an f64) must not loop forever.
fn next_after(due: f64, t: f64, interval: f64) -> f64 {
    if due > t || !(t.is_finite() && due.is_finite() && interval > 0.0) {
        return due;
    }
    let steps = ((t - due) / interval).floor() + 1.0;
    let next = due + steps * interval;
    if next > t {
        next
    } else {
        // Past f64's precision at this magnitude: the next representable time after `t`.
        t + interval.max(t.abs() * f64::EPSILON)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Keyframes every `gop` seconds from `from` to `to`: which are taken.
    fn run(s: &mut Schedule, from: f64, to: f64, gop: f64, wall0: f64) -> Vec<f64> {
        let mut taken = Vec::new();
        let mut t = from;
        while t < to {
            let now = wall0 + (t - from);
            if s.is_due(t, now) {
                s.taken(t, now);
                taken.push(t);
            }
            t += gop;
        }
        taken
    }

    #[test]
    fn ticks_are_interval_apart_within_a_gop() {
        let mut s = Schedule::new(20.0, None);
        let taken = run(&mut s, 0.0, 120.0, 2.0, 1000.0);
        assert_eq!(taken, vec![0.0, 20.0, 40.0, 60.0, 80.0, 100.0]);
        let mut s = Schedule::new(5.0, None);
        let taken = run(&mut s, 0.3, 30.0, 1.5, 1000.0);
        for pair in taken.windows(2) {
            let gap = pair[1] - pair[0];
            assert!(gap > 5.0 - 1.5 && gap < 5.0 + 1.5, "{taken:?}");
        }
    }

    #[test]
    fn a_resume_on_the_same_clock_continues_in_stream_time() {
        let last = LastTick {
            pts_s: 40.0,
            wall_s: 1000.0,
        };
        // HLS starts a few segments back: frames before 60 s are not taken again.
        let mut s = Schedule::new(20.0, Some(last));
        let taken = run(&mut s, 34.0, 70.0, 2.0, 1003.0);
        assert_eq!(taken, vec![60.0]);
    }

    #[test]
    fn a_resume_on_a_new_clock_continues_in_wall_time() {
        let last = LastTick {
            pts_s: 5000.0,
            wall_s: 1000.0,
        };
        // The stream restarted at 0; 8 s of the interval went by while reconnecting.
        let mut s = Schedule::new(20.0, Some(last));
        let taken = run(&mut s, 0.0, 40.0, 2.0, 1008.0);
        assert_eq!(taken, vec![12.0, 32.0]);
    }

    #[test]
    fn progress_means_newer_packets() {
        let mut s = Schedule::new(2.0, None);
        assert!(s.progressed(10.0));
        assert!(s.progressed(10.5));
        assert!(!s.progressed(4.0));
        assert!(s.progressed(-100.0));
    }

    #[test]
    fn the_next_tick_is_computed_and_a_wild_timestamp_does_not_loop() {
        assert_eq!(next_after(20.0, 5.0, 20.0), 20.0);
        assert_eq!(next_after(20.0, 20.0, 20.0), 40.0);
        assert_eq!(next_after(20.0, 65.0, 20.0), 80.0);
        let far = next_after(20.0, 1e18, 20.0);
        assert!(far > 1e18, "{far}");
        assert_eq!(next_after(20.0, f64::INFINITY, 20.0), 20.0);
        assert_eq!(next_after(20.0, f64::NAN, 20.0), 20.0);
    }
}

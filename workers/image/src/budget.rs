//! A worker-wide budget for decode memory: each job reserves what its decode will hold (from
//! the source's header) before decoding, and waits while other jobs' reservations would take
//! the total over the budget. Small decodes run side by side; a huge one (a 50 MP progressive
//! JPEG needs ~150 MB of coefficients in libjpeg whatever its output size; see `lowres.rs` for
//! when it does not) runs alone, so peak memory
//! stays near the budget at any concurrency. A job that needs more than the whole budget
//! waits for every other reservation to end and then runs alone.
//!
//! Memory kept between jobs (the watermark overlays a worker caches, `overlay.rs`) is *pinned*:
//! it counts against the budget for as long as it is held, and a job's reservation is capped
//! at what pinned memory leaves, so a job that would need the whole budget still runs (alone
//! beside the pinned memory) instead of waiting forever.

use std::sync::{Condvar, Mutex, PoisonError};

/// Bytes of decode memory all of a worker's jobs may hold at once.
pub const DECODE_BUDGET: u64 = 160 << 20;

/// Most bytes that may be pinned at once: what keeps room for the jobs themselves.
pub const MAX_PINNED: u64 = DECODE_BUDGET / 4;

struct Held {
    /// Everything reserved, pinned included.
    total: u64,
    pinned: u64,
}

struct Pool {
    held: Mutex<Held>,
    freed: Condvar,
}

static POOL: Pool = Pool {
    held: Mutex::new(Held {
        total: 0,
        pinned: 0,
    }),
    freed: Condvar::new(),
};

/// A reservation, returned to the pool when dropped.
#[must_use]
pub struct Reservation {
    bytes: u64,
    pinned: bool,
}

/// Blocks (on the CPU pool's thread) until `bytes` fit in the budget, then reserves them.
pub fn reserve(bytes: u64) -> Reservation {
    let Some(r) = take(bytes, false) else {
        unreachable!("only pins are refused")
    };
    r
}

/// Like [`reserve`], for memory kept between jobs; at most [`MAX_PINNED`] is pinned at once
/// (more is refused with `None`).
pub fn pin(bytes: u64) -> Option<Reservation> {
    take(bytes, true)
}

fn take(bytes: u64, pinned: bool) -> Option<Reservation> {
    let mut held = POOL.held.lock().unwrap_or_else(PoisonError::into_inner);
    let mut waited: Option<std::time::Instant> = None;
    loop {
        if pinned && held.pinned + bytes > MAX_PINNED {
            return None;
        }
        // What pinned memory leaves (re-read: pins come and go while this waits).
        let capped = if pinned {
            bytes
        } else {
            bytes.min(DECODE_BUDGET - held.pinned.min(MAX_PINNED))
        };
        if held.total + capped <= DECODE_BUDGET {
            held.total += capped;
            if pinned {
                held.pinned += capped;
            }
            tracing::debug!(
                bytes = capped,
                pinned,
                held = held.total,
                waited_ms = waited.map_or(0.0, |t| t.elapsed().as_secs_f64() * 1e3),
                "decode memory reserved"
            );
            return Some(Reservation {
                bytes: capped,
                pinned,
            });
        }
        waited.get_or_insert_with(std::time::Instant::now);
        held = POOL
            .freed
            .wait(held)
            .unwrap_or_else(PoisonError::into_inner);
    }
}

impl Reservation {
    /// Bytes held.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let mut held = POOL.held.lock().unwrap_or_else(PoisonError::into_inner);
        held.total = held.total.saturating_sub(self.bytes);
        if self.pinned {
            held.pinned = held.pinned.saturating_sub(self.bytes);
        }
        POOL.freed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Duration;

    #[test]
    fn a_reservation_over_the_budget_waits_for_the_others() {
        let small = reserve(DECODE_BUDGET / 4);
        let (tx, rx) = mpsc::channel();
        let big = std::thread::spawn(move || {
            let r = reserve(DECODE_BUDGET * 2);
            tx.send(()).unwrap();
            drop(r);
        });
        // Still waiting while the small reservation is held …
        assert!(rx.recv_timeout(Duration::from_millis(200)).is_err());
        drop(small);
        // … and runs once it is returned.
        rx.recv_timeout(Duration::from_secs(10)).unwrap();
        big.join().unwrap();
    }

    #[test]
    fn pinned_memory_counts_but_never_starves_a_job() {
        let pinned = pin(MAX_PINNED / 2).unwrap();
        // More than may ever be pinned is refused rather than waited for.
        assert!(pin(MAX_PINNED + 1).is_none());
        // A job asking for everything gets what the pinned memory leaves, and runs.
        let (tx, rx) = mpsc::channel();
        let big = std::thread::spawn(move || {
            let r = reserve(DECODE_BUDGET * 2);
            tx.send(r.bytes()).unwrap();
        });
        let got = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        assert!(got <= DECODE_BUDGET - MAX_PINNED / 2, "{got}");
        big.join().unwrap();
        drop(pinned);
    }
}

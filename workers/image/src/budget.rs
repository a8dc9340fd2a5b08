//! A worker-wide budget for decode memory: each job reserves what its decode will hold (from
//! the source's header) before decoding, and waits while other jobs' reservations would take
//! the total over the budget. Small decodes run side by side; a huge one (a 50 MP progressive
//! JPEG needs ~150 MB of coefficients in libjpeg whatever its output size; see `lowres.rs` for
//! when it does not) runs alone, so peak memory
//! stays near the budget at any concurrency. A job that needs more than the whole budget
//! waits for every other reservation to end and then runs alone.

use std::sync::{Condvar, Mutex, PoisonError};

/// Bytes of decode memory all of a worker's jobs may hold at once.
pub const DECODE_BUDGET: u64 = 160 << 20;

struct Pool {
    held: Mutex<u64>,
    freed: Condvar,
}

static POOL: Pool = Pool {
    held: Mutex::new(0),
    freed: Condvar::new(),
};

/// A reservation, returned to the pool when dropped.
#[must_use]
pub struct Reservation {
    bytes: u64,
}

/// Blocks (on the CPU pool's thread) until `bytes` fit in the budget, then reserves them.
pub fn reserve(bytes: u64) -> Reservation {
    let bytes = bytes.min(DECODE_BUDGET);
    let mut held = POOL.held.lock().unwrap_or_else(PoisonError::into_inner);
    while *held + bytes > DECODE_BUDGET {
        held = POOL
            .freed
            .wait(held)
            .unwrap_or_else(PoisonError::into_inner);
    }
    *held += bytes;
    tracing::debug!(bytes, held = *held, "decode memory reserved");
    Reservation { bytes }
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
        *held = held.saturating_sub(self.bytes);
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
}

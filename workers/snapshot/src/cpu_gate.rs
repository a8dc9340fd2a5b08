//! A counting gate for decode and encode work done on session and capture threads: at most one
//! such piece of work per core at a time, so hundreds of sessions share the cores instead of
//! oversubscribing them (their threads mostly wait on the network).

use std::sync::{Condvar, Mutex, OnceLock};

pub struct CpuGate {
    free: Mutex<usize>,
    freed: Condvar,
}

/// Held while decoding or encoding; frees its slot when dropped.
pub struct CpuSlot<'a>(&'a CpuGate);

impl CpuGate {
    pub fn new(slots: usize) -> CpuGate {
        CpuGate {
            free: Mutex::new(slots.max(1)),
            freed: Condvar::new(),
        }
    }

    /// The process-wide gate, one slot per core.
    pub fn global() -> &'static CpuGate {
        static GATE: OnceLock<CpuGate> = OnceLock::new();
        GATE.get_or_init(|| {
            CpuGate::new(std::thread::available_parallelism().map_or(1, |n| n.get()))
        })
    }

    pub fn enter(&self) -> CpuSlot<'_> {
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        while *free == 0 {
            free = self.freed.wait(free).unwrap_or_else(|e| e.into_inner());
        }
        *free -= 1;
        CpuSlot(self)
    }
}

impl Drop for CpuSlot<'_> {
    fn drop(&mut self) {
        let mut free = self.0.free.lock().unwrap_or_else(|e| e.into_inner());
        *free += 1;
        self.0.freed.notify_one();
    }
}

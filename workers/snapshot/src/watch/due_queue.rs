//! The RTMP engine's decode queue: at most `slots` keyframe decodes at once, process-wide, and
//! when more are waiting the one whose tick fell due first goes next (earliest due first), not
//! the one that asked first. A burst of due keyframes (many sessions' ticks on one instant, a
//! runtime that fell behind) is then worked off in the order that keeps the fewest frames past
//! their due time: a session whose read came late because its task ran late is not also queued
//! behind keyframes due after its own. Ties keep the order of asking.
//!
//! Waiting is asynchronous (a waiter is a future, not a parked blocking thread), and a waiter
//! dropped before its turn, or after being handed a slot it never used, gives the slot on.

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::sync::{Mutex, OnceLock};

use tokio::sync::oneshot;

/// The queue's state: free slots and who waits for one.
pub struct DueQueue {
    state: Mutex<State>,
}

struct State {
    free: usize,
    waiting: BinaryHeap<Waiter>,
    asked: u64,
}

struct Waiter {
    due: f64,
    asked: u64,
    tx: oneshot::Sender<()>,
}

impl Waiter {
    /// Earliest due first, then first asked: the heap's greatest.
    fn rank(&self, other: &Self) -> Ordering {
        other
            .due
            .total_cmp(&self.due)
            .then_with(|| other.asked.cmp(&self.asked))
    }
}

impl PartialEq for Waiter {
    fn eq(&self, other: &Self) -> bool {
        self.rank(other) == Ordering::Equal
    }
}
impl Eq for Waiter {}
impl PartialOrd for Waiter {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Waiter {
    fn cmp(&self, other: &Self) -> Ordering {
        self.rank(other)
    }
}

/// A decode slot held; given to the next waiter (or freed) when dropped.
pub struct Slot<'a> {
    queue: &'a DueQueue,
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.queue.release();
    }
}

/// A waiter's side while it waits: gives back a slot handed to it if it is dropped unused.
struct Pending<'a> {
    queue: &'a DueQueue,
    rx: oneshot::Receiver<()>,
    done: bool,
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        self.rx.close();
        if self.rx.try_recv().is_ok() {
            self.queue.release();
        }
    }
}

impl DueQueue {
    pub fn new(slots: usize) -> DueQueue {
        DueQueue {
            state: Mutex::new(State {
                free: slots.max(1),
                waiting: BinaryHeap::new(),
                asked: 0,
            }),
        }
    }

    /// The process's queue: one slot per core the process may run on.
    pub fn global() -> &'static DueQueue {
        static QUEUE: OnceLock<DueQueue> = OnceLock::new();
        QUEUE.get_or_init(|| {
            DueQueue::new(std::thread::available_parallelism().map_or(1, |n| n.get()))
        })
    }

    /// Waits for a slot; `due` (unix seconds) is when the frame's tick fell due.
    pub async fn acquire(&self, due: f64) -> Slot<'_> {
        let rx = {
            let mut st = self.lock();
            if st.free > 0 && st.waiting.is_empty() {
                st.free -= 1;
                return Slot { queue: self };
            }
            let (tx, rx) = oneshot::channel();
            st.asked += 1;
            let asked = st.asked;
            st.waiting.push(Waiter { due, asked, tx });
            rx
        };
        let mut pending = Pending {
            queue: self,
            rx,
            done: false,
        };
        // The sender is only dropped after a send, so an error cannot happen; were it to,
        // going on without a slot would only decode one frame more at once.
        let _ = (&mut pending.rx).await;
        pending.done = true;
        Slot { queue: self }
    }

    /// Hands a slot to the earliest-due live waiter, or frees it.
    fn release(&self) {
        let mut st = self.lock();
        while let Some(w) = st.waiting.pop() {
            if w.tx.send(()).is_ok() {
                return;
            }
        }
        st.free += 1;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding this lock leaves consistent counts (no user code runs inside).
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    #[cfg(test)]
    fn free(&self) -> usize {
        self.lock().free
    }

    #[cfg(test)]
    fn waiting(&self) -> usize {
        self.lock().waiting.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[tokio::test]
    async fn the_earliest_due_waiter_goes_first_then_the_first_asked() {
        let q: &'static DueQueue = Box::leak(Box::new(DueQueue::new(1)));
        let held = q.acquire(0.0).await;
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        // Asked in this order; due at these times.
        for (name, due) in [
            ("late", 30.0),
            ("early", 10.0),
            ("mid-a", 20.0),
            ("mid-b", 20.0),
        ] {
            let order = order.clone();
            tasks.push(tokio::spawn(async move {
                let _slot = q.acquire(due).await;
                order.lock().unwrap().push(name);
            }));
            // Let each waiter queue before the next asks.
            while q.waiting() < tasks.len() {
                tokio::task::yield_now().await;
            }
        }
        drop(held);
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(
            *order.lock().unwrap(),
            vec!["early", "mid-a", "mid-b", "late"]
        );
        assert_eq!(q.free(), 1);
    }

    #[tokio::test]
    async fn a_waiter_dropped_before_or_after_its_turn_gives_the_slot_on() {
        let q: &'static DueQueue = Box::leak(Box::new(DueQueue::new(1)));
        let held = q.acquire(0.0).await;
        // Dropped while waiting.
        let gone = tokio::spawn(async move {
            let _ = q.acquire(1.0).await;
        });
        while q.waiting() < 1 {
            tokio::task::yield_now().await;
        }
        gone.abort();
        let _ = gone.await;
        drop(held);
        assert_eq!(q.free(), 1);
        // Handed the slot, then dropped before it ran.
        let held = q.acquire(0.0).await;
        let mut waiter = Box::pin(q.acquire(2.0));
        assert!(futures_poll_once(waiter.as_mut()).is_none());
        drop(held);
        drop(waiter);
        assert_eq!(q.free(), 1);
    }

    /// Polls a future once without a runtime's help.
    fn futures_poll_once<F: std::future::Future>(f: std::pin::Pin<&mut F>) -> Option<F::Output> {
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        match f.poll(&mut cx) {
            std::task::Poll::Ready(v) => Some(v),
            std::task::Poll::Pending => None,
        }
    }
}

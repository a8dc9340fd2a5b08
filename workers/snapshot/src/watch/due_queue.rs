//! The RTMP engine's decode queue: keyframe decodes (and their encodes) run on threads of their
//! own, `threads` at once process-wide, and when more are waiting the one whose tick fell due
//! first goes next (earliest due first), not the one that asked first. A burst of due keyframes
//! (many sessions' ticks on one instant, a runtime that fell behind) is then worked off in the
//! order that keeps the fewest frames past their due time. Ties keep the order of asking.
//!
//! The threads take the next job from the queue themselves, back to back: a decode never waits
//! for the async runtime to hand it its turn (with a slot handed through the runtime, each
//! decode of a burst waited for the runtime's one thread to poll the next session between
//! reads of thousands of sockets), and the runtime only hears of finished pictures. A job whose
//! session went away before its turn (stopped, revoked) is dropped unrun.

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::sync::{Arc, Condvar, Mutex, OnceLock};

use tokio::sync::oneshot;

type Work = Box<dyn FnOnce() + Send>;

/// The queue and its threads.
pub struct DueQueue {
    shared: Arc<Shared>,
}

struct Shared {
    state: Mutex<State>,
    ready: Condvar,
}

struct State {
    waiting: BinaryHeap<Job>,
    asked: u64,
}

struct Job {
    due: f64,
    asked: u64,
    /// Runs the work unless its asker went away (then returns without running it).
    work: Work,
}

impl Job {
    /// Earliest due first, then first asked: the heap's greatest.
    fn rank(&self, other: &Self) -> Ordering {
        other
            .due
            .total_cmp(&self.due)
            .then_with(|| other.asked.cmp(&self.asked))
    }
}

impl PartialEq for Job {
    fn eq(&self, other: &Self) -> bool {
        self.rank(other) == Ordering::Equal
    }
}
impl Eq for Job {}
impl PartialOrd for Job {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Job {
    fn cmp(&self, other: &Self) -> Ordering {
        self.rank(other)
    }
}

impl DueQueue {
    /// A queue served by `threads` threads (at least one), named `name`.
    pub fn new(threads: usize, name: &str) -> std::io::Result<DueQueue> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                waiting: BinaryHeap::new(),
                asked: 0,
            }),
            ready: Condvar::new(),
        });
        // The threads live as long as the process: the global queue is never dropped.
        for _ in 0..threads.max(1) {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name(name.to_owned())
                .spawn(move || serve(&shared))?;
        }
        Ok(DueQueue { shared })
    }

    /// The process's queue: one thread per core the process may run on. `None` when its
    /// threads could not be started (the caller decodes on the blocking pool instead).
    pub fn global() -> Option<&'static DueQueue> {
        static QUEUE: OnceLock<Option<DueQueue>> = OnceLock::new();
        QUEUE
            .get_or_init(|| {
                let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
                DueQueue::new(threads, "snapshot-decode")
                    .map_err(|e| tracing::warn!(error = %e, "cannot start the decode threads"))
                    .ok()
            })
            .as_ref()
    }

    /// Runs `work` on one of the queue's threads in its turn; `due` (unix seconds) is when the
    /// frame's tick fell due. `None` if the work panicked. Dropping the future before the
    /// work's turn takes it out of the running.
    pub async fn run<T, F>(&self, due: f64, work: F) -> Option<T>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let work: Work = Box::new(move || {
            if tx.is_closed() {
                return;
            }
            let _ = tx.send(work());
        });
        {
            let mut st = self.shared.lock();
            st.asked += 1;
            let asked = st.asked;
            st.waiting.push(Job { due, asked, work });
        }
        self.shared.ready.notify_one();
        rx.await.ok()
    }

    #[cfg(test)]
    fn waiting(&self) -> usize {
        self.shared.lock().waiting.len()
    }
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding this lock leaves a consistent heap (no user code runs inside).
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A queue thread: takes the earliest-due job and runs it, for ever.
fn serve(shared: &Shared) {
    loop {
        let job = {
            let mut st = shared.lock();
            loop {
                if let Some(job) = st.waiting.pop() {
                    break job;
                }
                st = shared.ready.wait(st).unwrap_or_else(|e| e.into_inner());
            }
        };
        // A panicking decode drops its reply (its asker gets `None`); the thread goes on.
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job.work));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    /// A job that holds the queue's one thread until `release` is sent.
    fn hold(q: &'static DueQueue) -> (mpsc::Sender<()>, tokio::task::JoinHandle<Option<()>>) {
        let (release, held) = mpsc::channel::<()>();
        let (started_tx, started) = mpsc::channel::<()>();
        let task = tokio::spawn(q.run(0.0, move || {
            started_tx.send(()).unwrap();
            held.recv().unwrap();
        }));
        started.recv().unwrap();
        (release, task)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_earliest_due_job_runs_first_then_the_first_asked() {
        let q: &'static DueQueue = Box::leak(Box::new(DueQueue::new(1, "test-decode").unwrap()));
        let (release, holder) = hold(q);
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
            tasks.push(tokio::spawn(q.run(due, move || {
                order.lock().unwrap().push(name);
                name
            })));
            // Let each job queue before the next asks.
            while q.waiting() < tasks.len() {
                tokio::task::yield_now().await;
            }
        }
        release.send(()).unwrap();
        assert_eq!(holder.await.unwrap(), Some(()));
        let mut answers = Vec::new();
        for t in tasks {
            answers.push(t.await.unwrap());
        }
        assert_eq!(
            *order.lock().unwrap(),
            vec!["early", "mid-a", "mid-b", "late"]
        );
        assert_eq!(
            answers,
            vec![Some("late"), Some("early"), Some("mid-a"), Some("mid-b")]
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_job_whose_asker_left_is_not_run_and_a_panic_answers_none() {
        let q: &'static DueQueue = Box::leak(Box::new(DueQueue::new(1, "test-decode").unwrap()));
        let (release, holder) = hold(q);
        let ran = Arc::new(Mutex::new(false));
        let flag = ran.clone();
        let gone = tokio::spawn(q.run(1.0, move || *flag.lock().unwrap() = true));
        while q.waiting() < 1 {
            tokio::task::yield_now().await;
        }
        gone.abort();
        let _ = gone.await;
        release.send(()).unwrap();
        holder.await.unwrap();
        // The next job runs after the abandoned one was taken off (one thread, in order).
        assert_eq!(q.run(2.0, || 7).await, Some(7));
        assert!(!*ran.lock().unwrap(), "the abandoned job ran");
        let panicked: Option<u8> = q.run(3.0, || panic!("a decoder bug")).await;
        assert_eq!(panicked, None);
        // The thread survived the panic.
        assert_eq!(q.run(4.0, || 8).await, Some(8));
    }
}

//! The bounded pool for CPU-heavy work (decode, resize, encode): at most one job per core runs
//! there at a time, so the async threads stay free for I/O. A slot belongs to the job waiting
//! for the work, not to the thread doing it: a job stopped at its hard time limit frees its
//! slot at once, while its thread runs on until the closure returns (closures check the job's
//! `StopSignal` to return early).

use std::sync::Arc;

use tokio::sync::Semaphore;

use crate::backend::result::TaskError;

#[derive(Clone)]
pub struct CpuPool {
    permits: Arc<Semaphore>,
    size: usize,
}

impl CpuPool {
    pub fn new(size: usize) -> CpuPool {
        let size = size.max(1);
        CpuPool {
            permits: Arc::new(Semaphore::new(size)),
            size,
        }
    }

    /// One slot per available core.
    pub fn per_core() -> CpuPool {
        CpuPool::new(
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
        )
    }

    pub fn size(&self) -> usize {
        self.size
    }

    /// Runs `f` on a blocking thread once a slot is free. A panic becomes an `InternalError`.
    pub async fn run<F, R>(&self, f: F) -> Result<R, TaskError>
    where
        F: FnOnce() -> R + Send + 'static,
        R: Send + 'static,
    {
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| TaskError::permanent("InternalError", "CPU pool is closed"))?;
        let outcome = tokio::task::spawn_blocking(f).await;
        drop(permit);
        outcome.map_err(|e| {
            TaskError::permanent(
                "InternalError",
                format!("CPU work failed: {}", panic_text(e)),
            )
        })
    }
}

/// The message of a panicked task, for an error a person can read.
pub fn panic_text(e: tokio::task::JoinError) -> String {
    if e.is_cancelled() {
        return "cancelled".into();
    }
    panic_message(e.into_panic().as_ref())
}

/// The text of a panic payload.
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panic with a non-text payload".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn never_runs_more_than_its_size_at_once() {
        let pool = CpuPool::new(2);
        let running = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let jobs = (0..8).map(|_| {
            let (pool, running, peak) = (pool.clone(), running.clone(), peak.clone());
            tokio::spawn(async move {
                pool.run(move || {
                    let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                    peak.fetch_max(now, Ordering::SeqCst);
                    std::thread::sleep(std::time::Duration::from_millis(20));
                    running.fetch_sub(1, Ordering::SeqCst);
                })
                .await
            })
        });
        for j in jobs.collect::<Vec<_>>() {
            j.await.unwrap().unwrap();
        }
        assert_eq!(peak.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_panic_is_an_error_not_a_crash() {
        let err = CpuPool::new(1)
            .run(|| panic!("decoder exploded"))
            .await
            .unwrap_err();
        assert_eq!(err.exc_type, "InternalError");
        assert!(err.message.contains("decoder exploded"));
    }
}

//! Which jobs are running and how long each may: the evidence `/healthz` uses to tell a wedged
//! worker from a busy one.
//!
//! A job's hard time limit ends it within milliseconds on a healthy worker (the limit is a
//! timer raced against the job). A job still holding its slot [`OVERRUN_GRACE`] past that limit
//! means the timer could not fire — the job blocks the thread it runs on — so the process no
//! longer keeps its promises, and the liveness probe must fail for Kubernetes to restart it.
//! Storing the result afterwards is not counted: a Redis outage is readiness, not liveness.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How far past its hard limit a running job makes the worker unhealthy.
pub const OVERRUN_GRACE: Duration = Duration::from_secs(5);

/// The jobs running now, each with its start and hard limit.
#[derive(Default)]
pub struct RunningJobs {
    next: AtomicU64,
    jobs: Mutex<HashMap<u64, Running>>,
}

struct Running {
    id: String,
    started: Instant,
    hard: Duration,
}

/// Marks one job as running until dropped.
pub struct RunningGuard<'a> {
    jobs: &'a RunningJobs,
    key: u64,
}

impl Drop for RunningGuard<'_> {
    fn drop(&mut self) {
        self.jobs.lock().remove(&self.key);
    }
}

impl RunningJobs {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Running>> {
        self.jobs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records that job `id` starts now under hard limit `hard`.
    pub fn start(&self, id: &str, hard: Duration) -> RunningGuard<'_> {
        let key = self.next.fetch_add(1, Ordering::Relaxed);
        let running = Running {
            id: id.to_owned(),
            started: Instant::now(),
            hard,
        };
        self.lock().insert(key, running);
        RunningGuard { jobs: self, key }
    }

    /// `None` while every job is within its hard limit plus the grace, else which job is
    /// overdue and by how much (the longest overrun), as `/healthz` reports it.
    pub fn overdue(&self, now: Instant) -> Option<String> {
        let jobs = self.lock();
        let worst = jobs
            .values()
            .map(|r| (r, now.saturating_duration_since(r.started)))
            .filter(|(r, ran)| *ran > r.hard + OVERRUN_GRACE)
            .max_by_key(|(_, ran)| *ran)?;
        let (job, ran) = worst;
        Some(format!(
            "job {} has run {:.0} s, past its hard time limit of {} s: the limit could not stop \
             it (it blocks its thread), so this worker is wedged ({} job(s) overdue)",
            job.id,
            ran.as_secs_f64(),
            job.hard.as_secs_f64(),
            jobs.values()
                .filter(|r| now.saturating_duration_since(r.started) > r.hard + OVERRUN_GRACE)
                .count()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_job_past_its_hard_limit_and_the_grace_is_reported_until_it_ends() {
        let jobs = RunningJobs::default();
        let start = Instant::now();
        let quick = jobs.start("quick", Duration::from_secs(1));
        let long = jobs.start("long", Duration::from_secs(60));
        assert_eq!(jobs.overdue(start), None);
        assert_eq!(jobs.overdue(start + Duration::from_secs(5)), None);
        let report = jobs.overdue(start + Duration::from_secs(7)).unwrap();
        assert!(report.contains("job quick") && report.contains("hard time limit of 1 s"));
        assert!(report.contains("1 job(s) overdue"), "{report}");
        drop(quick);
        assert_eq!(jobs.overdue(start + Duration::from_secs(7)), None);
        assert!(jobs.overdue(start + Duration::from_secs(70)).is_some());
        drop(long);
        assert!(jobs.overdue(start + Duration::from_secs(1000)).is_none());
    }
}

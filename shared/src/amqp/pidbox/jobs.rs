//! The jobs a worker holds, as `inspect active|reserved|scheduled` and `query_task` show them:
//! from the moment a delivery is decoded until its handling ends, each job is tracked by a
//! [`Tracked`] guard (dropping it forgets the job, whatever path ended it), first as scheduled
//! (waiting for a short ETA inside this worker) or reserved (waiting for a slot), then active.
//! Also counts jobs started per task name (`stats.total`). The cost per job is one lock, one
//! map entry and a copy of its args/kwargs (a placeholder when the body is large).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use chrono::{DateTime, Utc};
use lapin::message::Delivery;
use serde_json::{json, Map, Value};

use crate::protocol::{format_time, TaskMessage};

/// Bodies larger than this keep a placeholder instead of their args and kwargs.
const KEEP_ARGS_UP_TO: usize = 8 * 1024;

/// Where a job is in this worker (Celery's `_state_of_task` words).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobState {
    Scheduled,
    Reserved,
    Active,
}

impl JobState {
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Scheduled => "scheduled",
            JobState::Reserved => "reserved",
            JobState::Active => "active",
        }
    }
}

struct Job {
    id: String,
    name: String,
    args: Value,
    kwargs: Value,
    delivery_info: Value,
    eta: Option<DateTime<Utc>>,
    priority: u8,
    state: JobState,
    /// Unix seconds when it became active (Celery's `time_start`).
    time_start: Option<f64>,
}

/// The jobs this worker holds now, and how many it has started per task name.
#[derive(Default)]
pub struct Jobs {
    next: AtomicU64,
    held: Mutex<HashMap<u64, Job>>,
    total: Mutex<HashMap<String, u64>>,
}

/// One held job; dropping it forgets the job.
pub struct Tracked<'a> {
    jobs: &'a Jobs,
    key: u64,
}

impl Tracked<'_> {
    fn set(&self, state: JobState) {
        if let Some(job) = self.jobs.lock().get_mut(&self.key) {
            job.state = state;
            if state == JobState::Active {
                job.time_start = Some(unix_now());
            }
        }
    }

    /// Waiting for a slot.
    pub fn reserved(&self) {
        self.set(JobState::Reserved);
    }

    /// Running now: counted in `stats.total`.
    pub fn started(&self) {
        let name = self.jobs.lock().get(&self.key).map(|j| j.name.clone());
        if let Some(name) = name {
            *self
                .jobs
                .total
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .entry(name)
                .or_default() += 1;
        }
        self.set(JobState::Active);
    }
}

impl Drop for Tracked<'_> {
    fn drop(&mut self) {
        self.jobs.lock().remove(&self.key);
    }
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

impl Jobs {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Job>> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts tracking a decoded job: scheduled while its ETA is ahead, else reserved.
    pub fn received(&self, msg: &TaskMessage, delivery: &Delivery) -> Tracked<'_> {
        let (args, kwargs) = if delivery.data.len() <= KEEP_ARGS_UP_TO {
            (json!(msg.args), Value::Object(msg.kwargs.clone()))
        } else {
            let cut = format!("<{} bytes, not shown>", delivery.data.len());
            (Value::String(cut.clone()), Value::String(cut))
        };
        let priority = msg
            .priority
            .or(*delivery.properties.priority())
            .unwrap_or(0);
        let state = match msg.eta {
            Some(eta) if eta > Utc::now() => JobState::Scheduled,
            _ => JobState::Reserved,
        };
        let job = Job {
            id: msg.id.clone(),
            name: msg.task.clone(),
            args,
            kwargs,
            delivery_info: json!({
                "exchange": delivery.exchange.as_str(),
                "routing_key": delivery.routing_key.as_str(),
                "priority": priority,
                "redelivered": delivery.redelivered,
            }),
            eta: msg.eta,
            priority,
            state,
            time_start: None,
        };
        let key = self.next.fetch_add(1, Ordering::Relaxed);
        self.lock().insert(key, job);
        Tracked { jobs: self, key }
    }

    /// Celery's `Request.info()` of each job in `state`, oldest first.
    pub fn info(&self, state: JobState, hostname: &str) -> Vec<Value> {
        let held = self.lock();
        let mut keys: Vec<&u64> = held
            .iter()
            .filter(|(_, j)| j.state == state)
            .map(|(k, _)| k)
            .collect();
        keys.sort();
        keys.into_iter().map(|k| held[k].info(hostname)).collect()
    }

    /// Celery's `inspect scheduled` entries: `{eta, priority, request}`.
    pub fn scheduled(&self, hostname: &str) -> Vec<Value> {
        let held = self.lock();
        let mut jobs: Vec<(&u64, &Job)> = held
            .iter()
            .filter(|(_, j)| j.state == JobState::Scheduled)
            .collect();
        jobs.sort_by_key(|(k, _)| **k);
        jobs.into_iter()
            .map(|(_, j)| {
                json!({
                    "eta": j.eta.map(format_time),
                    "priority": j.priority,
                    "request": j.info(hostname),
                })
            })
            .collect()
    }

    /// Celery's `query_task`: `{id: [state, info]}` for the ids held here.
    pub fn query(&self, ids: &[String], hostname: &str) -> Map<String, Value> {
        self.lock()
            .values()
            .filter(|j| ids.contains(&j.id))
            .map(|j| (j.id.clone(), json!([j.state.as_str(), j.info(hostname)])))
            .collect()
    }

    /// Jobs started per task name since the worker started (`stats.total`).
    pub fn totals(&self) -> Map<String, Value> {
        self.total
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(name, n)| (name.clone(), json!(n)))
            .collect()
    }
}

impl Job {
    fn info(&self, hostname: &str) -> Value {
        json!({
            "id": self.id,
            "name": self.name,
            "args": self.args,
            "kwargs": self.kwargs,
            "type": self.name,
            "hostname": hostname,
            "time_start": self.time_start,
            // Acknowledged only once the result is stored (acks late), so never while held.
            "acknowledged": false,
            "delivery_info": self.delivery_info,
            "worker_pid": std::process::id(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delivery(body: &[u8]) -> Delivery {
        Delivery::mock(1, "".into(), "images".into(), false, body.to_vec())
    }

    #[test]
    fn jobs_move_from_reserved_to_active_and_are_forgotten_when_dropped() {
        let jobs = Jobs::default();
        let mut msg = TaskMessage::new("echo.echo", Default::default());
        msg.kwargs.insert("n".into(), json!(1));
        let d = delivery(b"[[], {\"n\": 1}, {}]");
        let tracked = jobs.received(&msg, &d);
        let reserved = jobs.info(JobState::Reserved, "w@h");
        assert_eq!(reserved.len(), 1);
        assert_eq!(reserved[0]["id"], json!(msg.id));
        assert_eq!(reserved[0]["kwargs"], json!({"n": 1}));
        assert_eq!(reserved[0]["time_start"], Value::Null);
        assert_eq!(
            reserved[0]["delivery_info"],
            json!({"exchange": "", "routing_key": "images", "priority": 0, "redelivered": false})
        );
        assert!(jobs.info(JobState::Active, "w@h").is_empty());
        tracked.started();
        let active = jobs.info(JobState::Active, "w@h");
        assert_eq!(active.len(), 1);
        assert_eq!(active[0]["hostname"], "w@h");
        assert!(active[0]["time_start"].as_f64().unwrap() > 1.0e9);
        assert_eq!(
            jobs.query(std::slice::from_ref(&msg.id), "w@h")[&msg.id][0],
            "active"
        );
        assert_eq!(
            jobs.totals(),
            json!({"echo.echo": 1}).as_object().unwrap().clone()
        );
        drop(tracked);
        assert!(jobs.info(JobState::Active, "w@h").is_empty());
        assert!(jobs.query(&[msg.id], "w@h").is_empty());
    }

    #[test]
    fn a_future_eta_is_scheduled_and_a_large_body_keeps_no_args() {
        let jobs = Jobs::default();
        let mut msg = TaskMessage::new("echo.echo", Default::default());
        msg.eta = Some(Utc::now() + chrono::Duration::seconds(60));
        let d = delivery(&vec![b' '; KEEP_ARGS_UP_TO + 1]);
        let _t = jobs.received(&msg, &d);
        let s = jobs.scheduled("w@h");
        assert_eq!(s.len(), 1);
        assert!(s[0]["eta"].as_str().unwrap().ends_with("+00:00"));
        assert!(s[0]["request"]["kwargs"]
            .as_str()
            .unwrap()
            .contains("not shown"));
        assert!(jobs.info(JobState::Reserved, "w@h").is_empty());
    }
}

//! The producer side: send a job (typed or by task name) and read its result, as Celery's
//! `send_task` and `AsyncResult` do; workflows (chain, group, chord) in [`workflow`].

pub mod json_stream;
pub mod workflow;

pub use workflow::{
    chain, chord, group, Chain, Chord, ChordResult, Group, GroupResult, Signature, Step, Workflow,
    WorkflowResult,
};

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use serde_json::{Map, Value};

use crate::amqp::broker::{BrokerError, Publisher};
use crate::backend::result::{ResultMeta, TaskError, TaskState};
use crate::backend::{BackendError, ResultBackend};
use crate::events::Events;
use crate::protocol::{TaskMessage, TimeLimits};
use crate::runtime::task::Job;
use crate::settings::Settings;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error("job arguments must serialise to a JSON object of kwargs; got {0}")]
    NotAnObject(String),
    /// A workflow or signature that cannot be sent as it is, naming the part.
    #[error("{0}")]
    Workflow(String),
    /// The job ended in FAILURE or REVOKED.
    #[error("job {id} failed: {error}")]
    Failed { id: String, error: TaskError },
}

/// How to send a job, beyond its arguments (Celery's `apply_async` options).
#[derive(Debug, Clone, Default)]
pub struct SendOptions {
    /// Queue name; default: the part of the task name before the first dot.
    pub queue: Option<String>,
    /// Run no earlier than this many seconds from now.
    pub countdown: Option<f64>,
    /// Do not run after this many seconds from now.
    pub expires: Option<f64>,
    /// The message's AMQP priority, higher first; it counts on queues declared with
    /// `task_queue_max_priority`. Unset: `task_default_priority`.
    pub priority: Option<u8>,
    pub time_limit: Option<f64>,
    pub soft_time_limit: Option<f64>,
    /// Use this task id instead of a new UUID.
    pub task_id: Option<String>,
}

/// Publishes jobs and reads results.
#[derive(Clone)]
pub struct Client {
    publisher: Publisher,
    backend: ResultBackend,
    /// How long the backend keeps what the client writes (a chord's size), in seconds.
    result_expires: Option<u64>,
    /// `task-sent` for every job published, with `task_send_sent_event`.
    events: Option<Arc<Events>>,
}

impl Client {
    pub async fn connect(settings: &Settings) -> Result<Client, ClientError> {
        crate::amqp::broker::check(settings)?;
        Ok(Client {
            publisher: Publisher::new(settings),
            backend: ResultBackend::from_settings(settings).await?,
            result_expires: settings.result_expires_secs(),
            events: settings.task_send_sent_event.then(|| {
                // Celery's producers send as `gen<pid>@<host>` (its `anon_nodename`).
                let node = format!("gen{}@{}", std::process::id(), crate::hostname());
                Events::start(settings, &node, true, Default::default())
            }),
        })
    }

    /// Sends a typed job to its queue.
    pub async fn send<J: Job>(&self, job: &J) -> Result<AsyncResult, ClientError> {
        let kwargs = match serde_json::to_value(job) {
            Ok(Value::Object(m)) => m,
            Ok(other) => return Err(ClientError::NotAnObject(other.to_string())),
            Err(e) => return Err(ClientError::NotAnObject(e.to_string())),
        };
        let opts = SendOptions {
            queue: Some(J::QUEUE.to_owned()),
            ..Default::default()
        };
        self.send_task(J::TASK, kwargs, &opts).await
    }

    /// Sends a job by task name with keyword arguments.
    pub async fn send_task(
        &self,
        task: &str,
        kwargs: Map<String, Value>,
        opts: &SendOptions,
    ) -> Result<AsyncResult, ClientError> {
        let msg = build_message(task, kwargs, opts);
        let queue = opts.queue.clone().unwrap_or_else(|| default_queue(task));
        self.publish_batch(&queue, std::slice::from_ref(&msg))
            .await?;
        Ok(self.result(&msg.id))
    }

    /// Publishes ready-made messages to one queue, waiting for every confirm; then sends
    /// `task-sent` for each (with `task_send_sent_event`).
    pub async fn publish_batch(
        &self,
        queue: &str,
        msgs: &[TaskMessage],
    ) -> Result<(), ClientError> {
        self.publisher.publish_batch(queue, msgs).await?;
        if let Some(events) = &self.events {
            for msg in msgs {
                events.task_sent(msg, queue);
            }
        }
        Ok(())
    }

    /// Waits (at most `limit`) until the `task-sent` events of what was published so far are
    /// written to the broker: for a short-lived producer about to exit.
    pub async fn flush_events(&self, limit: Duration) {
        if let Some(events) = &self.events {
            events.flush(limit).await;
        }
    }

    /// A handle to the result of job `id`.
    pub fn result(&self, id: &str) -> AsyncResult {
        AsyncResult {
            id: id.to_owned(),
            backend: self.backend.clone(),
            parent: None,
        }
    }

    pub fn backend(&self) -> &ResultBackend {
        &self.backend
    }
}

/// Builds the protocol message for `task` as `send_task` would.
pub fn build_message(task: &str, kwargs: Map<String, Value>, opts: &SendOptions) -> TaskMessage {
    let mut msg = TaskMessage::new(task, kwargs);
    if let Some(id) = &opts.task_id {
        msg.id = id.clone();
        msg.root_id = Some(id.clone());
    }
    let at = |secs: f64| Utc::now() + chrono::Duration::milliseconds((secs * 1000.0) as i64);
    msg.eta = opts.countdown.filter(|s| *s > 0.0).map(at);
    msg.expires = opts.expires.map(at);
    msg.priority = opts.priority;
    msg.timelimit = TimeLimits {
        hard: opts.time_limit,
        soft: opts.soft_time_limit,
    };
    msg
}

/// The queue a task goes to when none is named: `image.transform` → `image`.
pub use crate::protocol::default_queue;

/// A job's result, as Celery's `AsyncResult`.
#[derive(Clone)]
pub struct AsyncResult {
    pub id: String,
    backend: ResultBackend,
    /// The chain step before this one, when the producer knows it (a chain's results).
    parent: Option<Box<AsyncResult>>,
}

impl AsyncResult {
    /// The result of the step before this one in a chain sent by this client.
    pub fn parent(&self) -> Option<&AsyncResult> {
        self.parent.as_deref()
    }

    /// Waits for the job to end; its return value, or `ClientError::Failed`.
    pub async fn get(&self, timeout: Duration) -> Result<Value, ClientError> {
        let meta = self.backend.wait(&self.id, timeout).await?;
        into_value(meta)
    }

    /// The current state; PENDING when nothing is stored yet.
    pub async fn state(&self) -> Result<TaskState, ClientError> {
        Ok(self.backend.state(&self.id).await?)
    }

    /// The stored record, if any.
    pub async fn meta(&self) -> Result<Option<ResultMeta>, ClientError> {
        Ok(self.backend.get(&self.id).await?)
    }
}

fn into_value(meta: ResultMeta) -> Result<Value, ClientError> {
    match meta.error() {
        Some(error) => Err(ClientError::Failed {
            id: meta.task_id,
            error,
        }),
        None => Ok(meta.result),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_become_headers() {
        let opts = SendOptions {
            countdown: Some(10.0),
            expires: Some(60.0),
            time_limit: Some(5.0),
            task_id: Some("fixed".into()),
            ..Default::default()
        };
        let msg = build_message("image.transform", Map::new(), &opts);
        assert_eq!(msg.id, "fixed");
        let eta = msg.eta.unwrap();
        assert!(eta > Utc::now() + chrono::Duration::seconds(9));
        assert!(msg.expires.unwrap() > eta);
        assert_eq!(msg.timelimit.hard, Some(5.0));
        assert_eq!(default_queue("image.transform"), "image");
        assert_eq!(default_queue("plain"), "plain");
    }
}

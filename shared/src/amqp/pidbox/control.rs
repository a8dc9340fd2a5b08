//! Commands that change a running worker, answered in Celery 5.7's words
//! (`celery/worker/control.py`): `add_consumer` and `cancel_consumer` change the queues the
//! runtime consumes (it follows [`Node::watch_queues`] and declares a new queue as kombu does
//! before consuming it), `time_limit` replaces a task's soft and hard limits for the jobs that
//! start after it, and `shutdown` stops the worker as SIGTERM does (Celery sends no reply).

use std::time::Duration;

use lapin::{Channel, ExchangeKind};
use serde_json::{json, Value};

use super::mailbox::Request;
use super::{Node, Via};
use crate::amqp::broker::{self, BrokerError};

fn ok(text: String) -> Value {
    json!({ "ok": text })
}

fn nok(text: String) -> Value {
    json!({ "error": text })
}

/// Starts consuming `queue` now (Celery replies `add consumer <queue>` at once). With an
/// `exchange` other than the queue's own name, that exchange (of `exchange_type`, direct by
/// default) is declared and bound with `routing_key` (default: the queue's name) first, as
/// Celery's `add_task_queue` does. On the Redis broker only a direct exchange can be bound
/// (kombu's binding set); any other type is refused with the reason.
pub async fn add_consumer(node: &Node, via: Via<'_>, req: &Request) -> Value {
    let Some(queue) = req.text("queue") else {
        return nok(
            "TypeError(\"add_consumer() missing 1 required positional argument: 'queue'\")".into(),
        );
    };
    if let Err(e) = broker::check_queue_name(queue) {
        return nok(e.to_string());
    }
    if let Some(exchange) = req.text("exchange").filter(|e| *e != queue) {
        let kind = req.text("exchange_type").unwrap_or("direct");
        let routing_key = req.text("routing_key").unwrap_or(queue);
        let bound = match via {
            Via::Amqp(channel) => {
                let shape = broker::QueueShape::of(&node.settings);
                bind_to(channel, queue, &shape, exchange, kind, routing_key)
                    .await
                    .map_err(|e| e.to_string())
            }
            Via::Redis(_) if kind != "direct" => Err(format!(
                "exchange type {kind:?} cannot be bound on the Redis broker here: a {kind} \
                 exchange on Redis delivers only to subscribers, not to a work queue; use a \
                 direct exchange"
            )),
            Via::Redis(redis) => redis
                .bind_queue(exchange, routing_key, queue)
                .await
                .map_err(|e| e.to_string()),
        };
        if let Err(e) = bound {
            return nok(e);
        }
    }
    if node.add_queue(queue) {
        tracing::info!(%queue, "started consuming on request (add_consumer)");
    }
    ok(format!("add consumer {queue}"))
}

/// Declares work queue `queue` with `shape` (as the worker will when it consumes it) and binds
/// it to `exchange`.
async fn bind_to(
    channel: &Channel,
    queue: &str,
    shape: &broker::QueueShape,
    exchange: &str,
    kind: &str,
    routing_key: &str,
) -> Result<(), BrokerError> {
    let kind = match kind {
        "fanout" => ExchangeKind::Fanout,
        "topic" => ExchangeKind::Topic,
        "headers" => ExchangeKind::Headers,
        _ => ExchangeKind::Direct,
    };
    if shape.broker_dead_letters() {
        broker::declare_dead_queue(channel, queue, shape).await?;
    }
    let args = shape.work_arguments(queue);
    broker::declare_bound_queue(channel, queue, exchange, kind, routing_key, args).await
}

/// Stops consuming `queue` (messages already delivered still run). Celery's reply whether or
/// not it was consumed.
pub fn cancel_consumer(node: &Node, req: &Request) -> Value {
    let Some(queue) = req.text("queue") else {
        return nok(
            "TypeError(\"cancel_consumer() missing 1 required positional argument: 'queue'\")"
                .into(),
        );
    };
    if node.remove_queue(queue) {
        tracing::info!(%queue, "stopped consuming on request (cancel_consumer)");
    }
    ok(format!("no longer consuming from {queue}"))
}

/// Celery's `time_limit(task_name, soft, hard)`: both limits replaced (an absent one is
/// removed) for later jobs of that task; a message's own `timelimit` still comes first.
pub fn time_limit(node: &Node, req: &Request) -> Value {
    let Some(task) = req
        .text("task_name")
        .filter(|t| node.tasks.iter().any(|n| n == t))
    else {
        tracing::error!(task = ?req.text("task_name"), "time limit change for an unknown task");
        return nok("unknown task".into());
    };
    let secs = |name: &str| {
        req.number(name)
            .filter(|s| *s > 0.0)
            .and_then(|s| Duration::try_from_secs_f64(s).ok())
    };
    let (soft, hard) = (secs("soft"), secs("hard"));
    node.set_time_limit(task, (soft, hard));
    tracing::info!(%task, ?soft, ?hard, "new time limits");
    ok("time limits set successfully".into())
}

/// Stops the worker as SIGTERM does: running jobs finish within the grace period.
pub fn shutdown(node: &Node) {
    tracing::warn!("Got shutdown from remote");
    node.stop.cancel();
}

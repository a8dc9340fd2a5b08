//! The pidbox on the Redis broker, as kombu's Redis transport carries Celery's mailbox, so
//! `celery inspect`/`control`, `app.control.revoke` and Flower reach mediafarm workers (and
//! `mediafarm inspect`/`control`/`revoke` reach Python workers) with `broker_url = redis://`:
//!
//! - a request is a kombu envelope `PUBLISH`ed on the fanout channel of `celery.pidbox`
//!   (`/{db}.celery.pidbox`: kombu's pidbox publishes with an empty routing key); every worker
//!   subscribed at that moment gets it, one that is not never does (as with kombu);
//! - a reply is an envelope on the direct exchange `reply.celery.pidbox` under the requester's
//!   routing key (its `oid`), pushed onto the reply queue bound in
//!   `_kombu.binding.reply.celery.pidbox` (`<oid>.reply.celery.pidbox`), with the `ticket` and
//!   `clock` headers; the requester pops it (kombu's `no_ack` reply consumer).
//!
//! What a request asks is answered by [`super::dispatch`], exactly as over AMQP.
//!
//! Two workers with one node name: on AMQP the second cannot take the exclusive mailbox queue
//! and says so. A fanout has no such queue (both get every request and both answer), so once
//! subscribed a worker pings its own name and ignores that one request itself: any answer comes
//! from another running worker (Python or Rust) with its name, and it logs Celery's
//! `DuplicateNodenameWarning`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{json, Map, Value};

use super::mailbox::{ReplyTo, Request};
use super::{dispatch, Node, Via, CONTROL_EXCHANGE, REPLY_EXCHANGE};
use crate::protocol::Properties;
use crate::redis_broker::{Envelope, RedisBroker, RedisBrokerError};
use crate::settings::Settings;

/// kombu's `reply_queue_expires`: a reply list nobody reads goes after this.
const REPLY_EXPIRES: Duration = Duration::from_secs(10);
/// How long a starting worker waits for another worker with its name to answer its ping (a
/// live worker answers within milliseconds; Celery's mingle waits 1 s for its hello).
const DUPLICATE_PROBE_WAIT: Duration = Duration::from_secs(2);

fn json_props() -> Properties {
    Properties {
        content_type: Some("application/json".into()),
        content_encoding: Some("utf-8".into()),
        ..Properties::default()
    }
}

/// Answers this node's requests until the subscription's connection is lost (`Ok`: the
/// caller subscribes again) or subscribing fails.
pub async fn listen(broker: RedisBroker, node: Arc<Node>) -> Result<(), RedisBrokerError> {
    let mut requests = Box::pin(broker.subscribe(CONTROL_EXCHANGE, "").await?);
    let hostname = node.hostname.clone();
    tracing::debug!(node = %hostname, channel = %broker.fanout_topic(CONTROL_EXCHANGE, ""), "listening for control requests on the Redis broker");
    let probe = ReplyTo {
        routing_key: uuid::Uuid::new_v4().to_string(),
        ticket: uuid::Uuid::new_v4().to_string(),
    };
    tokio::spawn(warn_if_named_twice(
        broker.clone(),
        hostname.clone(),
        probe.clone(),
    ));
    while let Some(payload) = requests.next().await {
        let Some(req) = Envelope::parse(&payload)
            .ok()
            .and_then(|e| e.body().ok())
            .and_then(|body| Request::parse(&body))
        else {
            tracing::debug!("control message ignored (not a kombu mailbox request)");
            continue;
        };
        if !req.is_for(&hostname) || req.reply_to.as_ref() == Some(&probe) {
            continue;
        }
        node.forward_clock();
        tracing::debug!(method = %req.method, "control request");
        let reply = dispatch(&node, Via::Redis(&broker), &req).await;
        if let (Some(to), Some(reply)) = (&req.reply_to, reply) {
            let clock = node.forward_clock();
            if let Err(e) = send_reply(&broker, &hostname, to, clock, reply).await {
                tracing::warn!(error = %e, method = %req.method, "could not send a control reply");
            }
        }
    }
    Ok(())
}

/// Pings `hostname` with `probe` (which this worker's own listener ignores) and logs Celery's
/// `DuplicateNodenameWarning` when anyone answers: another running worker has the name.
async fn warn_if_named_twice(broker: RedisBroker, hostname: String, probe: ReplyTo) {
    let destination = [hostname.clone()];
    match call_on(
        &broker,
        &probe,
        "ping",
        json!({}),
        Some(&destination),
        DUPLICATE_PROBE_WAIT,
    )
    .await
    {
        Ok(replies) if !replies.is_empty() => tracing::warn!(
            node = %hostname,
            "DuplicateNodenameWarning: another running worker already has the node name \
             {hostname} (it answered a ping to that name), so control commands sent to that \
             name reach both and are answered twice. Give each worker its own -n (the \
             default, mediafarm.<pid>@<host>, is unique)"
        ),
        Ok(_) => tracing::debug!(node = %hostname, "no other worker has this node name"),
        Err(e) => {
            tracing::debug!(error = %e, "could not check for another worker with this node name")
        }
    }
}

/// Pushes `{"<hostname>": reply}` onto the requester's reply queue, as kombu's
/// `Mailbox._publish_reply` does (transient, with the `ticket` and this node's `clock`).
pub async fn send_reply(
    broker: &RedisBroker,
    hostname: &str,
    to: &ReplyTo,
    clock: u64,
    reply: Value,
) -> Result<(), RedisBrokerError> {
    let mut headers = Map::new();
    headers.insert("ticket".into(), json!(to.ticket));
    headers.insert("clock".into(), json!(clock));
    let body = json!({ hostname: reply }).to_string();
    let envelope = Envelope::routed(
        &json_props(),
        &headers,
        body.as_bytes(),
        (REPLY_EXCHANGE, &to.routing_key),
        1,
    );
    let reached = broker
        .push_direct(
            REPLY_EXCHANGE,
            &to.routing_key,
            &envelope,
            Some(REPLY_EXPIRES),
        )
        .await?;
    if reached == 0 {
        tracing::debug!(routing_key = %to.routing_key, "no reply queue bound: the requester has gone");
    }
    Ok(())
}

/// Publishes a request to every worker's mailbox, as kombu's `Mailbox._publish` writes it.
pub async fn publish(
    broker: &RedisBroker,
    method: &str,
    arguments: Value,
    destination: Option<&[String]>,
    reply_to: Option<&ReplyTo>,
) -> Result<(), RedisBrokerError> {
    let body = super::mailbox::request_body(method, arguments, destination, reply_to);
    let mut headers = Map::new();
    headers.insert("clock".into(), json!(1));
    headers.insert("expires".into(), json!(0));
    let envelope = Envelope::routed(
        &json_props(),
        &headers,
        body.to_string().as_bytes(),
        (CONTROL_EXCHANGE, ""),
        2,
    );
    broker
        .publish_fanout(CONTROL_EXCHANGE, &[(String::new(), envelope)])
        .await?;
    Ok(())
}

/// [`super::mailbox::call`] on the Redis broker: binds a reply queue of its own, publishes,
/// and gathers the replies with its ticket until `timeout` or every destination answered.
pub async fn call(
    settings: &Settings,
    method: &str,
    arguments: Value,
    destination: Option<&[String]>,
    timeout: Duration,
) -> Result<Vec<(String, Value)>, RedisBrokerError> {
    let broker = RedisBroker::connect(settings).await?;
    let to = ReplyTo {
        routing_key: uuid::Uuid::new_v4().to_string(),
        ticket: uuid::Uuid::new_v4().to_string(),
    };
    call_on(&broker, &to, method, arguments, destination, timeout).await
}

/// [`call`] on `broker`, with the replies asked for at `to` (its routing key names the reply
/// queue, as kombu's `oid`).
async fn call_on(
    broker: &RedisBroker,
    to: &ReplyTo,
    method: &str,
    arguments: Value,
    destination: Option<&[String]>,
    timeout: Duration,
) -> Result<Vec<(String, Value)>, RedisBrokerError> {
    let oid = &to.routing_key;
    let queue = format!("{oid}.{REPLY_EXCHANGE}");
    broker.bind_queue(REPLY_EXCHANGE, oid, &queue).await?;
    let gathered = gather(broker, to, &queue, method, arguments, destination, timeout).await;
    // As kombu's auto-deleted reply queue: gone with its consumer.
    if let Err(e) = broker.delete_queue(REPLY_EXCHANGE, oid, &queue).await {
        tracing::debug!(error = %e, %queue, "could not remove the reply queue; its list expires on its own");
    }
    gathered
}

async fn gather(
    broker: &RedisBroker,
    to: &ReplyTo,
    queue: &str,
    method: &str,
    arguments: Value,
    destination: Option<&[String]>,
    timeout: Duration,
) -> Result<Vec<(String, Value)>, RedisBrokerError> {
    const POP_AT_MOST: Duration = Duration::from_secs(1);
    let mut conn = broker.blocking_connection(POP_AT_MOST).await?;
    publish(broker, method, arguments, destination, Some(to)).await?;
    let limit = destination.map(<[String]>::len).filter(|n| *n > 0);
    let end = Instant::now() + timeout;
    let mut replies = Vec::new();
    while limit.is_none_or(|n| replies.len() < n) {
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        let Some(raw) = broker
            .pop_wait(&mut conn, queue, left.min(POP_AT_MOST))
            .await?
        else {
            continue;
        };
        let Ok(envelope) = Envelope::parse(&raw) else {
            continue;
        };
        let (_, headers) = envelope.properties();
        if headers
            .get("ticket")
            .and_then(Value::as_str)
            .is_some_and(|t| t != to.ticket)
        {
            continue;
        }
        if let Ok(Value::Object(by_node)) = envelope
            .body()
            .map_err(drop)
            .and_then(|b| serde_json::from_slice::<Value>(&b).map_err(drop))
        {
            replies.extend(by_node);
        }
    }
    Ok(replies)
}

//! kombu's mailbox on the wire, both sides. A worker reads a [`Request`] (`method`,
//! `arguments`, who it is for — `destination`, or `pattern` with a `glob` `matcher` — and, when
//! the sender wants an answer, `reply_to` and `ticket`) and answers `{"<node>": reply}` to the
//! reply exchange with the ticket header ([`send_reply`]). A requester ([`call`]) declares its
//! own reply queue as kombu's `Mailbox.reply_queue` does, broadcasts, and gathers the replies
//! carrying its ticket until the timeout. Nothing here knows what a method does. The same
//! messages on the Redis broker travel through [`super::over_redis`].

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, ExchangeKind};
use serde_json::{json, Map, Value};

use super::{CONTROL_EXCHANGE, REPLY_EXCHANGE};
use crate::amqp::broker::BrokerError;
use crate::settings::Settings;

/// Where a request wants its reply: kombu's `reply_to` (on [`REPLY_EXCHANGE`]) and `ticket`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplyTo {
    pub routing_key: String,
    pub ticket: String,
}

/// One mailbox message, as kombu's `Mailbox._publish` writes it.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    pub method: String,
    /// Keyword arguments of the method (an empty object when none were sent).
    pub arguments: Map<String, Value>,
    pub destination: Option<Vec<String>>,
    pub pattern: Option<String>,
    pub matcher: Option<String>,
    /// Set when the sender waits for replies (kombu's `call`), unset for a cast.
    pub reply_to: Option<ReplyTo>,
}

impl Request {
    /// Reads a mailbox body; `None` when it is not a JSON object with a `method`.
    pub fn parse(body: &[u8]) -> Option<Request> {
        let v: Value = serde_json::from_slice(body).ok()?;
        let method = v.get("method")?.as_str()?.to_owned();
        let arguments = match v.get("arguments") {
            Some(Value::Object(m)) => m.clone(),
            _ => Map::new(),
        };
        let destination = v.get("destination").and_then(Value::as_array).map(|d| {
            d.iter()
                .filter_map(|n| n.as_str().map(str::to_owned))
                .collect()
        });
        let text = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_owned);
        let reply_to = v
            .get("reply_to")
            .filter(|r| r.get("exchange").and_then(Value::as_str) == Some(REPLY_EXCHANGE))
            .and_then(|r| {
                Some(ReplyTo {
                    routing_key: r.get("routing_key")?.as_str()?.to_owned(),
                    ticket: v.get("ticket")?.as_str()?.to_owned(),
                })
            });
        Some(Request {
            method,
            arguments,
            destination,
            pattern: text("pattern"),
            matcher: text("matcher"),
            reply_to,
        })
    }

    /// Whether node `hostname` should act on it, as kombu's `Node.handle_message` decides: a
    /// non-empty `destination` names it, else a `pattern` matches it, else everyone. Only the
    /// `glob` matcher is understood; a `pcre` pattern matches no mediafarm node.
    pub fn is_for(&self, hostname: &str) -> bool {
        if let Some(dest) = self.destination.as_ref().filter(|d| !d.is_empty()) {
            return dest.iter().any(|d| d == hostname);
        }
        match (&self.pattern, self.matcher.as_deref()) {
            (Some(p), Some("glob")) => glob(p, hostname),
            (Some(_), Some(_)) => false,
            _ => true,
        }
    }

    /// A string argument.
    pub fn text(&self, name: &str) -> Option<&str> {
        self.arguments.get(name).and_then(Value::as_str)
    }

    /// A number argument (Celery's CLI sends floats; JSON integers are accepted too).
    pub fn number(&self, name: &str) -> Option<f64> {
        self.arguments.get(name).and_then(Value::as_f64)
    }

    /// A list argument that may also arrive as a single string (Celery's `maybe_list`).
    pub fn list(&self, name: &str) -> Vec<String> {
        match self.arguments.get(name) {
            Some(Value::String(s)) => vec![s.clone()],
            Some(Value::Array(items)) => items
                .iter()
                .filter_map(|i| i.as_str().map(str::to_owned))
                .collect(),
            _ => Vec::new(),
        }
    }
}

/// fnmatch's `*` and `?` (what kombu's `glob` matcher uses; no character classes).
fn glob(pattern: &str, name: &str) -> bool {
    let (p, n): (Vec<char>, Vec<char>) = (pattern.chars().collect(), name.chars().collect());
    let (mut pi, mut ni) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == n[ni]) {
            pi += 1;
            ni += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ni));
            pi += 1;
        } else if let Some((sp, sn)) = star {
            pi = sp + 1;
            ni = sn + 1;
            star = Some((sp, sn + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

fn props(headers: FieldTable) -> BasicProperties {
    BasicProperties::default()
        .with_content_type("application/json".into())
        .with_content_encoding("utf-8".into())
        .with_headers(headers)
}

/// Declares the reply exchange as kombu does (direct, not durable).
async fn declare_reply_exchange(channel: &Channel) -> Result<(), BrokerError> {
    channel
        .exchange_declare(
            REPLY_EXCHANGE.into(),
            ExchangeKind::Direct,
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        )
        .await?;
    Ok(())
}

/// Declares the control exchange exactly as kombu does (fanout, not durable), or Python's
/// declaration would be refused.
pub async fn declare_exchange(channel: &Channel) -> Result<(), BrokerError> {
    channel
        .exchange_declare(
            CONTROL_EXCHANGE.into(),
            ExchangeKind::Fanout,
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        )
        .await?;
    Ok(())
}

/// Sends `{"<hostname>": reply}` to the requester, as kombu's `Mailbox._publish_reply` does:
/// to the reply exchange under the requester's routing key, with the `ticket` header it
/// matches replies by and this node's `clock`.
pub async fn send_reply(
    channel: &Channel,
    hostname: &str,
    to: &ReplyTo,
    clock: u64,
    reply: Value,
) -> Result<(), BrokerError> {
    declare_reply_exchange(channel).await?;
    let mut headers = FieldTable::default();
    headers.insert(
        "ticket".into(),
        AMQPValue::LongString(to.ticket.as_str().into()),
    );
    headers.insert(
        "clock".into(),
        AMQPValue::LongLongInt(i64::try_from(clock).unwrap_or(i64::MAX)),
    );
    let body = json!({ hostname: reply });
    channel
        .basic_publish(
            REPLY_EXCHANGE.into(),
            to.routing_key.as_str().into(),
            BasicPublishOptions::default(),
            body.to_string().as_bytes(),
            props(headers),
        )
        .await?;
    Ok(())
}

/// The body of a mailbox request, as kombu's `Mailbox._publish` writes it (`ticket` and
/// `reply_to` only when the sender waits for replies).
pub fn request_body(
    method: &str,
    arguments: Value,
    destination: Option<&[String]>,
    reply_to: Option<&ReplyTo>,
) -> Value {
    let mut body = json!({
        "method": method,
        "arguments": arguments,
        "destination": destination,
        "pattern": null,
        "matcher": null,
    });
    if let Some(to) = reply_to {
        body["ticket"] = json!(to.ticket);
        body["reply_to"] = json!({"exchange": REPLY_EXCHANGE, "routing_key": to.routing_key});
    }
    body
}

/// Publishes a request to every worker's mailbox (`reply_to`, when set, must name a queue the
/// sender consumes).
pub async fn publish(
    channel: &Channel,
    method: &str,
    arguments: Value,
    destination: Option<&[String]>,
    reply_to: Option<&ReplyTo>,
) -> Result<(), BrokerError> {
    declare_exchange(channel).await?;
    let body = request_body(method, arguments, destination, reply_to);
    let mut headers = FieldTable::default();
    headers.insert("clock".into(), AMQPValue::LongLongInt(1));
    headers.insert("expires".into(), AMQPValue::LongLongInt(0));
    channel
        .basic_publish(
            CONTROL_EXCHANGE.into(),
            "".into(),
            BasicPublishOptions::default(),
            body.to_string().as_bytes(),
            props(headers),
        )
        .await?;
    Ok(())
}

/// Sends `method` to every worker (or those in `destination`) and gathers `(node, reply)` in
/// arrival order until `timeout`, or until every destination has answered — what kombu's
/// `Mailbox._broadcast(reply=True)` does, so Python Celery workers answer it too. On a Redis
/// `broker_url` through [`super::over_redis::call`].
pub async fn call(
    settings: &Settings,
    method: &str,
    arguments: Value,
    destination: Option<&[String]>,
    timeout: Duration,
) -> Result<Vec<(String, Value)>, BrokerError> {
    if settings.broker_is_redis() {
        return Ok(
            super::over_redis::call(settings, method, arguments, destination, timeout).await?,
        );
    }
    let conn = crate::amqp::broker::connect(settings, &format!("mediafarm {method}")).await?;
    let channel = conn.create_channel().await?;
    declare_reply_exchange(&channel).await?;
    let oid = uuid::Uuid::new_v4().to_string();
    let queue = format!("{oid}.{REPLY_EXCHANGE}");
    // kombu's reply_queue_expires = 10 s.
    declare_mailbox_queue(&channel, &queue, REPLY_EXCHANGE, &oid, None).await?;
    let mut consumer = channel
        .basic_consume(
            queue.as_str().into(),
            "".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    let to = ReplyTo {
        routing_key: oid.clone(),
        ticket: uuid::Uuid::new_v4().to_string(),
    };
    publish(&channel, method, arguments, destination, Some(&to)).await?;
    let limit = destination.map(<[String]>::len).filter(|n| *n > 0);
    let end = Instant::now() + timeout;
    let mut replies = Vec::new();
    while limit.is_none_or(|n| replies.len() < n) {
        let left = end.saturating_duration_since(Instant::now());
        let Ok(Some(delivery)) = tokio::time::timeout(left, consumer.next()).await else {
            break;
        };
        let delivery = delivery?;
        let ticket = delivery
            .properties
            .headers()
            .as_ref()
            .and_then(|h| h.inner().get("ticket").cloned());
        let ours = match ticket {
            Some(AMQPValue::LongString(t)) => t.to_string() == to.ticket,
            Some(AMQPValue::ShortString(t)) => t.as_str() == to.ticket,
            _ => true,
        };
        if !ours {
            continue;
        }
        if let Ok(Value::Object(by_node)) = serde_json::from_slice::<Value>(&delivery.data) {
            replies.extend(by_node);
        }
    }
    crate::amqp::broker::close_quietly(&conn, &[&channel], "done").await;
    Ok(replies)
}

/// The node names that answered more than once in `replies`, sorted: two running workers
/// share each (Celery's `flatten_reply` warns with `DuplicateNodenameWarning` for them). On
/// AMQP the second one has no mailbox queue and never answers; on Redis both do.
pub fn named_twice(replies: &[(String, Value)]) -> Vec<String> {
    let mut seen = std::collections::BTreeSet::new();
    let mut twice = std::collections::BTreeSet::new();
    for (node, _) in replies {
        if !seen.insert(node.as_str()) {
            twice.insert(node.clone());
        }
    }
    twice.into_iter().collect()
}

/// Declares an exclusive, auto-deleted queue that expires 10 s after its consumer goes (kombu's
/// `x-expires` for mailbox and reply queues), optionally with a message TTL, and binds it to
/// `exchange` under `routing_key`.
pub(crate) async fn declare_mailbox_queue(
    channel: &Channel,
    queue: &str,
    exchange: &str,
    routing_key: &str,
    message_ttl_ms: Option<i32>,
) -> Result<(), BrokerError> {
    let mut args = FieldTable::default();
    if let Some(ttl) = message_ttl_ms {
        args.insert("x-message-ttl".into(), AMQPValue::LongInt(ttl));
    }
    args.insert("x-expires".into(), AMQPValue::LongInt(10_000));
    channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..Default::default()
            },
            args,
        )
        .await?;
    channel
        .queue_bind(
            queue.into(),
            exchange.into(),
            routing_key.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_answering_twice_is_named_once() {
        let r = |n: &str| (n.to_owned(), json!({"ok": "pong"}));
        assert!(named_twice(&[r("a@h"), r("b@h")]).is_empty());
        assert_eq!(
            named_twice(&[r("b@h"), r("a@h"), r("b@h"), r("b@h")]),
            ["b@h"]
        );
    }

    #[test]
    fn reads_a_kombu_call_and_a_cast() {
        let body = br#"{"method": "ping", "arguments": {}, "destination": ["w@h"], "pattern": null, "matcher": null, "ticket": "t-1", "reply_to": {"exchange": "reply.celery.pidbox", "routing_key": "rk-1"}}"#;
        let r = Request::parse(body).unwrap();
        assert_eq!(r.method, "ping");
        assert_eq!(
            r.reply_to,
            Some(ReplyTo {
                routing_key: "rk-1".into(),
                ticket: "t-1".into()
            })
        );
        assert!(r.is_for("w@h") && !r.is_for("other@h"));
        let cast =
            br#"{"method": "revoke", "arguments": {"task_id": ["a", "b"]}, "destination": null}"#;
        let r = Request::parse(cast).unwrap();
        assert_eq!(r.reply_to, None);
        assert!(r.is_for("anyone@h"));
        assert_eq!(r.list("task_id"), ["a", "b"]);
        assert!(Request::parse(b"not json").is_none());
        assert!(Request::parse(br#"{"arguments": {}}"#).is_none());
        // A reply address on another exchange is not one this node answers to.
        let elsewhere = br#"{"method": "ping", "ticket": "t", "reply_to": {"exchange": "x", "routing_key": "r"}}"#;
        assert_eq!(Request::parse(elsewhere).unwrap().reply_to, None);
    }

    #[test]
    fn glob_patterns_pick_nodes_as_kombu_does() {
        let with = |pattern: &str, matcher: &str| Request {
            method: "ping".into(),
            arguments: Map::new(),
            destination: Some(Vec::new()),
            pattern: Some(pattern.into()),
            matcher: Some(matcher.into()),
            reply_to: None,
        };
        assert!(with("image@*", "glob").is_for("image@web-1"));
        assert!(with("*@web-?", "glob").is_for("image@web-1"));
        assert!(!with("*@web-?", "glob").is_for("image@web-12"));
        assert!(!with("notify@*", "glob").is_for("image@web-1"));
        assert!(!with("image@.*", "pcre").is_for("image@web-1"));
    }
}

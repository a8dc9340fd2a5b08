//! kombu's message envelope on Redis: one JSON object per message, as kombu's virtual
//! transport writes it (`Channel.prepare_message` + `_inplace_augment_message`):
//!
//! ```json
//! {"body": "<base64 of the Celery v2 body>", "content-encoding": "utf-8",
//!  "content-type": "application/json", "headers": {"task": "...", "id": "...", ...},
//!  "properties": {"correlation_id": "...", "reply_to": "...", "delivery_mode": 2,
//!                 "delivery_info": {"exchange": "", "routing_key": "image"},
//!                 "priority": 0, "body_encoding": "base64", "delivery_tag": "<uuid4>"}}
//! ```
//!
//! The headers and body are exactly the AMQP message's (Celery protocol v2), so decoding is
//! [`crate::protocol`]'s. An envelope keeps every field it was read with: what is put back
//! (restored, delayed, dead-lettered) carries fields this module does not know unchanged.

use base64::Engine;
use serde_json::{json, Map, Value};

use crate::protocol::Properties;

/// One message as it sits in a Redis list.
#[derive(Debug, Clone, PartialEq)]
pub struct Envelope {
    raw: Map<String, Value>,
}

fn base64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::STANDARD
}

impl Envelope {
    /// A new envelope for `queue` (published on the default exchange with the queue's name as
    /// routing key, as kombu does for `exchange=''`), with a fresh delivery tag.
    pub fn new(props: &Properties, headers: &Map<String, Value>, body: &[u8], queue: &str) -> Self {
        Self::routed(props, headers, body, ("", queue), 2)
    }

    /// A new envelope published on `exchange` under `routing_key`, with kombu's
    /// `delivery_mode` (2 persistent, 1 transient: pidbox replies and events) and a fresh
    /// delivery tag.
    pub fn routed(
        props: &Properties,
        headers: &Map<String, Value>,
        body: &[u8],
        (exchange, routing_key): (&str, &str),
        delivery_mode: u8,
    ) -> Self {
        let mut p = Map::new();
        let text = |v: &Option<String>| v.clone().map(Value::String).unwrap_or(Value::Null);
        p.insert("correlation_id".into(), text(&props.correlation_id));
        p.insert("reply_to".into(), text(&props.reply_to));
        if let Some(e) = &props.expiration {
            p.insert("expiration".into(), Value::String(e.clone()));
        }
        p.insert("delivery_mode".into(), json!(delivery_mode));
        p.insert(
            "delivery_info".into(),
            json!({"exchange": exchange, "routing_key": routing_key}),
        );
        p.insert("priority".into(), json!(props.priority.unwrap_or(0)));
        p.insert("body_encoding".into(), json!("base64"));
        p.insert("delivery_tag".into(), json!(new_tag()));
        let mut raw = Map::new();
        raw.insert("body".into(), Value::String(base64().encode(body)));
        raw.insert(
            "content-encoding".into(),
            text(&props.content_encoding)
                .as_str()
                .map_or(json!("utf-8"), |s| json!(s)),
        );
        raw.insert(
            "content-type".into(),
            text(&props.content_type)
                .as_str()
                .map_or(json!("application/json"), |s| json!(s)),
        );
        raw.insert("headers".into(), Value::Object(headers.clone()));
        raw.insert("properties".into(), Value::Object(p));
        Envelope { raw }
    }

    /// Reads an envelope; the error says what is missing.
    pub fn parse(text: &[u8]) -> Result<Envelope, String> {
        match serde_json::from_slice::<Value>(text) {
            Ok(Value::Object(raw)) => {
                let e = Envelope { raw };
                if e.tag().is_none() {
                    return Err("it has no properties.delivery_tag".into());
                }
                Ok(e)
            }
            Ok(_) => Err("it is JSON but not an object".into()),
            Err(e) => Err(format!("it is not JSON ({e})")),
        }
    }

    pub fn to_json(&self) -> String {
        Value::Object(self.raw.clone()).to_string()
    }

    fn props(&self) -> Option<&Map<String, Value>> {
        self.raw.get("properties").and_then(Value::as_object)
    }

    fn props_mut(&mut self) -> &mut Map<String, Value> {
        let p = self
            .raw
            .entry("properties")
            .or_insert_with(|| Value::Object(Map::new()));
        if !p.is_object() {
            *p = Value::Object(Map::new());
        }
        match p {
            Value::Object(m) => m,
            _ => unreachable!("just made an object"),
        }
    }

    /// kombu's delivery tag: the key of this message in `unacked`.
    pub fn tag(&self) -> Option<&str> {
        self.props()?.get("delivery_tag")?.as_str()
    }

    /// `delivery_info`'s exchange and routing key (empty when absent).
    pub fn exchange_and_routing_key(&self) -> (String, String) {
        let info = self.props().and_then(|p| p.get("delivery_info"));
        let get = |k: &str| {
            info.and_then(|i| i.get(k))
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned()
        };
        (get("exchange"), get("routing_key"))
    }

    /// kombu's `_get_message_priority`: `properties.priority` clamped to 0..=9, else 0.
    pub fn priority(&self) -> u8 {
        self.props()
            .and_then(|p| p.get("priority"))
            .and_then(|v| v.as_i64().or_else(|| v.as_f64().map(|f| f as i64)))
            .map_or(0, |p| p.clamp(0, 9) as u8)
    }

    /// Put back after a worker took it (kombu sets both when restoring).
    pub fn redelivered(&self) -> bool {
        let flag = |v: Option<&Value>| v.and_then(Value::as_bool).unwrap_or(false);
        flag(
            self.props()
                .and_then(|p| p.get("delivery_info"))
                .and_then(|i| i.get("redelivered")),
        ) || flag(self.raw.get("headers").and_then(|h| h.get("redelivered")))
    }

    /// Marks it as put back, as kombu's `_do_restore_message` does.
    pub fn mark_redelivered(&mut self) {
        if let Some(Value::Object(h)) = self.raw.get_mut("headers") {
            h.insert("redelivered".into(), Value::Bool(true));
        }
        if let Some(Value::Object(i)) = self.props_mut().get_mut("delivery_info") {
            i.insert("redelivered".into(), Value::Bool(true));
        }
    }

    /// The protocol properties and headers, as an AMQP delivery would carry them.
    pub fn properties(&self) -> (Properties, Map<String, Value>) {
        let text = |v: Option<&Value>| v.and_then(Value::as_str).map(str::to_owned);
        let p = self.props();
        let get = |k: &str| p.and_then(|p| p.get(k));
        let props = Properties {
            content_type: text(self.raw.get("content-type")),
            content_encoding: text(self.raw.get("content-encoding")),
            correlation_id: text(get("correlation_id")),
            reply_to: text(get("reply_to")),
            priority: Some(self.priority()),
            expiration: text(get("expiration")),
        };
        let mut headers = self
            .raw
            .get("headers")
            .and_then(Value::as_object)
            .cloned()
            .unwrap_or_default();
        // kombu's restore flag is transport bookkeeping, not a Celery header.
        headers.remove("redelivered");
        (props, headers)
    }

    /// The message body: base64-decoded when `body_encoding` says so (always, from kombu).
    pub fn body(&self) -> Result<Vec<u8>, String> {
        let body = match self.raw.get("body") {
            Some(Value::String(s)) => s,
            Some(_) => return Err("its body is not a string".into()),
            None => return Err("it has no body".into()),
        };
        let encoding = self
            .props()
            .and_then(|p| p.get("body_encoding"))
            .and_then(Value::as_str);
        match encoding {
            Some("base64") => base64()
                .decode(body.as_bytes())
                .map_err(|e| format!("its body is not valid base64 ({e})")),
            None => Ok(body.as_bytes().to_vec()),
            Some(other) => Err(format!(
                "its body_encoding {:?} is not supported (kombu writes base64)",
                crate::protocol::preview_str(other)
            )),
        }
    }

    /// A copy with other headers (`set` over the old, `remove` dropped) and a new delivery
    /// tag: what a delayed retry or a dead letter is published as.
    pub fn republished(&self, set: &Map<String, Value>, remove: &[&str], queue: &str) -> Envelope {
        let mut e = self.clone();
        let headers = e
            .raw
            .entry("headers")
            .or_insert_with(|| Value::Object(Map::new()));
        if let Value::Object(h) = headers {
            h.remove("redelivered");
            for k in remove {
                h.remove(*k);
            }
            for (k, v) in set {
                h.insert(k.clone(), v.clone());
            }
        }
        let p = e.props_mut();
        p.insert("delivery_tag".into(), json!(new_tag()));
        p.insert(
            "delivery_info".into(),
            json!({"exchange": "", "routing_key": queue}),
        );
        e
    }
}

fn new_tag() -> String {
    uuid::Uuid::new_v4().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_reads_kombus_form() {
        let props = Properties {
            content_type: Some("application/json".into()),
            content_encoding: Some("utf-8".into()),
            correlation_id: Some("id-1".into()),
            priority: Some(6),
            ..Properties::default()
        };
        let mut headers = Map::new();
        headers.insert("task".into(), json!("echo.echo"));
        let e = Envelope::new(&props, &headers, b"[[], {}, {}]", "echo");
        let back = Envelope::parse(e.to_json().as_bytes()).expect("parses");
        assert_eq!(back.body().expect("base64"), b"[[], {}, {}]");
        assert_eq!(back.priority(), 6);
        assert_eq!(back.properties().1["task"], "echo.echo");
        assert_eq!(back.exchange_and_routing_key(), ("".into(), "echo".into()));
        assert!(!back.redelivered());
        // What kombu 5.7 writes for send_task (trimmed), restored once.
        let kombu = br#"{"body": "W1tdLCB7fSwge31d", "content-encoding": "utf-8",
            "content-type": "application/json", "headers": {"id": "x", "redelivered": true},
            "properties": {"correlation_id": "x", "priority": 12, "body_encoding": "base64",
            "delivery_info": {"exchange": "echo", "routing_key": "echo", "redelivered": true},
            "delivery_tag": "t-1"}}"#;
        let k = Envelope::parse(kombu).expect("parses");
        assert_eq!(k.tag(), Some("t-1"));
        assert_eq!(k.priority(), 9);
        assert!(k.redelivered());
        assert!(!k.properties().1.contains_key("redelivered"));
        let again = k.republished(&Map::new(), &[], "echo");
        assert_ne!(again.tag(), Some("t-1"));
        assert!(!again.redelivered());
        assert!(Envelope::parse(b"[1]").is_err());
        assert!(Envelope::parse(br#"{"body": ""}"#).is_err());
    }
}

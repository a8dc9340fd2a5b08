//! Celery task protocol v2 with JSON bodies: decoding what Celery 5.x producers send and
//! encoding messages a Python Celery worker accepts. Pure data: the AMQP property and header
//! types are converted at the broker edge (`amqp_table`).

use chrono::{DateTime, NaiveDateTime, Utc};
use serde_json::{Map, Value};

/// Content types as Celery names them.
pub const JSON_CONTENT_TYPE: &str = "application/json";
const PICKLE_CONTENT_TYPE: &str = "application/x-python-serialize";

/// Why a message could not be turned into a job. `id`/`task` are set when they could be read,
/// so the failure can still be stored where the producer looks for it.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{reason}")]
pub struct DecodeError {
    pub id: Option<String>,
    pub task: Option<String>,
    pub reason: String,
}

/// AMQP message properties that matter to the protocol.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Properties {
    pub content_type: Option<String>,
    pub content_encoding: Option<String>,
    pub correlation_id: Option<String>,
    pub reply_to: Option<String>,
    pub priority: Option<u8>,
    /// Per-message TTL in milliseconds, as a decimal string (AMQP's form).
    pub expiration: Option<String>,
}

/// Celery's `timelimit` header is `[hard, soft]` on the wire (Celery 5.7 sends
/// `[time_limit, soft_time_limit]`), each in seconds or null.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct TimeLimits {
    pub hard: Option<f64>,
    pub soft: Option<f64>,
}

/// One task message: headers, arguments and the workflow embed.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskMessage {
    pub id: String,
    pub task: String,
    pub args: Vec<Value>,
    pub kwargs: Map<String, Value>,
    /// `{callbacks, errbacks, chain, chord}`; kept as sent so it can be passed on.
    pub embed: Map<String, Value>,
    pub lang: String,
    pub shadow: Option<String>,
    pub eta: Option<DateTime<Utc>>,
    pub expires: Option<DateTime<Utc>>,
    pub group: Option<String>,
    pub group_index: Option<i64>,
    pub retries: u32,
    pub timelimit: TimeLimits,
    pub root_id: Option<String>,
    pub parent_id: Option<String>,
    pub argsrepr: Option<String>,
    pub kwargsrepr: Option<String>,
    pub origin: Option<String>,
    pub ignore_result: bool,
    pub replaced_task_nesting: i64,
    pub stamped_headers: Option<Value>,
    pub stamps: Map<String, Value>,
    /// Headers this module does not interpret, kept so a re-published message carries them.
    pub extra_headers: Map<String, Value>,
    pub reply_to: Option<String>,
    pub priority: Option<u8>,
}

const KNOWN_HEADERS: &[&str] = &[
    "lang",
    "task",
    "id",
    "shadow",
    "eta",
    "expires",
    "group",
    "group_index",
    "retries",
    "timelimit",
    "root_id",
    "parent_id",
    "argsrepr",
    "kwargsrepr",
    "origin",
    "ignore_result",
    "replaced_task_nesting",
    "stamped_headers",
    "stamps",
];

/// `KNOWN_HEADERS.contains(name)`, as one `match` (a jump on the length, then one compare)
/// instead of a scan of 19 strings for each of a message's ~19 headers.
fn is_known_header(name: &str) -> bool {
    let known = matches!(
        name,
        "lang"
            | "task"
            | "id"
            | "shadow"
            | "eta"
            | "expires"
            | "group"
            | "group_index"
            | "retries"
            | "timelimit"
            | "root_id"
            | "parent_id"
            | "argsrepr"
            | "kwargsrepr"
            | "origin"
            | "ignore_result"
            | "replaced_task_nesting"
            | "stamped_headers"
            | "stamps"
    );
    debug_assert_eq!(known, KNOWN_HEADERS.contains(&name));
    known
}

const REPR_MAX: usize = 1024;

impl TaskMessage {
    /// A new message for `task` with keyword arguments, ready to publish.
    pub fn new(task: impl Into<String>, kwargs: Map<String, Value>) -> TaskMessage {
        let id = uuid::Uuid::new_v4().to_string();
        TaskMessage {
            root_id: Some(id.clone()),
            id,
            task: task.into(),
            args: Vec::new(),
            kwargs,
            embed: empty_embed(),
            lang: "rs".into(),
            shadow: None,
            eta: None,
            expires: None,
            group: None,
            group_index: None,
            retries: 0,
            timelimit: TimeLimits::default(),
            parent_id: None,
            argsrepr: None,
            kwargsrepr: None,
            origin: Some(default_origin()),
            ignore_result: false,
            replaced_task_nesting: 0,
            stamped_headers: None,
            stamps: Map::new(),
            extra_headers: Map::new(),
            reply_to: None,
            priority: None,
        }
    }

    /// Decodes a message as delivered: its properties, its headers (already as JSON) and body.
    pub fn decode(
        props: &Properties,
        headers: &Map<String, Value>,
        body: &[u8],
        max_body_bytes: usize,
    ) -> Result<TaskMessage, DecodeError> {
        let id = header_str(headers, "id").or_else(|| props.correlation_id.clone());
        let task = header_str(headers, "task");
        let fail = |reason: String| DecodeError {
            id: id.clone(),
            task: task.clone(),
            reason,
        };

        let content_type = props.content_type.as_deref().unwrap_or("");
        match content_type {
            JSON_CONTENT_TYPE => {}
            PICKLE_CONTENT_TYPE => {
                return Err(fail(format!(
                    "content type {PICKLE_CONTENT_TYPE} (pickle) refused: {}",
                    crate::settings::PICKLE_REFUSAL
                )))
            }
            "" => {
                return Err(fail(
                    "message has no content type; expected application/json".into(),
                ))
            }
            other => {
                return Err(fail(format!(
                    "content type {other} refused: mediafarm accepts application/json only"
                )))
            }
        }
        if let Some(enc) = props.content_encoding.as_deref() {
            if !enc.eq_ignore_ascii_case("utf-8") && !enc.eq_ignore_ascii_case("utf8") {
                return Err(fail(format!(
                    "content encoding {enc} refused: JSON bodies must be utf-8"
                )));
            }
        }
        if body.len() > max_body_bytes {
            return Err(fail(format!(
                "message body is {} bytes; the limit (task_message_max_bytes) is {} bytes",
                body.len(),
                max_body_bytes
            )));
        }
        let Some(task_name) = task.clone() else {
            if headers.is_empty() && looks_like_protocol_v1(body) {
                return Err(fail(
                    "Celery task protocol v1 is not supported; producers must use protocol 2 \
                     (Celery's default since 4.0: task_protocol = 2)"
                        .into(),
                ));
            }
            return Err(fail(
                "message has no `task` header (Celery protocol v2)".into(),
            ));
        };
        let Some(task_id) = header_str(headers, "id") else {
            return Err(fail(format!(
                "message for task {task_name} has no `id` header (Celery protocol v2)"
            )));
        };

        let parsed: Value = serde_json::from_slice(body)
            .map_err(|e| fail(format!("message body is not valid JSON: {e}")))?;
        let Value::Array(mut parts) = parsed else {
            return Err(fail(format!(
                "message body must be a JSON list [args, kwargs, embed]; got {}",
                json_kind(&parsed)
            )));
        };
        if parts.len() != 3 {
            return Err(fail(format!(
                "message body must be a JSON list of 3 items [args, kwargs, embed]; got {} items",
                parts.len()
            )));
        }
        let embed = match parts.pop() {
            Some(Value::Object(m)) => m,
            Some(Value::Null) => empty_embed(),
            Some(other) => {
                return Err(fail(format!(
                    "body item 3 (embed) must be an object; got {}",
                    json_kind(&other)
                )))
            }
            None => unreachable!("length checked above"),
        };
        let kwargs = match parts.pop() {
            Some(Value::Object(m)) => m,
            Some(Value::Null) => Map::new(),
            Some(other) => {
                return Err(fail(format!(
                    "body item 2 (kwargs) must be an object; got {}",
                    json_kind(&other)
                )))
            }
            None => unreachable!("length checked above"),
        };
        let args = match parts.pop() {
            Some(Value::Array(a)) => a,
            Some(Value::Null) => Vec::new(),
            Some(other) => {
                return Err(fail(format!(
                    "body item 1 (args) must be a list; got {}",
                    json_kind(&other)
                )))
            }
            None => unreachable!("length checked above"),
        };

        let retries = match headers.get("retries") {
            None | Some(Value::Null) => 0,
            Some(v) => v
                .as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| fail(format!("header `retries` must be a whole number; got {v}")))?,
        };
        let timelimit = parse_timelimit(headers.get("timelimit")).map_err(&fail)?;
        let eta = parse_time_header(headers, "eta").map_err(&fail)?;
        let expires = parse_time_header(headers, "expires").map_err(&fail)?;

        let extra_headers = headers
            .iter()
            .filter(|(k, _)| !is_known_header(k))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();

        Ok(TaskMessage {
            id: task_id,
            task: task_name,
            args,
            kwargs,
            embed,
            lang: header_str(headers, "lang").unwrap_or_else(|| "py".into()),
            shadow: header_str(headers, "shadow"),
            eta,
            expires,
            group: header_str(headers, "group"),
            group_index: headers.get("group_index").and_then(Value::as_i64),
            retries,
            timelimit,
            root_id: header_str(headers, "root_id"),
            parent_id: header_str(headers, "parent_id"),
            argsrepr: header_str(headers, "argsrepr"),
            kwargsrepr: header_str(headers, "kwargsrepr"),
            origin: header_str(headers, "origin"),
            ignore_result: headers
                .get("ignore_result")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            replaced_task_nesting: headers
                .get("replaced_task_nesting")
                .and_then(Value::as_i64)
                .unwrap_or(0),
            stamped_headers: headers
                .get("stamped_headers")
                .filter(|v| !v.is_null())
                .cloned(),
            stamps: headers
                .get("stamps")
                .and_then(Value::as_object)
                .cloned()
                .unwrap_or_default(),
            extra_headers,
            reply_to: props.reply_to.clone(),
            priority: props.priority,
        })
    }

    /// Encodes the message as Celery 5.x does: properties, headers (as JSON) and the body.
    pub fn encode(&self) -> (Properties, Map<String, Value>, Vec<u8>) {
        let mut h = Map::new();
        let s = |v: &Option<String>| v.clone().map(Value::String).unwrap_or(Value::Null);
        let t = |v: &Option<DateTime<Utc>>| {
            v.map(|d| Value::String(format_time(d)))
                .unwrap_or(Value::Null)
        };
        h.insert("lang".into(), Value::String(self.lang.clone()));
        h.insert("task".into(), Value::String(self.task.clone()));
        h.insert("id".into(), Value::String(self.id.clone()));
        h.insert("shadow".into(), s(&self.shadow));
        h.insert("eta".into(), t(&self.eta));
        h.insert("expires".into(), t(&self.expires));
        h.insert("group".into(), s(&self.group));
        h.insert(
            "group_index".into(),
            self.group_index.map(Value::from).unwrap_or(Value::Null),
        );
        h.insert("retries".into(), Value::from(self.retries));
        h.insert(
            "timelimit".into(),
            Value::Array(vec![
                self.timelimit.hard.map(Value::from).unwrap_or(Value::Null),
                self.timelimit.soft.map(Value::from).unwrap_or(Value::Null),
            ]),
        );
        h.insert("root_id".into(), s(&self.root_id));
        h.insert("parent_id".into(), s(&self.parent_id));
        let argsrepr = self
            .argsrepr
            .clone()
            .unwrap_or_else(|| truncated_repr(&Value::Array(self.args.clone())));
        let kwargsrepr = self
            .kwargsrepr
            .clone()
            .unwrap_or_else(|| truncated_repr(&Value::Object(self.kwargs.clone())));
        h.insert("argsrepr".into(), Value::String(argsrepr));
        h.insert("kwargsrepr".into(), Value::String(kwargsrepr));
        h.insert("origin".into(), s(&self.origin));
        h.insert("ignore_result".into(), Value::Bool(self.ignore_result));
        h.insert(
            "replaced_task_nesting".into(),
            Value::from(self.replaced_task_nesting),
        );
        h.insert(
            "stamped_headers".into(),
            self.stamped_headers.clone().unwrap_or(Value::Null),
        );
        h.insert("stamps".into(), Value::Object(self.stamps.clone()));
        for (k, v) in &self.extra_headers {
            h.entry(k.clone()).or_insert_with(|| v.clone());
        }

        let body = Value::Array(vec![
            Value::Array(self.args.clone()),
            Value::Object(self.kwargs.clone()),
            Value::Object(self.embed.clone()),
        ]);
        let props = Properties {
            content_type: Some(JSON_CONTENT_TYPE.into()),
            content_encoding: Some("utf-8".into()),
            correlation_id: Some(self.id.clone()),
            reply_to: self.reply_to.clone(),
            priority: Some(self.priority.unwrap_or(0)),
            expiration: None,
        };
        // Serialising a Value into a Vec cannot fail.
        let body = serde_json::to_vec(&body).unwrap_or_default();
        (props, h, body)
    }

    /// True when `expires` has passed.
    pub fn is_expired(&self, now: DateTime<Utc>) -> bool {
        self.expires.is_some_and(|e| e <= now)
    }
}

fn empty_embed() -> Map<String, Value> {
    ["callbacks", "errbacks", "chain", "chord"]
        .into_iter()
        .map(|k| (k.to_owned(), Value::Null))
        .collect()
}

fn default_origin() -> String {
    format!("gen{}@{}", std::process::id(), crate::hostname())
}

fn truncated_repr(v: &Value) -> String {
    let mut s = v.to_string();
    if s.len() > REPR_MAX {
        let mut cut = REPR_MAX - 3;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push_str("...");
    }
    s
}

fn header_str(headers: &Map<String, Value>, name: &str) -> Option<String> {
    match headers.get(name) {
        Some(Value::String(s)) if !s.is_empty() => Some(s.clone()),
        _ => None,
    }
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

fn looks_like_protocol_v1(body: &[u8]) -> bool {
    serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| {
            v.as_object()
                .map(|o| o.contains_key("task") && o.contains_key("id"))
        })
        .unwrap_or(false)
}

fn parse_timelimit(v: Option<&Value>) -> Result<TimeLimits, String> {
    let limit = |v: &Value| -> Result<Option<f64>, String> {
        match v {
            Value::Null => Ok(None),
            Value::Number(n) => match n.as_f64() {
                Some(f) if f.is_finite() && f >= 0.0 => Ok((f > 0.0).then_some(f)),
                _ => Err(format!("header `timelimit` has a bad limit {n}")),
            },
            other => Err(format!("header `timelimit` has a bad limit {other}")),
        }
    };
    match v {
        None | Some(Value::Null) => Ok(TimeLimits::default()),
        Some(Value::Array(a)) if a.len() == 2 => Ok(TimeLimits {
            hard: limit(&a[0])?,
            soft: limit(&a[1])?,
        }),
        Some(other) => Err(format!(
            "header `timelimit` must be [hard, soft] in seconds; got {other}"
        )),
    }
}

fn parse_time_header(
    headers: &Map<String, Value>,
    name: &str,
) -> Result<Option<DateTime<Utc>>, String> {
    match headers.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => parse_time(s)
            .map(Some)
            .ok_or_else(|| format!("header `{name}` is not an ISO 8601 time: {s:?}")),
        Some(other) => Err(format!(
            "header `{name}` must be an ISO 8601 time string; got {other}"
        )),
    }
}

/// Parses Python's `datetime.isoformat()` output; a time without offset is taken as UTC.
pub fn parse_time(s: &str) -> Option<DateTime<Utc>> {
    if let Ok(d) = DateTime::parse_from_rfc3339(s) {
        return Some(d.with_timezone(&Utc));
    }
    [
        "%Y-%m-%dT%H:%M:%S%.f",
        "%Y-%m-%dT%H:%M:%S",
        "%Y-%m-%d %H:%M:%S%.f",
    ]
    .iter()
    .find_map(|f| NaiveDateTime::parse_from_str(s, f).ok())
    .map(|n| n.and_utc())
}

/// Formats a time as Python's `datetime.isoformat()` does for an aware UTC datetime.
pub fn format_time(d: DateTime<Utc>) -> String {
    d.format("%Y-%m-%dT%H:%M:%S%.6f+00:00").to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn json_props() -> Properties {
        Properties {
            content_type: Some(JSON_CONTENT_TYPE.into()),
            content_encoding: Some("utf-8".into()),
            correlation_id: Some("abc".into()),
            ..Default::default()
        }
    }

    /// Headers exactly as Celery 5.7 sent them for `send_task(..., countdown=5, expires=60,
    /// time_limit=30, soft_time_limit=20)`, captured from RabbitMQ.
    fn celery_headers() -> Map<String, Value> {
        json!({
            "lang": "py", "task": "echo.echo", "id": "efb3dc1f-091a-4b70-b9e9-d735d9bcdd31",
            "shadow": null, "eta": "2026-11-24T03:33:10.022423+00:00",
            "expires": "2026-11-24T03:34:05.022423+00:00", "group": null, "group_index": null,
            "retries": 0, "timelimit": [30, 20], "root_id": "efb3dc1f-091a-4b70-b9e9-d735d9bcdd31",
            "parent_id": null, "argsrepr": "()", "kwargsrepr": "{'a': 1}", "origin": "gen6585@vm",
            "ignore_result": null, "replaced_task_nesting": 0, "stamped_headers": null, "stamps": {}
        })
        .as_object()
        .cloned()
        .unwrap()
    }

    const CELERY_BODY: &[u8] =
        br#"[[], {"a": 1}, {"callbacks": null, "errbacks": null, "chain": null, "chord": null}]"#;

    #[test]
    fn decodes_every_header_celery_sends() {
        let m =
            TaskMessage::decode(&json_props(), &celery_headers(), CELERY_BODY, 1 << 20).unwrap();
        assert_eq!(m.id, "efb3dc1f-091a-4b70-b9e9-d735d9bcdd31");
        assert_eq!(m.task, "echo.echo");
        assert_eq!(m.kwargs, *json!({"a": 1}).as_object().unwrap());
        assert!(m.args.is_empty());
        assert_eq!(
            m.timelimit,
            TimeLimits {
                hard: Some(30.0),
                soft: Some(20.0)
            }
        );
        assert_eq!(
            format_time(m.eta.unwrap()),
            "2026-11-24T03:33:10.022423+00:00"
        );
        assert_eq!(
            format_time(m.expires.unwrap()),
            "2026-11-24T03:34:05.022423+00:00"
        );
        assert_eq!(m.origin.as_deref(), Some("gen6585@vm"));
        assert_eq!(m.lang, "py");
        assert!(!m.ignore_result);
        assert!(m.extra_headers.is_empty());
        assert!(m.is_expired(parse_time("2026-11-24T04:00:00Z").unwrap()));
        assert!(!m.is_expired(parse_time("2026-11-24T03:00:00Z").unwrap()));
    }

    #[test]
    fn round_trips_through_encode() {
        let mut m = TaskMessage::new(
            "image.transform",
            json!({"source": "a.jpg"}).as_object().cloned().unwrap(),
        );
        m.eta = parse_time("2030-01-02T03:04:05.5+00:00");
        m.timelimit = TimeLimits {
            hard: Some(10.0),
            soft: None,
        };
        m.retries = 2;
        m.group = Some("g1".into());
        m.extra_headers.insert("x-custom".into(), json!("kept"));
        let (props, headers, body) = m.encode();
        assert_eq!(props.correlation_id.as_deref(), Some(m.id.as_str()));
        assert_eq!(headers["timelimit"], json!([10.0, null]));
        assert_eq!(headers["eta"], json!("2030-01-02T03:04:05.500000+00:00"));
        assert_eq!(headers["kwargsrepr"], json!(r#"{"source":"a.jpg"}"#));
        let back = TaskMessage::decode(&props, &headers, &body, 1 << 20).unwrap();
        // Encoding fills in what Celery always sends: reprs and priority 0.
        m.argsrepr = Some("[]".into());
        m.kwargsrepr = Some(r#"{"source":"a.jpg"}"#.into());
        m.priority = Some(0);
        assert_eq!(back, m);
    }

    #[test]
    fn nulls_in_body_are_empty() {
        let m = TaskMessage::decode(
            &json_props(),
            &celery_headers(),
            b"[null, null, null]",
            1024,
        )
        .unwrap();
        assert!(m.args.is_empty() && m.kwargs.is_empty());
        assert_eq!(m.embed.len(), 4);
    }

    #[test]
    fn naive_times_are_utc() {
        let d = parse_time("2026-01-01T10:00:00.250").unwrap();
        assert_eq!(format_time(d), "2026-01-01T10:00:00.250000+00:00");
        assert!(parse_time("tomorrow").is_none());
    }

    fn decode_err(props: &Properties, headers: &Map<String, Value>, body: &[u8]) -> DecodeError {
        TaskMessage::decode(props, headers, body, 4096).unwrap_err()
    }

    #[test]
    fn bad_bodies_are_explained_and_keep_the_id() {
        let h = celery_headers();
        let p = json_props();
        let cases: &[(&[u8], &str)] = &[
            (b"not json", "not valid JSON"),
            (
                b"{\"a\": 1}",
                "must be a JSON list [args, kwargs, embed]; got an object",
            ),
            (b"[[], {}]", "3 items [args, kwargs, embed]; got 2 items"),
            (
                b"[{}, {}, {}]",
                "item 1 (args) must be a list; got an object",
            ),
            (
                b"[[], [1], {}]",
                "item 2 (kwargs) must be an object; got a list",
            ),
            (
                b"[[], {}, 5]",
                "item 3 (embed) must be an object; got a number",
            ),
        ];
        for (body, want) in cases {
            let e = decode_err(&p, &h, body);
            assert!(
                e.reason.contains(want),
                "{:?}: {}",
                String::from_utf8_lossy(body),
                e.reason
            );
            assert_eq!(
                e.id.as_deref(),
                Some("efb3dc1f-091a-4b70-b9e9-d735d9bcdd31")
            );
            assert_eq!(e.task.as_deref(), Some("echo.echo"));
        }
    }

    #[test]
    fn bad_headers_are_explained() {
        let p = json_props();
        let mut h = celery_headers();
        h.insert("retries".into(), json!("three"));
        assert!(decode_err(&p, &h, CELERY_BODY).reason.contains("`retries`"));
        let mut h = celery_headers();
        h.insert("eta".into(), json!("soon"));
        assert!(decode_err(&p, &h, CELERY_BODY)
            .reason
            .contains("`eta` is not an ISO 8601"));
        let mut h = celery_headers();
        h.insert("timelimit".into(), json!([1]));
        assert!(decode_err(&p, &h, CELERY_BODY)
            .reason
            .contains("[hard, soft]"));
        let mut h = celery_headers();
        h.remove("task");
        let e = decode_err(&p, &h, CELERY_BODY);
        assert!(e.reason.contains("no `task` header"));
        assert_eq!(
            e.id.as_deref(),
            Some("efb3dc1f-091a-4b70-b9e9-d735d9bcdd31")
        );
        let mut h = celery_headers();
        h.remove("id");
        let e = decode_err(&p, &h, CELERY_BODY);
        assert!(e.reason.contains("no `id` header"), "{}", e.reason);
        assert_eq!(
            e.id.as_deref(),
            Some("abc"),
            "correlation_id stands in for the id"
        );
    }

    #[test]
    fn content_types_other_than_json_are_refused() {
        let h = celery_headers();
        let pickle = Properties {
            content_type: Some(PICKLE_CONTENT_TYPE.into()),
            ..json_props()
        };
        assert!(decode_err(&pickle, &h, b"\x80\x04")
            .reason
            .contains("runs code chosen by whoever"));
        let yaml = Properties {
            content_type: Some("application/x-yaml".into()),
            ..json_props()
        };
        assert!(decode_err(&yaml, &h, b"a: 1")
            .reason
            .contains("application/json only"));
        let latin = Properties {
            content_encoding: Some("latin-1".into()),
            ..json_props()
        };
        assert!(decode_err(&latin, &h, CELERY_BODY).reason.contains("utf-8"));
        let none = Properties {
            content_type: None,
            ..json_props()
        };
        assert!(decode_err(&none, &h, CELERY_BODY)
            .reason
            .contains("no content type"));
    }

    #[test]
    fn oversized_and_protocol_v1_messages_are_refused() {
        let big = vec![b' '; 5000];
        let e = decode_err(&json_props(), &celery_headers(), &big);
        assert!(e.reason.contains("5000 bytes") && e.reason.contains("task_message_max_bytes"));
        let v1 = br#"{"task": "echo.echo", "id": "x", "args": [], "kwargs": {}}"#;
        let e = decode_err(&json_props(), &Map::new(), v1);
        assert!(e.reason.contains("protocol v1"), "{}", e.reason);
    }

    #[test]
    fn known_headers_are_recognised_by_the_fast_check() {
        for name in KNOWN_HEADERS {
            assert!(is_known_header(name), "{name}");
        }
        for name in ["x-custom", "", "tas", "tasks", "ID", "stamp", "retries "] {
            assert!(!is_known_header(name), "{name}");
        }
    }

    #[test]
    fn long_reprs_are_truncated_on_a_char_boundary() {
        let kwargs = json!({"text": "é".repeat(2000)})
            .as_object()
            .cloned()
            .unwrap();
        let (_, headers, _) = TaskMessage::new("t", kwargs).encode();
        let repr = headers["kwargsrepr"].as_str().unwrap();
        assert!(repr.len() <= REPR_MAX && repr.ends_with("..."));
    }
}

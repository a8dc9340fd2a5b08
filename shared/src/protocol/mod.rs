//! Celery task protocol v2 with JSON bodies: decoding what Celery 5.x producers send and
//! encoding messages a Python Celery worker accepts. Pure data: the AMQP property and header
//! types are converted at the broker edge (`amqp_table`).

pub mod compression;
pub mod repr;

use chrono::{DateTime, Datelike, NaiveDateTime, Utc};
use serde_json::{Map, Value};

/// Content types as Celery names them.
pub const JSON_CONTENT_TYPE: &str = "application/json";
const PICKLE_CONTENT_TYPE: &str = "application/x-python-serialize";

/// Why `pickle` is never accepted, said wherever someone asks for it (a message's content type
/// or a setting).
pub const PICKLE_REFUSAL: &str = "pickle is refused: loading a pickle runs code chosen by whoever \
     wrote the message; mediafarm speaks JSON only (use \"json\")";

/// The queue a task goes to when none is named: the task name's prefix before the first dot
/// (`image.transform` → `image`).
pub fn default_queue(task: &str) -> String {
    task.split('.').next().unwrap_or(task).to_owned()
}

/// Whether RabbitMQ (and kombu) take `name` as a queue name: 1 to 200 characters, no spaces.
pub fn is_valid_queue_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 200 && !name.chars().any(char::is_whitespace)
}

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
    // Consumed here: the body is decompressed, so re-encoding must not claim it still is.
    "compression",
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
            | "compression"
    );
    debug_assert_eq!(known, KNOWN_HEADERS.contains(&name));
    known
}

use repr::REPR_MAX;

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
                    PICKLE_REFUSAL
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
            // kombu labels raw bytes published as JSON "binary"; the bytes are still UTF-8 JSON.
            let accepted = ["utf-8", "utf8", "binary"];
            if !accepted.iter().any(|a| enc.eq_ignore_ascii_case(a)) {
                return Err(fail(format!(
                    "content encoding {enc} refused: JSON bodies must be utf-8 \
                     (content_encoding utf-8, or binary as kombu labels raw bytes)"
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
                "message for task {} has no `id` header (Celery protocol v2)",
                preview_str(&task_name)
            )));
        };

        check_header_types(headers).map_err(&fail)?;
        let inflated;
        let body = match headers.get("compression") {
            None | Some(Value::Null) => body,
            Some(Value::String(method)) => {
                inflated = crate::protocol::compression::decompress(method, body, max_body_bytes)
                    .map_err(|e| fail(e.to_string()))?;
                &inflated[..]
            }
            Some(other) => {
                return Err(fail(format!(
                "header `compression` must name a method such as \"application/x-gzip\"; got {}",
                preview(other)
            )))
            }
        };
        let parsed = parse_body(body).map_err(&fail)?;
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
                .ok_or_else(|| {
                    fail(format!(
                        "header `retries` must be a whole number from 0 to {}; got {}",
                        u32::MAX,
                        preview(v)
                    ))
                })?,
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

/// Celery's `origin` of what this process sends, read once (a batch of a thousand messages
/// asked the kernel for the host name a thousand times).
fn default_origin() -> String {
    static ORIGIN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    ORIGIN
        .get_or_init(|| format!("gen{}@{}", std::process::id(), crate::hostname()))
        .clone()
}

fn truncated_repr(v: &Value) -> String {
    repr::py_repr_max(v, REPR_MAX)
}

fn header_str(headers: &Map<String, Value>, name: &str) -> Option<String> {
    match headers.get(name) {
        Some(Value::String(s)) if !s.is_empty() => Some(s.clone()),
        _ => None,
    }
}

/// A JSON value's kind as an error names it ("a list", "an object", ...).
pub fn json_kind(v: &Value) -> &'static str {
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

/// The longest time limit a message may ask for: ten years, as for the time settings. Larger
/// values (Python's `time_limit=1e20`) are refused rather than silently meaning "none".
pub const MAX_TIME_LIMIT_SECS: f64 = 315_360_000.0;

fn parse_timelimit(v: Option<&Value>) -> Result<TimeLimits, String> {
    let limit = |which: &str, v: &Value| -> Result<Option<f64>, String> {
        let bad = || {
            format!(
                "header `timelimit` has a bad {which} limit {}: accepted is null or a number of \
                 seconds from 0 to {MAX_TIME_LIMIT_SECS} (ten years)",
                preview(v)
            )
        };
        match v {
            Value::Null => Ok(None),
            Value::Number(n) => match n.as_f64() {
                Some(f) if f.is_finite() && (0.0..=MAX_TIME_LIMIT_SECS).contains(&f) => {
                    Ok((f > 0.0).then_some(f))
                }
                _ => Err(bad()),
            },
            _ => Err(bad()),
        }
    };
    match v {
        None | Some(Value::Null) => Ok(TimeLimits::default()),
        Some(Value::Array(a)) if a.len() == 2 => Ok(TimeLimits {
            hard: limit("hard", &a[0])?,
            soft: limit("soft", &a[1])?,
        }),
        Some(other) => Err(format!(
            "header `timelimit` must be [hard, soft] in seconds; got {}",
            preview(other)
        )),
    }
}

fn parse_time_header(
    headers: &Map<String, Value>,
    name: &str,
) -> Result<Option<DateTime<Utc>>, String> {
    match headers.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => {
            let t = parse_time(s).ok_or_else(|| {
                format!(
                    "header `{name}` is not an ISO 8601 time: {}",
                    preview(&Value::String(s.clone()))
                )
            })?;
            // Python's datetime stops at year 9999; anything later was not written by Celery
            // and would only circle through the delay queues for millennia.
            if !(1..=9999).contains(&t.year()) {
                return Err(format!(
                    "header `{name}` is {s:?}: accepted are times from year 1 to 9999 \
                     (Python's datetime range)"
                ));
            }
            Ok(Some(t))
        }
        Some(other) => Err(format!(
            "header `{name}` must be an ISO 8601 time string; got {}",
            preview(other)
        )),
    }
}

/// The JSON type each header Celery defines must have (null is always accepted); a header of
/// another type is refused by name instead of being silently ignored.
fn check_header_types(headers: &Map<String, Value>) -> Result<(), String> {
    const STRINGS: &[&str] = &[
        "lang",
        "task",
        "id",
        "shadow",
        "group",
        "root_id",
        "parent_id",
        "argsrepr",
        "kwargsrepr",
        "origin",
    ];
    for name in STRINGS {
        match headers.get(*name) {
            None | Some(Value::Null | Value::String(_)) => {}
            Some(other) => {
                return Err(format!(
                    "header `{name}` must be a string or null; got {}",
                    preview(other)
                ))
            }
        }
    }
    let check = |name: &str, ok: fn(&Value) -> bool, what: &str| match headers.get(name) {
        Some(v) if !v.is_null() && !ok(v) => Err(format!(
            "header `{name}` must be {what} or null; got {}",
            preview(v)
        )),
        _ => Ok(()),
    };
    check("ignore_result", Value::is_boolean, "true or false")?;
    check("group_index", Value::is_i64, "a whole number")?;
    check(
        "replaced_task_nesting",
        |v| v.as_u64().is_some_and(|n| n <= u64::from(u32::MAX)),
        "a whole number from 0 to 4294967295",
    )?;
    check("stamped_headers", Value::is_array, "a list")?;
    check("stamps", Value::is_object, "an object")?;
    Ok(())
}

/// A string from the wire as it may appear in an error a person reads: quoted, cut short.
pub fn preview_str(s: &str) -> String {
    preview(&Value::String(s.to_owned()))
}

/// A value as it may appear in an error a person reads: its JSON, cut short.
pub fn preview(v: &Value) -> String {
    const MAX: usize = 80;
    let text = v.to_string();
    if text.len() <= MAX {
        return text;
    }
    let mut cut = MAX;
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}… ({} bytes)", &text[..cut], text.len())
}

/// Parses the (decompressed) body. Python's `json.dumps` writes a str holding a lone UTF-16
/// surrogate as `"\ud800"`, which Celery accepts but which is no Unicode scalar value: such an
/// escape becomes U+FFFD (the replacement character), with a warning, and the job runs.
fn parse_body(body: &[u8]) -> Result<Value, String> {
    match serde_json::from_slice(body) {
        Ok(v) => Ok(v),
        Err(e) => {
            if let Some(repaired) = replace_lone_surrogates(body) {
                if let Ok(v) = serde_json::from_slice(&repaired) {
                    tracing::warn!(
                        "message body has lone UTF-16 surrogate escapes (Python's json.dumps \
                         writes them for such str values); each became U+FFFD"
                    );
                    return Ok(v);
                }
            }
            Err(format!("message body is not valid JSON: {e}"))
        }
    }
}

/// Rewrites every `\uD800`–`\uDFFF` escape that is not half of a proper surrogate pair as
/// `\uFFFD`; `None` when there is none.
fn replace_lone_surrogates(body: &[u8]) -> Option<Vec<u8>> {
    let hex4 = |at: usize| -> Option<u16> {
        let digits = body.get(at..at + 4)?;
        let text = std::str::from_utf8(digits).ok()?;
        u16::from_str_radix(text, 16).ok()
    };
    let escape_at = |at: usize| -> Option<u16> {
        (body.get(at) == Some(&b'\\') && body.get(at + 1) == Some(&b'u'))
            .then(|| hex4(at + 2))
            .flatten()
    };
    let mut out = Vec::with_capacity(body.len());
    let mut changed = false;
    let mut i = 0;
    while i < body.len() {
        if body[i] != b'\\' {
            out.push(body[i]);
            i += 1;
            continue;
        }
        match escape_at(i) {
            Some(0xD800..=0xDBFF) => {
                if matches!(escape_at(i + 6), Some(0xDC00..=0xDFFF)) {
                    out.extend_from_slice(&body[i..i + 12]);
                    i += 12;
                } else {
                    out.extend_from_slice(b"\\ufffd");
                    changed = true;
                    i += 6;
                }
            }
            Some(0xDC00..=0xDFFF) => {
                out.extend_from_slice(b"\\ufffd");
                changed = true;
                i += 6;
            }
            // Any other escape: copy the backslash and the escaped character together, so an
            // escaped backslash is never read as the start of another escape.
            _ => {
                out.extend_from_slice(&body[i..(i + 2).min(body.len())]);
                i += 2;
            }
        }
    }
    changed.then_some(out)
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
        // Python's repr, as Celery's producers write it (Flower and worker logs show it).
        assert_eq!(headers["kwargsrepr"], json!("{'source': 'a.jpg'}"));
        let back = TaskMessage::decode(&props, &headers, &body, 1 << 20).unwrap();
        // Encoding fills in what Celery always sends: reprs and priority 0.
        m.argsrepr = Some("[]".into());
        m.kwargsrepr = Some("{'source': 'a.jpg'}".into());
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
    fn numbers_out_of_range_are_refused_naming_the_header_value_and_range() {
        let p = json_props();
        // What Python's send_task(..., time_limit=1e20) and soft_time_limit=1e20 send.
        for (limits, which) in [
            (json!([1e20, null]), "hard"),
            (json!([null, 1e20]), "soft"),
            (json!([-1, null]), "hard"),
            (json!([null, "30"]), "soft"),
        ] {
            let mut h = celery_headers();
            h.insert("timelimit".into(), limits.clone());
            let e = decode_err(&p, &h, CELERY_BODY);
            assert!(
                e.reason.contains(&format!("bad {which} limit"))
                    && e.reason.contains("from 0 to 315360000"),
                "{limits}: {}",
                e.reason
            );
            assert_eq!(
                e.id.as_deref(),
                Some("efb3dc1f-091a-4b70-b9e9-d735d9bcdd31")
            );
        }
        let mut h = celery_headers();
        h.insert("timelimit".into(), json!([315360000, 1]));
        assert!(TaskMessage::decode(&p, &h, CELERY_BODY, 4096).is_ok());
        for bad in [json!(-1), json!(1.5), json!(5_000_000_000u64), json!(1e300)] {
            let mut h = celery_headers();
            h.insert("retries".into(), bad.clone());
            let e = decode_err(&p, &h, CELERY_BODY);
            assert!(
                e.reason.contains("from 0 to 4294967295"),
                "{bad}: {}",
                e.reason
            );
        }
        for (name, time, why) in [
            ("eta", "0000-01-01T00:00:00Z", "from year 1 to 9999"),
            (
                "expires",
                "0000-12-31T23:59:59.999999",
                "from year 1 to 9999",
            ),
            ("eta", "+275760-09-13T00:00:00Z", "not an ISO 8601 time"),
        ] {
            let mut h = celery_headers();
            h.insert(name.into(), json!(time));
            let e = decode_err(&p, &h, CELERY_BODY);
            assert!(
                e.reason.contains(&format!("header `{name}`")) && e.reason.contains(why),
                "{name}={time}: {}",
                e.reason
            );
        }
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
    fn headers_of_the_wrong_type_are_refused_by_name() {
        let p = json_props();
        for (name, value) in [
            ("group", json!(5)),
            ("parent_id", json!(["x"])),
            ("origin", json!({"a": 1})),
            ("ignore_result", json!("yes")),
            ("group_index", json!("1")),
            ("replaced_task_nesting", json!(-3)),
            ("stamped_headers", json!("a")),
            ("stamps", json!([1])),
            ("compression", json!(1)),
        ] {
            let mut h = celery_headers();
            h.insert(name.into(), value.clone());
            let e = decode_err(&p, &h, CELERY_BODY);
            assert!(
                e.reason.contains(&format!("header `{name}`")),
                "{name}: {}",
                e.reason
            );
        }
        let mut h = celery_headers();
        h.insert("argsrepr".into(), json!("x".repeat(100_000)));
        h.insert("lang".into(), json!(7));
        let e = decode_err(&p, &h, CELERY_BODY);
        assert!(e.reason.len() < 300, "values are cut short: {}", e.reason);
    }

    #[test]
    fn compressed_bodies_as_kombu_writes_them_decode() {
        use std::io::Write;
        let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
        z.write_all(CELERY_BODY).unwrap();
        let z = z.finish().unwrap();
        let mut h = celery_headers();
        h.insert("compression".into(), json!("application/x-gzip"));
        let m = TaskMessage::decode(&json_props(), &h, &z, 4096).unwrap();
        assert_eq!(m.kwargs, *json!({"a": 1}).as_object().unwrap());
        assert!(!m.extra_headers.contains_key("compression"));
        let (_, encoded, body) = m.encode();
        assert!(
            !encoded.contains_key("compression"),
            "re-encoded bodies are plain"
        );
        assert_eq!(
            TaskMessage::decode(&json_props(), &encoded, &body, 4096)
                .unwrap()
                .kwargs,
            m.kwargs
        );
        // The body was not JSON because it is compressed: say which compression failed.
        h.insert("compression".into(), json!("application/x-bz2"));
        let e = decode_err(&json_props(), &h, &z);
        assert!(
            e.reason.contains("application/x-bz2") && e.reason.contains("decompress"),
            "{}",
            e.reason
        );
    }

    #[test]
    fn binary_content_encoding_is_json_bytes() {
        let p = Properties {
            content_encoding: Some("binary".into()),
            ..json_props()
        };
        assert!(TaskMessage::decode(&p, &celery_headers(), CELERY_BODY, 4096).is_ok());
    }

    #[test]
    fn lone_surrogates_become_replacement_characters() {
        let body = br#"[[], {"a": "x\ud800y", "b": "\udfff", "pair": "\ud83d\ude00", "esc": "\\ud800"}, {}]"#;
        let m = TaskMessage::decode(&json_props(), &celery_headers(), body, 4096).unwrap();
        assert_eq!(m.kwargs["a"], "x\u{fffd}y");
        assert_eq!(m.kwargs["b"], "\u{fffd}");
        assert_eq!(m.kwargs["pair"], "\u{1f600}");
        assert_eq!(
            m.kwargs["esc"], "\\ud800",
            "an escaped backslash is not an escape"
        );
        // A body that is broken for another reason still says why.
        let e = decode_err(&json_props(), &celery_headers(), br#"[[], {"a": "\ud800"}"#);
        assert!(e.reason.contains("not valid JSON"), "{}", e.reason);
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

//! Conversion between AMQP field tables / message properties and the JSON forms the protocol
//! module works with. py-amqp encodes Python values the same way: None as void, str as a long
//! string, int as a signed 64-bit integer, float as a double, list as an array, dict as a table.
//!
//! A header nested deeper than the AMQP parser's limit ([`MAX_NESTING`] levels; the carried
//! patch in `patches/amq-protocol-types`) arrives with [`NESTING_LIMIT_MARKER`] in place of
//! the part that was not decoded. [`read_job_properties`] refuses such a message, naming the
//! header, so a job never runs on headers that lost part of what its producer sent.

use lapin::types::parsing::{MAX_NESTING, NESTING_LIMIT_MARKER};
use lapin::types::{AMQPValue, FieldArray, FieldTable, LongString, ShortString};
use lapin::BasicProperties;
use serde_json::{Map, Number, Value};

use crate::protocol::{DecodeError, Properties};

/// AMQP delivery mode for messages that survive a broker restart.
pub const PERSISTENT: u8 = 2;

pub fn table_to_json(table: &FieldTable) -> Map<String, Value> {
    table
        .inner()
        .iter()
        .map(|(k, v)| (k.as_str().to_owned(), value_to_json(v)))
        .collect()
}

pub fn value_to_json(v: &AMQPValue) -> Value {
    match v {
        AMQPValue::Boolean(b) => Value::Bool(*b),
        AMQPValue::ShortShortInt(n) => Value::from(*n),
        AMQPValue::ShortShortUInt(n) => Value::from(*n),
        AMQPValue::ShortInt(n) => Value::from(*n),
        AMQPValue::ShortUInt(n) => Value::from(*n),
        AMQPValue::LongInt(n) => Value::from(*n),
        AMQPValue::LongUInt(n) => Value::from(*n),
        AMQPValue::LongLongInt(n) => Value::from(*n),
        AMQPValue::Timestamp(n) => Value::from(*n),
        AMQPValue::Float(f) => float(f64::from(*f)),
        AMQPValue::Double(f) => float(*f),
        AMQPValue::DecimalValue(d) => float(f64::from(d.value) / 10f64.powi(i32::from(d.scale))),
        AMQPValue::ShortString(s) => Value::String(s.as_str().to_owned()),
        AMQPValue::LongString(s) => {
            Value::String(String::from_utf8_lossy(s.as_bytes()).into_owned())
        }
        AMQPValue::ByteArray(b) => {
            Value::String(String::from_utf8_lossy(b.as_slice()).into_owned())
        }
        AMQPValue::FieldArray(a) => Value::Array(a.as_slice().iter().map(value_to_json).collect()),
        AMQPValue::FieldTable(t) => Value::Object(table_to_json(t)),
        AMQPValue::Void => Value::Null,
    }
}

fn float(f: f64) -> Value {
    Number::from_f64(f)
        .map(Value::Number)
        .unwrap_or(Value::Null)
}

/// A value AMQP can only carry as a short string (a property, a table key) that is longer than
/// 255 bytes. lapin's `ShortString::from` panics on one, so every conversion goes through
/// [`short`] instead.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{what} is {bytes} bytes; AMQP carries it as a short string of at most 255 bytes")]
pub struct TooLong {
    pub what: String,
    pub bytes: usize,
}

fn short(s: &str, what: impl FnOnce() -> String) -> Result<ShortString, TooLong> {
    ShortString::try_new(s).map_err(|_| TooLong {
        what: what(),
        bytes: s.len(),
    })
}

/// A header key as an error shows it: quoted and cut to its first 40 characters.
fn shown_key(k: &str) -> String {
    let cut: String = k.chars().take(40).collect();
    let more = if cut.len() < k.len() { "…" } else { "" };
    format!("header key {:?}{more}", cut)
}

pub fn json_to_table(map: &Map<String, Value>) -> Result<FieldTable, TooLong> {
    let mut table = FieldTable::default();
    for (k, v) in map {
        table.insert(short(k, || shown_key(k))?, json_to_value(v)?);
    }
    Ok(table)
}

pub fn json_to_value(v: &Value) -> Result<AMQPValue, TooLong> {
    Ok(match v {
        Value::Null => AMQPValue::Void,
        Value::Bool(b) => AMQPValue::Boolean(*b),
        Value::Number(n) => match (n.as_i64(), n.as_f64()) {
            (Some(i), _) => AMQPValue::LongLongInt(i),
            (None, Some(f)) => AMQPValue::Double(f),
            (None, None) => AMQPValue::Void,
        },
        Value::String(s) => AMQPValue::LongString(LongString::from(s.as_bytes().to_vec())),
        Value::Array(a) => AMQPValue::FieldArray(FieldArray::from(
            a.iter().map(json_to_value).collect::<Result<Vec<_>, _>>()?,
        )),
        Value::Object(m) => AMQPValue::FieldTable(json_to_table(m)?),
    })
}

/// Reads the protocol-relevant properties and the headers of a delivered message.
pub fn read_properties(p: &BasicProperties) -> (Properties, Map<String, Value>) {
    let s = |v: &Option<ShortString>| v.as_ref().map(|s| s.as_str().to_owned());
    let props = Properties {
        content_type: s(p.content_type()),
        content_encoding: s(p.content_encoding()),
        correlation_id: s(p.correlation_id()),
        reply_to: s(p.reply_to()),
        priority: *p.priority(),
        expiration: s(p.expiration()),
    };
    let headers = p.headers().as_ref().map(table_to_json).unwrap_or_default();
    (props, headers)
}

/// [`read_properties`] for a delivered job: refuses headers the AMQP parser did not decode in
/// full, with the job's id and task when those headers are readable, so the refusal can be
/// stored where the producer looks.
pub fn read_job_properties(
    p: &BasicProperties,
) -> Result<(Properties, Map<String, Value>), DecodeError> {
    let (props, headers) = read_properties(p);
    let Some(reason) = header_problem(&headers) else {
        return Ok((props, headers));
    };
    let text = |key: &str| headers.get(key).and_then(Value::as_str).map(str::to_owned);
    Err(DecodeError {
        id: text("id").or_else(|| props.correlation_id.clone()),
        task: text("task"),
        reason,
    })
}

/// Why these headers cannot be trusted, naming the first header that holds a part the AMQP
/// parser skipped (nested deeper than [`MAX_NESTING`] levels); `None` when they are whole.
pub fn header_problem(headers: &Map<String, Value>) -> Option<String> {
    let (key, _) = headers.iter().find(|(_, v)| holds_nesting_marker(v))?;
    Some(format!(
        "header `{}` nests tables or arrays deeper than {MAX_NESTING} levels (the AMQP \
         parser's limit); the message was not decoded",
        key.escape_debug()
    ))
}

/// Walks with its own stack rather than recursing: a check for too-deep values should not
/// itself depend on how deep they are.
fn holds_nesting_marker(v: &Value) -> bool {
    let mut todo = vec![v];
    while let Some(v) = todo.pop() {
        match v {
            Value::String(s) if s == NESTING_LIMIT_MARKER => return true,
            Value::Array(items) => todo.extend(items),
            Value::Object(map) => todo.extend(map.values()),
            _ => {}
        }
    }
    false
}

/// Builds persistent message properties as Celery sets them; refuses what AMQP cannot carry
/// (a task id, reply-to or header key over 255 bytes) instead of panicking in lapin.
pub fn try_write_properties(
    props: &Properties,
    headers: &Map<String, Value>,
) -> Result<BasicProperties, TooLong> {
    let mut p = BasicProperties::default()
        .with_delivery_mode(PERSISTENT)
        .with_headers(json_to_table(headers)?);
    if let Some(v) = &props.content_type {
        p = p.with_content_type(short(v, || "content_type".into())?);
    }
    if let Some(v) = &props.content_encoding {
        p = p.with_content_encoding(short(v, || "content_encoding".into())?);
    }
    if let Some(v) = &props.correlation_id {
        p = p.with_correlation_id(short(v, || "the task id (correlation_id)".into())?);
    }
    if let Some(v) = &props.reply_to {
        p = p.with_reply_to(short(v, || "reply_to".into())?);
    }
    if let Some(v) = props.priority {
        p = p.with_priority(v);
    }
    if let Some(v) = &props.expiration {
        p = p.with_expiration(short(v, || "expiration".into())?);
    }
    Ok(p)
}

/// [`try_write_properties`] for values known to fit (tests, fixed properties).
///
/// # Panics
/// When a property or header key is longer than 255 bytes.
pub fn write_properties(props: &Properties, headers: &Map<String, Value>) -> BasicProperties {
    match try_write_properties(props, headers) {
        Ok(p) => p,
        Err(e) => panic!("write_properties: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Found by the `message_json` fuzz target: lapin's `ShortString::from` panics past 255
    /// bytes, so a producer-chosen task id or header key crashed the publishing thread.
    #[test]
    fn values_amqp_cannot_carry_are_refused_not_panicked_on() {
        let props = Properties {
            correlation_id: Some("i".repeat(256)),
            ..Properties::default()
        };
        let e = try_write_properties(&props, &Map::new()).unwrap_err();
        assert_eq!(e.bytes, 256);
        assert!(e.to_string().contains("task id"), "{e}");
        let long_key = "k".repeat(300);
        let headers = json!({"stamps": {long_key.clone(): 1}})
            .as_object()
            .cloned()
            .unwrap();
        let e = try_write_properties(&Properties::default(), &headers).unwrap_err();
        assert!(e.to_string().contains("header key \"kkkk"), "{e}");
        assert!(e.to_string().contains("300 bytes"), "{e}");
        let fits = Properties {
            correlation_id: Some("i".repeat(255)),
            ..Properties::default()
        };
        let headers = json!({"k".repeat(255): 1}).as_object().cloned().unwrap();
        assert!(try_write_properties(&fits, &headers).is_ok());
    }

    #[test]
    fn json_survives_a_round_trip_through_a_field_table() {
        let original = json!({
            "lang": "py", "retries": 3, "timelimit": [30, 2.5], "eta": null,
            "ignore_result": false, "stamps": {"a": ["x"]}, "kwargsrepr": "{'é': 1}"
        });
        let table = json_to_table(original.as_object().unwrap()).unwrap();
        assert_eq!(Value::Object(table_to_json(&table)), original);
    }

    /// Wire bytes of a value (type byte first) made of `levels` nested tables (each holding
    /// the next under key `k`) or arrays, written from the outside in without recursion.
    fn nested_value(levels: usize, tables: bool) -> Vec<u8> {
        let per_level = if tables { 7 } else { 5 };
        let mut out = Vec::with_capacity(levels * per_level);
        for level in 0..levels {
            let below = levels - level - 1;
            out.push(if tables { b'F' } else { b'A' });
            let content = u32::try_from(below * per_level).expect("fits a frame");
            out.extend_from_slice(&content.to_be_bytes());
            if tables && below > 0 {
                out.extend_from_slice(&[1, b'k']);
            }
        }
        out
    }

    fn long_string(s: &str) -> Vec<u8> {
        let mut out = vec![b'S'];
        out.extend_from_slice(&u32::try_from(s.len()).unwrap().to_be_bytes());
        out.extend_from_slice(s.as_bytes());
        out
    }

    /// Wire bytes of a field table (length first, as in message properties).
    fn table_bytes(entries: &[(String, Vec<u8>)]) -> Vec<u8> {
        let mut body = Vec::new();
        for (key, value) in entries {
            body.push(u8::try_from(key.len()).unwrap());
            body.extend_from_slice(key.as_bytes());
            body.extend_from_slice(value);
        }
        let mut out = u32::try_from(body.len()).unwrap().to_be_bytes().to_vec();
        out.extend_from_slice(&body);
        out
    }

    /// Parses as lapin's I/O thread does, on a thread with a quarter of that thread's 2 MiB
    /// stack: a parser that recursed once per level of input would overflow it (1,000,000
    /// levels would need gigabytes) and abort the test. The patched parser's 128 levels take
    /// under 300 KiB in an unoptimised build, much less optimised.
    fn parse_on_small_stack(bytes: Vec<u8>) -> FieldTable {
        std::thread::Builder::new()
            .stack_size(512 * 1024)
            .spawn(move || {
                let (rest, table) =
                    lapin::types::parsing::parse_field_table(&bytes[..]).expect("headers parse");
                assert!(rest.is_empty(), "{} bytes left over", rest.len());
                table
            })
            .expect("thread starts")
            .join()
            .expect("parser thread finished")
    }

    fn job_headers(deep_key: &str, deep_value: Vec<u8>) -> Vec<u8> {
        table_bytes(&[
            ("id".to_owned(), long_string("id-deep")),
            ("task".to_owned(), long_string("echo.echo")),
            (deep_key.to_owned(), deep_value),
        ])
    }

    #[test]
    fn headers_nested_past_the_limit_are_cut_there_with_a_bounded_stack() {
        for levels in [1_000, 100_000, 1_000_000] {
            for tables in [true, false] {
                let what = format!(
                    "{levels} nested {}",
                    if tables { "tables" } else { "arrays" }
                );
                let parsed =
                    parse_on_small_stack(job_headers("x-deep", nested_value(levels, tables)));
                let headers = table_to_json(&parsed);
                // The headers table is level 1, so `x-deep` holds levels 2..: 127 containers,
                // then the marker where level 129 was.
                let mut v = &headers["x-deep"];
                for level in 2..=MAX_NESTING {
                    v = match v {
                        Value::Object(m) if m.len() == 1 => &m["k"],
                        Value::Array(a) if a.len() == 1 => &a[0],
                        other => panic!("{what}: level {level} is {other}"),
                    };
                }
                assert_eq!(v, &Value::String(NESTING_LIMIT_MARKER.into()), "{what}");

                let props = BasicProperties::default().with_headers(parsed);
                let e = read_job_properties(&props).expect_err(&what);
                assert_eq!(e.id.as_deref(), Some("id-deep"), "{what}");
                assert_eq!(e.task.as_deref(), Some("echo.echo"), "{what}");
                assert_eq!(
                    e.reason,
                    "header `x-deep` nests tables or arrays deeper than 128 levels (the AMQP \
                     parser's limit); the message was not decoded",
                    "{what}"
                );
            }
        }
    }

    #[test]
    fn headers_nested_right_up_to_the_limit_are_decoded_whole() {
        // Levels 2..=128 under the key: the deepest that is still decoded.
        for tables in [true, false] {
            let parsed = parse_on_small_stack(job_headers("x-edge", nested_value(127, tables)));
            let headers = table_to_json(&parsed);
            assert_eq!(header_problem(&headers), None);
            let props = BasicProperties::default().with_headers(parsed);
            assert!(read_job_properties(&props).is_ok());
        }
    }

    #[test]
    fn wide_headers_parse_whole() {
        let mut entries: Vec<(String, Vec<u8>)> = (0..20_000)
            .map(|n| (format!("x-wide-{n:05}"), long_string("v")))
            .collect();
        entries.push(("id".to_owned(), long_string("id-wide")));
        let parsed = parse_on_small_stack(table_bytes(&entries));
        let headers = table_to_json(&parsed);
        assert_eq!(headers.len(), 20_001);
        assert_eq!(headers["x-wide-19999"], json!("v"));
        assert_eq!(header_problem(&headers), None);
    }

    #[test]
    fn only_the_exact_marker_is_a_problem() {
        let near = NESTING_LIMIT_MARKER.trim_start_matches('\0');
        let fine = json!({"a": near, "b": [[{"c": "amq-protocol"}]]});
        assert_eq!(header_problem(fine.as_object().unwrap()), None);
        let cut = json!({"a": 1, "b\n": [[{"c": NESTING_LIMIT_MARKER}]]});
        let reason = header_problem(cut.as_object().unwrap()).unwrap();
        assert!(reason.starts_with("header `b\\n` nests"), "{reason}");
    }

    #[test]
    fn properties_round_trip_and_are_persistent() {
        let props = Properties {
            content_type: Some("application/json".into()),
            content_encoding: Some("utf-8".into()),
            correlation_id: Some("id-1".into()),
            reply_to: Some("r".into()),
            priority: Some(3),
            expiration: None,
        };
        let headers = json!({"task": "t", "id": "id-1"})
            .as_object()
            .cloned()
            .unwrap();
        let basic = write_properties(&props, &headers);
        assert_eq!(*basic.delivery_mode(), Some(PERSISTENT));
        let (p2, h2) = read_properties(&basic);
        assert_eq!(p2, props);
        assert_eq!(h2, headers);
    }
}

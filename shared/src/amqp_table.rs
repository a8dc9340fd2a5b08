//! Conversion between AMQP field tables / message properties and the JSON forms the protocol
//! module works with. py-amqp encodes Python values the same way: None as void, str as a long
//! string, int as a signed 64-bit integer, float as a double, list as an array, dict as a table.

use lapin::types::{AMQPValue, FieldArray, FieldTable, LongString, ShortString};
use lapin::BasicProperties;
use serde_json::{Map, Number, Value};

use crate::protocol::Properties;

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

pub fn json_to_table(map: &Map<String, Value>) -> FieldTable {
    let mut table = FieldTable::default();
    for (k, v) in map {
        table.insert(ShortString::from(k.as_str()), json_to_value(v));
    }
    table
}

pub fn json_to_value(v: &Value) -> AMQPValue {
    match v {
        Value::Null => AMQPValue::Void,
        Value::Bool(b) => AMQPValue::Boolean(*b),
        Value::Number(n) => match (n.as_i64(), n.as_f64()) {
            (Some(i), _) => AMQPValue::LongLongInt(i),
            (None, Some(f)) => AMQPValue::Double(f),
            (None, None) => AMQPValue::Void,
        },
        Value::String(s) => AMQPValue::LongString(LongString::from(s.as_bytes().to_vec())),
        Value::Array(a) => AMQPValue::FieldArray(FieldArray::from(
            a.iter().map(json_to_value).collect::<Vec<_>>(),
        )),
        Value::Object(m) => AMQPValue::FieldTable(json_to_table(m)),
    }
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

/// Builds persistent message properties as Celery sets them.
pub fn write_properties(props: &Properties, headers: &Map<String, Value>) -> BasicProperties {
    let mut p = BasicProperties::default()
        .with_delivery_mode(PERSISTENT)
        .with_headers(json_to_table(headers));
    if let Some(v) = &props.content_type {
        p = p.with_content_type(v.as_str().into());
    }
    if let Some(v) = &props.content_encoding {
        p = p.with_content_encoding(v.as_str().into());
    }
    if let Some(v) = &props.correlation_id {
        p = p.with_correlation_id(v.as_str().into());
    }
    if let Some(v) = &props.reply_to {
        p = p.with_reply_to(v.as_str().into());
    }
    if let Some(v) = props.priority {
        p = p.with_priority(v);
    }
    if let Some(v) = &props.expiration {
        p = p.with_expiration(v.as_str().into());
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn json_survives_a_round_trip_through_a_field_table() {
        let original = json!({
            "lang": "py", "retries": 3, "timelimit": [30, 2.5], "eta": null,
            "ignore_result": false, "stamps": {"a": ["x"]}, "kwargsrepr": "{'é': 1}"
        });
        let table = json_to_table(original.as_object().unwrap());
        assert_eq!(Value::Object(table_to_json(&table)), original);
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

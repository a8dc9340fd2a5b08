//! The subset of AMF0 (Adobe's Action Message Format) an RTMP player needs: writing the values
//! of `connect`, `createStream` and `play`, and reading the server's answers (`_result`,
//! `_error`, `onStatus`). Reading is bounded: nesting deeper than [`MAX_DEPTH`] or a length
//! past the message's end is an error, never a panic or a large allocation.

/// How deep objects and arrays may nest in a message read.
pub const MAX_DEPTH: usize = 16;

/// A value read from or written to a message.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Number(f64),
    Bool(bool),
    Str(String),
    /// An object or ECMA array: its properties in order.
    Object(Vec<(String, Value)>),
    Array(Vec<Value>),
    Null,
    Undefined,
}

impl Value {
    /// The property `name` of an object.
    pub fn get(&self, name: &str) -> Option<&Value> {
        match self {
            Value::Object(props) => props.iter().find(|(k, _)| k == name).map(|(_, v)| v),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::Number(n) => Some(*n),
            _ => None,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum AmfError {
    #[error("AMF0 value cut short")]
    Short,
    #[error("AMF0 type marker {0:#04x} is not supported")]
    Marker(u8),
    #[error("AMF0 values nest deeper than {MAX_DEPTH}")]
    Deep,
}

pub fn write(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::Number(n) => {
            out.push(0x00);
            out.extend_from_slice(&n.to_be_bytes());
        }
        Value::Bool(b) => out.extend_from_slice(&[0x01, u8::from(*b)]),
        Value::Str(s) => {
            out.push(0x02);
            write_key(out, s);
        }
        Value::Object(props) => {
            out.push(0x03);
            for (k, v) in props {
                write_key(out, k);
                write(out, v);
            }
            out.extend_from_slice(&[0, 0, 0x09]);
        }
        Value::Array(items) => {
            out.push(0x0a);
            out.extend_from_slice(&(items.len() as u32).to_be_bytes());
            for v in items {
                write(out, v);
            }
        }
        Value::Null => out.push(0x05),
        Value::Undefined => out.push(0x06),
    }
}

/// A short string (keys and string values): the caller keeps it under 64 KiB.
fn write_key(out: &mut Vec<u8>, s: &str) {
    let bytes = &s.as_bytes()[..s.len().min(u16::MAX as usize)];
    out.extend_from_slice(&(bytes.len() as u16).to_be_bytes());
    out.extend_from_slice(bytes);
}

/// Reads every value of a message body.
pub fn read_all(mut data: &[u8]) -> Result<Vec<Value>, AmfError> {
    let mut values = Vec::new();
    while !data.is_empty() {
        values.push(read(&mut data, 0)?);
    }
    Ok(values)
}

fn take<'a>(data: &mut &'a [u8], n: usize) -> Result<&'a [u8], AmfError> {
    if data.len() < n {
        return Err(AmfError::Short);
    }
    let (head, rest) = data.split_at(n);
    *data = rest;
    Ok(head)
}

fn be_u16(data: &mut &[u8]) -> Result<usize, AmfError> {
    let b = take(data, 2)?;
    Ok(usize::from(u16::from_be_bytes([b[0], b[1]])))
}

fn be_u32(data: &mut &[u8]) -> Result<usize, AmfError> {
    let b = take(data, 4)?;
    Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
}

fn text(data: &mut &[u8], n: usize) -> Result<String, AmfError> {
    Ok(String::from_utf8_lossy(take(data, n)?).into_owned())
}

/// Properties up to the object-end marker (an empty key, then 0x09).
fn props(data: &mut &[u8], depth: usize) -> Result<Vec<(String, Value)>, AmfError> {
    let mut props = Vec::new();
    loop {
        let n = be_u16(data)?;
        if n == 0 && data.first() == Some(&0x09) {
            *data = &data[1..];
            return Ok(props);
        }
        let key = text(data, n)?;
        props.push((key, read(data, depth + 1)?));
    }
}

fn read(data: &mut &[u8], depth: usize) -> Result<Value, AmfError> {
    if depth > MAX_DEPTH {
        return Err(AmfError::Deep);
    }
    let marker = take(data, 1)?[0];
    Ok(match marker {
        0x00 => {
            let b = take(data, 8)?;
            let mut a = [0u8; 8];
            a.copy_from_slice(b);
            Value::Number(f64::from_be_bytes(a))
        }
        0x01 => Value::Bool(take(data, 1)?[0] != 0),
        0x02 => {
            let n = be_u16(data)?;
            Value::Str(text(data, n)?)
        }
        0x03 => Value::Object(props(data, depth)?),
        0x05 => Value::Null,
        0x06 => Value::Undefined,
        // ECMA array: a count (advisory), then properties as an object's.
        0x08 => {
            take(data, 4)?;
            Value::Object(props(data, depth)?)
        }
        0x0a => {
            let n = be_u32(data)?;
            // Each value is at least one byte: a count past the data is a lie.
            if n > data.len() {
                return Err(AmfError::Short);
            }
            // The count only bounds the loop: reserving it would let each nested level of
            // a hostile array reserve as many values as there are bytes left.
            let mut items = Vec::with_capacity(n.min(16));
            for _ in 0..n {
                items.push(read(data, depth + 1)?);
            }
            Value::Array(items)
        }
        // Date: milliseconds and a time zone, kept as the number.
        0x0b => {
            let b = take(data, 10)?;
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[..8]);
            Value::Number(f64::from_be_bytes(a))
        }
        0x0c => {
            let n = be_u32(data)?;
            Value::Str(text(data, n)?)
        }
        other => return Err(AmfError::Marker(other)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_round_trip() {
        let values = vec![
            Value::Str("connect".into()),
            Value::Number(1.0),
            Value::Object(vec![
                ("app".into(), Value::Str("live".into())),
                ("fpad".into(), Value::Bool(false)),
                (
                    "nested".into(),
                    Value::Object(vec![("n".into(), Value::Null)]),
                ),
            ]),
            Value::Null,
            Value::Array(vec![Value::Number(-1.5), Value::Undefined]),
        ];
        let mut out = Vec::new();
        for v in &values {
            write(&mut out, v);
        }
        assert_eq!(read_all(&out).unwrap(), values);
        assert_eq!(values[2].get("app").and_then(Value::as_str), Some("live"));
    }

    #[test]
    fn bad_input_is_an_error() {
        assert_eq!(read_all(&[0x02, 0x00, 0x05, b'a']), Err(AmfError::Short));
        assert_eq!(read_all(&[0x11]), Err(AmfError::Marker(0x11)));
        // An array claiming four billion items in five bytes.
        assert_eq!(
            read_all(&[0x0a, 0xff, 0xff, 0xff, 0xff, 0x05]),
            Err(AmfError::Short)
        );
        let deep: Vec<u8> = std::iter::repeat_n([0x03, 0x00, 0x01, b'k'], 40)
            .flatten()
            .collect();
        assert_eq!(read_all(&deep), Err(AmfError::Deep));
        // ECMA array (onMetaData's shape) reads as an object.
        let mut ecma = vec![0x08, 0, 0, 0, 1];
        ecma.extend_from_slice(&[0, 5]);
        ecma.extend_from_slice(b"width");
        write(&mut ecma, &Value::Number(320.0));
        ecma.extend_from_slice(&[0, 0, 0x09]);
        let v = read_all(&ecma).unwrap();
        assert_eq!(v[0].get("width").and_then(Value::as_f64), Some(320.0));
    }
}

//! Python's `repr` of a JSON value, as a Python program prints the value it decodes to
//! (`{'a': [1, None, True]}`), and Celery's `saferepr`-style cut to a length. Celery's events,
//! logs and chord errors carry these strings (`args`, `kwargs`, `result`, `exception`), and
//! Flower shows them as they are.

use serde_json::Value;

/// Celery's `argsrepr_maxsize` and `resultrepr_maxsize`: a repr longer than this is cut and
/// ends in `...`.
pub const REPR_MAX: usize = 1024;

/// A JSON value as Python's `repr` writes the value it decodes to.
pub fn py_repr(v: &Value) -> String {
    let mut out = String::new();
    write_repr(&mut out, v);
    out
}

/// [`py_repr`] cut to at most `max` bytes (on a character boundary), ending in `...` when
/// cut, as Celery's `saferepr(value, maxlen)` keeps event fields bounded.
pub fn py_repr_max(v: &Value, max: usize) -> String {
    let mut s = py_repr(v);
    cut(&mut s, max);
    s
}

/// Cuts `s` to at most `max` bytes, ending in `...` when cut.
pub fn cut(s: &mut String, max: usize) {
    if s.len() <= max {
        return;
    }
    let mut at = max.saturating_sub(3);
    while !s.is_char_boundary(at) {
        at -= 1;
    }
    s.truncate(at);
    s.push_str("...");
}

/// How Python prints an exception raised with one message: `ValueError('no such key')`.
pub fn exception_repr(exc_type: &str, message: &str) -> String {
    let mut out = String::with_capacity(exc_type.len() + message.len() + 4);
    out.push_str(exc_type);
    out.push('(');
    write_str(&mut out, message);
    out.push(')');
    out
}

fn write_repr(out: &mut String, v: &Value) {
    match v {
        Value::Null => out.push_str("None"),
        Value::Bool(true) => out.push_str("True"),
        Value::Bool(false) => out.push_str("False"),
        Value::Number(n) => out.push_str(&n.to_string()),
        Value::String(s) => write_str(out, s),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_repr(out, item);
            }
            out.push(']');
        }
        Value::Object(m) => {
            out.push('{');
            for (i, (k, v)) in m.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_str(out, k);
                out.push_str(": ");
                write_repr(out, v);
            }
            out.push('}');
        }
    }
}

/// A `str` as Python quotes it: single quotes unless the text has a `'` and no `"`.
fn write_str(out: &mut String, s: &str) {
    let quote = if s.contains('\'') && !s.contains('"') {
        '"'
    } else {
        '\''
    };
    out.reserve(s.len() + 2);
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                out.push_str(&format!("\\x{:02x}", c as u32))
            }
            c => out.push(c),
        }
    }
    out.push(quote);
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn values_print_as_python_prints_them() {
        assert_eq!(
            py_repr(&json!({"a": [1, null, true, false, 2.5], "b": "it's"})),
            r#"{'a': [1, None, True, False, 2.5], 'b': "it's"}"#
        );
        assert_eq!(py_repr(&json!("a'b\"c\n")), r#"'a\'b"c\n'"#);
        assert_eq!(py_repr(&json!([])), "[]");
        assert_eq!(exception_repr("ValueError", "x"), "ValueError('x')");
    }

    #[test]
    fn long_reprs_are_cut_on_a_character_boundary() {
        let s = py_repr_max(&json!("é".repeat(100)), 20);
        assert!(s.len() <= 20 && s.ends_with("..."), "{s}");
        assert_eq!(py_repr_max(&json!(1), 20), "1");
    }
}

//! Input checks every notify task shares: no CR or LF where a header is built (header
//! injection), E.164 phone numbers, non-empty bodies.

use mediafarm::TaskError;

/// Refuses a value that would become (part of) a header when it holds CR, LF or another
/// control character: a newline would start a header of the sender's choosing.
pub fn header_value(field: &str, value: &str) -> Result<(), TaskError> {
    if let Some(c) = value.chars().find(|c| c.is_control() && *c != '\t') {
        let what = match c {
            '\r' => "a carriage return (CR)".to_owned(),
            '\n' => "a line feed (LF)".to_owned(),
            other => format!("the control character U+{:04X}", other as u32),
        };
        return Err(TaskError::invalid(
            "HeaderInjection",
            format!(
                "`{field}` contains {what}; header values must be one line (a newline there \
                 would let the sender add headers of their own)"
            ),
        ));
    }
    Ok(())
}

/// An E.164 number: `+`, then 2 to 15 digits, the first not 0.
pub fn e164(field: &str, number: &str) -> Result<(), TaskError> {
    let digits = number.strip_prefix('+').unwrap_or("");
    let ok = (2..=15).contains(&digits.len())
        && digits.bytes().all(|b| b.is_ascii_digit())
        && !digits.starts_with('0');
    if !ok {
        return Err(TaskError::invalid(
            "InvalidPhoneNumber",
            format!(
                "`{field}` = {number:?} is not an E.164 number: a + then 2 to 15 digits with the \
                 country code first, e.g. \"+14155550123\""
            ),
        ));
    }
    Ok(())
}

/// Refuses an empty or whitespace-only body.
pub fn non_empty(what: &str, body: &str) -> Result<(), TaskError> {
    if body.trim().is_empty() {
        return Err(TaskError::invalid(
            "EmptyBody",
            format!("{what} is empty; give some text to send"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newlines_in_headers_are_refused() {
        assert!(header_value("subject", "Hello 世界\tok").is_ok());
        let e = header_value("subject", "Hi\r\nBcc: x@evil.test").unwrap_err();
        assert_eq!(e.exc_type, "HeaderInjection");
        assert!(e.message.contains("carriage return"), "{}", e.message);
        assert!(header_value("to", "a@b.c\n").is_err());
        assert!(header_value("to", "a\u{0}b").is_err());
    }

    #[test]
    fn e164_numbers() {
        for ok in ["+14155550123", "+8613800138000", "+44"] {
            assert!(e164("to", ok).is_ok(), "{ok}");
        }
        for bad in [
            "14155550123",
            "+0123",
            "+1 415 555",
            "+",
            "+1234567890123456",
            "+1a",
        ] {
            let e = e164("to", bad).unwrap_err();
            assert_eq!(e.exc_type, "InvalidPhoneNumber", "{bad}");
        }
    }

    #[test]
    fn empty_bodies() {
        assert!(non_empty("the SMS body", " \n").is_err());
        assert!(non_empty("the SMS body", "x").is_ok());
    }
}

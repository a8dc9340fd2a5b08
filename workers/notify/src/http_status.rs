//! What an HTTP provider's answer means for a retry: 2xx sent; 429 (after its `Retry-After`),
//! 408 and 5xx passing; other 4xx never going to work; network errors and timeouts passing.

use std::time::{Duration, SystemTime};

use mediafarm::TaskError;
use reqwest::header::{HeaderMap, RETRY_AFTER};
use reqwest::StatusCode;

/// Longest `Retry-After` honoured; a server asking for more is retried after this.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// The failure for a non-2xx answer from `what` (e.g. "Twilio"), with the provider's own words.
pub fn failure(what: &str, status: StatusCode, headers: &HeaderMap, detail: &str) -> TaskError {
    let detail = if detail.is_empty() {
        String::new()
    } else {
        format!(": {detail}")
    };
    let message = format!("{what} answered {status}{detail}");
    if status == StatusCode::TOO_MANY_REQUESTS {
        let mut e = TaskError::transient("ProviderThrottled", message);
        if let Some(after) = retry_after(headers) {
            e = e.retry_after(after);
        }
        return e;
    }
    if status.is_server_error() || status == StatusCode::REQUEST_TIMEOUT {
        let mut e = TaskError::transient("ProviderUnavailable", message);
        if let Some(after) = retry_after(headers) {
            e = e.retry_after(after);
        }
        return e;
    }
    if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
        return TaskError::permanent("ProviderAuthFailed", message);
    }
    if status.is_redirection() {
        return TaskError::permanent(
            "ProviderRedirected",
            format!("{message} (redirects are not followed)"),
        );
    }
    TaskError::permanent("ProviderRejected", message)
}

/// A request that got no answer: refused connection, reset, TLS failure, timeout.
pub fn unreachable(what: &str, error: &reqwest::Error) -> TaskError {
    let why = if error.is_timeout() {
        "no answer in time".to_owned()
    } else {
        let mut text = error.to_string();
        let mut source = std::error::Error::source(error);
        while let Some(s) = source {
            text.push_str(": ");
            text.push_str(&s.to_string());
            source = s.source();
        }
        text
    };
    TaskError::transient(
        "ProviderUnreachable",
        format!("{what} could not be reached: {why}"),
    )
}

/// `Retry-After` in seconds or as an HTTP date.
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let text = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    let delay = match text.parse::<u64>() {
        Ok(secs) => Duration::from_secs(secs),
        Err(_) => httpdate::parse_http_date(text)
            .ok()?
            .duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO),
    };
    Some(delay.min(MAX_RETRY_AFTER))
}

#[cfg(test)]
mod tests {
    use super::*;
    use mediafarm::FailureKind;
    use reqwest::header::HeaderValue;

    #[test]
    fn statuses_map_to_retry_causes() {
        let mut h = HeaderMap::new();
        h.insert(RETRY_AFTER, HeaderValue::from_static("7"));
        let e = failure("Twilio", StatusCode::TOO_MANY_REQUESTS, &h, "slow down");
        assert_eq!(
            e.kind,
            FailureKind::Transient {
                retry_after: Some(Duration::from_secs(7))
            }
        );
        assert!(e.message.contains("slow down"), "{}", e.message);
        let none = HeaderMap::new();
        assert!(matches!(
            failure("x", StatusCode::BAD_GATEWAY, &none, "").kind,
            FailureKind::Transient { retry_after: None }
        ));
        assert_eq!(
            failure("x", StatusCode::BAD_REQUEST, &none, "").kind,
            FailureKind::Permanent
        );
        assert_eq!(
            failure("x", StatusCode::UNAUTHORIZED, &none, "").exc_type,
            "ProviderAuthFailed"
        );
    }

    #[test]
    fn retry_after_as_a_date() {
        let mut h = HeaderMap::new();
        let later = SystemTime::now() + Duration::from_secs(120);
        h.insert(
            RETRY_AFTER,
            HeaderValue::from_str(&httpdate::fmt_http_date(later)).unwrap(),
        );
        let d = retry_after(&h).unwrap();
        assert!(
            d > Duration::from_secs(100) && d <= Duration::from_secs(120),
            "{d:?}"
        );
    }
}

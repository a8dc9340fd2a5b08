//! W3C Trace Context: the `traceparent` (and `tracestate`) values that carry a trace from one
//! process to the next. Python's opentelemetry-instrumentation-celery writes them as Celery
//! message headers; mediafarm reads them there and writes them on what a job publishes or
//! requests. Parsing is strict (version `00` layout, lower-case hex, no all-zero ids), so a bad
//! header starts a new trace instead of joining a wrong one.

use std::sync::Arc;

/// One span's place in a trace: what a child names as its parent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SpanContext {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    /// The `sampled` trace flag: a parent that was not sampled is not recorded under either.
    pub sampled: bool,
}

impl SpanContext {
    /// A `traceparent` value as the W3C spec defines it: `00-<32 hex>-<16 hex>-<2 hex>`.
    /// Later versions are read by their version-00 prefix, as the spec asks; `ff` is invalid.
    pub fn parse(value: &str) -> Option<SpanContext> {
        let value = value.trim();
        let parts: Vec<&str> = value.splitn(5, '-').collect();
        let [version, trace, span, flags, rest @ ..] = parts.as_slice() else {
            return None;
        };
        if version.len() != 2 || *version == "ff" || !lower_hex(version) {
            return None;
        }
        if *version == "00" && !rest.is_empty() {
            return None;
        }
        if trace.len() != 32 || span.len() != 16 || flags.len() != 2 {
            return None;
        }
        if !(lower_hex(trace) && lower_hex(span) && lower_hex(flags)) {
            return None;
        }
        let mut ctx = SpanContext {
            trace_id: [0; 16],
            span_id: [0; 8],
            sampled: false,
        };
        hex::decode_to_slice(trace, &mut ctx.trace_id).ok()?;
        hex::decode_to_slice(span, &mut ctx.span_id).ok()?;
        let mut f = [0u8; 1];
        hex::decode_to_slice(flags, &mut f).ok()?;
        ctx.sampled = f[0] & 1 == 1;
        if ctx.trace_id == [0; 16] || ctx.span_id == [0; 8] {
            return None;
        }
        Some(ctx)
    }

    /// This context as a version-00 `traceparent` value.
    pub fn traceparent(&self) -> String {
        format!(
            "00-{}-{}-{:02x}",
            hex::encode(self.trace_id),
            hex::encode(self.span_id),
            u8::from(self.sampled)
        )
    }

    /// A child of this context (same trace, new span id).
    pub fn child(&self) -> SpanContext {
        SpanContext {
            span_id: new_span_id(),
            ..*self
        }
    }

    /// The first span of a new trace, sampled.
    pub fn root() -> SpanContext {
        let mut trace_id = fastrand::u128(1..).to_be_bytes();
        // Random in all 128 bits; the W3C "random" flag is not claimed, so nothing more to do.
        if trace_id == [0; 16] {
            trace_id[15] = 1;
        }
        SpanContext {
            trace_id,
            span_id: new_span_id(),
            sampled: true,
        }
    }
}

fn new_span_id() -> [u8; 8] {
    fastrand::u64(1..).to_be_bytes()
}

fn lower_hex(s: &str) -> bool {
    s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// The context current inside a job: what is propagated to its messages and requests.
#[derive(Clone, Debug)]
pub struct Propagated {
    pub span: SpanContext,
    /// Passed on unchanged, as the spec asks of a participant that adds no entry of its own.
    pub tracestate: Option<Arc<str>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_round_trips_and_keeps_the_sampled_flag() {
        let text = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let ctx = SpanContext::parse(text).expect("valid");
        assert!(ctx.sampled);
        assert_eq!(ctx.traceparent(), text);
        let unsampled = SpanContext::parse(&text.replace("-01", "-00")).expect("valid");
        assert!(!unsampled.sampled);
        let child = ctx.child();
        assert_eq!(child.trace_id, ctx.trace_id);
        assert_ne!(child.span_id, ctx.span_id);
    }

    #[test]
    fn malformed_traceparents_are_refused() {
        for bad in [
            "",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331",
            "00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01",
            "00-00000000000000000000000000000000-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
            "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-extra",
            "00-0af7651916cd43dd8448eb211c80319-cb7ad6b7169203331-01",
        ] {
            assert_eq!(SpanContext::parse(bad), None, "{bad:?}");
        }
        // A later version is read by its version-00 prefix.
        let later = "01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-what-comes";
        assert!(SpanContext::parse(later).is_some());
    }
}

//! The HMAC signature on everything mediafarm POSTs to a receiver a job named (notify's
//! webhooks, snapshot's frame deliveries). A signed request carries
//! `X-Mediafarm-Timestamp: <unix seconds>` and
//! `X-Mediafarm-Signature: v1=<hex HMAC-SHA256(secret, "<timestamp>.<body>")>`.
//! A receiver recomputes the HMAC over the timestamp header, a dot and the raw body bytes,
//! compares in constant time, and refuses timestamps more than a few minutes old (replays).

use std::time::{SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use sha2::Sha256;

pub const TIMESTAMP_HEADER: &str = "x-mediafarm-timestamp";
pub const SIGNATURE_HEADER: &str = "x-mediafarm-signature";
/// The idempotency key of the delivery: the same on a repeat, so receivers can drop repeats.
pub const ID_HEADER: &str = "x-mediafarm-id";

/// The timestamp to sign with: now, in unix seconds (0 if the clock is before 1970).
pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// `v1=<hex>` for `body` sent at `timestamp`.
pub fn sign(secret: &[u8], timestamp: u64, body: &[u8]) -> String {
    format!(
        "v1={}",
        hex::encode(mac(secret, timestamp, body).finalize().into_bytes())
    )
}

/// Checks a `v1=<hex>` signature (in constant time), as a receiver would.
pub fn verify(secret: &[u8], timestamp: u64, body: &[u8], signature: &str) -> bool {
    let Some(bytes) = signature
        .strip_prefix("v1=")
        .and_then(|h| hex::decode(h).ok())
    else {
        return false;
    };
    mac(secret, timestamp, body).verify_slice(&bytes).is_ok()
}

fn mac(secret: &[u8], timestamp: u64, body: &[u8]) -> Hmac<Sha256> {
    // HMAC takes keys of any length, so this cannot fail.
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret).expect("HMAC accepts any key");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signs_timestamp_dot_body() {
        // Computed independently: printf '1700000000.{"a":1}' | openssl dgst -sha256 -hmac k
        let sig = sign(b"k", 1_700_000_000, br#"{"a":1}"#);
        assert_eq!(
            sig,
            "v1=1b6ad1bc9bf48c52ce01939866d5877c6cc4e87ddad27e16673cb8c4964394a3"
        );
        assert!(verify(b"k", 1_700_000_000, br#"{"a":1}"#, &sig));
        assert!(!verify(b"k", 1_700_000_001, br#"{"a":1}"#, &sig));
        assert!(!verify(b"other", 1_700_000_000, br#"{"a":1}"#, &sig));
        assert!(!verify(b"k", 1_700_000_000, br#"{"a":2}"#, &sig));
        assert!(!verify(b"k", 1_700_000_000, br#"{"a":1}"#, "v1=zz"));
    }

    #[test]
    fn an_empty_secret_still_signs() {
        // Frame deliveries sign with whatever `webhook_secret` holds, even "".
        assert!(verify(b"", 1, b"x", &sign(b"", 1, b"x")));
    }
}

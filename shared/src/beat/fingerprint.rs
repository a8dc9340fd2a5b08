//! The fingerprint of a beat's schedule: a short SHA-256 of its settings entries (name, task,
//! period or crontab, kwargs, queue, expires), in name order and with JSON objects' keys
//! sorted, so the same schedule written in another order has the same fingerprint.
//!
//! The leader records it beside its lease (`<prefix>:leader-schedule`); a beat starting under
//! the same `beat_key_prefix` compares it with its own and refuses to start on a difference:
//! two beats sharing a prefix elect one leader, and a follower with another schedule would
//! silently replace the leader's entries when it takes over (two environments on one Redis
//! with the default prefix would fence each other's beat). The entries kept in Redis
//! (`mediafarm schedule add`) are shared by every beat of the prefix and are not part of it.
//!
//! The comparison is made once, when a beat starts, against the current leader: two beats of
//! different schedules started together while no beat leads both pass it (the one that does
//! not win the lease then stands by with its own schedule).

use sha2::{Digest, Sha256};

use crate::schedule::ScheduleEntry;

/// The fingerprint of `entries` (hex, 16 characters: 64 bits of SHA-256).
pub fn schedule_fingerprint(entries: &[ScheduleEntry]) -> String {
    let mut sorted: Vec<&ScheduleEntry> = entries.iter().collect();
    sorted.sort_by(|a, b| a.name.cmp(&b.name));
    let mut hash = Sha256::new();
    for e in sorted {
        // serde_json's objects are sorted maps here (no `preserve_order`): a canonical text.
        hash.update(e.name.as_bytes());
        hash.update(b"\n");
        hash.update(e.to_json().to_string().as_bytes());
        hash.update(b"\n");
    }
    hex::encode(&hash.finalize()[..8])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedule::parse_table;

    fn entries(json: serde_json::Value) -> Vec<ScheduleEntry> {
        parse_table(&json).unwrap()
    }

    #[test]
    fn the_order_of_entries_and_keys_does_not_matter_but_any_field_does() {
        let a = entries(serde_json::json!({
            "a": {"task": "echo.echo", "every": 20, "kwargs": {"x": 1, "y": 2}},
            "b": {"task": "notify.email", "crontab": "0 * * * *"},
        }));
        let mut b = a.clone();
        b.reverse();
        assert_eq!(schedule_fingerprint(&a), schedule_fingerprint(&b));
        let c = entries(serde_json::json!({
            "a": {"task": "echo.echo", "every": 20, "kwargs": {"x": 1, "y": 3}},
            "b": {"task": "notify.email", "crontab": "0 * * * *"},
        }));
        assert_ne!(schedule_fingerprint(&a), schedule_fingerprint(&c));
        let d = entries(serde_json::json!({
            "a": {"task": "echo.echo", "every": 21, "kwargs": {"x": 1, "y": 2}},
            "b": {"task": "notify.email", "crontab": "0 * * * *"},
        }));
        assert_ne!(schedule_fingerprint(&a), schedule_fingerprint(&d));
        assert_ne!(schedule_fingerprint(&a), schedule_fingerprint(&a[..1]));
        assert_eq!(schedule_fingerprint(&[]).len(), 16);
    }
}

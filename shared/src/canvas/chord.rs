//! A chord's join as Celery's Redis backend makes it (`on_chord_part_return`,
//! `_unpack_chord_result`, `chord_error_from_stack` in `celery/backends/`): every header task,
//! once its result is stored (SUCCESS, final FAILURE or REVOKED), adds
//! [`member`] to the group's ordered set; the one that completes the count reads all results in
//! `group_index` order and either sends the body with the list of results first in its args
//! (unless immutable), or — when a header failed — stores the body's FAILURE `ChordError`
//! ("Dependency <id> raised ...") and sends the body's errbacks. A chord sent as a chain step
//! holds the rest of the chain in its body's `chain` option (as Celery's `_chord.run` puts
//! it); the body's message carries it on in its embed `chain`, as `callback.delay()` does. A
//! body that is a chain sends its first step with the results and the rest as its chain; its
//! `task_id` option (the last step's, as Celery freezes it) is the id a failed header fails.
//!
//! Exactly once: a header's member is encoded from its result as stored, with serde_json's
//! compact output, so the same stored record always gives the same bytes and a redelivered
//! header adds nothing to the count. The counters are deleted after the body is sent; a crash
//! between sending the body and deleting them sends the body again with the same task id (as
//! Celery would), never loses it.

use chrono::{DateTime, Utc};
use serde_json::{json, Value};

use crate::backend::result::{ResultMeta, TaskError, TaskState};
use crate::canvas::next::{derived_id, message, partial_args, Parent, Publish};
use crate::canvas::{CanvasError, Kind, Signature};
use crate::protocol::repr::py_repr;

/// A header task's place in its chord: the message's `group`, `group_index` and embed `chord`.
#[derive(Debug, Clone, PartialEq)]
pub struct ChordPart {
    pub group: String,
    pub index: Option<i64>,
    pub body: Signature,
}

impl ChordPart {
    /// The part a header message carries; a `chord` embed without a `group` header is broken.
    pub fn new(
        body: Signature,
        group: Option<&str>,
        index: Option<i64>,
    ) -> Result<ChordPart, CanvasError> {
        match group {
            Some(g) if !g.is_empty() => Ok(ChordPart {
                group: g.to_owned(),
                index,
                body,
            }),
            _ => Err(CanvasError::Invalid(format!(
                "this job is a chord header (embed `chord` = {}) but has no `group` header: \
                 the chord cannot be joined",
                body.describe()
            ))),
        }
    }
}

/// The `.j` set member for a header's outcome: `[1, id, state, result]`, `result` as stored.
pub fn member(task_id: &str, state: &TaskState, result: &Value) -> String {
    json!([1, task_id, state.as_str(), result]).to_string()
}

/// Whether the header whose return saw these counts completes the chord: the size is known
/// and the set holds size + diff members.
pub fn is_complete(ready: u64, diff: i64, size: Option<i64>) -> bool {
    match size {
        Some(size) if size > 0 => i64::try_from(ready).is_ok_and(|r| r == size + diff),
        _ => false,
    }
}

/// The header results in order, or the `ChordError` message of the first that failed.
pub fn results(members: &[String]) -> Result<Vec<Value>, String> {
    members
        .iter()
        .map(|raw| {
            let parsed: Value =
                serde_json::from_str(raw).map_err(|e| format!("Join error: {e}"))?;
            let (Some(tid), Some(state), Some(result)) = (
                parsed.get(1).and_then(Value::as_str),
                parsed.get(2).and_then(Value::as_str),
                parsed.get(3),
            ) else {
                return Err(format!(
                    "Join error: chord member {} is not [1, id, state, result]",
                    crate::protocol::preview(&parsed)
                ));
            };
            // Celery's PROPAGATE_STATES.
            match state {
                "FAILURE" | "REVOKED" => Err(format!(
                    "Dependency {tid} raised {}",
                    exception_repr(result)
                )),
                _ => Ok(result.clone()),
            }
        })
        .collect()
}

/// The body's message: the header results first in its args unless immutable, `parent_id` the
/// header that completed the chord, its `group` the body's `group_id` option as Celery sends it.
/// A body that is a chain sends its first step so (as Celery's `callback.delay(results)` on a
/// chain does), the rest of the chain, and what follows the chain, in that step's embed
/// `chain`.
pub fn body_message(
    part: &ChordPart,
    results: Vec<Value>,
    header: Parent<'_>,
    now: DateTime<Utc>,
) -> Publish {
    let results = [Value::Array(results)];
    if let Kind::Chain(steps) = &part.body.kind {
        if let Some((head, tail)) = steps.split_first() {
            let first = partial_args(&part.body, &results);
            let id = head.options.task_id.clone().unwrap_or_else(|| {
                uuid::Uuid::new_v5(
                    &super::next::NAMESPACE,
                    format!("{}/chord-body/0", part.group).as_bytes(),
                )
                .to_string()
            });
            let mut p = message(head, &first, header, id, now);
            // Reversed: what runs last first. The chain's own `chain` option follows the
            // chain; the head's own runs right after the head.
            let follows: Vec<Value> = part
                .body
                .options
                .chain
                .iter()
                .cloned()
                .chain(tail.iter().rev().map(|s| s.raw.clone()))
                .chain(head.options.chain.iter().cloned())
                .collect();
            if !follows.is_empty() {
                p.msg.embed.insert("chain".into(), Value::Array(follows));
            }
            return p;
        }
    }
    let id = body_id(part);
    let mut p = message(&part.body, &results, header, id, now);
    p.msg.group_index = part
        .body
        .raw
        .get("options")
        .and_then(|o| o.get("group_index"))
        .and_then(Value::as_i64);
    p
}

/// What a failed header does to the body, as `chord_error_from_stack`: the body's FAILURE
/// `ChordError` to store and its errbacks, old style, with the body's id.
pub fn body_failure(
    part: &ChordPart,
    reason: &str,
    now: DateTime<Utc>,
) -> (ResultMeta, Vec<Publish>) {
    let id = body_id(part);
    let error =
        TaskError::permanent("ChordError", reason.to_owned()).in_module("celery.exceptions");
    let meta = ResultMeta::failure(
        &id,
        &error,
        format!("celery.exceptions.ChordError: {reason}"),
    );
    let parent = Parent {
        id: &id,
        root_id: &id,
    };
    let failed = Value::String(id.clone());
    let errbacks = part
        .body
        .options
        .link_error
        .iter()
        .enumerate()
        // Each was decoded when the message was: a failure here cannot happen.
        .filter_map(|(i, raw)| {
            Signature::decode(raw, "chord body option `link_error`")
                .ok()
                .map(|s| (i, s))
        })
        .map(|(i, sig)| {
            let eid = derived_id(&sig, parent, &format!("errback/{i}"));
            message(&sig, std::slice::from_ref(&failed), parent, eid, now)
        })
        .collect();
    (meta, errbacks)
}

/// The body's task id: the one the producer froze it with, else one derived from the group.
pub fn body_id(part: &ChordPart) -> String {
    part.body.options.task_id.clone().unwrap_or_else(|| {
        uuid::Uuid::new_v5(
            &super::next::NAMESPACE,
            format!("{}/chord-body", part.group).as_bytes(),
        )
        .to_string()
    })
}

/// How Python prints the exception a stored FAILURE result re-raises: `StepFailure('msg')`.
fn exception_repr(result: &Value) -> String {
    let name = result
        .get("exc_type")
        .and_then(Value::as_str)
        .unwrap_or("Exception");
    let args = match result.get("exc_message") {
        Some(Value::Array(items)) => items.iter().map(py_repr).collect::<Vec<_>>().join(", "),
        Some(Value::Null) | None => String::new(),
        Some(one) => py_repr(one),
    };
    format!("{name}({args})")
}

//! A chord's join as Celery's Redis backend makes it (`on_chord_part_return`,
//! `_unpack_chord_result`, `chord_error_from_stack` in `celery/backends/`): every header task,
//! once its result is stored (SUCCESS, final FAILURE or REVOKED), adds [`member`] to the
//! group's ordered set; the one that completes the count and takes the dispatch claim
//! (`backend::chord`) reads all results in `group_index` order and either sends the body with
//! the list of results first in its args (unless immutable), or — when a header failed — stores
//! the body's FAILURE and sends its errbacks. A chord sent as a chain step holds the rest of
//! the chain in its body's `chain` option (as Celery's `_chord.run` puts it); the body's message
//! carries it on in its embed `chain`, as `callback.delay()` does; when a header fails, every
//! step of that chain fails with the body's `ChordError`, as Celery 5.7's `_fail_chain` does.
//!
//! The body may be one task, a chain (its first step gets the results, the rest follow as its
//! chain; its `task_id` option, the last step's, is the id a failed header fails), a group
//! (each task gets the results; a failed header fails each with the header's own exception, as
//! `_handle_group_chord_error`) or a chord (its header tasks get the results; a failed header
//! fails its body).
//!
//! Exactly once: a header task counts once however often it returns (the `.d` set), only the
//! holder of the dispatch claim sends the body, and once sent the chord is marked done so late
//! copies of a header are ignored. A crash between sending the body and marking it done sends
//! it again when the claim has lapsed, with the same task id (as Celery would), never loses it.

use chrono::{DateTime, Utc};
use serde_json::{json, Value};

use crate::backend::result::{ResultMeta, TaskError, TaskState};
use crate::canvas::next::{derived_id, message, partial_args, Next, Parent, Publish};
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

/// Why a chord's body does not run: a header failed (or was revoked, or its member cannot be
/// read).
#[derive(Debug, Clone, PartialEq)]
pub struct ChordFailure {
    /// The `ChordError` message: "Dependency <id> raised StepFailure('...')".
    pub reason: String,
    /// The failed header's stored exception (`exc_type`, `exc_message`, `exc_module`), which
    /// Celery stores for each task of a group body; `None` when no header's could be read.
    pub cause: Option<Value>,
}

/// The header results in order, or the `ChordError` of the first that failed.
pub fn results(members: &[String]) -> Result<Vec<Value>, ChordFailure> {
    let broken = |reason: String| ChordFailure {
        reason,
        cause: None,
    };
    members
        .iter()
        .map(|raw| {
            let parsed: Value =
                serde_json::from_str(raw).map_err(|e| broken(format!("Join error: {e}")))?;
            let (Some(tid), Some(state), Some(result)) = (
                parsed.get(1).and_then(Value::as_str),
                parsed.get(2).and_then(Value::as_str),
                parsed.get(3),
            ) else {
                return Err(broken(format!(
                    "Join error: chord member {} is not [1, id, state, result]",
                    crate::protocol::preview(&parsed)
                )));
            };
            // Celery's PROPAGATE_STATES.
            match state {
                "FAILURE" | "REVOKED" => Err(ChordFailure {
                    reason: format!("Dependency {tid} raised {}", exception_repr(result)),
                    cause: Some(result.clone()),
                }),
                _ => Ok(result.clone()),
            }
        })
        .collect()
}

/// The body's messages: the header results first in its args unless immutable, `parent_id` the
/// header that completed the chord, its `group` the body's `group_id` option as Celery sends it.
/// As Celery's `callback.delay(results)` sends each kind of body:
///
/// - a chain: its first step so, the rest of the chain, and what follows the chain, in that
///   step's embed `chain`;
/// - a group: each of its tasks so, with the group's id (the body's `task_id`) as their `group`
///   and their `group_index`;
/// - a chord: its header so, each task carrying the chord's body, after the chord's size is set
///   ([`Next::chord_sizes`]), as a chord sent as a callback.
pub fn body_message(
    part: &ChordPart,
    results: Vec<Value>,
    header: Parent<'_>,
    now: DateTime<Utc>,
) -> Next {
    let results = [Value::Array(results)];
    let mut next = Next::default();
    match &part.body.kind {
        Kind::Chain(steps) if !steps.is_empty() => {
            let (head, tail) = steps.split_at(1);
            let head = &head[0];
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
            next.publish.push(p);
        }
        Kind::Group(members) => {
            let partial = partial_args(&part.body, &results);
            let gid = body_id(part);
            for (i, m) in members.iter().enumerate() {
                let id = group_member_id(m, &gid, i);
                let mut p = message(m, &partial, header, id, now);
                p.msg.group = Some(gid.clone());
                p.msg.group_index = m.options.group_index.or(i64::try_from(i).ok());
                next.publish.push(p);
            }
        }
        Kind::Chord(_) => {
            super::next::send_one(&part.body, &results, header, "chord-body", now, &mut next);
        }
        _ => {
            let id = body_id(part);
            let mut p = message(&part.body, &results, header, id, now);
            p.msg.group_index = part
                .body
                .raw
                .get("options")
                .and_then(|o| o.get("group_index"))
                .and_then(Value::as_i64);
            next.publish.push(p);
        }
    }
    next
}

/// The id of task `i`, `member`, of a group body: the one the producer froze, else one derived
/// from the group's id and `i` (the same on every worker).
fn group_member_id(member: &Signature, group: &str, i: usize) -> String {
    member.options.task_id.clone().unwrap_or_else(|| {
        uuid::Uuid::new_v5(&super::next::NAMESPACE, format!("{group}/{i}").as_bytes()).to_string()
    })
}

/// What a failed header does to the body, as Celery's `chord_error_from_stack`: the results to
/// store and the errbacks to send, old style, each with the id of what failed.
///
/// - A task or a chain body: FAILURE `ChordError` for the body's id (a chain's: its last
///   step's), its errbacks (a chain's own `link_error`) with that id.
/// - A group body (`_handle_group_chord_error`): each of its tasks FAILURE with the failed
///   header's own exception, and the group's id too; each task's errbacks and the group's, with
///   that task's id.
/// - A chord body: FAILURE `ChordError` for its body's id (the result Python's
///   `chord(...).apply_async()` returned waits on) and that body's errbacks.
///
/// Then, whatever the body, the chain that follows the chord (the body's `chain` option, when
/// the chord is a chain step) fails with the same `ChordError`, as Celery 5.7's `_fail_chain`
/// does ([`chain_failures`]), so `.get()` on the chain's last result raises instead of waiting.
pub fn body_failure(
    part: &ChordPart,
    failure: &ChordFailure,
    now: DateTime<Utc>,
) -> (Vec<ResultMeta>, Vec<Publish>) {
    let (mut metas, errbacks) = body_failure_of_body(part, failure, now);
    metas.extend(chain_failures(&part.body.options.chain, &failure.reason));
    (metas, errbacks)
}

/// The FAILURE records Celery 5.7's `_fail_chain` stores for the chain `chain` (reversed, as
/// the embed `chain`) after a failed chord: [`fail_chain`] with `ChordError` and `reason`, no
/// traceback.
pub fn chain_failures(chain: &[Value], reason: &str) -> Vec<ResultMeta> {
    let error =
        TaskError::permanent("ChordError", reason.to_owned()).in_module("celery.exceptions");
    fail_chain(chain, &error.to_celery_json(), None)
}

/// Celery's `_fail_chain`: the records of the steps chained after a failed one (`chain`, the
/// embed `chain` as sent), each FAILURE with the failure's `result` and `traceback`, for
/// every step that has a `task_id` option (with its `group_id` when it has one) and, for a
/// step that is a chord, its body too (the result the steps after it wait on), descending as
/// Celery does. Steps without an id are skipped, as in Celery. Celery also joins a step that
/// is itself a chord header member (`chord` in its options) into its chord; mediafarm sends
/// no such step.
pub fn fail_chain(chain: &[Value], result: &Value, traceback: Option<&str>) -> Vec<ResultMeta> {
    let mut todo: std::collections::VecDeque<&Value> = chain.iter().collect();
    let mut metas = Vec::new();
    while let Some(step) = todo.pop_front() {
        let options = step.get("options");
        let text = |name: &str| options.and_then(|o| o.get(name)).and_then(Value::as_str);
        if let Some(id) = text("task_id") {
            let mut meta = ResultMeta::new(id, TaskState::Failure, result.clone());
            meta.traceback = traceback.map(str::to_owned);
            if let Some(group) = text("group_id") {
                meta.extra
                    .insert("group_id".into(), Value::String(group.to_owned()));
            }
            metas.push(meta);
        }
        if step.get("subtask_type").and_then(Value::as_str) == Some("chord") {
            if let Some(body) = step
                .get("kwargs")
                .and_then(|k| k.get("body"))
                .filter(|b| !b.is_null())
            {
                todo.push_back(body);
            }
        }
    }
    metas
}

/// [`body_failure`] for the body itself.
fn body_failure_of_body(
    part: &ChordPart,
    failure: &ChordFailure,
    now: DateTime<Utc>,
) -> (Vec<ResultMeta>, Vec<Publish>) {
    let reason = failure.reason.as_str();
    let chord_error = |id: &str| {
        let error =
            TaskError::permanent("ChordError", reason.to_owned()).in_module("celery.exceptions");
        ResultMeta::failure(
            id,
            &error,
            format!("celery.exceptions.ChordError: {reason}"),
        )
    };
    match &part.body.kind {
        Kind::Group(members) => {
            let gid = body_id(part);
            let original = |id: &str| match &failure.cause {
                Some(cause) => {
                    let mut meta = ResultMeta::new(id, TaskState::Failure, cause.clone());
                    meta.traceback = Some(reason.to_owned());
                    meta
                }
                None => chord_error(id),
            };
            let mut metas = Vec::with_capacity(members.len() + 1);
            let mut errbacks = Vec::new();
            for (i, m) in members.iter().enumerate() {
                let id = group_member_id(m, &gid, i);
                metas.push(original(&id));
                let mut seen: Vec<&Value> = Vec::new();
                for raw in m
                    .options
                    .link_error
                    .iter()
                    .chain(&part.body.options.link_error)
                {
                    if !seen.contains(&raw) {
                        seen.push(raw);
                    }
                }
                errbacks.extend(errback_messages(&seen, &id, &format!("errback/{i}"), now));
            }
            metas.push(original(&gid));
            (metas, errbacks)
        }
        Kind::Chord(c) => {
            let id = body_id_of(&c.body, &part.group);
            let links: Vec<&Value> = c.body.options.link_error.iter().collect();
            let errbacks = errback_messages(&links, &id, "errback", now);
            (vec![chord_error(&id)], errbacks)
        }
        _ => {
            let id = body_id(part);
            let links: Vec<&Value> = part.body.options.link_error.iter().collect();
            let errbacks = errback_messages(&links, &id, "errback", now);
            (vec![chord_error(&id)], errbacks)
        }
    }
}

/// The errbacks `links` (each decoded when the message was), old style, with `failed`'s id.
fn errback_messages(
    links: &[&Value],
    failed: &str,
    role: &str,
    now: DateTime<Utc>,
) -> Vec<Publish> {
    let parent = Parent {
        id: failed,
        root_id: failed,
    };
    let failed_id = Value::String(failed.to_owned());
    links
        .iter()
        .enumerate()
        // Each was decoded when the message was: a failure here cannot happen.
        .filter_map(|(i, raw)| {
            Signature::decode(raw, "chord body option `link_error`")
                .ok()
                .map(|s| (i, s))
        })
        .map(|(i, sig)| {
            let eid = derived_id(&sig, parent, &format!("{role}/{i}"));
            message(&sig, std::slice::from_ref(&failed_id), parent, eid, now)
        })
        .collect()
}

/// The body's task id: the one the producer froze it with, else one derived from the group.
pub fn body_id(part: &ChordPart) -> String {
    body_id_of(&part.body, &part.group)
}

fn body_id_of(body: &Signature, group: &str) -> String {
    body.options.task_id.clone().unwrap_or_else(|| {
        uuid::Uuid::new_v5(
            &super::next::NAMESPACE,
            format!("{group}/chord-body").as_bytes(),
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

//! The messages that carry a workflow on after a job ends, built as Celery's worker builds them
//! (`celery/app/trace.py`, `celery/backends/base.py`):
//!
//! - on SUCCESS, each callback, then the next chain step (the LAST item of the reversed
//!   `chain`; the rest travels on as the new message's `chain`), a non-immutable one receiving
//!   the return value as its first positional argument. Several callbacks go out as one group,
//!   as Celery sends them. The job's result record lists them as `children` in Celery's tuple
//!   form, so `AsyncResult.children` and `.collect()` work in Python. A step or callback that is
//!   a group sends its members (`group`, `group_index`), recorded as a `GroupResult`; a chord
//!   sends its header the same way, each with the body in its embed `chord` (the rest of the
//!   chain in the body's options, as Celery's `_chord.run` puts it), after its size is set
//!   ([`Next::chord_sizes`]); a chain sends its first step with the rest as that step's chain.
//! - on a final FAILURE, each errback old style: the failed job's id as the first positional
//!   argument (Celery's way for an errback it cannot call inline, as no Python task can be).
//!
//! Every message has `parent_id` = the job's id and `root_id` = the job's root. Ids the producer
//! assigned are kept (tasks', groups' and chord bodies'); the others are derived from the job's
//! id, so a job run twice (its result could not be stored) sends the same ids again rather
//! than new twins.

use chrono::{DateTime, Utc};
use serde_json::{json, Value};

use crate::canvas::{chord, Canvas, ChordPart, Kind, Signature};
use crate::protocol::TaskMessage;

/// Names the derived ids (UUID v5) of the messages a job sends on.
pub(crate) const NAMESPACE: uuid::Uuid =
    uuid::Uuid::from_u128(0x6d65_6469_6166_6172_6d2d_6361_6e76_0001);

/// The job whose end sends the messages on.
#[derive(Debug, Clone, Copy)]
pub struct Parent<'a> {
    pub id: &'a str,
    /// The job's `root_id` (its own id when it has none).
    pub root_id: &'a str,
}

/// A message to publish and the queue it goes to.
#[derive(Debug, Clone, PartialEq)]
pub struct Publish {
    pub queue: String,
    pub msg: TaskMessage,
}

/// What SUCCESS sends on, and the `children` to store with the result.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Next {
    pub publish: Vec<Publish>,
    pub children: Vec<Value>,
    /// The chords this sends, as (group id, header size): each size is set in the result
    /// backend (`celery-taskset-meta-<group>.s`) before anything is published, as Celery's
    /// `apply_chord` does, so the header's join can complete.
    pub chord_sizes: Vec<(String, usize)>,
}

/// Callbacks and the next chain step after a SUCCESS that returned `retval`.
pub fn on_success(canvas: &Canvas, parent: Parent<'_>, retval: &Value, now: DateTime<Utc>) -> Next {
    let mut next = Next::default();
    let first = std::slice::from_ref(retval);
    match canvas.callbacks.as_slice() {
        [] => {}
        [one] => {
            let child = send(one, first, parent, "callback/0", &[], now, &mut next);
            next.children.push(child);
        }
        many => {
            // As Celery's worker: each group, chord or chain on its own, the single tasks
            // together as one group.
            let mut tasks = Vec::new();
            for (i, sig) in many.iter().enumerate() {
                if sig.kind == Kind::Task {
                    tasks.push((i, sig));
                } else {
                    let role = format!("callback/{i}");
                    let child = send(sig, first, parent, &role, &[], now, &mut next);
                    next.children.push(child);
                }
            }
            if !tasks.is_empty() {
                let group =
                    uuid::Uuid::new_v5(&NAMESPACE, format!("{}/callbacks", parent.id).as_bytes())
                        .to_string();
                let mut members = Vec::with_capacity(tasks.len());
                for (index, (i, sig)) in tasks.into_iter().enumerate() {
                    let id = derived_id(sig, parent, &format!("callback/{i}"));
                    let mut p = message(sig, first, parent, id, now);
                    p.msg.group = Some(group.clone());
                    p.msg.group_index = i64::try_from(index).ok();
                    members.push(children_record(&p.msg.id));
                    next.publish.push(p);
                }
                next.children.push(json!([[group, null], members]));
            }
        }
    }
    if let Some((step, rest)) = canvas.chain.split_last() {
        let rest: Vec<Value> = rest.iter().map(|s| s.raw.clone()).collect();
        let child = send(step, first, parent, "chain", &rest, now, &mut next);
        next.children.push(child);
    }
    next
}

/// Sends `sig` (a chord, as a chord's body) as Celery's `sig.delay(first)` would, onto `next`.
pub(crate) fn send_one(
    sig: &Signature,
    first: &[Value],
    parent: Parent<'_>,
    role: &str,
    now: DateTime<Utc>,
    next: &mut Next,
) {
    let child = send(sig, first, parent, role, &[], now, next);
    next.children.push(child);
}

/// Sends `sig` as Celery's `sig.apply_async(first, chain=rest)` would, whatever its kind; `rest`
/// is the chain that follows it (reversed, as the embed `chain`). Returns the child to record:
/// a task's result, or a group's (a chord's header) in `GroupResult.as_tuple()` form.
fn send(
    sig: &Signature,
    first: &[Value],
    parent: Parent<'_>,
    role: &str,
    rest: &[Value],
    now: DateTime<Utc>,
    next: &mut Next,
) -> Value {
    // What follows: the chain after this step, then the signature's own `chain` option (which
    // runs first, so it goes last in the reversed list).
    let follows: Vec<Value> = rest.iter().chain(&sig.options.chain).cloned().collect();
    let partial = partial_args(sig, first);
    match &sig.kind {
        Kind::Task => {
            let id = derived_id(sig, parent, role);
            let mut p = message(sig, first, parent, id, now);
            if !follows.is_empty() {
                p.msg.embed.insert("chain".into(), Value::Array(follows));
            }
            let child = children_record(&p.msg.id);
            next.publish.push(p);
            child
        }
        Kind::Group(members) => {
            // A group is a chain's last step (one followed by more is a chord by now).
            let group = derived_id(sig, parent, role);
            send_members(members, &partial, parent, role, &group, None, now, next)
        }
        Kind::Chord(c) => {
            let members = c.members();
            let header_args = partial_args(&c.header, &partial);
            let group = c
                .header
                .options
                .task_id
                .clone()
                .unwrap_or_else(|| derived_id(sig, parent, role));
            let body_id = c
                .body
                .options
                .task_id
                .clone()
                .or_else(|| sig.options.task_id.clone())
                .unwrap_or_else(|| {
                    uuid::Uuid::new_v5(&NAMESPACE, format!("{group}/chord-body").as_bytes())
                        .to_string()
                });
            // The body as Celery's `_chord.run` leaves it in each header's embed `chord`: its
            // id frozen, its group, its root, and the rest of the chain in its options.
            let mut body = c.body.raw.clone();
            if let Some(b) = body.as_object_mut() {
                let options = b.entry("options").or_insert_with(|| json!({}));
                if !options.is_object() {
                    *options = json!({});
                }
                if let Some(o) = options.as_object_mut() {
                    o.insert("task_id".into(), Value::String(body_id.clone()));
                    // As Celery's `freeze`: a body frozen with a group (a chord's, when the
                    // chord is itself a chord's body) keeps it.
                    if o.get("group_id").is_none_or(Value::is_null) {
                        o.insert("group_id".into(), Value::String(group.clone()));
                    }
                    o.insert("root_id".into(), Value::String(parent.root_id.to_owned()));
                    if !follows.is_empty() {
                        o.insert("chain".into(), Value::Array(follows.clone()));
                    }
                }
            }
            if members.is_empty() {
                // Nothing would ever join: the body goes at once with no results, as Celery's
                // `body.delay([])`, read back as the header's join would read it.
                let part = ChordPart {
                    group: group.clone(),
                    index: None,
                    body: Signature::decode(&body, "chord body").unwrap_or_else(|_| {
                        // Only ids and the chain, each checked already, were added.
                        let mut b = c.body.clone();
                        b.options.task_id = Some(body_id.clone());
                        b.options.chain = follows.clone();
                        b
                    }),
                };
                let body = chord::body_message(&part, Vec::new(), parent, now);
                let child = match body.publish.as_slice() {
                    [one] => children_record(&one.msg.id),
                    _ => body.children.first().cloned().unwrap_or(Value::Null),
                };
                next.publish.extend(body.publish);
                next.chord_sizes.extend(body.chord_sizes);
                return child;
            }
            next.chord_sizes.push((group.clone(), members.len()));
            send_members(
                members,
                &header_args,
                parent,
                role,
                &group,
                Some(&body),
                now,
                next,
            )
        }
        Kind::Chain(steps) => {
            let Some((head, tail)) = steps.split_first() else {
                // Refused when decoded; an empty chain would send nothing.
                return json!([]);
            };
            let mut follows = follows;
            follows.extend(tail.iter().rev().map(|s| s.raw.clone()));
            send(head, &partial, parent, role, &follows, now, next)
        }
    }
}

/// The group's members with `group` / `group_index` (and a chord's body in their embed).
#[allow(clippy::too_many_arguments)]
fn send_members(
    members: &[Signature],
    partial: &[Value],
    parent: Parent<'_>,
    role: &str,
    group: &str,
    chord_body: Option<&Value>,
    now: DateTime<Utc>,
    next: &mut Next,
) -> Value {
    let mut records = Vec::with_capacity(members.len());
    for (i, m) in members.iter().enumerate() {
        let id = derived_id(m, parent, &format!("{role}/{i}"));
        let mut p = message(m, partial, parent, id, now);
        p.msg.group = Some(group.to_owned());
        p.msg.group_index = m.options.group_index.or(i64::try_from(i).ok());
        if let Some(body) = chord_body {
            p.msg.embed.insert("chord".into(), body.clone());
        }
        records.push(children_record(&p.msg.id));
        next.publish.push(p);
    }
    json!([[group, null], records])
}

/// The arguments a canvas passes on to what it holds: `first` (unless immutable), then its own.
pub(crate) fn partial_args(sig: &Signature, first: &[Value]) -> Vec<Value> {
    if sig.immutable {
        sig.args.clone()
    } else {
        first.iter().chain(&sig.args).cloned().collect()
    }
}

/// Celery's `task_inherit_parent_priority`: what a SUCCESS sends on (callbacks, the next chain
/// step, a group's members, a chord's header) is sent with `priority`, the delivery priority of
/// the job that sends it, over any priority of its own — Celery's worker passes the parent's
/// priority as an `apply_async` option, and options given there win over the signature's. A
/// parent that arrived without one leaves each message's own. Errbacks and a chord's body keep
/// their own, as in Celery (its chord join sends the body with no parent priority).
pub fn inherit_priority(publish: &mut [Publish], priority: Option<u8>) {
    if priority.is_none() {
        return;
    }
    for p in publish {
        p.msg.priority = priority;
    }
}

/// The errbacks after a final FAILURE of job `parent`.
pub fn on_failure(canvas: &Canvas, parent: Parent<'_>, now: DateTime<Utc>) -> Vec<Publish> {
    let failed = Value::String(parent.id.to_owned());
    canvas
        .errbacks
        .iter()
        .enumerate()
        .map(|(i, sig)| {
            let id = derived_id(sig, parent, &format!("errback/{i}"));
            message(sig, std::slice::from_ref(&failed), parent, id, now)
        })
        .collect()
}

/// One child in a result record's `children`, as `AsyncResult.as_tuple()` writes it:
/// `[[id, parent], nodes]`, with no parent and no nodes for a plain task.
pub fn children_record(id: &str) -> Value {
    json!([[id, null], null])
}

pub(crate) fn derived_id(sig: &Signature, parent: Parent<'_>, role: &str) -> String {
    sig.options.task_id.clone().unwrap_or_else(|| {
        uuid::Uuid::new_v5(&NAMESPACE, format!("{}/{role}", parent.id).as_bytes()).to_string()
    })
}

/// The message for `sig` (one task): `first` is prepended to its args unless it is immutable.
pub(crate) fn message(
    sig: &Signature,
    first: &[Value],
    parent: Parent<'_>,
    id: String,
    now: DateTime<Utc>,
) -> Publish {
    let o = &sig.options;
    let mut msg = TaskMessage::new(sig.task.clone(), sig.kwargs.clone());
    msg.id = id;
    msg.root_id = Some(parent.root_id.to_owned());
    msg.parent_id = Some(parent.id.to_owned());
    msg.args = partial_args(sig, first);
    o.apply_to(&mut msg, now);
    Publish {
        queue: sig.queue.clone(),
        msg,
    }
}

//! The messages that carry a workflow on after a job ends, built as Celery's worker builds them
//! (`celery/app/trace.py`, `celery/backends/base.py`):
//!
//! - on SUCCESS, each callback, then the next chain step (the LAST item of the reversed
//!   `chain`; the rest travels on as the new message's `chain`), a non-immutable one receiving
//!   the return value as its first positional argument. Several callbacks go out as one group,
//!   as Celery sends them. The job's result record lists them as `children` in Celery's tuple
//!   form, so `AsyncResult.children` and `.collect()` work in Python.
//! - on a final FAILURE, each errback old style: the failed job's id as the first positional
//!   argument (Celery's way for an errback it cannot call inline, as no Python task can be).
//!
//! Every message has `parent_id` = the job's id and `root_id` = the job's root. Ids the producer
//! assigned are kept; the others are derived from the job's id, so a job run twice (its
//! result could not be stored) sends the same ids again rather than new twins.

use chrono::{DateTime, Utc};
use serde_json::{json, Value};

use crate::canvas::{Canvas, Signature};
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
}

/// Callbacks and the next chain step after a SUCCESS that returned `retval`.
pub fn on_success(canvas: &Canvas, parent: Parent<'_>, retval: &Value, now: DateTime<Utc>) -> Next {
    let mut next = Next::default();
    match canvas.callbacks.as_slice() {
        [] => {}
        [one] => {
            let id = derived_id(one, parent, "callback/0");
            let p = message(one, Some(retval), parent, id, now);
            next.children.push(children_record(&p.msg.id));
            next.publish.push(p);
        }
        many => {
            let group =
                uuid::Uuid::new_v5(&NAMESPACE, format!("{}/callbacks", parent.id).as_bytes())
                    .to_string();
            let mut members = Vec::with_capacity(many.len());
            for (i, sig) in many.iter().enumerate() {
                let id = derived_id(sig, parent, &format!("callback/{i}"));
                let mut p = message(sig, Some(retval), parent, id, now);
                p.msg.group = Some(group.clone());
                p.msg.group_index = i64::try_from(i).ok();
                members.push(children_record(&p.msg.id));
                next.publish.push(p);
            }
            next.children.push(json!([[group, null], members]));
        }
    }
    if let Some((step, rest)) = canvas.chain.split_last() {
        let id = derived_id(step, parent, "chain");
        let mut p = message(step, Some(retval), parent, id, now);
        if !rest.is_empty() {
            let rest = rest.iter().map(|s| s.raw.clone()).collect();
            p.msg.embed.insert("chain".into(), Value::Array(rest));
        }
        next.children.push(children_record(&p.msg.id));
        next.publish.push(p);
    }
    next
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
            message(sig, Some(&failed), parent, id, now)
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

/// The message for `sig`: `first` is prepended to its args unless it is immutable.
pub(crate) fn message(
    sig: &Signature,
    first: Option<&Value>,
    parent: Parent<'_>,
    id: String,
    now: DateTime<Utc>,
) -> Publish {
    let o = &sig.options;
    let mut msg = TaskMessage::new(sig.task.clone(), sig.kwargs.clone());
    msg.id = id;
    msg.root_id = Some(parent.root_id.to_owned());
    msg.parent_id = Some(parent.id.to_owned());
    msg.args = match first {
        Some(v) if !sig.immutable => std::iter::once(v.clone())
            .chain(sig.args.iter().cloned())
            .collect(),
        _ => sig.args.clone(),
    };
    o.apply_to(&mut msg, now);
    Publish {
        queue: sig.queue.clone(),
        msg,
    }
}

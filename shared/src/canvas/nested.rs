//! Canvases inside a canvas, as Celery sends them (`celery/canvas.py`): a signature whose
//! `subtask_type` is `group` (`kwargs.tasks`), `chord` (`kwargs.header` a group, `kwargs.body`)
//! or `chain` (`kwargs.tasks`). Celery's producer turns `chain(a, group(b, c), d)` into a chain
//! whose second step is a `celery.chord` with header `group(b, c)` and body `d`, and
//! `chain(a, group(b, c))` into one whose last step is the `celery.group`; a `link=` may be a
//! group or a chain; `chord(header, chain(b1, b2))` carries the chain as the body (its
//! `task_id` option the last step's, that step's `group_id` the chord's).
//!
//! What is carried out: a group of single tasks; a chord whose header is a group of single
//! tasks and whose body is one task or a chain led by a task; a chain of tasks, groups and
//! chords (nested chains spliced in, a group followed by a task upgraded to a chord, as
//! `_chain.prepare_steps` does). What is not is refused here, before the job runs, naming it:
//! a chord or group inside a group or a chord's header, a chord whose body is a group, a chord
//! or a chain led by anything but a task, a group followed by anything but a task, chord
//! `kwargs`, options on a group, chord or chain that mediafarm would have to apply to every
//! member, and every other `subtask_type` (`chunks`, `xmap`, `xstarmap`, ...).

use serde_json::{json, Map, Value};

use crate::canvas::signature::{decode_at, Kind, Signature};
use crate::canvas::CanvasError;
use crate::protocol::preview;

/// A chord as a chain step or a callback: its header group and its body.
#[derive(Debug, Clone, PartialEq)]
pub struct ChordSig {
    /// The header, a [`Kind::Group`] of single tasks; its `task_id` option is the group id.
    pub header: Signature,
    /// The body, one task.
    pub body: Signature,
}

impl ChordSig {
    /// The header's tasks (a decoded chord's header is always a group).
    pub fn members(&self) -> &[Signature] {
        match &self.header.kind {
            Kind::Group(members) => members,
            _ => &[],
        }
    }
}

/// The options a group, chord or chain may hold: ids the producer froze and the workflow's
/// own bookkeeping. Any other option would have to be applied to every member (Celery merges
/// a group's options into each member's), which mediafarm does not do.
const CANVAS_OPTIONS: &[&str] = &[
    "task_id",
    "root_id",
    "parent_id",
    "reply_to",
    "group_id",
    "group_index",
];

/// The [`Kind`] of a signature whose `subtask_type` is `name`.
pub(crate) fn decode_kind(
    name: &str,
    kwargs: &Map<String, Value>,
    options: Option<&Map<String, Value>>,
    path: &str,
    depth: usize,
) -> Result<Kind, CanvasError> {
    let unsupported = |what: String| CanvasError::Unsupported(format!("{path} is {what}"));
    if !matches!(name, "group" | "chord" | "chain") {
        return Err(unsupported(format!(
            "a {name} (subtask_type {}): mediafarm carries out single tasks, groups, chords \
             and chains, not {name}",
            preview(&Value::String(name.to_owned()))
        )));
    }
    for (key, value) in options.into_iter().flatten() {
        // A chain's own `chain` option is what follows it (a chord body's, when the chord is a
        // chain step): Celery's `_chain.run` runs it after the chain's tasks, as mediafarm does.
        let follows = name == "chain" && key == "chain";
        if !value.is_null() && !follows && !CANVAS_OPTIONS.contains(&key.as_str()) {
            return Err(unsupported(format!(
                "a {name} with option `{key}` = {}: mediafarm does not apply a {name}'s \
                 options to its members; set it on each member instead",
                preview(value)
            )));
        }
    }
    match name {
        "group" => {
            let tasks = tasks(kwargs, path, depth)?;
            for (i, t) in tasks.iter().enumerate() {
                if t.kind != Kind::Task {
                    return Err(unsupported(format!(
                        "a group whose member {i} is a {}: mediafarm runs groups of single \
                         tasks, not a {} inside a group",
                        t.kind.name(),
                        t.kind.name()
                    )));
                }
            }
            Ok(Kind::Group(tasks))
        }
        "chain" => {
            let steps = tasks(kwargs, path, depth)?;
            if steps.is_empty() {
                return Err(CanvasError::Invalid(format!(
                    "{path} is a chain with no tasks"
                )));
            }
            Ok(Kind::Chain(normalize(steps, path)?))
        }
        _ => {
            match kwargs.get("kwargs") {
                None | Some(Value::Null) => {}
                Some(Value::Object(m)) if m.is_empty() => {}
                Some(other) => {
                    return Err(unsupported(format!(
                        "a chord with `kwargs` {} for its header: mediafarm does not merge \
                         chord kwargs into the header's tasks",
                        preview(other)
                    )))
                }
            }
            let header = match kwargs.get("header") {
                // `chord([a, b], c)` as a list: the group Celery would make of it.
                Some(Value::Array(items)) => decode_at(
                    &json!({"task": "celery.group", "args": [], "kwargs": {"tasks": items},
                            "options": {}, "subtask_type": "group", "immutable": false}),
                    &format!("{path} header"),
                    depth + 1,
                )?,
                Some(h) => decode_at(h, &format!("{path} header"), depth + 1)?,
                None => {
                    return Err(CanvasError::Invalid(format!(
                        "{path} is a chord without `kwargs.header`"
                    )))
                }
            };
            let body = match kwargs.get("body") {
                Some(b) if !b.is_null() => decode_at(b, &format!("{path} body"), depth + 1)?,
                _ => {
                    return Err(CanvasError::Invalid(format!(
                        "{path} is a chord without `kwargs.body`"
                    )))
                }
            };
            chord(header, body, path)
        }
    }
}

/// A chord of `header` and `body`, both checked: a group of single tasks, one task.
fn chord(header: Signature, body: Signature, path: &str) -> Result<Kind, CanvasError> {
    match &header.kind {
        Kind::Group(_) => {}
        Kind::Task => {
            return Err(CanvasError::Invalid(format!(
                "{path} is a chord whose header is the task {}, not a group",
                header.describe()
            )))
        }
        other => {
            return Err(CanvasError::Unsupported(format!(
                "{path} is a chord whose header is a {}: mediafarm runs chord headers that \
                 are groups of single tasks",
                other.name()
            )))
        }
    }
    check_body(&body, &format!("{path} is a chord whose body is"))?;
    Ok(Kind::Chord(Box::new(ChordSig { header, body })))
}

/// A chord body mediafarm sends when its header completes: one task, or a chain whose first
/// step is one task (which gets the header's results; the rest travel on as its chain).
/// `subject` starts the error: "embed `chord` is".
pub(crate) fn check_body(body: &Signature, subject: &str) -> Result<(), CanvasError> {
    let what = match &body.kind {
        Kind::Task => return Ok(()),
        Kind::Chain(steps) => match steps.first() {
            Some(first) if first.kind == Kind::Task => return Ok(()),
            Some(first) => format!("a chain led by a {}", first.kind.name()),
            None => "an empty chain".to_owned(),
        },
        other => format!("a {}", other.name()),
    };
    Err(CanvasError::Unsupported(format!(
        "{subject} {what}: mediafarm runs chord bodies that are one task or a chain led by \
         one task"
    )))
}

/// `kwargs.tasks`: the signatures of a group or chain.
fn tasks(
    kwargs: &Map<String, Value>,
    path: &str,
    depth: usize,
) -> Result<Vec<Signature>, CanvasError> {
    match kwargs.get("tasks") {
        Some(Value::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(i, item)| decode_at(item, &format!("{path} task {i}"), depth + 1))
            .collect(),
        other => Err(CanvasError::Invalid(format!(
            "{path} `kwargs.tasks` must be a list of signatures; got {}",
            other.map_or_else(|| "nothing".to_owned(), preview)
        ))),
    }
}

/// A chain's steps in running order as Celery's `prepare_steps` leaves them: nested chains
/// spliced in; a group followed by a task upgraded to a chord with that task as its body; a
/// group followed by anything else refused (Celery would make a chord whose body is a canvas).
pub(crate) fn normalize(steps: Vec<Signature>, path: &str) -> Result<Vec<Signature>, CanvasError> {
    let mut flat = Vec::with_capacity(steps.len());
    for step in steps {
        match step.kind {
            // Already normalised when it was decoded.
            Kind::Chain(inner) => flat.extend(inner),
            _ => flat.push(step),
        }
    }
    let mut out = Vec::with_capacity(flat.len());
    let mut steps = flat.into_iter();
    while let Some(step) = steps.next() {
        let Kind::Group(_) = step.kind else {
            out.push(step);
            continue;
        };
        let Some(next) = steps.next() else {
            out.push(step);
            break;
        };
        if next.kind != Kind::Task {
            return Err(CanvasError::Unsupported(format!(
                "{path} has a group followed by a {}: Celery runs that as a chord whose body \
                 is a {}, which mediafarm does not carry out",
                next.kind.name(),
                next.kind.name()
            )));
        }
        let raw = json!({
            "task": "celery.chord", "args": [],
            "kwargs": {"kwargs": {}, "header": step.raw, "body": next.raw},
            "options": {}, "subtask_type": "chord", "immutable": false,
        });
        out.push(Signature {
            task: "celery.chord".into(),
            queue: step.queue.clone(),
            args: Vec::new(),
            kwargs: Map::new(),
            options: Default::default(),
            immutable: false,
            kind: chord(step, next, path)?,
            raw,
        });
    }
    Ok(out)
}

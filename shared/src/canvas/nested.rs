//! Canvases inside a canvas, as Celery sends them (`celery/canvas.py`): a signature whose
//! `subtask_type` is `group` (`kwargs.tasks`), `chord` (`kwargs.header` a group, `kwargs.body`)
//! or `chain` (`kwargs.tasks`). Celery's producer turns `chain(a, group(b, c), d)` into a chain
//! whose second step is a `celery.chord` with header `group(b, c)` and body `d`, and
//! `chain(a, group(b, c))` into one whose last step is the `celery.group`; a `link=` may be a
//! group or a chain; `chord(header, chain(b1, b2))` carries the chain as the body (its
//! `task_id` option the last step's, that step's `group_id` the chord's), `chord(header,
//! group(x, y))` the group (its `task_id` the group's id), `chord(header, chord(h2, z))` the
//! inner chord.
//!
//! What is carried out: a group of single tasks; a chord whose header is a group of single
//! tasks and whose body is one task, a chain led by a task, a group or a chord; a chain of
//! tasks, groups and chords (nested chains spliced in, a group followed by a task upgraded to a
//! chord, as `_chain.prepare_steps` does); a chain's own options, applied to its tasks as
//! `_chain.run` applies them when the chain is sent as one (a chord's body, a callback). What is
//! not is refused here, before the job runs, naming it: a chord or group inside a group or a
//! chord's header, a chord whose body is a chain led by anything but a task, a chord whose body
//! is a group followed by more chain steps, a group followed by anything but a task, chord
//! `kwargs`, options on a group or chord that mediafarm would have to apply to every member,
//! options on a chain spliced into another chain (Celery drops them), and every other
//! `subtask_type` (`chunks`, `xmap`, `xstarmap`, ...).

use serde_json::{json, Map, Value};

use crate::canvas::signature::{decode_at, Kind, Signature};
use crate::canvas::CanvasError;
use crate::protocol::preview;

/// A chord as a chain step or a callback: its header group and its body.
#[derive(Debug, Clone, PartialEq)]
pub struct ChordSig {
    /// The header, a [`Kind::Group`] of single tasks; its `task_id` option is the group id.
    pub header: Signature,
    /// The body: one task, a chain led by one, a group or a chord (see [`check_body`]).
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
        // A chain runs its own options as Celery's `_chain.run` does (`run_options`); only a
        // `chord` option (a chain inside a chord's header) is not carried out.
        let chain_runs_it = name == "chain" && key != "chord";
        if !value.is_null() && !chain_runs_it && !CANVAS_OPTIONS.contains(&key.as_str()) {
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
            let steps = normalize(steps, path)?;
            match options {
                Some(o) => Ok(Kind::Chain(run_options(steps, o, path, depth)?)),
                None => Ok(Kind::Chain(steps)),
            }
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

/// A chord body mediafarm sends when its header completes: one task, a chain whose first step
/// is one task (which gets the header's results; the rest travel on as its chain), a group of
/// tasks (each gets the results) or a chord (its header tasks get them). `subject` starts the
/// error: "embed `chord` is".
pub(crate) fn check_body(body: &Signature, subject: &str) -> Result<(), CanvasError> {
    let what = match &body.kind {
        Kind::Task | Kind::Group(_) | Kind::Chord(_) => return Ok(()),
        Kind::Chain(steps) => match steps.first() {
            Some(first) if first.kind == Kind::Task => return Ok(()),
            Some(first) => format!("a chain led by a {}", first.kind.name()),
            None => "an empty chain".to_owned(),
        },
    };
    Err(CanvasError::Unsupported(format!(
        "{subject} {what}: mediafarm runs chord bodies that are one task, a chain led by one \
         task, a group or a chord"
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
            // Already normalised when it was decoded. Celery splices a chain inside a chain
            // without its options (`prepare_steps` takes its tasks only); rather than drop
            // them, such a chain is refused.
            Kind::Chain(inner) => {
                if let Some(key) =
                    option_keys(&step.raw).find(|k| *k != "chain" && !CANVAS_OPTIONS.contains(k))
                {
                    return Err(CanvasError::Unsupported(format!(
                        "{path} has a chain inside it with option `{key}`: Celery splices a \
                         nested chain in without its options, so mediafarm refuses it rather \
                         than drop them; set it on the nested chain's tasks instead"
                    )));
                }
                flat.extend(inner)
            }
            _ => flat.push(step),
        }
    }
    let mut out = Vec::with_capacity(flat.len());
    let last = flat.len().saturating_sub(1);
    for (i, step) in flat.iter().enumerate() {
        if let Kind::Chord(c) = &step.kind {
            if i < last && matches!(c.body.kind, Kind::Group(_)) {
                return Err(CanvasError::Unsupported(format!(
                    "{path} has a chord whose body is a group followed by more steps: Celery \
                     would send the rest of the chain with every task of that group, so \
                     mediafarm does not carry it out; end the chain with that chord"
                )));
            }
        }
    }
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

/// The options of a chain that Celery's `_chain.run` takes for itself instead of passing them
/// to the chain's first task (`_CHAIN_RUN_OPTIONS` in `celery/canvas.py`).
const CHAIN_RUN_OPTIONS: &[&str] = &[
    "chord",
    "group_id",
    "group_index",
    "link",
    "link_error",
    "parent_id",
    "root_id",
    "task_id",
];

/// The names of the options `raw` sets (null ones left out).
fn option_keys(raw: &Value) -> impl Iterator<Item = &str> {
    raw.get("options")
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
        .filter(|(_, v)| !v.is_null())
        .map(|(k, _)| k.as_str())
}

/// A chain's steps with the chain's own options applied as Celery's `_chain.run` applies them
/// when the chain is sent as one (a chord's body, a callback): every option it does not take
/// for itself (`queue`, `countdown`, `priority`, ...) goes to the first task, over the task's
/// own; `link` is added to the last task's callbacks and `link_error` to every task's errbacks
/// (a chord step's: its body's). Its ids and `chain` (what follows it) stay on the chain.
fn run_options(
    mut steps: Vec<Signature>,
    options: &Map<String, Value>,
    path: &str,
    depth: usize,
) -> Result<Vec<Signature>, CanvasError> {
    let set = |name: &str| options.get(name).filter(|v| !v.is_null());
    let first: Map<String, Value> = options
        .iter()
        .filter(|(k, v)| {
            !v.is_null() && k.as_str() != "chain" && !CHAIN_RUN_OPTIONS.contains(&k.as_str())
        })
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let list = |v: &Value| match v {
        Value::Array(items) => items.clone(),
        one => vec![one.clone()],
    };
    let links = set("link").map(list).unwrap_or_default();
    let errbacks = set("link_error").map(list).unwrap_or_default();
    if first.is_empty() && links.is_empty() && errbacks.is_empty() {
        return Ok(steps);
    }
    let unsupported = |i: usize, kind: &str, what: &str| {
        CanvasError::Unsupported(format!(
            "{path} is a chain with {what} whose step {i} is a {kind}: mediafarm applies a \
             chain's options to its tasks only; set it on the {kind}'s tasks instead"
        ))
    };
    let last = steps.len().saturating_sub(1);
    for (i, step) in steps.iter_mut().enumerate() {
        let mut raw = step.raw.clone();
        let mut changed = false;
        if i == 0 && !first.is_empty() {
            if step.kind != Kind::Task {
                let key = first.keys().next().map(String::as_str).unwrap_or("");
                return Err(unsupported(i, step.kind.name(), &format!("option `{key}`")));
            }
            with_options(&mut raw, |opts| {
                for (k, v) in &first {
                    opts.insert(k.clone(), v.clone());
                }
            });
            changed = true;
        }
        if i == last && !links.is_empty() {
            if step.kind != Kind::Task {
                return Err(unsupported(i, step.kind.name(), "`link`"));
            }
            with_options(&mut raw, |o| append(o, "link", &links));
            changed = true;
        }
        if !errbacks.is_empty() {
            match &step.kind {
                Kind::Task => with_options(&mut raw, |o| append(o, "link_error", &errbacks)),
                // Celery's `prepare_steps` links a chord step's errbacks to its body too,
                // which is where a failed header sends them.
                Kind::Chord(c) if c.body.kind == Kind::Task => {
                    if let Some(body) = raw.get_mut("kwargs").and_then(|k| k.get_mut("body")) {
                        with_options(body, |o| append(o, "link_error", &errbacks));
                    }
                }
                other => return Err(unsupported(i, other.name(), "`link_error`")),
            }
            changed = true;
        }
        if changed {
            *step = decode_at(&raw, &format!("{path} task {i}"), depth + 1)?;
        }
    }
    Ok(steps)
}

/// Runs `f` on the `options` object of a raw signature (an object, as it was decoded), made
/// one if it is missing or null.
fn with_options(raw: &mut Value, f: impl FnOnce(&mut Map<String, Value>)) {
    if let Value::Object(sig) = raw {
        let opts = sig.entry("options").or_insert_with(|| json!({}));
        if !opts.is_object() {
            *opts = json!({});
        }
        if let Value::Object(o) = opts {
            f(o);
        }
    }
}

/// Adds `items` to the list option `name` (Celery's `append_to_list_option`), which may hold one
/// signature, a list of them, or nothing yet.
fn append(opts: &mut Map<String, Value>, name: &str, items: &[Value]) {
    let mut all = match opts.remove(name) {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(a)) => a,
        Some(one) => vec![one],
    };
    all.extend(items.iter().cloned());
    opts.insert(name.to_owned(), Value::Array(all));
}

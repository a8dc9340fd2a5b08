//! One signature as Celery serialises it (`Signature` is a dict on the wire):
//! `{"task", "args", "kwargs", "options", "subtask_type", "immutable"}`. Every field is
//! checked like a header: a wrong type is refused with the path of the field and the value cut
//! short, never read as "absent". Options mediafarm does not act on are kept in `raw`, so a
//! signature passed on (the rest of a chain, a step's own `link`) travels untouched.
//!
//! A signature with a `subtask_type` is a canvas of tasks ([`Kind`]): a `group`, a `chord` or a
//! `chain`, decoded in `nested.rs`; any other type (`chunks`, `xmap`, `xstarmap`, ...) is a
//! [`CanvasError::Unsupported`] naming it.

use chrono::{DateTime, Datelike, Utc};
use serde_json::{Map, Value};

use crate::canvas::{nested, CanvasError};
use crate::protocol::{
    default_queue, is_valid_queue_name, json_kind, parse_time, preview, TaskMessage, TimeLimits,
    MAX_TIME_LIMIT_SECS,
};

/// How deep `link` / `link_error` signatures may nest inside each other's options: far more
/// than any real workflow, low enough that a hostile message cannot exhaust the stack.
const MAX_DEPTH: usize = 16;

/// A task signature (`celery.signature(...)`, `task.s(...)`, `task.si(...)`).
#[derive(Debug, Clone, PartialEq)]
pub struct Signature {
    pub task: String,
    /// Where it is sent: its `queue` option, else its `routing_key`, else the queue
    /// mediafarm's client routes the task name to (`protocol::default_queue`).
    pub queue: String,
    pub args: Vec<Value>,
    pub kwargs: Map<String, Value>,
    pub options: SignatureOptions,
    /// `si()`: the parent's return value is not prepended to `args`.
    pub immutable: bool,
    /// One task, or the canvas it stands for (its `subtask_type`).
    pub kind: Kind,
    /// The signature exactly as it arrived, for passing it on.
    pub raw: Value,
}

/// What a signature stands for, by its `subtask_type`.
#[derive(Debug, Clone, PartialEq)]
pub enum Kind {
    /// `subtask_type` null: one task, `task` its name.
    Task,
    /// `celery.group` (`kwargs.tasks`): its members, each one task.
    Group(Vec<Signature>),
    /// `celery.chord` (`kwargs.header`, `kwargs.body`).
    Chord(Box<crate::canvas::nested::ChordSig>),
    /// `celery.chain` (`kwargs.tasks`), in running order, nested chains spliced in and a group
    /// followed by a task upgraded to a chord, as Celery's `prepare_steps` does.
    Chain(Vec<Signature>),
}

impl Kind {
    /// The canvas type's name as Celery writes it in `subtask_type`.
    pub fn name(&self) -> &'static str {
        match self {
            Kind::Task => "task",
            Kind::Group(_) => "group",
            Kind::Chord(_) => "chord",
            Kind::Chain(_) => "chain",
        }
    }
}

/// When a relative time option (`countdown`, a number `expires`) is counted from.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum When {
    /// An absolute time.
    At(DateTime<Utc>),
    /// Seconds after the signature is sent.
    In(f64),
}

impl When {
    /// The absolute time, counting a relative one from `now`.
    pub fn resolve(self, now: DateTime<Utc>) -> DateTime<Utc> {
        match self {
            When::At(t) => t,
            When::In(secs) => now + chrono::Duration::milliseconds((secs * 1000.0) as i64),
        }
    }
}

/// The execution options of a signature that mediafarm honours when it sends one.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SignatureOptions {
    /// The id the producer assigned (a chain's steps have theirs before the first runs).
    pub task_id: Option<String>,
    pub queue: Option<String>,
    pub routing_key: Option<String>,
    /// `eta` or `countdown` (an `eta` wins, as in Celery).
    pub run_at: Option<When>,
    pub expires: Option<When>,
    pub priority: Option<u8>,
    pub time_limit: Option<f64>,
    pub soft_time_limit: Option<f64>,
    pub shadow: Option<String>,
    pub reply_to: Option<String>,
    /// The step's own callbacks and errbacks, as sent (each already checked).
    pub link: Vec<Value>,
    pub link_error: Vec<Value>,
    pub stamped_headers: Option<Vec<String>>,
    /// The values of the stamped headers, taken from the options as Celery does.
    pub stamps: Map<String, Value>,
    /// A group member's place (`group_index`), frozen by the producer.
    pub group_index: Option<i64>,
    /// The group the task's result belongs to (`group_id`), sent as its `group` header: Celery
    /// freezes a chord's body (the last step of a body that is a chain) with the chord's group.
    pub group_id: Option<String>,
    /// The chain that follows the signature (reversed, as the embed `chain`), as Celery puts
    /// it in a chord body's options when the chord is a chain step (each already checked).
    pub chain: Vec<Value>,
}

impl SignatureOptions {
    /// Writes onto `msg` what these options decide about the message that sends the
    /// signature: when it runs and expires (relative times from `now`), its priority, time
    /// limits, shadow name and reply queue, its group, its own callbacks and errbacks, and its
    /// stamps.
    /// The worker (a chain's next step, a callback) and the producer both send through this.
    pub(crate) fn apply_to(&self, msg: &mut TaskMessage, now: DateTime<Utc>) {
        msg.eta = self.run_at.map(|w| w.resolve(now));
        msg.expires = self.expires.map(|w| w.resolve(now));
        msg.priority = self.priority;
        msg.timelimit = TimeLimits {
            hard: self.time_limit,
            soft: self.soft_time_limit,
        };
        msg.shadow = self.shadow.clone();
        msg.reply_to = self.reply_to.clone();
        msg.group = self.group_id.clone();
        let list = |items: &[Value]| {
            if items.is_empty() {
                Value::Null
            } else {
                Value::Array(items.to_vec())
            }
        };
        msg.embed.insert("callbacks".into(), list(&self.link));
        msg.embed.insert("errbacks".into(), list(&self.link_error));
        if !self.chain.is_empty() {
            msg.embed.insert("chain".into(), list(&self.chain));
        }
        msg.stamped_headers = self
            .stamped_headers
            .as_ref()
            .map(|names| Value::Array(names.iter().cloned().map(Value::String).collect()));
        msg.stamps = self.stamps.clone();
    }
}

impl Signature {
    /// Decodes one signature found at `path` (for errors: "embed `chain`[0]").
    pub fn decode(v: &Value, path: &str) -> Result<Signature, CanvasError> {
        decode_at(v, path, 0)
    }

    /// The signature as a person reads it in an error: `echo.echo(args, kwargs)`, cut short.
    pub fn describe(&self) -> String {
        format!(
            "{}({}, {})",
            self.task,
            preview(&Value::Array(self.args.clone())),
            preview(&Value::Object(self.kwargs.clone()))
        )
    }
}

/// The wire form of a signature, as Celery's `Signature` dict serialises and as
/// [`Signature::decode`] reads it back: the producer's side (`client::workflow`) builds every
/// signature it embeds with this.
pub fn encode(
    task: &str,
    args: &[Value],
    kwargs: &Map<String, Value>,
    options: &Map<String, Value>,
    immutable: bool,
) -> Value {
    let mut sig = Map::with_capacity(6);
    sig.insert("task".into(), Value::String(task.to_owned()));
    sig.insert("args".into(), Value::Array(args.to_vec()));
    sig.insert("kwargs".into(), Value::Object(kwargs.clone()));
    sig.insert("options".into(), Value::Object(options.clone()));
    sig.insert("subtask_type".into(), Value::Null);
    sig.insert("immutable".into(), Value::Bool(immutable));
    Value::Object(sig)
}

pub(crate) fn decode_at(v: &Value, path: &str, depth: usize) -> Result<Signature, CanvasError> {
    if depth > MAX_DEPTH {
        return Err(CanvasError::Invalid(format!(
            "{path}: signatures (link / link_error, canvases inside canvases) nest deeper than \
             {MAX_DEPTH} levels"
        )));
    }
    let Value::Object(obj) = v else {
        return Err(CanvasError::Invalid(format!(
            "{path} must be a signature object {{\"task\", \"args\", \"kwargs\", \"options\", ...}}; got {}",
            preview(v)
        )));
    };
    let bad = |field: &str, want: &str, got: &Value| {
        CanvasError::Invalid(format!(
            "{path} field `{field}` must be {want}; got {}",
            preview(got)
        ))
    };
    let subtask_type = match obj.get("subtask_type") {
        None | Some(Value::Null) => None,
        Some(Value::String(name)) => Some(name.as_str()),
        Some(other) => {
            return Err(bad(
                "subtask_type",
                "null or a canvas type name such as \"chain\"",
                other,
            ))
        }
    };
    let task = match obj.get("task") {
        Some(Value::String(t)) if !t.is_empty() => t.clone(),
        Some(other) => return Err(bad("task", "a task name", other)),
        None => {
            return Err(CanvasError::Invalid(format!(
                "{path} has no `task` field: a signature names its task"
            )))
        }
    };
    let args = match obj.get("args") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(a)) => a.clone(),
        Some(other) => return Err(bad("args", "a list", other)),
    };
    let kwargs = match obj.get("kwargs") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(m)) => m.clone(),
        Some(other) => return Err(bad("kwargs", "an object", other)),
    };
    let immutable = match obj.get("immutable") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(other) => return Err(bad("immutable", "true or false", other)),
    };
    let options = match obj.get("options") {
        None | Some(Value::Null) => SignatureOptions::default(),
        Some(Value::Object(o)) => decode_options(o, path, depth)?,
        Some(other) => return Err(bad("options", "an object", other)),
    };
    let kind = match subtask_type {
        None => {
            // Celery sends these as plain signatures of its own built-in tasks, which only a
            // Python worker can run, each as its own task rather than as a canvas.
            let builtin = match task.as_str() {
                "celery.chunks" => Some("chunks"),
                "celery.map" => Some("xmap"),
                "celery.starmap" => Some("xstarmap"),
                _ => None,
            };
            if let Some(name) = builtin {
                return Err(CanvasError::Unsupported(format!(
                    "{path} is Celery's {name} (task {task}): mediafarm does not carry out \
                     {name}; send the tasks as a group instead"
                )));
            }
            Kind::Task
        }
        Some(name) => {
            let opts = match obj.get("options") {
                Some(Value::Object(o)) => Some(o),
                _ => None,
            };
            nested::decode_kind(name, &kwargs, opts, path, depth)?
        }
    };
    let (queue, from) = match (&options.queue, &options.routing_key) {
        (Some(q), _) => (q.clone(), "option `queue`"),
        (None, Some(k)) => (k.clone(), "option `routing_key`"),
        (None, None) => (default_queue(&task), "task name's default queue"),
    };
    if !is_valid_queue_name(&queue) {
        return Err(CanvasError::Invalid(format!(
            "{path} {from} is {}, which is not a queue name (1 to 200 characters, no \
             spaces)",
            preview(&Value::String(queue))
        )));
    }
    Ok(Signature {
        task,
        queue,
        args,
        kwargs,
        options,
        immutable,
        kind,
        raw: v.clone(),
    })
}

fn decode_options(
    o: &Map<String, Value>,
    path: &str,
    depth: usize,
) -> Result<SignatureOptions, CanvasError> {
    let bad = |field: &str, want: &str, got: &Value| {
        CanvasError::Invalid(format!(
            "{path} option `{field}` must be {want}; got {}",
            preview(got)
        ))
    };
    let get = |name: &str| o.get(name).filter(|v| !v.is_null());
    let text = |name: &str| -> Result<Option<String>, CanvasError> {
        match get(name) {
            None => Ok(None),
            Some(Value::String(s)) if !s.is_empty() => Ok(Some(s.clone())),
            Some(other) => Err(bad(name, "a non-empty string", other)),
        }
    };
    let seconds = |name: &str| -> Result<Option<f64>, CanvasError> {
        match get(name) {
            None => Ok(None),
            Some(v) => match v.as_f64() {
                Some(s) if s.is_finite() && (0.0..=MAX_TIME_LIMIT_SECS).contains(&s) => Ok(Some(s)),
                _ => Err(bad(
                    name,
                    &format!("a number of seconds from 0 to {MAX_TIME_LIMIT_SECS}"),
                    v,
                )),
            },
        }
    };
    let time = |name: &str| -> Result<Option<DateTime<Utc>>, CanvasError> {
        match get(name) {
            None => Ok(None),
            // Years as Python's datetime has them, as for the `eta` and `expires` headers.
            Some(Value::String(s)) => parse_time(s)
                .filter(|t| (1..=9999).contains(&t.year()))
                .map(Some)
                .ok_or_else(|| {
                    bad(
                        name,
                        "an ISO 8601 time from year 1 to 9999",
                        &Value::String(s.clone()),
                    )
                }),
            Some(other) => Err(bad(name, "an ISO 8601 time", other)),
        }
    };
    let run_at = match time("eta")? {
        Some(t) => Some(When::At(t)),
        None => seconds("countdown")?.filter(|s| *s > 0.0).map(When::In),
    };
    let expires = match get("expires") {
        None => None,
        Some(Value::String(_)) => time("expires")?.map(When::At),
        Some(_) => seconds("expires")?.map(When::In),
    };
    let priority = match get("priority") {
        None => None,
        Some(v) => Some(
            v.as_u64()
                .and_then(|p| u8::try_from(p).ok())
                .ok_or_else(|| bad("priority", "a whole number from 0 to 255", v))?,
        ),
    };
    let links = |name: &str| -> Result<Vec<Value>, CanvasError> {
        let items = match get(name) {
            None => return Ok(Vec::new()),
            Some(Value::Array(items)) => items.clone(),
            // Celery accepts one signature as well as a list of them.
            Some(one @ Value::Object(_)) => vec![one.clone()],
            Some(other) => return Err(bad(name, "a signature or a list of signatures", other)),
        };
        for (i, item) in items.iter().enumerate() {
            decode_at(item, &format!("{path} option `{name}`[{i}]"), depth + 1)?;
        }
        Ok(items)
    };
    let stamped_headers = match get("stamped_headers") {
        None => None,
        Some(Value::Array(names)) => Some(
            names
                .iter()
                .map(|n| {
                    n.as_str()
                        .map(str::to_owned)
                        .ok_or_else(|| bad("stamped_headers", "a list of header names", n))
                })
                .collect::<Result<Vec<_>, _>>()?,
        ),
        Some(other) => return Err(bad("stamped_headers", "a list of header names", other)),
    };
    let group_index = match get("group_index") {
        None => None,
        Some(v) => Some(
            v.as_i64()
                .filter(|i| *i >= 0)
                .ok_or_else(|| bad("group_index", "a whole number from 0", v))?,
        ),
    };
    let stamps = stamped_headers
        .iter()
        .flatten()
        .filter_map(|name| o.get(name).map(|v| (name.clone(), v.clone())))
        .collect();
    Ok(SignatureOptions {
        task_id: text("task_id")?,
        queue: text("queue")?,
        routing_key: text("routing_key")?,
        run_at,
        expires,
        priority,
        time_limit: seconds("time_limit")?.filter(|s| *s > 0.0),
        soft_time_limit: seconds("soft_time_limit")?.filter(|s| *s > 0.0),
        shadow: text("shadow")?,
        reply_to: text("reply_to")?,
        link: links("link")?,
        link_error: links("link_error")?,
        stamped_headers,
        stamps,
        group_index,
        group_id: text("group_id")?,
        chain: links("chain")?,
    })
}

/// `v` as a list of signatures (null: none), each checked; `what` names it in errors.
pub(crate) fn decode_list(v: Option<&Value>, what: &str) -> Result<Vec<Signature>, CanvasError> {
    match v {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(i, item)| Signature::decode(item, &format!("{what}[{i}]")))
            .collect(),
        Some(other) => Err(CanvasError::Invalid(format!(
            "{what} must be a list of signatures or null; got {}",
            json_kind(other)
        ))),
    }
}

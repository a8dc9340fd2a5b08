//! The producer side of Celery's canvas: [`Signature`], [`chain`], [`group`] and [`chord`]
//! built in Rust and sent in the wire form Python Celery sends (`celery/canvas.py`), so a
//! Python worker or a mediafarm worker carries them on alike.
//!
//! - A signature is Celery's dict `{task, args, kwargs, options, subtask_type, immutable}`
//!   (`canvas::signature::encode`); what it would send is checked by the worker's own decoder
//!   before anything is published, so a bad option fails here, not on a worker.
//! - A chain publishes its first step with the rest in the embed `chain`, reversed, every step
//!   holding a `task_id` assigned up front (Celery's `prepare_steps`), so the last step's
//!   result, with its parents, is known at once. A later step may be a [`Step::Chord`], or a
//!   [`Step::Group`] followed by a task, which is sent as a chord with that task as its body
//!   (as `prepare_steps` upgrades it): a `celery.chord` signature whose group, header tasks and
//!   body have their ids, carried out by the worker that runs the step before it. A chord step
//!   whose body is a chain is sent as a chord of its first step followed by the rest, as
//!   Celery 5.7 unrolls it. The last step may be a group (a `celery.group` signature with
//!   its id and its members'): the chain's result is then that group's
//!   ([`Chain::apply_async_group`]).
//! - A group publishes every member with the `group` header (the group id) and `group_index`.
//! - A chord sets the header's size in the result backend (`celery-taskset-meta-<gid>.s`, as
//!   the Redis backend's `set_chord_size`) before publishing the header, each header task
//!   carrying the body in its embed `chord`; the body holds its `task_id` and `group_id`.
//!   A body that is a chain ([`Body::Chain`]) travels as Celery's `celery.chain` signature,
//!   every step's id assigned, its `task_id` and the last step's `group_id` those of the
//!   chord. A body that is a group ([`Body::Group`]) travels as Celery's `celery.group`
//!   signature (its own id as `task_id`, the chord's as `group_id`, each task's id, `group_id`
//!   and `group_index`); one that is a chord ([`Body::Chord`], whose body is a task) as Celery's
//!   `celery.chord` signature with its own group id, its body's `group_id` the outer chord's,
//!   as Celery 5.7 freezes them. An empty header sends the body at once with an empty list, as
//!   Celery does (a chord body needs a header).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde_json::{json, Map, Value};

use super::{AsyncResult, Client, ClientError};
use crate::canvas::signature as wire;
use crate::protocol::{format_time, preview, TaskMessage};

/// Where a chord's header size is kept: `celery-taskset-meta-<gid>.s`.
pub fn chord_size_key(group_id: &str) -> String {
    format!("celery-taskset-meta-{group_id}.s")
}

/// Options a workflow written as JSON (`mediafarm submit --workflow`) may set on a signature:
/// any other name is refused rather than ignored.
const JSON_OPTIONS: &[&str] = &[
    "task_id",
    "queue",
    "routing_key",
    "countdown",
    "eta",
    "expires",
    "priority",
    "time_limit",
    "soft_time_limit",
    "link",
    "link_error",
];

/// A task signature as a producer builds one (`task.s(...)`, `.si(...)`, `.set(...)`).
#[derive(Debug, Clone, PartialEq)]
pub struct Signature {
    pub task: String,
    pub args: Vec<Value>,
    pub kwargs: Map<String, Value>,
    /// Celery's options by their wire names (`queue`, `countdown`, `task_id`, `link`, ...).
    pub options: Map<String, Value>,
    pub immutable: bool,
}

impl Signature {
    /// `task` with keyword arguments (mediafarm tasks take kwargs).
    pub fn new(task: impl Into<String>, kwargs: Map<String, Value>) -> Signature {
        Signature {
            task: task.into(),
            args: Vec::new(),
            kwargs,
            options: Map::new(),
            immutable: false,
        }
    }

    /// Positional arguments (a parent's result, when it is passed, goes before them).
    pub fn args(mut self, args: Vec<Value>) -> Signature {
        self.args = args;
        self
    }

    /// Immutable, as Celery's `.si()`: it does not receive its parent's result.
    pub fn si(mut self) -> Signature {
        self.immutable = true;
        self
    }

    /// Sets a Celery option by its wire name (`.set(name=value)`).
    pub fn set(mut self, name: &str, value: Value) -> Signature {
        self.options.insert(name.to_owned(), value);
        self
    }

    pub fn queue(self, queue: impl Into<String>) -> Signature {
        self.set("queue", Value::String(queue.into()))
    }

    /// Runs no earlier than this many seconds after it is sent (for a chain step: after its
    /// parent ends).
    pub fn countdown(self, secs: f64) -> Signature {
        self.set("countdown", json!(secs))
    }

    pub fn eta(self, at: DateTime<Utc>) -> Signature {
        self.set("eta", Value::String(format_time(at)))
    }

    /// Not run after this many seconds from when it is sent.
    pub fn expires(self, secs: f64) -> Signature {
        self.set("expires", json!(secs))
    }

    pub fn expires_at(self, at: DateTime<Utc>) -> Signature {
        self.set("expires", Value::String(format_time(at)))
    }

    pub fn priority(self, priority: u8) -> Signature {
        self.set("priority", json!(priority))
    }

    pub fn time_limit(self, secs: f64) -> Signature {
        self.set("time_limit", json!(secs))
    }

    pub fn soft_time_limit(self, secs: f64) -> Signature {
        self.set("soft_time_limit", json!(secs))
    }

    /// The task id to use instead of a new UUID.
    pub fn task_id(self, id: impl Into<String>) -> Signature {
        self.set("task_id", Value::String(id.into()))
    }

    /// A callback sent with this task's return value when it succeeds.
    pub fn link(self, callback: Signature) -> Signature {
        self.push_option("link", callback)
    }

    /// An errback sent with this task's id when it fails for good.
    pub fn link_error(self, errback: Signature) -> Signature {
        self.push_option("link_error", errback)
    }

    fn push_option(mut self, name: &str, sig: Signature) -> Signature {
        let entry = self
            .options
            .entry(name.to_owned())
            .or_insert_with(|| Value::Array(Vec::new()));
        match entry {
            Value::Array(items) => items.push(sig.to_value()),
            // Celery accepts one signature as well as a list: keep it and add this one.
            other => *other = Value::Array(vec![other.take(), sig.to_value()]),
        }
        self
    }

    /// The id assigned up front, if any.
    pub fn id(&self) -> Option<&str> {
        self.options.get("task_id").and_then(Value::as_str)
    }

    /// Celery's wire form of this signature.
    pub fn to_value(&self) -> Value {
        wire::encode(
            &self.task,
            &self.args,
            &self.kwargs,
            &self.options,
            self.immutable,
        )
    }

    /// Reads a signature written as JSON: `{"task", "args"?, "kwargs"?, "options"?,
    /// "immutable"?}`, any other field or option name refused.
    pub fn from_json(v: &Value, path: &str) -> Result<Signature, ClientError> {
        let bad = |why: String| ClientError::Workflow(format!("{path}: {why}"));
        let Value::Object(obj) = v else {
            return Err(bad(format!(
                "a signature is an object {{\"task\", \"args\", \"kwargs\", \"options\", \
                 \"immutable\"}}; got {}",
                preview(v)
            )));
        };
        if let Some(other) = obj.keys().find(|k| {
            !matches!(
                k.as_str(),
                // `subtask_type` as Celery writes it (null); the decoder refuses any other.
                "task" | "args" | "kwargs" | "options" | "immutable" | "subtask_type"
            )
        }) {
            return Err(bad(format!(
                "unknown field `{other}` (a signature has task, args, kwargs, options, \
                 immutable)"
            )));
        }
        if let Some(Value::Object(options)) = obj.get("options") {
            if let Some(other) = options.keys().find(|k| !JSON_OPTIONS.contains(&k.as_str())) {
                return Err(bad(format!(
                    "unknown option `{other}` (options: {})",
                    JSON_OPTIONS.join(", ")
                )));
            }
        }
        // The worker's decoder checks every field's type and every option's value.
        if let Some(kind) = obj.get("subtask_type").filter(|k| !k.is_null()) {
            return Err(bad(format!(
                "`subtask_type` {}: a signature here is one task, not nested groups or chords \
                 (write {{\"group\": [...]}} or {{\"chord\": {{...}}}} as a chain step)",
                preview(kind)
            )));
        }
        let checked = wire::Signature::decode(v, path).map_err(|e| bad_canvas(&e))?;
        if checked.kind != wire::Kind::Task {
            return Err(bad("a signature here is one task".into()));
        }
        let options = match obj.get("options") {
            Some(Value::Object(o)) => o.clone(),
            _ => Map::new(),
        };
        Ok(Signature {
            task: checked.task,
            args: checked.args,
            kwargs: checked.kwargs,
            options,
            immutable: checked.immutable,
        })
    }

    /// Sends this task alone.
    pub async fn apply_async(&self, client: &Client) -> Result<AsyncResult, ClientError> {
        let sig = with_id(self.clone());
        let (queue, msg) = message(&sig, Utc::now())?;
        client
            .publish_batch(&queue, std::slice::from_ref(&msg))
            .await?;
        Ok(client.result(&msg.id))
    }
}

/// Steps run one after another, each (unless immutable) receiving the previous one's result.
#[derive(Debug, Clone, PartialEq)]
pub struct Chain {
    pub steps: Vec<Step>,
}

/// One step of a chain: a task, or a group or chord that receives the previous step's result
/// (each member of a group or chord header gets it) — Celery's `chain(a, group(b, c), d)`.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    Task(Signature),
    /// Followed by a task, sent as a chord with that task as its body (as Celery's
    /// `prepare_steps` does); as the chain's last step, sent as the group, whose result is
    /// then the chain's.
    Group(Group),
    Chord(Chord),
}

impl From<Signature> for Step {
    fn from(s: Signature) -> Step {
        Step::Task(s)
    }
}

impl From<Group> for Step {
    fn from(g: Group) -> Step {
        Step::Group(g)
    }
}

impl From<Chord> for Step {
    fn from(c: Chord) -> Step {
        Step::Chord(c)
    }
}

/// Members run in parallel; their results are read in order.
#[derive(Debug, Clone, PartialEq)]
pub struct Group {
    pub members: Vec<Signature>,
    /// The group id to use instead of a new UUID.
    pub id: Option<String>,
}

/// A group whose results, once all are in, go as one list to the body.
#[derive(Debug, Clone, PartialEq)]
pub struct Chord {
    pub header: Vec<Signature>,
    pub body: Body,
    /// The group id (the header's) to use instead of a new UUID.
    pub id: Option<String>,
}

/// What a chord's header results go to: one task, or a chain whose first step (a task) gets
/// them and whose last step's result is the chord's (Celery's `chord(header, chain(b1, b2))`),
/// or a group each of whose tasks gets them (`chord(header, group(x, y))`: the chord's result
/// is the group's), or a chord each of whose header tasks gets them (`chord(header,
/// chord(h2, z))`: the chord's result is `z`'s).
#[derive(Debug, Clone, PartialEq)]
pub enum Body {
    Task(Signature),
    /// Its last step must be a task (the chord's result is one task's).
    Chain(Chain),
    Group(Group),
    /// Its own body must be a task.
    Chord(Box<Chord>),
}

impl From<Signature> for Body {
    fn from(s: Signature) -> Body {
        Body::Task(s)
    }
}

impl From<Chain> for Body {
    fn from(c: Chain) -> Body {
        Body::Chain(c)
    }
}

impl From<Group> for Body {
    fn from(g: Group) -> Body {
        Body::Group(g)
    }
}

impl From<Chord> for Body {
    fn from(c: Chord) -> Body {
        Body::Chord(Box::new(c))
    }
}

pub fn chain<S: Into<Step>>(steps: impl IntoIterator<Item = S>) -> Chain {
    Chain {
        steps: steps.into_iter().map(Into::into).collect(),
    }
}

pub fn group(members: impl IntoIterator<Item = Signature>) -> Group {
    Group {
        members: members.into_iter().collect(),
        id: None,
    }
}

pub fn chord(header: impl IntoIterator<Item = Signature>, body: impl Into<Body>) -> Chord {
    Chord {
        header: header.into_iter().collect(),
        body: body.into(),
        id: None,
    }
}

/// What a chain sends: its first message, and the ids of every step in order.
#[derive(Debug, Clone, PartialEq)]
pub struct ChainPlan {
    pub queue: String,
    pub msg: TaskMessage,
    /// Each step's id: a task's, a chord's body's, a group's own (the group id).
    pub ids: Vec<String>,
    /// The members' ids when the last step is a group.
    pub last_group: Option<Vec<String>>,
}

/// A chain with every id assigned, as Celery's `prepare_steps` leaves it.
struct FrozenChain {
    /// The first step, a task.
    first: Signature,
    /// The other steps' wire forms, in running order.
    rest: Vec<Value>,
    ids: Vec<String>,
    last_group: Option<Vec<String>>,
}

impl Chain {
    /// Whether the last step is a group (the chain's result is then the group's).
    pub fn ends_in_group(&self) -> bool {
        matches!(self.steps.last(), Some(Step::Group(_)))
    }

    /// Every step with its id, in order; a chord step whose body is a chain unrolled into a
    /// chord of the body's first step followed by the rest (as Celery 5.7's `prepare_steps`).
    fn freeze(&self) -> Result<FrozenChain, ClientError> {
        let Some((first, rest)) = self.steps.split_first() else {
            return Err(ClientError::Workflow(
                "a chain needs at least one step".into(),
            ));
        };
        let Step::Task(first) = first else {
            return Err(ClientError::Workflow(
                "a chain's first step must be a task (send a group or chord on its own)".into(),
            ));
        };
        let first = with_id(first.clone());
        let mut ids = vec![first.id().unwrap_or_default().to_owned()];
        let mut wire_rest = Vec::with_capacity(rest.len());
        let mut last_group = None;
        let mut steps: std::collections::VecDeque<Step> = rest.iter().cloned().collect();
        let mut n = 0;
        while let Some(step) = steps.pop_front() {
            n += 1;
            let (value, id) = match step {
                Step::Task(s) => {
                    let s = with_id(s);
                    (s.to_value(), s.id().unwrap_or_default().to_owned())
                }
                Step::Chord(c) => {
                    let body = match c.body {
                        Body::Task(b) => b,
                        Body::Group(_) | Body::Chord(_) => {
                            return Err(ClientError::Workflow(format!(
                                "chain step {n}: a chord step's body must be a task or a chain \
                                 (a chord whose body is a group or a chord is sent on its own)"
                            )))
                        }
                        Body::Chain(chain) => {
                            let mut inner = chain.steps.into_iter();
                            let Some(Step::Task(head)) = inner.next() else {
                                return Err(ClientError::Workflow(format!(
                                    "chain step {n}: a chord's body chain must start with a task"
                                )));
                            };
                            for (i, s) in inner.enumerate() {
                                steps.insert(i, s);
                            }
                            head
                        }
                    };
                    let frozen = FrozenChord::new(&c.header, body, c.id);
                    (frozen.to_value(), frozen.body_id)
                }
                // A group followed by a task: a chord, as Celery's `prepare_steps` makes it.
                Step::Group(g) => match steps.pop_front() {
                    Some(Step::Task(body)) => {
                        let frozen = FrozenChord::new(&g.members, body, g.id);
                        (frozen.to_value(), frozen.body_id)
                    }
                    Some(_) => {
                        return Err(ClientError::Workflow(format!(
                            "chain step {n}: a group in a chain must be followed by a task (it \
                             becomes a chord with that task as its body)"
                        )))
                    }
                    // The last step: sent as the group, as Celery's `chain(a, group(b, c))`.
                    None => {
                        let id = g.id.unwrap_or_else(new_id);
                        let members: Vec<Signature> = g
                            .members
                            .iter()
                            .enumerate()
                            .map(|(i, s)| with_id(s.clone()).set("group_index", json!(i)))
                            .collect();
                        last_group = Some(
                            members
                                .iter()
                                .map(|m| m.id().unwrap_or_default().to_owned())
                                .collect(),
                        );
                        let tasks: Vec<Value> = members.iter().map(Signature::to_value).collect();
                        (group_value(&id, tasks), id)
                    }
                },
            };
            // Checked here, as the first step is, so a bad step fails before anything is sent
            // rather than on a worker after its parent ran.
            wire::Signature::decode(&value, &format!("chain step {n}"))
                .map_err(|e| bad_canvas(&e))?;
            wire_rest.push(value);
            ids.push(id);
        }
        Ok(FrozenChain {
            first,
            rest: wire_rest,
            ids,
            last_group,
        })
    }

    /// The first step's message, the others reversed in its embed `chain`, every step with
    /// its id assigned (a chord's group, header tasks and body too; a group's and its
    /// members').
    pub fn plan(&self, now: DateTime<Utc>) -> Result<ChainPlan, ClientError> {
        let FrozenChain {
            first,
            mut rest,
            ids,
            last_group,
        } = self.freeze()?;
        let (queue, mut msg) = message(&first, now)?;
        if !rest.is_empty() {
            rest.reverse();
            msg.embed.insert("chain".into(), Value::Array(rest));
        }
        Ok(ChainPlan {
            queue,
            msg,
            ids,
            last_group,
        })
    }

    /// Sends the chain; the last step's result, whose `parent` is the step before it. A chain
    /// that ends in a group is sent with [`Chain::apply_async_group`].
    pub async fn apply_async(&self, client: &Client) -> Result<AsyncResult, ClientError> {
        if self.ends_in_group() {
            return Err(ClientError::Workflow(
                "this chain ends in a group, whose result is a GroupResult: send it with \
                 Chain::apply_async_group (or as a Workflow)"
                    .into(),
            ));
        }
        let plan = self.plan(Utc::now())?;
        client
            .publish_batch(&plan.queue, std::slice::from_ref(&plan.msg))
            .await?;
        Ok(linked_results(client, &plan.ids))
    }

    /// Sends a chain whose last step is a group (Celery's `chain(a, group(b, c))`); the
    /// group's result, its members in order, whose `parent` is the step before it.
    pub async fn apply_async_group(&self, client: &Client) -> Result<GroupResult, ClientError> {
        let plan = self.plan(Utc::now())?;
        let (Some(members), Some((id, before))) = (&plan.last_group, plan.ids.split_last()) else {
            return Err(ClientError::Workflow(
                "this chain does not end in a group: send it with Chain::apply_async".into(),
            ));
        };
        client
            .publish_batch(&plan.queue, std::slice::from_ref(&plan.msg))
            .await?;
        Ok(GroupResult {
            id: id.clone(),
            results: members.iter().map(|m| client.result(m)).collect(),
            parent: Some(Box::new(linked_results(client, before))),
        })
    }
}

/// Celery's `celery.group` signature as a frozen chain step: its id, its members' ids and
/// places in their options.
fn group_value(id: &str, tasks: Vec<Value>) -> Value {
    json!({
        "task": "celery.group", "args": [], "immutable": false, "subtask_type": "group",
        "options": {"task_id": id, "root_id": null, "parent_id": null},
        "kwargs": {"tasks": tasks},
    })
}

/// The last id's result, each one's `parent` the one before it.
fn linked_results(client: &Client, ids: &[String]) -> AsyncResult {
    let mut last: Option<AsyncResult> = None;
    for id in ids {
        let mut r = client.result(id);
        r.parent = last.take().map(Box::new);
        last = Some(r);
    }
    // A plan always holds at least one id.
    last.unwrap_or_else(|| client.result(""))
}

/// What a group sends: one message per member, in order.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupPlan {
    pub id: String,
    pub publish: Vec<(String, TaskMessage)>,
}

impl Group {
    pub fn plan(&self, now: DateTime<Utc>) -> Result<GroupPlan, ClientError> {
        let id = self.id.clone().unwrap_or_else(new_id);
        let publish = members(&self.members, &id, None, now)?;
        Ok(GroupPlan { id, publish })
    }

    /// Sends every member; the group's result, members in order.
    pub async fn apply_async(&self, client: &Client) -> Result<GroupResult, ClientError> {
        let plan = self.plan(Utc::now())?;
        let results = plan
            .publish
            .iter()
            .map(|(_, m)| client.result(&m.id))
            .collect();
        publish_all(client, plan.publish).await?;
        Ok(GroupResult {
            id: plan.id,
            results,
            parent: None,
        })
    }
}

/// What a chord sends: the size to set first, then the header's messages (or, for an empty
/// header, the body's own message).
#[derive(Debug, Clone, PartialEq)]
pub struct ChordPlan {
    pub group_id: String,
    /// The body's id; a chain body's last step's.
    pub body_id: String,
    /// Every step's id when the body is a chain (its last is `body_id`); empty otherwise.
    pub body_chain: Vec<String>,
    /// Each task's id when the body is a group (`body_id` is the group's id).
    pub body_group: Option<Vec<String>>,
    /// The header's size, for `chord_size_key(group_id)`; 0 for an empty header.
    pub size: usize,
    pub publish: Vec<(String, TaskMessage)>,
}

/// A chord with every id assigned, as a chain step sends it.
struct FrozenChord {
    group_id: String,
    body_id: String,
    header: Vec<Value>,
    body: Value,
}

impl FrozenChord {
    /// Celery's `celery.chord` signature: `kwargs` `{header: celery.group, body, kwargs}`.
    fn to_value(&self) -> Value {
        json!({
            "task": "celery.chord", "args": [], "immutable": false, "subtask_type": "chord",
            "options": {"task_id": self.group_id},
            "kwargs": {"kwargs": {}, "body": self.body, "header": {
                "task": "celery.group", "args": [], "immutable": false, "subtask_type": "group",
                "options": {"task_id": self.group_id, "root_id": null, "parent_id": null},
                "kwargs": {"tasks": self.header},
            }},
        })
    }

    /// Ids assigned: the group's, each header task's (with its `group_index`) and the body's.
    fn new(header: &[Signature], body: Signature, id: Option<String>) -> FrozenChord {
        let group_id = id.unwrap_or_else(new_id);
        let body = with_id(body);
        let header = header
            .iter()
            .enumerate()
            .map(|(i, s)| with_id(s.clone()).set("group_index", json!(i)).to_value())
            .collect();
        FrozenChord {
            group_id,
            body_id: body.id().unwrap_or_default().to_owned(),
            header,
            body: body.to_value(),
        }
    }
}

impl Chord {
    pub fn plan(&self, now: DateTime<Utc>) -> Result<ChordPlan, ClientError> {
        let group_id = self.id.clone().unwrap_or_else(new_id);
        let FrozenBody {
            value: body,
            id: body_id,
            chain: body_chain,
            group: body_group,
        } = freeze_body(&self.body, &group_id)?;
        wire::Signature::decode(&body, "chord body").map_err(|e| bad_canvas(&e))?;
        if self.header.is_empty() {
            // What a worker's join would send with no results: the body, or its chain's first
            // step with the rest as its chain.
            let part = crate::canvas::ChordPart {
                group: group_id.clone(),
                index: None,
                body: wire::Signature::decode(&body, "chord body").map_err(|e| bad_canvas(&e))?,
            };
            let root = body_chain.first().unwrap_or(&body_id).clone();
            let parent = crate::canvas::Parent {
                id: &root,
                root_id: &root,
            };
            // A task or a chain body: one message; a group body: one per task.
            let sent = crate::canvas::chord::body_message(&part, Vec::new(), parent, now);
            if !sent.chord_sizes.is_empty() {
                return Err(ClientError::Workflow(
                    "a chord whose body is a chord needs a header".into(),
                ));
            }
            if sent.publish.is_empty() {
                return Err(bad_canvas(&crate::canvas::CanvasError::Invalid(
                    "the chord's body sends nothing".to_owned(),
                )));
            }
            let publish = sent
                .publish
                .into_iter()
                .map(|p| {
                    let mut one = p.msg;
                    // Sent by the producer: no parent, its own root.
                    one.parent_id = None;
                    one.root_id = Some(one.id.clone());
                    (p.queue, one)
                })
                .collect();
            return Ok(ChordPlan {
                group_id,
                body_id,
                body_chain,
                body_group,
                size: 0,
                publish,
            });
        }
        let publish = members(&self.header, &group_id, Some(&body), now)?;
        Ok(ChordPlan {
            group_id,
            body_id,
            body_chain,
            body_group,
            size: self.header.len(),
            publish,
        })
    }

    /// Sets the header's size, then sends the header; the body's result and the header's.
    pub async fn apply_async(&self, client: &Client) -> Result<ChordResult, ClientError> {
        let plan = self.plan(Utc::now())?;
        if plan.size > 0 {
            set_chord_size(client, &plan.group_id, plan.size).await?;
        }
        let header = GroupResult {
            id: plan.group_id.clone(),
            results: if plan.size > 0 {
                plan.publish
                    .iter()
                    .map(|(_, m)| client.result(&m.id))
                    .collect()
            } else {
                Vec::new()
            },
            parent: None,
        };
        publish_all(client, plan.publish).await?;
        let body = if plan.body_chain.is_empty() {
            client.result(&plan.body_id)
        } else {
            linked_results(client, &plan.body_chain)
        };
        let body_group = plan.body_group.map(|ids| GroupResult {
            id: plan.body_id.clone(),
            results: ids.iter().map(|id| client.result(id)).collect(),
            parent: None,
        });
        Ok(ChordResult {
            body,
            header,
            body_group,
        })
    }
}

/// A chord's body with every id assigned, as Celery's `chord.freeze` leaves it.
struct FrozenBody {
    value: Value,
    /// The id the chord's result is: the task's, a chain's last step's, a group's own id, an
    /// inner chord's body's.
    id: String,
    /// A chain body's steps' ids.
    chain: Vec<String>,
    /// A group body's tasks' ids.
    group: Option<Vec<String>>,
}

/// Freezes `body` for the chord whose header's group is `group_id`: a task takes that
/// `group_id` (as Celery's `freeze(group_id=...)`), a chain's last step too; a group body
/// keeps its own id as `task_id` and takes `group_id` in its options and each task's (with
/// its `group_index`); a chord body gets its own group id and its body takes `group_id` (the
/// outer chord's, as Celery 5.7 freezes it).
fn freeze_body(body: &Body, group_id: &str) -> Result<FrozenBody, ClientError> {
    let in_group = |mut sig: Signature| {
        sig.options
            .entry("group_id")
            .or_insert_with(|| Value::String(group_id.to_owned()));
        sig
    };
    let (value, id, chain, group) = match body {
        Body::Task(b) => {
            let body = in_group(with_id(b.clone()));
            let id = body.id().unwrap_or_default().to_owned();
            (body.to_value(), id, Vec::new(), None)
        }
        Body::Group(g) => {
            let id = g.id.clone().unwrap_or_else(new_id);
            let members: Vec<Signature> = g
                .members
                .iter()
                .enumerate()
                .map(|(i, s)| in_group(with_id(s.clone())).set("group_index", json!(i)))
                .collect();
            let ids = members
                .iter()
                .map(|m| m.id().unwrap_or_default().to_owned())
                .collect();
            let tasks: Vec<Value> = members.iter().map(Signature::to_value).collect();
            let mut value = group_value(&id, tasks);
            value["options"]["group_id"] = Value::String(group_id.to_owned());
            (value, id, Vec::new(), Some(ids))
        }
        Body::Chord(inner) => {
            let Body::Task(z) = &inner.body else {
                return Err(ClientError::Workflow(
                    "a chord body that is a chord must have a task as its own body".into(),
                ));
            };
            if inner.header.is_empty() {
                return Err(ClientError::Workflow(
                    "a chord body that is a chord needs a header (send its body as the \
                     chord's body instead)"
                        .into(),
                ));
            }
            let frozen = FrozenChord::new(&inner.header, in_group(z.clone()), inner.id.clone());
            (frozen.to_value(), frozen.body_id, Vec::new(), None)
        }
        Body::Chain(chain) => {
            let frozen = chain.freeze()?;
            if frozen.last_group.is_some() {
                return Err(ClientError::Workflow(
                    "a chord's body chain must end in a task (the chord's result is one \
                         task's)"
                        .into(),
                ));
            }
            let body_id = frozen.ids.last().cloned().unwrap_or_default();
            let mut tasks = vec![frozen.first.to_value()];
            tasks.extend(frozen.rest);
            // As Celery's `chain.freeze(body_id, group_id=...)`: the last step's result
            // is the chord's, in the chord's group.
            if let Some(Value::Object(options)) = tasks
                .last_mut()
                .filter(|t| t["subtask_type"].is_null())
                .and_then(|t| t.get_mut("options"))
            {
                options
                    .entry("group_id")
                    .or_insert_with(|| Value::String(group_id.to_owned()));
            }
            let value = json!({
                "task": "celery.chain", "args": [], "immutable": false,
                "subtask_type": "chain", "options": {"task_id": body_id},
                "kwargs": {"tasks": tasks},
            });
            (value, body_id, frozen.ids, None)
        }
    };
    Ok(FrozenBody {
        value,
        id,
        chain,
        group,
    })
}

/// As Celery 5.7's Redis backend `set_chord_size`: the `.c` dispatch claim of an earlier run of
/// the same group deleted, then SET (with the results' expiry) and PUBLISH.
async fn set_chord_size(client: &Client, group_id: &str, size: usize) -> Result<(), ClientError> {
    let key = chord_size_key(group_id);
    let mut pipe = redis::pipe();
    pipe.atomic()
        .del(crate::backend::chord::group_key(group_id, ".c"))
        .ignore();
    match client.result_expires {
        Some(secs) => pipe.set_ex(&key, size, secs).ignore(),
        None => pipe.set(&key, size).ignore(),
    };
    pipe.publish(&key, size).ignore();
    let mut conn = client.backend.connection();
    pipe.query_async::<()>(&mut conn)
        .await
        .map_err(|e| ClientError::Backend(crate::backend::BackendError::from(e)))?;
    Ok(())
}

/// The members' messages: each with its id, `group`/`group_index`, and the chord's body in its
/// embed when it is a chord's header.
fn members(
    sigs: &[Signature],
    group_id: &str,
    chord_body: Option<&Value>,
    now: DateTime<Utc>,
) -> Result<Vec<(String, TaskMessage)>, ClientError> {
    sigs.iter()
        .enumerate()
        .map(|(i, sig)| {
            let (queue, mut msg) = message(&with_id(sig.clone()), now)?;
            msg.group = Some(group_id.to_owned());
            msg.group_index = i64::try_from(i).ok();
            if let Some(body) = chord_body {
                msg.embed.insert("chord".into(), body.clone());
            }
            Ok((queue, msg))
        })
        .collect()
}

/// Publishes each queue's messages as one batch (one wait for the confirms).
async fn publish_all(client: &Client, msgs: Vec<(String, TaskMessage)>) -> Result<(), ClientError> {
    let mut by_queue: BTreeMap<String, Vec<TaskMessage>> = BTreeMap::new();
    for (queue, msg) in msgs {
        by_queue.entry(queue).or_default().push(msg);
    }
    for (queue, batch) in by_queue {
        client.publish_batch(&queue, &batch).await?;
    }
    Ok(())
}

fn new_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// `sig` with a `task_id`, a new one unless it has one (Celery's `freeze`).
fn with_id(sig: Signature) -> Signature {
    if sig.id().is_some() {
        return sig;
    }
    sig.task_id(new_id())
}

fn bad_canvas(e: &crate::canvas::CanvasError) -> ClientError {
    ClientError::Workflow(e.to_string())
}

/// The message that sends `sig` now, and its queue: decoded with the worker's own checks, so
/// what a worker would refuse is refused before it is sent.
fn message(sig: &Signature, now: DateTime<Utc>) -> Result<(String, TaskMessage), ClientError> {
    let path = format!("signature {}", sig.task);
    let d = wire::Signature::decode(&sig.to_value(), &path).map_err(|e| bad_canvas(&e))?;
    let o = &d.options;
    let mut msg = TaskMessage::new(d.task.clone(), d.kwargs.clone());
    if let Some(id) = &o.task_id {
        msg.id = id.clone();
    }
    let text = |name: &str| {
        sig.options
            .get(name)
            .and_then(Value::as_str)
            .map(str::to_owned)
    };
    msg.root_id = Some(text("root_id").unwrap_or_else(|| msg.id.clone()));
    msg.parent_id = text("parent_id");
    msg.args = d.args.clone();
    o.apply_to(&mut msg, now);
    Ok((d.queue, msg))
}

/// A group's result: its id and its members' results in order (Celery's `GroupResult`).
#[derive(Clone)]
pub struct GroupResult {
    pub id: String,
    pub results: Vec<AsyncResult>,
    /// The chain step before the group, when the group ends a chain sent by this client.
    parent: Option<Box<AsyncResult>>,
}

impl GroupResult {
    /// The result of the step before this group in a chain sent by this client.
    pub fn parent(&self) -> Option<&AsyncResult> {
        self.parent.as_deref()
    }

    /// Every member's return value in order; the first failure, as `ClientError::Failed`.
    pub async fn get(&self, timeout: Duration) -> Result<Vec<Value>, ClientError> {
        let deadline = Instant::now() + timeout;
        let mut out = Vec::with_capacity(self.results.len());
        for r in &self.results {
            let left = deadline.saturating_duration_since(Instant::now());
            out.push(r.get(left.max(Duration::from_millis(1))).await?);
        }
        Ok(out)
    }
}

/// A chord's result: the body's (a chain body's last step's, its parents the chain's steps;
/// a chord body's body's; a group body's id, which has a record only if the chord failed),
/// and the header's group.
#[derive(Clone)]
pub struct ChordResult {
    pub body: AsyncResult,
    pub header: GroupResult,
    /// When the body is a group: its result, its tasks in order (what Python's
    /// `chord(header, group(...)).apply_async()` returns).
    pub body_group: Option<GroupResult>,
}

impl ChordResult {
    /// The body's return value; a group body's, the list of its tasks' in order.
    pub async fn get(&self, timeout: Duration) -> Result<Value, ClientError> {
        match &self.body_group {
            Some(g) => g.get(timeout).await.map(Value::Array),
            None => self.body.get(timeout).await,
        }
    }
}

/// A workflow written as JSON (`mediafarm submit --workflow`): a signature, or
/// `{"chain": [sig, ...]}`, `{"group": [sig, ...]}`, `{"chord": {"header": [sig, ...],
/// "body": sig, {"chain": [...]}, {"group": [...]} or {"chord": {...}}}}`.
#[derive(Debug, Clone, PartialEq)]
pub enum Workflow {
    Task(Signature),
    Chain(Chain),
    Group(Group),
    Chord(Chord),
}

/// What sending a [`Workflow`] gives back.
#[derive(Clone)]
pub enum WorkflowResult {
    /// A task's, or a chain's last step's (its `parent` the step before).
    Task(AsyncResult),
    Group(GroupResult),
    Chord(ChordResult),
}

impl WorkflowResult {
    /// The id to wait on: the task's (the chain's last step's), the group's, the chord body's.
    pub fn id(&self) -> &str {
        match self {
            WorkflowResult::Task(r) => &r.id,
            WorkflowResult::Group(g) => &g.id,
            WorkflowResult::Chord(c) => &c.body.id,
        }
    }

    /// The return value: the task's, the list of the group's, the chord body's.
    pub async fn get(&self, timeout: Duration) -> Result<Value, ClientError> {
        match self {
            WorkflowResult::Task(r) => r.get(timeout).await,
            WorkflowResult::Group(g) => g.get(timeout).await.map(Value::Array),
            WorkflowResult::Chord(c) => c.get(timeout).await,
        }
    }
}

impl Workflow {
    /// Reads the JSON shape above; anything else is refused naming where.
    pub fn from_json(v: &Value) -> Result<Workflow, ClientError> {
        let bad = |why: String| ClientError::Workflow(why);
        let list = |v: &Value, what: &str| -> Result<Vec<Signature>, ClientError> {
            let Value::Array(items) = v else {
                return Err(bad(format!(
                    "{what} must be a list of signatures; got {}",
                    preview(v)
                )));
            };
            items
                .iter()
                .enumerate()
                .map(|(i, s)| Signature::from_json(s, &format!("{what}[{i}]")))
                .collect()
        };
        let Value::Object(obj) = v else {
            return Err(bad(format!(
                "a workflow is a JSON object (a signature, {{\"chain\": [...]}}, {{\"group\": \
                 [...]}} or {{\"chord\": {{\"header\": [...], \"body\": ...}}}}); got {}",
                preview(v)
            )));
        };
        if obj.contains_key("task") {
            return Signature::from_json(v, "workflow").map(Workflow::Task);
        }
        let (kind, inner) = match obj.iter().next() {
            Some(one) if obj.len() == 1 => one,
            _ => {
                return Err(bad(format!(
                    "a workflow has exactly one of \"task\", \"chain\", \"group\", \"chord\"; \
                     got the fields {}",
                    obj.keys().cloned().collect::<Vec<_>>().join(", ")
                )))
            }
        };
        match kind.as_str() {
            "chain" => {
                let Value::Array(items) = inner else {
                    return Err(bad(format!(
                        "chain must be a list of steps; got {}",
                        preview(inner)
                    )));
                };
                if items.is_empty() {
                    return Err(bad("chain needs at least one step".into()));
                }
                // A step is a signature, a group or a chord (not another chain).
                let steps = items
                    .iter()
                    .enumerate()
                    .map(|(i, item)| {
                        let is = |k: &str| item.as_object().is_some_and(|o| o.contains_key(k));
                        if is("task") {
                            return Signature::from_json(item, &format!("chain[{i}]"))
                                .map(Step::Task);
                        }
                        if is("chain") {
                            return Err(bad(format!(
                                "chain[{i}]: a chain step is a signature, a group or a chord, \
                                 not a chain"
                            )));
                        }
                        match Workflow::from_json(item) {
                            Ok(Workflow::Group(g)) => Ok(Step::Group(g)),
                            Ok(Workflow::Chord(c)) => Ok(Step::Chord(c)),
                            Ok(_) => Err(bad(format!(
                                "chain[{i}]: a chain step is a signature, a group or a chord, \
                                 not a chain"
                            ))),
                            Err(e) => Err(bad(format!("chain[{i}]: {e}"))),
                        }
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(Workflow::Chain(chain(steps)))
            }
            "group" => Ok(Workflow::Group(group(list(inner, "group")?))),
            "chord" => {
                let Value::Object(c) = inner else {
                    return Err(bad(format!(
                        "chord must be {{\"header\": [...], \"body\": signature, \
                         {{\"chain\": [...]}}, {{\"group\": [...]}} or {{\"chord\": \
                         {{...}}}}}}; got {}",
                        preview(inner)
                    )));
                };
                if let Some(other) = c.keys().find(|k| !matches!(k.as_str(), "header" | "body")) {
                    return Err(bad(format!(
                        "chord has an unknown field `{other}` (header, body)"
                    )));
                }
                let header = list(c.get("header").unwrap_or(&Value::Null), "chord header")?;
                let body = c.get("body").unwrap_or(&Value::Null);
                let nested = ["chain", "group", "chord"]
                    .iter()
                    .any(|k| body.get(k).is_some());
                let body = if nested {
                    match Workflow::from_json(body) {
                        Ok(Workflow::Chain(steps)) => Body::Chain(steps),
                        Ok(Workflow::Group(g)) => Body::Group(g),
                        Ok(Workflow::Chord(c)) => Body::Chord(Box::new(c)),
                        Ok(Workflow::Task(_)) => {
                            return Err(bad("chord body: a signature, {\"chain\": [...]}, \
                                            {\"group\": [...]} or {\"chord\": {...}}"
                                .into()))
                        }
                        Err(e) => return Err(bad(format!("chord body: {e}"))),
                    }
                } else {
                    Body::Task(Signature::from_json(body, "chord body")?)
                };
                Ok(Workflow::Chord(chord(header, body)))
            }
            other => Err(bad(format!(
                "unknown workflow kind `{other}` (task, chain, group, chord); a chain's steps \
                 may be groups and chords, nothing else nests"
            ))),
        }
    }

    pub async fn apply_async(&self, client: &Client) -> Result<WorkflowResult, ClientError> {
        Ok(match self {
            Workflow::Task(s) => WorkflowResult::Task(s.apply_async(client).await?),
            Workflow::Chain(c) if c.ends_in_group() => {
                WorkflowResult::Group(c.apply_async_group(client).await?)
            }
            Workflow::Chain(c) => WorkflowResult::Task(c.apply_async(client).await?),
            Workflow::Group(g) => WorkflowResult::Group(g.apply_async(client).await?),
            Workflow::Chord(c) => WorkflowResult::Chord(c.apply_async(client).await?),
        })
    }
}

#[cfg(test)]
mod tests;

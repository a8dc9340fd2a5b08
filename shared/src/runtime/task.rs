//! Typed tasks: the `Task` trait a worker implements, the registry that maps Celery task names
//! to tasks, and the context a running job sees. Keyword arguments are deserialised with serde
//! into the task's argument struct; a mismatch names the field that is wrong.
//!
//! A job reaches the broker and the backend only through its context: progress
//! ([`TaskContext::update_state`]), once-only side effects ([`TaskContext::once`]), its
//! continuation ([`TaskContext::continue_with`]) and the signals of a long-running job
//! ([`TaskContext::signals`], see [`crate::runtime::stop`]).

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{Map, Value};
use tokio_util::sync::CancellationToken;

use crate::amqp::broker::Publisher;
use crate::backend::result::{ResultMeta, TaskError, TaskState};
use crate::backend::ResultBackend;
use crate::canvas::{failure_of, ParentFailure};
use crate::protocol::TaskMessage;
use crate::runtime::cpu::CpuPool;
use crate::runtime::stop::{self, Signals};

/// A job type a worker runs. `NAME` is the Celery task name (`image.transform`).
pub trait Task: Send + Sync + 'static {
    const NAME: &'static str;
    /// Names given to positional `args`, in order. Empty: keyword arguments only (or only
    /// [`Task::PARENT_RESULT`]).
    const POSITIONAL: &'static [&'static str] = &[];
    /// The kwarg that receives a parent's return value when this task is a chain step or a
    /// `link` callback (Celery passes it as the first positional argument). `None`: the task
    /// can only run as an immutable signature (`.si()`) in a workflow. When `POSITIONAL` is
    /// not empty, its first name must be this one.
    const PARENT_RESULT: Option<&'static str> = None;
    /// Retries after transient failures; `None`: the `task_max_retries` setting.
    const MAX_RETRIES: Option<u32> = None;
    /// Hard time limit in seconds; `None`: the `task_time_limit` setting. A message's own
    /// `timelimit` header wins over both.
    const TIME_LIMIT: Option<f64> = None;
    /// Soft time limit in seconds; `None`: the `task_soft_time_limit` setting.
    const SOFT_TIME_LIMIT: Option<f64> = None;
    /// Celery's `rate_limit`: at most this many jobs of the task start per second, minute or
    /// hour on one worker (`"100/m"`, `"10/s"`, `"1000/h"`; `"0"`: none); jobs over it wait
    /// in the worker, in order. `None`: the `task_default_rate_limit` setting. A rate that
    /// does not parse stops the worker's start-up. See [`crate::runtime::rate`].
    const RATE_LIMIT: Option<&'static str> = None;
    type Args: DeserializeOwned + Send + 'static;
    type Output: Serialize + Send + 'static;

    fn run(
        &self,
        ctx: TaskContext,
        args: Self::Args,
    ) -> impl Future<Output = Result<Self::Output, TaskError>> + Send;
}

/// A job a producer can send: its task name, default queue and keyword arguments.
pub trait Job: Serialize {
    const TASK: &'static str;
    const QUEUE: &'static str;
}

pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// A task's limits and retry policy, from its `Task` constants.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct TaskPolicy {
    pub max_retries: Option<u32>,
    pub time_limit: Option<Duration>,
    pub soft_time_limit: Option<Duration>,
    /// The task's `RATE_LIMIT` as written, parsed when the worker starts.
    pub rate_limit: Option<&'static str>,
}

/// Tells a running job to wrap up: set at its soft time limit, when it is revoked with
/// `terminate`, or when it was abandoned at its hard limit. CPU loops check `is_set()`;
/// async code can `wait()` on it in a `select!`.
#[derive(Clone, Default)]
pub struct StopSignal(CancellationToken);

impl StopSignal {
    pub fn is_set(&self) -> bool {
        self.0.is_cancelled()
    }

    pub async fn wait(&self) {
        self.0.cancelled().await
    }

    pub(crate) fn set(&self) {
        self.0.cancel()
    }
}

/// What the runtime knows about a running job, and the services it may use.
#[derive(Clone)]
pub struct TaskContext {
    pub id: String,
    pub task: String,
    pub retries: u32,
    /// The job that sent this one (a chain's previous step, the job a callback or errback
    /// belongs to); `None` for a job a producer sent.
    pub parent_id: Option<String>,
    /// The first job of the workflow this one belongs to (its own id when it is the first).
    pub root_id: String,
    pub hostname: Arc<str>,
    /// The queue the job was delivered from.
    pub queue: Arc<str>,
    backend: ResultBackend,
    publisher: Publisher,
    cpu: CpuPool,
    stop: StopSignal,
}

/// The runtime's services a job's context hands out.
#[derive(Clone)]
pub(crate) struct Services {
    pub hostname: Arc<str>,
    pub backend: ResultBackend,
    /// Confirmed publishing for continuations (connects on first use).
    pub publisher: Publisher,
    pub cpu: CpuPool,
}

impl TaskContext {
    pub(crate) fn new(msg: &TaskMessage, queue: Arc<str>, services: &Services) -> TaskContext {
        TaskContext {
            id: msg.id.clone(),
            task: msg.task.clone(),
            retries: msg.retries,
            parent_id: msg.parent_id.clone(),
            root_id: msg.root_id.clone().unwrap_or_else(|| msg.id.clone()),
            hostname: services.hostname.clone(),
            queue,
            backend: services.backend.clone(),
            publisher: services.publisher.clone(),
            cpu: services.cpu.clone(),
            stop: StopSignal::default(),
        }
    }

    /// Runs CPU-heavy work on the bounded pool. Long loops should check `cancel_flag()`: work
    /// abandoned at the hard limit frees its pool slot at once, but its thread runs until the
    /// closure returns.
    pub async fn cpu<F, R>(&self, f: F) -> Result<R, TaskError>
    where
        F: FnOnce() -> R + Send + 'static,
        R: Send + 'static,
    {
        self.cpu.run(f).await
    }

    /// Set when the job should stop: its soft time limit passed, it was revoked with
    /// `terminate`, or it was abandoned at its hard limit. Clone it into CPU closures.
    pub fn cancel_flag(&self) -> StopSignal {
        self.stop.clone()
    }

    /// Resolves when the soft time limit passes (or the job is told to stop otherwise).
    pub async fn soft_time_limit_reached(&self) {
        self.stop.wait().await
    }

    /// Claims a once-only side effect (sending an email, charging a card) under `key`, so a
    /// redelivered job does not repeat it. See [`crate::backend::once`].
    pub async fn once(
        &self,
        key: &str,
        lease: Duration,
    ) -> Result<crate::backend::once::Claim, TaskError> {
        crate::backend::once::claim(&self.backend, key, lease)
            .await
            .map_err(|e| TaskError::transient("BackendError", e.to_string()))
    }

    /// Stores a progress state (for example `PROGRESS` with counters) that readers can poll.
    pub async fn update_state(&self, state: &str, meta: Value) -> Result<(), TaskError> {
        let record = ResultMeta::new(&self.id, TaskState::Custom(state.to_owned()), meta);
        self.backend
            .store(&record)
            .await
            .map_err(|e| TaskError::transient("BackendError", e.to_string()))
    }

    /// The result backend, for helpers that keep state in Redis.
    pub fn backend(&self) -> &ResultBackend {
        &self.backend
    }

    /// Hands the running job on: publishes a new job of the same task with `kwargs` to the
    /// queue this one was delivered from (waiting for the broker's confirm) and returns its
    /// id. A job too long for one delivery (RabbitMQ's ack timeout) ends its slice with this
    /// and returns; the continuation carries only the task, the kwargs and a new id — no ETA,
    /// expiry, priority, time limits or canvas — so pass in `kwargs` whatever it must resume.
    pub async fn continue_with(&self, kwargs: Map<String, Value>) -> Result<String, TaskError> {
        let msg = continuation(&self.task, kwargs);
        self.publisher
            .publish(&self.queue, &msg)
            .await
            .map_err(|e| {
                TaskError::transient(
                    "BrokerError",
                    format!("cannot publish the continuation: {e}"),
                )
            })?;
        tracing::debug!(id = %self.id, next = %msg.id, queue = %self.queue, "job handed on");
        Ok(msg.id)
    }

    /// The stored failure of job `id`, typed: what an errback (`link_error`) reads, as it
    /// receives the failed job's id as its first positional argument. A permanent
    /// `ParentFailureMissing` error when no FAILURE is stored under `id`.
    pub async fn failure_of(&self, id: &str) -> Result<ParentFailure, TaskError> {
        match failure_of(&self.backend, id).await {
            Ok(Some(failure)) => Ok(failure),
            Ok(None) => Err(TaskError::permanent(
                "ParentFailureMissing",
                format!(
                    "no FAILURE is stored for job {}: an errback receives the id of a job \
                     that failed, and its record may have expired (result_expires)",
                    crate::protocol::preview_str(id)
                ),
            )),
            Err(e) => Err(TaskError::transient("BackendError", e.to_string())),
        }
    }

    /// A stop request for `subject` of `scope` (made with [`stop::request`]) and whether any
    /// of `ids` is revoked, in one round trip: what a long-running job polls.
    pub async fn signals(
        &self,
        scope: &str,
        subject: &str,
        ids: &[&str],
    ) -> Result<Signals, TaskError> {
        stop::signals(&self.backend, scope, subject, ids)
            .await
            .map_err(|e| TaskError::transient("BackendError", e.to_string()))
    }

    /// Forgets the stop request for `subject` of `scope`: its session has ended.
    pub async fn clear_stop(&self, scope: &str, subject: &str) -> Result<(), TaskError> {
        stop::clear(&self.backend, scope, subject)
            .await
            .map_err(|e| TaskError::transient("BackendError", e.to_string()))
    }
}

/// The message that continues a job of `task`: as a producer's `send_task(task, kwargs)`.
fn continuation(task: &str, kwargs: Map<String, Value>) -> TaskMessage {
    TaskMessage::new(task, kwargs)
}

trait ErasedTask: Send + Sync {
    fn policy(&self) -> TaskPolicy;

    fn call(
        &self,
        ctx: TaskContext,
        args: Vec<Value>,
        kwargs: Map<String, Value>,
    ) -> BoxFuture<Result<Value, TaskError>>;
}

struct Erased<T: Task>(Arc<T>);

impl<T: Task> ErasedTask for Erased<T> {
    fn policy(&self) -> TaskPolicy {
        let secs = |s: Option<f64>| s.filter(|s| *s > 0.0).map(Duration::from_secs_f64);
        TaskPolicy {
            max_retries: T::MAX_RETRIES,
            time_limit: secs(T::TIME_LIMIT),
            soft_time_limit: secs(T::SOFT_TIME_LIMIT),
            rate_limit: T::RATE_LIMIT,
        }
    }

    fn call(
        &self,
        ctx: TaskContext,
        args: Vec<Value>,
        kwargs: Map<String, Value>,
    ) -> BoxFuture<Result<Value, TaskError>> {
        let task = self.0.clone();
        Box::pin(async move {
            let from_parent = ctx.parent_id.is_some();
            let kwargs =
                merge_positional(T::NAME, &positional_names::<T>(), from_parent, args, kwargs)?;
            let typed = deserialize_kwargs(T::NAME, kwargs)?;
            let output = task.run(ctx, typed).await?;
            serde_json::to_value(output).map_err(|e| {
                TaskError::permanent(
                    "InternalError",
                    format!("{} result is not JSON: {e}", T::NAME),
                )
            })
        })
    }
}

/// A message's `args` and `kwargs` as the task's argument struct, exactly as the runtime
/// makes them before `run`: positional arguments merged under their names, then deserialised
/// with errors naming the bad field.
pub fn typed_args<T: Task>(
    args: Vec<Value>,
    kwargs: Map<String, Value>,
) -> Result<T::Args, TaskError> {
    let kwargs = merge_positional(T::NAME, &positional_names::<T>(), false, args, kwargs)?;
    deserialize_kwargs(T::NAME, kwargs)
}

/// The names positional args take: `POSITIONAL`, else the `PARENT_RESULT` kwarg alone.
fn positional_names<T: Task>() -> Vec<&'static str> {
    if T::POSITIONAL.is_empty() {
        T::PARENT_RESULT.into_iter().collect()
    } else {
        T::POSITIONAL.to_vec()
    }
}

fn merge_positional(
    task: &str,
    names: &[&str],
    from_parent: bool,
    args: Vec<Value>,
    mut kwargs: Map<String, Value>,
) -> Result<Map<String, Value>, TaskError> {
    if args.is_empty() {
        return Ok(kwargs);
    }
    // A job sent by another job (`parent_id` set) may be a chain step or callback that got
    // the parent's return value: say so, naming the signature, instead of a bare arity error.
    if names.is_empty() && from_parent {
        return Err(TaskError::invalid(
            "InvalidArguments",
            format!(
                "signature {task}({}, {}) cannot take its parent's result: a chain step or \
                 link callback receives the previous task's return value as its first \
                 positional argument, and {task} declares no kwarg for it (it takes keyword \
                 arguments only). Make the signature immutable (.si(), immutable=True)",
                crate::protocol::preview(&Value::Array(args)),
                crate::protocol::preview(&Value::Object(kwargs)),
            ),
        ));
    }
    if names.is_empty() {
        return Err(TaskError::invalid(
            "InvalidArguments",
            format!(
                "{task} takes keyword arguments only; got {} positional argument(s). \
                 Send them as kwargs, e.g. send_task(\"{task}\", kwargs={{...}})",
                args.len()
            ),
        ));
    }
    if args.len() > names.len() {
        return Err(TaskError::invalid(
            "InvalidArguments",
            format!(
                "{task} takes at most {} positional argument(s) ({}); got {}",
                names.len(),
                names.join(", "),
                args.len()
            ),
        ));
    }
    for (name, value) in names.iter().zip(args) {
        if kwargs.insert((*name).to_owned(), value).is_some() {
            return Err(TaskError::invalid(
                "InvalidArguments",
                format!("{task} got `{name}` both as a positional and as a keyword argument"),
            ));
        }
    }
    Ok(kwargs)
}

fn deserialize_kwargs<A: DeserializeOwned>(
    task: &str,
    kwargs: Map<String, Value>,
) -> Result<A, TaskError> {
    serde_path_to_error::deserialize(Value::Object(kwargs)).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let msg = if path == "." {
            format!("{task} kwargs are not valid: {inner}")
        } else {
            format!("{task} kwarg `{path}` is not valid: {inner}")
        };
        TaskError::invalid("InvalidArguments", msg)
    })
}

/// The tasks a worker runs, by Celery task name, and the background work they own (see
/// [`crate::runtime::background`]).
#[derive(Default, Clone)]
pub struct Registry {
    tasks: BTreeMap<String, Arc<dyn ErasedTask>>,
    background: Vec<(&'static str, crate::runtime::background::StartBackground)>,
}

impl Registry {
    pub fn new() -> Registry {
        Registry::default()
    }

    pub fn register<T: Task>(mut self, task: T) -> Registry {
        debug_assert!(
            T::POSITIONAL.is_empty()
                || T::PARENT_RESULT.is_none()
                || T::POSITIONAL.first() == T::PARENT_RESULT.as_ref(),
            "{}: PARENT_RESULT must be the first of POSITIONAL",
            T::NAME
        );
        self.tasks
            .insert(T::NAME.to_owned(), Arc::new(Erased(Arc::new(task))));
        self
    }

    pub fn names(&self) -> Vec<&str> {
        self.tasks.keys().map(String::as_str).collect()
    }

    /// Adds background work, started once per worker start with its
    /// [`Background`](crate::runtime::background::Background) context and awaited on stop.
    /// `name` also names its `/readyz` check.
    pub fn background(
        mut self,
        name: &'static str,
        start: impl Fn(
                crate::runtime::background::Background,
            ) -> futures_util::future::BoxFuture<'static, ()>
            + Send
            + Sync
            + 'static,
    ) -> Registry {
        self.background.push((name, Arc::new(start)));
        self
    }

    /// The background work registered, by name.
    pub(crate) fn background_work(
        &self,
    ) -> &[(&'static str, crate::runtime::background::StartBackground)] {
        &self.background
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tasks.contains_key(name)
    }

    /// A registered task's limits and retry policy.
    pub fn policy(&self, name: &str) -> Option<TaskPolicy> {
        self.tasks.get(name).map(|t| t.policy())
    }

    /// Starts a job: `None` when no task of that name is registered.
    pub(crate) fn call(
        &self,
        name: &str,
        ctx: TaskContext,
        args: Vec<Value>,
        kwargs: Map<String, Value>,
    ) -> Option<BoxFuture<Result<Value, TaskError>>> {
        self.tasks.get(name).map(|t| t.call(ctx, args, kwargs))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;
    use serde_json::json;

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Args {
        width: u32,
        outputs: Vec<Out>,
    }
    #[derive(Deserialize)]
    #[allow(dead_code)]
    struct Out {
        key: String,
    }

    fn kw(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap()
    }

    #[test]
    fn kwarg_errors_name_the_field() {
        let err = deserialize_kwargs::<Args>("t", kw(json!({"width": "big", "outputs": []})))
            .err()
            .unwrap();
        assert!(err.message.contains("kwarg `width`"), "{}", err.message);
        let err = deserialize_kwargs::<Args>("t", kw(json!({"width": 1, "outputs": [{"k": 1}]})))
            .err()
            .unwrap();
        assert!(err.message.contains("outputs[0]"), "{}", err.message);
        let err = deserialize_kwargs::<Args>("t", kw(json!({"width": 1, "outputs": [], "x": 1})))
            .err()
            .unwrap();
        assert!(err.message.contains("unknown field `x`"), "{}", err.message);
        assert_eq!(err.kind, crate::backend::result::FailureKind::Invalid);
    }

    #[test]
    fn a_continuation_is_a_plain_new_job_of_the_same_task() {
        let kwargs = kw(json!({"stream_id": "s", "session": "first"}));
        let a = continuation("snapshot.watch", kwargs.clone());
        let b = continuation("snapshot.watch", kwargs.clone());
        assert_eq!(a.task, "snapshot.watch");
        assert_eq!(a.kwargs, kwargs);
        assert!(a.args.is_empty());
        assert_ne!(a.id, b.id, "every continuation has a new id");
        assert_eq!(a.root_id.as_deref(), Some(a.id.as_str()));
        assert_eq!(a.parent_id, None);
        assert_eq!((a.eta, a.expires, a.priority), (None, None, None));
        assert_eq!(a.timelimit, crate::protocol::TimeLimits::default());
    }

    #[test]
    fn positional_args_are_refused_unless_named() {
        let err = merge_positional("image.transform", &[], false, vec![json!(1)], Map::new())
            .unwrap_err();
        assert!(
            err.message.contains("keyword arguments only"),
            "{}",
            err.message
        );
        let merged =
            merge_positional("t", &["a", "b"], false, vec![json!(1)], kw(json!({"b": 2}))).unwrap();
        assert_eq!(Value::Object(merged), json!({"a": 1, "b": 2}));
        let err =
            merge_positional("t", &["a"], false, vec![json!(1), json!(2)], Map::new()).unwrap_err();
        assert!(err.message.contains("at most 1"), "{}", err.message);
        let err =
            merge_positional("t", &["a"], false, vec![json!(1)], kw(json!({"a": 2}))).unwrap_err();
        assert!(
            err.message.contains("both as a positional"),
            "{}",
            err.message
        );
    }

    #[test]
    fn a_task_without_a_parent_result_kwarg_names_the_signature() {
        let err = merge_positional(
            "notify.sms",
            &[],
            true,
            vec![json!({"url": "x"})],
            kw(json!({"to": "+1"})),
        )
        .unwrap_err();
        assert!(
            err.message
                .contains(r#"signature notify.sms([{"url":"x"}], {"to":"+1"})"#)
                && err.message.contains("cannot take its parent's result")
                && err.message.contains(".si()"),
            "{}",
            err.message
        );

        struct Webhookish;
        impl Task for Webhookish {
            const NAME: &'static str = "t.hook";
            const PARENT_RESULT: Option<&'static str> = Some("payload");
            type Args = Map<String, Value>;
            type Output = ();
            async fn run(&self, _: TaskContext, _: Self::Args) -> Result<(), TaskError> {
                Ok(())
            }
        }
        let typed = typed_args::<Webhookish>(vec![json!([1, 2])], kw(json!({"url": "u"}))).unwrap();
        assert_eq!(Value::Object(typed), json!({"payload": [1, 2], "url": "u"}));
    }
}

//! Typed tasks: the `Task` trait a worker implements, the registry that maps Celery task names
//! to tasks, and the context a running job sees. Keyword arguments are deserialised with serde
//! into the task's argument struct; a mismatch names the field that is wrong.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{Map, Value};

use crate::backend::ResultBackend;
use crate::cpu::CpuPool;
use crate::result::{ResultMeta, TaskError, TaskState};

/// A job type a worker runs. `NAME` is the Celery task name (`image.transform`).
pub trait Task: Send + Sync + 'static {
    const NAME: &'static str;
    /// Names given to positional `args`, in order. Empty: keyword arguments only.
    const POSITIONAL: &'static [&'static str] = &[];
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

/// What the runtime knows about a running job, and the services it may use.
#[derive(Clone)]
pub struct TaskContext {
    pub id: String,
    pub task: String,
    pub retries: u32,
    pub hostname: Arc<str>,
    backend: ResultBackend,
    cpu: CpuPool,
}

impl TaskContext {
    pub(crate) fn new(
        id: String,
        task: String,
        retries: u32,
        hostname: Arc<str>,
        backend: ResultBackend,
        cpu: CpuPool,
    ) -> TaskContext {
        TaskContext {
            id,
            task,
            retries,
            hostname,
            backend,
            cpu,
        }
    }

    /// Runs CPU-heavy work on the bounded pool.
    pub async fn cpu<F, R>(&self, f: F) -> Result<R, TaskError>
    where
        F: FnOnce() -> R + Send + 'static,
        R: Send + 'static,
    {
        self.cpu.run(f).await
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
}

trait ErasedTask: Send + Sync {
    fn call(
        &self,
        ctx: TaskContext,
        args: Vec<Value>,
        kwargs: Map<String, Value>,
    ) -> BoxFuture<Result<Value, TaskError>>;
}

struct Erased<T: Task>(Arc<T>);

impl<T: Task> ErasedTask for Erased<T> {
    fn call(
        &self,
        ctx: TaskContext,
        args: Vec<Value>,
        kwargs: Map<String, Value>,
    ) -> BoxFuture<Result<Value, TaskError>> {
        let task = self.0.clone();
        Box::pin(async move {
            let kwargs = merge_positional(T::NAME, T::POSITIONAL, args, kwargs)?;
            let typed: T::Args = deserialize_kwargs(T::NAME, kwargs)?;
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

fn merge_positional(
    task: &str,
    names: &[&str],
    args: Vec<Value>,
    mut kwargs: Map<String, Value>,
) -> Result<Map<String, Value>, TaskError> {
    if args.is_empty() {
        return Ok(kwargs);
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

/// The tasks a worker runs, by Celery task name.
#[derive(Default, Clone)]
pub struct Registry {
    tasks: BTreeMap<String, Arc<dyn ErasedTask>>,
}

impl Registry {
    pub fn new() -> Registry {
        Registry::default()
    }

    pub fn register<T: Task>(mut self, task: T) -> Registry {
        self.tasks
            .insert(T::NAME.to_owned(), Arc::new(Erased(Arc::new(task))));
        self
    }

    pub fn names(&self) -> Vec<&str> {
        self.tasks.keys().map(String::as_str).collect()
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tasks.contains_key(name)
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
        assert_eq!(err.kind, crate::result::FailureKind::Invalid);
    }

    #[test]
    fn positional_args_are_refused_unless_named() {
        let err = merge_positional("image.transform", &[], vec![json!(1)], Map::new()).unwrap_err();
        assert!(
            err.message.contains("keyword arguments only"),
            "{}",
            err.message
        );
        let merged =
            merge_positional("t", &["a", "b"], vec![json!(1)], kw(json!({"b": 2}))).unwrap();
        assert_eq!(Value::Object(merged), json!({"a": 1, "b": 2}));
        let err = merge_positional("t", &["a"], vec![json!(1), json!(2)], Map::new()).unwrap_err();
        assert!(err.message.contains("at most 1"), "{}", err.message);
        let err = merge_positional("t", &["a"], vec![json!(1)], kw(json!({"a": 2}))).unwrap_err();
        assert!(
            err.message.contains("both as a positional"),
            "{}",
            err.message
        );
    }
}

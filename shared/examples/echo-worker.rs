//! `echo-worker`: the smallest mediafarm worker. Queue `echo`, task `echo.echo`, which returns
//! its keyword arguments. Used by the tests and the benchmarks, so it can also misbehave on
//! request: `sleep_ms` waits first, `fail` fails permanently with that message, `fail_times: n`
//! fails transiently while the job's `retries` is below n (`retry_after_s` asks for that
//! delay), and `spin_ms` burns CPU on the blocking pool, stopping early when told to.
//! Task `echo.step` is the no-op for workflows (bench/canvas_throughput.py): it takes a
//! parent's result as kwarg `parent` and returns its kwargs. `echo.echo` takes none, so the
//! tests can check that a step without `PARENT_RESULT` fails clearly.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use mediafarm::{Registry, Task, TaskContext, TaskError};
use serde_json::{Map, Value};

struct Echo;

fn whole_number(kwargs: &Map<String, Value>, name: &str) -> Result<Option<u64>, TaskError> {
    match kwargs.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v.as_u64().map(Some).ok_or_else(|| {
            TaskError::invalid(
                "InvalidArguments",
                format!("echo.echo kwarg `{name}` must be a whole number; got {v}"),
            )
        }),
    }
}

impl Task for Echo {
    const NAME: &'static str = "echo.echo";
    type Args = Map<String, Value>;
    type Output = Map<String, Value>;

    async fn run(&self, ctx: TaskContext, kwargs: Self::Args) -> Result<Self::Output, TaskError> {
        if let Some(ms) = whole_number(&kwargs, "sleep_ms")? {
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        if let Some(ms) = whole_number(&kwargs, "spin_ms")? {
            let stop = ctx.cancel_flag();
            let finished = ctx
                .cpu(move || {
                    let Some(end) = Instant::now().checked_add(Duration::from_millis(ms)) else {
                        return false;
                    };
                    while Instant::now() < end {
                        if stop.is_set() {
                            return false;
                        }
                        std::hint::spin_loop();
                    }
                    true
                })
                .await?;
            if !finished {
                return Err(TaskError::permanent(
                    "SoftTimeLimitExceeded",
                    "echo.echo stopped spinning at its soft time limit",
                ));
            }
        }
        if let Some(times) = whole_number(&kwargs, "fail_times")? {
            if u64::from(ctx.retries) < times {
                let mut e = TaskError::transient(
                    "EchoTransient",
                    format!(
                        "attempt {} of {} fails on request",
                        ctx.retries + 1,
                        times + 1
                    ),
                );
                if let Some(s) = kwargs.get("retry_after_s").and_then(Value::as_f64) {
                    if let Ok(d) = Duration::try_from_secs_f64(s.max(0.0)) {
                        e = e.retry_after(d);
                    }
                }
                return Err(e);
            }
        }
        if let Some(msg) = kwargs.get("fail").and_then(Value::as_str) {
            return Err(TaskError::permanent("EchoFailure", msg.to_owned()));
        }
        Ok(kwargs)
    }
}

struct Step;

impl Task for Step {
    const NAME: &'static str = "echo.step";
    const PARENT_RESULT: Option<&'static str> = Some("parent");
    type Args = Map<String, Value>;
    type Output = Map<String, Value>;

    async fn run(&self, _: TaskContext, kwargs: Self::Args) -> Result<Self::Output, TaskError> {
        Ok(kwargs)
    }
}

#[global_allocator]
static ALLOCATOR: mediafarm::FastAllocator = mediafarm::FastAllocator;

fn main() -> ExitCode {
    let spec = mediafarm::runtime::cli::WorkerSpec {
        binary: "echo-worker",
        default_queues: &["echo"],
        default_concurrency: None,
    };
    mediafarm::runtime::cli::run_worker_main(spec, |_settings, _: &(), _queues| {
        Ok(Registry::new().register(Echo).register(Step))
    })
}

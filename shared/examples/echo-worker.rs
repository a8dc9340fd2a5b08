//! `echo-worker`: the smallest mediafarm worker. Queue `echo`, task `echo.echo`, which returns
//! its keyword arguments (after `sleep_ms`, if given). Used by the tests and the benchmark.

use std::process::ExitCode;
use std::time::Duration;

use mediafarm::{Registry, Task, TaskContext, TaskError};
use serde_json::{Map, Value};

struct Echo;

impl Task for Echo {
    const NAME: &'static str = "echo.echo";
    type Args = Map<String, Value>;
    type Output = Map<String, Value>;

    async fn run(&self, _ctx: TaskContext, kwargs: Self::Args) -> Result<Self::Output, TaskError> {
        match kwargs.get("sleep_ms") {
            None => {}
            Some(v) => match v.as_u64() {
                Some(ms) => tokio::time::sleep(Duration::from_millis(ms)).await,
                None => {
                    return Err(TaskError::invalid(
                        "InvalidArguments",
                        format!("echo.echo kwarg `sleep_ms` must be a whole number of milliseconds; got {v}"),
                    ))
                }
            },
        }
        if let Some(msg) = kwargs.get("fail").and_then(Value::as_str) {
            return Err(TaskError::permanent("EchoFailure", msg.to_owned()));
        }
        Ok(kwargs)
    }
}

fn main() -> ExitCode {
    mediafarm::worker_cli::run_worker_main("echo-worker", &["echo"], |_settings| {
        Ok(Registry::new().register(Echo))
    })
}

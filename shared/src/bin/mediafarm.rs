//! The `mediafarm` command: submit jobs, read results, revoke jobs, purge queues, and list or
//! replay dead letters.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use mediafarm::client::{Client, ClientError, SendOptions};
use mediafarm::Settings;
use serde_json::Value;

#[derive(Parser)]
#[command(
    name = "mediafarm",
    version,
    about = "Submit jobs to a mediafarm (or Celery) farm and read their results"
)]
struct Cli {
    /// Settings file (TOML); MEDIAFARM_<NAME> environment variables override it.
    #[arg(long, global = true, default_value = "mediafarm.toml")]
    config: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Publish a job; prints its id (or its result with --wait).
    Submit {
        /// Task name, e.g. image.transform.
        task: String,
        /// Keyword arguments as a JSON object.
        #[arg(long, default_value = "{}")]
        json: String,
        /// Queue (default: the task name's prefix, image.transform → image).
        #[arg(long)]
        queue: Option<String>,
        /// Run no earlier than this many seconds from now.
        #[arg(long)]
        countdown: Option<f64>,
        /// Do not run after this many seconds from now.
        #[arg(long)]
        expires: Option<f64>,
        /// Wait for the result and print it.
        #[arg(long)]
        wait: bool,
        /// Seconds to wait with --wait.
        #[arg(long, default_value_t = 60.0)]
        timeout: f64,
    },
    /// Print a job's stored result record (Celery's layout).
    Result {
        id: String,
        /// Wait until the job has ended.
        #[arg(long)]
        wait: bool,
        #[arg(long, default_value_t = 60.0)]
        timeout: f64,
    },
    /// Remove every waiting message from a queue.
    Purge { queue: String },
    /// Revoke jobs: workers skip them (stored as REVOKED); with --terminate running ones stop.
    Revoke {
        #[arg(required = true)]
        ids: Vec<String>,
        /// Also stop the job if it is running.
        #[arg(long)]
        terminate: bool,
    },
    /// Dead letters: messages that can never succeed, kept in <queue>.dead with the reason.
    Dead {
        #[command(subcommand)]
        command: DeadCommand,
    },
}

#[derive(Subcommand)]
enum DeadCommand {
    /// Show a queue's dead letters, oldest first, without removing them.
    List {
        queue: String,
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Send dead letters back to their queue (all, or one job's with --id).
    Replay {
        queue: String,
        #[arg(long)]
        id: Option<String>,
    },
}

#[global_allocator]
static ALLOCATOR: mediafarm::FastAllocator = mediafarm::FastAllocator;

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = mediafarm::logging::init("warning") {
        eprintln!("mediafarm: {e}");
        return ExitCode::from(2);
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("mediafarm: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("mediafarm: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn timeout(secs: f64) -> anyhow::Result<Duration> {
    if !(secs.is_finite() && secs > 0.0) {
        bail!("--timeout must be a positive number of seconds");
    }
    Ok(Duration::from_secs_f64(secs))
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let config_given = cli.config != std::path::Path::new("mediafarm.toml");
    let settings = Settings::load(&cli.config, config_given)?;
    match cli.command {
        Command::Submit {
            task,
            json,
            queue,
            countdown,
            expires,
            wait,
            timeout: t,
        } => {
            let kwargs = match serde_json::from_str::<Value>(&json)
                .with_context(|| format!("--json is not valid JSON: {json}"))?
            {
                Value::Object(m) => m,
                other => bail!("--json must be a JSON object of keyword arguments; got {other}"),
            };
            let t = timeout(t)?;
            let client = Client::connect(&settings).await?;
            let opts = SendOptions {
                queue,
                countdown,
                expires,
                ..Default::default()
            };
            let result = client.send_task(&task, kwargs, &opts).await?;
            if !wait {
                println!("{}", result.id);
                return Ok(ExitCode::SUCCESS);
            }
            eprintln!("{}", result.id);
            report(result.get(t).await)
        }
        Command::Result {
            id,
            wait,
            timeout: t,
        } => {
            let client = Client::connect(&settings).await?;
            let meta = if wait {
                Some(client.backend().wait(&id, timeout(t)?).await?)
            } else {
                client.backend().get(&id).await?
            };
            match meta {
                Some(m) => println!("{}", serde_json::to_string_pretty(&m)?),
                None => println!(
                    "{{\"status\": \"PENDING\", \"task_id\": {}}}",
                    Value::String(id)
                ),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Purge { queue } => {
            let n = mediafarm::broker::purge(&settings, &queue).await?;
            println!("purged {n} message(s) from {queue}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Revoke { ids, terminate } => {
            let backend = mediafarm::ResultBackend::connect(
                &settings.result_backend,
                settings.result_expires_secs(),
            )
            .await?;
            mediafarm::revoke::broadcast(&settings, &backend, &ids, terminate).await?;
            let how = if terminate {
                " (terminating if running)"
            } else {
                ""
            };
            println!("revoked {}{how}", ids.join(", "));
            Ok(ExitCode::SUCCESS)
        }
        Command::Dead { command } => dead(&settings, command).await,
    }
}

async fn dead(settings: &Settings, command: DeadCommand) -> anyhow::Result<ExitCode> {
    use mediafarm::deadletter;
    match command {
        DeadCommand::List { queue, limit, json } => {
            let letters = deadletter::list(settings, &queue, limit).await?;
            if json {
                for l in &letters {
                    println!("{}", serde_json::to_string(l)?);
                }
            } else if letters.is_empty() {
                println!("{queue}.dead is empty");
            } else {
                let dash = || "-".to_owned();
                for l in &letters {
                    println!(
                        "{}  {}  {}  {}  {}: {}",
                        l.at.clone().unwrap_or_else(dash),
                        l.id.clone().unwrap_or_else(dash),
                        l.task.clone().unwrap_or_else(dash),
                        l.worker.clone().unwrap_or_else(dash),
                        l.kind.clone().unwrap_or_else(dash),
                        l.reason.clone().unwrap_or_else(dash),
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        DeadCommand::Replay { queue, id } => {
            let backend = mediafarm::ResultBackend::connect(
                &settings.result_backend,
                settings.result_expires_secs(),
            )
            .await?;
            let n = deadletter::replay(settings, &backend, &queue, id.as_deref()).await?;
            println!("replayed {n} message(s) from {queue}.dead to {queue}");
            if n == 0 && id.is_some() {
                return Ok(ExitCode::from(1));
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn report(outcome: Result<Value, ClientError>) -> anyhow::Result<ExitCode> {
    match outcome {
        Ok(v) => {
            println!("{}", serde_json::to_string_pretty(&v)?);
            Ok(ExitCode::SUCCESS)
        }
        Err(ClientError::Failed { id, error }) => {
            eprintln!("job {id} failed: {}: {}", error.exc_type, error.message);
            Ok(ExitCode::from(1))
        }
        Err(e) => Err(e.into()),
    }
}

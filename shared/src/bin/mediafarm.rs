//! The `mediafarm` command: submit jobs, read results, revoke jobs, purge queues, list or
//! replay dead letters, and inspect or control running workers (mediafarm's and Celery's).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use mediafarm::amqp::pidbox::commands::{self, CommandType};
use mediafarm::beat::settings::BeatSettings;
use mediafarm::client::json_stream::JsonStream;
use mediafarm::client::{Client, ClientError, SendOptions, Workflow};
use mediafarm::settings::Group;
use mediafarm::Settings;
use serde_json::Value;

#[derive(Subcommand)]
enum StreamsCommand {
    /// Ask the session watching STREAM_ID to stop: it ends within a second with its summary,
    /// wherever it runs (the request waits in Redis for a session being handed on).
    Stop { stream_id: String },
}

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
    /// Publish a job or a workflow; prints its id (or its result with --wait).
    Submit {
        /// Task name, e.g. image.transform.
        #[arg(required_unless_present = "workflow")]
        task: Option<String>,
        /// A workflow as JSON instead of one task (a file, or - for stdin): a signature,
        /// {"chain": [sig, ...]}, {"group": [sig, ...]} or {"chord": {"header": [sig, ...],
        /// "body": sig or {"chain": [...]}}}, with sig = {"task", "args", "kwargs", "options",
        /// "immutable"}; a chain's steps may also be groups and chords. Several workflows may
        /// follow one another (one per line, or pretty-printed): each is sent as soon as the
        /// line ending it has been read, on one connection, and its id printed. Prints (with --wait) the chain's
        /// last result (a list when it ends in a group), the group's list, the chord body's.
        #[arg(long, value_name = "FILE|-", conflicts_with_all = ["task", "json", "queue", "countdown", "expires", "priority"])]
        workflow: Option<PathBuf>,
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
        /// Message priority, 0 to 255 (higher runs first; counts only on a queue declared
        /// with task_queue_max_priority, and is capped at it). Default: task_default_priority.
        #[arg(long)]
        priority: Option<u8>,
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
    /// Live-stream sessions (`snapshot.watch` on snapshot-worker).
    Streams {
        #[command(subcommand)]
        command: StreamsCommand,
    },
    /// Revoke jobs: workers skip them (stored as REVOKED); with --terminate running ones stop.
    Revoke {
        #[arg(required = true)]
        ids: Vec<String>,
        /// Also stop the job if it is running.
        #[arg(long)]
        terminate: bool,
    },
    /// Ask running workers (mediafarm and Python Celery alike) about themselves, as `celery
    /// inspect` does: ping, stats, active, reserved, scheduled, registered, active_queues,
    /// revoked, query_task ID..., conf [true: with defaults], report.
    Inspect {
        method: String,
        /// The method's arguments (query_task: job ids).
        args: Vec<String>,
        #[command(flatten)]
        remote: Remote,
    },
    /// Change running workers, as `celery control` does: add_consumer QUEUE [EXCHANGE [TYPE
    /// [ROUTING_KEY]]], cancel_consumer QUEUE, time_limit TASK SOFT [HARD], shutdown, and
    /// rate_limit TASK RATE, enable_events, disable_events, heartbeat, revoke ID...
    Control {
        method: String,
        args: Vec<String>,
        #[command(flatten)]
        remote: Remote,
    },
    /// Dead letters: messages that can never succeed, kept in <queue>.dead with the reason.
    Dead {
        #[command(subcommand)]
        command: DeadCommand,
    },
    /// Run the periodic scheduler (Celery beat): publishes each entry of `beat_schedule` and of
    /// `mediafarm schedule` once per tick. Run two or more for high availability: one leads
    /// (a Redis lease), and each tick is published once.
    Beat {
        /// Log level: debug, info, warning, error.
        #[arg(long, default_value = "info")]
        loglevel: String,
        /// Where /metrics, /healthz and /readyz are served (overrides metrics_addr).
        #[arg(long)]
        metrics_addr: Option<std::net::SocketAddr>,
    },
    /// Periodic entries kept in Redis, which running beats pick up at their next tick.
    Schedule {
        #[command(subcommand)]
        command: ScheduleCommand,
    },
    /// Check the settings (file and MEDIAFARM_* environment) without connecting anywhere: exit
    /// 0 when every value is accepted, 2 with the problem otherwise (deploy validation uses it).
    /// The CLI reads the core settings and beat's (`beat_*`).
    CheckSettings,
    /// Print the names of the settings the CLI and beat read, one a line.
    SettingNames,
}

/// Who is asked and how long replies are awaited (Celery's remote control options).
#[derive(clap::Args)]
struct Remote {
    /// Only these nodes (comma-separated node names); the wait ends when all have answered.
    #[arg(short, long, value_delimiter = ',')]
    destination: Vec<String>,
    /// Seconds to wait for replies.
    #[arg(short, long, default_value_t = 1.0)]
    timeout: f64,
    /// Print the replies as JSON, as Celery does: inspect one object by node name, control a
    /// list of one-node objects.
    #[arg(short, long)]
    json: bool,
}

#[derive(Subcommand)]
enum ScheduleCommand {
    /// Add (or replace) an entry: TASK with --json kwargs, once every --every (or at the
    /// minutes --crontab matches).
    Add {
        name: String,
        task: String,
        /// Period: seconds (20, 2.5) or with a unit ("500ms", "20s", "5m", "1h", "1d").
        #[arg(long, required_unless_present = "crontab", conflicts_with = "crontab")]
        every: Option<String>,
        /// Five cron fields in the timezone setting instead of --every, e.g. "*/5 * * * *" or "0 9 * * mon-fri".
        #[arg(long)]
        crontab: Option<String>,
        /// Keyword arguments as a JSON object.
        #[arg(long, default_value = "{}")]
        json: String,
        /// Queue (default: the task name's prefix).
        #[arg(long)]
        queue: Option<String>,
        /// Workers drop a tick's job this long after the tick was due (same forms as --every).
        #[arg(long)]
        expires: Option<String>,
    },
    /// Show every entry (settings and Redis) and its last tick.
    List {
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Remove an entry from Redis; no tick of it is claimed after this returns.
    Remove { name: String },
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
    let loglevel = match &cli.command {
        Command::Beat { loglevel, .. } => loglevel.as_str(),
        _ => "warning",
    };
    if let Err(e) = mediafarm::observe::logging::init(loglevel) {
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
    match Duration::try_from_secs_f64(secs) {
        Ok(d) if secs > 0.0 && d <= Duration::from_secs(315_360_000) => Ok(d),
        _ => bail!(
            "--timeout {secs} is not accepted: a number of seconds above 0, at most ten years"
        ),
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    if let Command::SettingNames = cli.command {
        for name in mediafarm::runtime::cli::setting_names::<BeatSettings>() {
            println!("{name}");
        }
        return Ok(ExitCode::SUCCESS);
    }
    let config_given = cli.config != std::path::Path::new("mediafarm.toml");
    let (settings, beat) = Settings::load_with::<BeatSettings>(&cli.config, config_given)?;
    match cli.command {
        Command::Submit {
            workflow: Some(path),
            wait,
            timeout: t,
            ..
        } => {
            let t = timeout(t)?;
            let mut documents = read_documents(&path)?;
            // Connected before the input is read: a script writing workflows one by one to
            // stdin has each sent as soon as it is whole, on this one connection.
            let client = Client::connect(&settings).await?;
            let mut stream = JsonStream::new();
            let (mut failed, mut ended) = (false, false);
            loop {
                let value = match stream.next_document() {
                    Ok(Some(value)) => value,
                    Ok(None) if ended => break,
                    Ok(None) => match documents.recv().await {
                        Some(Ok(bytes)) => {
                            stream.push(&bytes);
                            continue;
                        }
                        Some(Err(e)) => {
                            return Err(e).with_context(|| format!("--workflow {}", path.display()))
                        }
                        None => {
                            stream.end();
                            ended = true;
                            continue;
                        }
                    },
                    Err(e) => bail!("--workflow {}: {e}", path.display()),
                };
                let number = stream.documents();
                let workflow = Workflow::from_json(&value)
                    .with_context(|| format!("--workflow {}: workflow {number}", path.display()))?;
                let result = workflow.apply_async(&client).await?;
                if !wait {
                    println!("{}", result.id());
                    // A script reading the ids as it writes workflows must not wait for exit.
                    std::io::Write::flush(&mut std::io::stdout())?;
                    continue;
                }
                eprintln!("{}", result.id());
                failed |= report(result.get(t).await)? != ExitCode::SUCCESS;
            }
            stream
                .finish()
                .with_context(|| format!("--workflow {}", path.display()))?;
            if stream.documents() == 0 {
                bail!("--workflow {}: no workflow in it", path.display());
            }
            client.flush_events(Duration::from_secs(2)).await;
            Ok(if failed {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            })
        }
        Command::Submit {
            task,
            json,
            queue,
            countdown,
            expires,
            priority,
            wait,
            timeout: t,
            ..
        } => {
            // clap requires TASK unless --workflow is given, handled above.
            let Some(task) = task else {
                bail!("submit needs a TASK name or --workflow FILE");
            };
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
                priority,
                ..Default::default()
            };
            let result = client.send_task(&task, kwargs, &opts).await?;
            client.flush_events(Duration::from_secs(2)).await;
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
            let n = mediafarm::amqp::broker::purge(&settings, &queue).await?;
            println!("purged {n} message(s) from {queue}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Streams {
            command: StreamsCommand::Stop { stream_id },
        } => {
            let backend = mediafarm::ResultBackend::from_settings(&settings).await?;
            // A session obeys requests made after it began.
            mediafarm::runtime::stop::request(
                &backend,
                mediafarm::runtime::stop::STREAM_SESSIONS,
                &stream_id,
            )
            .await?;
            println!("asked the session of stream {stream_id} to stop");
            Ok(ExitCode::SUCCESS)
        }
        Command::Revoke { ids, terminate } => {
            let backend = mediafarm::ResultBackend::from_settings(&settings).await?;
            mediafarm::amqp::pidbox::broadcast(&settings, &backend, &ids, terminate).await?;
            let how = if terminate {
                " (terminating if running)"
            } else {
                ""
            };
            println!("revoked {}{how}", ids.join(", "));
            Ok(ExitCode::SUCCESS)
        }
        Command::Inspect {
            method,
            args,
            remote,
        } => remote_call(&settings, CommandType::Inspect, &method, &args, &remote).await,
        Command::Control {
            method,
            args,
            remote,
        } => remote_call(&settings, CommandType::Control, &method, &args, &remote).await,
        Command::Dead { command } => dead(&settings, command).await,
        Command::Beat { metrics_addr, .. } => {
            let mut settings = settings;
            if let Some(addr) = metrics_addr {
                settings.metrics_addr = addr;
            }
            let beat = mediafarm::beat::Beat::connect(&settings, &beat).await?;
            beat.run(stop_signal()).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Schedule { command } => schedule(&settings, &beat, command).await,
        Command::CheckSettings => {
            let mut lists = settings.lists();
            lists.extend(beat.lists());
            mediafarm::runtime::cli::print_accepted(&cli.config, &lists);
            Ok(ExitCode::SUCCESS)
        }
        // Answered above, before any settings are read.
        Command::SettingNames => Ok(ExitCode::SUCCESS),
    }
}

/// Resolves on SIGTERM or SIGINT.
async fn stop_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {},
                _ = int.recv() => {},
            }
        }
        _ => std::future::pending().await,
    }
}

async fn schedule(
    settings: &Settings,
    beat: &BeatSettings,
    command: ScheduleCommand,
) -> anyhow::Result<ExitCode> {
    use mediafarm::beat::store::{BeatKeys, ScheduleStore};
    use mediafarm::schedule::parse_entry;
    let in_settings = |name: &str| beat.beat_schedule.iter().any(|e| e.name == name);
    let backend = mediafarm::ResultBackend::from_settings(settings).await?;
    let store = ScheduleStore::new(backend.connection(), BeatKeys::new(&beat.beat_key_prefix));
    match command {
        ScheduleCommand::Add {
            name,
            task,
            every,
            crontab,
            json,
            queue,
            expires,
        } => {
            let kwargs: Value = serde_json::from_str(&json)
                .with_context(|| format!("--json is not valid JSON: {json}"))?;
            let mut fields = serde_json::json!({"task": task, "kwargs": kwargs});
            if let Some(e) = every {
                fields["every"] = Value::String(e);
            }
            if let Some(c) = crontab {
                fields["crontab"] = Value::String(c);
            }
            if let Some(q) = queue {
                fields["queue"] = Value::String(q);
            }
            if let Some(e) = expires {
                fields["expires"] = Value::String(e);
            }
            let entry = parse_entry(&name, &fields)?;
            if in_settings(&name) {
                bail!("entry {name} is defined in the settings file ([beat_schedule.{name}]); change it there or pick another name");
            }
            store.add(&entry).await?;
            println!(
                "added {name}: {} {} to queue {}",
                entry.task,
                entry.describe(),
                entry.queue()
            );
            Ok(ExitCode::SUCCESS)
        }
        ScheduleCommand::Remove { name } => {
            if in_settings(&name) {
                bail!("entry {name} is defined in the settings file ([beat_schedule.{name}]); remove it there");
            }
            if store.remove(&name).await? {
                println!("removed {name}");
                Ok(ExitCode::SUCCESS)
            } else {
                eprintln!("no schedule entry named {name} in Redis");
                Ok(ExitCode::from(1))
            }
        }
        ScheduleCommand::List { json } => {
            let mut listed = Vec::new();
            let mut rows = Vec::new();
            for e in &beat.beat_schedule {
                rows.push(("settings", Ok(e.clone())));
            }
            for e in store.list().await? {
                rows.push(("redis", e));
            }
            for (source, entry) in rows {
                let entry = match entry {
                    Ok(e) => e,
                    Err(err) => {
                        eprintln!("bad entry in Redis (beat skips it): {err}");
                        continue;
                    }
                };
                let last = store
                    .last_tick(&entry.name)
                    .await?
                    .map(|(tick, every, state)| {
                        let due = mediafarm::beat::due_time(tick, every)
                            .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
                        (due, state)
                    });
                if json {
                    let mut v = entry.to_json();
                    v["name"] = Value::String(entry.name.clone());
                    v["source"] = Value::String(source.into());
                    v["queue"] = Value::String(entry.queue());
                    if let Some((due, state)) = &last {
                        v["last_due"] = Value::String(due.clone());
                        v["last_state"] = Value::String(state.clone());
                    }
                    listed.push(v);
                } else {
                    let last = last
                        .map(|(due, state)| format!("last {due} ({state})"))
                        .unwrap_or_else(|| "no tick yet".into());
                    println!(
                        "{}  {}  {}  queue {}  {}  [{source}]  {last}",
                        entry.name,
                        entry.describe(),
                        entry.task,
                        entry.queue(),
                        Value::Object(entry.kwargs.clone()),
                    );
                }
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&listed)?);
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Broadcasts an inspect or control command and prints the replies as `celery inspect`
/// does; exit 69 (EX_UNAVAILABLE) when no node replied, as Celery.
async fn remote_call(
    settings: &Settings,
    kind: CommandType,
    method: &str,
    args: &[String],
    remote: &Remote,
) -> anyhow::Result<ExitCode> {
    let arguments = commands::arguments(kind, method, args).map_err(anyhow::Error::msg)?;
    let wait = timeout(remote.timeout)?;
    let destination = (!remote.destination.is_empty()).then_some(remote.destination.as_slice());
    let replies =
        mediafarm::amqp::pidbox::mailbox::call(settings, method, arguments, destination, wait)
            .await?;
    if replies.is_empty() {
        eprintln!("Error: No nodes replied within time constraint");
        return Ok(ExitCode::from(69));
    }
    let twice = mediafarm::amqp::pidbox::mailbox::named_twice(&replies);
    if !twice.is_empty() {
        // Celery's W_DUPNODE.
        eprintln!(
            "DuplicateNodenameWarning: Received multiple replies from node {}: {}.\n\
             Please make sure you give each node a unique nodename using\n\
             the worker `-n` option.",
            if twice.len() == 1 { "name" } else { "names" },
            twice.join(", ")
        );
    }
    if remote.json {
        // As Celery prints them: inspect one object by node, control a list of replies.
        let shown = match kind {
            CommandType::Inspect => Value::Object(replies.into_iter().collect()),
            CommandType::Control => Value::Array(
                replies
                    .into_iter()
                    .map(|(node, reply)| serde_json::json!({ node: reply }))
                    .collect(),
            ),
        };
        println!("{shown}");
        return Ok(ExitCode::SUCCESS);
    }
    for (node, reply) in &replies {
        let (status, text) = pretty(reply);
        println!("->  {node}: {status}");
        for line in text.lines() {
            println!("        {line}");
        }
    }
    let n = replies.len();
    println!("\n{n} {} online.", if n == 1 { "node" } else { "nodes" });
    Ok(ExitCode::SUCCESS)
}

/// Celery's `pretty` for a reply: OK or ERROR, and the text under it.
fn pretty(reply: &Value) -> (&'static str, String) {
    match reply {
        Value::Object(m) if m.contains_key("error") => ("ERROR", text_of(&m["error"])),
        Value::Object(m) if m.contains_key("ok") => ("OK", text_of(&m["ok"])),
        Value::Array(items) if items.is_empty() => ("OK", "- empty -".into()),
        Value::Array(items) => (
            "OK",
            items
                .iter()
                .map(|i| format!("* {}", text_of(i)))
                .collect::<Vec<_>>()
                .join("\n"),
        ),
        other => ("OK", text_of(other)),
    }
}

fn text_of(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Object(_) => serde_json::to_string_pretty(v).unwrap_or_default(),
        other => other.to_string(),
    }
}

async fn dead(settings: &Settings, command: DeadCommand) -> anyhow::Result<ExitCode> {
    use mediafarm::amqp::dead_letters;
    match command {
        DeadCommand::List { queue, limit, json } => {
            let letters = dead_letters::list(settings, &queue, limit).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&letters)?);
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
            let backend = mediafarm::ResultBackend::from_settings(settings).await?;
            let n = dead_letters::replay(settings, &backend, &queue, id.as_deref()).await?;
            println!("replayed {n} message(s) from {queue}.dead to {queue}");
            if n == 0 && id.is_some() {
                return Ok(ExitCode::from(1));
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// The bytes of `--workflow`'s file or stdin, chunk by chunk as reads return them, from a
/// thread of their own (stdin blocks; the connection's tasks must keep running meanwhile).
fn read_documents(
    path: &std::path::Path,
) -> anyhow::Result<tokio::sync::mpsc::Receiver<std::io::Result<Vec<u8>>>> {
    let mut input: Box<dyn std::io::Read + Send> = if path == std::path::Path::new("-") {
        Box::new(std::io::stdin())
    } else {
        Box::new(
            std::fs::File::open(path).with_context(|| format!("--workflow {}", path.display()))?,
        )
    };
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    std::thread::Builder::new()
        .name("workflow-input".into())
        .spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let read = match input.read(&mut buf) {
                    Ok(0) => return,
                    Ok(n) => Ok(buf[..n].to_vec()),
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => Err(e),
                };
                let stop = read.is_err();
                if tx.blocking_send(read).is_err() || stop {
                    return;
                }
            }
        })
        .context("cannot start the thread reading --workflow")?;
    Ok(rx)
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

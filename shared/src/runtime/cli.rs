//! The command line every worker binary shares, started like Celery's worker:
//! `<kind>-worker --config mediafarm.toml --loglevel info --concurrency N --queues q1,q2`,
//! plus `--check-settings` and `--setting-names`, which check or list what the binary reads
//! (the core settings and its own groups) and exit. [`WorkerSpec`] is what a worker binary says
//! about itself.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Parser;

use crate::runtime::task::Registry;
use crate::runtime::worker::Worker;
use crate::settings::{Declared, Groups, Settings, Sources};
#[derive(Debug, Parser)]
pub struct WorkerArgs {
    /// Settings file (TOML); MEDIAFARM_<NAME> environment variables override it.
    #[arg(long, default_value = "mediafarm.toml")]
    pub config: PathBuf,
    /// debug, info, warning, error or critical.
    #[arg(short = 'l', long, default_value = "info")]
    pub loglevel: String,
    /// Jobs run at once (overrides worker_concurrency).
    #[arg(short = 'c', long)]
    pub concurrency: Option<usize>,
    /// Comma-separated queues to consume.
    #[arg(short = 'Q', long, value_delimiter = ',')]
    pub queues: Vec<String>,
    /// Node name reported in results and metrics (default: mediafarm.<pid>@<host>, unique per
    /// process; `%h`, `%n`, `%d` expand as in Celery).
    #[arg(short = 'n', long)]
    pub hostname: Option<String>,
    /// Where /metrics, /healthz and /readyz are served (overrides metrics_addr).
    #[arg(long)]
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Send Celery's task and worker events, for Flower (as `celery worker -E`; sets
    /// worker_send_task_events).
    #[arg(short = 'E', long = "task-events", visible_alias = "events")]
    pub task_events: bool,
    /// Seconds between worker-heartbeat events (overrides worker_heartbeat_interval).
    #[arg(long, value_parser = positive_seconds)]
    pub heartbeat_interval: Option<f64>,
    /// Check the settings (file and MEDIAFARM_* environment) this worker reads and exit: 0 when
    /// every value is accepted, 2 naming the setting otherwise.
    #[arg(long)]
    pub check_settings: bool,
    /// Print the names of the settings this worker reads, one a line, and exit.
    #[arg(long)]
    pub setting_names: bool,
}

/// What a worker binary is: its name, the queues it consumes by default and its default
/// concurrency. `G` is the settings group(s) it reads beside the core ones.
pub struct WorkerSpec<G> {
    /// The binary's name, in messages and thread names.
    pub binary: &'static str,
    /// Queues consumed when `-Q` is not given.
    pub default_queues: &'static [&'static str],
    /// Jobs at once when neither `-c`, the file nor the environment sets `worker_concurrency`;
    /// `None`: `worker_concurrency`'s own default (the number of cores).
    pub default_concurrency: Option<fn(&Settings, &G) -> usize>,
}

/// Every name `G`'s program reads: the core settings' and its groups'.
pub fn setting_names<G: Groups>() -> Vec<&'static str> {
    std::iter::once(Declared::of::<Settings>())
        .chain(G::declared())
        .flat_map(|d| d.names.iter().copied())
        .collect()
}

/// What `check-settings` prints for accepted settings: the file, then each list as parsed (so a
/// list given in the environment can be checked item by item).
pub fn print_accepted(config: &Path, lists: &[(&'static str, &[String])]) {
    println!("settings accepted: {}", config.display());
    for (name, items) in lists {
        println!(
            "{name} = {}",
            serde_json::to_string(items).unwrap_or_default()
        );
    }
}

/// Runs a worker binary: parse arguments, load the core settings and the worker's group(s),
/// build the tasks (from the settings and the queues consumed), run until stopped. Start-up
/// errors are printed plainly and end the process with status 2.
pub fn run_worker_main<G: Groups>(
    spec: WorkerSpec<G>,
    build: impl FnOnce(&Settings, &G, &[String]) -> Result<Registry, String>,
) -> ExitCode {
    let binary = spec.binary;
    let args = WorkerArgs::parse();
    if args.setting_names {
        for name in setting_names::<G>() {
            println!("{name}");
        }
        return ExitCode::SUCCESS;
    }
    if let Err(e) = crate::observe::logging::init(&args.loglevel) {
        eprintln!("{binary}: {e}");
        return ExitCode::from(2);
    }
    let config_given = args.config != Path::new("mediafarm.toml");
    let loaded = Sources::load(&args.config, config_given)
        .and_then(|sources| Ok((sources.read::<G>()?, sources)));
    let ((mut settings, group), sources) = match loaded {
        Ok(l) => l,
        Err(e) => {
            eprintln!("{binary}: {e}");
            return ExitCode::from(2);
        }
    };
    if args.check_settings {
        let mut lists = settings.lists();
        lists.extend(group.lists());
        print_accepted(&args.config, &lists);
        return ExitCode::SUCCESS;
    }
    match concurrency(&spec, args.concurrency, &sources, &settings, &group) {
        Ok(c) => settings.worker_concurrency = c,
        Err(e) => {
            eprintln!("{binary}: {e}");
            return ExitCode::from(2);
        }
    }
    if let Some(addr) = args.metrics_addr {
        settings.metrics_addr = addr;
    }
    if args.task_events {
        settings.worker_send_task_events = true;
    }
    if let Some(secs) = args.heartbeat_interval {
        settings.worker_heartbeat_interval = std::time::Duration::from_secs_f64(secs);
    }
    let queues: Vec<String> = if args.queues.is_empty() {
        spec.default_queues
            .iter()
            .map(|q| (*q).to_owned())
            .collect()
    } else {
        args.queues
            .iter()
            .map(|q| q.trim().to_owned())
            .filter(|q| !q.is_empty())
            .collect()
    };
    let registry = match build(&settings, &group, &queues) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("{binary}: {e}");
            return ExitCode::from(2);
        }
    };
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if settings.worker_async_threads > 0 {
        builder.worker_threads(settings.worker_async_threads);
    }
    let runtime = match builder.enable_all().thread_name(binary).build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{binary}: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let mut worker = Worker::new(settings, registry, queues);
    if let Some(h) = args.hostname {
        worker = worker.hostname(h);
    }
    match runtime.block_on(worker.run_until_signal()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{binary}: {e}");
            ExitCode::from(2)
        }
    }
}

/// A heartbeat interval: seconds, more than 0 and at most a day.
fn positive_seconds(text: &str) -> Result<f64, String> {
    match text.trim().parse::<f64>() {
        Ok(s) if s > 0.0 && s <= 86_400.0 => Ok(s),
        _ => Err(format!(
            "{text:?} is not accepted: seconds, more than 0 and at most 86400"
        )),
    }
}

/// Jobs at once: `-c`, else `worker_concurrency` when the file or the environment sets it, else
/// the worker's own default, else `worker_concurrency`'s.
fn concurrency<G>(
    spec: &WorkerSpec<G>,
    given: Option<usize>,
    sources: &Sources,
    settings: &Settings,
    group: &G,
) -> Result<usize, String> {
    match (given, spec.default_concurrency) {
        (Some(0), _) => Err("--concurrency 0 is not accepted: a whole number from 1 up".into()),
        (Some(c), _) => Ok(c),
        (None, Some(default)) if !sources.is_set("worker_concurrency") => {
            Ok(default(settings, group))
        }
        (None, _) => Ok(settings.worker_concurrency),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_flags_are_celerys() {
        let args = WorkerArgs::try_parse_from(["w", "-E", "--heartbeat-interval", "0.5"]).unwrap();
        assert!(args.task_events);
        assert_eq!(args.heartbeat_interval, Some(0.5));
        assert!(
            WorkerArgs::try_parse_from(["w", "--events"])
                .unwrap()
                .task_events
        );
        assert!(!WorkerArgs::try_parse_from(["w"]).unwrap().task_events);
        assert!(WorkerArgs::try_parse_from(["w", "--heartbeat-interval", "0"]).is_err());
    }

    #[test]
    fn concurrency_comes_from_the_flag_then_the_settings_then_the_worker() {
        let spec = WorkerSpec::<usize> {
            binary: "test-worker",
            default_queues: &["test"],
            default_concurrency: Some(|_, sessions| sessions + 1),
        };
        let sources = |env: &[(&str, &str)]| {
            let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string()));
            Sources::new(toml::Table::new(), "test", env.collect::<Vec<_>>())
        };
        let settings = |s: &Sources| s.read::<()>().unwrap().0;
        let unset = sources(&[]);
        let set = sources(&[("MEDIAFARM_WORKER_CONCURRENCY", "3")]);
        assert_eq!(
            concurrency(&spec, Some(5), &set, &settings(&set), &40),
            Ok(5)
        );
        assert_eq!(concurrency(&spec, None, &set, &settings(&set), &40), Ok(3));
        assert_eq!(
            concurrency(&spec, None, &unset, &settings(&unset), &40),
            Ok(41)
        );
        assert!(concurrency(&spec, Some(0), &unset, &settings(&unset), &40).is_err());
        let plain = WorkerSpec::<usize> {
            default_concurrency: None,
            ..spec
        };
        let s = settings(&unset);
        assert_eq!(
            concurrency(&plain, None, &unset, &s, &40),
            Ok(s.worker_concurrency)
        );
    }
}

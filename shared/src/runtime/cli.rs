//! The command line every worker binary shares, started like Celery's worker:
//! `<kind>-worker --config mediafarm.toml --loglevel info --concurrency N --queues q1,q2`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

use crate::runtime::task::Registry;
use crate::runtime::worker::Worker;
use crate::settings::Settings;

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
}

/// Runs a worker binary: parse arguments, load settings, build the tasks, run until stopped.
/// Start-up errors are printed plainly and end the process with status 2.
pub fn run_worker_main(
    binary: &str,
    default_queues: &[&str],
    build: impl FnOnce(&Settings) -> Result<Registry, String>,
) -> ExitCode {
    let args = WorkerArgs::parse();
    if let Err(e) = crate::observe::logging::init(&args.loglevel) {
        eprintln!("{binary}: {e}");
        return ExitCode::from(2);
    }
    let config_given = args.config != std::path::Path::new("mediafarm.toml");
    let mut settings = match Settings::load(&args.config, config_given) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("{binary}: {e}");
            return ExitCode::from(2);
        }
    };
    if let Some(c) = args.concurrency {
        if c == 0 {
            eprintln!("{binary}: --concurrency 0 is not accepted: a whole number from 1 up");
            return ExitCode::from(2);
        }
        settings.worker_concurrency = c;
    }
    if let Some(addr) = args.metrics_addr {
        settings.metrics_addr = addr;
    }
    let queues: Vec<String> = if args.queues.is_empty() {
        default_queues.iter().map(|q| (*q).to_owned()).collect()
    } else {
        args.queues
            .iter()
            .map(|q| q.trim().to_owned())
            .filter(|q| !q.is_empty())
            .collect()
    };
    let registry = match build(&settings) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("{binary}: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name(binary)
        .build()
    {
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

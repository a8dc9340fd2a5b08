//! `snapshot-worker`: consumes queue `snapshot` and runs `snapshot.capture` and `snapshot.watch`.
//! Sessions are long-running jobs that each hold a job slot, so unless the concurrency is set
//! (`-c`, `worker_concurrency` in the file or the environment) it defaults to
//! `snapshot_max_sessions` plus one slot per core for captures.

use std::path::Path;
use std::process::ExitCode;

use clap::Parser;
use mediafarm::runtime::cli::WorkerArgs;
use mediafarm::Registry;
use snapshot_worker::{Capture, Watch};

#[global_allocator]
static ALLOCATOR: mediafarm::FastAllocator = mediafarm::FastAllocator;

const CONCURRENCY_VAR: &str = "MEDIAFARM_WORKER_CONCURRENCY";

fn main() -> ExitCode {
    if let Ok(args) = WorkerArgs::try_parse() {
        default_concurrency(&args);
    }
    mediafarm::runtime::cli::run_worker_main("snapshot-worker", &["snapshot"], move |settings| {
        let storage =
            mediafarm::storage::Storage::from_settings(settings).map_err(|e| e.to_string())?;
        let watch = Watch::new(settings, storage.clone()).map_err(|e| e.to_string())?;
        Ok(Registry::new()
            .register(Capture::new(settings, storage))
            .register(watch))
    })
}

/// Sets the concurrency to sessions + cores when nothing else sets it.
fn default_concurrency(args: &WorkerArgs) {
    if args.concurrency.is_some() || std::env::var_os(CONCURRENCY_VAR).is_some() {
        return;
    }
    let in_file = std::fs::read_to_string(&args.config)
        .ok()
        .and_then(|text| text.parse::<toml::Table>().ok())
        .is_some_and(|t| t.contains_key("worker_concurrency"));
    if in_file {
        return;
    }
    let given = args.config != Path::new("mediafarm.toml");
    let Ok(settings) = mediafarm::Settings::load(&args.config, given) else {
        return; // run_worker_main reports it
    };
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    // SAFETY: nothing else runs yet; the variable is read once, by the settings loader.
    unsafe {
        std::env::set_var(
            CONCURRENCY_VAR,
            (settings.snapshot_max_sessions + cores).to_string(),
        );
    }
}

//! `snapshot-worker`: consumes queue `snapshot` and runs `snapshot.capture` and `snapshot.watch`.
//! Its concurrency defaults to `snapshot_max_sessions` plus one slot per core (see
//! `snapshot_worker::settings::default_concurrency`).

use std::process::ExitCode;

use mediafarm::runtime::cli::{run_worker_main, WorkerSpec};
use mediafarm::Registry;
use snapshot_worker::{Capture, SnapshotGroups, Watch};

#[global_allocator]
static ALLOCATOR: mediafarm::FastAllocator = mediafarm::FastAllocator;

fn main() -> ExitCode {
    let spec = WorkerSpec {
        binary: "snapshot-worker",
        default_queues: &["snapshot"],
        default_concurrency: Some(snapshot_worker::settings::default_concurrency),
    };
    run_worker_main(spec, |settings, groups: &SnapshotGroups, queues| {
        let storage =
            mediafarm::storage::Storage::from_settings(settings).map_err(|e| e.to_string())?;
        // Continuations go back to the first queue consumed.
        let queue = queues.first().map_or("snapshot", |q| q.as_str()).to_owned();
        let watch =
            Watch::new(settings, groups, storage.clone(), queue).map_err(|e| e.to_string())?;
        Ok(Registry::new()
            .register(Capture::new(settings, &groups.0, storage))
            .register(watch))
    })
}

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
    run_worker_main(spec, |settings, groups: &SnapshotGroups, _queues| {
        let storage =
            mediafarm::storage::Storage::from_settings(settings).map_err(|e| e.to_string())?;
        let watch = Watch::new(settings, groups, storage.clone()).map_err(|e| e.to_string())?;
        let sweeper = watch.sweeper();
        let registry = Registry::new()
            .register(Capture::new(settings, &groups.0, storage))
            .register(watch)
            // Puts the frame lateness histogram on `/metrics`, then holds until the worker stops.
            .background("snapshot-frame-metrics", |bg| {
                Box::pin(async move {
                    snapshot_worker::watch::timing::register(bg.metrics());
                    bg.stopping().await;
                })
            });
        Ok(match sweeper {
            Some(sweeper) => registry.background("snapshot-outbox-sweeper", move |bg| {
                Box::pin(sweeper.clone().run(bg))
            }),
            None => registry,
        })
    })
}

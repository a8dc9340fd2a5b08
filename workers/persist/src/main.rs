//! `persist-worker`: consumes queue `persist` and runs `persist.write`.

use std::process::ExitCode;

use mediafarm::runtime::cli::{run_worker_main, WorkerSpec};
use persist_worker::PersistSettings;

#[global_allocator]
static ALLOCATOR: mediafarm::FastAllocator = mediafarm::FastAllocator;

fn main() -> ExitCode {
    let spec = WorkerSpec {
        binary: "persist-worker",
        default_queues: &["persist"],
        // Jobs only wait for their batch: enough at once to fill one.
        default_concurrency: Some(|_, p: &PersistSettings| {
            (p.persist_batch_size as usize).clamp(16, 1000)
        }),
    };
    run_worker_main(spec, |settings, persist: &PersistSettings, _queues| {
        persist_worker::registry(settings, persist).map_err(|e| e.to_string())
    })
}

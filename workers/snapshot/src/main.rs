//! `snapshot-worker`: consumes queue `snapshot` (being built; see the open issue).

use std::process::ExitCode;

use mediafarm::Registry;

#[global_allocator]
static ALLOCATOR: mediafarm::FastAllocator = mediafarm::FastAllocator;

fn main() -> ExitCode {
    mediafarm::worker_cli::run_worker_main("snapshot-worker", &["snapshot"], |_settings| Ok(Registry::new()))
}

//! `notify-worker`: consumes queue `notify` (being built; see the open issue).

use std::process::ExitCode;

use mediafarm::Registry;

#[global_allocator]
static ALLOCATOR: mediafarm::FastAllocator = mediafarm::FastAllocator;

fn main() -> ExitCode {
    mediafarm::worker_cli::run_worker_main("notify-worker", &["notify"], |_settings| Ok(Registry::new()))
}

//! `notify-worker`: consumes queue `notify` and runs `notify.email`, `notify.sms` and
//! `notify.webhook`.

use std::process::ExitCode;

use mediafarm::runtime::cli::{run_worker_main, WorkerSpec};
use notify_worker::NotifyGroups;

#[global_allocator]
static ALLOCATOR: mediafarm::FastAllocator = mediafarm::FastAllocator;

fn main() -> ExitCode {
    let spec = WorkerSpec {
        binary: "notify-worker",
        default_queues: &["notify"],
        default_concurrency: None,
    };
    run_worker_main(
        spec,
        |settings, (notify, webhook): &NotifyGroups, _queues| {
            notify_worker::registry(settings, notify, webhook).map_err(|e| e.to_string())
        },
    )
}

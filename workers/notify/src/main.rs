//! `notify-worker`: consumes queue `notify` and runs `notify.email`, `notify.sms` and
//! `notify.webhook`.

use std::process::ExitCode;

#[global_allocator]
static ALLOCATOR: mediafarm::FastAllocator = mediafarm::FastAllocator;

fn main() -> ExitCode {
    mediafarm::runtime::cli::run_worker_main("notify-worker", &["notify"], |settings| {
        notify_worker::registry(settings).map_err(|e| e.to_string())
    })
}

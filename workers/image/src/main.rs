//! `image-worker`: consumes queue `image` and runs `image.transform`.

use std::process::ExitCode;

use image_worker::{ImageSettings, Transform};
use mediafarm::runtime::cli::{run_worker_main, WorkerSpec};
use mediafarm::Registry;

#[global_allocator]
static ALLOCATOR: mediafarm::FastAllocator = mediafarm::FastAllocator;

fn main() -> ExitCode {
    // The C codecs (libjpeg-turbo, libwebp) allocate with glibc's malloc, which gives each
    // thread its own arena that keeps what was freed in it: one arena measured 202 MB peak
    // RSS instead of 262 MB at concurrency 2 on 50 MP sources (BENCHMARKS.md). The C side
    // allocates a few large pools per image, so sharing one arena costs no measurable time.
    // SAFETY: called once, before any other thread exists; `mallopt` only changes glibc's
    // allocator settings.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) };
    let spec = WorkerSpec {
        binary: "image-worker",
        default_queues: &["image"],
        default_concurrency: None,
    };
    run_worker_main(spec, |settings, image: &ImageSettings, _queues| {
        let transform = Transform::new(settings, image).map_err(|e| e.to_string())?;
        Ok(Registry::new().register(transform))
    })
}

//! `image-worker`: consumes queue `image` and runs `image.transform`.

use std::process::ExitCode;

use image_worker::Transform;
use mediafarm::Registry;

#[global_allocator]
static ALLOCATOR: mediafarm::FastAllocator = mediafarm::FastAllocator;

/// mimalloc's `mi_option_purge_delay` (the same index in its v2 and v3 option enums).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

fn main() -> ExitCode {
    // Jobs run on the CPU pool's threads in turn, and mimalloc returns a thread's freed
    // pages to the OS only when that thread next allocates: multi-megabyte image buffers
    // freed on a thread that then sits idle stayed resident (RSS grew from 56 MB to 173 MB
    // over 16 jobs on 50 MP sources). Purging at once keeps RSS at what is in use.
    // SAFETY: called once, before any other thread exists.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 0) };
    // The C codecs (libjpeg-turbo, libwebp) allocate with glibc's malloc, which gives each
    // thread its own arena that keeps what was freed in it: one arena measured 202 MB peak
    // RSS instead of 262 MB at concurrency 2 on 50 MP sources (BENCHMARKS.md). The C side
    // allocates a few large pools per image, so sharing one arena costs no measurable time.
    // SAFETY: as above; `mallopt` only changes glibc's allocator settings.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) };
    mediafarm::worker_cli::run_worker_main("image-worker", &["image"], |settings| {
        let transform = Transform::new(settings).map_err(|e| e.to_string())?;
        Ok(Registry::new().register(transform))
    })
}

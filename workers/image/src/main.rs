//! `image-worker`: consumes queue `image` and runs `image.transform`.

use std::process::ExitCode;

use image_worker::Transform;
use mediafarm::Registry;

#[global_allocator]
static ALLOCATOR: mediafarm::FastAllocator = mediafarm::FastAllocator;

fn main() -> ExitCode {
    mediafarm::worker_cli::run_worker_main("image-worker", &["image"], |settings| {
        let transform = Transform::new(settings).map_err(|e| e.to_string())?;
        Ok(Registry::new().register(transform))
    })
}

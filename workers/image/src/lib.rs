//! image-worker: the `image.transform` task (crop, resize and compress an upload into stored
//! variants). The binary in `main.rs` runs it as a Celery-compatible worker on queue `image`.

pub mod transform;

pub use transform::Transform;

//! snapshot-worker: `snapshot.capture` (one frame from a file or a live stream) and
//! `snapshot.watch` (a session: a frame every `interval_s` from a live stream, decoding only
//! the keyframe chosen for each tick). The binary in `main.rs` runs them on queue `snapshot`.

pub mod capture;
pub mod cpu_gate;
#[doc(hidden)]
pub mod fuzzing;
pub mod hooks;
pub mod jpeg;
pub mod media;
pub mod rtmp;
pub mod settings;
pub mod source;
pub mod template;
pub mod watch;

pub use capture::Capture;
pub use settings::{SnapshotGroups, SnapshotSettings};
pub use watch::Watch;

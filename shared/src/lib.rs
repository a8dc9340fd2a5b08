//! mediafarm: a Celery-compatible worker farm for media work. This crate holds everything two
//! workers would otherwise write twice: settings, the Celery protocol v2 wire format, the
//! RabbitMQ broker, the Redis broker, the Redis result backend, the worker runtime, metrics and health
//! endpoints, the producer client and the `mediafarm` CLI.

pub mod amqp;
pub mod backend;
pub mod beat;
pub mod canvas;
pub mod client;
pub mod events;
#[doc(hidden)]
pub mod fuzzing;
#[cfg(test)]
mod layering;
pub mod net;
pub mod observe;
pub mod protocol;
pub mod redis_broker;
pub mod runtime;
pub mod schedule;
pub mod settings;
pub mod storage;
pub mod tls;

/// The allocator every mediafarm binary installs (`#[global_allocator] static A:
/// mediafarm::FastAllocator = mediafarm::FastAllocator;`): mimalloc, which keeps the
/// per-message allocations of many worker threads off glibc's arena locks.
pub use mimalloc::MiMalloc as FastAllocator;

pub use backend::result::{FailureKind, ResultMeta, TaskError, TaskState};
pub use backend::ResultBackend;
pub use client::{AsyncResult, Client, ClientError, SendOptions};
pub use runtime::task::{Job, Registry, Task, TaskContext};
pub use runtime::worker::{Worker, WorkerHandle};
pub use settings::Settings;

/// This machine's host name, for node names and message origins.
pub fn hostname() -> String {
    gethostname::gethostname().to_string_lossy().into_owned()
}

//! mediafarm: a Celery-compatible worker farm for media work. This crate holds everything two
//! workers would otherwise write twice: settings, the Celery protocol v2 wire format, the
//! RabbitMQ broker, the Redis result backend, the worker runtime, metrics and health
//! endpoints, the producer client and the `mediafarm` CLI.

pub mod amqp_table;
pub mod backend;
pub mod beat;
pub mod beat_lease;
pub mod beat_metrics;
pub mod beat_probe;
pub mod broker;
pub mod client;
pub mod compression;
pub mod cpu;
pub mod deadletter;
#[doc(hidden)]
pub mod fuzzing;
pub mod http;
pub mod job;
#[cfg(test)]
mod layering;
pub mod logging;
pub mod metrics;
pub mod once;
pub mod protocol;
pub mod reroute;
pub mod result;
pub mod revoke;
pub mod schedule;
pub mod schedule_cron;
pub mod schedule_store;
pub mod settings;
pub mod sources;
pub mod storage;
pub mod task;
pub mod watchdog;
pub mod worker;
pub mod worker_cli;

/// The allocator every mediafarm binary installs (`#[global_allocator] static A:
/// mediafarm::FastAllocator = mediafarm::FastAllocator;`): mimalloc, which keeps the
/// per-message allocations of many worker threads off glibc's arena locks.
pub use mimalloc::MiMalloc as FastAllocator;

pub use backend::ResultBackend;
pub use client::{AsyncResult, Client, ClientError, SendOptions};
pub use result::{FailureKind, ResultMeta, TaskError, TaskState};
pub use settings::Settings;
pub use task::{Job, Registry, Task, TaskContext};
pub use worker::{Worker, WorkerHandle};

/// This machine's host name, for node names and message origins.
pub fn hostname() -> String {
    gethostname::gethostname().to_string_lossy().into_owned()
}

//! The worker runtime: the consume loop (`worker`), work a worker's tasks run beside their
//! jobs (`background`), one message's life from delivery to
//! acknowledgement (`message`), the task trait, registry and context a job sees (`task`), the
//! bounded CPU pool (`cpu`), per-task rate limits (`rate`), the prefetch window that widens for finishing jobs
//! (`window`), the signals long-running jobs poll
//! (`stop`) and the command line every worker binary shares (`cli`).

pub mod background;
pub mod cli;
pub mod cpu;
pub mod message;
pub mod rate;
mod redis_consumer;
pub mod stop;
pub mod task;
mod transport;
mod window;
pub mod worker;

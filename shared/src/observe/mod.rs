//! What a process shows of itself: Prometheus metrics (`metrics`), the `/metrics`, `/healthz`
//! and `/readyz` endpoints (`http`), the record of running jobs and their deadlines that tells
//! a wedged worker from a busy one (`watchdog`), and structured logs (`logging`).

pub mod http;
pub mod logging;
pub mod metrics;
pub mod watchdog;

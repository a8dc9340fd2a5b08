//! What a process shows of itself: Prometheus metrics (`metrics`), the `/metrics`, `/healthz`
//! and `/readyz` endpoints (`http`), the record of running jobs and their deadlines that tells
//! a wedged worker from a busy one (`watchdog`), structured logs (`logging`) and OpenTelemetry traces
//! (`trace`).

pub mod http;
pub mod logging;
pub mod metrics;
pub mod trace;
pub mod watchdog;

//! What a Rust errback learns about the job that failed. Celery sends an errback it cannot call
//! inline with the failed job's id as its first argument (mediafarm does the same, after the
//! FAILURE is stored); [`failure_of`] reads that stored FAILURE back as a typed value.

use crate::backend::result::TaskState;
use crate::backend::{BackendError, ResultBackend};

/// A failed job as its stored FAILURE record tells it.
#[derive(Debug, Clone, PartialEq)]
pub struct ParentFailure {
    /// The failed job's id.
    pub id: String,
    /// The exception type (`EchoFailure`, `ValueError`, `TimeLimitExceeded`, ...).
    pub exc_type: String,
    /// The module Python resolves the type in (`mediafarm.errors`, `builtins`, ...).
    pub exc_module: String,
    pub message: String,
    pub traceback: Option<String>,
}

/// The stored failure of job `id`; `None` when its record is missing (never stored, or
/// expired) or is not a FAILURE.
pub async fn failure_of(
    backend: &ResultBackend,
    id: &str,
) -> Result<Option<ParentFailure>, BackendError> {
    let Some(meta) = backend.get(id).await? else {
        return Ok(None);
    };
    if meta.status != TaskState::Failure {
        return Ok(None);
    }
    Ok(meta.error().map(|e| ParentFailure {
        id: id.to_owned(),
        exc_type: e.exc_type.into_owned(),
        exc_module: e.exc_module.into_owned(),
        message: e.message,
        traceback: meta.traceback.clone(),
    }))
}

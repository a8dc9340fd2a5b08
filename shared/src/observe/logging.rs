//! Structured logs with `tracing`: Celery's level names on the command line, `RUST_LOG` for
//! finer filters, and JSON lines when `MEDIAFARM_LOG_FORMAT=json` (for log shippers).

use tracing_subscriber::EnvFilter;

/// Maps Celery's `--loglevel` names to tracing levels.
pub fn level_filter(loglevel: &str) -> Result<&'static str, String> {
    match loglevel.to_ascii_lowercase().as_str() {
        "debug" => Ok("debug"),
        "info" => Ok("info"),
        "warning" | "warn" => Ok("warn"),
        "error" | "critical" | "fatal" => Ok("error"),
        "trace" => Ok("trace"),
        other => Err(format!(
            "--loglevel {other:?} is not accepted: one of debug, info, warning, error, critical"
        )),
    }
}

/// Installs the global subscriber; a second call is a no-op.
pub fn init(loglevel: &str) -> Result<(), String> {
    let level = level_filter(loglevel)?;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        EnvFilter::new(format!("{level},lapin=warn,amq_protocol=warn,redis=warn"))
    });
    let json = std::env::var("MEDIAFARM_LOG_FORMAT").is_ok_and(|v| v.eq_ignore_ascii_case("json"));
    // A log line that cannot be written (stderr a closed pipe) is dropped: the subscriber's
    // own error report would go to the same stderr and panic, killing whatever task logged.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .log_internal_errors(false);
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
    Ok(())
}

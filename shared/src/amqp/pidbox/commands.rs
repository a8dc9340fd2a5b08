//! The commands a requester may send, with their positional arguments as Celery's `Panel`
//! declares them (`celery/worker/control.py`), so `mediafarm inspect|control METHOD ARGS...`
//! builds the same `arguments` object `celery inspect|control` does. A command missing here
//! is one line.

use serde_json::{json, Map, Value};

/// How a positional argument is typed on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Str,
    Float,
    Bool,
}

/// Named positional arguments, then (optionally) the name the rest are collected under.
struct Signature {
    method: &'static str,
    args: &'static [(&'static str, Kind)],
    variadic: Option<&'static str>,
}

const fn sig(
    method: &'static str,
    args: &'static [(&'static str, Kind)],
    variadic: Option<&'static str>,
) -> Signature {
    Signature {
        method,
        args,
        variadic,
    }
}

/// `inspect` commands (read-only).
const INSPECT: &[Signature] = &[
    sig("ping", &[], None),
    sig("stats", &[], None),
    sig("active", &[], None),
    sig("reserved", &[], None),
    sig("scheduled", &[], None),
    sig("registered", &[], Some("taskinfoitems")),
    sig("active_queues", &[], None),
    sig("revoked", &[], None),
    sig("query_task", &[], Some("ids")),
    sig("conf", &[("with_defaults", Kind::Bool)], None),
    sig("report", &[], None),
    sig("clock", &[], None),
];

/// `control` commands (they change workers).
const CONTROL: &[Signature] = &[
    sig(
        "add_consumer",
        &[
            ("queue", Kind::Str),
            ("exchange", Kind::Str),
            ("exchange_type", Kind::Str),
            ("routing_key", Kind::Str),
        ],
        None,
    ),
    sig("cancel_consumer", &[("queue", Kind::Str)], None),
    sig("shutdown", &[], None),
    sig(
        "time_limit",
        &[
            ("task_name", Kind::Str),
            ("soft", Kind::Float),
            ("hard", Kind::Float),
        ],
        None,
    ),
    sig(
        "rate_limit",
        &[("task_name", Kind::Str), ("rate_limit", Kind::Str)],
        None,
    ),
    sig("revoke", &[], Some("task_id")),
    sig("terminate", &[("signal", Kind::Str)], Some("task_id")),
    sig("enable_events", &[], None),
    sig("disable_events", &[], None),
    sig("heartbeat", &[], None),
];

/// Whether a request is a read-only `inspect` or a `control` command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommandType {
    Inspect,
    Control,
}

impl CommandType {
    fn table(self) -> &'static [Signature] {
        match self {
            CommandType::Inspect => INSPECT,
            CommandType::Control => CONTROL,
        }
    }

    /// The method names of this type, for help and error messages.
    pub fn methods(self) -> Vec<&'static str> {
        self.table().iter().map(|s| s.method).collect()
    }
}

/// The `arguments` object for `method` given its positional words, as Celery's CLI builds it.
pub fn arguments(kind: CommandType, method: &str, words: &[String]) -> Result<Value, String> {
    let Some(sig) = kind.table().iter().find(|s| s.method == method) else {
        return Err(format!(
            "command {method} not recognized; available: {}",
            kind.methods().join(", ")
        ));
    };
    let mut out = Map::new();
    let named = words.len().min(sig.args.len());
    for ((name, k), word) in sig.args.iter().zip(&words[..named]) {
        let v = match k {
            Kind::Str => json!(word),
            Kind::Float => json!(word
                .parse::<f64>()
                .ok()
                .filter(|f| f.is_finite())
                .ok_or_else(|| format!("{method}: {name} must be a number; got {word}"))?),
            Kind::Bool => json!(matches!(
                word.to_ascii_lowercase().as_str(),
                "1" | "true" | "yes" | "y" | "on"
            )),
        };
        out.insert((*name).to_owned(), v);
    }
    let rest = &words[named..];
    match sig.variadic {
        Some(name) => {
            out.insert(name.to_owned(), json!(rest));
        }
        None if !rest.is_empty() => {
            let names: Vec<&str> = sig.args.iter().map(|(n, _)| *n).collect();
            return Err(format!(
                "{method} takes at most {} argument(s): {}",
                names.len(),
                names.join(" ")
            ));
        }
        None => {}
    }
    Ok(Value::Object(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(w: &[&str]) -> Vec<String> {
        w.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn arguments_are_built_as_celerys_cli_builds_them() {
        assert_eq!(
            arguments(
                CommandType::Control,
                "time_limit",
                &words(&["echo.echo", "1", "2.5"])
            ),
            Ok(json!({"task_name": "echo.echo", "soft": 1.0, "hard": 2.5}))
        );
        assert_eq!(
            arguments(CommandType::Control, "add_consumer", &words(&["q1"])),
            Ok(json!({"queue": "q1"}))
        );
        assert_eq!(
            arguments(CommandType::Inspect, "query_task", &words(&["a", "b"])),
            Ok(json!({"ids": ["a", "b"]}))
        );
        assert_eq!(
            arguments(CommandType::Inspect, "conf", &words(&["true"])),
            Ok(json!({"with_defaults": true}))
        );
        assert_eq!(arguments(CommandType::Inspect, "ping", &[]), Ok(json!({})));
        let e = arguments(CommandType::Control, "time_limit", &words(&["t", "soon"])).unwrap_err();
        assert!(e.contains("soft must be a number"), "{e}");
        let e = arguments(CommandType::Control, "shutdown", &words(&["now"])).unwrap_err();
        assert!(e.contains("at most 0"), "{e}");
        let e = arguments(CommandType::Inspect, "shutdown", &[]).unwrap_err();
        assert!(
            e.contains("not recognized") && e.contains("active_queues"),
            "{e}"
        );
    }
}

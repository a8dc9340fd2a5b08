//! Entry points for the fuzz targets in `fuzz/` and for the tests that replay their corpora
//! (`tests/fuzz_corpus.rs`): each takes raw bytes and runs the same code a worker runs on a
//! delivery, without I/O, so a file the fuzzer found replays exactly in an ordinary test.
//! Every entry must return (a value or a clear refusal) for every input; a panic, a hang or
//! unbounded memory is a bug in the code under it. Not part of the supported API.

use chrono::Utc;
use lapin::protocol::basic::parse_properties;
use lapin::BasicProperties;
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::amqp::table::{read_job_properties, read_properties, try_write_properties};
use crate::backend::result::TaskError;
use crate::protocol::{DecodeError, Properties, TaskMessage, JSON_CONTENT_TYPE};
use crate::redis_broker::Envelope;
use crate::runtime::task::{typed_args, Task, TaskContext};

/// `task_message_max_bytes`' default: what a worker with default settings accepts.
const MAX_BODY_BYTES: usize = 1 << 20;

/// What one message became.
#[derive(Debug)]
pub enum MessageOutcome {
    /// The properties cannot be on the wire: they do not parse (lapin closes the connection on
    /// such a frame), or, for `message_json`, py-amqp could not have written them (a header
    /// key over 255 bytes). No job ever sees these.
    BadFrame(String),
    /// Refused before any task ran, as the worker stores and dead-letters it.
    Refused(DecodeError),
    /// Decoded for the probe task; `args` is its keyword arguments as the task would get them.
    Decoded {
        message: Box<TaskMessage>,
        args: Result<ProbeArgs, TaskError>,
    },
}

impl MessageOutcome {
    /// The refusal's or the kwargs error's text, for tests that expect a particular one.
    pub fn error_text(&self) -> Option<String> {
        match self {
            MessageOutcome::BadFrame(e) => Some(e.clone()),
            MessageOutcome::Refused(e) => Some(e.reason.clone()),
            MessageOutcome::Decoded { args: Err(e), .. } => Some(e.to_string()),
            MessageOutcome::Decoded { args: Ok(_), .. } => None,
        }
    }
}

/// A content header's properties as lapin parses them off the wire (the flags word, then each
/// flagged property; headers are an AMQP field table), followed by the body.
pub fn message_frame(data: &[u8]) -> MessageOutcome {
    let (body, basic) = match parse_properties(data) {
        Ok(parsed) => parsed,
        Err(e) => return MessageOutcome::BadFrame(format!("{e:?}")),
    };
    delivered(&basic, body)
}

/// A JSON object of headers (as a Python producer gives them to py-amqp, which writes them as
/// a field table), a NUL byte, then the body. The properties are Celery's: JSON, UTF-8, the
/// `id` header as correlation id. Without a NUL the whole input is the body.
pub fn message_json(data: &[u8]) -> MessageOutcome {
    let (head, body) = match data.iter().position(|b| *b == 0) {
        Some(nul) => (&data[..nul], &data[nul + 1..]),
        None => (&b"{}"[..], data),
    };
    let headers = match serde_json::from_slice::<Value>(head) {
        Ok(Value::Object(h)) => h,
        // Not a headers map py-amqp could have been given: nothing to fuzz past here.
        _ => Map::new(),
    };
    let props = Properties {
        content_type: Some(JSON_CONTENT_TYPE.into()),
        content_encoding: Some("utf-8".into()),
        correlation_id: headers.get("id").and_then(Value::as_str).map(Into::into),
        ..Properties::default()
    };
    // Through the field-table conversion the broker edge does on the way out and back in.
    match try_write_properties(&props, &headers) {
        Ok(basic) => delivered(&basic, body),
        Err(e) => MessageOutcome::BadFrame(e.to_string()),
    }
}

/// A value taken from a Redis queue's list (kombu's envelope: JSON holding the base64 body,
/// the properties and the headers), through the path `redis_consumer::dispatch` takes: read,
/// then properties, body and the field-table conversion, then as any delivery. Its retry and
/// dead-letter copies (`republished`, `mark_redelivered`) must read back as envelopes.
pub fn redis_envelope(data: &[u8]) -> MessageOutcome {
    let refused = |reason: String| {
        MessageOutcome::Refused(DecodeError {
            id: None,
            task: None,
            reason,
        })
    };
    let envelope = match Envelope::parse(data) {
        Ok(e) => e,
        Err(why) => return refused(why),
    };
    let _ = (envelope.exchange_and_routing_key(), envelope.priority());
    let mut again = envelope.republished(&Map::new(), &["redelivered"], "q");
    again.mark_redelivered();
    if let Err(e) = Envelope::parse(again.to_json().as_bytes()) {
        panic!("a republished envelope does not read back: {e}");
    }
    let (props, headers) = envelope.properties();
    let body = match envelope.body() {
        Ok(b) => b,
        Err(why) => return refused(why),
    };
    match try_write_properties(&props, &headers) {
        Ok(basic) => delivered(&basic, &body),
        Err(e) => MessageOutcome::BadFrame(e.to_string()),
    }
}

/// From here on, the path of `message::handle`: properties and headers read, the message decoded,
/// the task looked up and its kwargs made into its argument struct.
fn delivered(basic: &BasicProperties, body: &[u8]) -> MessageOutcome {
    let (props, headers) = match read_job_properties(basic) {
        Ok(read) => read,
        Err(e) => return MessageOutcome::Refused(e),
    };
    let message = match TaskMessage::decode(&props, &headers, body, MAX_BODY_BYTES) {
        Ok(m) => m,
        Err(e) => return MessageOutcome::Refused(e),
    };
    if message.task != Probe::NAME {
        return MessageOutcome::Refused(DecodeError {
            id: Some(message.id.clone()),
            task: Some(message.task.clone()),
            reason: format!(
                "unknown task {:?}: this worker runs {}",
                message.task,
                Probe::NAME
            ),
        });
    }
    let _ = message.is_expired(Utc::now());
    encode_round_trip(&message);
    let args = typed_args::<Probe>(message.args.clone(), message.kwargs.clone());
    MessageOutcome::Decoded {
        message: Box::new(message),
        args,
    }
}

/// What mediafarm publishes (the client, beat, snapshot hand-ons) its workers must accept; a
/// decoded message is a wide sample of the messages a producer can build. Publishing may
/// refuse one with a clear error (a task id over 255 bytes), never panic.
fn encode_round_trip(message: &TaskMessage) {
    let (props, headers, body) = message.encode();
    let Ok(basic) = try_write_properties(&props, &headers) else {
        return;
    };
    let (props, headers) = read_properties(&basic);
    if let Err(e) = TaskMessage::decode(&props, &headers, &body, usize::MAX) {
        panic!("a message mediafarm encoded is refused by its own decoder: {e}");
    }
}

/// Keyword arguments as JSON bytes → the task's argument struct, as the runtime makes it.
/// A worker's own entry adds the checks its task makes before any I/O.
pub fn kwargs<T: Task>(data: &[u8]) -> Result<T::Args, TaskError> {
    let kwargs = match serde_json::from_slice::<Value>(data) {
        Ok(Value::Object(m)) => m,
        Ok(_) => {
            return Err(TaskError::invalid(
                "InvalidArguments",
                "kwargs must be a JSON object",
            ))
        }
        Err(e) => {
            return Err(TaskError::invalid(
                "InvalidArguments",
                format!("kwargs are not JSON: {e}"),
            ))
        }
    };
    typed_args::<T>(Vec::new(), kwargs)
}

/// A task whose arguments use the shapes real tasks use (positional `source`, nested lists of
/// objects, enums, optional numbers), so the message targets reach kwargs deserialisation.
pub struct Probe;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProbeArgs {
    pub source: String,
    #[serde(default)]
    pub count: Option<u32>,
    #[serde(default)]
    pub ratio: Option<f64>,
    #[serde(default)]
    pub outputs: Vec<ProbeOutput>,
    #[serde(default)]
    pub extra: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProbeOutput {
    pub key: String,
    pub width: Option<u32>,
    #[serde(default)]
    pub mode: ProbeMode,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProbeMode {
    #[default]
    Inside,
    Cover,
}

impl Task for Probe {
    const NAME: &'static str = "fuzz.probe";
    const POSITIONAL: &'static [&'static str] = &["source"];
    type Args = ProbeArgs;
    type Output = ();

    async fn run(&self, _ctx: TaskContext, _args: ProbeArgs) -> Result<(), TaskError> {
        Ok(())
    }
}

/// Runs `entry` on every file of a fuzz target's committed corpus under `dir` (`seeds/`,
/// realistic inputs; `corpus/`, the minimised corpus the fuzzer grew; `crashes/`, inputs that
/// once failed), naming the file that panics. Returns how many files ran; a target without files is an error, so a moved
/// folder cannot turn the replay into a test of nothing.
pub fn replay(dir: &std::path::Path, entry: impl Fn(&str, &[u8])) -> usize {
    let mut files = Vec::new();
    for sub in ["seeds", "corpus", "crashes"] {
        let Ok(listing) = std::fs::read_dir(dir.join(sub)) else {
            continue;
        };
        for item in listing.flatten() {
            let path = item.path();
            if path.is_file() {
                files.push(path);
            }
        }
    }
    files.sort();
    assert!(!files.is_empty(), "no corpus files under {}", dir.display());
    for path in &files {
        let data = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let name = path.strip_prefix(dir).unwrap_or(path).display().to_string();
        let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| entry(&name, &data)));
        if let Err(panic) = run {
            panic!(
                "{}: {}",
                path.display(),
                crate::runtime::cpu::panic_message(panic.as_ref())
            );
        }
    }
    files.len()
}

/// [`replay`] for a target whose entry returns a refusal or nothing: each file named in
/// `expected` must be refused with an error containing its text (`Some`) or accepted (`None`),
/// every other file only must not panic. Each file named must exist.
pub fn replay_expecting(
    dir: &std::path::Path,
    expected: &[(&str, Option<&str>)],
    entry: impl Fn(&[u8]) -> Option<String>,
) -> usize {
    for (file, _) in expected {
        assert!(dir.join(file).is_file(), "{file} is missing");
    }
    replay(dir, |name, data| {
        let got = entry(data);
        if let Some((_, want)) = expected.iter().find(|(file, _)| *file == name) {
            match (want, &got) {
                (None, None) => {}
                (Some(want), Some(got)) => {
                    assert!(got.contains(want), "{name}: got {got:?}, want {want:?}")
                }
                _ => panic!("{name}: got {got:?}, want {want:?}"),
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::{Path, PathBuf};

    fn fixtures(target: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../fixtures/fuzz")
            .join(target)
    }

    /// Files whose outcome is pinned: (file, text the refusal or kwargs error must contain).
    /// `None`: the message must decode and its kwargs must fit the probe task.
    const EXPECTED: &[(&str, Option<&str>)] = &[
        ("message_frame/seeds/celery-plain", None),
        ("message_frame/seeds/celery-full", None),
        ("message_frame/seeds/celery-positional", None),
        ("message_frame/seeds/celery-chain", None),
        ("message_frame/seeds/celery-eta", None),
        ("message_frame/seeds/celery-shadow", None),
        ("message_frame/seeds/typed-values", None),
        (
            "message_frame/seeds/celery-image",
            Some("unknown task \"image.transform\""),
        ),
        ("message_frame/seeds/pickle", Some("(pickle) refused")),
        ("message_frame/seeds/no-properties", Some("no content type")),
        ("message_json/seeds/celery-full", None),
        ("message_json/seeds/protocol-test", None),
        ("message_json/seeds/group", None),
        (
            "message_json/seeds/protocol-v1",
            Some("protocol v1 is not supported"),
        ),
        (
            "message_json/seeds/bad-retries",
            Some("`retries` must be a whole number"),
        ),
        ("message_json/seeds/no-id", Some("has no `id` header")),
        // kombu's `lzma` compression (the .xz container), and .xz bombs: refused from their
        // chunk headers before any byte is inflated (the 3 GiB one ran the fuzzer out of memory).
        ("message_json/seeds/celery-lzma", None),
        (
            "message_json/seeds/xz-bomb-64-mib",
            Some("application/x-lzma inflates past 1048576 bytes"),
        ),
        (
            "message_json/crashes/xz-bomb-3-gib",
            Some("application/x-lzma inflates past 1048576 bytes"),
        ),
        (
            "message_json/crashes/header-key-over-255-bytes",
            Some("is 256 bytes; AMQP carries it as a short string of at most 255 bytes"),
        ),
        (
            "message_json/crashes/task-id-over-255-bytes",
            Some("the task id (correlation_id) is 256 bytes"),
        ),
        // Python Celery's values on a Redis list (`redis_envelope/make_seeds.py`), and values
        // only Redis's own JSON reader would take.
        ("redis_envelope/seeds/celery-plain", None),
        ("redis_envelope/seeds/celery-positional-priority", None),
        ("redis_envelope/seeds/celery-zlib", None),
        ("redis_envelope/seeds/celery-chain", None),
        (
            "redis_envelope/seeds/celery-other-task",
            Some("unknown task \"image.transform\""),
        ),
        ("redis_envelope/seeds/not-utf8", Some("it is not JSON")),
        ("redis_envelope/seeds/nan", Some("it is not JSON")),
        (
            "redis_envelope/seeds/no-tag",
            Some("it has no properties.delivery_tag"),
        ),
        (
            "redis_envelope/seeds/body-not-base64",
            Some("its body is not valid base64"),
        ),
    ];

    fn check(target: &str, entry: fn(&[u8]) -> MessageOutcome) {
        let ran = replay(&fixtures(target), |name, data| {
            let outcome = entry(data);
            let key = format!("{target}/{name}");
            if let Some((_, want)) = EXPECTED.iter().find(|(file, _)| *file == key) {
                match (want, outcome.error_text()) {
                    (None, None) => {}
                    (Some(want), Some(got)) => {
                        assert!(got.contains(want), "{key}: got {got:?}, want {want:?}")
                    }
                    (want, got) => panic!("{key}: got {got:?}, want {want:?}"),
                }
            }
        });
        assert!(ran > 0);
    }

    #[test]
    fn message_frame_corpus_replays() {
        check("message_frame", message_frame);
    }

    #[test]
    fn message_json_corpus_replays() {
        check("message_json", message_json);
    }

    #[test]
    fn redis_envelope_corpus_replays() {
        check("redis_envelope", redis_envelope);
    }

    #[test]
    fn every_pinned_file_exists() {
        for (file, _) in EXPECTED {
            let path = Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../fixtures/fuzz")
                .join(file);
            assert!(path.is_file(), "{} is missing", path.display());
        }
    }
}

//! The fuzz target `snapshot_args` and its corpus replay test run this: the first line names the
//! task (`capture` or `watch`), the rest is its kwargs as JSON, taken through the runtime's
//! deserialisation and every check made before a stream is opened (including the key
//! template). No I/O. Not part of the supported API.

use std::time::Duration;

use mediafarm::TaskError;

use crate::capture::{self, Capture};
use crate::watch::{self, Watch};

/// `snapshot_capture_timeout`'s stand-in when `timeout_s` is absent.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(15);

/// What the kwargs were found to be.
#[derive(Debug)]
pub enum Checked {
    Capture(capture::CaptureArgs),
    Watch(watch::WatchArgs),
}

pub fn snapshot_kwargs(data: &[u8]) -> Result<Checked, TaskError> {
    let (task, kwargs) = match data.iter().position(|b| *b == b'\n') {
        Some(nl) => (&data[..nl], &data[nl + 1..]),
        None => (data, &b""[..]),
    };
    match task {
        b"capture" => {
            let args = mediafarm::fuzzing::kwargs::<Capture>(kwargs)?;
            capture::check_args(&args, DEFAULT_TIMEOUT)?;
            Ok(Checked::Capture(args))
        }
        b"watch" => {
            let args = mediafarm::fuzzing::kwargs::<Watch>(kwargs)?;
            watch::check_args(&args)?;
            Ok(Checked::Watch(args))
        }
        _ => Err(TaskError::invalid(
            "FuzzInput",
            "the first line must be `capture` or `watch`",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    /// Files whose outcome is pinned: (file, text the error must contain); `None`: accepted.
    const EXPECTED: &[(&str, Option<&str>)] = &[
        ("seeds/capture-readme", None),
        ("seeds/capture-file", None),
        ("seeds/capture-webp", None),
        ("seeds/watch-readme", None),
        ("seeds/watch-all", None),
        (
            "seeds/watch-bad-template",
            Some("unknown placeholder {nope}"),
        ),
    ];

    #[test]
    fn snapshot_args_corpus_replays() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/fuzz/snapshot_args");
        mediafarm::fuzzing::replay_expecting(&dir, EXPECTED, |data| {
            snapshot_kwargs(data).err().map(|e| e.to_string())
        });
    }
}

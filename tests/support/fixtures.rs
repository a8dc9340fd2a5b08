//! The bad-input corpus in `fixtures/{images,media,messages}` and the table in
//! `fixtures/README.md` that says which error each file must produce. The tests read the
//! table, not a list of their own: adding a bad input is adding a file and a row.
//!
//! [`cases`] refuses a folder whose files and rows disagree (a file without a row, or a row
//! without a file), so no fixture is silently skipped. [`message`] turns a `messages/` file
//! into the AMQP message it describes.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::workspace_root;

/// One row of the table: a bad input and the error it must produce.
#[derive(Debug, Clone)]
pub struct Case {
    /// The path as the table writes it, e.g. `images/empty.jpg`.
    pub name: String,
    pub path: PathBuf,
    /// The failure's `exc_type`; `None` (`—` in the table) when no result can be stored and
    /// only the dead letter says why.
    pub exc_type: Option<String>,
    /// Words the error message contains, each as written between backticks in the table.
    pub words: Vec<String>,
}

impl Case {
    /// The file's name without its folder.
    pub fn file_name(&self) -> &str {
        self.name.rsplit('/').next().unwrap_or(&self.name)
    }

    /// Asserts that an error message holds every word of this row.
    pub fn assert_words(&self, message: &str) {
        for word in &self.words {
            assert!(
                message.contains(word.as_str()),
                "{}: the message should contain {word:?}: {message}",
                self.name
            );
        }
    }
}

/// The `fixtures/` directory.
pub fn dir() -> PathBuf {
    workspace_root().join("fixtures")
}

/// The rows of `fixtures/README.md` for files in `folder` (`images`, `media`, `messages`),
/// checked against the folder's files.
pub fn cases(folder: &str) -> Vec<Case> {
    let readme = dir().join("README.md");
    let text =
        std::fs::read_to_string(&readme).unwrap_or_else(|e| panic!("{}: {e}", readme.display()));
    let prefix = format!("{folder}/");
    let mut cases = Vec::new();
    for line in text.lines() {
        let cells: Vec<&str> = line.trim().trim_matches('|').split('|').collect();
        let Some(first) = cells.first() else { continue };
        let Some(name) = code_spans(first).into_iter().next() else {
            continue;
        };
        // The overview table names folders (`images/`); a case names a file in one.
        if !name.starts_with(&prefix) || name.ends_with('/') {
            continue;
        }
        assert!(cells.len() >= 3, "fixtures/README.md row too short: {line}");
        let exc = cells[1].trim();
        let exc_type = match code_spans(exc).into_iter().next() {
            Some(e) => Some(e),
            None if exc == "—" => None,
            None => panic!("fixtures/README.md: {name}: exc_type {exc:?} is neither `Type` nor —"),
        };
        let words = code_spans(cells[2]);
        assert!(
            !words.is_empty(),
            "fixtures/README.md: {name} names no words of the message"
        );
        let path = dir().join(&name);
        assert!(
            path.is_file(),
            "fixtures/README.md names {name}, which does not exist"
        );
        cases.push(Case {
            name,
            path,
            exc_type,
            words,
        });
    }
    let mut files: Vec<String> = std::fs::read_dir(dir().join(folder))
        .unwrap_or_else(|e| panic!("fixtures/{folder}: {e}"))
        .map(|e| {
            format!(
                "{prefix}{}",
                e.expect("a readable entry").file_name().to_string_lossy()
            )
        })
        .collect();
    files.sort();
    for file in &files {
        assert!(
            cases.iter().any(|c| &c.name == file),
            "{file} has no row in fixtures/README.md: add the error it must produce"
        );
    }
    assert!(!cases.is_empty(), "no rows for fixtures/{folder}/");
    cases
}

/// The contents of Markdown code spans in `cell`, in order. A span opened by N backticks
/// closes at the next run of exactly N, so ``` ``no `id` header`` ``` holds a backtick; one
/// space just inside both ends is dropped, as CommonMark does.
fn code_spans(cell: &str) -> Vec<String> {
    let b = cell.as_bytes();
    let run = |i: usize| b[i..].iter().take_while(|&&c| c == b'`').count();
    let mut spans = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] != b'`' {
            i += 1;
            continue;
        }
        let open = run(i);
        let start = i + open;
        let mut j = start;
        let mut end = None;
        while j < b.len() {
            if b[j] == b'`' {
                let n = run(j);
                if n == open {
                    end = Some(j);
                    break;
                }
                j += n;
            } else {
                j += 1;
            }
        }
        let Some(end) = end else { break };
        let inner = &cell[start..end];
        let inner = match inner.strip_prefix(' ').and_then(|s| s.strip_suffix(' ')) {
            Some(trimmed) if !trimmed.is_empty() => trimmed,
            _ => inner,
        };
        spans.push(inner.to_owned());
        i = end + open;
    }
    spans
}

/// A message from `fixtures/messages/`, ready to publish raw.
pub struct RawMessage {
    /// The job id it carries (`None` when the fixture drops it).
    pub id: Option<String>,
    pub props: lapin::BasicProperties,
    pub body: Vec<u8>,
}

/// Builds the message a `messages/` file describes, carrying job id `id`. The file is a JSON
/// object: `task` (default `echo.echo`) names the Celery headers to start from; `headers` are
/// set over them (JSON `null` is AMQP void, a number with a fraction or exponent a double);
/// `drop_headers` removes some (dropping `id` drops the correlation id too); `content_type`
/// replaces `application/json`; the body is `body` (text) or `body_hex` (bytes); `about` is
/// for people.
pub fn message(path: &Path, id: &str) -> RawMessage {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let spec: Map<String, Value> = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{}: not a JSON object: {e}", path.display()));
    let field = |k: &str| spec.get(k).filter(|v| !v.is_null());
    let task = field("task").and_then(Value::as_str).unwrap_or("echo.echo");
    let (mut props, mut headers, _) =
        mediafarm::client::build_message(task, Map::new(), &mediafarm::SendOptions::default())
            .encode();
    headers.insert("id".into(), Value::String(id.to_owned()));
    props.correlation_id = Some(id.to_owned());
    let mut id = Some(id.to_owned());
    if let Some(extra) = field("headers").and_then(Value::as_object) {
        for (k, v) in extra {
            headers.insert(k.clone(), v.clone());
        }
    }
    for name in field("drop_headers")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
    {
        headers.remove(name);
        if name == "id" {
            props.correlation_id = None;
            id = None;
        }
    }
    if let Some(ct) = field("content_type").and_then(Value::as_str) {
        props.content_type = Some(ct.to_owned());
    }
    let body = match (field("body"), field("body_hex")) {
        (Some(Value::String(s)), None) => s.as_bytes().to_vec(),
        (None, Some(Value::String(h))) => {
            hex::decode(h).unwrap_or_else(|e| panic!("{}: body_hex: {e}", path.display()))
        }
        _ => panic!(
            "{}: give the body as `body` (text) or `body_hex`",
            path.display()
        ),
    };
    RawMessage {
        id,
        props: mediafarm::amqp::table::write_properties(&props, &headers),
        body,
    }
}

#[cfg(test)]
mod tests {
    use super::code_spans;

    #[test]
    fn code_spans_hold_backticks_when_fenced_by_more() {
        assert_eq!(code_spans("`a` and `b c`"), ["a", "b c"]);
        assert_eq!(code_spans("``no `id` header``"), ["no `id` header"]);
        assert_eq!(code_spans("`` `..` ``"), ["`..`"]);
        assert_eq!(code_spans("no spans"), Vec::<String>::new());
    }
}

//! Splits a byte stream into the JSON documents it holds, each handed out once a line ends
//! after it (or the input ends): what lets `mediafarm submit --workflow -` send one workflow
//! per document written to its stdin (one per line, or pretty-printed over many) on a
//! connection it opened once, instead of one process and one connection per workflow.

use serde_json::Value;

/// Why the stream cannot be read on.
#[derive(Debug, thiserror::Error)]
pub enum JsonStreamError {
    /// Bytes that no JSON document can start or continue with.
    #[error("document {number} is not valid JSON: {source}")]
    Invalid {
        number: usize,
        #[source]
        source: serde_json::Error,
    },
    /// The stream ended inside a document.
    #[error("the input ends inside document {number} ({bytes} bytes of it read)")]
    Truncated { number: usize, bytes: usize },
}

/// Buffers what has arrived and parses from where the last whole document ended.
#[derive(Debug, Default)]
pub struct JsonStream {
    pending: Vec<u8>,
    handed_out: usize,
    /// An unfinished document is parsed again once this many bytes are pending (twice what
    /// the last try had), at a line's end, or at the input's end: a large document arriving
    /// in many reads is parsed a few times, not once per read.
    next_try: usize,
}

impl JsonStream {
    pub fn new() -> JsonStream {
        JsonStream::default()
    }

    /// Adds bytes as they arrive (any split: inside a document, a string or a UTF-8 sequence).
    pub fn push(&mut self, bytes: &[u8]) {
        self.pending.extend_from_slice(bytes);
        if bytes.ends_with(b"\n") {
            self.next_try = 0;
        }
    }

    /// The input has ended: what is pending is parsed at the next call whatever its size.
    pub fn end(&mut self) {
        self.next_try = 0;
    }

    /// The next whole document, or `None` until more bytes arrive. A document is handed out
    /// at the latest when a line ends after it, or when the input ends ([`Self::end`]).
    pub fn next_document(&mut self) -> Result<Option<Value>, JsonStreamError> {
        if self.pending.len() < self.next_try {
            return Ok(None);
        }
        let mut documents =
            serde_json::Deserializer::from_slice(&self.pending).into_iter::<Value>();
        match documents.next() {
            Some(Ok(value)) => {
                let end = documents.byte_offset();
                self.pending.drain(..end);
                self.handed_out += 1;
                self.next_try = 0;
                Ok(Some(value))
            }
            Some(Err(e)) if e.is_eof() => {
                self.next_try = self.pending.len().saturating_mul(2);
                Ok(None)
            }
            None => {
                // Only whitespace so far: nothing to keep.
                self.pending.clear();
                Ok(None)
            }
            Some(Err(source)) => Err(JsonStreamError::Invalid {
                number: self.handed_out + 1,
                source,
            }),
        }
    }

    /// At the end of the input: an error when a document was left unfinished.
    pub fn finish(&self) -> Result<(), JsonStreamError> {
        if self.pending.iter().all(u8::is_ascii_whitespace) {
            return Ok(());
        }
        Err(JsonStreamError::Truncated {
            number: self.handed_out + 1,
            bytes: self.pending.len(),
        })
    }

    /// Documents handed out so far.
    pub fn documents(&self) -> usize {
        self.handed_out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn all(stream: &mut JsonStream) -> Vec<Value> {
        std::iter::from_fn(|| stream.next_document().unwrap()).collect()
    }

    #[test]
    fn documents_are_handed_out_whatever_the_split() {
        let text =
            "{\"task\": \"a\", \"kwargs\": {\"s\": \"é—\\\"}\"}}\n\n[1,\n 2]\n{\"chain\": []}";
        let want = vec![
            json!({"task": "a", "kwargs": {"s": "é—\"}"}}),
            json!([1, 2]),
            json!({"chain": []}),
        ];
        for chunk in [1, 2, 3, 5, 8, 64] {
            let mut stream = JsonStream::new();
            let mut got = Vec::new();
            for piece in text.as_bytes().chunks(chunk) {
                stream.push(piece);
                got.extend(all(&mut stream));
            }
            stream.end();
            got.extend(all(&mut stream));
            assert_eq!(got, want, "chunks of {chunk}");
            assert_eq!(stream.documents(), 3);
            stream.finish().unwrap();
        }
    }

    #[test]
    fn a_document_is_out_as_soon_as_a_line_ends_after_it() {
        let mut stream = JsonStream::new();
        stream.push(b"{\"a\":\n");
        assert_eq!(stream.next_document().unwrap(), None);
        stream.push(b" 1}\n");
        assert_eq!(stream.next_document().unwrap(), Some(json!({"a": 1})));
        stream.push(b"[2]\n");
        assert_eq!(stream.next_document().unwrap(), Some(json!([2])));
        assert_eq!(stream.next_document().unwrap(), None);
    }

    #[test]
    fn a_large_document_in_many_reads_is_parsed_a_few_times() {
        let members: Vec<Value> = (0..5000)
            .map(|i| json!({"task": "t", "kwargs": {"i": i}}))
            .collect();
        let doc = json!({ "group": members });
        let text = doc.to_string();
        let mut stream = JsonStream::new();
        let mut tries = 0;
        for piece in text.as_bytes().chunks(512) {
            stream.push(piece);
            if stream.pending.len() >= stream.next_try {
                tries += 1;
            }
            assert_eq!(stream.next_document().unwrap(), None);
        }
        stream.end();
        assert_eq!(stream.next_document().unwrap(), Some(doc));
        // Some 200 KB in 512-byte reads: about log2(400) tries, not 400.
        assert!(tries <= 12, "{tries} parses");
    }

    #[test]
    fn an_unfinished_or_invalid_document_is_an_error_naming_it() {
        let mut stream = JsonStream::new();
        stream.push(b"{\"a\": 1}\n{\"b\": [1, 2");
        stream.end();
        assert_eq!(all(&mut stream), vec![json!({"a": 1})]);
        match stream.finish() {
            Err(JsonStreamError::Truncated { number: 2, bytes }) => assert!(bytes > 0),
            other => panic!("{other:?}"),
        }

        let mut stream = JsonStream::new();
        stream.push(b"{\"a\": 1} {\"b\": tru}");
        stream.end();
        assert_eq!(stream.next_document().unwrap(), Some(json!({"a": 1})));
        let err = stream.next_document().unwrap_err();
        assert!(
            err.to_string().starts_with("document 2 is not valid JSON"),
            "{err}"
        );

        let mut stream = JsonStream::new();
        stream.push(b"  \n\t ");
        assert_eq!(stream.next_document().unwrap(), None);
        stream.finish().unwrap();
        assert_eq!(stream.documents(), 0);
    }
}

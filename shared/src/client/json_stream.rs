//! Splits a byte stream into the JSON documents it holds, each handed out as soon as its last
//! byte has arrived: what lets `mediafarm submit --workflow -` send one workflow per document
//! written to its stdin (one per line, or pretty-printed over many) on a connection it opened
//! once, instead of one process and one connection per workflow.

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
}

impl JsonStream {
    pub fn new() -> JsonStream {
        JsonStream::default()
    }

    /// Adds bytes as they arrive (any split: inside a document, a string or a UTF-8 sequence).
    pub fn push(&mut self, bytes: &[u8]) {
        self.pending.extend_from_slice(bytes);
    }

    /// The next whole document, or `None` until more bytes arrive. A document is re-parsed
    /// from its start on each call while it is incomplete, so callers push what a read
    /// returned (a pipe's chunk), not byte by byte.
    pub fn next_document(&mut self) -> Result<Option<Value>, JsonStreamError> {
        let mut documents =
            serde_json::Deserializer::from_slice(&self.pending).into_iter::<Value>();
        match documents.next() {
            Some(Ok(value)) => {
                let end = documents.byte_offset();
                self.pending.drain(..end);
                self.handed_out += 1;
                Ok(Some(value))
            }
            Some(Err(e)) if e.is_eof() => Ok(None),
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
        let rest = self
            .pending
            .iter()
            .filter(|b| !b.is_ascii_whitespace())
            .count();
        if rest == 0 {
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
    fn documents_are_handed_out_as_their_last_byte_arrives_whatever_the_split() {
        let text =
            "{\"task\": \"a\", \"kwargs\": {\"s\": \"é—\\\"}\"}}\n\n[1,\n 2]\n{\"chain\": []}  \n";
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
                let before = got.len();
                got.extend(all(&mut stream));
                // Handed out on the piece that closes it, not later.
                if got.len() > before {
                    assert!(
                        piece.contains(&b'}') || piece.contains(&b']'),
                        "chunks of {chunk}"
                    );
                }
            }
            assert_eq!(got, want, "chunks of {chunk}");
            assert_eq!(stream.documents(), 3);
            stream.finish().unwrap();
        }
    }

    #[test]
    fn an_unfinished_or_invalid_document_is_an_error_naming_it() {
        let mut stream = JsonStream::new();
        stream.push(b"{\"a\": 1}\n{\"b\": [1, 2");
        assert_eq!(all(&mut stream), vec![json!({"a": 1})]);
        match stream.finish() {
            Err(JsonStreamError::Truncated { number: 2, bytes }) => assert!(bytes > 0),
            other => panic!("{other:?}"),
        }

        let mut stream = JsonStream::new();
        stream.push(b"{\"a\": 1} {\"b\": tru}");
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

//! Celery's canvas as a worker carries it out: the `callbacks` (`link=`), `errbacks`
//! (`link_error=`) and `chain` a message embeds, decoded strictly (`signature.rs`, and
//! `nested.rs` for groups, chords and chains inside them), and the messages that carry a
//! workflow on after a job ends (`next.rs`): on SUCCESS every callback and the next chain step,
//! each receiving the job's return value unless immutable — a group or chord step sends its
//! members (a chord setting its header's size first), a chain its first step; on a final
//! FAILURE every errback, old style, with the failed job's id, and the same FAILURE stored for
//! every chain step after it, as Celery's `_fail_chain` does. A Rust errback reads what failed
//! with [`failure::failure_of`].
//!
//! A chord header (embed `chord`, header `group`) joins its chord in Redis once its result is
//! stored, as Celery's Redis backend does (`chord.rs`); the body (one task, a chain led by one,
//! a group or a chord) carries on any chain that followed the chord.
//!
//! What it promises: nothing in an embed is silently dropped. A canvas feature mediafarm does
//! not carry out (a chord whose body is a chain led by a group or chord, a group or chord
//! inside a group or a chord's header, an errback that is not one task, `chunks`, `xmap`,
//! `xstarmap`; see
//! `nested.rs`) is a [`CanvasError::Unsupported`] that the runtime turns into FAILURE before
//! the job runs.

pub mod chord;
pub mod failure;
pub mod nested;
pub mod next;
pub mod signature;

use serde_json::{Map, Value};

pub use chord::ChordPart;
pub use failure::{failure_of, ParentFailure};
pub use nested::ChordSig;
pub use next::{children_record, inherit_priority, on_failure, on_success, Next, Parent, Publish};
pub use signature::{Kind, Signature, SignatureOptions, When};

use crate::backend::result::ResultMeta;
use crate::protocol::{preview, TaskMessage};

/// Why a message's canvas cannot be carried out.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CanvasError {
    /// A value of the wrong type or shape: the message is broken.
    #[error("{0}")]
    Invalid(String),
    /// A well-formed canvas feature that mediafarm does not carry out.
    #[error("{0}")]
    Unsupported(String),
}

impl CanvasError {
    /// The exception type stored for the job this error ends.
    pub fn exc_type(&self) -> &'static str {
        match self {
            CanvasError::Invalid(_) => "InvalidMessage",
            CanvasError::Unsupported(_) => "UnsupportedCanvas",
        }
    }
}

/// What a message's embed asks for once the job ends.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Canvas {
    /// `link=`: sent on SUCCESS with the return value.
    pub callbacks: Vec<Signature>,
    /// `link_error=`: sent on a final FAILURE with the failed job's id.
    pub errbacks: Vec<Signature>,
    /// The chain's remaining steps, stored in reverse as Celery stores them: the last item runs
    /// next.
    pub chain: Vec<Signature>,
    /// This job is a chord header: its result joins the chord.
    pub chord: Option<ChordPart>,
}

impl Canvas {
    /// The FAILURE records for the chain steps after this job when it failed for good with
    /// `failed` (Celery's `mark_as_failure` → `_fail_chain`): `.get()` on the chain's last
    /// result then raises the same error instead of waiting for ever.
    pub fn chain_failures(&self, failed: &ResultMeta) -> Vec<ResultMeta> {
        let raw: Vec<Value> = self.chain.iter().map(|step| step.raw.clone()).collect();
        chord::fail_chain(&raw, &failed.result, failed.traceback.as_deref())
    }

    /// Decodes a message's canvas: its embed `{callbacks, errbacks, chain, chord}` and, for a
    /// chord header, its `group` and `group_index` headers.
    pub fn from_message(msg: &TaskMessage) -> Result<Canvas, CanvasError> {
        Canvas::decode(&msg.embed, msg.group.as_deref(), msg.group_index)
    }

    /// Decodes an embed alone; a `chord` in it needs the message's `group` header, so it is
    /// refused here ([`Canvas::from_message`] reads both).
    pub fn from_embed(embed: &Map<String, Value>) -> Result<Canvas, CanvasError> {
        Canvas::decode(embed, None, None)
    }

    fn decode(
        embed: &Map<String, Value>,
        group: Option<&str>,
        group_index: Option<i64>,
    ) -> Result<Canvas, CanvasError> {
        for (key, value) in embed {
            match key.as_str() {
                "callbacks" | "errbacks" | "chain" | "chord" => {}
                _ if value.is_null() => {}
                other => {
                    return Err(CanvasError::Unsupported(format!(
                        "embed `{other}` = {} is not a canvas part mediafarm knows \
                         (callbacks, errbacks, chain, chord)",
                        preview(value)
                    )))
                }
            }
        }
        let errbacks = signature::decode_list(embed.get("errbacks"), "embed `errbacks`")?;
        for (i, e) in errbacks.iter().enumerate() {
            single_task(e, &format!("embed `errbacks`[{i}]"), "errbacks")?;
        }
        // Stored in reverse; normalised in running order (nested chains spliced in, a group
        // followed by a task made a chord), as Celery's producer would have sent it.
        let mut chain = signature::decode_list(embed.get("chain"), "embed `chain`")?;
        if chain.iter().any(|s| s.kind != Kind::Task) {
            chain.reverse();
            chain = nested::normalize(chain, "embed `chain`")?;
            chain.reverse();
        }
        Ok(Canvas {
            callbacks: signature::decode_list(embed.get("callbacks"), "embed `callbacks`")?,
            errbacks,
            chain,
            chord: match embed.get("chord") {
                None | Some(Value::Null) => None,
                Some(body) => {
                    let body = Signature::decode(body, "embed `chord`")?;
                    nested::check_body(&body, "embed `chord` is")?;
                    Some(ChordPart::new(body, group, group_index)?)
                }
            },
        })
    }

    /// What a message refused before it ran still owes: its errbacks and its chord, each read
    /// on its own so one part mediafarm cannot carry does not cost the others. Callbacks and
    /// the chain are left out: they follow a success only.
    pub fn salvage(msg: &TaskMessage) -> Canvas {
        let embed = &msg.embed;
        Canvas {
            callbacks: Vec::new(),
            errbacks: signature::decode_list(embed.get("errbacks"), "embed `errbacks`")
                .unwrap_or_default()
                .into_iter()
                .filter(|e| e.kind == Kind::Task)
                .collect(),
            chain: Vec::new(),
            chord: embed
                .get("chord")
                .filter(|body| !body.is_null())
                .and_then(|body| Signature::decode(body, "embed `chord`").ok())
                .filter(|body| nested::check_body(body, "embed `chord` is").is_ok())
                .and_then(|body| ChordPart::new(body, msg.group.as_deref(), msg.group_index).ok()),
        }
    }

    /// Nothing to send whatever the outcome.
    pub fn is_empty(&self) -> bool {
        self.callbacks.is_empty() && self.errbacks.is_empty() && self.chain.is_empty()
    }
}

/// `sig` must be one task where only a task is carried out (`what`: "errbacks").
fn single_task(sig: &Signature, path: &str, what: &str) -> Result<(), CanvasError> {
    if sig.kind == Kind::Task {
        return Ok(());
    }
    Err(CanvasError::Unsupported(format!(
        "{path} is a {kind} (subtask_type {kind:?}): mediafarm runs {what} that are single \
         tasks, not a nested {kind}",
        kind = sig.kind.name()
    )))
}

#[cfg(test)]
pub(crate) mod tests;

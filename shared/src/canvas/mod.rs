//! Celery's canvas as a worker carries it out: the `callbacks` (`link=`), `errbacks`
//! (`link_error=`) and `chain` a message embeds, decoded strictly (`signature.rs`), and the
//! messages that carry a workflow on after a job ends (`next.rs`): on SUCCESS every callback
//! and the next chain step, each receiving the job's return value unless immutable; on a final
//! FAILURE every errback, old style, with the failed job's id. A Rust errback reads what failed
//! with [`failure::failure_of`].
//!
//! What it promises: nothing in an embed is silently dropped. A canvas feature mediafarm does
//! not carry out (a `chord` embed, a group or chain as a callback) is a
//! [`CanvasError::Unsupported`] that the runtime turns into FAILURE before the job runs.

pub mod failure;
pub mod next;
pub mod signature;

use serde_json::{Map, Value};

pub use failure::{failure_of, ParentFailure};
pub use next::{children_record, on_failure, on_success, Next, Parent, Publish};
pub use signature::{Signature, SignatureOptions, When};

use crate::protocol::preview;

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
}

impl Canvas {
    /// Decodes a message's embed `{callbacks, errbacks, chain, chord}`.
    pub fn from_embed(embed: &Map<String, Value>) -> Result<Canvas, CanvasError> {
        for (key, value) in embed {
            match key.as_str() {
                "callbacks" | "errbacks" | "chain" => {}
                "chord" if value.is_null() => {}
                "chord" => {
                    return Err(CanvasError::Unsupported(format!(
                        "this job is a chord header (embed `chord` = {}): chords are not \
                         supported by mediafarm yet, and running the header without ever \
                         running the body would drop it silently",
                        preview(value)
                    )))
                }
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
        Ok(Canvas {
            callbacks: signature::decode_list(embed.get("callbacks"), "embed `callbacks`")?,
            errbacks: signature::decode_list(embed.get("errbacks"), "embed `errbacks`")?,
            chain: signature::decode_list(embed.get("chain"), "embed `chain`")?,
        })
    }

    /// Nothing to send whatever the outcome.
    pub fn is_empty(&self) -> bool {
        self.callbacks.is_empty() && self.errbacks.is_empty() && self.chain.is_empty()
    }
}

#[cfg(test)]
mod tests;

//! The fuzz target `image_spec` and its corpus replay test run this: `image.transform` kwargs
//! as JSON bytes through the runtime's deserialisation, the checks made before the source is
//! read, and the output sizes each fit gives. No I/O. Not part of the supported API.

use mediafarm::storage::sources::Source;
use mediafarm::TaskError;

use crate::geometry::target_size;
use crate::spec::TransformArgs;
use crate::transform::{vet, Transform};

/// Source sizes the output geometry is worked out for (besides the crop's).
const SOURCE_SIZES: [(u32, u32); 3] = [(1, 1), (4000, 3000), (1, 65_535)];

/// The checked arguments and the source they name, or the job's clear refusal.
pub fn transform_kwargs(data: &[u8]) -> Result<(TransformArgs, Source), TaskError> {
    let args = mediafarm::fuzzing::kwargs::<Transform>(data)?;
    let source = vet(&args)?;
    let crop = args.crop.map(|c| c.size());
    for full in SOURCE_SIZES.into_iter().chain(crop) {
        for o in &args.outputs {
            let (w, h) = target_size(full, o.fit, o.width, o.height);
            assert!(
                w >= 1 && h >= 1,
                "output size {w}x{h} for a {full:?} source"
            );
        }
    }
    Ok((args, source))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    /// Files whose outcome is pinned: (file, text the error must contain); `None`: accepted.
    const EXPECTED: &[(&str, Option<&str>)] = &[
        ("seeds/readme-avatars", None),
        ("seeds/all-options", None),
        ("seeds/web-source", None),
        ("seeds/file-source", None),
        (
            "seeds/bad-width",
            Some("kwarg `outputs[0].width` is not valid"),
        ),
        ("seeds/bad-key", Some("`..` segment")),
    ];

    #[test]
    fn image_spec_corpus_replays() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/fuzz/image_spec");
        mediafarm::fuzzing::replay_expecting(&dir, EXPECTED, |data| {
            transform_kwargs(data).err().map(|e| e.to_string())
        });
    }
}

//! The fuzz target `image_spec` and its corpus replay test run this: `image.transform` kwargs
//! as JSON bytes through the runtime's deserialisation, the checks made before the source is
//! read, and the output sizes each fit gives. No I/O. Not part of the supported API.

use mediafarm::storage::sources::Source;
use mediafarm::TaskError;

use crate::geometry::target_size;
use crate::heif_items::{Coded, Layout, Plan, Unhandled};
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

/// The `heif_items` target: a HEIF file's boxes read into the plan for decoding its primary
/// image with libde265 (`heif_items.rs`), or the reason it is left to libheif. Every byte
/// range of a plan lies within `data` (checked here, so the fuzzer finds a range that does
/// not), and so does its crop within the picture. The size as shown (`heif_items::shown_size`)
/// is read too, and agrees with the plan's whenever there is one.
pub fn heif_items(data: &[u8]) -> Result<Plan, Unhandled> {
    let shown = crate::heif_items::shown_size(data);
    let plan = crate::heif_items::plan(data)?;
    assert_eq!(
        shown,
        Ok(plan.shown()),
        "the size as shown disagrees with the plan"
    );
    let crop = plan.crop;
    assert!(
        crop.width >= 1
            && crop.height >= 1
            && u64::from(crop.x) + u64::from(crop.width) <= u64::from(plan.width)
            && u64::from(crop.y) + u64::from(crop.height) <= u64::from(plan.height),
        "the crop {crop:?} leaves the {}x{} picture",
        plan.width,
        plan.height
    );
    let coded: Vec<&Coded> = match &plan.layout {
        Layout::Single(c) => vec![c],
        Layout::Grid { tiles, .. } => tiles.iter().collect(),
    };
    for c in coded {
        for r in c.extents.iter().chain(&c.config_nals) {
            assert!(
                r.start <= r.end && r.end <= data.len(),
                "{r:?} outside the file"
            );
        }
    }
    Ok(plan)
}

/// Most pixels a source may have with the default settings (`image_max_pixels`), checked from
/// the header before any decode, as `decode.rs` does.
const MAX_PIXELS: u64 = 50_000_000;

/// The `progressive_jpeg` target: the first byte picks the scale (`byte % 4 + 1` eighths), the
/// rest is a JPEG given to the compact progressive decoder (`lowres.rs`) when its header (read
/// by libjpeg, as the worker reads it) is within the default pixel limit. `None`: left to
/// libjpeg. A picture it returns has the scaled size and all its pixels.
pub fn progressive_jpeg(data: &[u8]) -> Option<(u32, u32)> {
    let (&pick, file) = data.split_first()?;
    let eighths = pick % 4 + 1;
    let header = crate::jpeg::header(file).ok()?;
    if u64::from(header.width) * u64::from(header.height) > MAX_PIXELS {
        return None;
    }
    let rgb = crate::lowres::decode(file, eighths)?;
    let scaled = |side: u32| (u64::from(side) * u64::from(eighths)).div_ceil(8);
    assert_eq!(
        (u64::from(rgb.width), u64::from(rgb.height)),
        (scaled(header.width), scaled(header.height)),
        "the picture's size is not the scaled size libjpeg reads from the header"
    );
    assert_eq!(
        rgb.pixels.len() as u64,
        u64::from(rgb.width) * u64::from(rgb.height) * 3
    );
    Some((rgb.width, rgb.height))
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

    /// HEIF files for the `heif_items` target: `None` for a plan, else the reason it is left
    /// to libheif.
    const HEIF_EXPECTED: &[(&str, Option<&str>)] = &[
        ("seeds/halves-64x48.heic", None),
        ("seeds/grad-10bit-64x48.heic", None),
        ("seeds/grid-2x2-turned.heic", None),
        ("seeds/clap-turned.heic", None),
        (
            "seeds/clap-outside.heic",
            Some("a clean aperture outside the picture"),
        ),
        ("seeds/alpha-96x64.avif", Some("auxiliary image")),
        (
            "seeds/halves-64x48.avif",
            Some("an essential property it does not know"),
        ),
        ("seeds/no-hvcc.heic", Some("no hvcC")),
        ("seeds/huge-ispe.heic", Some("disagrees with ispe")),
        ("seeds/truncated-meta.heic", Some("cut short")),
        // Found by `heif_items` (2026-12-02): a grid of sizes near 2^32, whose area bound
        // overflowed u64 (a panic with overflow checks; in release a spurious refusal).
        ("crashes/grid-area-overflow.heic", Some("not an HEVC image")),
    ];

    #[test]
    fn progressive_jpeg_corpus_replays() {
        let dir =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/fuzz/progressive_jpeg");
        let expected: &[(&str, Option<&str>)] = &[
            ("seeds/444-64x48-3of8", None),
            ("seeds/420-61x37-half", None),
            ("seeds/422-50x40-quarter", None),
            ("seeds/grey-40x30-eighth", None),
            // Found by `progressive_jpeg` (2026-12-02): FF 00 between two segments, which
            // libjpeg skips as garbage and the decoder's walk read as a segment with a length:
            // the two found different frame headers (a 24×20 picture for libjpeg's 24×18).
            (
                "crashes/stuffed-zero-between-segments",
                Some("left to libjpeg"),
            ),
        ];
        mediafarm::fuzzing::replay_expecting(&dir, expected, |data| {
            progressive_jpeg(data)
                .is_none()
                .then(|| "left to libjpeg".to_owned())
        });
    }

    #[test]
    fn heif_items_corpus_replays() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/fuzz/heif_items");
        mediafarm::fuzzing::replay_expecting(&dir, HEIF_EXPECTED, |data| {
            heif_items(data).err().map(|e| e.0.to_string())
        });
    }

    #[test]
    fn image_spec_corpus_replays() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/fuzz/image_spec");
        mediafarm::fuzzing::replay_expecting(&dir, EXPECTED, |data| {
            transform_kwargs(data).err().map(|e| e.to_string())
        });
    }
}

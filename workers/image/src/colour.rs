//! Colour profiles: pixels described by an embedded ICC profile (Display P3, Adobe RGB, a
//! camera's own…) converted to sRGB, which is what browsers assume for untagged images, so the
//! outputs — stripped of metadata — show the same colours as the source.

use std::sync::Arc;

use image::DynamicImage;
use moxcms::{ColorProfile, DataColorSpace, Layout, Transform8BitExecutor, TransformOptions};

/// Pixels converted per call: a small scratch buffer instead of a second copy of the image.
const PIXELS_PER_STEP: usize = 16_384;

/// The conversion from one source's RGB profile to sRGB, for RGB and RGBA pixels.
pub struct ToSrgb {
    rgb: Arc<Transform8BitExecutor>,
    rgba: Arc<Transform8BitExecutor>,
}

impl ToSrgb {
    /// `None` when there is nothing to do or it cannot be done: an unreadable profile, or one
    /// that does not describe RGB (a grayscale or CMYK profile; those pixels were already
    /// turned into RGB without it). Such a profile is ignored, as browsers ignore it.
    pub fn from_icc(icc: &[u8]) -> Option<ToSrgb> {
        let source = match ColorProfile::new_from_slice(icc) {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(error = %e, "ignoring an unreadable ICC profile");
                return None;
            }
        };
        if source.color_space != DataColorSpace::Rgb {
            return None;
        }
        let srgb = ColorProfile::new_srgb();
        let make = |layout| {
            source
                .create_transform_8bit(layout, &srgb, layout, TransformOptions::default())
                .map_err(
                    |e| tracing::warn!(error = %e, "ignoring an ICC profile moxcms cannot use"),
                )
                .ok()
        };
        Some(ToSrgb {
            rgb: make(Layout::Rgb)?,
            rgba: make(Layout::Rgba)?,
        })
    }

    /// Converts RGB8 or RGBA8 pixels in place (alpha unchanged); other layouts are left alone.
    pub fn apply(&self, img: &mut DynamicImage) {
        let (executor, channels, pixels): (_, usize, &mut [u8]) = match img {
            DynamicImage::ImageRgb8(buf) => (&self.rgb, 3, buf),
            DynamicImage::ImageRgba8(buf) => (&self.rgba, 4, buf),
            _ => return,
        };
        // The conversion is per pixel, so any run of whole pixels can go at once.
        let step = PIXELS_PER_STEP * channels;
        let mut scratch = vec![0u8; step.min(pixels.len())];
        for chunk in pixels.chunks_mut(step) {
            let src = &mut scratch[..chunk.len()];
            src.copy_from_slice(chunk);
            if let Err(e) = executor.transform(src, chunk) {
                tracing::warn!(error = %e, "colour conversion failed; pixels left as they were");
                chunk.copy_from_slice(src);
                return;
            }
        }
    }
}

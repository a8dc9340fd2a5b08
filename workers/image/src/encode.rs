//! Encoding one output: JPEG (libjpeg-turbo, progressive 4:2:0), PNG, WebP (lossy through
//! libwebp, or lossless) and AVIF (rav1e, with a speed setting), each with the metadata its
//! format can carry when asked to keep it, and `max_bytes` met by lowering the quality.

use image::{DynamicImage, ExtendedColorType, ImageEncoder};
use mediafarm::TaskError;

use crate::jpeg;
use crate::spec::{invalid, Format, OutputSpec};
use crate::webp_meta;

pub(crate) const DEFAULT_QUALITY: u8 = 80;
/// The lowest quality `max_bytes` may push an output to.
const MIN_QUALITY: u8 = 30;
/// rav1e's speed 1–10: 7 encodes a 1280 px photo in well under a second on one core with
/// files within a few per cent of speed 4's.
const DEFAULT_AVIF_SPEED: u8 = 7;
/// WebP's largest side.
const WEBP_MAX_SIDE: u32 = 16_383;

/// Metadata copied from the source into an output (only when `strip_metadata` is false).
#[derive(Default, Clone, Copy)]
pub struct Metadata<'a> {
    pub icc: Option<&'a [u8]>,
    pub exif: Option<&'a [u8]>,
}

fn failed(e: impl std::fmt::Display) -> TaskError {
    TaskError::permanent("EncodeError", e.to_string())
}

/// Encodes `img` (8-bit RGB or RGBA; already flattened for JPEG) as `spec` asks.
pub fn encode(
    img: &DynamicImage,
    spec: &OutputSpec,
    meta: Metadata<'_>,
) -> Result<Vec<u8>, TaskError> {
    match spec.format {
        Format::Png => {
            let mut data = Vec::new();
            let mut encoder = image::codecs::png::PngEncoder::new(&mut data);
            if let Some(icc) = meta.icc {
                encoder.set_icc_profile(icc.to_vec()).map_err(failed)?;
            }
            if let Some(exif) = meta.exif {
                encoder.set_exif_metadata(exif.to_vec()).map_err(failed)?;
            }
            img.write_with_encoder(encoder).map_err(failed)?;
            within_lossless(data, spec)
        }
        Format::Webp if spec.lossless => {
            check_webp_size(img)?;
            let mut data = Vec::new();
            img.write_with_encoder(image::codecs::webp::WebPEncoder::new_lossless(&mut data))
                .map_err(failed)?;
            within_lossless(
                webp_meta::with_metadata(data, size(img), img.color().has_alpha(), meta)?,
                spec,
            )
        }
        Format::Webp => {
            check_webp_size(img)?;
            lowering_quality(spec, |q| {
                let pixels = match img {
                    DynamicImage::ImageRgba8(rgba) => {
                        webp::Encoder::from_rgba(rgba.as_raw(), img.width(), img.height())
                    }
                    DynamicImage::ImageRgb8(rgb) => {
                        webp::Encoder::from_rgb(rgb.as_raw(), img.width(), img.height())
                    }
                    _ => return Err(failed("WebP input must be 8-bit RGB or RGBA")),
                };
                let data = pixels
                    .encode_simple(false, f32::from(q))
                    .map_err(|e| failed(format!("libwebp: {e:?}")))?;
                webp_meta::with_metadata(data.to_vec(), size(img), img.color().has_alpha(), meta)
            })
        }
        Format::Jpeg => {
            let rgb = match img {
                DynamicImage::ImageRgb8(rgb) => rgb,
                _ => return Err(failed("JPEG input must be flattened to 8-bit RGB")),
            };
            let meta = jpeg::Metadata {
                icc: meta.icc,
                exif: meta.exif,
            };
            let progressive = spec.progressive.unwrap_or(true);
            lowering_quality(spec, |q| {
                jpeg::encode_rgb(
                    rgb.as_raw(),
                    rgb.width(),
                    rgb.height(),
                    q,
                    progressive,
                    &meta,
                )
                .map_err(|e| {
                    if rgb.width() > 65_535 || rgb.height() > 65_535 {
                        invalid("OutputTooLarge", e.to_string())
                    } else {
                        failed(e)
                    }
                })
            })
        }
        Format::Avif => {
            let speed = spec.speed.unwrap_or(DEFAULT_AVIF_SPEED);
            let color = match img {
                DynamicImage::ImageRgba8(_) => ExtendedColorType::Rgba8,
                DynamicImage::ImageRgb8(_) => ExtendedColorType::Rgb8,
                _ => return Err(failed("AVIF input must be 8-bit RGB or RGBA")),
            };
            lowering_quality(spec, |q| {
                let mut data = Vec::new();
                let mut encoder =
                    image::codecs::avif::AvifEncoder::new_with_speed_quality(&mut data, speed, q)
                        .with_num_threads(Some(1));
                if let Some(exif) = meta.exif {
                    encoder.set_exif_metadata(exif.to_vec()).map_err(failed)?;
                }
                encoder
                    .write_image(img.as_bytes(), img.width(), img.height(), color)
                    .map_err(failed)?;
                Ok(data)
            })
        }
    }
}

fn size(img: &DynamicImage) -> (u32, u32) {
    (img.width(), img.height())
}

fn check_webp_size(img: &DynamicImage) -> Result<(), TaskError> {
    if img.width() > WEBP_MAX_SIDE || img.height() > WEBP_MAX_SIDE {
        return Err(invalid(
            "OutputTooLarge",
            format!("WebP sides are at most {WEBP_MAX_SIDE} pixels"),
        ));
    }
    Ok(())
}

/// The qualities `max_bytes` may lower an output asked at `asked` to, highest first: 10 lower
/// at a time, down to [`MIN_QUALITY`] (empty when `asked` is that low already). Animated
/// outputs search the same ladder (`anim/mod.rs`).
pub(crate) fn quality_ladder(asked: u8) -> Vec<u8> {
    let mut ladder = Vec::new();
    let mut quality = asked;
    while quality > MIN_QUALITY {
        quality = quality.saturating_sub(10).max(MIN_QUALITY);
        ladder.push(quality);
    }
    ladder
}

/// Encodes at the asked quality, then 10 lower at a time while over `max_bytes`.
fn lowering_quality(
    spec: &OutputSpec,
    mut encode_at: impl FnMut(u8) -> Result<Vec<u8>, TaskError>,
) -> Result<Vec<u8>, TaskError> {
    let asked = spec.quality.unwrap_or(DEFAULT_QUALITY);
    let Some(max) = spec.max_bytes else {
        return encode_at(asked);
    };
    let mut over = (asked, 0);
    for quality in std::iter::once(asked).chain(quality_ladder(asked)) {
        let data = encode_at(quality)?;
        if data.len() as u64 <= max {
            return Ok(data);
        }
        over = (quality, data.len());
    }
    Err(invalid(
        "OutputTooLarge",
        format!(
            "{} bytes at {} quality {}, still over max_bytes {max}",
            over.1,
            spec.format.name(),
            over.0
        ),
    ))
}

fn within_lossless(data: Vec<u8>, spec: &OutputSpec) -> Result<Vec<u8>, TaskError> {
    if let Some(max) = spec.max_bytes.filter(|max| data.len() as u64 > *max) {
        return Err(invalid(
            "OutputTooLarge",
            format!(
                "{} bytes, over max_bytes {max}; {} output is lossless, so quality cannot be lowered",
                data.len(),
                if spec.format == Format::Png { "PNG" } else { "lossless WebP" }
            ),
        ));
    }
    Ok(data)
}

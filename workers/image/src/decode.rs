//! Reading a source once: its type and pixel count checked from the header before any pixel
//! is decoded, JPEGs through libjpeg-turbo at the smallest IDCT scale every output allows
//! (shrink-on-load), PNG, GIF and WebP streamed and shrunk while they decode (`streamed.rs`),
//! HEIC and AVIF through libheif (`heif.rs`), what none of these covers (interlaced PNG,
//! animated WebP, CMYK JPEG) through `image`; the EXIF orientation read (and returned, not
//! applied: `orient.rs` turns each output after its resize); the ICC profile and EXIF block
//! kept for the outputs.
//!
//! Each path reserves from the worker's decode budget (`budget.rs`) what it will hold: its
//! decoder's buffers and the decoded picture, and the resize's copies of it ([`resize_bytes`]).

use std::io::Cursor;

use image::metadata::Orientation;
use image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader, Limits, RgbImage};
use mediafarm::TaskError;

use crate::budget::{reserve, Reservation};
use crate::orient::swap_size;
use crate::shrink::{self, factor_for};
use crate::spec::{invalid, SourceInfo};
use crate::{heif, jpeg, lowres, streamed};

/// A decoded source, 8-bit RGB or RGBA, as stored (not yet turned by its orientation).
pub struct Decoded {
    pub image: DynamicImage,
    /// The full size as shown (after orientation), whatever scale the pixels were decoded at.
    pub info: SourceInfo,
    /// The EXIF orientation still to apply (when `auto_orient`), to each finished output.
    pub orientation: Option<Orientation>,
    pub icc: Option<Vec<u8>>,
    /// The EXIF block (TIFF header onwards), its orientation reset when it was applied.
    pub exif: Option<Vec<u8>>,
    /// This job's share of the worker's decode-memory budget, held while the image is.
    pub reservation: Reservation,
}

/// Decodes `data`. `share_needed` gets the full size as shown and returns the largest share
/// of it (0–1, per side) any output needs: JPEGs are decoded at 1/2, 1/4 or 1/8 scale when
/// that is enough. `extra` gets the same size and returns the bytes the job holds besides the
/// decode and the resize (a smart crop's map, a watermark's copies), reserved with them.
pub fn decode(
    data: &[u8],
    auto_orient: bool,
    max_pixels: u64,
    share_needed: impl Fn((u32, u32)) -> f64,
    extra: impl Fn((u32, u32)) -> u64,
) -> Result<Decoded, TaskError> {
    if data.is_empty() {
        return Err(invalid("InvalidImage", "the source is empty (0 bytes)"));
    }
    if let Some(kind) = heif::sniff(data) {
        return decode_heif(data, kind, max_pixels, share_needed, extra);
    }
    let format = sniff(data)?;
    if format == ImageFormat::Jpeg {
        if let Some(decoded) = decode_jpeg(data, auto_orient, max_pixels, &share_needed, &extra)? {
            return Ok(decoded);
        }
    }
    decode_other(data, format, auto_orient, max_pixels, share_needed, extra)
}

/// Bytes the resize holds besides the decoded picture, for a decoded picture of `decoded`
/// pixels whose largest output is `share` (per side) of `full`: `fast_image_resize`'s
/// premultiplied copy of an alpha picture, its one-pass intermediate, and the output with the
/// copies finishing it makes (turned, flattened or padded).
pub fn resize_bytes(decoded: (u32, u32), alpha: bool, full: (u32, u32), share: f64) -> u64 {
    let channels: u64 = if alpha { 4 } else { 3 };
    let (dw, dh) = (u64::from(decoded.0), u64::from(decoded.1));
    let out = |side: u32| ((f64::from(side) * share.clamp(0.0, 1.0)).ceil() as u64).max(1);
    let (ow, oh) = (out(full.0), out(full.1));
    let premultiplied = if alpha { dw * dh * channels } else { 0 };
    let intermediate = (ow * dh).max(dw * oh) * channels;
    premultiplied + intermediate + 3 * ow * oh * channels
}

fn sniff(data: &[u8]) -> Result<ImageFormat, TaskError> {
    match image::guess_format(data) {
        Ok(f @ (ImageFormat::Jpeg | ImageFormat::Png | ImageFormat::Gif | ImageFormat::WebP)) => {
            Ok(f)
        }
        Ok(other) => Err(invalid(
            "UnsupportedImage",
            format!("{other:?} sources are not accepted; send JPEG, PNG, GIF, WebP, HEIC or AVIF"),
        )),
        Err(_) => Err(invalid(
            "UnsupportedImage",
            format!(
                "the source is not a JPEG, PNG, GIF, WebP, HEIC or AVIF image (first bytes: {})",
                first_bytes(data)
            ),
        )),
    }
}

/// At most 16 leading bytes as hex, for a person to recognise the format by its magic number;
/// followed by the text when every byte of it is printable ASCII (an HTML error page, say).
/// Binary data printed as text was unreadable mojibake.
fn first_bytes(data: &[u8]) -> String {
    const SHOWN: usize = 16;
    let head = &data[..data.len().min(SHOWN)];
    let mut text = head
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ");
    if data.len() > SHOWN {
        text.push_str(" …");
    }
    if head.iter().all(|b| (0x20..0x7f).contains(b)) {
        text.push_str(&format!(", \"{}\"", String::from_utf8_lossy(head)));
    }
    text
}

pub(crate) fn check_pixels(width: u32, height: u32, max_pixels: u64) -> Result<(), TaskError> {
    let pixels = u64::from(width) * u64::from(height);
    if pixels > max_pixels {
        return Err(invalid(
            "SourceTooLarge",
            format!(
                "source image is {width}×{height} ({:.1} MP); the limit is {:.1} MP \
                 (image_max_src_pixels)",
                pixels as f64 / 1e6,
                max_pixels as f64 / 1e6
            ),
        ));
    }
    Ok(())
}

/// The orientation to apply, and the EXIF block as the outputs should carry it.
pub(crate) fn orientation(
    exif: Option<Vec<u8>>,
    auto_orient: bool,
) -> (Option<Orientation>, Option<Vec<u8>>) {
    match exif {
        Some(mut block) if auto_orient => {
            let o = Orientation::remove_from_exif_chunk(&mut block);
            (o, Some(block))
        }
        other => (None, other),
    }
}

/// The smallest IDCT scale (in eighths, any of 1/8 … 8/8) that still leaves every output its
/// full detail. libjpeg scales by any M/8, not only by powers of two: a 4224×3168 source whose
/// largest output is 1280 wide decodes at 3/8 (1584 px) instead of 1/2 (2112 px), 44 % fewer
/// pixels to convert and resize (BENCHMARKS.md, "Where an image job's CPU goes").
///
/// `share` is the largest output side over the source side (`size`, either frame), so an
/// output has at most `floor(share × side)` pixels on each side; libjpeg's scaled side is
/// `ceil(side × M / 8)`. Comparing those, rather than `share` with `M / 8`, keeps a rounded-up
/// height from costing a whole eighth: a 2560×3837 portrait whose 1280-wide output is 1919
/// tall (share 0.50013) decodes at 4/8 (1280×1919), not 5/8 (1600×2399), 36 % fewer pixels.
fn eighths_for(share: f64, size: (u32, u32)) -> u8 {
    // A hair of tolerance so that an exact share (640 of 5120 = 1/8) is not rounded up.
    let needed = |side: u32| (share * f64::from(side) + 1e-6).floor();
    let scaled = |side: u32, m: u32| f64::from((side * m).div_ceil(8));
    (1..=8u8)
        .find(|&m| {
            let m = u32::from(m);
            scaled(size.0, m) >= needed(size.0) && scaled(size.1, m) >= needed(size.1)
        })
        .unwrap_or(8)
}

/// `None` for CMYK/YCCK JPEGs, which `image` decodes (with the Adobe inversion).
fn decode_jpeg(
    data: &[u8],
    auto_orient: bool,
    max_pixels: u64,
    share_needed: impl Fn((u32, u32)) -> f64,
    extra: impl Fn((u32, u32)) -> u64,
) -> Result<Option<Decoded>, TaskError> {
    let cannot =
        |e: jpeg::JpegError| invalid("InvalidImage", format!("cannot decode the jpeg: {e}"));
    let header = jpeg::header(data)
        .map_err(|e| invalid("InvalidImage", format!("cannot read the jpeg header: {e}")))?;
    check_pixels(header.width, header.height, max_pixels)?;
    if header.cmyk {
        return Ok(None);
    }
    let (orient, exif) = orientation(header.exif, auto_orient);
    let full = swap_size(orient, (header.width, header.height));
    let share = share_needed(full);
    let eighths = eighths_for(share, (header.width, header.height));
    // libjpeg's scaled size: ceil(side × M / 8).
    let scaled = |side: u32| (u64::from(side) * u64::from(eighths)).div_ceil(8);
    let pixels = scaled(header.width) * scaled(header.height) * 3;
    // A progressive source at up to 1/2 scale: the compact decoder keeps the n×n of each
    // block's 64 coefficients the scaled picture is made of (and a bit of history for each);
    // libjpeg, if it cannot, keeps them all.
    let light = header.progressive && eighths <= lowres::MOST_EIGHTHS;
    let coefficients = match (header.progressive, light) {
        (false, _) => 0,
        (true, true) => {
            lowres::held_bytes(header.coefficient_bytes, eighths, data.len() as u64, pixels)
        }
        (true, false) => header.coefficient_bytes,
    };
    let decoded = (scaled(header.width) as u32, scaled(header.height) as u32);
    let resize = resize_bytes(decoded, false, (header.width, header.height), share) + extra(full);
    let mut reservation = reserve(pixels + coefficients + resize);
    let low = if light {
        lowres::decode(data, eighths)
    } else {
        None
    };
    let rgb = match low {
        Some(rgb) => rgb,
        None => {
            if light {
                drop(reservation);
                reservation = reserve(pixels + header.coefficient_bytes + resize);
            }
            let Some(rgb) = jpeg::decode_rgb(data, eighths).map_err(cannot)? else {
                return Ok(None);
            };
            rgb
        }
    };
    let image = RgbImage::from_raw(rgb.width, rgb.height, rgb.pixels)
        .map(DynamicImage::ImageRgb8)
        .ok_or_else(|| invalid("InvalidImage", "cannot decode the jpeg: short pixel data"))?;
    Ok(Some(Decoded {
        image,
        orientation: orient,
        info: SourceInfo {
            width: full.0,
            height: full.1,
            format: "jpeg".into(),
            bytes: data.len() as u64,
        },
        icc: header.icc,
        exif,
        reservation,
    }))
}

/// HEIC and AVIF: the header (size as shown, alpha, bit depth) checked before the primary
/// image is decoded — by libde265 directly for the HEVC images `heif_items.rs` reads, else by
/// libheif. The rotation and mirroring boxes are always applied, whatever `auto_orient` says:
/// by libheif as it decodes, or, after libde265, to each output as an EXIF orientation is.
fn decode_heif(
    data: &[u8],
    kind: heif::Kind,
    max_pixels: u64,
    share_needed: impl Fn((u32, u32)) -> f64,
    extra: impl Fn((u32, u32)) -> u64,
) -> Result<Decoded, TaskError> {
    let name = kind.name();
    let file = heif::Heif::open(data).map_err(|e| {
        invalid(
            "InvalidImage",
            format!("cannot read the {name} header: {e}"),
        )
    })?;
    let header = file.header();
    if header.width == 0 || header.height == 0 {
        return Err(invalid(
            "InvalidImage",
            format!("cannot read the {name} header: its primary image has no size"),
        ));
    }
    check_pixels(header.width, header.height, max_pixels)?;
    let full = (header.width, header.height);
    let share = share_needed(full);
    let factor = factor_for(share);
    let decoded = shrink::shrunk_size(full, factor);
    let resize = resize_bytes(decoded, header.alpha, full, share) + extra(full);
    let held = file.decode_bytes() + shrink::held_bytes(full, factor, header.alpha);
    let reservation = reserve(held + resize);
    let image = file
        .decode(factor)
        .map_err(|e| invalid("InvalidImage", format!("cannot decode the {name}: {e}")))?;
    Ok(Decoded {
        info: SourceInfo {
            width: header.width,
            height: header.height,
            format: name.into(),
            bytes: data.len() as u64,
        },
        icc: file.icc(),
        exif: file.exif(),
        image,
        orientation: file.orientation(),
        reservation,
    })
}

fn decode_other(
    data: &[u8],
    format: ImageFormat,
    auto_orient: bool,
    max_pixels: u64,
    share_needed: impl Fn((u32, u32)) -> f64,
    extra: impl Fn((u32, u32)) -> u64,
) -> Result<Decoded, TaskError> {
    let name = format!("{format:?}").to_lowercase();
    let cannot =
        |e: image::ImageError| invalid("InvalidImage", format!("cannot decode the {name}: {e}"));
    let mut reader = ImageReader::with_format(Cursor::new(data), format);
    let (width, height) = ImageReader::with_format(Cursor::new(data), format)
        .into_dimensions()
        .map_err(|e| {
            invalid(
                "InvalidImage",
                format!("cannot read the {name} header: {e}"),
            )
        })?;
    check_pixels(width, height, max_pixels)?;
    let mut limits = Limits::default();
    // Room for the decoded image at 16 bits per channel with alpha, and decoder scratch.
    let pixels = u64::from(width) * u64::from(height);
    limits.max_alloc = Some(pixels.saturating_mul(8).saturating_add(64 << 20));
    reader.limits(limits);
    // `image` reads the metadata (its decoders parse the headers only until asked for pixels).
    let mut decoder = reader.into_decoder().map_err(cannot)?;
    let icc = decoder.icc_profile().ok().flatten();
    let exif = decoder.exif_metadata().ok().flatten();
    let (orient, exif) = orientation(exif, auto_orient);
    let full = swap_size(orient, (width, height));
    let share = share_needed(full);
    let info = SourceInfo {
        width: full.0,
        height: full.1,
        format: name.clone(),
        bytes: data.len() as u64,
    };
    if format != ImageFormat::Jpeg {
        if let Some(plan) = streamed::plan(data, format, (width, height), factor_for(share)) {
            drop(decoder);
            let resize =
                resize_bytes(plan.decoded_size(), plan.alpha, (width, height), share) + extra(full);
            let reservation = reserve(plan.bytes + resize);
            let image = streamed::decode(data, &plan)
                .map_err(|e| invalid("InvalidImage", format!("cannot decode the {name}: {e}")))?;
            return Ok(Decoded {
                image,
                info,
                orientation: orient,
                icc,
                exif,
                reservation,
            });
        }
    }
    // The whole picture, up to 8 bytes a pixel (16-bit RGBA) and its 8-bit copy, and the
    // resize's copies of it.
    let alpha = decoder.color_type().has_alpha();
    let resize = resize_bytes((width, height), alpha, (width, height), share) + extra(full);
    let reservation = reserve(pixels.saturating_mul(12).saturating_add(resize));
    // GIF and animated WebP: the first frame.
    let image = DynamicImage::from_decoder(decoder).map_err(cannot)?;
    // 8 bits per channel, RGB or RGBA: grayscale, 16-bit and palette sources alike (an
    // 8-bit RGB(A) picture is kept as it is, not copied).
    let image = match image {
        DynamicImage::ImageRgb8(_) | DynamicImage::ImageRgba8(_) => image,
        other if other.color().has_alpha() => DynamicImage::ImageRgba8(other.into_rgba8()),
        other => DynamicImage::ImageRgb8(other.into_rgb8()),
    };
    Ok(Decoded {
        info,
        image,
        orientation: orient,
        icc,
        exif,
        reservation,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_sources_show_their_first_bytes_as_hex() {
        // An MPEG program stream: binary, so hex only.
        let mpeg = [0x00, 0x00, 0x01, 0xba, 0x47, 0x49, 0xff, 0x10, 0x80];
        assert_eq!(first_bytes(&mpeg), "00 00 01 ba 47 49 ff 10 80");
        // More than 16 bytes: the first 16 and an ellipsis; printable, so the text too.
        assert_eq!(
            first_bytes(b"<!DOCTYPE html><html>"),
            "3c 21 44 4f 43 54 59 50 45 20 68 74 6d 6c 3e 3c …, \"<!DOCTYPE html><\""
        );
        let err = sniff(&mpeg).err().unwrap();
        assert_eq!(err.exc_type, "UnsupportedImage");
        assert!(
            err.message
                .ends_with("(first bytes: 00 00 01 ba 47 49 ff 10 80)"),
            "{}",
            err.message
        );
    }

    #[test]
    fn the_idct_scale_keeps_the_detail_asked_for() {
        let size = (5120, 2880);
        assert_eq!(eighths_for(1.0, size), 8);
        assert_eq!(eighths_for(0.9, size), 8);
        assert_eq!(eighths_for(0.51, size), 5);
        assert_eq!(eighths_for(0.5, size), 4);
        // 1280 of 4224: 3/8 (1584 px) still covers it.
        assert_eq!(eighths_for(1280.0 / 4224.0, (4224, 3168)), 3);
        assert_eq!(eighths_for(0.25, size), 2);
        assert_eq!(eighths_for(0.2, size), 2);
        assert_eq!(eighths_for(640.0 / 5120.0, size), 1);
        assert_eq!(eighths_for(0.1, size), 1);
        assert_eq!(eighths_for(0.0, size), 1);
        // Asking for more than the source: full size.
        assert_eq!(eighths_for(1.5, size), 8);
    }

    #[test]
    fn a_rounded_up_height_does_not_cost_an_eighth() {
        // A 2560×3837 portrait to 1280 wide: 1280×1919 (1918.5 rounded up), share 1919/3837,
        // a hair over 1/2; libjpeg's 4/8 is ceil(3837 / 2) = 1919 tall, enough.
        let share = 1919.0 / 3837.0;
        assert!(share > 0.5);
        assert_eq!(eighths_for(share, (2560, 3837)), 4);
        // One pixel more than 4/8 gives: 5/8.
        assert_eq!(eighths_for(1920.0 / 3837.0, (2560, 3837)), 5);
        assert_eq!(eighths_for(1281.0 / 2560.0, (2560, 3837)), 5);
    }

    #[test]
    fn a_portrait_decodes_at_the_scale_its_output_needs() {
        // 256×383 stored, 128 wide: 128×192 (191.5 rounded up); 4/8 gives 128×192.
        let (w, h) = (256u32, 383u32);
        let rgb: Vec<u8> = (0..w * h)
            .flat_map(|i| [(i % w) as u8, (i / w % 256) as u8, 60])
            .collect();
        let file = jpeg::encode_rgb(&rgb, w, h, 90, false, &Default::default()).unwrap();
        let share = 192.0 / 383.0;
        let decoded = decode(&file, true, 50_000_000, |_| share, |_| 0).unwrap();
        assert_eq!((decoded.image.width(), decoded.image.height()), (128, 192));
    }

    #[test]
    fn a_huge_progressive_source_at_three_eighths_takes_the_compact_decoder() {
        // 4200×4200 at 4:4:4: 106 MB of libjpeg coefficients.
        let (w, h) = (4200u32, 4200u32);
        let rgb: Vec<u8> = (0..w * h)
            .flat_map(|i| {
                let (x, y) = (i % w, i / w);
                [(x * 255 / w) as u8, (y * 255 / h) as u8, 90]
            })
            .collect();
        let mut c = mozjpeg::Compress::new(mozjpeg::ColorSpace::JCS_RGB);
        c.set_fastest_defaults();
        c.set_size(w as usize, h as usize);
        c.set_quality(85.0);
        c.set_progressive_mode();
        c.set_chroma_sampling_pixel_sizes((1, 1), (1, 1));
        let mut s = c.start_compress(Vec::new()).unwrap();
        s.write_scanlines(&rgb).unwrap();
        let file = s.finish().unwrap();
        let header = jpeg::header(&file).unwrap();
        let decoded = decode(&file, true, 50_000_000, |_| 0.3, |_| 0).unwrap();
        assert_eq!(
            (decoded.image.width(), decoded.image.height()),
            (1575, 1575)
        );
        // Reserved for 9 coefficients a block and their history (with the 3/8-scale picture,
        // its planes and its resize), not libjpeg's 64.
        assert!(
            decoded.reservation.bytes() < header.coefficient_bytes * 2 / 3,
            "{}",
            decoded.reservation.bytes()
        );
        let px = decoded.image.to_rgb8();
        for (x, y) in [(10u32, 10u32), (787, 787), (1500, 300)] {
            let got = px.get_pixel(x, y).0;
            let want = [(x * 8 * 255 / 3 / w) as u8, (y * 8 * 255 / 3 / h) as u8, 90];
            for (g, e) in got.iter().zip(want) {
                assert!(g.abs_diff(e) <= 4, "({x},{y}): {got:?} vs {want:?}");
            }
        }
    }
}

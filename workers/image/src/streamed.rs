//! Decoding PNG, GIF and WebP sources without holding their full-size 8-bit picture, so a
//! 50 MP source costs what its outputs need rather than 150–400 MB:
//!
//! - **PNG**: rows straight from the `png` crate's reader, already expanded and stripped to 8
//!   bits (16-bit and palette sources never take more than a row at their own depth), into a
//!   [`BoxShrink`](crate::shrink::BoxShrink); an interlaced (Adam7) one, whose rows come in
//!   seven passes, is decoded whole at 8 bits first (never at 16, nor resized from full size).
//! - **GIF**: the first frame's palette indexes a line at a time (an interlaced frame's all of
//!   them, 1 byte a pixel: its lines come in four passes), expanded into the shrink.
//! - **WebP** (not animated): libwebp's own scaled decode (its rescaler averages areas), which
//!   for lossy pictures keeps a few macroblock rows; lossless ones need their whole ARGB picture
//!   inside libwebp (back-references reach anywhere), and the estimate says so.
//!
//! Each path says, before decoding, how many bytes it will hold ([`Plan::bytes`]), which is
//! what the job reserves from the worker's budget (`budget.rs`). Animated WebPs return no plan
//! and keep the whole-picture decode through `image`.

use std::io::Cursor;

use image::{DynamicImage, ImageFormat, RgbImage, RgbaImage};

use crate::shrink::{held_bytes, shrunk_size, BoxShrink, Layout};

/// How a source will be decoded, and what that holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    pub format: ImageFormat,
    /// The source's stored size.
    pub size: (u32, u32),
    /// Box side (1: full size).
    pub factor: u32,
    /// Whether the decoded picture keeps an alpha channel.
    pub alpha: bool,
    /// Bytes held by the decode at its peak (decoder buffers, the shrunk picture).
    pub bytes: u64,
}

impl Plan {
    /// The decoded picture's size.
    pub fn decoded_size(&self) -> (u32, u32) {
        shrunk_size(self.size, self.factor)
    }
}

/// The streaming plan for `data` (its header already read as `size`), or `None` when the
/// source needs the whole-picture decode.
pub fn plan(data: &[u8], format: ImageFormat, size: (u32, u32), factor: u32) -> Option<Plan> {
    let (w, h) = (u64::from(size.0), u64::from(size.1));
    match format {
        ImageFormat::Png => {
            let decoder = png::Decoder::new(Cursor::new(data));
            let reader = decoder.read_info().ok()?;
            let info = reader.info();
            let alpha = info.color_type.samples() == 2
                || info.color_type.samples() == 4
                || info.trns.is_some();
            // The reader's previous and current rows at the source's depth, and its output row;
            // an interlaced (Adam7) picture's rows come in seven passes, so it is first decoded
            // whole at 8 bits (at most RGBA) and then shrunk.
            let whole = if info.interlaced { w * h * 4 } else { 0 };
            let rows = 3 * info.raw_row_length() as u64 + w * 4 + whole;
            Some(Plan {
                format,
                size,
                factor,
                alpha,
                bytes: rows + held_bytes(size, factor, alpha),
            })
        }
        ImageFormat::Gif => {
            let mut decoder = gif_decoder(data).ok()?;
            let frame = decoder.next_frame_info().ok()??;
            // One line of indexes, or an interlaced frame's all; and one RGBA row.
            let indexes = if frame.interlaced {
                u64::from(frame.width) * u64::from(frame.height)
            } else {
                u64::from(frame.width)
            };
            Some(Plan {
                format,
                size,
                factor,
                alpha: true,
                bytes: indexes + w * 4 + held_bytes(size, factor, true),
            })
        }
        ImageFormat::WebP => {
            let features = webp_features(data)?;
            if features.has_animation != 0 {
                return None;
            }
            let alpha = features.has_alpha != 0;
            let lossless = features.format == 2;
            let (ow, oh) = shrunk_size(size, factor);
            let channels: u64 = if alpha { 4 } else { 3 };
            let internal = if lossless {
                // VP8L's whole ARGB picture, plus its row cache.
                w * h * 4 + w * 4 * 16
            } else {
                // A few macroblock rows of YUV and the rescaler's rows; the alpha plane whole,
                // and (alpha being lossless-coded) its decoder's plane too: measured 100 MB
                // for a 50 MP one (BENCHMARKS.md).
                w * 64 * 3 + if alpha { 2 * w * h } else { 0 }
            };
            Some(Plan {
                format,
                size,
                factor,
                alpha,
                bytes: internal + u64::from(ow) * u64::from(oh) * channels,
            })
        }
        _ => None,
    }
}

/// Decodes `data` as `plan` says: an 8-bit RGB or RGBA picture of `plan.decoded_size()`.
pub fn decode(data: &[u8], plan: &Plan) -> Result<DynamicImage, String> {
    match plan.format {
        ImageFormat::Png => decode_png(data, plan).map_err(|e| e.to_string()),
        ImageFormat::Gif => decode_gif(data, plan),
        ImageFormat::WebP => decode_webp(data, plan),
        other => Err(format!("{other:?} has no streamed decode")),
    }
}

fn decode_png(data: &[u8], plan: &Plan) -> Result<DynamicImage, png::DecodingError> {
    let mut decoder = png::Decoder::new(Cursor::new(data));
    decoder.set_transformations(png::Transformations::normalize_to_color8());
    let mut reader = decoder.read_info()?;
    let layout = match reader.output_color_type().0 {
        png::ColorType::Grayscale => Layout::Gray,
        png::ColorType::GrayscaleAlpha => Layout::GrayAlpha,
        png::ColorType::Rgba => Layout::Rgba,
        png::ColorType::Rgb | png::ColorType::Indexed => Layout::Rgb,
    };
    let (width, height) = plan.size;
    let mut shrink = BoxShrink::new(width, height, plan.factor, layout.has_alpha());
    if reader.info().interlaced {
        let size = reader
            .output_buffer_size()
            .ok_or(png::DecodingError::LimitsExceeded)?;
        let mut whole = vec![0u8; size];
        let frame = reader.next_frame(&mut whole)?;
        for row in whole.chunks_exact(frame.line_size.max(1)) {
            shrink.push_row(row, layout);
        }
        return Ok(shrink.finish());
    }
    while let Some(row) = reader.next_row()? {
        shrink.push_row(row.data(), layout);
    }
    Ok(shrink.finish())
}

fn gif_decoder(data: &[u8]) -> Result<gif::Decoder<Cursor<&[u8]>>, gif::DecodingError> {
    let mut options = gif::DecodeOptions::new();
    options.set_color_output(gif::ColorOutput::Indexed);
    options.read_info(Cursor::new(data))
}

fn decode_gif(data: &[u8], plan: &Plan) -> Result<DynamicImage, String> {
    let failed = |e: gif::DecodingError| e.to_string();
    let mut decoder = gif_decoder(data).map_err(failed)?;
    let (width, height) = plan.size;
    let Some(frame) = decoder.next_frame_info().map_err(failed)? else {
        return Err("the gif has no frame".into());
    };
    let (left, top) = (usize::from(frame.left), usize::from(frame.top));
    let (fw, fh) = (usize::from(frame.width), usize::from(frame.height));
    let transparent = frame.transparent;
    let interlaced = frame.interlaced;
    let palette = decoder.palette().map_err(failed)?.to_vec();
    // An interlaced frame's lines come in four passes: read them all first (1 byte a pixel).
    let mut indexes = if interlaced {
        let mut all = vec![0u8; decoder.buffer_size()];
        decoder.read_into_buffer(&mut all).map_err(failed)?;
        all
    } else {
        vec![0u8; fw]
    };
    // As `image` composes a first frame: placed at its offset on a transparent screen.
    let mut shrink = BoxShrink::new(width, height, plan.factor, true);
    let mut row = vec![0u8; width as usize * 4];
    for y in 0..height as usize {
        row.fill(0);
        if (top..top + fh).contains(&y) {
            let line = if interlaced {
                &indexes[(y - top) * fw..(y - top + 1) * fw]
            } else {
                if fw > 0 && !decoder.fill_buffer(&mut indexes).map_err(failed)? {
                    return Err("image truncated".into());
                }
                &indexes[..]
            };
            for (fx, &i) in line.iter().enumerate() {
                let x = left + fx;
                if x >= width as usize {
                    break;
                }
                let at = usize::from(i) * 3;
                if let Some(rgb) = palette.get(at..at + 3) {
                    let a = if transparent == Some(i) { 0 } else { 255 };
                    row[x * 4..x * 4 + 4].copy_from_slice(&[rgb[0], rgb[1], rgb[2], a]);
                }
            }
        }
        shrink.push_row(&row, Layout::Rgba);
    }
    Ok(shrink.finish())
}

fn webp_features(data: &[u8]) -> Option<libwebp_sys::WebPBitstreamFeatures> {
    let mut features = std::mem::MaybeUninit::<libwebp_sys::WebPBitstreamFeatures>::zeroed();
    // SAFETY: libwebp reads `data` within its length and writes only `features`.
    let status =
        unsafe { libwebp_sys::WebPGetFeatures(data.as_ptr(), data.len(), features.as_mut_ptr()) };
    if status != libwebp_sys::VP8StatusCode::VP8_STATUS_OK {
        return None;
    }
    // SAFETY: initialised by the successful call (and zeroed before it).
    Some(unsafe { features.assume_init() })
}

fn decode_webp(data: &[u8], plan: &Plan) -> Result<DynamicImage, String> {
    let (w, h) = plan.decoded_size();
    let channels = if plan.alpha { 4 } else { 3 };
    let stride = w as usize * channels;
    let mut pixels = vec![0u8; stride * h as usize];
    let mut config =
        libwebp_sys::WebPDecoderConfig::new().map_err(|()| "libwebp version mismatch")?;
    if plan.factor > 1 {
        config.options.use_scaling = 1;
        config.options.scaled_width = w as i32;
        config.options.scaled_height = h as i32;
    }
    config.output.colorspace = if plan.alpha {
        libwebp_sys::WEBP_CSP_MODE::MODE_RGBA
    } else {
        libwebp_sys::WEBP_CSP_MODE::MODE_RGB
    };
    // Decoded straight into `pixels` (libwebp allocates no output of its own).
    config.output.is_external_memory = 1;
    config.output.u.RGBA = libwebp_sys::WebPRGBABuffer {
        rgba: pixels.as_mut_ptr(),
        stride: stride as i32,
        size: pixels.len(),
    };
    // SAFETY: `data` is read within its length; the output buffer is `pixels`, of the stride
    // and size given, alive until the call returns; `WebPFreeDecBuffer` frees only what
    // libwebp allocated itself (nothing for external memory).
    let status = unsafe {
        let status = libwebp_sys::WebPDecode(data.as_ptr(), data.len(), &mut config);
        libwebp_sys::WebPFreeDecBuffer(&mut config.output);
        status
    };
    if status != libwebp_sys::VP8StatusCode::VP8_STATUS_OK {
        return Err(format!("libwebp: {status:?}"));
    }
    let image = if plan.alpha {
        RgbaImage::from_raw(w, h, pixels).map(DynamicImage::ImageRgba8)
    } else {
        RgbImage::from_raw(w, h, pixels).map(DynamicImage::ImageRgb8)
    };
    image.ok_or_else(|| "short pixel data".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::geometry::scale;
    use crate::spec::{Fit, Format, OutputSpec, TransformArgs};
    use crate::transform::process;
    use fast_image_resize::Resizer;

    /// Rings over gradients, with an alpha ramp: detail at several scales.
    fn picture(w: u32, h: u32) -> RgbaImage {
        RgbaImage::from_fn(w, h, |x, y| {
            let (dx, dy) = (f64::from(x) - 700.0, f64::from(y) - 500.0);
            let ring = ((dx * dx + dy * dy).sqrt() / 40.0).sin();
            image::Rgba([
                (x * 255 / w) as u8,
                (y * 255 / h) as u8,
                (128.0 + 100.0 * ring) as u8,
                (255 - x * 200 / w) as u8,
            ])
        })
    }

    fn psnr(a: &DynamicImage, b: &DynamicImage) -> f64 {
        let (a, b) = (a.to_rgba8(), b.to_rgba8());
        assert_eq!(a.dimensions(), b.dimensions());
        let mse = a
            .as_raw()
            .iter()
            .zip(b.as_raw())
            .map(|(&p, &q)| (f64::from(p) - f64::from(q)).powi(2))
            .sum::<f64>()
            / a.as_raw().len() as f64;
        10.0 * (255.0f64 * 255.0 / mse.max(1e-9)).log10()
    }

    fn png_output(width: u32) -> OutputSpec {
        OutputSpec {
            width: Some(width),
            ..OutputSpec::new(format!("w{width}.png"), Format::Png)
        }
    }

    /// The shrunk decode's outputs against the whole-picture decode resized with the same
    /// Lanczos3 (what every PNG, GIF and WebP took before): ≥ 35 dB.
    #[test]
    fn streamed_outputs_match_the_whole_picture_resize() {
        let (w, h) = (1800, 1200);
        let src = DynamicImage::ImageRgba8(picture(w, h));
        let mut png = Vec::new();
        src.write_to(&mut Cursor::new(&mut png), ImageFormat::Png)
            .unwrap();
        let mut gif = Vec::new();
        src.write_to(&mut Cursor::new(&mut gif), ImageFormat::Gif)
            .unwrap();
        let lossy = webp::Encoder::from_rgba(src.as_bytes(), w, h)
            .encode(95.0)
            .to_vec();
        let mut resizer = Resizer::new();
        for (name, data) in [("png", png), ("gif", gif), ("webp", lossy)] {
            // 440: a 2× box first; 220: 4×.
            for width in [440u32, 220] {
                let args = TransformArgs::new("", vec![png_output(width)]);
                let (_, made) = process(&data, &args, u64::MAX).unwrap();
                let got = image::load_from_memory(&made[0].data).unwrap();
                let whole = image::load_from_memory(&data).unwrap();
                let whole = DynamicImage::ImageRgba8(whole.into_rgba8());
                let want = scale(
                    &mut resizer,
                    &whole,
                    (got.width(), got.height()),
                    Fit::Inside,
                    (0.5, 0.5),
                )
                .unwrap();
                let db = psnr(&got, &want);
                eprintln!("{name} → {width}: {db:.1} dB");
                assert!(db >= 35.0, "{name} → {width}: {db:.1} dB");
            }
        }
    }

    fn crc32(data: &[u8]) -> u32 {
        let mut crc = !0u32;
        for &b in data {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 == 1 {
                    (crc >> 1) ^ 0xEDB8_8320
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }

    #[test]
    fn plans_shrink_and_count_what_they_hold() {
        let src = DynamicImage::ImageRgba8(picture(1200, 800));
        let mut png = Vec::new();
        src.write_to(&mut Cursor::new(&mut png), ImageFormat::Png)
            .unwrap();
        let shrunk = plan(&png, ImageFormat::Png, (1200, 800), 4).unwrap();
        assert_eq!(shrunk.decoded_size(), (300, 200));
        assert!(shrunk.alpha);
        // The shrunk picture and a few rows, far from the 3.8 MB whole picture.
        assert!(shrunk.bytes < 400_000, "{}", shrunk.bytes);
        let img = decode(&png, &shrunk).unwrap();
        assert_eq!((img.width(), img.height()), (300, 200));
        // An interlaced (Adam7) PNG is planned as decoded whole at 8 bits, then shrunk.
        let mut interlaced = Vec::new();
        let mut enc = png::Encoder::new(&mut interlaced, 4, 4);
        enc.set_color(png::ColorType::Rgb);
        enc.write_header()
            .unwrap()
            .write_image_data(&[0; 48])
            .unwrap();
        interlaced[28] = 1;
        let crc = crc32(&interlaced[12..29]);
        interlaced[29..33].copy_from_slice(&crc.to_be_bytes());
        let whole = plan(&interlaced, ImageFormat::Png, (4, 4), 1).unwrap();
        assert!(whole.bytes >= 4 * 4 * 4, "{}", whole.bytes);
    }
}

//! `image.transform`: read one source, decode it once (after checking its type and pixel count
//! from the header), auto-orient it from EXIF, crop it, then derive every output from that one
//! decode — resized to its fit, encoded to its format (within `max_bytes` by lowering JPEG
//! quality) — and store each variant. The CPU part runs on the worker's bounded pool.

use std::io::Cursor;

use bytes::Bytes;
use fast_image_resize::{FilterType, ResizeAlg, ResizeOptions, Resizer};
use image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader, Limits, Rgb, RgbImage};
use mediafarm::sources::{Source, Sources};
use mediafarm::storage::Storage;
use mediafarm::{Settings, Task, TaskContext, TaskError};
use serde::{Deserialize, Serialize};

/// Most outputs one job may ask for.
const MAX_OUTPUTS: usize = 16;
/// Largest output side.
const MAX_SIDE: u32 = 16_384;
const DEFAULT_JPEG_QUALITY: u8 = 80;
/// The lowest JPEG quality `max_bytes` may push an output to.
const MIN_JPEG_QUALITY: u8 = 30;
/// What transparent pixels become in a JPEG.
const JPEG_BACKGROUND: [u8; 3] = [255, 255, 255];

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransformArgs {
    /// Storage key, `s3://`, `file://` (allowed roots) or `https://` (allowed hosts).
    pub source: String,
    #[serde(default)]
    pub crop: Option<Crop>,
    #[serde(default = "yes")]
    pub auto_orient: bool,
    /// Outputs never carry the source's metadata; `false` is refused until it can be kept.
    #[serde(default = "yes")]
    pub strip_metadata: bool,
    pub outputs: Vec<OutputSpec>,
}

fn yes() -> bool {
    true
}

/// A rectangle of the (oriented) source, in pixels.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Crop {
    pub x: u32,
    pub y: u32,
    pub width: u32,
    pub height: u32,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputSpec {
    pub key: String,
    pub width: Option<u32>,
    pub height: Option<u32>,
    #[serde(default)]
    pub fit: Fit,
    pub format: Format,
    pub quality: Option<u8>,
    pub max_bytes: Option<u64>,
}

/// How the source fills the output box (as in sharp and imgproxy).
#[derive(Debug, Clone, Copy, Default, PartialEq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Fit {
    /// Fill the box, cropping the overflow around the centre.
    Cover,
    /// Fit inside the box and pad the rest (transparent, or white for JPEG).
    Contain,
    /// Stretch to the box, ignoring the aspect ratio.
    Fill,
    /// Fit inside the box, never enlarging; the output may be smaller than the box.
    #[default]
    Inside,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Jpeg,
    Png,
    Webp,
    Avif,
}

impl Format {
    fn content_type(self) -> &'static str {
        match self {
            Format::Jpeg => "image/jpeg",
            Format::Png => "image/png",
            Format::Webp => "image/webp",
            Format::Avif => "image/avif",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SourceInfo {
    pub width: u32,
    pub height: u32,
    pub format: String,
    pub bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OutputInfo {
    pub key: String,
    pub url: String,
    pub width: u32,
    pub height: u32,
    pub format: Format,
    pub bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TransformResult {
    pub source: SourceInfo,
    pub outputs: Vec<OutputInfo>,
}

/// The task, with the storage and source rules of one worker.
pub struct Transform {
    sources: Sources,
    storage: Storage,
    max_src_bytes: u64,
    max_src_pixels: u64,
}

impl Transform {
    pub fn new(settings: &Settings) -> Result<Transform, mediafarm::storage::StorageError> {
        let storage = Storage::from_settings(settings)?;
        Ok(Transform {
            sources: Sources::new(settings, storage.clone()),
            storage,
            max_src_bytes: settings.image_max_src_bytes,
            max_src_pixels: settings.image_max_src_pixels,
        })
    }
}

fn invalid(kind: &'static str, message: impl Into<String>) -> TaskError {
    TaskError::invalid(kind, message)
}

impl Task for Transform {
    const NAME: &'static str = "image.transform";
    type Args = TransformArgs;
    type Output = TransformResult;

    async fn run(
        &self,
        ctx: TaskContext,
        args: TransformArgs,
    ) -> Result<TransformResult, TaskError> {
        check_args(&args)?;
        for out in &args.outputs {
            mediafarm::storage::check_key(&out.key)?;
        }
        let source = Source::parse(&args.source)?;
        let data = self.sources.read(&source, self.max_src_bytes).await?;
        let max_pixels = self.max_src_pixels;
        let specs = args.clone();
        let (info, encoded) = ctx
            .cpu(move || process(&data, &specs, max_pixels))
            .await??;
        let mut outputs = Vec::with_capacity(encoded.len());
        for (spec, out) in args.outputs.iter().zip(encoded) {
            let stored = self
                .storage
                .put(&spec.key, Bytes::from(out.data), spec.format.content_type())
                .await?;
            outputs.push(OutputInfo {
                key: stored.key,
                url: stored.url,
                width: out.width,
                height: out.height,
                format: spec.format,
                bytes: stored.bytes,
            });
        }
        Ok(TransformResult {
            source: info,
            outputs,
        })
    }
}

/// Checks what can be checked before reading the source.
pub fn check_args(args: &TransformArgs) -> Result<(), TaskError> {
    if !args.strip_metadata {
        return Err(invalid(
            "UnsupportedOption",
            "strip_metadata=false is not supported: outputs never carry the source's metadata",
        ));
    }
    if args.outputs.is_empty() {
        return Err(invalid(
            "InvalidArguments",
            "outputs is empty: ask for at least one variant",
        ));
    }
    if args.outputs.len() > MAX_OUTPUTS {
        return Err(invalid(
            "InvalidArguments",
            format!(
                "{} outputs asked; at most {MAX_OUTPUTS} per job",
                args.outputs.len()
            ),
        ));
    }
    for (i, o) in args.outputs.iter().enumerate() {
        let side = |v: Option<u32>, name: &str| match v {
            Some(0) => Err(invalid(
                "InvalidArguments",
                format!("outputs[{i}].{name} is 0"),
            )),
            Some(v) if v > MAX_SIDE => Err(invalid(
                "InvalidArguments",
                format!("outputs[{i}].{name} is {v}; at most {MAX_SIDE}"),
            )),
            _ => Ok(()),
        };
        side(o.width, "width")?;
        side(o.height, "height")?;
        if o.fit != Fit::Inside && (o.width.is_none() || o.height.is_none()) {
            return Err(invalid(
                "InvalidArguments",
                format!("outputs[{i}]: fit {:?} needs both width and height", o.fit).to_lowercase(),
            ));
        }
        if let Some(q) = o.quality {
            if !(1..=100).contains(&q) {
                return Err(invalid(
                    "InvalidArguments",
                    format!("outputs[{i}].quality is {q}; use 1 to 100"),
                ));
            }
        }
        if o.format == Format::Avif {
            return Err(invalid(
                "UnsupportedFormat",
                format!("outputs[{i}]: AVIF output is not available in this build of image-worker; use jpeg, png or webp"),
            ));
        }
    }
    Ok(())
}

/// One encoded output.
pub struct Encoded {
    pub data: Vec<u8>,
    pub width: u32,
    pub height: u32,
}

/// Decodes `data` once and encodes every output (CPU only; no I/O).
pub fn process(
    data: &[u8],
    args: &TransformArgs,
    max_pixels: u64,
) -> Result<(SourceInfo, Vec<Encoded>), TaskError> {
    // Shrink-on-load: a JPEG whose outputs all need at most half its size is decoded at
    // 1/2, 1/4 or 1/8 scale by the IDCT itself, which skips most of the decoding work.
    let shrunk = match args.crop {
        None => decode_jpeg_shrunk(data, args, max_pixels)?,
        Some(_) => None,
    };
    let (img, info) = match shrunk {
        Some(found) => found,
        None => decode(data, args.auto_orient, max_pixels)?,
    };
    let img = match args.crop {
        Some(c) => crop(img, c)?,
        None => img,
    };
    // Sizes follow the (cropped) source's full size, whatever scale it was decoded at.
    let full = match args.crop {
        Some(c) => (c.width, c.height),
        None => (info.width, info.height),
    };
    let mut resizer = Resizer::new();
    let sizes: Vec<(u32, u32)> = args
        .outputs
        .iter()
        .map(|spec| target_size(full, spec))
        .collect();
    // Largest first, so smaller outputs can be derived from a larger one already made (as
    // libvips does) instead of from the full source each time.
    let mut order: Vec<usize> = (0..args.outputs.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(u64::from(sizes[i].0) * u64::from(sizes[i].1)));
    let mut derived: Vec<DynamicImage> = Vec::new();
    let mut out: Vec<Option<Encoded>> = (0..args.outputs.len()).map(|_| None).collect();
    for i in order {
        let spec = &args.outputs[i];
        let (w, h) = sizes[i];
        // A smaller whole-picture image still has at least twice the detail the output needs.
        let base = derived
            .iter()
            .filter(|d| d.width() >= w.saturating_mul(2) && d.height() >= h.saturating_mul(2))
            .min_by_key(|d| u64::from(d.width()) * u64::from(d.height()))
            .unwrap_or(&img);
        let scaled = scale(&mut resizer, base, (w, h), spec.fit)?;
        let keeps_whole_picture = matches!(spec.fit, Fit::Inside | Fit::Contain);
        let shown = if spec.fit == Fit::Contain {
            pad(&scaled, spec)
        } else {
            scaled.clone()
        };
        let data = encode(&shown, spec).map_err(|e| match e.kind {
            mediafarm::FailureKind::Invalid => invalid(
                "OutputTooLarge",
                format!("outputs[{i}] ({}): {}", spec.key, e.message),
            ),
            _ => e,
        })?;
        out[i] = Some(Encoded {
            data,
            width: shown.width(),
            height: shown.height(),
        });
        if keeps_whole_picture && (w, h) != full {
            derived.push(scaled);
        }
    }
    Ok((info, out.into_iter().flatten().collect()))
}

/// The scaled decode of a JPEG when every output needs at most half of it, with the full
/// size reported; `None` when it does not apply (not a JPEG, CMYK or 16-bit, no saving).
fn decode_jpeg_shrunk(
    data: &[u8],
    args: &TransformArgs,
    max_pixels: u64,
) -> Result<Option<(DynamicImage, SourceInfo)>, TaskError> {
    if !data.starts_with(&[0xFF, 0xD8, 0xFF]) {
        return Ok(None);
    }
    let mut decoder = jpeg_decoder::Decoder::new(Cursor::new(data));
    if decoder.read_info().is_err() {
        return Ok(None); // the full decoder reports the error in its own words
    }
    let Some(meta) = decoder.info() else {
        return Ok(None);
    };
    if !matches!(
        meta.pixel_format,
        jpeg_decoder::PixelFormat::RGB24 | jpeg_decoder::PixelFormat::L8
    ) {
        return Ok(None);
    }
    let (sw, sh) = (u32::from(meta.width), u32::from(meta.height));
    if u64::from(sw) * u64::from(sh) > max_pixels {
        return Ok(None); // refused with the full message by `decode`
    }
    let orientation = if args.auto_orient {
        decoder
            .exif_data()
            .and_then(image::metadata::Orientation::from_exif_chunk)
    } else {
        None
    };
    let swaps = matches!(
        orientation,
        Some(
            image::metadata::Orientation::Rotate90
                | image::metadata::Orientation::Rotate270
                | image::metadata::Orientation::Rotate90FlipH
                | image::metadata::Orientation::Rotate270FlipH
        )
    );
    let full = if swaps { (sh, sw) } else { (sw, sh) };
    // The share of the source's resolution the most demanding output needs.
    let need = args
        .outputs
        .iter()
        .map(|spec| {
            let (w, h) = target_size(full, spec);
            (f64::from(w) / f64::from(full.0)).max(f64::from(h) / f64::from(full.1))
        })
        .fold(0.0f64, f64::max);
    if need > 0.5 {
        return Ok(None);
    }
    let want =
        |side: u32| ((f64::from(side) * need).ceil() as u32).clamp(1, u32::from(u16::MAX)) as u16;
    let scaled = decoder
        .scale(want(sw), want(sh))
        .map_err(|e| invalid("InvalidImage", format!("cannot decode the jpeg: {e}")))?;
    let pixels = decoder
        .decode()
        .map_err(|e| invalid("InvalidImage", format!("cannot decode the jpeg: {e}")))?;
    let (w, h) = (u32::from(scaled.0), u32::from(scaled.1));
    let img = match meta.pixel_format {
        jpeg_decoder::PixelFormat::RGB24 => {
            RgbImage::from_raw(w, h, pixels).map(DynamicImage::ImageRgb8)
        }
        _ => image::GrayImage::from_raw(w, h, pixels)
            .map(|g| DynamicImage::ImageRgb8(DynamicImage::ImageLuma8(g).to_rgb8())),
    };
    let Some(mut img) = img else {
        return Ok(None);
    };
    if let Some(o) = orientation {
        img.apply_orientation(o);
    }
    let info = SourceInfo {
        width: full.0,
        height: full.1,
        format: "jpeg".into(),
        bytes: data.len() as u64,
    };
    Ok(Some((img, info)))
}

fn decode(
    data: &[u8],
    auto_orient: bool,
    max_pixels: u64,
) -> Result<(DynamicImage, SourceInfo), TaskError> {
    if data.is_empty() {
        return Err(invalid("InvalidImage", "the source is empty (0 bytes)"));
    }
    let reader = || {
        ImageReader::new(Cursor::new(data))
            .with_guessed_format()
            .map_err(|e| invalid("InvalidImage", e.to_string()))
    };
    let format = match reader()?.format() {
        Some(f @ (ImageFormat::Jpeg | ImageFormat::Png | ImageFormat::Gif | ImageFormat::WebP)) => {
            f
        }
        Some(other) => {
            return Err(invalid(
                "UnsupportedImage",
                format!("{other:?} sources are not accepted; send JPEG, PNG, GIF or WebP"),
            ))
        }
        None => {
            let start = String::from_utf8_lossy(&data[..data.len().min(16)]).into_owned();
            return Err(invalid(
                "UnsupportedImage",
                format!(
                    "the source is not a JPEG, PNG, GIF or WebP image (it starts with {start:?})"
                ),
            ));
        }
    };
    let name = format!("{format:?}").to_lowercase();
    let (width, height) = reader()?.into_dimensions().map_err(|e| {
        invalid(
            "InvalidImage",
            format!("cannot read the {name} header: {e}"),
        )
    })?;
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
    let mut reader = reader()?;
    let mut limits = Limits::default();
    // Room for the decoded image at 16 bits per channel with alpha, and decoder scratch.
    limits.max_alloc = Some(pixels.saturating_mul(8).saturating_add(64 << 20));
    reader.limits(limits);
    let mut decoder = reader
        .into_decoder()
        .map_err(|e| invalid("InvalidImage", format!("cannot decode the {name}: {e}")))?;
    let orientation = if auto_orient {
        decoder.orientation().ok()
    } else {
        None
    };
    // GIF and animated WebP: the first frame.
    let mut img = DynamicImage::from_decoder(decoder)
        .map_err(|e| invalid("InvalidImage", format!("cannot decode the {name}: {e}")))?;
    if let Some(o) = orientation {
        img.apply_orientation(o);
    }
    // 8 bits per channel, RGB or RGBA: grayscale, 16-bit and palette sources alike.
    let img = if img.color().has_alpha() {
        DynamicImage::ImageRgba8(img.to_rgba8())
    } else {
        DynamicImage::ImageRgb8(img.to_rgb8())
    };
    let info = SourceInfo {
        width: img.width(),
        height: img.height(),
        format: name,
        bytes: data.len() as u64,
    };
    Ok((img, info))
}

fn crop(img: DynamicImage, c: Crop) -> Result<DynamicImage, TaskError> {
    let fits = c.width > 0
        && c.height > 0
        && u64::from(c.x) + u64::from(c.width) <= u64::from(img.width())
        && u64::from(c.y) + u64::from(c.height) <= u64::from(img.height());
    if !fits {
        return Err(invalid(
            "InvalidArguments",
            format!(
                "crop {}×{} at ({}, {}) is not inside the {}×{} source (after orientation)",
                c.width,
                c.height,
                c.x,
                c.y,
                img.width(),
                img.height()
            ),
        ));
    }
    Ok(img.crop_imm(c.x, c.y, c.width, c.height))
}

/// The size an output gets, and whether the source is cropped to the box's aspect ratio.
pub fn target_size(src: (u32, u32), spec: &OutputSpec) -> (u32, u32) {
    let (sw, sh) = (f64::from(src.0), f64::from(src.1));
    let round = |v: f64| (v.round() as u32).clamp(1, MAX_SIDE);
    match (spec.fit, spec.width, spec.height) {
        (Fit::Cover | Fit::Fill, Some(w), Some(h)) => (w, h),
        (Fit::Contain, Some(w), Some(h)) => {
            let scale = (f64::from(w) / sw).min(f64::from(h) / sh);
            (round(sw * scale), round(sh * scale))
        }
        (_, w, h) => {
            let sx = w.map_or(f64::INFINITY, |w| f64::from(w) / sw);
            let sy = h.map_or(f64::INFINITY, |h| f64::from(h) / sh);
            let scale = sx.min(sy).min(1.0);
            (round(sw * scale), round(sh * scale))
        }
    }
}

/// Resizes `src` to `(w, h)`: cropped around the centre to the box's aspect ratio for cover,
/// stretched for fill, as is otherwise (the size already keeps the aspect ratio).
fn scale(
    resizer: &mut Resizer,
    src: &DynamicImage,
    (w, h): (u32, u32),
    fit: Fit,
) -> Result<DynamicImage, TaskError> {
    if (w, h) == (src.width(), src.height()) {
        return Ok(src.clone());
    }
    let mut dst = DynamicImage::new(w, h, src.color());
    let mut opts = ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::Lanczos3));
    if fit == Fit::Cover {
        opts = opts.fit_into_destination(Some((0.5, 0.5)));
    }
    resizer
        .resize(src, &mut dst, &opts)
        .map_err(|e| TaskError::permanent("ResizeError", e.to_string()))?;
    Ok(dst)
}

/// Contain: the picture centred on the output box, padded (transparent, white for JPEG).
fn pad(picture: &DynamicImage, spec: &OutputSpec) -> DynamicImage {
    let (w, h) = (picture.width(), picture.height());
    let (bw, bh) = (spec.width.unwrap_or(w), spec.height.unwrap_or(h));
    if (bw, bh) == (w, h) {
        return picture.clone();
    }
    let (mut canvas, picture) = if spec.format == Format::Jpeg {
        (
            DynamicImage::ImageRgb8(RgbImage::from_pixel(bw, bh, Rgb(JPEG_BACKGROUND))),
            DynamicImage::ImageRgb8(flatten(picture)),
        )
    } else {
        (
            DynamicImage::new_rgba8(bw, bh),
            DynamicImage::ImageRgba8(picture.to_rgba8()),
        )
    };
    image::imageops::overlay(
        &mut canvas,
        &picture,
        i64::from((bw - w) / 2),
        i64::from((bh - h) / 2),
    );
    canvas
}

/// Composes transparent pixels onto the JPEG background.
fn flatten(img: &DynamicImage) -> RgbImage {
    match img {
        DynamicImage::ImageRgb8(rgb) => rgb.clone(),
        other => {
            let rgba = other.to_rgba8();
            RgbImage::from_fn(rgba.width(), rgba.height(), |x, y| {
                let p = rgba.get_pixel(x, y).0;
                let a = u16::from(p[3]);
                let mix = |c: u8, bg: u8| {
                    ((u16::from(c) * a + u16::from(bg) * (255 - a) + 127) / 255) as u8
                };
                Rgb([
                    mix(p[0], JPEG_BACKGROUND[0]),
                    mix(p[1], JPEG_BACKGROUND[1]),
                    mix(p[2], JPEG_BACKGROUND[2]),
                ])
            })
        }
    }
}

fn encode(img: &DynamicImage, spec: &OutputSpec) -> Result<Vec<u8>, TaskError> {
    match spec.format {
        Format::Jpeg => {
            let rgb = flatten(img);
            let mut quality = spec.quality.unwrap_or(DEFAULT_JPEG_QUALITY);
            loop {
                let data = encode_jpeg(&rgb, quality)?;
                match spec.max_bytes {
                    Some(max) if data.len() as u64 > max => {
                        if quality <= MIN_JPEG_QUALITY {
                            return Err(invalid(
                                "OutputTooLarge",
                                format!(
                                    "{} bytes at JPEG quality {MIN_JPEG_QUALITY}, still over max_bytes {max}",
                                    data.len()
                                ),
                            ));
                        }
                        quality = quality.saturating_sub(10).max(MIN_JPEG_QUALITY);
                    }
                    _ => return Ok(data),
                }
            }
        }
        Format::Png | Format::Webp => {
            let mut data = Vec::new();
            let result = if spec.format == Format::Png {
                img.write_with_encoder(image::codecs::png::PngEncoder::new(&mut data))
            } else {
                img.write_with_encoder(image::codecs::webp::WebPEncoder::new_lossless(&mut data))
            };
            result.map_err(|e| TaskError::permanent("EncodeError", e.to_string()))?;
            if let Some(max) = spec.max_bytes.filter(|max| data.len() as u64 > *max) {
                return Err(invalid(
                    "OutputTooLarge",
                    format!(
                        "{} bytes, over max_bytes {max}; {:?} output here is lossless, so quality cannot be lowered",
                        data.len(),
                        spec.format
                    ),
                ));
            }
            Ok(data)
        }
        Format::Avif => Err(invalid(
            "UnsupportedFormat",
            "AVIF output is not available in this build of image-worker",
        )),
    }
}

/// Progressive JPEG with 4:2:0 chroma subsampling, no metadata.
fn encode_jpeg(rgb: &RgbImage, quality: u8) -> Result<Vec<u8>, TaskError> {
    let (w, h) = (u16::try_from(rgb.width()), u16::try_from(rgb.height()));
    let (Ok(w), Ok(h)) = (w, h) else {
        return Err(invalid(
            "OutputTooLarge",
            "JPEG sides are at most 65535 pixels",
        ));
    };
    let mut out = Vec::new();
    let mut encoder = jpeg_encoder::Encoder::new(&mut out, quality);
    encoder.set_progressive(true);
    encoder.set_sampling_factor(jpeg_encoder::SamplingFactor::R_4_2_0);
    encoder
        .encode(rgb.as_raw(), w, h, jpeg_encoder::ColorType::Rgb)
        .map_err(|e| TaskError::permanent("EncodeError", e.to_string()))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(fit: Fit, w: Option<u32>, h: Option<u32>) -> OutputSpec {
        OutputSpec {
            key: "k".into(),
            width: w,
            height: h,
            fit,
            format: Format::Png,
            quality: None,
            max_bytes: None,
        }
    }

    #[test]
    fn sizes_follow_the_fit() {
        let src = (4000, 3000);
        assert_eq!(
            target_size(src, &spec(Fit::Cover, Some(512), Some(512))),
            (512, 512)
        );
        assert_eq!(
            target_size(src, &spec(Fit::Fill, Some(100), Some(10))),
            (100, 10)
        );
        assert_eq!(
            target_size(src, &spec(Fit::Contain, Some(400), Some(400))),
            (400, 300)
        );
        assert_eq!(
            target_size(src, &spec(Fit::Inside, Some(640), None)),
            (640, 480)
        );
        assert_eq!(
            target_size(src, &spec(Fit::Inside, None, Some(300))),
            (400, 300)
        );
        // Inside never enlarges.
        assert_eq!(
            target_size((100, 50), &spec(Fit::Inside, Some(640), Some(640))),
            (100, 50)
        );
    }
}

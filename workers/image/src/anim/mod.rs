//! Animated outputs: an output with `animated: true` made from an animated GIF or WebP source
//! is an animated WebP — every frame, in order, with its duration and the source's loop count.
//!
//! Promises:
//! - **Checked before decoding.** The frame count and canvas come from the container
//!   ([`probe`]: GIF blocks walked with their pixel data skipped, WebP by libwebp's demuxer).
//!   More than `image_max_anim_frames` frames, or more than `image_max_anim_pixels` pixels in
//!   all frames together (frames × canvas), in the source or in any animated output, fails the
//!   job before a frame is decoded, naming the count, the limit and the setting.
//! - **Streamed.** One composed source frame exists at a time: it is decoded, then cut and
//!   resized for each animated output and handed to that output's libwebp `WebPAnimEncoder`
//!   (`encoder.rs`) before the next frame is decoded. The decode budget (`budget.rs`) is
//!   reserved for exactly that: the source's canvases, one resize, each encoder's canvases and
//!   its encoded frames.
//! - **Same geometry as a still.** The crop, fit, gravity, background and watermark apply to
//!   every frame as they would to the still; `entropy`/`attention` choose their window on the
//!   first frame and keep it, so the crop does not jump between frames.
//!
//! - **Turned as a still is.** An animated WebP's `EXIF` orientation is applied (with
//!   `auto_orient`, the default) the way `orient.rs` applies a still's: crop, sizes and
//!   gravity are in the shown frame, each output-size frame is turned after its resize.
//! - **`max_bytes` met as a still meets it, in bounded CPU.** An output over its `max_bytes`
//!   is made again at lower qualities from the still path's ladder (the asked quality, then
//!   10 lower at a time down to 30): first at 30 — if even that is over, the job fails saying
//!   so after two encodes — then by bisection for the highest quality of the ladder that fits.
//!   Each attempt decodes the source again and encodes that output alone, so an output costs at
//!   most [`MAX_ENCODES`] encodes of the animation (the still path's linear walk can take 8).
//!   A lossless output cannot be lowered and fails at once.
//!
//! Colour as for stills: a source's ICC profile (GIF's `ICCRGBG1` block, WebP's `ICCP`) is
//! converted to sRGB, or with `strip_metadata: false` kept in the output instead, with the
//! EXIF block (its orientation reset when it was applied).

mod encoder;
pub mod gif;
pub mod webp;

use fast_image_resize::Resizer;
use image::metadata::Orientation;
use image::DynamicImage;
use mediafarm::TaskError;

pub use encoder::AnimEncoder;

use crate::budget::reserve;
use crate::colour::ToSrgb;
use crate::crop_box;
use crate::decode::{check_pixels, orientation, resize_bytes};
use crate::encode::{quality_ladder, Metadata, DEFAULT_QUALITY};
use crate::geometry::scale;
use crate::orient::{plan_output, swap_size, OutputPlan};
use crate::overlay::{draw_bytes, Overlay};
use crate::smartcrop::{Analysis, ANALYSIS_BYTES};
use crate::spec::{invalid, Fit, OutputSpec, SourceInfo, TransformArgs, Watermark};
use crate::transform::{dress, Encoded, Limits};
use crate::webp_meta;

/// The two animated formats read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Gif,
    Webp,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Gif => "gif",
            Kind::Webp => "webp",
        }
    }
}

/// An animated source, as its container describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Animation {
    pub kind: Kind,
    pub canvas: (u32, u32),
    pub frames: u32,
    /// 0: for ever; n: played n times.
    pub loop_count: u32,
    pub icc: Option<Vec<u8>>,
    /// The EXIF block (an animated WebP's `EXIF` chunk), orientation included.
    pub exif: Option<Vec<u8>>,
}

impl Animation {
    /// The source as the job's result describes it: its size as shown when `auto_orient`.
    pub fn info(&self, data: &[u8], auto_orient: bool) -> SourceInfo {
        let (width, height) = self.shown(auto_orient);
        SourceInfo {
            width,
            height,
            format: self.kind.name().into(),
            bytes: data.len() as u64,
        }
    }

    /// The orientation to apply (with `auto_orient`) and the EXIF block as outputs keep it
    /// (its orientation reset when applied), as for a still (`decode.rs`).
    fn orientation(&self, auto_orient: bool) -> (Option<Orientation>, Option<Vec<u8>>) {
        orientation(self.exif.clone(), auto_orient)
    }

    /// The canvas as shown: its sides swapped by orientations 5–8.
    fn shown(&self, auto_orient: bool) -> (u32, u32) {
        swap_size(self.orientation(auto_orient).0, self.canvas)
    }

    fn pixels(&self) -> u64 {
        u64::from(self.frames) * u64::from(self.canvas.0) * u64::from(self.canvas.1)
    }
}

/// `Some` for a GIF of two frames or more or a WebP marked animated, read from the container
/// (no frame decoded) and checked against `limits`; `None` for any other source, which is
/// decoded as a still.
pub fn probe(data: &[u8], limits: &Limits) -> Result<Option<Animation>, TaskError> {
    let bad = |e: String| invalid("InvalidImage", e);
    let (kind, header) = if data.starts_with(b"GIF8") {
        (Kind::Gif, gif::header(data).map_err(bad)?)
    } else if webp::is_animated(data) {
        (Kind::Webp, webp::header(data).map_err(bad)?)
    } else {
        return Ok(None);
    };
    check_pixels(header.canvas.0, header.canvas.1, limits.max_pixels)?;
    if header.frames < 2 {
        // A single frame is a still; an animated WebP without frames fails in its decode.
        return Ok(None);
    }
    let animation = Animation {
        kind,
        canvas: header.canvas,
        frames: header.frames,
        loop_count: header.loop_count,
        icc: header.icc,
        exif: header.exif,
    };
    if u64::from(animation.frames) > limits.max_anim_frames {
        return Err(invalid(
            "SourceTooLarge",
            format!(
                "the animated {} has {} frames; the limit is {} (image_max_anim_frames)",
                kind.name(),
                animation.frames,
                limits.max_anim_frames
            ),
        ));
    }
    if animation.pixels() > limits.max_anim_pixels {
        return Err(invalid(
            "SourceTooLarge",
            format!(
                "the animated {} is {} frames of {}×{} ({:.1} MP in all); the limit is {:.1} MP \
                 (image_max_anim_pixels)",
                kind.name(),
                animation.frames,
                animation.canvas.0,
                animation.canvas.1,
                animation.pixels() as f64 / 1e6,
                limits.max_anim_pixels as f64 / 1e6
            ),
        ));
    }
    Ok(Some(animation))
}

/// The frames of a source, composed onto its canvas one at a time.
enum Frames<'a> {
    Gif(Box<gif::Frames<'a>>),
    Webp(webp::Frames<'a>),
}

impl Frames<'_> {
    fn canvas(&self) -> &DynamicImage {
        match self {
            Frames::Gif(f) => f.canvas(),
            Frames::Webp(f) => f.canvas(),
        }
    }

    fn next(&mut self, number: u32) -> Result<Option<u32>, String> {
        match self {
            Frames::Gif(f) => f.next(number),
            Frames::Webp(f) => f.next(number),
        }
    }
}

/// One animated output being made.
struct Moving<'a> {
    spec: &'a OutputSpec,
    plan: OutputPlan,
    /// Its final size (`contain` pads to the box).
    size: (u32, u32),
    anchor: (f64, f64),
    encoder: AnimEncoder,
}

/// The final size of an output planned as `plan`.
fn final_size(spec: &OutputSpec, plan: &OutputPlan) -> (u32, u32) {
    match spec.fit {
        Fit::Contain => (
            spec.width.unwrap_or(plan.shown.0),
            spec.height.unwrap_or(plan.shown.1),
        ),
        _ => plan.shown,
    }
}

/// An estimate of an animated output's encoded frames, which the job holds up to three times
/// (the encoder's and the assembled file; then the file and its copy out of libwebp, which
/// stays while the other outputs finish):
/// half a byte per pixel per frame lossy — measured 0.50 at quality 80 on frames that differ
/// all over (noise, a moving bar: `examples/anim-memory.rs`), the worst case for inter-frame
/// coding — and two lossless.
fn encoded_bytes(frames: u32, (w, h): (u32, u32), lossless: bool) -> u64 {
    let pixels = u64::from(frames) * u64::from(w) * u64::from(h);
    if lossless {
        2 * pixels
    } else {
        pixels / 2
    }
}

/// An animated output's index, plan and final size.
type Planned = (usize, OutputPlan, (u32, u32));

/// Each output in `moving`, planned and checked against the pixel budget; and the size the
/// outputs are planned from (the crop's, or the canvas).
fn plan(
    animation: &Animation,
    args: &TransformArgs,
    limits: &Limits,
    moving: &[bool],
) -> Result<((u32, u32), Vec<Planned>), TaskError> {
    let shown = animation.shown(args.auto_orient);
    let (orient, _) = animation.orientation(args.auto_orient);
    if let Some(c) = args.crop {
        crop_box::check(c, shown)?;
    }
    let full = args.crop.map_or(shown, |c| c.size());
    let chosen: Vec<usize> = (0..args.outputs.len()).filter(|&i| moving[i]).collect();
    // Sizes and budgets first, before anything is decoded or reserved.
    let mut plans = Vec::with_capacity(chosen.len());
    for &i in &chosen {
        let spec = &args.outputs[i];
        let plan = plan_output(full, orient, spec);
        let size = final_size(spec, &plan);
        let pixels = u64::from(animation.frames) * u64::from(size.0) * u64::from(size.1);
        if pixels > limits.max_anim_pixels {
            return Err(invalid(
                "OutputTooLarge",
                format!(
                    "outputs[{i}] ({}) would be {} frames of {}×{} ({:.1} MP in all); the limit \
                     is {:.1} MP (image_max_anim_pixels)",
                    spec.key,
                    animation.frames,
                    size.0,
                    size.1,
                    pixels as f64 / 1e6,
                    limits.max_anim_pixels as f64 / 1e6
                ),
            ));
        }
        plans.push((i, plan, size));
    }
    Ok((full, plans))
}

/// What making `plans` holds at once: the source's canvases, the cut, one resize and its
/// finishing (the largest), every encoder with its frames, and the smart crop's map.
fn held_bytes(
    animation: &Animation,
    args: &TransformArgs,
    full: (u32, u32),
    plans: &[Planned],
    watermark: Option<(&Watermark, &Overlay)>,
) -> u64 {
    let canvas = animation.canvas;
    let smart = plans
        .iter()
        .any(|(i, _, _)| args.outputs[*i].gravity.smart().is_some())
        || args.crop.is_some_and(|c| c.smart().is_some());
    let source = match animation.kind {
        Kind::Gif => gif::held_bytes(canvas),
        Kind::Webp => webp::held_bytes(canvas),
    };
    let cut = if args.crop.is_some() {
        u64::from(full.0) * u64::from(full.1) * 4
    } else {
        0
    };
    let resize = plans
        .iter()
        .map(|(i, plan, size)| {
            let share = (f64::from(plan.shown.0) / f64::from(full.0))
                .max(f64::from(plan.shown.1) / f64::from(full.1));
            let mark = match watermark.filter(|_| args.outputs[*i].watermark) {
                Some((w, o)) => draw_bytes(o, *size, w) + if o.pinned() { 0 } else { o.bytes() },
                None => 0,
            };
            resize_bytes(full, true, full, share) + mark
        })
        .max()
        .unwrap_or(0);
    let encoders: u64 = plans
        .iter()
        .map(|(i, _, size)| {
            let lossless = args.outputs[*i].lossless;
            encoder::held_bytes(*size, lossless)
                + 3 * encoded_bytes(animation.frames, *size, lossless)
        })
        .sum();
    let analysis = if smart { ANALYSIS_BYTES } else { 0 };
    source + cut + resize + encoders + analysis
}

/// The decode-budget reservation an `animated` job on `data` makes (without a watermark), or
/// `None` when the source is not animated: for measuring it against what the job holds.
#[doc(hidden)]
pub fn reserved_bytes(
    data: &[u8],
    args: &TransformArgs,
    limits: &Limits,
) -> Result<Option<u64>, TaskError> {
    let Some(animation) = probe(data, limits)? else {
        return Ok(None);
    };
    let moving: Vec<bool> = args.outputs.iter().map(|o| o.animated).collect();
    let (full, plans) = plan(&animation, args, limits, &moving)?;
    Ok(Some(held_bytes(&animation, args, full, &plans, None)))
}

/// Most encodes of one animated output: its first, then at most one at the lowest quality
/// and three more bisecting the still path's ladder (at most 7 rungs below 100).
pub const MAX_ENCODES: u32 = 5;

/// Makes every output marked in `moving` from `animation` (the probe of `data`) into `out`.
pub fn encode(
    data: &[u8],
    animation: &Animation,
    args: &TransformArgs,
    limits: &Limits,
    watermark: Option<(&Watermark, &Overlay)>,
    moving: &[bool],
    out: &mut [Option<Encoded>],
) -> Result<(), TaskError> {
    let (full, plans) = plan(animation, args, limits, moving)?;
    let _held = reserve(held_bytes(animation, args, full, &plans, watermark));
    let asked: Vec<u8> = plans
        .iter()
        .map(|(i, _, _)| args.outputs[*i].quality.unwrap_or(DEFAULT_QUALITY))
        .collect();
    let mut files = pass(data, animation, args, watermark, &plans, &asked)?;
    for (k, planned) in plans.iter().enumerate() {
        let (i, _, size) = *planned;
        let spec = &args.outputs[i];
        if let Some(max) = spec.max_bytes.filter(|&max| files[k].len() as u64 > max) {
            let over = |e: String| {
                invalid(
                    "OutputTooLarge",
                    format!("outputs[{i}] ({}): {e}", spec.key),
                )
            };
            if spec.lossless {
                return Err(over(format!(
                    "{} bytes, over max_bytes {max}; a lossless animated WebP cannot lower its \
                     quality: ask for a smaller size or a lossy output",
                    files[k].len()
                )));
            }
            let one = std::slice::from_ref(planned);
            // The file over the limit goes first: the search then holds no more of this
            // output's encoded frames than its first encode did (what `held_bytes` reserves).
            let over_len = std::mem::take(&mut files[k]).len();
            files[k] = fit_within(max, (asked[k], over_len), |quality| {
                Ok(pass(data, animation, args, watermark, one, &[quality])?.remove(0))
            })?
            .map_err(|(quality, bytes)| {
                over(format!(
                    "{bytes} bytes at webp quality {quality}, still over max_bytes {max}; ask for \
                     a smaller size or a shorter animation"
                ))
            })?;
        }
        let file = std::mem::take(&mut files[k]);
        let frames = webp::header(&file).map(|h| h.frames).ok();
        out[i] = Some(Encoded {
            data: file,
            width: size.0,
            height: size.1,
            frames,
        });
    }
    Ok(())
}

/// The file of the highest quality on the still path's ladder below `asked` (whose own file
/// was over `max`) that fits in `max` bytes, made by `encode_at`: the lowest rung first, then
/// bisection (sizes fall as the quality does). `Err((quality, bytes))` when even the lowest
/// rung is over (`asked_bytes`: the asked quality's size, when it is the lowest).
fn fit_within(
    max: u64,
    (asked, asked_bytes): (u8, usize),
    mut encode_at: impl FnMut(u8) -> Result<Vec<u8>, TaskError>,
) -> Result<Result<Vec<u8>, (u8, usize)>, TaskError> {
    let ladder = quality_ladder(asked);
    let Some(&lowest) = ladder.last() else {
        // Asked for the lowest quality already.
        return Ok(Err((asked, asked_bytes)));
    };
    let mut best = encode_at(lowest)?;
    if best.len() as u64 > max {
        return Ok(Err((lowest, best.len())));
    }
    // `ladder[fits]` fits; every rung before `first` is known (or taken) to be over.
    let (mut first, mut fits) = (0, ladder.len() - 1);
    while first < fits {
        let mid = (first + fits) / 2;
        let file = encode_at(ladder[mid])?;
        if file.len() as u64 <= max {
            (fits, best) = (mid, file);
        } else {
            first = mid + 1;
        }
    }
    Ok(Ok(best))
}

/// One pass over the source's frames making each output of `plans` at the quality of the same
/// index: its finished files (with the metadata kept, if any), in the same order.
fn pass(
    data: &[u8],
    animation: &Animation,
    args: &TransformArgs,
    watermark: Option<(&Watermark, &Overlay)>,
    plans: &[Planned],
    qualities: &[u8],
) -> Result<Vec<Vec<u8>>, TaskError> {
    let canvas = animation.canvas;
    let (orient, exif) = animation.orientation(args.auto_orient);
    let shown_canvas = swap_size(orient, canvas);
    let smart = plans
        .iter()
        .any(|(i, _, _)| args.outputs[*i].gravity.smart().is_some());
    let mut made = Vec::with_capacity(plans.len());
    for (&(i, plan, size), &quality) in plans.iter().zip(qualities) {
        let spec = &args.outputs[i];
        made.push(Moving {
            spec,
            plan,
            size,
            anchor: plan.anchor,
            encoder: AnimEncoder::new(size, animation.loop_count, quality, spec.lossless)?,
        });
    }
    // As for stills: stripped outputs are converted to sRGB, kept ones carry the profile and
    // the EXIF block.
    let (to_srgb, kept) = match animation.icc.as_deref() {
        _ if !args.strip_metadata => (None, Some((animation.icc.as_deref(), exif.as_deref()))),
        Some(icc) => (ToSrgb::from_icc(icc), None),
        None => (None, None),
    };
    let name = animation.kind.name();
    let cannot = |e: String| invalid("InvalidImage", e);
    let mut frames = match animation.kind {
        Kind::Gif => Frames::Gif(Box::new(gif::Frames::new(data, canvas).map_err(cannot)?)),
        Kind::Webp => Frames::Webp(webp::Frames::new(data).map_err(cannot)?),
    };
    if (frames.canvas().width(), frames.canvas().height()) != canvas {
        return Err(cannot(format!(
            "the {name}'s decoder and its container disagree on its size"
        )));
    }
    // The crop is given in the shown frame; the frames are cut in their stored one, where
    // the first frame places a crop given by its size (and every frame keeps that place).
    let mut cut = None;
    let mut resizer = Resizer::new();
    let mut count = 0u32;
    while let Some(duration) = frames.next(count + 1).map_err(cannot)? {
        count += 1;
        if count > animation.frames {
            return Err(cannot(format!(
                "the {name} decodes to more frames than its container lists ({})",
                animation.frames
            )));
        }
        if count == 1 {
            cut = args
                .crop
                .map(|c| crop_box::stored_rect(c, orient, shown_canvas, frames.canvas()))
                .transpose()?;
        }
        let cropped;
        let base = match cut {
            Some(c) => {
                cropped = frames.canvas().crop_imm(c.x, c.y, c.width, c.height);
                &cropped
            }
            None => frames.canvas(),
        };
        if count == 1 && smart {
            let map = Analysis::of(base);
            for m in made.iter_mut() {
                if let (Fit::Cover, Some(s)) = (m.spec.fit, m.spec.gravity.smart()) {
                    m.anchor = map.anchor(s, m.plan.resize_to);
                }
            }
        }
        for m in made.iter_mut() {
            let scaled = scale(&mut resizer, base, m.plan.resize_to, m.spec.fit, m.anchor)?;
            let shown = dress(
                m.plan.finish(scaled),
                m.spec,
                m.plan.shown,
                to_srgb.as_ref(),
                watermark,
                &mut resizer,
            )?;
            m.encoder.add(&shown, duration)?;
        }
    }
    if count < animation.frames {
        return Err(cannot(format!(
            "the {name} ends after {count} of the {} frames its container lists",
            animation.frames
        )));
    }
    made.into_iter()
        .map(|m| {
            let file = m.encoder.finish()?;
            match kept {
                Some((icc, exif)) if icc.is_some() || exif.is_some() => {
                    webp_meta::with_metadata(file, m.size, false, Metadata { icc, exif })
                }
                _ => Ok(file),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::borrow::Cow;
    use std::io::Cursor;

    use ::gif::{DisposalMethod, Encoder, Frame, Repeat};
    use image::codecs::webp::WebPDecoder;
    use image::{AnimationDecoder, ImageDecoder, RgbaImage};

    use super::*;
    use crate::spec::{CropArg, Format, Gravity};
    use crate::transform::{process, process_with};

    const RED: u8 = 0;
    const GREEN: u8 = 1;
    const BLUE: u8 = 2;
    const CLEAR: u8 = 3;
    const PALETTE: [u8; 12] = [255, 0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0];

    /// A 40×30 GIF: red all over (200 ms, kept), a green 10×10 square at (20, 10) (500 ms,
    /// disposed to background), then a blue 10×10 square at (0, 0) with a transparent hole
    /// (delay 0, which plays as 100 ms); played `repeat`.
    fn gif(repeat: Repeat) -> Vec<u8> {
        let mut out = Vec::new();
        let mut enc = Encoder::new(&mut out, 40, 30, &PALETTE).unwrap();
        enc.set_repeat(repeat).unwrap();
        let frame = |left, top, w: u16, h: u16, delay, dispose, pixels: Vec<u8>| Frame {
            left,
            top,
            width: w,
            height: h,
            delay,
            dispose,
            transparent: Some(CLEAR),
            buffer: Cow::Owned(pixels),
            ..Frame::default()
        };
        enc.write_frame(&frame(
            0,
            0,
            40,
            30,
            20,
            DisposalMethod::Keep,
            vec![RED; 1200],
        ))
        .unwrap();
        enc.write_frame(&frame(
            20,
            10,
            10,
            10,
            50,
            DisposalMethod::Background,
            vec![GREEN; 100],
        ))
        .unwrap();
        let mut blue = vec![BLUE; 100];
        blue[55] = CLEAR;
        enc.write_frame(&frame(0, 0, 10, 10, 0, DisposalMethod::Keep, blue))
            .unwrap();
        drop(enc);
        out
    }

    fn webp_output(key: &str, width: Option<u32>, lossless: bool) -> OutputSpec {
        OutputSpec {
            width,
            lossless,
            animated: true,
            ..OutputSpec::new(key, Format::Webp)
        }
    }

    fn job(outputs: Vec<OutputSpec>) -> TransformArgs {
        TransformArgs::new("", outputs)
    }

    /// The frames of an animated WebP as libwebp's `WebPAnimDecoder` composes them, with their
    /// durations in milliseconds.
    fn frames_of(file: &[u8]) -> Vec<(RgbaImage, u32)> {
        let mut frames = webp::Frames::new(file).unwrap();
        let mut all = Vec::new();
        while let Some(ms) = frames.next(all.len() as u32 + 1).unwrap() {
            all.push((frames.canvas().to_rgba8(), ms));
        }
        all
    }

    /// The frame count and durations `image`'s own WebP decoder (image-webp) reads: a second,
    /// independent reader. (Its composition is not used: it left a disposed area opaque
    /// where libwebp and browsers clear it.)
    fn durations_by_image(file: &[u8]) -> Vec<u32> {
        let decoder = WebPDecoder::new(Cursor::new(file)).unwrap();
        assert!(decoder.has_animation());
        decoder
            .into_frames()
            .map(|f| {
                let (n, d) = f.unwrap().delay().numer_denom_ms();
                n / d
            })
            .collect()
    }

    fn limits() -> Limits {
        Limits {
            max_pixels: 50_000_000,
            max_anim_frames: 500,
            max_anim_pixels: 250_000_000,
        }
    }

    #[test]
    fn a_gif_becomes_an_animated_webp_with_its_frames_durations_and_loops() {
        let data = gif(Repeat::Finite(3));
        let args = job(vec![
            webp_output("full.webp", None, true),
            webp_output("half.webp", Some(20), false),
        ]);
        let (info, made) = process_with(&data, &args, &limits(), None).unwrap();
        assert_eq!(
            (info.width, info.height, info.format.as_str()),
            (40, 30, "gif")
        );
        assert_eq!(made[0].frames, Some(3));
        assert_eq!((made[1].width, made[1].height), (20, 15));
        for (m, size) in made.iter().zip([(40, 30), (20, 15)]) {
            let header = webp::header(&m.data).unwrap();
            assert_eq!(
                (header.canvas, header.frames, header.loop_count),
                (size, 3, 3)
            );
            let frames = frames_of(&m.data);
            let durations: Vec<u32> = frames.iter().map(|(_, d)| *d).collect();
            assert_eq!(durations, [200, 500, 100]);
            assert_eq!(durations_by_image(&m.data), durations);
        }
        // Lossless: the composition is exact. Frame 2 draws green over the red; frame 3 finds
        // the green disposed (transparent), draws blue at the corner, its hole showing red.
        let frames = frames_of(&made[0].data);
        let px = |f: usize, x, y| frames[f].0.get_pixel(x, y).0;
        assert_eq!(px(0, 25, 15), [255, 0, 0, 255]);
        assert_eq!(px(1, 25, 15), [0, 255, 0, 255]);
        assert_eq!(px(1, 5, 5), [255, 0, 0, 255]);
        assert_eq!(px(2, 25, 15)[3], 0);
        assert_eq!(px(2, 2, 2), [0, 0, 255, 255]);
        assert_eq!(px(2, 5, 5), [255, 0, 0, 255]);
        assert_eq!(px(2, 35, 25), [255, 0, 0, 255]);
    }

    #[test]
    fn the_crop_and_the_watermark_apply_to_every_frame() {
        let data = gif(Repeat::Infinite);
        let mut args = job(vec![webp_output("o.webp", None, true)]);
        // The right half: frame 2's green square is at (20, 10)–(30, 20), so at (0, 10) here.
        args.crop = Some(CropArg::from(crate::spec::Crop {
            x: 20,
            y: 0,
            width: 20,
            height: 30,
        }));
        args.watermark = Some(Watermark {
            key: "mark.png".into(),
            position: Gravity::Southeast,
            margin: 0,
            opacity: 1.0,
            scale: None,
        });
        let mut mark = Vec::new();
        DynamicImage::ImageRgba8(RgbaImage::from_pixel(
            4,
            4,
            image::Rgba([255, 255, 255, 255]),
        ))
        .write_to(&mut Cursor::new(&mut mark), image::ImageFormat::Png)
        .unwrap();
        let overlay = Overlay::decode(&mark, "mark.png", 1 << 20, |_| {}).unwrap();
        let (_, made) = process_with(&data, &args, &limits(), Some(&overlay)).unwrap();
        assert_eq!((made[0].width, made[0].height), (20, 30));
        let frames = frames_of(&made[0].data);
        assert_eq!(frames.len(), 3);
        assert_eq!(frames[1].0.get_pixel(5, 15).0, [0, 255, 0, 255]);
        assert_eq!(frames[1].0.get_pixel(15, 5).0, [255, 0, 0, 255]);
        for (i, (frame, _)) in frames.iter().enumerate() {
            // The white mark in the bottom-right corner of every frame.
            assert_eq!(frame.get_pixel(18, 28).0, [255, 255, 255, 255], "frame {i}");
        }
        // A crop outside the canvas is refused before anything is decoded.
        args.crop = Some(CropArg::from(crate::spec::Crop {
            x: 30,
            y: 0,
            width: 20,
            height: 30,
        }));
        let err = process_with(&data, &args, &limits(), Some(&overlay))
            .err()
            .unwrap();
        assert!(
            err.message.contains("not inside the 40×30 source"),
            "{}",
            err.message
        );
    }

    #[test]
    fn loop_counts_follow_the_gif() {
        for (repeat, want) in [
            (Repeat::Infinite, 0),
            (Repeat::Finite(0), 1),
            (Repeat::Finite(7), 7),
        ] {
            let data = gif(repeat);
            let (_, made) = process_with(
                &data,
                &job(vec![webp_output("o", None, false)]),
                &limits(),
                None,
            )
            .unwrap();
            assert_eq!(
                webp::header(&made[0].data).unwrap().loop_count,
                want,
                "{repeat:?}"
            );
        }
    }

    #[test]
    fn an_animated_webp_source_keeps_its_frames() {
        // Made by the encoder under test from three flat frames of 120, 80 and 300 ms.
        let mut enc = AnimEncoder::new((64, 48), 0, 90, false).unwrap();
        for (colour, ms) in [
            ([200u8, 30, 30], 120),
            ([30, 200, 30], 80),
            ([30, 30, 200], 300),
        ] {
            let frame = image::RgbImage::from_pixel(64, 48, image::Rgb(colour));
            enc.add(&DynamicImage::ImageRgb8(frame), ms).unwrap();
        }
        let source = enc.finish().unwrap();
        assert!(webp::is_animated(&source));
        let mut cover = webp_output("c.webp", Some(16), false);
        cover.height = Some(16);
        cover.fit = Fit::Cover;
        cover.gravity = Gravity::Attention;
        let (info, made) = process_with(&source, &job(vec![cover]), &limits(), None).unwrap();
        assert_eq!(info.format, "webp");
        let frames = frames_of(&made[0].data);
        assert_eq!(frames.len(), 3);
        assert_eq!(
            frames.iter().map(|f| f.1).collect::<Vec<_>>(),
            [120, 80, 300]
        );
        assert_eq!(frames[1].0.dimensions(), (16, 16));
        let green = frames[1].0.get_pixel(8, 8).0;
        assert!(green[1] > 150 && green[0] < 80, "{green:?}");
    }

    #[test]
    fn a_profile_is_converted_to_srgb_or_kept() {
        // A Display P3 animated WebP (lossless, so the pixels are exact).
        let orange = [180u8, 120, 60];
        let mut enc = AnimEncoder::new((8, 8), 0, 100, true).unwrap();
        for colour in [orange, [0, 0, 255]] {
            let frame = image::RgbImage::from_pixel(8, 8, image::Rgb(colour));
            enc.add(&DynamicImage::ImageRgb8(frame), 100).unwrap();
        }
        let p3 = moxcms::ColorProfile::new_display_p3().encode().unwrap();
        let meta = Metadata {
            icc: Some(&p3),
            exif: None,
        };
        let source = webp_meta::with_metadata(enc.finish().unwrap(), (8, 8), false, meta).unwrap();
        assert_eq!(webp::header(&source).unwrap().icc.as_deref(), Some(&p3[..]));
        // Stripped (the default): converted to sRGB as a still would be, untagged.
        let mut args = job(vec![webp_output("o.webp", None, true)]);
        let (_, made) = process_with(&source, &args, &limits(), None).unwrap();
        let header = webp::header(&made[0].data).unwrap();
        assert_eq!((header.frames, header.icc), (2, None));
        let one = image::RgbImage::from_pixel(1, 1, image::Rgb(orange));
        let mut want = DynamicImage::ImageRgb8(one);
        ToSrgb::from_icc(&p3).unwrap().apply(&mut want);
        let want = want.to_rgb8().get_pixel(0, 0).0;
        assert_ne!(want, orange);
        let got = frames_of(&made[0].data)[0].0.get_pixel(4, 4).0;
        assert_eq!(got, [want[0], want[1], want[2], 255]);
        // Kept: the same pixels, tagged, still an animation.
        args.strip_metadata = false;
        let (_, made) = process_with(&source, &args, &limits(), None).unwrap();
        assert!(webp::is_animated(&made[0].data));
        let header = webp::header(&made[0].data).unwrap();
        assert_eq!(header.frames, 2);
        assert_eq!(header.icc.as_deref(), Some(&p3[..]));
        let got = frames_of(&made[0].data)[0].0.get_pixel(4, 4).0;
        assert_eq!(got, [orange[0], orange[1], orange[2], 255]);
    }

    #[test]
    fn without_animated_or_from_a_still_the_output_is_a_still() {
        let data = gif(Repeat::Infinite);
        let mut still = webp_output("s.webp", None, true);
        still.animated = false;
        let (_, made) = process_with(&data, &job(vec![still]), &limits(), None).unwrap();
        assert!(!webp::is_animated(&made[0].data));
        assert_eq!(made[0].frames, None);
        // The first frame: red.
        let first = image::load_from_memory(&made[0].data).unwrap().to_rgba8();
        assert_eq!(first.get_pixel(25, 15).0, [255, 0, 0, 255]);
        // A one-frame GIF asked for an animation gives a still too.
        let mut one = Vec::new();
        let mut enc = Encoder::new(&mut one, 4, 4, &PALETTE).unwrap();
        enc.write_frame(&Frame {
            width: 4,
            height: 4,
            buffer: Cow::Owned(vec![GREEN; 16]),
            ..Frame::default()
        })
        .unwrap();
        drop(enc);
        let (_, made) = process(&one, &job(vec![webp_output("o", None, false)]), 1 << 20).unwrap();
        assert!(!webp::is_animated(&made[0].data));
    }

    #[test]
    fn budgets_are_checked_from_the_container() {
        let data = gif(Repeat::Infinite);
        let args = job(vec![webp_output("o.webp", None, false)]);
        let run = |limits: Limits| {
            process_with(&data, &args, &limits, None)
                .err()
                .map(|e| format!("{}: {}", e.exc_type, e.message))
        };
        assert_eq!(
            run(Limits {
                max_anim_frames: 2,
                ..limits()
            })
            .unwrap(),
            "SourceTooLarge: the animated gif has 3 frames; the limit is 2 (image_max_anim_frames)"
        );
        assert_eq!(
            run(Limits {
                max_anim_pixels: 3000,
                ..limits()
            })
            .unwrap(),
            "SourceTooLarge: the animated gif is 3 frames of 40×30 (0.0 MP in all); the limit is \
             0.0 MP (image_max_anim_pixels)"
        );
        // An output enlarged past the budget is refused though the source is within it.
        let mut big = webp_output("big.webp", Some(400), false);
        big.height = Some(300);
        big.fit = Fit::Fill;
        let err = process_with(
            &data,
            &job(vec![big]),
            &Limits {
                max_anim_pixels: 300_000,
                ..limits()
            },
            None,
        )
        .err()
        .unwrap();
        assert_eq!(err.exc_type, "OutputTooLarge");
        assert!(
            err.message
                .starts_with("outputs[0] (big.webp) would be 3 frames of 400×300"),
            "{}",
            err.message
        );
        assert_eq!(run(limits()), None);
    }

    /// Damaged copies of an animated GIF and WebP (bytes overwritten, or cut) fail with a
    /// message or decode; none panics (the composition's slicing is fed by the file).
    #[test]
    fn damaged_animations_fail_or_decode() {
        let mut enc = AnimEncoder::new((24, 16), 0, 70, false).unwrap();
        for i in 0..4u8 {
            let frame = RgbaImage::from_fn(24, 16, |x, y| {
                image::Rgba([i * 60, x as u8 * 10, y as u8 * 15, 128 + i * 30])
            });
            enc.add(&DynamicImage::ImageRgba8(frame), 50).unwrap();
        }
        let sources = [gif(Repeat::Finite(2)), enc.finish().unwrap()];
        let args = job(vec![webp_output("o.webp", Some(12), false)]);
        let mut seed = 12_345u32;
        let mut next = |below: usize| {
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (seed >> 8) as usize % below
        };
        let (mut failed, mut made) = (0, 0);
        for source in &sources {
            for round in 0..150 {
                let mut copy = source.clone();
                if round % 3 == 0 {
                    copy.truncate(16 + next(copy.len() - 16));
                } else {
                    for _ in 0..1 + next(4) {
                        let at = 6 + next(copy.len() - 6);
                        copy[at] = next(256) as u8;
                    }
                }
                match process_with(&copy, &args, &limits(), None) {
                    Ok(_) => made += 1,
                    Err(e) => {
                        assert!(!e.message.is_empty());
                        failed += 1;
                    }
                }
            }
        }
        assert!(failed > 0 && made > 0, "{failed} failed, {made} made");
    }

    #[test]
    fn cut_animations_fail_naming_where() {
        let data = gif(Repeat::Infinite);
        // Cut inside the last frame's pixel data.
        let cut = &data[..data.len() - 12];
        let err = probe(cut, &limits()).err().unwrap();
        assert_eq!(err.exc_type, "InvalidImage");
        assert!(
            err.message.contains("frame 3 of the gif"),
            "{}",
            err.message
        );

        let mut enc = AnimEncoder::new((8, 8), 0, 80, false).unwrap();
        for red in [100, 200] {
            let frame = RgbaImage::from_pixel(8, 8, image::Rgba([red, 0, 0, 255]));
            enc.add(&DynamicImage::ImageRgba8(frame), 100).unwrap();
        }
        enc.add(&DynamicImage::ImageRgba8(RgbaImage::new(8, 8)), 100)
            .unwrap();
        let file = enc.finish().unwrap();
        let err = probe(&file[..file.len() - 20], &limits()).err().unwrap();
        assert_eq!(err.exc_type, "InvalidImage");
        assert!(
            err.message.contains("the webp is cut short"),
            "{}",
            err.message
        );
    }

    /// Four 96×64 frames of noise (a fixed xorshift, so every run is the same), 100 ms each,
    /// made at quality 100: detail that lower qualities visibly shrink.
    fn noisy_animation() -> Vec<u8> {
        let mut state: u64 = 0x2545_f491_4f6c_dd1d;
        let mut enc = AnimEncoder::new((96, 64), 0, 100, false).unwrap();
        for _ in 0..4 {
            let frame = image::RgbImage::from_fn(96, 64, |_, _| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let [r, g, b, ..] = state.to_le_bytes();
                image::Rgb([r, g, b])
            });
            enc.add(&DynamicImage::ImageRgb8(frame), 100).unwrap();
        }
        enc.finish().unwrap()
    }

    #[test]
    fn max_bytes_lowers_an_animations_quality_or_fails_saying_so() {
        let source = noisy_animation();
        let made =
            |spec: &OutputSpec| process_with(&source, &job(vec![spec.clone()]), &limits(), None);
        let asked = webp_output("n.webp", None, false);
        let at_asked = made(&asked).unwrap().1[0].data.len() as u64;
        let lowest = OutputSpec {
            quality: Some(30),
            ..asked.clone()
        };
        let at_lowest = made(&lowest).unwrap().1[0].data.len() as u64;
        assert!(at_lowest < at_asked * 3 / 4, "{at_lowest} vs {at_asked}");

        // A limit between the two is met by a lower quality, every frame kept.
        let max = (at_asked + at_lowest) / 2;
        let limited = OutputSpec {
            max_bytes: Some(max),
            ..asked.clone()
        };
        let (_, out) = made(&limited).unwrap();
        let len = out[0].data.len() as u64;
        assert!(len <= max && len >= at_lowest, "{len} for max_bytes {max}");
        assert_eq!(out[0].frames, Some(4));
        assert_eq!(frames_of(&out[0].data).len(), 4);

        // Below what quality 30 makes: a failure that says so.
        let impossible = OutputSpec {
            max_bytes: Some(at_lowest - 1),
            ..asked.clone()
        };
        let err = made(&impossible)
            .err()
            .expect("over max_bytes at quality 30");
        assert_eq!(err.exc_type, "OutputTooLarge");
        assert!(
            err.message.contains(&format!(
                "{at_lowest} bytes at webp quality 30, still over max_bytes"
            )),
            "{}",
            err.message
        );

        // Lossless cannot be lowered.
        let lossless = OutputSpec {
            max_bytes: Some(100),
            ..webp_output("l.webp", None, true)
        };
        let err = made(&lossless).err().expect("lossless over max_bytes");
        assert_eq!(err.exc_type, "OutputTooLarge");
        assert!(err.message.contains("lossless"), "{}", err.message);
    }

    /// The search picks what the still path's linear walk picks, in fewer encodes.
    #[test]
    fn the_quality_search_bisects_the_still_ladder() {
        let size = |q: u8| usize::from(q) * 100;
        for asked in [100u8, 80, 75, 45, 31, 30, 10] {
            for max in (0..=10_000).step_by(250) {
                let mut calls = 0u32;
                let got = fit_within(max, (asked, size(asked)), |q| {
                    calls += 1;
                    Ok(vec![0; size(q)])
                })
                .unwrap();
                let walk = quality_ladder(asked)
                    .into_iter()
                    .find(|&q| size(q) as u64 <= max);
                match walk {
                    Some(q) => assert_eq!(got.map(|f| f.len()), Ok(size(q)), "{asked} {max}"),
                    None => assert!(got.is_err(), "{asked} {max}"),
                }
                assert!(calls < MAX_ENCODES, "{asked} {max}: {calls} encodes");
            }
        }
    }

    #[test]
    fn an_animated_webps_exif_orientation_is_applied() {
        // Stored 64×48, red on the left and blue on the right, EXIF orientation 6 (turn 90°
        // clockwise): shown 48×64, red on top.
        let mut enc = AnimEncoder::new((64, 48), 0, 90, false).unwrap();
        // Two frames, a shade apart (identical ones would be merged into one).
        for (ms, shade) in [(100, 220), (200, 200)] {
            let frame = image::RgbImage::from_fn(64, 48, |x, _| {
                image::Rgb(if x < 32 {
                    [shade, 20, 20]
                } else {
                    [20, 20, shade]
                })
            });
            enc.add(&DynamicImage::ImageRgb8(frame), ms).unwrap();
        }
        let exif = b"MM\0\x2a\0\0\0\x08\0\x01\x01\x12\0\x03\0\0\0\x01\0\x06\0\0\0\0\0\0".to_vec();
        let meta = Metadata {
            icc: None,
            exif: Some(&exif),
        };
        let source =
            webp_meta::with_metadata(enc.finish().unwrap(), (64, 48), false, meta).unwrap();
        assert_eq!(webp::header(&source).unwrap().exif, Some(exif));

        let mut args = job(vec![webp_output("o.webp", Some(24), false)]);
        args.strip_metadata = false;
        let (info, made) = process_with(&source, &args, &limits(), None).unwrap();
        assert_eq!((info.width, info.height), (48, 64));
        assert_eq!((made[0].width, made[0].height), (24, 32));
        let frames = frames_of(&made[0].data);
        assert_eq!(frames.len(), 2);
        let (top, bottom) = (
            frames[1].0.get_pixel(12, 4).0,
            frames[1].0.get_pixel(12, 28).0,
        );
        assert!(top[0] > 150 && top[2] < 90, "top {top:?}");
        assert!(bottom[2] > 150 && bottom[0] < 90, "bottom {bottom:?}");
        // The kept EXIF no longer turns it.
        let kept = WebPDecoder::new(Cursor::new(&made[0].data))
            .unwrap()
            .exif_metadata()
            .unwrap()
            .unwrap();
        assert_eq!(
            Orientation::from_exif_chunk(&kept),
            Some(Orientation::NoTransforms)
        );

        // Without auto_orient it stays as stored; a crop is in the shown frame.
        args.auto_orient = false;
        let (info, made) = process_with(&source, &args, &limits(), None).unwrap();
        assert_eq!((info.width, info.height), (64, 48));
        assert_eq!((made[0].width, made[0].height), (24, 18));
        args.auto_orient = true;
        args.crop = Some(CropArg::from(crate::spec::Crop {
            x: 0,
            y: 40,
            width: 48,
            height: 24,
        }));
        args.outputs[0].width = None;
        let (_, made) = process_with(&source, &args, &limits(), None).unwrap();
        assert_eq!((made[0].width, made[0].height), (48, 24));
        let px = frames_of(&made[0].data)[0].0.get_pixel(24, 12).0;
        assert!(
            px[2] > 150 && px[0] < 90,
            "the crop keeps the shown bottom (blue): {px:?}"
        );
    }
}

//! `image.transform`: read one source, decode it once, crop it, then derive every output from
//! that one decode — resized to its fit (`cover`'s window chosen by its gravity, or by the
//! picture's content for `entropy`/`attention`, `smartcrop.rs`), turned by its EXIF orientation
//! (at output size, see `orient.rs`), converted to sRGB, padded or flattened, watermarked
//! (`overlay.rs`), encoded to its format within `max_bytes` — and store each variant. The CPU
//! part runs on the worker's bounded pool. Outputs asking for `animated` from an animated
//! source are made frame by frame in `anim/` instead (after the still ones, if any).

use std::sync::Arc;

use bytes::Bytes;
use fast_image_resize::Resizer;
use image::DynamicImage;
use mediafarm::storage::sources::{Source, Sources};
use mediafarm::storage::Storage;
use mediafarm::{Settings, Task, TaskContext, TaskError};

use crate::anim;
use crate::colour::ToSrgb;
use crate::crop_box;
use crate::decode::{decode, Decoded};
use crate::encode::{encode, Metadata};
use crate::geometry::{crop, flatten, pad, scale, target_size};
use crate::orient::{plan_output, OutputPlan};
use crate::overlay::{draw, draw_bytes, Overlay, OverlayCache};
use crate::settings::ImageSettings;
use crate::smartcrop::{Analysis, ANALYSIS_BYTES};
use crate::spec::{
    check_args, invalid, parse_colour, Fit, Format, OutputInfo, OutputSpec, SourceInfo,
    TransformArgs, TransformResult, Watermark,
};

/// What transparent pixels become in a JPEG unless the output names a background.
const JPEG_BACKGROUND: [u8; 3] = [255, 255, 255];

/// The task, with the storage and source rules of one worker.
pub struct Transform {
    sources: Sources,
    storage: Storage,
    max_src_bytes: u64,
    limits: Limits,
    overlays: Arc<OverlayCache>,
}

impl Transform {
    pub fn new(
        settings: &Settings,
        image: &ImageSettings,
    ) -> Result<Transform, mediafarm::storage::StorageError> {
        let storage = Storage::from_settings(settings)?;
        Ok(Transform {
            sources: Sources::new(settings, storage.clone()),
            storage,
            max_src_bytes: image.image_max_src_bytes,
            limits: Limits::from(image),
            overlays: Arc::new(OverlayCache::new(image.image_watermark_cache_bytes)),
        })
    }

    /// This worker's watermark overlay cache (its hit and miss counts).
    pub fn overlays(&self) -> Arc<OverlayCache> {
        self.overlays.clone()
    }

    /// The decoded overlay for `w`: from the cache, or read from storage and decoded.
    async fn overlay(&self, ctx: &TaskContext, w: &Watermark) -> Result<Arc<Overlay>, TaskError> {
        if let Some(found) = self.overlays.get(&w.key) {
            tracing::debug!(key = %w.key, "watermark overlay from the cache");
            return Ok(found);
        }
        let data = self
            .storage
            .get(&w.key, self.max_src_bytes)
            .await
            .map_err(|e| match e {
                mediafarm::storage::StorageError::NotFound { .. }
                | mediafarm::storage::StorageError::TooLarge { .. } => {
                    invalid("InvalidWatermark", format!("watermark.key: {e}"))
                }
                other => TaskError::from(other),
            })?;
        let cache = self.overlays.clone();
        let key = w.key.clone();
        let overlay = ctx
            .cpu(move || {
                let max = cache.max_overlay_bytes();
                Overlay::decode(&data, &key, max, |bytes| cache.make_room(bytes)).map(Arc::new)
            })
            .await??;
        self.overlays.insert(&w.key, overlay.clone());
        Ok(overlay)
    }
}

impl Task for Transform {
    const NAME: &'static str = "image.transform";
    /// In a chain, the previous step's return value is the source (an upload's storage key).
    const PARENT_RESULT: Option<&'static str> = Some("source");
    type Args = TransformArgs;
    type Output = TransformResult;

    async fn run(
        &self,
        ctx: TaskContext,
        args: TransformArgs,
    ) -> Result<TransformResult, TaskError> {
        let source = vet(&args)?;
        let overlay = match &args.watermark {
            Some(w) if args.outputs.iter().any(|o| o.watermark) => {
                Some(self.overlay(&ctx, w).await?)
            }
            _ => None,
        };
        let data = self.sources.read(&source, self.max_src_bytes).await?;
        let limits = self.limits;
        let specs = args.clone();
        let (info, encoded) = ctx
            .cpu(move || {
                let made = process_with(&data, &specs, &limits, overlay.as_deref());
                drop(overlay);
                drop(data);
                // Jobs run on the CPU pool's threads in turn, and mimalloc returns a thread's
                // freed pages to the OS only when that thread next allocates: the image
                // buffers of a job whose thread then sat idle stayed resident (RSS grew from
                // 56 to 173 MB over 16 jobs on 50 MP sources). One collection per job
                // returns them; purging on every free instead cost 40 % of the throughput.
                // Collecting only after jobs over 25 MP gave no measurable CPU back on 8–24 MP
                // photographs and 55 MB more peak RSS (BENCHMARKS.md, "Where an image job's
                // CPU goes").
                // SAFETY: `mi_collect` only releases this thread's free memory.
                unsafe { libmimalloc_sys::mi_collect(true) };
                made
            })
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
                frames: out.frames,
            });
        }
        Ok(TransformResult {
            source: info,
            outputs,
        })
    }
}

/// Everything checked before the source is read: the outputs, their keys, the source's form.
pub fn vet(args: &TransformArgs) -> Result<Source, TaskError> {
    check_args(args)?;
    for out in &args.outputs {
        mediafarm::storage::check_key(&out.key)?;
    }
    if let Some(w) = &args.watermark {
        mediafarm::storage::check_key(&w.key)
            .map_err(|e| invalid("InvalidWatermark", format!("watermark.key: {e}")))?;
    }
    Ok(Source::parse(&args.source)?)
}

/// One encoded output.
pub struct Encoded {
    pub data: Vec<u8>,
    pub width: u32,
    pub height: u32,
    /// Frames of an animated output.
    pub frames: Option<u32>,
}

/// The source limits a worker applies (its `image_max_*` settings).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    /// Pixels of one picture (an animation's canvas).
    pub max_pixels: u64,
    /// Frames of an animated source made into an animated output.
    pub max_anim_frames: u64,
    /// Frames × width × height of such a source, and of each animated output.
    pub max_anim_pixels: u64,
}

impl From<&ImageSettings> for Limits {
    fn from(s: &ImageSettings) -> Limits {
        Limits {
            max_pixels: s.image_max_src_pixels,
            max_anim_frames: s.image_max_anim_frames,
            max_anim_pixels: s.image_max_anim_pixels,
        }
    }
}

/// Decodes `data` once and encodes every output (CPU only; no I/O), without a watermark;
/// animations within the default settings' limits.
pub fn process(
    data: &[u8],
    args: &TransformArgs,
    max_pixels: u64,
) -> Result<(SourceInfo, Vec<Encoded>), TaskError> {
    let limits = Limits {
        max_pixels,
        ..Limits::from(&ImageSettings::default())
    };
    process_with(data, args, &limits, None)
}

/// [`process`], drawing `overlay` (the decoded `args.watermark`) onto the outputs that take it.
/// Outputs asking for `animated` from an animated GIF or WebP are made by `anim::encode`
/// (after the still ones, each holding its own share of the decode budget in turn); from a
/// still source they are stills.
pub fn process_with(
    data: &[u8],
    args: &TransformArgs,
    limits: &Limits,
    overlay: Option<&Overlay>,
) -> Result<(SourceInfo, Vec<Encoded>), TaskError> {
    let animation = if args.outputs.iter().any(|o| o.animated) {
        anim::probe(data, limits)?
    } else {
        None
    };
    let moving: Vec<bool> = args
        .outputs
        .iter()
        .map(|o| o.animated && animation.is_some())
        .collect();
    let mut out: Vec<Option<Encoded>> = (0..args.outputs.len()).map(|_| None).collect();
    let watermark = args.watermark.as_ref().zip(overlay);
    let info = match &animation {
        Some(a) if moving.iter().all(|&m| m) => a.info(data, args.auto_orient),
        _ => process_stills(data, args, limits.max_pixels, watermark, &moving, &mut out)?,
    };
    if let Some(a) = &animation {
        anim::encode(data, a, args, limits, watermark, &moving, &mut out)?;
    }
    Ok((info, out.into_iter().flatten().collect()))
}

/// The still outputs (those not `moving`) from one decode of `data`, into `out`.
fn process_stills(
    data: &[u8],
    args: &TransformArgs,
    max_pixels: u64,
    watermark: Option<(&Watermark, &Overlay)>,
    moving: &[bool],
    out: &mut [Option<Encoded>],
) -> Result<SourceInfo, TaskError> {
    let smart = args
        .outputs
        .iter()
        .zip(moving)
        .any(|(o, &m)| !m && o.fit == Fit::Cover && o.gravity.smart().is_some());
    let stills = || {
        args.outputs
            .iter()
            .zip(moving)
            .filter(|(_, &m)| !m)
            .map(|(o, _)| o)
    };
    // What the job holds besides the decode and the resize: the smart crop's map, and the
    // overlay's copies for the largest output (the overlay itself when it is not pinned).
    let extra = |shown: (u32, u32)| {
        let full = args.crop.map_or(shown, |c| c.size());
        // The crop's own analysis (a smart-placed crop) is dropped before the outputs' one.
        let smart_crop = args.crop.is_some_and(|c| c.smart().is_some());
        let mut bytes = if smart || smart_crop {
            ANALYSIS_BYTES
        } else {
            0
        };
        if let Some((w, o)) = watermark {
            let largest = stills()
                .filter(|spec| spec.watermark)
                .map(|spec| match spec.fit {
                    Fit::Contain => (spec.width.unwrap_or(full.0), spec.height.unwrap_or(full.1)),
                    fit => target_size(full, fit, spec.width, spec.height),
                })
                .max_by_key(|&(w, h)| u64::from(w) * u64::from(h))
                .unwrap_or((0, 0));
            bytes += draw_bytes(o, largest, w) + if o.pinned() { 0 } else { o.bytes() };
        }
        bytes
    };
    // Shrink-on-load: the share of the source's resolution the most demanding output needs
    // (all of it when cropping, where the crop rectangle is in full-size pixels).
    let share_needed = |full: (u32, u32)| {
        if args.crop.is_some() {
            return 1.0;
        }
        stills()
            .map(|spec| {
                let (w, h) = target_size(full, spec.fit, spec.width, spec.height);
                (f64::from(w) / f64::from(full.0)).max(f64::from(h) / f64::from(full.1))
            })
            .fold(0.0f64, f64::max)
    };
    // Stages are `trace` spans, off in a worker; `examples/stage-cpu.rs` times them in CPU.
    let decoding = tracing::trace_span!("decode").entered();
    // The reservation is held until every output is made from the decoded image.
    let Decoded {
        image: img,
        info,
        orientation,
        icc,
        exif,
        reservation: _held,
    } = decode(data, args.auto_orient, max_pixels, share_needed, extra)?;
    drop(decoding);
    // The pixels stay as stored until each output is made: the crop and every size are
    // mapped into the stored frame, and only the output-size picture is turned (orient.rs).
    let shown_full = (info.width, info.height);
    let img = match args.crop {
        Some(c) => {
            // Crops decode at full scale (share 1), so the rectangle is in decoded pixels.
            let rect = crop_box::stored_rect(c, orientation, shown_full, &img)?;
            crop(img, rect)?
        }
        None => img,
    };
    // Sizes follow the (cropped) source's full size, whatever scale it was decoded at.
    let full = args.crop.map_or(shown_full, |c| c.size());
    // Stripped outputs carry no profile, so their pixels must be sRGB; kept ones carry the
    // source's profile and keep its pixels — except AVIF, whose encoder here writes no ICC.
    let to_srgb = icc.as_deref().and_then(ToSrgb::from_icc);
    let kept = Metadata {
        icc: icc.as_deref(),
        exif: exif.as_deref(),
    };
    // One analysis map for every smart-gravity output (in the stored frame, like `img`).
    let analysis = smart.then(|| Analysis::of(&img));
    let mut resizer = Resizer::new();
    let plans: Vec<OutputPlan> = args
        .outputs
        .iter()
        .map(|spec| plan_output(full, orientation, spec))
        .collect();
    // Largest first, so smaller outputs can be derived from a larger one already made (as
    // libvips does) instead of from the full source each time.
    let mut order: Vec<usize> = (0..args.outputs.len()).filter(|&i| !moving[i]).collect();
    order.sort_by_key(|&i| {
        let (w, h) = plans[i].shown;
        std::cmp::Reverse(u64::from(w) * u64::from(h))
    });
    // Stored-frame resizes, like `img`.
    let mut derived: Vec<DynamicImage> = Vec::new();
    for i in order {
        let spec = &args.outputs[i];
        let plan = plans[i];
        let (w, h) = plan.shown;
        let (rw, rh) = plan.resize_to;
        // A smaller whole-picture image still has at least twice the detail the output needs.
        let base = derived
            .iter()
            .filter(|d| d.width() >= rw.saturating_mul(2) && d.height() >= rh.saturating_mul(2))
            .min_by_key(|d| u64::from(d.width()) * u64::from(d.height()))
            .unwrap_or(&img);
        let anchor = match (spec.fit, spec.gravity.smart(), &analysis) {
            (Fit::Cover, Some(smart), Some(map)) => map.anchor(smart, plan.resize_to),
            _ => plan.anchor,
        };
        let resizing = tracing::trace_span!("resize").entered();
        let scaled = scale(&mut resizer, base, plan.resize_to, spec.fit, anchor)?;
        drop(resizing);
        let finishing = tracing::trace_span!("finish").entered();
        // Smaller outputs may be derived from this resize (largest first, see above).
        let keep = matches!(spec.fit, Fit::Inside | Fit::Contain) && (w, h) != full;
        let (convert, meta) = match (args.strip_metadata, spec.format) {
            (true, _) => (true, Metadata::default()),
            (false, Format::Avif) => (true, Metadata { icc: None, ..kept }),
            (false, _) => (false, kept),
        };
        let to_srgb = to_srgb.as_ref().filter(|_| convert);
        // An output that is the resize itself — not turned, and left as it is by `dress` — is
        // encoded from the kept resize instead of from a copy of it (a 1280 px output's copy
        // was 7 % of a job's page faults through the broker).
        let as_resized =
            keep && plan.orient.is_none() && dress_leaves(&scaled, spec, to_srgb, watermark);
        let dressed;
        let shown: &DynamicImage = if as_resized {
            derived.push(scaled);
            &derived[derived.len() - 1]
        } else {
            let finished = if keep {
                let own = plan
                    .finish_copy(&scaled)
                    .unwrap_or_else(|| plan.finish(scaled.clone()));
                derived.push(scaled);
                own
            } else {
                plan.finish(scaled)
            };
            dressed = dress(finished, spec, (w, h), to_srgb, watermark, &mut resizer)?;
            &dressed
        };
        drop(finishing);
        let encoding = tracing::trace_span!("encode").entered();
        let data = encode(shown, spec, meta).map_err(|e| match e.kind {
            mediafarm::FailureKind::Invalid => invalid(
                "OutputTooLarge",
                format!("outputs[{i}] ({}): {}", spec.key, e.message),
            ),
            _ => e,
        })?;
        drop(encoding);
        out[i] = Some(Encoded {
            data,
            width: shown.width(),
            height: shown.height(),
            frames: None,
        });
    }
    Ok(info)
}

/// Finishes one output from its resized, turned picture (`shown`, of size `(w, h)`):
/// converted to sRGB by `to_srgb`, padded (`contain`) or flattened onto its background, and
/// watermarked when it takes `watermark`.
/// Whether [`dress`] hands `shown` back as it is: no colour conversion, no padding, nothing to
/// flatten (8-bit RGB already), no watermark.
fn dress_leaves(
    shown: &DynamicImage,
    spec: &OutputSpec,
    to_srgb: Option<&ToSrgb>,
    watermark: Option<(&Watermark, &Overlay)>,
) -> bool {
    to_srgb.is_none()
        && spec.fit != Fit::Contain
        && matches!(shown, DynamicImage::ImageRgb8(_))
        && watermark.filter(|_| spec.watermark).is_none()
}

pub(crate) fn dress(
    mut shown: DynamicImage,
    spec: &OutputSpec,
    (w, h): (u32, u32),
    to_srgb: Option<&ToSrgb>,
    watermark: Option<(&Watermark, &Overlay)>,
    resizer: &mut Resizer,
) -> Result<DynamicImage, TaskError> {
    if let Some(conversion) = to_srgb {
        conversion.apply(&mut shown);
    }
    let background = match (
        spec.background.as_deref().and_then(parse_colour),
        spec.format,
    ) {
        (Some(bg), _) => Some(bg),
        (None, Format::Jpeg) => Some(JPEG_BACKGROUND),
        (None, _) => None,
    };
    let shown = match (spec.fit, background) {
        (Fit::Contain, _) => {
            let bounds = (spec.width.unwrap_or(w), spec.height.unwrap_or(h));
            pad(shown, bounds, spec.gravity, background)
        }
        (_, Some(bg)) if shown.color().has_alpha() || spec.format == Format::Jpeg => {
            DynamicImage::ImageRgb8(flatten(shown, bg))
        }
        _ => shown,
    };
    match watermark.filter(|_| spec.watermark) {
        Some((w, o)) => draw(shown, o, w, resizer),
        None => Ok(shown),
    }
}

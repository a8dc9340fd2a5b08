//! Watermarks: the overlay image named by a job's `watermark.key`, decoded once per worker and
//! kept in a small LRU cache bounded by bytes, then scaled, placed and alpha-blended onto each
//! output (after its padding or flattening, before it is encoded).
//!
//! Memory: a cached overlay (4 bytes a pixel) is *pinned* in the decode budget (`budget.rs`)
//! for as long as it is cached or in use; while it decodes it also reserves the decoder's
//! whole-picture buffers. When the budget's pinned share is taken, the overlay serves the job
//! without being cached, and the job's own reservation counts it. Each job also reserves what
//! drawing holds: the resizer's premultiplied copy of the overlay and its scaled copy.
//!
//! The cache is keyed by storage key and never re-reads a cached object: store a changed
//! overlay under a new key.

use std::io::Cursor;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use fast_image_resize::{FilterType, ResizeAlg, ResizeOptions, Resizer};
use image::{DynamicImage, ImageFormat, ImageReader, Limits, RgbaImage};
use mediafarm::TaskError;

use crate::budget::{self, Reservation};
use crate::spec::{invalid, Watermark};

/// A decoded overlay, 8-bit RGBA.
pub struct Overlay {
    image: RgbaImage,
    /// Pinned when the overlay may be cached; `None` when the job's reservation counts it.
    pinned: Option<Reservation>,
}

impl Overlay {
    /// Decodes the overlay stored at `key` (for messages). Overlays larger than `max_bytes`
    /// decoded (4 bytes a pixel) are refused; `make_room` is told the decoded size before it is
    /// pinned (the cache evicts for it).
    pub fn decode(
        data: &[u8],
        key: &str,
        max_bytes: u64,
        make_room: impl FnOnce(u64),
    ) -> Result<Overlay, TaskError> {
        let bad = |message: String| invalid("InvalidWatermark", message);
        let format = match image::guess_format(data) {
            Ok(
                f @ (ImageFormat::Jpeg | ImageFormat::Png | ImageFormat::Gif | ImageFormat::WebP),
            ) => f,
            _ => {
                return Err(bad(format!(
                    "watermark.key {key:?} is not a JPEG, PNG, GIF or WebP image"
                )))
            }
        };
        let cannot = |e: image::ImageError| bad(format!("cannot decode watermark {key:?}: {e}"));
        let (w, h) = ImageReader::with_format(Cursor::new(data), format)
            .into_dimensions()
            .map_err(cannot)?;
        let bytes = u64::from(w) * u64::from(h) * 4;
        if bytes > max_bytes {
            return Err(bad(format!(
                "watermark {key:?} is {w}×{h}: {bytes} bytes decoded, more than the {max_bytes} \
                 image_watermark_cache_bytes allows"
            )));
        }
        make_room(bytes);
        // Pinned while cached; the decoder's own buffers (up to 16-bit RGBA) only while it runs.
        let pinned = budget::pin(bytes);
        let transient = budget::reserve(if pinned.is_some() {
            bytes * 2
        } else {
            bytes * 3
        });
        let mut reader = ImageReader::with_format(Cursor::new(data), format);
        let mut limits = Limits::default();
        limits.max_alloc = Some(bytes * 2 + (16 << 20));
        reader.limits(limits);
        let image = reader.decode().map_err(cannot)?.into_rgba8();
        drop(transient);
        Ok(Overlay { image, pinned })
    }

    /// Its size in pixels.
    pub fn size(&self) -> (u32, u32) {
        self.image.dimensions()
    }

    /// Bytes its pixels hold.
    pub fn bytes(&self) -> u64 {
        self.image.as_raw().len() as u64
    }

    /// Whether it is counted in the budget on its own (and so may be cached).
    pub fn pinned(&self) -> bool {
        self.pinned.is_some()
    }
}

/// The overlay's size on an output of `canvas` pixels: `scale` × the output's width (its
/// height kept in ratio) or its own size, shrunk to fit inside the margins; `None` when
/// nothing fits.
pub fn placed_size(overlay: (u32, u32), canvas: (u32, u32), w: &Watermark) -> Option<(u32, u32)> {
    let room_w = canvas.0.saturating_sub(w.margin.saturating_mul(2));
    let room_h = canvas.1.saturating_sub(w.margin.saturating_mul(2));
    if room_w == 0 || room_h == 0 || overlay.0 == 0 || overlay.1 == 0 {
        return None;
    }
    let (ow, oh) = (f64::from(overlay.0), f64::from(overlay.1));
    let (mut width, mut height) = match w.scale {
        Some(s) => {
            let width = (s * f64::from(canvas.0)).max(1.0);
            (width, width * oh / ow)
        }
        None => (ow, oh),
    };
    let fit = (f64::from(room_w) / width).min(f64::from(room_h) / height);
    if fit < 1.0 {
        width *= fit;
        height *= fit;
    }
    let side = |v: f64, max: u32| (v.round() as u32).clamp(1, max);
    Some((side(width, room_w), side(height, room_h)))
}

/// Bytes drawing `overlay` onto outputs of up to `largest` pixels holds besides the output:
/// the resizer's premultiplied copy of the overlay and the scaled one.
pub fn draw_bytes(overlay: &Overlay, largest: (u32, u32), w: &Watermark) -> u64 {
    let scaled =
        placed_size(overlay.size(), largest, w).map_or(0, |(w, h)| u64::from(w) * u64::from(h) * 4);
    overlay.bytes() + scaled
}

/// Draws `overlay` onto `canvas` where `w` puts it.
pub fn draw(
    canvas: DynamicImage,
    overlay: &Overlay,
    w: &Watermark,
    resizer: &mut Resizer,
) -> Result<DynamicImage, TaskError> {
    let (cw, ch) = (canvas.width(), canvas.height());
    let Some((ow, oh)) = placed_size(overlay.size(), (cw, ch), w) else {
        return Ok(canvas);
    };
    let scaled;
    let mark = if (ow, oh) == overlay.size() {
        &overlay.image
    } else {
        let mut dst = RgbaImage::new(ow, oh);
        let opts = ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::Lanczos3));
        resizer
            .resize(&overlay.image, &mut dst, &opts)
            .map_err(|e| TaskError::permanent("ResizeError", e.to_string()))?;
        scaled = dst;
        &scaled
    };
    let (ax, ay) = w.position.anchor();
    let x0 = w.margin + (ax * f64::from(cw - 2 * w.margin - ow)).round() as u32;
    let y0 = w.margin + (ay * f64::from(ch - 2 * w.margin - oh)).round() as u32;
    let opacity = w.opacity as f32;
    let mut canvas = match canvas {
        c @ (DynamicImage::ImageRgb8(_) | DynamicImage::ImageRgba8(_)) => c,
        other if other.color().has_alpha() => DynamicImage::ImageRgba8(other.into_rgba8()),
        other => DynamicImage::ImageRgb8(other.into_rgb8()),
    };
    for (x, y, p) in mark.enumerate_pixels() {
        let a = f32::from(p[3]) / 255.0 * opacity;
        if a <= 0.0 {
            continue;
        }
        let (cx, cy) = (x0 + x, y0 + y);
        match &mut canvas {
            DynamicImage::ImageRgb8(img) => {
                let c = img.get_pixel_mut(cx, cy);
                for i in 0..3 {
                    c[i] = mix(c[i], p[i], a);
                }
            }
            DynamicImage::ImageRgba8(img) => {
                let c = img.get_pixel_mut(cx, cy);
                // Porter–Duff "over".
                let below = f32::from(c[3]) / 255.0;
                let out = a + below * (1.0 - a);
                for i in 0..3 {
                    let v = (f32::from(p[i]) * a + f32::from(c[i]) * below * (1.0 - a)) / out;
                    c[i] = v.round().clamp(0.0, 255.0) as u8;
                }
                c[3] = (out * 255.0).round() as u8;
            }
            _ => unreachable!("converted above"),
        }
    }
    Ok(canvas)
}

fn mix(below: u8, over: u8, a: f32) -> u8 {
    (f32::from(below) * (1.0 - a) + f32::from(over) * a)
        .round()
        .clamp(0.0, 255.0) as u8
}

/// A worker's decoded overlays, least recently used first out, at most `max_bytes` of pixels.
pub struct OverlayCache {
    max_bytes: u64,
    /// Least recently used first.
    entries: Mutex<Vec<(String, Arc<Overlay>)>>,
    hits: AtomicU64,
    misses: AtomicU64,
}

impl OverlayCache {
    pub fn new(max_bytes: u64) -> OverlayCache {
        OverlayCache {
            max_bytes,
            entries: Mutex::new(Vec::new()),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    /// Largest overlay accepted, in decoded bytes (also the cache's bound; at least what a
    /// 1024×1024 overlay needs, so a worker with caching off still draws watermarks).
    pub fn max_overlay_bytes(&self) -> u64 {
        self.max_bytes.max(4 << 20)
    }

    /// The overlay cached for `key`, counted as a hit or a miss.
    pub fn get(&self, key: &str) -> Option<Arc<Overlay>> {
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        match entries.iter().position(|(k, _)| k == key) {
            Some(i) => {
                let entry = entries.remove(i);
                let found = entry.1.clone();
                entries.push(entry);
                self.hits.fetch_add(1, Ordering::Relaxed);
                Some(found)
            }
            None => {
                self.misses.fetch_add(1, Ordering::Relaxed);
                None
            }
        }
    }

    /// Evicts least recently used overlays until `bytes` more fit.
    pub fn make_room(&self, bytes: u64) {
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        let mut held: u64 = entries.iter().map(|(_, o)| o.bytes()).sum();
        while held + bytes > self.max_bytes && !entries.is_empty() {
            let (key, gone) = entries.remove(0);
            held -= gone.bytes();
            tracing::debug!(%key, bytes = gone.bytes(), "watermark overlay evicted");
        }
    }

    /// Keeps `overlay` for `key` if it is pinned and fits (evicting older ones).
    pub fn insert(&self, key: &str, overlay: Arc<Overlay>) {
        if !overlay.pinned() || overlay.bytes() > self.max_bytes {
            return;
        }
        self.make_room(overlay.bytes());
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        entries.retain(|(k, _)| k != key);
        entries.push((key.to_owned(), overlay));
    }

    /// Lookups answered from the cache.
    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }

    /// Lookups that had to read and decode the overlay.
    pub fn misses(&self) -> u64 {
        self.misses.load(Ordering::Relaxed)
    }

    /// Overlays cached now.
    pub fn len(&self) -> usize {
        self.entries
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use image::{Rgb, RgbImage, Rgba};

    use super::*;
    use crate::spec::Gravity;

    fn png(img: RgbaImage) -> Vec<u8> {
        let mut out = Cursor::new(Vec::new());
        DynamicImage::ImageRgba8(img)
            .write_to(&mut out, ImageFormat::Png)
            .unwrap();
        out.into_inner()
    }

    fn mark(position: Gravity, margin: u32, opacity: f64, scale: Option<f64>) -> Watermark {
        Watermark {
            key: "marks/logo.png".into(),
            position,
            margin,
            opacity,
            scale,
        }
    }

    #[test]
    fn the_overlay_is_sized_and_placed_like_imgproxy() {
        // 40×20 overlay on a 200×100 output.
        let w = mark(Gravity::Southeast, 5, 1.0, Some(0.25));
        assert_eq!(placed_size((40, 20), (200, 100), &w), Some((50, 25)));
        // No scale: its own size, unless it does not fit inside the margins.
        let w = mark(Gravity::Centre, 10, 1.0, None);
        assert_eq!(placed_size((40, 20), (200, 100), &w), Some((40, 20)));
        assert_eq!(placed_size((400, 100), (200, 100), &w), Some((180, 45)));
        // Margins larger than the output: nothing drawn.
        assert_eq!(placed_size((40, 20), (20, 20), &w), None);
    }

    #[test]
    fn drawing_blends_by_alpha_and_opacity_at_the_position() {
        // A 10×10 overlay: opaque black left half, fully transparent right half.
        let overlay = Overlay::decode(
            &png(RgbaImage::from_fn(10, 10, |x, _| {
                Rgba([0, 0, 0, if x < 5 { 255 } else { 0 }])
            })),
            "k",
            1 << 20,
            |_| {},
        )
        .unwrap();
        let white = || DynamicImage::ImageRgb8(RgbImage::from_pixel(40, 30, Rgb([255; 3])));
        let mut resizer = Resizer::new();
        let w = mark(Gravity::Southeast, 2, 0.5, None);
        let out = draw(white(), &overlay, &w, &mut resizer).unwrap().to_rgb8();
        // Placed at (40-2-10, 30-2-10) = (28, 18): half-opacity black over white is grey.
        assert_eq!(out.get_pixel(28, 18).0, [128; 3]);
        assert_eq!(out.get_pixel(32, 27).0, [128; 3]);
        // Its transparent half and everything outside it are untouched.
        assert_eq!(out.get_pixel(33, 18).0, [255; 3]);
        assert_eq!(out.get_pixel(27, 18).0, [255; 3]);
        assert_eq!(out.get_pixel(28, 28).0, [255; 3]);
        // Onto a transparent canvas it keeps its own alpha × opacity.
        let clear = DynamicImage::ImageRgba8(RgbaImage::new(40, 30));
        let w = mark(Gravity::Northwest, 0, 1.0, None);
        let out = draw(clear, &overlay, &w, &mut resizer).unwrap().to_rgba8();
        assert_eq!(out.get_pixel(0, 0).0, [0, 0, 0, 255]);
        assert_eq!(out.get_pixel(7, 0).0[3], 0);
    }

    #[test]
    fn bad_overlays_are_named() {
        let err = Overlay::decode(b"<html>nope</html>", "marks/x", 1 << 20, |_| {})
            .err()
            .unwrap();
        assert_eq!(err.exc_type, "InvalidWatermark");
        assert!(
            err.message.contains("\"marks/x\" is not a JPEG"),
            "{}",
            err.message
        );
        let big = png(RgbaImage::new(600, 600));
        let err = Overlay::decode(&big, "marks/big.png", 1 << 20, |_| {})
            .err()
            .unwrap();
        assert!(err.message.contains("600×600"), "{}", err.message);
    }

    #[test]
    fn the_cache_keeps_the_most_recently_used_within_its_bytes() {
        let overlay = |side: u32| {
            Arc::new(
                Overlay::decode(&png(RgbaImage::new(side, side)), "k", 1 << 20, |_| {}).unwrap(),
            )
        };
        // Room for two 100×100 overlays (40 000 bytes each), not three.
        let cache = OverlayCache::new(100_000);
        assert!(cache.get("a").is_none());
        cache.insert("a", overlay(100));
        cache.insert("b", overlay(100));
        assert!(cache.get("a").is_some());
        cache.insert("c", overlay(100));
        assert!(cache.get("b").is_none(), "b was the least recently used");
        assert!(cache.get("a").is_some() && cache.get("c").is_some());
        assert_eq!((cache.hits(), cache.misses(), cache.len()), (3, 2, 2));
    }
}

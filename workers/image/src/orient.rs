//! EXIF orientation, applied last. A job's geometry — the crop, each output's size and its
//! gravity — is given in the *shown* frame (the picture as its orientation turns it); the
//! decoded pixels stay in the *stored* frame. This module maps that geometry into the stored
//! frame, so the crop and the resize run on the pixels as they were decoded and only the
//! finished, output-size picture is turned.
//!
//! Promise: for every orientation, cropping and resizing in the stored frame and then turning
//! gives the same geometry as turning the whole source first (sizes exactly; pixels up to the
//! resampler's rounding). Turning a 50 MP decode cost more than the rest of the pipeline; an
//! output-size picture costs next to nothing.

use image::metadata::Orientation;
use image::{DynamicImage, ImageBuffer, Pixel};

use crate::geometry::target_size;
use crate::spec::{Crop, Fit, OutputSpec};

/// Orientations 5–8 turn the picture a quarter, so stored width is shown height.
pub fn swaps_sides(o: Orientation) -> bool {
    matches!(
        o,
        Orientation::Rotate90
            | Orientation::Rotate270
            | Orientation::Rotate90FlipH
            | Orientation::Rotate270FlipH
    )
}

/// A size in one frame, given in the other (the same map both ways).
pub fn swap_size(o: Option<Orientation>, (w, h): (u32, u32)) -> (u32, u32) {
    match o {
        Some(o) if swaps_sides(o) => (h, w),
        _ => (w, h),
    }
}

/// The stored-frame point under the shown-frame point `(x, y)` of a picture shown at `(w, h)`
/// (continuous coordinates: pixel edges at whole numbers, so corners map to corners).
fn to_stored(o: Option<Orientation>, (x, y): (f64, f64), (w, h): (f64, f64)) -> (f64, f64) {
    match o {
        None | Some(Orientation::NoTransforms) => (x, y),
        Some(Orientation::FlipHorizontal) => (w - x, y),
        Some(Orientation::Rotate180) => (w - x, h - y),
        Some(Orientation::FlipVertical) => (x, h - y),
        // Transpose.
        Some(Orientation::Rotate90FlipH) => (y, x),
        Some(Orientation::Rotate90) => (y, w - x),
        // Transverse.
        Some(Orientation::Rotate270FlipH) => (h - y, w - x),
        Some(Orientation::Rotate270) => (h - y, x),
    }
}

/// The stored-frame rectangle under the shown-frame crop `c` of a picture shown at `shown`
/// (`c` must lie inside it).
pub fn stored_crop(o: Option<Orientation>, c: Crop, shown: (u32, u32)) -> Crop {
    let size = (f64::from(shown.0), f64::from(shown.1));
    let (x0, y0) = to_stored(o, (f64::from(c.x), f64::from(c.y)), size);
    let (x1, y1) = to_stored(
        o,
        (f64::from(c.x + c.width), f64::from(c.y + c.height)),
        size,
    );
    // Whole numbers in, whole numbers out: the casts are exact.
    Crop {
        x: x0.min(x1) as u32,
        y: y0.min(y1) as u32,
        width: (x0 - x1).abs() as u32,
        height: (y0 - y1).abs() as u32,
    }
}

/// Where `cover` keeps its window (fractions of the spare room, as `Gravity::anchor`), in the
/// stored frame: the gravity's corner is carried to wherever the orientation put it.
pub fn stored_anchor(o: Option<Orientation>, anchor: (f64, f64)) -> (f64, f64) {
    to_stored(o, anchor, (1.0, 1.0))
}

/// How one output is made from the (cropped) stored-frame picture.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OutputPlan {
    /// The output's size as shown (what `target_size` gives for the shown source).
    pub shown: (u32, u32),
    /// What the resize makes, in the stored frame: `shown` with its sides swapped for
    /// orientations 5–8.
    pub resize_to: (u32, u32),
    /// `cover`'s window anchor, in the stored frame.
    pub anchor: (f64, f64),
    /// The orientation to apply to the resized picture (of size `resize_to`) — never to the
    /// decode.
    pub orient: Option<Orientation>,
}

/// The plan for `spec` from a source shown at `full` (after the crop, if any) and stored
/// turned by `orient`.
pub fn plan_output(full: (u32, u32), orient: Option<Orientation>, spec: &OutputSpec) -> OutputPlan {
    let shown = target_size(full, spec.fit, spec.width, spec.height);
    let anchor = match spec.fit {
        Fit::Cover => stored_anchor(orient, spec.gravity.anchor()),
        // Only `cover` cuts a window; `contain`'s gravity places the turned picture.
        _ => spec.gravity.anchor(),
    };
    OutputPlan {
        shown,
        resize_to: swap_size(orient, shown),
        anchor,
        orient: orient.filter(|&o| o != Orientation::NoTransforms),
    }
}

impl OutputPlan {
    /// Turns the resized picture (stored frame, `resize_to`) into the shown frame.
    pub fn finish(&self, resized: DynamicImage) -> DynamicImage {
        debug_assert_eq!((resized.width(), resized.height()), self.resize_to);
        match self.orient {
            Some(o) => turn(resized, o),
            None => resized,
        }
    }
}

impl OutputPlan {
    /// [`OutputPlan::finish`] for a resized picture that is kept (smaller outputs are derived
    /// from it): the turned copy, made from it directly rather than from a copy of it. `None`
    /// when there is no turn or the picture is not 8-bit RGB or RGBA.
    pub fn finish_copy(&self, resized: &DynamicImage) -> Option<DynamicImage> {
        let o = self.orient?;
        match resized {
            DynamicImage::ImageRgb8(b) => turn_tiles(b, o).map(DynamicImage::ImageRgb8),
            DynamicImage::ImageRgba8(b) => turn_tiles(b, o).map(DynamicImage::ImageRgba8),
            _ => None,
        }
    }
}

/// `img` turned by `o`, as `DynamicImage::apply_orientation` turns it. 8-bit RGB and RGBA are
/// copied in 32×32 tiles: `image`'s own quarter turn walks the source a column at a time, one
/// cache miss a pixel, and was 7 % of a job's instructions on an EXIF-6 photograph (its
/// 1280×2276 output; callgrind, BENCHMARKS.md issue 18, 2026-11-30 23:45 UTC).
pub fn turn(img: DynamicImage, o: Orientation) -> DynamicImage {
    let turned = match &img {
        DynamicImage::ImageRgb8(b) => turn_tiles(b, o).map(DynamicImage::ImageRgb8),
        DynamicImage::ImageRgba8(b) => turn_tiles(b, o).map(DynamicImage::ImageRgba8),
        _ => None,
    };
    turned.unwrap_or_else(|| {
        let mut img = img;
        img.apply_orientation(o);
        img
    })
}

/// The tiled copy; `None` only if the buffer does not hold its picture.
fn turn_tiles<P: Pixel<Subpixel = u8>>(
    src: &ImageBuffer<P, Vec<u8>>,
    o: Orientation,
) -> Option<ImageBuffer<P, Vec<u8>>> {
    let (w, h) = src.dimensions();
    let (r, b) = (w.saturating_sub(1), h.saturating_sub(1));
    // Each output pixel (x, y) comes from the stored pixel this gives.
    match o {
        Orientation::NoTransforms => Some(src.clone()),
        Orientation::FlipHorizontal => copy_mapped(src, (w, h), |x, y| (r - x, y)),
        Orientation::Rotate180 => copy_mapped(src, (w, h), |x, y| (r - x, b - y)),
        Orientation::FlipVertical => copy_mapped(src, (w, h), |x, y| (x, b - y)),
        Orientation::Rotate90FlipH => copy_mapped(src, (h, w), |x, y| (y, x)),
        Orientation::Rotate90 => copy_mapped(src, (h, w), |x, y| (y, b - x)),
        Orientation::Rotate270FlipH => copy_mapped(src, (h, w), |x, y| (r - y, b - x)),
        Orientation::Rotate270 => copy_mapped(src, (h, w), |x, y| (r - y, x)),
    }
}

fn copy_mapped<P: Pixel<Subpixel = u8>>(
    src: &ImageBuffer<P, Vec<u8>>,
    (ow, oh): (u32, u32),
    from: impl Fn(u32, u32) -> (u32, u32),
) -> Option<ImageBuffer<P, Vec<u8>>> {
    const TILE: u32 = 32;
    let c = usize::from(P::CHANNEL_COUNT);
    let sw = src.width() as usize;
    let s = src.as_raw();
    if s.len() < sw * src.height() as usize * c {
        return None;
    }
    let mut out = vec![0u8; ow as usize * oh as usize * c];
    for ty in (0..oh).step_by(TILE as usize) {
        for tx in (0..ow).step_by(TILE as usize) {
            for y in ty..(ty + TILE).min(oh) {
                let row = y as usize * ow as usize;
                for x in tx..(tx + TILE).min(ow) {
                    let (sx, sy) = from(x, y);
                    let si = (sy as usize * sw + sx as usize) * c;
                    let di = (row + x as usize) * c;
                    out[di..di + c].copy_from_slice(&s[si..si + c]);
                }
            }
        }
    }
    ImageBuffer::from_raw(ow, oh, out)
}

#[cfg(test)]
mod tests {
    use image::{Rgb, RgbImage};

    use super::*;
    use crate::spec::{Format, Gravity};

    const ALL: [Orientation; 8] = [
        Orientation::NoTransforms,
        Orientation::FlipHorizontal,
        Orientation::Rotate180,
        Orientation::FlipVertical,
        Orientation::Rotate90FlipH,
        Orientation::Rotate90,
        Orientation::Rotate270FlipH,
        Orientation::Rotate270,
    ];

    /// 7×4, every pixel different.
    fn stored() -> DynamicImage {
        DynamicImage::ImageRgb8(RgbImage::from_fn(7, 4, |x, y| {
            Rgb([x as u8 * 30, y as u8 * 60, (x + 7 * y) as u8])
        }))
    }

    fn spec(fit: Fit, width: Option<u32>, height: Option<u32>, gravity: Gravity) -> OutputSpec {
        OutputSpec {
            width,
            height,
            fit,
            gravity,
            ..OutputSpec::new("out", Format::Png)
        }
    }

    #[test]
    fn the_tiled_turn_is_image_s_turn() {
        // Larger than a tile and not a multiple of it, RGB and RGBA.
        let rgb = RgbImage::from_fn(70, 45, |x, y| Rgb([x as u8, y as u8, (x * 3 + y) as u8]));
        for img in [
            DynamicImage::ImageRgb8(rgb.clone()),
            DynamicImage::ImageRgba8(DynamicImage::ImageRgb8(rgb).to_rgba8()),
            stored(),
        ] {
            for o in ALL {
                let mut want = img.clone();
                want.apply_orientation(o);
                let got = turn(img.clone(), o);
                assert_eq!(got, want, "{o:?}");
            }
        }
    }

    #[test]
    fn a_kept_resize_is_turned_into_its_own_copy_as_finish_turns_it() {
        let rgb = RgbImage::from_fn(70, 45, |x, y| Rgb([x as u8, y as u8, (x * 3 + y) as u8]));
        let img = DynamicImage::ImageRgb8(rgb);
        for o in ALL {
            let plan = plan_output(
                (70, 45),
                Some(o),
                &spec(Fit::Inside, None, None, Gravity::Centre),
            );
            let resized = if swap_size(Some(o), (70, 45)) == (70, 45) {
                img.clone()
            } else {
                turn(img.clone(), Orientation::Rotate90)
            };
            let want = plan.finish(resized.clone());
            match plan.finish_copy(&resized) {
                Some(got) => assert_eq!(got, want, "{o:?}"),
                // No turn: the caller copies (or uses the resize itself).
                None => assert_eq!(o, Orientation::NoTransforms),
            }
        }
    }

    #[test]
    fn a_crop_of_the_shown_picture_is_the_turned_crop_of_the_stored_one() {
        for o in ALL {
            let mut shown = stored();
            shown.apply_orientation(o);
            let size = (shown.width(), shown.height());
            for c in [
                Crop {
                    x: 0,
                    y: 0,
                    width: size.0,
                    height: size.1,
                },
                Crop {
                    x: 1,
                    y: 0,
                    width: 2,
                    height: 3,
                },
                Crop {
                    x: 0,
                    y: 2,
                    width: 3,
                    height: 1,
                },
                Crop {
                    x: size.0 - 1,
                    y: size.1 - 2,
                    width: 1,
                    height: 2,
                },
            ] {
                let want = shown.crop_imm(c.x, c.y, c.width, c.height);
                let s = stored_crop(Some(o), c, size);
                let mut got = stored().crop_imm(s.x, s.y, s.width, s.height);
                got.apply_orientation(o);
                assert_eq!(got.to_rgb8(), want.to_rgb8(), "{o:?} {c:?} → {s:?}");
            }
        }
    }

    #[test]
    fn the_gravity_corner_follows_the_turn() {
        // Shown north-west (0, 0) is, in the stored pixels of each orientation, the corner
        // that the turn brings to the top left.
        let stored = stored();
        for o in ALL {
            let (ax, ay) = stored_anchor(Some(o), Gravity::Northwest.anchor());
            let corner = stored
                .to_rgb8()
                .get_pixel((ax * 6.0) as u32, (ay * 3.0) as u32)
                .0;
            let mut shown = stored.clone();
            shown.apply_orientation(o);
            assert_eq!(corner, shown.to_rgb8().get_pixel(0, 0).0, "{o:?}");
        }
        assert_eq!(
            stored_anchor(Some(Orientation::Rotate90), Gravity::North.anchor()),
            (0.0, 0.5)
        );
        assert_eq!(stored_anchor(None, Gravity::East.anchor()), (1.0, 0.5));
    }

    #[test]
    fn the_turn_happens_at_output_size_not_decode_size() {
        // A 4000×3000 stored source with orientation 6 is shown 3000×4000. Whatever scale it
        // was decoded at (4000×3000, or 1000×750 at 1/4), it is resized in the stored frame
        // and only the output-size picture is turned.
        let full = (3000, 4000);
        let o = Some(Orientation::Rotate90);
        let inside = plan_output(
            full,
            o,
            &spec(Fit::Inside, Some(300), None, Gravity::Centre),
        );
        assert_eq!(inside.shown, (300, 400));
        assert_eq!(inside.resize_to, (400, 300));
        assert_eq!(inside.orient, o);
        let cover = plan_output(
            full,
            o,
            &spec(Fit::Cover, Some(200), Some(100), Gravity::North),
        );
        assert_eq!((cover.shown, cover.resize_to), ((200, 100), (100, 200)));
        assert_eq!(cover.anchor, (0.0, 0.5));
        let fill = plan_output(
            full,
            o,
            &spec(Fit::Fill, Some(50), Some(60), Gravity::Centre),
        );
        assert_eq!(fill.resize_to, (60, 50));
        let contain = plan_output(
            full,
            o,
            &spec(Fit::Contain, Some(120), Some(120), Gravity::South),
        );
        assert_eq!((contain.shown, contain.resize_to), ((90, 120), (120, 90)));
        // `contain` pads after the turn, in the shown frame: its anchor is not mapped.
        assert_eq!(contain.anchor, Gravity::South.anchor());
        // The turn itself: a stored-frame output-size picture becomes the shown size.
        let turned = inside.finish(DynamicImage::new_rgb8(400, 300));
        assert_eq!((turned.width(), turned.height()), (300, 400));
        // Upright sources are not turned at all.
        let upright = plan_output(
            (4000, 3000),
            None,
            &spec(Fit::Inside, Some(400), None, Gravity::Centre),
        );
        assert_eq!((upright.resize_to, upright.orient), ((400, 300), None));
    }
}

//! Output geometry: the size each fit gives, the resize itself (`cover` keeping the gravity
//! side), `contain`'s padding, the optional crop, and alpha flattened onto a background.

use fast_image_resize::{FilterType, ResizeAlg, ResizeOptions, Resizer};
use image::{DynamicImage, Rgb, RgbImage, Rgba};
use mediafarm::TaskError;

use crate::spec::{invalid, Crop, Fit, Gravity, MAX_SIDE};

/// The size an output gets for a source of size `src`.
pub fn target_size(
    src: (u32, u32),
    fit: Fit,
    width: Option<u32>,
    height: Option<u32>,
) -> (u32, u32) {
    let (sw, sh) = (f64::from(src.0), f64::from(src.1));
    let round = |v: f64| (v.round() as u32).clamp(1, MAX_SIDE);
    match (fit, width, height) {
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

/// Checks that the crop rectangle lies inside the source as shown (after orientation), the
/// frame the job gives it in.
pub fn check_crop(c: Crop, (width, height): (u32, u32)) -> Result<(), TaskError> {
    let fits = c.width > 0
        && c.height > 0
        && u64::from(c.x) + u64::from(c.width) <= u64::from(width)
        && u64::from(c.y) + u64::from(c.height) <= u64::from(height);
    if !fits {
        return Err(invalid(
            "InvalidArguments",
            format!(
                "crop {}×{} at ({}, {}) is not inside the {width}×{height} source (after \
                 orientation)",
                c.width, c.height, c.x, c.y,
            ),
        ));
    }
    Ok(())
}

/// Cuts the rectangle `c` (already in the decoded picture's own frame) out of `img`.
pub fn crop(img: DynamicImage, c: Crop) -> Result<DynamicImage, TaskError> {
    check_crop(c, (img.width(), img.height()))?;
    Ok(img.crop_imm(c.x, c.y, c.width, c.height))
}

/// Resizes `src` to `(w, h)`: for `cover`, first cut to the box's aspect ratio keeping the
/// window at `anchor` (a gravity's, as fractions of the spare room); for `fill`, stretched;
/// otherwise as is (the size already keeps the ratio).
pub fn scale(
    resizer: &mut Resizer,
    src: &DynamicImage,
    (w, h): (u32, u32),
    fit: Fit,
    anchor: (f64, f64),
) -> Result<DynamicImage, TaskError> {
    if (w, h) == (src.width(), src.height()) {
        return Ok(src.clone());
    }
    let mut dst = DynamicImage::new(w, h, src.color());
    let mut opts = ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::Lanczos3));
    if fit == Fit::Cover {
        opts = opts.fit_into_destination(Some(anchor));
    }
    resizer
        .resize(src, &mut dst, &opts)
        .map_err(|e| TaskError::permanent("ResizeError", e.to_string()))?;
    Ok(dst)
}

/// `contain`: the picture placed in the `(bw, bh)` box by gravity, the rest filled with
/// `background` (opaque, for JPEG) or left transparent.
pub fn pad(
    picture: DynamicImage,
    (bw, bh): (u32, u32),
    gravity: Gravity,
    background: Option<[u8; 3]>,
) -> DynamicImage {
    let (w, h) = (picture.width(), picture.height());
    if (bw, bh) == (w, h) {
        return picture;
    }
    let (ax, ay) = gravity.anchor();
    let x = (f64::from(bw.saturating_sub(w)) * ax).round() as i64;
    let y = (f64::from(bh.saturating_sub(h)) * ay).round() as i64;
    let (mut canvas, picture) = match background {
        Some(bg) => (
            DynamicImage::ImageRgb8(RgbImage::from_pixel(bw, bh, Rgb(bg))),
            DynamicImage::ImageRgb8(flatten(picture, bg)),
        ),
        None => (
            DynamicImage::ImageRgba8(image::RgbaImage::from_pixel(bw, bh, Rgba([0, 0, 0, 0]))),
            DynamicImage::ImageRgba8(picture.into_rgba8()),
        ),
    };
    image::imageops::replace(&mut canvas, &picture, x, y);
    canvas
}

/// Composes transparent pixels onto `background`.
pub fn flatten(img: DynamicImage, background: [u8; 3]) -> RgbImage {
    match img {
        DynamicImage::ImageRgb8(rgb) => rgb,
        other => {
            let rgba = other.into_rgba8();
            RgbImage::from_fn(rgba.width(), rgba.height(), |x, y| {
                let p = rgba.get_pixel(x, y).0;
                let a = u16::from(p[3]);
                let mix = |c: u8, bg: u8| {
                    ((u16::from(c) * a + u16::from(bg) * (255 - a) + 127) / 255) as u8
                };
                Rgb([
                    mix(p[0], background[0]),
                    mix(p[1], background[1]),
                    mix(p[2], background[2]),
                ])
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_follow_the_fit() {
        let src = (4000, 3000);
        assert_eq!(
            target_size(src, Fit::Cover, Some(512), Some(512)),
            (512, 512)
        );
        assert_eq!(target_size(src, Fit::Fill, Some(100), Some(10)), (100, 10));
        assert_eq!(
            target_size(src, Fit::Contain, Some(400), Some(400)),
            (400, 300)
        );
        assert_eq!(target_size(src, Fit::Inside, Some(640), None), (640, 480));
        assert_eq!(target_size(src, Fit::Inside, None, Some(300)), (400, 300));
        // Inside never enlarges.
        assert_eq!(
            target_size((100, 50), Fit::Inside, Some(640), Some(640)),
            (100, 50)
        );
    }

    #[test]
    fn contain_places_the_picture_by_gravity() {
        let picture = DynamicImage::ImageRgb8(RgbImage::from_pixel(4, 2, Rgb([0, 0, 0])));
        let white = Some([255, 255, 255]);
        let at = |g| pad(picture.clone(), (4, 6), g, white).to_rgb8();
        // Black rows are where the picture went.
        let black_rows = |img: RgbImage| {
            (0..img.height())
                .filter(|&y| img.get_pixel(0, y).0 == [0, 0, 0])
                .collect::<Vec<_>>()
        };
        assert_eq!(black_rows(at(Gravity::North)), [0, 1]);
        assert_eq!(black_rows(at(Gravity::Centre)), [2, 3]);
        assert_eq!(black_rows(at(Gravity::South)), [4, 5]);
        assert_eq!(black_rows(at(Gravity::Southwest)), [4, 5]);
    }
}

//! The job's `crop`: where it lies in the decoded picture. A rectangle given with `x` and `y`
//! is checked and mapped into the stored frame (`orient.rs`); one given by its size only is
//! placed by its gravity, as imgproxy places `crop:%width:%height:%gravity` — a side, corner
//! or the centre by the gravity's anchor, `entropy`/`attention` by the smart crop's search
//! (`smartcrop.rs`) on the whole picture, both axes at once.
//!
//! Promise: the rectangle returned lies inside the picture, in its stored frame, and has the
//! crop's size turned by the orientation; a crop that does not fit fails naming both sizes.

use image::metadata::Orientation;
use image::DynamicImage;
use mediafarm::TaskError;

use crate::geometry::check_crop;
use crate::orient::{stored_anchor, stored_crop, swap_size};
use crate::smartcrop::Analysis;
use crate::spec::{Crop, CropArg};

/// Checks that `crop` fits in the source shown at `shown` (for a placed crop, its size).
pub fn check(crop: CropArg, shown: (u32, u32)) -> Result<(), TaskError> {
    match crop {
        CropArg::At(c) => check_crop(c, shown),
        CropArg::Placed { width, height, .. } => check_crop(
            Crop {
                x: 0,
                y: 0,
                width,
                height,
            },
            shown,
        ),
    }
}

/// The stored-frame rectangle `crop` cuts from `img`, the whole picture as decoded (stored
/// frame, full scale), shown at `shown` once turned by `orient`.
pub fn stored_rect(
    crop: CropArg,
    orient: Option<Orientation>,
    shown: (u32, u32),
    img: &DynamicImage,
) -> Result<Crop, TaskError> {
    check(crop, shown)?;
    let (width, height, gravity) = match crop {
        CropArg::At(c) => return Ok(stored_crop(orient, c, shown)),
        CropArg::Placed {
            width,
            height,
            gravity,
        } => (width, height, gravity),
    };
    let picture = (img.width(), img.height());
    let (w, h) = swap_size(orient, (width, height));
    let (w, h) = (w.min(picture.0), h.min(picture.1));
    let (ax, ay) = match gravity.smart() {
        Some(smart) => Analysis::of(img).place(smart, (w, h), picture),
        None => stored_anchor(orient, gravity.anchor()),
    };
    let at = |anchor: f64, room: u32| (anchor * f64::from(room)).round() as u32;
    Ok(Crop {
        x: at(ax, picture.0 - w),
        y: at(ay, picture.1 - h),
        width: w,
        height: h,
    })
}

#[cfg(test)]
mod tests {
    use image::{Rgb, RgbImage};
    use serde_json::json;

    use super::*;
    use crate::spec::{Format, Gravity, OutputSpec, TransformArgs};
    use crate::transform::process;

    /// A flat grey `w`×`h` picture with a 60×60 block of colourful noise at `(bx, by)`: the
    /// subject both smart crops must keep.
    fn subject_at(w: u32, h: u32, (bx, by): (u32, u32)) -> DynamicImage {
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        DynamicImage::ImageRgb8(RgbImage::from_fn(w, h, |x, y| {
            if (bx..bx + 60).contains(&x) && (by..by + 60).contains(&y) {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let [r, g, b, ..] = state.to_le_bytes();
                Rgb([r, g / 2, b])
            } else {
                Rgb([128, 128, 128])
            }
        }))
    }

    fn placed(width: u32, height: u32, gravity: Gravity) -> CropArg {
        CropArg::Placed {
            width,
            height,
            gravity,
        }
    }

    fn keeps(rect: Crop, (bx, by): (u32, u32)) -> bool {
        rect.x <= bx
            && rect.x + rect.width >= bx + 60
            && rect.y <= by
            && rect.y + rect.height >= by + 60
    }

    #[test]
    fn smart_gravities_place_a_crop_on_the_subject() {
        // Along one axis, then along both at once.
        for (size, block, crop) in [
            ((300, 100), (220, 20), (100, 100)),
            ((300, 300), (220, 200), (100, 100)),
            ((300, 300), (10, 230), (120, 80)),
        ] {
            let img = subject_at(size.0, size.1, block);
            for gravity in [Gravity::Attention, Gravity::Entropy] {
                let rect = stored_rect(placed(crop.0, crop.1, gravity), None, size, &img).unwrap();
                assert_eq!((rect.width, rect.height), crop);
                assert!(keeps(rect, block), "{gravity:?} {size:?}: {rect:?}");
            }
            // The centre crop cuts it: the case the smart ones are for.
            let centre = stored_rect(placed(crop.0, crop.1, Gravity::Centre), None, size, &img);
            assert!(!keeps(centre.unwrap(), block), "{size:?}");
        }
    }

    #[test]
    fn sides_and_corners_place_a_crop_in_the_shown_frame() {
        let img = subject_at(300, 200, (0, 0));
        let rect =
            |gravity, orient| stored_rect(placed(100, 50, gravity), orient, (300, 200), &img);
        let at = |r: Crop| (r.x, r.y, r.width, r.height);
        assert_eq!(at(rect(Gravity::Centre, None).unwrap()), (100, 75, 100, 50));
        assert_eq!(at(rect(Gravity::East, None).unwrap()), (200, 75, 100, 50));
        assert_eq!(
            at(rect(Gravity::Southwest, None).unwrap()),
            (0, 150, 100, 50)
        );
        // Stored 300×200 turned 90° clockwise is shown 200×300: the shown top (north) is the
        // stored left side, and the crop's 100×50 is 50×100 stored.
        let turned = |gravity| {
            stored_rect(
                placed(100, 50, gravity),
                Some(Orientation::Rotate90),
                (200, 300),
                &img,
            )
        };
        assert_eq!(at(turned(Gravity::North).unwrap()), (0, 50, 50, 100));
        assert_eq!(at(turned(Gravity::South).unwrap()), (250, 50, 50, 100));
        // Larger than the source: refused naming both sizes.
        let err =
            stored_rect(placed(400, 50, Gravity::Attention), None, (300, 200), &img).unwrap_err();
        assert!(err.message.contains("crop 400×50"), "{}", err.message);
        assert!(err.message.contains("300×200 source"), "{}", err.message);
    }

    #[test]
    fn crop_takes_a_point_or_a_gravity_but_not_both() {
        let parse =
            |v: serde_json::Value| serde_json::from_value::<CropArg>(v).map_err(|e| e.to_string());
        assert_eq!(
            parse(json!({"x": 1, "y": 2, "width": 3, "height": 4})),
            Ok(CropArg::At(Crop {
                x: 1,
                y: 2,
                width: 3,
                height: 4
            }))
        );
        assert_eq!(
            parse(json!({"width": 3, "height": 4})),
            Ok(placed(3, 4, Gravity::Centre))
        );
        assert_eq!(
            parse(json!({"width": 3, "height": 4, "gravity": "attention"})),
            Ok(placed(3, 4, Gravity::Attention))
        );
        let both = parse(json!({"x": 1, "y": 2, "width": 3, "height": 4, "gravity": "entropy"}));
        assert!(
            both.as_ref()
                .unwrap_err()
                .contains("crop has x and y and gravity entropy"),
            "{both:?}"
        );
        let half = parse(json!({"x": 1, "width": 3, "height": 4}));
        assert!(
            half.as_ref().unwrap_err().contains("only one of x and y"),
            "{half:?}"
        );
    }

    /// Through the whole pipeline: the crop placed by `attention`, then resized.
    #[test]
    fn a_job_with_a_smart_crop_keeps_the_subject() {
        let img = subject_at(400, 200, (320, 120));
        let mut png = Vec::new();
        img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
            .unwrap();
        let out = OutputSpec {
            width: Some(50),
            ..OutputSpec::new("o.png", Format::Png)
        };
        let mut args = TransformArgs::new("", vec![out]);
        args.crop = Some(placed(100, 100, Gravity::Attention));
        let (info, made) = process(&png, &args, 50_000_000).unwrap();
        assert_eq!((info.width, info.height), (400, 200));
        assert_eq!((made[0].width, made[0].height), (50, 50));
        let greys = |file: &[u8]| {
            let shown = image::load_from_memory(file).unwrap().to_rgb8();
            let near = |v: u8| v.abs_diff(128) <= 2;
            shown
                .pixels()
                .filter(|p| p.0.iter().all(|&v| near(v)))
                .count()
        };
        let grey = greys(&made[0].data);
        // The subject's 60×60 of 100×100 is 36 %; around it stays grey.
        assert!(
            grey < 50 * 50 * 3 / 4,
            "{grey} grey pixels of 2500: the subject was cut"
        );
        args.crop = Some(placed(100, 100, Gravity::Centre));
        let (_, made) = process(&png, &args, 50_000_000).unwrap();
        assert_eq!(
            greys(&made[0].data),
            2500,
            "the centre crop holds none of it"
        );
    }
}

//! JPEG from 8-bit 4:2:0 YUV planes with libjpeg-turbo's SIMD code, fed the planes as they are
//! (libjpeg's raw-data input: no colour conversion, no RGB, no chroma resampling). A
//! limited-range picture (what H.264 streams carry) is expanded to JPEG's full range while the
//! planes are copied into libjpeg's block-padded layout, so that costs no pass of its own.

use std::panic::{catch_unwind, AssertUnwindSafe};

use mozjpeg::{ColorSpace, CompInfoExt, Compress};

/// One plane of a picture: `height` rows of `width` samples, rows `stride` bytes apart.
#[derive(Clone, Copy)]
pub struct Plane<'a> {
    pub data: &'a [u8],
    pub stride: usize,
    pub width: usize,
    pub height: usize,
}

/// How the picture's samples span their range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Range {
    /// 0–255 for Y, Cb and Cr (JPEG's own).
    Full,
    /// 16–235 for Y, 16–240 for Cb and Cr (video's).
    Limited,
}

/// Encodes 4:2:0 pictures; keeps its padded plane buffers from one picture to the next.
#[derive(Default)]
pub struct Yuv420Jpeg {
    padded: [Vec<u8>; 3],
}

impl Yuv420Jpeg {
    /// A baseline 4:2:0 JPEG (standard Huffman tables: the fastest libjpeg-turbo writes) of
    /// `width`×`height` at `quality` (1–100) from Y, Cb and Cr planes.
    pub fn encode(
        &mut self,
        planes: [Plane<'_>; 3],
        range: Range,
        width: usize,
        height: usize,
        quality: u8,
    ) -> Result<Vec<u8>, String> {
        if width == 0 || height == 0 {
            return Err("the picture is empty".into());
        }
        let chroma = (width.div_ceil(2), height.div_ceil(2));
        for (i, p) in planes.iter().enumerate() {
            let (w, h) = if i == 0 { (width, height) } else { chroma };
            let needed = p
                .stride
                .saturating_mul(h.saturating_sub(1))
                .saturating_add(w);
            if p.width < w || p.height < h || p.stride < w || p.data.len() < needed {
                return Err(format!(
                    "plane {i} is smaller than a {width}x{height} 4:2:0 picture"
                ));
            }
        }
        let padded = &mut self.padded;
        let run = catch_unwind(AssertUnwindSafe(|| {
            let mut comp = Compress::new(ColorSpace::JCS_YCbCr);
            comp.set_fastest_defaults();
            comp.set_size(width, height);
            comp.set_color_space(ColorSpace::JCS_YCbCr);
            comp.set_quality(f32::from(quality.clamp(1, 100)));
            comp.set_chroma_sampling_pixel_sizes((2, 2), (2, 2));
            comp.set_raw_data_in(true);
            let mut started = comp
                .start_compress(Vec::with_capacity(width * height / 4))
                .map_err(|e| e.to_string())?;
            let layout: Vec<(usize, usize)> = started
                .components()
                .iter()
                .map(|c| (c.row_stride(), c.col_stride()))
                .collect();
            for (i, (plane, &(stride, rows))) in planes.iter().zip(&layout).enumerate() {
                let (w, h) = if i == 0 { (width, height) } else { chroma };
                let expand = match range {
                    Range::Full => Expand::None,
                    Range::Limited if i == 0 => Expand::Luma,
                    Range::Limited => Expand::Chroma,
                };
                copy_padded(&mut padded[i], plane, w, h, stride, rows, expand);
            }
            let refs = [&padded[0][..], &padded[1][..], &padded[2][..]];
            if !started.write_raw_data(&refs) {
                return Err("libjpeg took no rows".to_owned());
            }
            started.finish().map_err(|e| e.to_string())
        }));
        match run {
            Ok(out) => out,
            Err(panic) => Err(panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_else(|| "libjpeg failed".to_owned())),
        }
    }
}

#[derive(Clone, Copy)]
enum Expand {
    None,
    /// 16–235 → 0–255.
    Luma,
    /// 16–240 around 128 → 0–255 around 128.
    Chroma,
}

/// Copies `w`×`h` samples into a `stride`×`rows` buffer, repeating the last column and row
/// into the padding (as libjpeg's own edge expansion would), expanding the range if asked.
fn copy_padded(
    out: &mut Vec<u8>,
    plane: &Plane<'_>,
    w: usize,
    h: usize,
    stride: usize,
    rows: usize,
    expand: Expand,
) {
    out.resize(stride * rows, 0);
    for y in 0..rows {
        let src_row = y.min(h - 1) * plane.stride;
        let src = &plane.data[src_row..src_row + w];
        let dst = &mut out[y * stride..(y + 1) * stride];
        match expand {
            Expand::None => dst[..w].copy_from_slice(src),
            // Fixed point, 8 fraction bits: 255/219 ≈ 298/256, 255/224 ≈ 291/256. Written so
            // the compiler vectorises it.
            Expand::Luma => {
                for (d, &s) in dst[..w].iter_mut().zip(src) {
                    let v = ((i32::from(s) - 16) * 298 + 128) >> 8;
                    *d = v.clamp(0, 255) as u8;
                }
            }
            Expand::Chroma => {
                for (d, &s) in dst[..w].iter_mut().zip(src) {
                    let v = (((i32::from(s) - 128) * 291 + 128) >> 8) + 128;
                    *d = v.clamp(0, 255) as u8;
                }
            }
        }
        let last = dst[w - 1];
        dst[w..].fill(last);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(jpeg: &[u8]) -> (usize, usize, Vec<u8>) {
        let d = mozjpeg::Decompress::new_mem(jpeg).unwrap();
        let mut rgb = d.rgb().unwrap();
        let (w, h) = (rgb.width(), rgb.height());
        let px: Vec<[u8; 3]> = rgb.read_scanlines().unwrap();
        rgb.finish().unwrap();
        (w, h, px.into_iter().flatten().collect())
    }

    fn flat(w: usize, h: usize, y: u8, cb: u8, cr: u8) -> [Vec<u8>; 3] {
        let (cw, ch) = (w.div_ceil(2), h.div_ceil(2));
        [vec![y; w * h], vec![cb; cw * ch], vec![cr; cw * ch]]
    }

    fn planes(p: &[Vec<u8>; 3], w: usize, h: usize) -> [Plane<'_>; 3] {
        let (cw, ch) = (w.div_ceil(2), h.div_ceil(2));
        [
            Plane {
                data: &p[0],
                stride: w,
                width: w,
                height: h,
            },
            Plane {
                data: &p[1],
                stride: cw,
                width: cw,
                height: ch,
            },
            Plane {
                data: &p[2],
                stride: cw,
                width: cw,
                height: ch,
            },
        ]
    }

    #[test]
    fn limited_range_black_and_white_become_full_range() {
        let mut enc = Yuv420Jpeg::default();
        for (y, want) in [(16u8, 0u8), (235, 255)] {
            let p = flat(34, 18, y, 128, 128);
            let jpeg = enc
                .encode(planes(&p, 34, 18), Range::Limited, 34, 18, 90)
                .unwrap();
            let (w, h, rgb) = decode(&jpeg);
            assert_eq!((w, h), (34, 18));
            assert!(
                rgb.iter().all(|&v| v.abs_diff(want) <= 2),
                "Y {y}: {:?}",
                &rgb[..6]
            );
        }
    }

    #[test]
    fn full_range_is_kept_and_chroma_gives_colour() {
        // Full-range BT.601 red: Y 76, Cb 85, Cr 255.
        let p = flat(16, 16, 76, 85, 255);
        let jpeg = Yuv420Jpeg::default()
            .encode(planes(&p, 16, 16), Range::Full, 16, 16, 95)
            .unwrap();
        let (_, _, rgb) = decode(&jpeg);
        let (r, g, b) = (rgb[0], rgb[1], rgb[2]);
        assert!(r > 240 && g < 15 && b < 15, "{r} {g} {b}");
    }

    #[test]
    fn strided_planes_and_odd_block_counts_encode() {
        // 1080 rows: 135 luma blocks, 67.5 chroma blocks; rows padded in the source.
        let (w, h, stride) = (64, 1080, 96);
        let cs = stride / 2;
        let y: Vec<u8> = (0..stride * h).map(|i| (i % 251) as u8).collect();
        let c = vec![128u8; cs * h / 2];
        let p = [
            Plane {
                data: &y,
                stride,
                width: w,
                height: h,
            },
            Plane {
                data: &c,
                stride: cs,
                width: w / 2,
                height: h / 2,
            },
            Plane {
                data: &c,
                stride: cs,
                width: w / 2,
                height: h / 2,
            },
        ];
        let jpeg = Yuv420Jpeg::default()
            .encode(p, Range::Limited, w, h, 80)
            .unwrap();
        assert_eq!(decode(&jpeg).0, w);
    }

    #[test]
    fn planes_smaller_than_the_picture_are_refused() {
        let p = flat(8, 8, 16, 128, 128);
        let err = Yuv420Jpeg::default()
            .encode(planes(&p, 8, 8), Range::Full, 16, 16, 80)
            .unwrap_err();
        assert!(err.contains("smaller"), "{err}");
    }
}

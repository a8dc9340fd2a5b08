//! JPEG from 8-bit 4:2:0 YUV planes with libjpeg-turbo's SIMD code, fed the planes as they are
//! (libjpeg's raw-data input: no colour conversion, no RGB, no chroma resampling). The planes
//! go to libjpeg one MCU row (16 luma rows, 8 of each chroma) at a time through a small band
//! buffer in libjpeg's block-padded layout; a limited-range picture (what H.264 streams carry)
//! is expanded to JPEG's full range while copying into it, so the expansion costs no pass of
//! its own and libjpeg reads each band from cache rather than a copy of the whole picture
//! (≈ 0.6 ms less per 1080p picture than a padded full-picture copy; BENCHMARKS.md, issue 17).

use std::ffi::c_ulong;
use std::panic::{catch_unwind, AssertUnwindSafe};

use mozjpeg_sys::{jpeg_common_struct, jpeg_compress_struct, jpeg_error_mgr};

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

/// Luma rows per MCU row of a 4:2:0 JPEG (chroma: half).
const MCU_ROWS: usize = 16;

/// Encodes 4:2:0 pictures; keeps its band buffers (one MCU row of each plane, ≈ 46 KB at
/// 1080p) from one picture to the next.
#[derive(Default)]
pub struct Yuv420Jpeg {
    band: [Vec<u8>; 3],
}

/// libjpeg's compressor and its in-memory destination, destroyed (and the buffer libjpeg
/// allocated freed) however the encode ends, an unwinding error included.
struct Compressor {
    cinfo: jpeg_compress_struct,
    err: Box<jpeg_error_mgr>,
    buffer: *mut u8,
    size: c_ulong,
}

impl Drop for Compressor {
    fn drop(&mut self) {
        // SAFETY: `cinfo` was created by `jpeg_create_compress` (destroying is allowed in any
        // state); `buffer` is null or the block libjpeg's memory destination malloc'ed.
        unsafe {
            mozjpeg_sys::jpeg_destroy_compress(&mut self.cinfo);
            if !self.buffer.is_null() {
                libc::free(self.buffer.cast());
            }
        }
    }
}

/// libjpeg's fatal errors unwind (mozjpeg-sys builds it to allow that) with its message code,
/// caught by [`Yuv420Jpeg::encode`].
extern "C-unwind" fn unwind_on_error(cinfo: &mut jpeg_common_struct) {
    // SAFETY: `err` points at the manager the compressor was made with.
    let code = unsafe { cinfo.err.as_ref() }.map_or(-1, |e| e.msg_code);
    std::panic::resume_unwind(Box::new(format!("libjpeg error {code}")));
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
        if width > 65_535 || height > 65_535 {
            return Err("JPEG sides are at most 65535 pixels".into());
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
        let band = &mut self.band;
        let run = catch_unwind(AssertUnwindSafe(|| {
            encode_bands(band, &planes, range, width, height, quality)
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

/// The compress sequence; `planes` are checked to cover a `width`×`height` 4:2:0 picture.
fn encode_bands(
    band: &mut [Vec<u8>; 3],
    planes: &[Plane<'_>; 3],
    range: Range,
    width: usize,
    height: usize,
    quality: u8,
) -> Result<Vec<u8>, String> {
    use mozjpeg_sys::*;
    // SAFETY: libjpeg's compress sequence on a zeroed struct, as its manual gives it; the
    // compressor is boxed so the error manager and the destination's pointers into it stay
    // put; every row pointer handed over points at a full padded row of a band buffer.
    unsafe {
        let mut err: Box<jpeg_error_mgr> = Box::new(std::mem::zeroed());
        jpeg_std_error(&mut err);
        err.error_exit = Some(unwind_on_error);
        let mut c = Box::new(Compressor {
            cinfo: std::mem::zeroed(),
            err,
            buffer: std::ptr::null_mut(),
            size: 0,
        });
        let c = &mut *c;
        c.cinfo.common.err = &mut *c.err;
        jpeg_create_compress(&mut c.cinfo);
        jpeg_mem_dest(&mut c.cinfo, &mut c.buffer, &mut c.size);
        // Both sides checked to be at most 65535 above.
        c.cinfo.image_width = width as u32;
        c.cinfo.image_height = height as u32;
        c.cinfo.input_components = 3;
        c.cinfo.in_color_space = J_COLOR_SPACE::JCS_YCbCr;
        jpeg_c_set_int_param(
            &mut c.cinfo,
            J_INT_PARAM::JINT_COMPRESS_PROFILE,
            JINT_COMPRESS_PROFILE_VALUE::JCP_FASTEST as i32,
        );
        jpeg_set_defaults(&mut c.cinfo);
        jpeg_set_colorspace(&mut c.cinfo, J_COLOR_SPACE::JCS_YCbCr);
        jpeg_set_quality(&mut c.cinfo, i32::from(quality.clamp(1, 100)), 0);
        // 4:2:0: luma 2×2, each chroma component 1×1.
        let comps = std::slice::from_raw_parts_mut(c.cinfo.comp_info, 3);
        comps[0].h_samp_factor = 2;
        comps[0].v_samp_factor = 2;
        for chroma in &mut comps[1..] {
            chroma.h_samp_factor = 1;
            chroma.v_samp_factor = 1;
        }
        c.cinfo.raw_data_in = 1;
        jpeg_start_compress(&mut c.cinfo, 1);
        // Each component's rows as libjpeg reads them: whole blocks wide.
        let comps = std::slice::from_raw_parts(c.cinfo.comp_info, 3);
        let strides: [usize; 3] =
            std::array::from_fn(|i| comps[i].width_in_blocks as usize * DCTSIZE);
        let rows: [usize; 3] = [MCU_ROWS, MCU_ROWS / 2, MCU_ROWS / 2];
        for i in 0..3 {
            band[i].resize(strides[i] * rows[i], 0);
        }
        let chroma_h = height.div_ceil(2);
        let mut ptrs: [[*const u8; MCU_ROWS]; 3] = [[std::ptr::null(); MCU_ROWS]; 3];
        while (c.cinfo.next_scanline as usize) < height {
            let top = c.cinfo.next_scanline as usize;
            for i in 0..3 {
                let (w, h, first) = if i == 0 {
                    (width, height, top)
                } else {
                    (width.div_ceil(2), chroma_h, top / 2)
                };
                let expand = match range {
                    Range::Full => Expand::None,
                    Range::Limited if i == 0 => Expand::Luma,
                    Range::Limited => Expand::Chroma,
                };
                let stride = strides[i];
                for r in 0..rows[i] {
                    // Rows past the picture repeat its last one (libjpeg reads only the
                    // block rows the picture has, but every pointer is a valid row).
                    let src_row = (first + r).min(h - 1) * planes[i].stride;
                    let src = &planes[i].data[src_row..src_row + w];
                    let dst = &mut band[i][r * stride..(r + 1) * stride];
                    copy_row(dst, src, expand);
                    ptrs[i][r] = dst.as_ptr();
                }
            }
            let image: [JSAMPARRAY; 3] = std::array::from_fn(|i| ptrs[i].as_ptr());
            if jpeg_write_raw_data(&mut c.cinfo, image.as_ptr(), MCU_ROWS as u32) == 0 {
                return Err("libjpeg took no rows".to_owned());
            }
        }
        jpeg_finish_compress(&mut c.cinfo);
        if c.buffer.is_null() {
            return Err("libjpeg wrote no output".to_owned());
        }
        Ok(std::slice::from_raw_parts(c.buffer, c.size as usize).to_vec())
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

/// Copies `src` into the start of `dst`, expanding the range if asked, and repeats its last
/// sample into the rest of `dst` (the padding to whole blocks, as libjpeg's own edge expansion
/// would fill it).
fn copy_row(dst: &mut [u8], src: &[u8], expand: Expand) {
    let w = src.len();
    match expand {
        Expand::None => dst[..w].copy_from_slice(src),
        Expand::Luma => {
            for (d, &s) in dst[..w].iter_mut().zip(src) {
                *d = expand_luma(s);
            }
        }
        Expand::Chroma => {
            for (d, &s) in dst[..w].iter_mut().zip(src) {
                *d = expand_chroma(s);
            }
        }
    }
    let last = dst[w - 1];
    dst[w..].fill(last);
}

/// 16–235 → 0–255 in fixed point, 8 fraction bits (255/219 ≈ 298/256), rounded:
/// `((s - 16)·298 + 128) >> 8`, clamped. Clamping the input first keeps every step within
/// 16 bits (at most 219·298 + 128 = 65390), so the compiler runs 16 samples per SIMD
/// instruction instead of 4 or 8; the results are the same (checked for every input).
#[inline(always)]
fn expand_luma(s: u8) -> u8 {
    let s = u16::from(s.clamp(16, 235));
    (((s - 16) * 298 + 128) >> 8) as u8
}

/// 16–240 around 128 → 0–255 around 128 (255/224 ≈ 291/256):
/// `(((s - 128)·291 + 128) >> 8) + 128`, clamped, which is `(291·s − 4352) >> 8`. For inputs
/// clamped to 15–240 that lies within 13..=65488, so it is computed in wrapping 16-bit
/// arithmetic (the product alone may wrap; the difference comes out right); the same results
/// as the 32-bit formula.
#[inline(always)]
fn expand_chroma(s: u8) -> u8 {
    let s = u16::from(s.clamp(15, 240));
    (s.wrapping_mul(291).wrapping_sub(4352) >> 8) as u8
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
    fn sixteen_bit_range_expansion_matches_the_32_bit_formula_for_every_sample() {
        for s in 0..=255u8 {
            let luma = ((i32::from(s) - 16) * 298 + 128) >> 8;
            assert_eq!(i32::from(expand_luma(s)), luma.clamp(0, 255), "Y {s}");
            let chroma = (((i32::from(s) - 128) * 291 + 128) >> 8) + 128;
            assert_eq!(i32::from(expand_chroma(s)), chroma.clamp(0, 255), "C {s}");
        }
    }

    #[test]
    fn odd_sizes_and_the_last_partial_mcu_row_encode_every_pixel() {
        // 37×23: the last MCU row has 7 luma rows, the last column block 5 samples; a
        // gradient down the picture shows whether the bottom rows came from the right place.
        let (w, h) = (37usize, 23usize);
        let (cw, ch) = (w.div_ceil(2), h.div_ceil(2));
        let y: Vec<u8> = (0..w * h).map(|i| (i / w * 10) as u8).collect();
        let c = vec![128u8; cw * ch];
        let p = [y, c.clone(), c];
        let jpeg = Yuv420Jpeg::default()
            .encode(planes(&p, w, h), Range::Full, w, h, 95)
            .unwrap();
        let (dw, dh, rgb) = decode(&jpeg);
        assert_eq!((dw, dh), (w, h));
        for row in [0, 8, 16, 22] {
            let v = rgb[(row * w + 18) * 3];
            assert!(v.abs_diff((row * 10) as u8) <= 6, "row {row}: {v}");
        }
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

//! One HEVC-coded HEIF item decoded by libde265 (Debian's `libde265-dev`, 1.0.11), its picture
//! handed over in libde265's own planes: what libheif 1.15 does inside `heif_decode_image`,
//! without the copy into libheif's image and the RGB planes it then makes (`heif.rs`). The few
//! calls needed are declared here against `de265.h`.

use std::ffi::{c_int, c_void, CStr};
use std::ptr;

use crate::heif_items::Coded;
use crate::yuv;

/// Decodes `item` of `file` on the calling thread (no libde265 worker threads: the worker's
/// CPU pool decides how many decodes run) and calls `use_planes` with its picture, which lives
/// until it returns. `nclx` (from the `colr` box) wins over the stream's own colour
/// description, as in libheif.
pub fn decode<T>(
    file: &[u8],
    item: &Coded,
    use_planes: impl FnOnce(&yuv::Planes<'_>) -> T,
) -> Result<T, String> {
    let data = item.data(file);
    let decoder = Decoder::new()?;
    for nal in &item.config_nals {
        decoder.push(&file[nal.clone()])?;
    }
    let mut at = 0;
    while at < data.len() {
        let len = data
            .get(at..at + item.length_size)
            .ok_or("the HEVC data ends inside a NAL length")?
            .iter()
            .fold(0usize, |v, b| (v << 8) | usize::from(*b));
        at += item.length_size;
        let nal = data
            .get(at..at.saturating_add(len))
            .ok_or("the HEVC data ends inside a NAL unit")?;
        decoder.push(nal)?;
        at += len;
    }
    // SAFETY: a live decoder.
    unsafe { ffi::de265_flush_data(decoder.0) };
    let img = decoder.picture()?;
    // SAFETY: `img` is libde265's next picture, valid until the next call on the decoder,
    // which is after `use_planes` returns (the decoder is dropped last).
    let planes = unsafe { Picture::read(img, item) }?;
    Ok(use_planes(&planes.planes()?))
}

/// Bytes libde265 holds while decoding a `width`×`height` picture of `bits` and `chroma`
/// (`chroma_format_idc`): its picture (two bytes a sample above 8 bits) and its per-block
/// metadata, measured at 1.8 bytes a pixel for a 48 MP 8-bit 4:2:0 picture (libde265's peak
/// 163 MB, BENCHMARKS.md), counted here as 2.
pub fn decode_bytes(width: u32, height: u32, bits: u32, chroma: u32) -> u64 {
    let pixels = u64::from(width) * u64::from(height);
    let sample = if bits > 8 { 2 } else { 1 };
    // Luma plus both chroma planes, in quarters of the luma plane.
    let quarters = match chroma {
        0 => 4,
        1 => 6,
        2 => 8,
        _ => 12,
    };
    pixels * sample * quarters / 4 + 2 * pixels
}

struct Decoder(*mut ffi::Context);

impl Decoder {
    fn new() -> Result<Decoder, String> {
        // SAFETY: no preconditions; a null return is handled.
        let ctx = unsafe { ffi::de265_new_decoder() };
        if ctx.is_null() {
            return Err("libde265 could not allocate a decoder".into());
        }
        Ok(Decoder(ctx))
    }

    fn push(&self, nal: &[u8]) -> Result<(), String> {
        let len = c_int::try_from(nal.len()).map_err(|_| "a NAL unit over 2 GiB")?;
        // SAFETY: a live decoder; libde265 copies the bytes before returning.
        check(unsafe { ffi::de265_push_NAL(self.0, nal.as_ptr().cast(), len, 0, ptr::null_mut()) })
    }

    /// Decodes what was pushed until its picture is out (libheif's loop).
    fn picture(&self) -> Result<*const ffi::Image, String> {
        loop {
            let mut more: c_int = 0;
            // SAFETY: a live decoder.
            let err = unsafe { ffi::de265_decode(self.0, &mut more) };
            // SAFETY: as above; the picture stays owned by the decoder.
            let img = unsafe { ffi::de265_peek_next_picture(self.0) };
            if !img.is_null() {
                return Ok(img);
            }
            if err != 0 && err != ffi::ERROR_WAITING_FOR_INPUT_DATA {
                check(err)?;
            }
            if err != 0 || more == 0 {
                return Err("libde265 decoded no picture".into());
            }
        }
    }
}

impl Drop for Decoder {
    fn drop(&mut self) {
        // SAFETY: a live decoder, freed once.
        unsafe {
            ffi::de265_free_decoder(self.0);
        }
    }
}

/// libde265's picture: its planes and colour description.
struct Picture<'a> {
    bits: u32,
    subsampling: yuv::Subsampling,
    matrix: yuv::Matrix,
    y: yuv::Plane<'a>,
    chroma: Option<(yuv::Plane<'a>, yuv::Plane<'a>)>,
}

impl<'a> Picture<'a> {
    /// # Safety
    /// `img` must be a live libde265 picture that outlives `'a`.
    unsafe fn read(img: *const ffi::Image, item: &Coded) -> Result<Picture<'a>, String> {
        let subsampling = match ffi::de265_get_chroma_format(img) {
            0 => yuv::Subsampling::Monochrome,
            1 => yuv::Subsampling::S420,
            2 => yuv::Subsampling::S422,
            3 => yuv::Subsampling::S444,
            _ => return Err("libde265 returned an unknown chroma format".into()),
        };
        let bits = u32::try_from(ffi::de265_get_bits_per_pixel(img, 0)).unwrap_or(0);
        let plane = |c: c_int| -> Option<yuv::Plane<'a>> {
            let mut stride: c_int = 0;
            let width = ffi::de265_get_image_width(img, c);
            let height = ffi::de265_get_image_height(img, c);
            let data = ffi::de265_get_image_plane(img, c, &mut stride);
            // libde265's stride is in bytes, its planes `stride * height` bytes at least.
            yuv::Plane::from_c(data, width, height, stride)
        };
        let y = plane(0).ok_or("libde265 returned no luma plane")?;
        if (y.width, y.height) != (item.width as usize, item.height as usize) {
            return Err(format!(
                "the HEVC picture is {}×{}, its ispe box says {}×{}",
                y.width, y.height, item.width, item.height
            ));
        }
        let chroma = match subsampling {
            yuv::Subsampling::Monochrome => None,
            _ => Some((
                plane(1).ok_or("libde265 returned no Cb plane")?,
                plane(2).ok_or("libde265 returned no Cr plane")?,
            )),
        };
        let (matrix, full) = item.nclx.unwrap_or_else(|| {
            (
                u32::try_from(ffi::de265_get_image_matrix_coefficients(img)).unwrap_or(2),
                ffi::de265_get_image_full_range_flag(img) != 0,
            )
        });
        let matrix = yuv::Matrix::from_nclx(matrix, full)
            .ok_or(format!("a colour matrix it does not convert ({matrix})"))?;
        Ok(Picture {
            bits,
            subsampling,
            matrix,
            y,
            chroma,
        })
    }

    fn planes(&self) -> Result<yuv::Planes<'a>, String> {
        yuv::Planes::new(
            self.bits,
            self.subsampling,
            self.matrix,
            self.y,
            self.chroma,
            None,
        )
        .ok_or_else(|| "libde265 returned planes of the wrong size".into())
    }
}

fn check(err: c_int) -> Result<(), String> {
    // SAFETY: `de265_isOK` and `de265_get_error_text` take any code; the text is static.
    unsafe {
        if ffi::de265_isOK(err) != 0 {
            return Ok(());
        }
        let text = ffi::de265_get_error_text(err);
        let text = if text.is_null() {
            String::new()
        } else {
            CStr::from_ptr(text).to_string_lossy().into_owned()
        };
        Err(format!("{text} (libde265 error {err})"))
    }
}

/// libde265 1.0's C API, the calls this module makes (de265.h).
mod ffi {
    use super::*;

    #[repr(C)]
    pub struct Context {
        _opaque: [u8; 0],
    }
    #[repr(C)]
    pub struct Image {
        _opaque: [u8; 0],
    }

    pub const ERROR_WAITING_FOR_INPUT_DATA: c_int = 13;

    #[link(name = "de265")]
    extern "C" {
        pub fn de265_new_decoder() -> *mut Context;
        pub fn de265_free_decoder(ctx: *mut Context) -> c_int;
        pub fn de265_push_NAL(
            ctx: *mut Context,
            data: *const c_void,
            length: c_int,
            pts: i64,
            user_data: *mut c_void,
        ) -> c_int;
        pub fn de265_flush_data(ctx: *mut Context) -> c_int;
        pub fn de265_decode(ctx: *mut Context, more: *mut c_int) -> c_int;
        pub fn de265_peek_next_picture(ctx: *mut Context) -> *const Image;
        pub fn de265_get_image_width(img: *const Image, channel: c_int) -> c_int;
        pub fn de265_get_image_height(img: *const Image, channel: c_int) -> c_int;
        pub fn de265_get_chroma_format(img: *const Image) -> c_int;
        pub fn de265_get_bits_per_pixel(img: *const Image, channel: c_int) -> c_int;
        pub fn de265_get_image_plane(
            img: *const Image,
            channel: c_int,
            stride: *mut c_int,
        ) -> *const u8;
        pub fn de265_get_image_full_range_flag(img: *const Image) -> c_int;
        pub fn de265_get_image_matrix_coefficients(img: *const Image) -> c_int;
        pub fn de265_isOK(err: c_int) -> c_int;
        pub fn de265_get_error_text(err: c_int) -> *const std::ffi::c_char;
    }
}

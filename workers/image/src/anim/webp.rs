//! Animated WebP sources through libwebp: the container read by its demuxer (canvas, frame and
//! loop counts) before anything is decoded, then the frames one at a time by its
//! `WebPAnimDecoder`, which composes each onto the canvas (blending and disposal as the
//! format says).

use std::marker::PhantomData;
use std::mem::MaybeUninit;
use std::ptr::{self, NonNull};

use image::{DynamicImage, RgbaImage};
use libwebp_sys as sys;

use super::gif::Header;

/// The VP8X flag saying the file is an animation.
const ANIMATION_FLAG: u8 = 0x02;

/// Whether `data` is a WebP whose extended header says it is animated (nothing else read).
pub fn is_animated(data: &[u8]) -> bool {
    data.len() >= 21
        && &data[..4] == b"RIFF"
        && &data[8..12] == b"WEBP"
        && &data[12..16] == b"VP8X"
        && data[20] & ANIMATION_FLAG != 0
}

/// The container's canvas, frame and loop counts, no frame decoded; an error says what is
/// wrong with the container.
pub fn header(data: &[u8]) -> Result<Header, String> {
    let riff = data
        .get(4..8)
        .map(|b| u64::from(u32::from_le_bytes([b[0], b[1], b[2], b[3]])) + 8);
    if let Some(riff) = riff.filter(|&r| r > data.len() as u64) {
        return Err(format!(
            "the webp is cut short: its RIFF header says {riff} bytes, {} are here",
            data.len()
        ));
    }
    let whole = sys::WebPData {
        bytes: data.as_ptr(),
        size: data.len(),
    };
    let mut state = sys::WebPDemuxState::WEBP_DEMUX_PARSE_ERROR;
    // SAFETY: the demuxer reads `data` within its length and keeps no copy past `delete`.
    unsafe {
        let demux =
            sys::WebPDemuxInternal(&whole, 0, &mut state, sys::WEBP_DEMUX_ABI_VERSION as i32);
        if demux.is_null() {
            return Err(format!(
                "cannot read the webp container ({})",
                match state {
                    sys::WebPDemuxState::WEBP_DEMUX_PARSING_HEADER
                    | sys::WebPDemuxState::WEBP_DEMUX_PARSED_HEADER => "it is cut short",
                    _ => "a chunk is malformed or missing",
                }
            ));
        }
        let get = |f| sys::WebPDemuxGetI(demux, f);
        let header = Header {
            canvas: (
                get(sys::WebPFormatFeature::WEBP_FF_CANVAS_WIDTH),
                get(sys::WebPFormatFeature::WEBP_FF_CANVAS_HEIGHT),
            ),
            frames: get(sys::WebPFormatFeature::WEBP_FF_FRAME_COUNT),
            loop_count: get(sys::WebPFormatFeature::WEBP_FF_LOOP_COUNT),
            icc: chunk(demux, b"ICCP\0"),
            exif: chunk(demux, b"EXIF\0").map(exif_from_tiff_header),
        };
        sys::WebPDemuxDelete(demux);
        Ok(header)
    }
}

/// An `EXIF` chunk from its TIFF header on: the WebP specification says the chunk holds the
/// TIFF data; a writer that copied it from a JPEG may have kept JPEG's `Exif\0\0` prefix.
fn exif_from_tiff_header(mut chunk: Vec<u8>) -> Vec<u8> {
    if chunk.starts_with(b"Exif\0\0") {
        chunk.drain(..6);
    }
    chunk
}

/// The first chunk named `fourcc` (NUL-terminated) of an open demuxer, copied.
///
/// # Safety
/// `demux` must be a live demuxer.
unsafe fn chunk(demux: *const sys::WebPDemuxer, fourcc: &[u8; 5]) -> Option<Vec<u8>> {
    let mut iter = MaybeUninit::<sys::WebPChunkIterator>::zeroed();
    // SAFETY: the demuxer is alive (the caller's promise); on success the iterator points
    // into the data it reads, copied here before the iterator is released.
    unsafe {
        if sys::WebPDemuxGetChunk(demux, fourcc.as_ptr().cast(), 1, iter.as_mut_ptr()) == 0 {
            return None;
        }
        let mut iter = iter.assume_init();
        let found = std::slice::from_raw_parts(iter.chunk.bytes, iter.chunk.size).to_vec();
        sys::WebPDemuxReleaseChunkIterator(&mut iter);
        Some(found)
    }
}

/// Bytes [`Frames`] holds for a `canvas`: libwebp's canvas and its disposed copy, the copy
/// lent out here, and one frame's decode (a lossless frame's ARGB picture, or an alpha plane
/// and its decoder's, whichever is larger).
pub fn held_bytes(canvas: (u32, u32)) -> u64 {
    4 * u64::from(canvas.0) * u64::from(canvas.1) * 4
}

/// The frames of an animated WebP, composed, one at a time.
pub struct Frames<'a> {
    dec: NonNull<sys::WebPAnimDecoder>,
    canvas: DynamicImage,
    /// The end of the last frame, in milliseconds.
    last: i32,
    data: PhantomData<&'a [u8]>,
}

impl<'a> Frames<'a> {
    pub fn new(data: &'a [u8]) -> Result<Frames<'a>, String> {
        let mut options = MaybeUninit::<sys::WebPAnimDecoderOptions>::zeroed();
        // SAFETY: libwebp writes the defaults (the memory was zeroed first).
        let ok = unsafe {
            sys::WebPAnimDecoderOptionsInitInternal(
                options.as_mut_ptr(),
                sys::WEBP_DEMUX_ABI_VERSION as i32,
            )
        };
        if ok == 0 {
            return Err("libwebp's demux library does not match its headers".into());
        }
        // SAFETY: initialised above.
        let mut options = unsafe { options.assume_init() };
        options.color_mode = sys::WEBP_CSP_MODE::MODE_RGBA;
        options.use_threads = 0;
        let whole = sys::WebPData {
            bytes: data.as_ptr(),
            size: data.len(),
        };
        // SAFETY: the decoder reads `data`, which outlives it (`'a`), and `options`, copied.
        let dec = unsafe {
            sys::WebPAnimDecoderNewInternal(&whole, &options, sys::WEBP_DEMUX_ABI_VERSION as i32)
        };
        let dec = NonNull::new(dec).ok_or("cannot read the webp container")?;
        let mut info = sys::WebPAnimInfo::default();
        // SAFETY: the decoder is alive and writes only `info`.
        if unsafe { sys::WebPAnimDecoderGetInfo(dec.as_ptr(), &mut info) } == 0 {
            // SAFETY: created above, deleted once.
            unsafe { sys::WebPAnimDecoderDelete(dec.as_ptr()) };
            return Err("cannot read the webp container".into());
        }
        Ok(Frames {
            dec,
            canvas: DynamicImage::ImageRgba8(RgbaImage::new(info.canvas_width, info.canvas_height)),
            last: 0,
            data: PhantomData,
        })
    }

    /// The canvas as the last frame left it.
    pub fn canvas(&self) -> &DynamicImage {
        &self.canvas
    }

    /// Decodes the next frame onto the canvas; its duration in milliseconds, or `None` after
    /// the last.
    pub fn next(&mut self, number: u32) -> Result<Option<u32>, String> {
        // SAFETY: the decoder is alive.
        if unsafe { sys::WebPAnimDecoderHasMoreFrames(self.dec.as_ptr()) } == 0 {
            return Ok(None);
        }
        let mut buf: *mut u8 = ptr::null_mut();
        let mut timestamp = 0i32;
        // SAFETY: on success `buf` points at the decoder's canvas, width × height × 4 bytes,
        // valid until the next call; it is copied out here at once.
        unsafe {
            if sys::WebPAnimDecoderGetNext(self.dec.as_ptr(), &mut buf, &mut timestamp) == 0
                || buf.is_null()
            {
                return Err(format!("cannot decode frame {number} of the webp"));
            }
            let DynamicImage::ImageRgba8(canvas) = &mut self.canvas else {
                unreachable!("the canvas is RGBA")
            };
            let len = canvas.as_raw().len();
            canvas
                .as_mut()
                .copy_from_slice(std::slice::from_raw_parts(buf, len));
        }
        let duration = timestamp.saturating_sub(self.last).max(0) as u32;
        self.last = timestamp;
        Ok(Some(duration))
    }
}

impl Drop for Frames<'_> {
    fn drop(&mut self) {
        // SAFETY: created by `WebPAnimDecoderNewInternal`, deleted once.
        unsafe { sys::WebPAnimDecoderDelete(self.dec.as_ptr()) };
    }
}

//! JPEG through libjpeg-turbo's SIMD code (as built into mozjpeg): the header with its EXIF and
//! ICC markers, a decode to RGB scaled by the IDCT itself (shrink-on-load), and a 4:2:0 encode
//! with libjpeg-turbo's fast settings: progressive by spectral selection only (see
//! [`SPECTRAL_SCANS`]), or baseline.
//!
//! libjpeg reports errors by calling back into an error manager that must not return; the
//! mozjpeg crate unwinds from there, so every call here runs inside `catch_unwind` and the
//! unwind becomes a [`JpegError`].

use std::panic::{catch_unwind, AssertUnwindSafe};

use mozjpeg::{ColorSpace, Decompress, Marker};
use mozjpeg_sys::{jpeg_common_struct, jpeg_error_mgr};

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct JpegError(String);

/// What the header says, read before any pixel is decoded.
#[derive(Debug, Clone)]
pub struct Header {
    pub width: u32,
    pub height: u32,
    /// CMYK or YCCK: not decoded here (the caller's fallback handles the inversion).
    pub cmyk: bool,
    /// The EXIF block (TIFF header onwards, without the `Exif\0\0` prefix).
    pub exif: Option<Vec<u8>>,
    /// The ICC profile, reassembled from its APP2 chunks.
    pub icc: Option<Vec<u8>>,
    /// Progressive (or other multi-scan) coding: libjpeg keeps every coefficient of the
    /// picture while decoding, whatever the output scale.
    pub progressive: bool,
    /// The size of those coefficients (64 × 2 bytes per 8×8 block of every component).
    pub coefficient_bytes: u64,
}

/// 8-bit RGB pixels, row by row.
pub struct Rgb {
    pub pixels: Vec<u8>,
    pub width: u32,
    pub height: u32,
}

const SAVED_MARKERS: &[Marker] = &[Marker::APP(1), Marker::APP(2)];
/// Profile bytes per APP2 marker (65,533 less the `ICC_PROFILE\0`, sequence and count bytes).
const ICC_CHUNK: usize = 65_519;

/// Runs `f`, turning libjpeg's unwinding errors into [`JpegError`].
fn guarded<T>(f: impl FnOnce() -> Result<T, JpegError>) -> Result<T, JpegError> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(result) => result,
        Err(payload) => Err(JpegError(
            payload
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| payload.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_else(|| "libjpeg failed".to_owned()),
        )),
    }
}

fn io_error(e: std::io::Error) -> JpegError {
    JpegError(e.to_string())
}

/// The error manager: libjpeg's own messages, and a premature end of data (a truncated
/// upload) is an error rather than a warning that pads the rest of the picture with grey.
fn strict_errors() -> jpeg_error_mgr {
    // SAFETY: `jpeg_std_error` fills every field of the zeroed struct.
    let mut err: jpeg_error_mgr = unsafe { std::mem::zeroed() };
    unsafe { mozjpeg_sys::jpeg_std_error(&mut err) };
    err.error_exit = Some(unwind_with_message);
    err.emit_message = Some(fail_on_truncation);
    err
}

fn message(cinfo: &mut jpeg_common_struct) -> String {
    // SAFETY: `err` points at the manager installed by `strict_errors` for this decompressor.
    let Some(err) = (unsafe { cinfo.err.as_ref() }) else {
        return "libjpeg failed".to_owned();
    };
    if err.msg_code == mozjpeg_sys::JWRN_JPEG_EOF {
        return "the data ends before the picture does (truncated file)".to_owned();
    }
    let Some(format) = err.format_message else {
        return format!("libjpeg error {}", err.msg_code);
    };
    let mut buffer = [0u8; 80];
    // SAFETY: `format_message` writes at most JMSG_LENGTH_MAX (80) bytes, NUL included; the
    // binding declares the buffer as shared, but the C side writes into it.
    unsafe {
        let format: unsafe extern "C-unwind" fn(&mut jpeg_common_struct, &mut [u8; 80]) =
            std::mem::transmute(format);
        format(cinfo, &mut buffer);
    }
    let text = buffer.split(|&b| b == 0).next().unwrap_or_default();
    String::from_utf8_lossy(text).into_owned()
}

extern "C-unwind" fn unwind_with_message(cinfo: &mut jpeg_common_struct) {
    let text = message(cinfo);
    std::panic::resume_unwind(Box::new(text));
}

extern "C-unwind" fn fail_on_truncation(cinfo: &mut jpeg_common_struct, level: i32) {
    // SAFETY: as in `message`.
    let eof = unsafe { cinfo.err.as_ref() }
        .is_some_and(|err| level < 0 && err.msg_code == mozjpeg_sys::JWRN_JPEG_EOF);
    if eof {
        unwind_with_message(cinfo);
    }
}

fn open(data: &[u8]) -> Result<(Decompress<&[u8]>, Header), JpegError> {
    let dec = Decompress::with_markers(SAVED_MARKERS)
        .with_err(strict_errors())
        .from_mem(data)
        .map_err(io_error)?;
    let (width, height) = dec.size();
    let mut exif = None;
    let mut icc_chunks: Vec<(u8, &[u8])> = Vec::new();
    for marker in dec.markers() {
        match marker.marker {
            Marker::APP(1) if exif.is_none() => {
                if let Some(rest) = marker.data.strip_prefix(b"Exif\0\0") {
                    exif = Some(rest.to_vec());
                }
            }
            Marker::APP(2) => {
                if let Some([seq, _count, chunk @ ..]) = marker.data.strip_prefix(b"ICC_PROFILE\0")
                {
                    icc_chunks.push((*seq, chunk));
                }
            }
            _ => {}
        }
    }
    icc_chunks.sort_by_key(|(seq, _)| *seq);
    let icc =
        (!icc_chunks.is_empty()).then(|| icc_chunks.iter().flat_map(|c| c.1).copied().collect());
    let cmyk = matches!(
        dec.color_space(),
        ColorSpace::JCS_CMYK | ColorSpace::JCS_YCCK
    );
    let coefficient_bytes = dec
        .components()
        .iter()
        .map(|c| u64::from(c.width_in_blocks) * u64::from(c.height_in_blocks) * 128)
        .sum();
    let header = Header {
        width: u32::try_from(width).unwrap_or(u32::MAX),
        height: u32::try_from(height).unwrap_or(u32::MAX),
        cmyk,
        exif,
        icc,
        progressive: is_multiscan(data),
        coefficient_bytes,
    };
    Ok((dec, header))
}

/// Whether the frame header (SOF) before the first scan is a progressive or lossless one.
fn is_multiscan(data: &[u8]) -> bool {
    let mut at = 2; // after SOI
    while at + 4 <= data.len() {
        if data[at] != 0xFF {
            return false;
        }
        let marker = data[at + 1];
        match marker {
            0xFF => at += 1, // fill byte
            // SOF2, SOF6, SOF10, SOF14: progressive; SOF3/7/11/15: lossless (also multi-pass).
            0xC2 | 0xC3 | 0xC6 | 0xC7 | 0xCA | 0xCB | 0xCE | 0xCF => return true,
            0xC0 | 0xC1 | 0xC5 | 0xC9 | 0xCD | 0xDA => return false,
            _ => at += 2 + usize::from(u16::from_be_bytes([data[at + 2], data[at + 3]])),
        }
    }
    false
}

/// Reads the header only.
pub fn header(data: &[u8]) -> Result<Header, JpegError> {
    guarded(|| open(data).map(|(_, header)| header))
}

/// Decodes to RGB at `eighths`/8 of the full size (1 to 8; the IDCT does the scaling, so
/// 1/2, 1/4 and 1/8 skip most of the work). `None` for CMYK, which is left to the caller.
pub fn decode_rgb(data: &[u8], eighths: u8) -> Result<Option<Rgb>, JpegError> {
    decode_rgb_scans(data, eighths, true)
}

/// As [`decode_rgb`]; `select_scans: false` decodes every scan of a progressive file even at
/// 1/4 and 1/8 scale (for comparisons: `examples/scan-selection.rs`).
pub fn decode_rgb_scans(
    data: &[u8],
    eighths: u8,
    select_scans: bool,
) -> Result<Option<Rgb>, JpegError> {
    let eighths = eighths.clamp(1, 8);
    // A progressive file at 1/4 or 1/8 scale: only the scans that scale reads.
    let selected = select_scans
        .then(|| crate::scans::for_scale(data, eighths))
        .flatten();
    guarded(|| {
        let (mut dec, header) = open(selected.as_deref().unwrap_or(data))?;
        if header.cmyk {
            return Ok(None);
        }
        if selected.is_some() {
            // libjpeg would guess the missing low bits from neighbouring blocks; measured on
            // the benchmark's wallpapers that costs as much as the scans it saves and brings
            // the picture no closer to an every-scan decode.
            dec.do_block_smoothing(false);
        }
        dec.scale(eighths);
        let mut started = dec.rgb().map_err(io_error)?;
        let (width, height) = (started.width(), started.height());
        let pixels = started.read_scanlines::<u8>().map_err(io_error)?;
        started.finish().map_err(io_error)?;
        Ok(Some(Rgb {
            width: u32::try_from(width).map_err(|e| JpegError(e.to_string()))?,
            height: u32::try_from(height).map_err(|e| JpegError(e.to_string()))?,
            pixels,
        }))
    })
}

/// Metadata written into an output.
#[derive(Default)]
pub struct Metadata<'a> {
    pub icc: Option<&'a [u8]>,
    pub exif: Option<&'a [u8]>,
}

/// How an output's scans are laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scans {
    /// One interleaved scan, standard Huffman tables (libjpeg's and libvips' default).
    Baseline,
    /// Progressive by spectral selection only ([`SPECTRAL_SCANS`]): image-worker's default.
    Spectral,
    /// libjpeg's `jpeg_simple_progression` script (successive approximation, 10 scans), what
    /// libvips and Pillow write when asked for a progressive JPEG.
    Simple,
}

/// The progressive script of image-worker's outputs: the DC of every component (a 1/8-size
/// preview), then each component's whole AC band, with no successive-approximation passes.
/// libjpeg's own script (`jpeg_simple_progression`) codes the AC bands in 9 scans, 5 of them
/// refinement passes; with the Huffman tables optimised (which progressive coding forces) every
/// scan is gathered once and emitted once, and on 1280 px photographs the refinements were
/// about 40 % of the encode's instructions (callgrind, BENCHMARKS.md issue 18, 2026-11-30
/// 23:45 UTC). This script halves the encode time for files 0.3–1 % larger.
const SPECTRAL_SCANS: [mozjpeg_sys::jpeg_scan_info; 4] = [
    scan(&[0, 1, 2], 0, 0),
    scan(&[0], 1, 63),
    scan(&[1], 1, 63),
    scan(&[2], 1, 63),
];

const fn scan(components: &[i32], ss: i32, se: i32) -> mozjpeg_sys::jpeg_scan_info {
    let mut component_index = [0; 4];
    let mut i = 0;
    while i < components.len() {
        component_index[i] = components[i];
        i += 1;
    }
    mozjpeg_sys::jpeg_scan_info {
        comps_in_scan: components.len() as i32,
        component_index,
        Ss: ss,
        Se: se,
        Ah: 0,
        Al: 0,
    }
}

/// libjpeg's compressor and its in-memory destination, destroyed (and the buffer libjpeg
/// allocated freed) however the encode ends, an unwinding error included.
struct Compressor {
    cinfo: mozjpeg_sys::jpeg_compress_struct,
    err: Box<jpeg_error_mgr>,
    buffer: *mut u8,
    size: std::ffi::c_ulong,
}

impl Drop for Compressor {
    fn drop(&mut self) {
        // SAFETY: `cinfo` was created by `jpeg_CreateCompress` (destroying is allowed in any
        // state); `buffer` is null or the block libjpeg's memory destination malloc'ed.
        unsafe {
            mozjpeg_sys::jpeg_destroy_compress(&mut self.cinfo);
            if !self.buffer.is_null() {
                libc::free(self.buffer.cast());
            }
        }
    }
}

/// JPEG, 4:2:0, with libjpeg-turbo's settings (mozjpeg's trellis quantisation and scan search
/// cost several times the encode time for a few per cent of size): `progressive` with the
/// spectral-selection script above (Huffman tables optimised, as progressive coding needs),
/// otherwise baseline with the standard tables.
pub fn encode_rgb(
    rgb: &[u8],
    width: u32,
    height: u32,
    quality: u8,
    progressive: bool,
    metadata: &Metadata<'_>,
) -> Result<Vec<u8>, JpegError> {
    let scans = if progressive {
        Scans::Spectral
    } else {
        Scans::Baseline
    };
    encode_rgb_scans(rgb, width, height, quality, scans, metadata)
}

/// [`encode_rgb`] with the scan layout chosen (`Scans::Simple`: for comparisons and for tests
/// that need libjpeg's own progressive script).
pub fn encode_rgb_scans(
    rgb: &[u8],
    width: u32,
    height: u32,
    quality: u8,
    scans: Scans,
    metadata: &Metadata<'_>,
) -> Result<Vec<u8>, JpegError> {
    use mozjpeg_sys::*;
    if width > 65_535 || height > 65_535 {
        return Err(JpegError("JPEG sides are at most 65535 pixels".into()));
    }
    let row_bytes = width as usize * 3;
    if width == 0 || height == 0 || rgb.len() < row_bytes * height as usize {
        return Err(JpegError(format!(
            "{} bytes are not a {width}×{height} RGB picture",
            rgb.len()
        )));
    }
    guarded(|| {
        // SAFETY: libjpeg's compress sequence on a zeroed struct, as its manual gives it; the
        // error manager is boxed so its address stays fixed while `cinfo` points at it; the
        // scan script is a static; every row handed over lies inside `rgb` (checked above).
        unsafe {
            let mut c = Box::new(Compressor {
                cinfo: std::mem::zeroed(),
                err: Box::new(strict_errors()),
                buffer: std::ptr::null_mut(),
                size: 0,
            });
            let c = &mut *c;
            c.cinfo.common.err = &mut *c.err;
            jpeg_create_compress(&mut c.cinfo);
            jpeg_mem_dest(&mut c.cinfo, &mut c.buffer, &mut c.size);
            c.cinfo.image_width = width;
            c.cinfo.image_height = height;
            c.cinfo.input_components = 3;
            c.cinfo.in_color_space = J_COLOR_SPACE::JCS_RGB;
            jpeg_c_set_int_param(
                &mut c.cinfo,
                J_INT_PARAM::JINT_COMPRESS_PROFILE,
                JINT_COMPRESS_PROFILE_VALUE::JCP_FASTEST as i32,
            );
            jpeg_set_defaults(&mut c.cinfo);
            jpeg_set_quality(&mut c.cinfo, i32::from(quality), 0);
            // 4:2:0: luma 2×2, each chroma component 1×1.
            let comps = std::slice::from_raw_parts_mut(c.cinfo.comp_info, 3);
            comps[0].h_samp_factor = 2;
            comps[0].v_samp_factor = 2;
            for chroma in &mut comps[1..] {
                chroma.h_samp_factor = 1;
                chroma.v_samp_factor = 1;
            }
            match scans {
                Scans::Baseline => {}
                Scans::Spectral => {
                    c.cinfo.scan_info = SPECTRAL_SCANS.as_ptr();
                    c.cinfo.num_scans = SPECTRAL_SCANS.len() as i32;
                    c.cinfo.optimize_coding = 1;
                }
                Scans::Simple => jpeg_simple_progression(&mut c.cinfo),
            }
            jpeg_start_compress(&mut c.cinfo, 1);
            if let Some(exif) = metadata.exif {
                let mut block = Vec::with_capacity(exif.len() + 6);
                block.extend_from_slice(b"Exif\0\0");
                block.extend_from_slice(exif);
                if block.len() <= 65_533 {
                    jpeg_write_marker(&mut c.cinfo, 0xE1, block.as_ptr(), block.len() as u32);
                }
            }
            if let Some(icc) = metadata.icc.filter(|icc| !icc.is_empty()) {
                // Numbered from 1, as the ICC specification and every reader count.
                let chunks = icc.chunks(ICC_CHUNK);
                let count = u8::try_from(chunks.len())
                    .map_err(|_| JpegError("the ICC profile is too large for a JPEG".into()))?;
                for (seq, chunk) in (1u8..).zip(chunks) {
                    let mut marker = Vec::with_capacity(chunk.len() + 14);
                    marker.extend_from_slice(b"ICC_PROFILE\0");
                    marker.extend_from_slice(&[seq, count]);
                    marker.extend_from_slice(chunk);
                    jpeg_write_marker(&mut c.cinfo, 0xE2, marker.as_ptr(), marker.len() as u32);
                }
            }
            // A few rows at a time: libjpeg takes pointers to each.
            let mut rows: [*const u8; 16] = [std::ptr::null(); 16];
            while c.cinfo.next_scanline < height {
                let first = c.cinfo.next_scanline as usize;
                let n = (height as usize - first).min(rows.len());
                for (i, row) in rows.iter_mut().take(n).enumerate() {
                    *row = rgb.as_ptr().add((first + i) * row_bytes);
                }
                jpeg_write_scanlines(&mut c.cinfo, rows.as_ptr() as JSAMPARRAY, n as u32);
            }
            jpeg_finish_compress(&mut c.cinfo);
            if c.buffer.is_null() {
                return Err(JpegError("libjpeg wrote no output".into()));
            }
            Ok(std::slice::from_raw_parts(c.buffer, c.size as usize).to_vec())
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_header_tells_progressive_coding_and_its_coefficient_memory() {
        let (w, h) = (64u32, 48u32);
        let rgb = vec![128u8; (w * h * 3) as usize];
        let data = encode_rgb(&rgb, w, h, 80, true, &Metadata::default()).unwrap();
        let header = header(&data).unwrap();
        assert!(header.progressive);
        assert_eq!((header.width, header.height), (64, 48));
        // 4:2:0: 8×6 luma blocks and 4×3 for each chroma component, 128 bytes each.
        assert_eq!(header.coefficient_bytes, (8 * 6 + 2 * 4 * 3) * 128);
        let truncated = &data[..data.len() / 2];
        let err = decode_rgb(truncated, 8).err().unwrap();
        assert!(err.to_string().contains("truncated"), "{err}");
    }
}

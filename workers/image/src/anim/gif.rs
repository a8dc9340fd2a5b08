//! Animated GIF sources: the container walked without decoding a pixel (frame count, loop
//! count, each frame's rectangle), then the frames decoded one at a time and composed onto one
//! RGBA canvas as browsers compose them (each frame's disposal applied before the next is drawn;
//! transparent pixels leave the canvas as it was).

use std::io::Cursor;
use std::num::NonZeroU64;

use gif::{DecodeOptions, Decoder, DisposalMethod, MemoryLimit, Repeat};
use image::{DynamicImage, RgbaImage};

/// What the container says, before any frame is decoded.
pub struct Header {
    pub canvas: (u32, u32),
    pub frames: u32,
    /// WebP's meaning: 0 plays for ever, n plays n times.
    pub loop_count: u32,
    /// The ICC profile (GIF's `ICCRGBG1` block, WebP's `ICCP` chunk).
    pub icc: Option<Vec<u8>>,
    /// The EXIF block from its TIFF header on (WebP's `EXIF` chunk; GIF has none).
    pub exif: Option<Vec<u8>>,
}

/// Reads every block of `data` and counts its frames, decoding none (the LZW data is skipped).
/// A frame cut short, a block the format does not have, or a frame larger than the screen is
/// an error naming the frame.
pub fn header(data: &[u8]) -> Result<Header, String> {
    let mut options = DecodeOptions::new();
    options.skip_frame_decoding(true);
    let mut decoder = options
        .read_info(Cursor::new(data))
        .map_err(|e| format!("cannot read the gif header: {e}"))?;
    let canvas = (u32::from(decoder.width()), u32::from(decoder.height()));
    let screen = u64::from(canvas.0) * u64::from(canvas.1);
    let mut frames = 0u32;
    loop {
        let frame = decoder
            .read_next_frame()
            .map_err(|e| format!("cannot read frame {} of the gif: {e}", frames + 1))?;
        let Some(frame) = frame else { break };
        frames += 1;
        let size = u64::from(frame.width) * u64::from(frame.height);
        if size > screen {
            return Err(format!(
                "frame {frames} of the gif is {}×{}, larger than its {}×{} screen",
                frame.width, frame.height, canvas.0, canvas.1
            ));
        }
    }
    let loop_count = match decoder.repeat() {
        Repeat::Infinite => 0,
        // No NETSCAPE2.0 block (`Finite(0)`): played once, as browsers do.
        Repeat::Finite(n) => u32::from(n).max(1),
    };
    Ok(Header {
        canvas,
        frames,
        loop_count,
        icc: decoder.icc_profile().map(<[u8]>::to_vec),
        exif: None,
    })
}

/// Bytes [`Frames`] holds at most for a `canvas`: the canvas, the area saved under a
/// "restore to previous" frame, and one decoded frame (no larger than the screen, `header`
/// checked), each RGBA.
pub fn held_bytes(canvas: (u32, u32)) -> u64 {
    3 * u64::from(canvas.0) * u64::from(canvas.1) * 4
}

/// A frame's rectangle, clipped to the canvas.
#[derive(Clone, Copy)]
struct Rect {
    x: u32,
    y: u32,
    w: u32,
    h: u32,
}

/// The frames of a GIF, composed, one at a time.
pub struct Frames<'a> {
    decoder: Decoder<Cursor<&'a [u8]>>,
    canvas: DynamicImage,
    /// The canvas under the last frame when it is to be restored afterwards.
    saved: Vec<u8>,
    /// The last frame's rectangle and what is done with it before the next is drawn.
    pending: Option<(Rect, DisposalMethod)>,
}

impl<'a> Frames<'a> {
    pub fn new(data: &'a [u8], canvas: (u32, u32)) -> Result<Frames<'a>, String> {
        let mut options = DecodeOptions::new();
        options.set_color_output(gif::ColorOutput::RGBA);
        let limit = (u64::from(canvas.0) * u64::from(canvas.1) * 4).max(1);
        options.set_memory_limit(MemoryLimit::Bytes(
            NonZeroU64::new(limit).unwrap_or(NonZeroU64::MIN),
        ));
        let decoder = options
            .read_info(Cursor::new(data))
            .map_err(|e| format!("cannot read the gif header: {e}"))?;
        Ok(Frames {
            decoder,
            canvas: DynamicImage::ImageRgba8(RgbaImage::new(canvas.0, canvas.1)),
            saved: Vec::new(),
            pending: None,
        })
    }

    /// The canvas as the last frame left it.
    pub fn canvas(&self) -> &DynamicImage {
        &self.canvas
    }

    /// Composes the next frame onto the canvas; its duration in milliseconds, or `None` after
    /// the last. Delays of 10 ms or less play as 100 ms, as in browsers (and gif2webp).
    pub fn next(&mut self, number: u32) -> Result<Option<u32>, String> {
        let DynamicImage::ImageRgba8(canvas) = &mut self.canvas else {
            unreachable!("the canvas is RGBA")
        };
        let (cw, ch) = canvas.dimensions();
        let stride = cw as usize * 4;
        match self.pending.take() {
            Some((r, DisposalMethod::Background)) => {
                for y in r.y..r.y + r.h {
                    let row = y as usize * stride;
                    canvas.as_mut()[row + r.x as usize * 4..row + (r.x + r.w) as usize * 4].fill(0);
                }
            }
            Some((r, DisposalMethod::Previous)) => {
                let line = r.w as usize * 4;
                for (i, y) in (r.y..r.y + r.h).enumerate() {
                    let row = y as usize * stride + r.x as usize * 4;
                    canvas.as_mut()[row..row + line]
                        .copy_from_slice(&self.saved[i * line..(i + 1) * line]);
                }
            }
            _ => {}
        }
        let frame = self
            .decoder
            .read_next_frame()
            .map_err(|e| format!("cannot decode frame {number} of the gif: {e}"))?;
        let Some(frame) = frame else {
            return Ok(None);
        };
        let (fw, fh) = (u32::from(frame.width), u32::from(frame.height));
        let (left, top) = (u32::from(frame.left), u32::from(frame.top));
        let rect = Rect {
            x: left.min(cw),
            y: top.min(ch),
            w: fw.min(cw.saturating_sub(left)),
            h: fh.min(ch.saturating_sub(top)),
        };
        if frame.buffer.len() < fw as usize * fh as usize * 4 {
            return Err(format!("frame {number} of the gif is cut short"));
        }
        if frame.dispose == DisposalMethod::Previous {
            self.saved.clear();
            for y in rect.y..rect.y + rect.h {
                let row = y as usize * stride + rect.x as usize * 4;
                self.saved
                    .extend_from_slice(&canvas.as_raw()[row..row + rect.w as usize * 4]);
            }
        }
        for dy in 0..rect.h {
            let src = &frame.buffer[(dy as usize * fw as usize) * 4..][..rect.w as usize * 4];
            let row = (rect.y + dy) as usize * stride + rect.x as usize * 4;
            let dst = &mut canvas.as_mut()[row..row + rect.w as usize * 4];
            for (d, s) in dst.chunks_exact_mut(4).zip(src.chunks_exact(4)) {
                if s[3] != 0 {
                    d.copy_from_slice(s);
                }
            }
        }
        self.pending = Some((rect, frame.dispose));
        let delay = u32::from(frame.delay) * 10;
        Ok(Some(if delay <= 10 { 100 } else { delay }))
    }
}

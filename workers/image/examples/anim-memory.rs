//! `anim-memory`: peak memory of an animated-WebP job against the decode-budget reservation
//! it makes (`anim/`), on a generated animated GIF, with the worker's allocator. The peak is
//! the process's resident high-water mark (reset through `/proc/self/clear_refs` before the
//! job), so it counts libwebp's own allocations too, which a Rust allocator cannot see.
//! Prints one line: frames, canvas, reserved MB, peak MB above the resident size before the
//! job, output bytes, seconds.
//!
//! Usage: anim-memory [WIDTH HEIGHT FRAMES] (default 480 360 100); outputs: the full size and
//! half of it, lossy, animated.

use std::borrow::Cow;
use std::time::Instant;

use image_worker::anim::reserved_bytes;
use image_worker::spec::{Format, OutputSpec, TransformArgs};
use image_worker::transform::{process, Limits};
use image_worker::ImageSettings;

#[global_allocator]
static ALLOCATOR: mediafarm::FastAllocator = mediafarm::FastAllocator;

/// A field of `/proc/self/status`, in bytes.
fn status(field: &str) -> u64 {
    let text = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// Frames of a gradient that drifts, with a bar that moves and some noise (so each frame
/// differs all over, as film-like GIFs do), over a 6×6×6 colour cube.
fn gif(w: u16, h: u16, frames: u16) -> Vec<u8> {
    let palette: Vec<u8> = (0..216u32)
        .flat_map(|i| {
            [
                (i / 36 * 51) as u8,
                (i / 6 % 6 * 51) as u8,
                (i % 6 * 51) as u8,
            ]
        })
        .collect();
    let mut out = Vec::new();
    let mut enc = gif::Encoder::new(&mut out, w, h, &palette).expect("gif header");
    enc.set_repeat(gif::Repeat::Infinite).expect("loop block");
    let mut seed = 1u32;
    for f in 0..frames {
        let mut pixels = Vec::with_capacity(usize::from(w) * usize::from(h));
        for y in 0..h {
            for x in 0..w {
                seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                let noise = (seed >> 30) as u16;
                let bar = (x + f * 7) % w < w / 8;
                let r = if bar { 5 } else { (x + f) * 5 / w };
                let g = (y * 5 / h + noise).min(5);
                let b = (f / 4 % 6).min(5);
                pixels.push((r * 36 + g * 6 + b) as u8);
            }
        }
        let frame = gif::Frame {
            width: w,
            height: h,
            delay: 4,
            buffer: Cow::Owned(pixels),
            ..gif::Frame::default()
        };
        enc.write_frame(&frame).expect("gif frame");
    }
    drop(enc);
    out
}

fn output(key: &str, width: u32) -> OutputSpec {
    OutputSpec {
        width: Some(width),
        animated: true,
        ..OutputSpec::new(key, Format::Webp)
    }
}

fn main() -> Result<(), String> {
    let numbers: Vec<u16> = std::env::args()
        .skip(1)
        .map(|a| a.parse().map_err(|e| format!("{a}: {e}")))
        .collect::<Result<_, _>>()?;
    let (w, h, frames) = match numbers[..] {
        [w, h, f] => (w, h, f),
        [] => (480, 360, 100),
        _ => return Err("usage: anim-memory [WIDTH HEIGHT FRAMES]".into()),
    };
    // As image-worker's main.rs: one glibc arena for the C codecs.
    // SAFETY: no other thread exists yet; only glibc's allocator settings change.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) };
    let data = gif(w, h, frames);
    let args = TransformArgs::new(
        "",
        vec![
            output("full.webp", u32::from(w)),
            output("half.webp", u32::from(w) / 2),
        ],
    );
    let limits = Limits::from(&ImageSettings::default());
    let reserved = reserved_bytes(&data, &args, &limits)
        .map_err(|e| e.message)?
        .ok_or("the GIF is not animated")?;
    // SAFETY: only this thread's free pages are returned.
    unsafe { libmimalloc_sys::mi_collect(true) };
    std::fs::write("/proc/self/clear_refs", "5").map_err(|e| format!("clear_refs: {e}"))?;
    let before = status("VmRSS:");
    let start = Instant::now();
    let (_, made) = process(&data, &args, limits.max_pixels).map_err(|e| e.message)?;
    let seconds = start.elapsed().as_secs_f64();
    let peak = status("VmHWM:").saturating_sub(before);
    let bytes: Vec<usize> = made.iter().map(|m| m.data.len()).collect();
    println!(
        "{frames} frames of {w}×{h}: reserved {:.1} MB, peak {:.1} MB above the {:.1} MB before, \
         outputs {bytes:?} bytes, {seconds:.1} s",
        reserved as f64 / 1e6,
        peak as f64 / 1e6,
        before as f64 / 1e6
    );
    Ok(())
}

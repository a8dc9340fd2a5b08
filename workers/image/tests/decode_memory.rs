//! The decode budget's accounting against what the pipeline really allocates, on the worst
//! case of each source decoded in Rust (50 MP RGBA PNG, 48 MP 16-bit RGBA PNG, 50 MP GIF):
//! every byte the Rust heap holds while a job runs (`process`, outputs 1280/640/160 px JPEG)
//! stays within what its decode reserved, and that reservation is at most half the worker's
//! budget, so two such jobs run side by side. Bytes are counted by a global allocator, so this file holds one test
//! (tests in one binary run side by side). libjpeg's and libwebp's own allocations go
//! through malloc and are not seen here; their peaks are in BENCHMARKS.md.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use image_worker::budget::DECODE_BUDGET;
use image_worker::decode::decode;
use image_worker::spec::{Format, OutputSpec, TransformArgs};
use image_worker::transform::process;

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is passed to `System` unchanged; only counters are added.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc(layout);
        if !p.is_null() {
            let now = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        System.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = System.realloc(ptr, layout, new_size);
        if !p.is_null() {
            if new_size > layout.size() {
                let grow = new_size - layout.size();
                let now = LIVE.fetch_add(grow, Ordering::Relaxed) + grow;
                PEAK.fetch_max(now, Ordering::Relaxed);
            } else {
                LIVE.fetch_sub(layout.size() - new_size, Ordering::Relaxed);
            }
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Runs `f`; returns its result and the most bytes the heap held above what it held before.
fn peak_of<T>(f: impl FnOnce() -> T) -> (T, u64) {
    let before = LIVE.load(Ordering::Relaxed);
    PEAK.store(before, Ordering::Relaxed);
    let out = f();
    (out, (PEAK.load(Ordering::Relaxed) - before) as u64)
}

fn job() -> TransformArgs {
    let outputs = [1280u32, 640, 160]
        .iter()
        .map(|w| OutputSpec {
            width: Some(*w),
            quality: Some(80),
            ..OutputSpec::new(format!("w{w}.jpg"), Format::Jpeg)
        })
        .collect();
    TransformArgs::new("", outputs)
}

/// A PNG written row by row (never whole in memory): `channels` samples of `depth` bits.
fn png(w: u32, h: u32, color: png::ColorType, depth: png::BitDepth) -> Vec<u8> {
    let mut out = Vec::new();
    let mut enc = png::Encoder::new(&mut out, w, h);
    enc.set_color(color);
    enc.set_depth(depth);
    enc.set_compression(png::Compression::Fast);
    let mut writer = enc.write_header().unwrap();
    let samples = color.samples();
    let bytes = if depth == png::BitDepth::Sixteen {
        2
    } else {
        1
    };
    let mut stream = writer.stream_writer().unwrap();
    let mut row = vec![0u8; w as usize * samples * bytes];
    for y in 0..h {
        for x in 0..w as usize {
            let px = [(x * 255 / w as usize) as u8, (y * 255 / h) as u8, 90, 200];
            for c in 0..samples {
                for b in 0..bytes {
                    row[(x * samples + c) * bytes + b] = px[c];
                }
            }
        }
        std::io::Write::write_all(&mut stream, &row).unwrap();
    }
    stream.finish().unwrap();
    drop(writer);
    out
}

/// A one-frame GIF of `w`×`h` palette indexes (a 256-grey ramp across).
fn gif(w: u16, h: u16) -> Vec<u8> {
    let palette: Vec<u8> = (0..=255u8).flat_map(|v| [v, v, 255 - v]).collect();
    let mut out = Vec::new();
    {
        let mut enc = gif::Encoder::new(&mut out, w, h, &palette).unwrap();
        let indexes: Vec<u8> = (0..usize::from(w) * usize::from(h))
            .map(|i| ((i % usize::from(w)) * 255 / usize::from(w)) as u8)
            .collect();
        let frame = gif::Frame::from_indexed_pixels(w, h, indexes, None);
        enc.write_frame(&frame).unwrap();
    }
    out
}

#[test]
fn the_budget_counts_what_each_streamed_source_holds() {
    let job = job();
    let share = |(w, _h): (u32, u32)| 1280.0 / f64::from(w);
    let cases: Vec<(&str, Vec<u8>, (u32, u32))> = vec![
        (
            "50 MP RGBA PNG",
            png(9400, 5300, png::ColorType::Rgba, png::BitDepth::Eight),
            (9400, 5300),
        ),
        (
            "48 MP 16-bit RGBA PNG",
            png(8000, 6000, png::ColorType::Rgba, png::BitDepth::Sixteen),
            (8000, 6000),
        ),
        ("50 MP GIF", gif(9400, 5300), (9400, 5300)),
    ];
    for (name, data, (w, h)) in cases {
        let full_rgba = u64::from(w) * u64::from(h) * 4;
        let (decoded, decode_peak) =
            peak_of(|| decode(&data, true, 50_000_000, share, |_| 0).unwrap());
        let reserved = decoded.reservation.bytes();
        assert!(
            decode_peak <= reserved,
            "{name}: the decode held {decode_peak} bytes, over the {reserved} it reserved"
        );
        // Half the worker's budget at most, so two such jobs decode side by side (the
        // full-size RGBA picture alone was 192–200 MB).
        assert!(
            reserved <= DECODE_BUDGET / 2,
            "{name}: reserved {reserved} bytes, a full-size RGBA picture is {full_rgba}"
        );
        assert_eq!(
            (decoded.info.width, decoded.info.height),
            (w, h),
            "{name}: the source's size as shown"
        );
        drop(decoded);
        let (made, job_peak) = peak_of(|| process(&data, &job, 50_000_000).unwrap());
        assert_eq!(made.1[0].width, 1280, "{name}");
        assert!(
            job_peak <= reserved,
            "{name}: the job held {job_peak} bytes, over the {reserved} its decode reserved"
        );
    }
}

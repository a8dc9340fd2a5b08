//! Where a watch session's time goes on one file: open, demux, keyframe decode, scale+encode.
//! `cargo run --release -p snapshot-worker --example keyframe-cost -- FILE [INTERVAL_S]`; with
//! `FRESH_DECODER=1` a decoder is made per tick, as the sessions do (≈ 1 ms more per 1080p
//! keyframe, for not holding a decoder's picture buffers between ticks); `QUALITY=N` sets the
//! JPEG quality (default 80); `SKIP_LOOP_FILTER=1` decodes without the deblocking filter and
//! prints the luma PSNR of each keyframe against the filtered decode, and of the JPEG made from it
//! beside the JPEG made from the filtered decode (`PSNR=1`: the JPEG's alone). Times are the thread's
//! CPU time (`CLOCK_THREAD_CPUTIME_ID`), so a busy machine does not inflate them.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use ffmpeg_next as ff;
use snapshot_worker::media::{Format, FrameEncoder, Input, Interrupt, KeyDecoder, Read};
use snapshot_worker::source::SourceKind;

/// CPU time this thread has run (`watch::timing`'s thread clock).
struct Instant(f64);

impl Instant {
    fn now() -> Instant {
        Instant(snapshot_worker::watch::timing::thread_cpu_s())
    }

    fn elapsed(&self) -> Duration {
        Duration::from_secs_f64((Instant::now().0 - self.0).max(0.0))
    }
}

/// Luma PSNR of a JPEG against a decoded picture `reference` (limited range, as H.264/HEVC
/// streams carry it): the JPEG's luma as any viewer decodes it (full range), the reference's
/// expanded to full range exactly (×255/219).
fn jpeg_luma_psnr(jpeg: &[u8], reference: &ff::frame::Video) -> f64 {
    let mut d = mozjpeg::Decompress::new_mem(jpeg)
        .and_then(|d| d.grayscale())
        .expect("our JPEG decodes");
    let (w, h) = (d.width(), d.height());
    let y: Vec<u8> = d.read_scanlines().expect("our JPEG decodes");
    let (stride, plane) = (reference.stride(0), reference.data(0));
    let mut sum = 0f64;
    for row in 0..h {
        for x in 0..w {
            let r = ((f64::from(plane[row * stride + x]) - 16.0) * 255.0 / 219.0).clamp(0.0, 255.0);
            let e = f64::from(y[row * w + x]) - r;
            sum += e * e;
        }
    }
    10.0 * (255.0 * 255.0 / (sum / (w * h) as f64).max(1e-10)).log10()
}

/// Luma PSNR of `a` against `b` (same size).
fn luma_psnr(a: &ff::frame::Video, b: &ff::frame::Video) -> f64 {
    let (w, h) = (a.width() as usize, a.height() as usize);
    let (sa, sb) = (a.stride(0), b.stride(0));
    let (pa, pb) = (a.data(0), b.data(0));
    let mut sum = 0f64;
    for y in 0..h {
        for x in 0..w {
            let d = f64::from(pa[y * sa + x]) - f64::from(pb[y * sb + x]);
            sum += d * d;
        }
    }
    let mse = sum / (w * h) as f64;
    10.0 * (255.0 * 255.0 / mse.max(1e-10)).log10()
}

fn main() {
    let mut args = std::env::args().skip(1);
    let file = args.next().expect("a file");
    let interval: f64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(20.0);
    let interrupt = Interrupt::new(Arc::new(AtomicBool::new(false)));
    interrupt.arm(Duration::from_secs(60));
    let t = Instant::now();
    let mut input = Input::open(
        &file,
        &file,
        SourceKind::File,
        &interrupt,
        Duration::from_secs(60),
    )
    .unwrap();
    let open = t.elapsed();
    // As a watch session reads (`NO_DISCARD=1`: every packet, as before).
    if std::env::var_os("NO_DISCARD").is_none() {
        input.keep_only_video_keyframes();
    }
    let skip = std::env::var_os("SKIP_LOOP_FILTER").is_some();
    let mut dec = KeyDecoder::new(&input, true).unwrap();
    dec.skip_loop_filter(skip);
    let mut reference = KeyDecoder::new(&input, true).unwrap();
    let mut psnr = Vec::new();
    // The JPEG's luma PSNR against the full (filtered) decode: what a viewer of the snapshot
    // sees, against the true picture.
    let mut jpeg_psnr = Vec::new();
    let mut reference_jpeg_psnr = Vec::new();
    let quality = std::env::var("QUALITY")
        .ok()
        .and_then(|q| q.parse().ok())
        .unwrap_or(80);
    let mut enc = FrameEncoder::new(Format::Jpeg, quality, None);
    let mut reference_enc = FrameEncoder::new(Format::Jpeg, quality, None);
    let mut pkt = ff::Packet::empty();
    let (mut demux, mut decode, mut encode) = (Duration::ZERO, Duration::ZERO, Duration::ZERO);
    let mut due = 0.0;
    let mut n = 0;
    let mut bytes = 0;
    loop {
        let t = Instant::now();
        let r = input.read(&mut pkt).unwrap();
        demux += t.elapsed();
        match r {
            Read::Eof => break,
            Read::Other => continue,
            Read::Video => {}
        }
        let s = input.seconds(&pkt).unwrap_or(0.0);
        if !pkt.is_key() || s + 0.001 < due {
            continue;
        }
        due += interval;
        let t = Instant::now();
        if std::env::var_os("FRESH_DECODER").is_some() {
            dec = KeyDecoder::new(&input, true).unwrap();
            dec.skip_loop_filter(skip);
        }
        let frame = dec.keyframe(&pkt).unwrap();
        decode += t.elapsed();
        let t = Instant::now();
        let jpeg = enc.encode(frame).unwrap().data;
        encode += t.elapsed();
        bytes += jpeg.len();
        if std::env::var_os("PSNR").is_some() || skip {
            let full = reference.keyframe(&pkt).unwrap();
            if skip {
                psnr.push(luma_psnr(frame, full));
                let own = reference_enc.encode(full).unwrap().data;
                reference_jpeg_psnr.push(jpeg_luma_psnr(&own, full));
            }
            jpeg_psnr.push(jpeg_luma_psnr(&jpeg, full));
        }
        n += 1;
    }
    println!(
        "{n} snapshots: open {:?}, demux {:?} ({:?}/snapshot), decode {:?}/snapshot, scale+encode {:?}/snapshot, {} KB/jpeg",
        open,
        demux,
        demux / n,
        decode / n,
        encode / n,
        bytes / n as usize / 1024
    );
    let stats = |v: &[f64]| {
        let worst = v.iter().cloned().fold(f64::INFINITY, f64::min);
        (v.iter().sum::<f64>() / v.len().max(1) as f64, worst)
    };
    if !jpeg_psnr.is_empty() {
        let (mean, worst) = stats(&jpeg_psnr);
        println!("JPEG luma PSNR against the full decode: {mean:.2} dB mean, {worst:.2} dB worst");
    }
    if skip {
        let (mean, worst) = stats(&reference_jpeg_psnr);
        println!("  (the same JPEG encode of the filtered decode: {mean:.2} dB mean, {worst:.2} dB worst)");
        let worst = psnr.iter().cloned().fold(f64::INFINITY, f64::min);
        let mean = psnr.iter().sum::<f64>() / psnr.len().max(1) as f64;
        println!("without the loop filter: luma PSNR against the filtered decode {mean:.1} dB mean, {worst:.1} dB worst");
    }
}

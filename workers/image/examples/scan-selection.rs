//! `scan-selection`: for each progressive JPEG given, the decode time at a reduced scale with
//! every scan and with only the scans that scale needs (`scans.rs`), and how far apart the two
//! pictures are (PSNR over RGB, max abs difference). Decode only, no resize or encode.
//!
//! Usage: scan-selection [--eighths 2] [--rounds 5] FILE...

use std::time::{Duration, Instant};

use image_worker::jpeg::decode_rgb_scans;

#[global_allocator]
static ALLOCATOR: mediafarm::FastAllocator = mediafarm::FastAllocator;

fn median(mut v: Vec<Duration>) -> f64 {
    v.sort();
    v[v.len() / 2].as_secs_f64() * 1000.0
}

fn main() -> Result<(), String> {
    let mut eighths = 2u8;
    let mut rounds = 5usize;
    let mut files = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--eighths" => eighths = value()?.parse().map_err(|e| format!("--eighths: {e}"))?,
            "--rounds" => rounds = value()?.parse().map_err(|e| format!("--rounds: {e}"))?,
            _ => files.push(a),
        }
    }
    println!("file\tall scans ms\tselected ms\tPSNR dB\tmax diff");
    for f in &files {
        let data = std::fs::read(f).map_err(|e| format!("{f}: {e}"))?;
        let mut times = [Vec::new(), Vec::new()];
        let mut pictures = [None, None];
        for _ in 0..rounds {
            for (i, select) in [false, true].into_iter().enumerate() {
                let t = Instant::now();
                let rgb = decode_rgb_scans(&data, eighths, select)
                    .map_err(|e| format!("{f}: {e}"))?
                    .ok_or(format!("{f}: CMYK"))?;
                times[i].push(t.elapsed());
                pictures[i] = Some(rgb);
            }
        }
        let [Some(a), Some(b)] = pictures else {
            return Err("no rounds".into());
        };
        let (mut sq, mut max) = (0f64, 0u8);
        for (x, y) in a.pixels.iter().zip(&b.pixels) {
            let d = x.abs_diff(*y);
            sq += f64::from(d) * f64::from(d);
            max = max.max(d);
        }
        let mse = sq / a.pixels.len() as f64;
        let psnr = if mse == 0.0 {
            f64::INFINITY
        } else {
            10.0 * (255.0 * 255.0 / mse).log10()
        };
        let name = f.rsplit('/').next().unwrap_or(f);
        let [all, selected] = times;
        println!(
            "{name}\t{:.1}\t{:.1}\t{psnr:.1}\t{max}",
            median(all),
            median(selected)
        );
    }
    Ok(())
}

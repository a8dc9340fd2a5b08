//! `scan-selection`: for each progressive JPEG given, the decode time at a reduced scale with
//! every scan, with only the scans that scale needs (`scans.rs`), and with the low-memory
//! decoder (`lowres.rs`, 1/8 to 1/2), and how far the last two pictures are from the
//! first (PSNR over RGB, largest difference). Decode only, no resize or encode.
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

/// PSNR (dB) and largest difference between two RGB pictures of one size.
fn distance(a: &[u8], b: &[u8]) -> (f64, u8) {
    let (mut sq, mut max) = (0f64, 0u8);
    for (x, y) in a.iter().zip(b) {
        let d = x.abs_diff(*y);
        sq += f64::from(d) * f64::from(d);
        max = max.max(d);
    }
    let mse = sq / a.len().max(1) as f64;
    let psnr = if mse == 0.0 {
        f64::INFINITY
    } else {
        10.0 * (255.0 * 255.0 / mse).log10()
    };
    (psnr, max)
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
    println!("file\tevery scan ms\tselected ms\tPSNR dB\tmax diff\tlowres ms\tPSNR dB\tmax diff");
    for f in &files {
        let data = std::fs::read(f).map_err(|e| format!("{f}: {e}"))?;
        let mut times = [Vec::new(), Vec::new(), Vec::new()];
        let (mut all, mut selected, mut low) = (None, None, None);
        for _ in 0..rounds {
            let t = Instant::now();
            all = decode_rgb_scans(&data, eighths, false).map_err(|e| format!("{f}: {e}"))?;
            times[0].push(t.elapsed());
            let t = Instant::now();
            selected = decode_rgb_scans(&data, eighths, true).map_err(|e| format!("{f}: {e}"))?;
            times[1].push(t.elapsed());
            let t = Instant::now();
            low = image_worker::lowres::decode(&data, eighths);
            times[2].push(t.elapsed());
        }
        let (Some(all), Some(selected)) = (all, selected) else {
            return Err(format!("{f}: CMYK, or no rounds"));
        };
        let name = f.rsplit('/').next().unwrap_or(f);
        let [t_all, t_sel, t_low] = times;
        let (psnr, max) = distance(&all.pixels, &selected.pixels);
        let low = match low {
            Some(l) => {
                let (p, m) = distance(&all.pixels, &l.pixels);
                format!("{:.1}\t{p:.1}\t{m}", median(t_low))
            }
            None => "-\t-\t-".into(),
        };
        println!(
            "{name}\t{:.1}\t{:.1}\t{psnr:.1}\t{max}\t{low}",
            median(t_all),
            median(t_sel)
        );
    }
    Ok(())
}

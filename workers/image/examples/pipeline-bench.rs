//! `pipeline-bench`: times image-worker's pipeline (decode once, derive every output, encode)
//! on files, without the broker or storage, for `bench/image_pipeline.py`. Prints one line:
//! `<ms per image>` (median over `--rounds`).
//!
//! Usage: pipeline-bench [--rounds 3] [--widths 1280,640,160] [--quality 80] [--baseline]
//! [--crop X,Y,W,H] FILE...
//! (`--baseline`: baseline JPEG outputs instead of progressive ones; `--crop`: the job's crop,
//! in the picture as shown.)

use std::time::Instant;

use image_worker::spec::{Crop, Format, OutputSpec, TransformArgs};
use image_worker::transform::process;

#[global_allocator]
static ALLOCATOR: mediafarm::FastAllocator = mediafarm::FastAllocator;

fn main() -> Result<(), String> {
    let mut rounds = 3usize;
    let mut widths = vec![1280u32, 640, 160];
    let mut quality = 80u8;
    let mut progressive = true;
    let mut crop = None;
    let mut files = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--rounds" => rounds = value()?.parse().map_err(|e| format!("--rounds: {e}"))?,
            "--quality" => quality = value()?.parse().map_err(|e| format!("--quality: {e}"))?,
            "--baseline" => progressive = false,
            "--crop" => {
                let v: Vec<u32> = value()?
                    .split(',')
                    .map(|n| n.parse().map_err(|e| format!("--crop: {e}")))
                    .collect::<Result<_, _>>()?;
                let [x, y, width, height] = v[..] else {
                    return Err("--crop takes X,Y,W,H".into());
                };
                crop = Some(Crop {
                    x,
                    y,
                    width,
                    height,
                });
            }
            "--widths" => {
                widths = value()?
                    .split(',')
                    .map(|w| w.parse().map_err(|e| format!("--widths: {e}")))
                    .collect::<Result<_, _>>()?
            }
            _ => files.push(a),
        }
    }
    if files.is_empty() {
        return Err("no files given".into());
    }
    let sources: Vec<Vec<u8>> = files
        .iter()
        .map(|f| std::fs::read(f).map_err(|e| format!("{f}: {e}")))
        .collect::<Result<_, _>>()?;
    let job = TransformArgs {
        source: String::new(),
        crop,
        auto_orient: true,
        strip_metadata: true,
        watermark: None,
        outputs: widths
            .iter()
            .map(|w| OutputSpec {
                width: Some(*w),
                quality: Some(quality),
                progressive: Some(progressive),
                ..OutputSpec::new(format!("w{w}.jpg"), Format::Jpeg)
            })
            .collect(),
    };
    let mut per_round = Vec::with_capacity(rounds);
    for _ in 0..rounds.max(1) {
        let began = Instant::now();
        for data in &sources {
            process(data, &job, u64::MAX).map_err(|e| e.to_string())?;
        }
        per_round.push(began.elapsed().as_secs_f64() * 1000.0 / sources.len() as f64);
    }
    per_round.sort_by(f64::total_cmp);
    println!("{:.1}", per_round[per_round.len() / 2]);
    Ok(())
}

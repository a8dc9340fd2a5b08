//! `pipeline-bench`: times image-worker's pipeline (decode once, derive every output, encode)
//! on files, without the broker or storage, for `bench/image_pipeline.py`. Prints one line:
//! `<ms per image>` (median over `--rounds`).
//!
//! Usage: pipeline-bench [--rounds 3] [--widths 1280,640,160] [--quality 80] [--baseline]
//! [--crop X,Y,W,H] FILE...
//! (`--baseline`: baseline JPEG outputs instead of progressive ones; `--crop`: the job's crop,
//! in the picture as shown.)

use std::time::Instant;

use image_worker::spec::Crop;
use image_worker::transform::process;

#[path = "common/bench_job.rs"]
mod bench_job;
use bench_job::BenchArgs;

#[global_allocator]
static ALLOCATOR: mediafarm::FastAllocator = mediafarm::FastAllocator;

fn main() -> Result<(), String> {
    let mut crop = None;
    let args = BenchArgs::parse(|flag, value| {
        if flag != "--crop" {
            return Ok(false);
        }
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
        Ok(true)
    })?;
    let (rounds, files) = (args.rounds, &args.files);
    let sources: Vec<Vec<u8>> = files
        .iter()
        .map(|f| std::fs::read(f).map_err(|e| format!("{f}: {e}")))
        .collect::<Result<_, _>>()?;
    let job = args.job(crop);
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

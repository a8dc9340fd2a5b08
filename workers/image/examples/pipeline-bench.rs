//! `pipeline-bench`: times image-worker's pipeline (decode once, derive every output, encode)
//! on files, without the broker or storage, for `bench/image_pipeline.py`. Prints
//! `<ms per image>` (median over `--rounds`) on the first line, then with `--sizes` one line per
//! file with its outputs' sizes (`W×H W×H …`, in `--widths` order), so the script can check
//! that every contender made the same pictures.
//!
//! Usage: pipeline-bench [--rounds 3] [--widths 1280,640,160] [--quality 80] [--baseline]
//! [--crop X,Y,W,H] [--clock cpu|wall] [--warm-up] [--sizes] FILE...
//! (`--baseline`: baseline JPEG outputs instead of progressive ones; `--crop`: the job's crop,
//! in the picture as shown; `--clock cpu`: the process's CPU time, user and system, of every
//! thread — what the job cost on a machine shared with other work, where wall time also counts
//! the waits for a core; `wall`, the default, is elapsed time; `--warm-up`: one untimed pass
//! over the files first, so the rounds time a worker that has already run jobs — its
//! allocator's pages faulted in, libjpeg's tables built — as a worker is after its first job.)

use std::time::Instant;

use image_worker::spec::Crop;
use image_worker::transform::{process, Limits};
use image_worker::ImageSettings;

#[path = "common/bench_job.rs"]
mod bench_job;
use bench_job::BenchArgs;

#[global_allocator]
static ALLOCATOR: mediafarm::FastAllocator = mediafarm::FastAllocator;

/// Which clock a round is timed on.
#[derive(Clone, Copy)]
enum Clock {
    Wall,
    ProcessCpu,
}

impl Clock {
    /// Milliseconds since some fixed point of this clock.
    fn now_ms(self, origin: Instant) -> f64 {
        match self {
            Clock::Wall => origin.elapsed().as_secs_f64() * 1000.0,
            Clock::ProcessCpu => {
                let mut ts = libc::timespec {
                    tv_sec: 0,
                    tv_nsec: 0,
                };
                // SAFETY: `ts` is a valid timespec for the call to fill.
                unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
                ts.tv_sec as f64 * 1000.0 + ts.tv_nsec as f64 / 1e6
            }
        }
    }
}

fn main() -> Result<(), String> {
    // The worker's own pixel limit: a source it would refuse is refused here too.
    let max_pixels = Limits::from(&ImageSettings::default()).max_pixels;
    let mut crop = None;
    let mut clock = Clock::Wall;
    let mut sizes = false;
    let mut warm_up = false;
    let args = BenchArgs::parse(|flag, value| {
        match flag {
            "--clock" => {
                clock = match value()?.as_str() {
                    "cpu" => Clock::ProcessCpu,
                    "wall" => Clock::Wall,
                    other => return Err(format!("--clock takes cpu or wall, not {other}")),
                };
                return Ok(true);
            }
            "--sizes" => {
                sizes = true;
                return Ok(true);
            }
            "--warm-up" => {
                warm_up = true;
                return Ok(true);
            }
            "--crop" => {}
            _ => return Ok(false),
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
    if warm_up {
        for data in &sources {
            process(data, &job, max_pixels).map_err(|e| e.to_string())?;
        }
    }
    let origin = Instant::now();
    let mut per_round = Vec::with_capacity(rounds);
    let mut made = Vec::with_capacity(sources.len());
    for _ in 0..rounds.max(1) {
        made.clear();
        let began = clock.now_ms(origin);
        for data in &sources {
            let (_, outputs) = process(data, &job, max_pixels).map_err(|e| e.to_string())?;
            made.push(
                outputs
                    .iter()
                    .map(|o| format!("{}×{}", o.width, o.height))
                    .collect::<Vec<_>>()
                    .join(" "),
            );
        }
        per_round.push((clock.now_ms(origin) - began) / sources.len() as f64);
    }
    per_round.sort_by(f64::total_cmp);
    println!("{:.1}", per_round[per_round.len() / 2]);
    if sizes {
        for line in made {
            println!("{line}");
        }
    }
    Ok(())
}

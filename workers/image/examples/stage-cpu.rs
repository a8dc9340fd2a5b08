//! `stage-cpu`: where an image job's CPU time goes, stage by stage, on files — the source read,
//! then `transform.rs`'s `decode`, `resize`, `finish` (orientation, copies, flattening) and
//! `encode` spans, then the outputs' writes — in CPU time of the one thread doing the job
//! (`CLOCK_THREAD_CPUTIME_ID`), so a machine shared with other work does not change it.
//! `bench/image_stages.py` runs it beside the same breakdown for Pillow.
//!
//! Usage: stage-cpu [--rounds 3] [--widths 1280,640,160] [--quality 80] [--baseline] [--png]
//! [--keep DIR] FILE...
//! Prints, per file and then in total, the CPU milliseconds per image of each stage (the
//! median over rounds), tab-separated with a header line. `--keep DIR`: the outputs stay in DIR
//! as `<file name>.w<width>.jpg` (for the PSNR check of `bench/image_stages.py`); with `--png`
//! they are lossless `.png` files, the resized pixels before any JPEG encode.

use std::collections::BTreeMap;
use std::sync::Mutex;

use image_worker::transform::{process, Limits};
use image_worker::ImageSettings;

#[path = "common/bench_job.rs"]
mod bench_job;
use bench_job::BenchArgs;
use tracing::span::{Attributes, Id};
use tracing::Subscriber;
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;

#[global_allocator]
static ALLOCATOR: mediafarm::FastAllocator = mediafarm::FastAllocator;

const STAGES: [&str; 7] = [
    "read", "decode", "resize", "finish", "encode", "other", "write",
];

/// This thread's CPU time in nanoseconds.
fn thread_cpu_ns() -> u64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `t` is a valid timespec for the call to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) };
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}

/// Stage name → CPU nanoseconds, added to on every span exit.
static SPENT: Mutex<BTreeMap<&'static str, u64>> = Mutex::new(BTreeMap::new());

fn add(stage: &'static str, ns: u64) {
    if let Ok(mut spent) = SPENT.lock() {
        *spent.entry(stage).or_default() += ns;
    }
}

fn take() -> BTreeMap<&'static str, u64> {
    SPENT
        .lock()
        .map(|mut s| std::mem::take(&mut *s))
        .unwrap_or_default()
}

struct Entered(u64);

/// Times every span in thread CPU between its enter and exit.
struct CpuLayer;

impl<S: Subscriber + for<'a> LookupSpan<'a>> Layer<S> for CpuLayer {
    fn on_new_span(&self, _: &Attributes<'_>, _: &Id, _: Context<'_, S>) {}

    fn on_enter(&self, id: &Id, ctx: Context<'_, S>) {
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().replace(Entered(thread_cpu_ns()));
        }
    }

    fn on_exit(&self, id: &Id, ctx: Context<'_, S>) {
        if let Some(span) = ctx.span(id) {
            if let Some(Entered(at)) = span.extensions_mut().remove::<Entered>() {
                add(span.metadata().name(), thread_cpu_ns().saturating_sub(at));
            }
        }
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn main() -> Result<(), String> {
    // The worker's own pixel limit: a source it would refuse is refused here too.
    let max_pixels = Limits::from(&ImageSettings::default()).max_pixels;
    let mut keep = None;
    let args = BenchArgs::parse(|flag, value| {
        if flag != "--keep" {
            return Ok(false);
        }
        keep = Some(std::path::PathBuf::from(value()?));
        Ok(true)
    })?;
    let (rounds, files) = (args.rounds, &args.files);
    let subscriber = tracing_subscriber::registry().with(CpuLayer.with_filter(
        tracing_subscriber::filter::filter_fn(|m| m.target().starts_with("image_worker")),
    ));
    tracing::subscriber::set_global_default(subscriber).map_err(|e| e.to_string())?;
    let out_dir = keep
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join(format!("stage-cpu-{}", std::process::id())));
    std::fs::create_dir_all(&out_dir).map_err(|e| e.to_string())?;
    let job = args.job(None);
    println!("file\t{}\ttotal\tout_bytes", STAGES.join("\t"));
    let mut totals: BTreeMap<&str, f64> = BTreeMap::new();
    for file in files {
        let mut per_stage: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
        let mut out_bytes = 0usize;
        for _ in 0..rounds.max(1) {
            take();
            let began = thread_cpu_ns();
            let data = std::fs::read(file).map_err(|e| format!("{file}: {e}"))?;
            add("read", thread_cpu_ns() - began);
            let processing = thread_cpu_ns();
            let (_, encoded) = process(&data, &job, max_pixels).map_err(|e| e.to_string())?;
            add("process", thread_cpu_ns() - processing);
            let writing = thread_cpu_ns();
            out_bytes = 0;
            let name = std::path::Path::new(file)
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            for (spec, out) in job.outputs.iter().zip(&encoded) {
                let path = out_dir.join(format!("{name}.{}", spec.key));
                std::fs::write(path, &out.data).map_err(|e| e.to_string())?;
                out_bytes += out.data.len();
            }
            drop(data);
            drop(encoded);
            add("write", thread_cpu_ns() - writing);
            let mut spent = take();
            let inside: u64 = ["decode", "resize", "finish", "encode"]
                .iter()
                .map(|s| spent.get(s).copied().unwrap_or(0))
                .sum();
            let process_ns = spent.remove("process").unwrap_or(0);
            spent.insert("other", process_ns.saturating_sub(inside));
            spent.insert("total", thread_cpu_ns() - began);
            for stage in STAGES.iter().chain(["total"].iter()) {
                let ms = spent.get(stage).copied().unwrap_or(0) as f64 / 1e6;
                per_stage.entry(stage).or_default().push(ms);
            }
        }
        let name = std::path::Path::new(file)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| file.clone());
        let mut row = vec![name];
        for stage in STAGES.iter().chain(["total"].iter()) {
            let m = median(per_stage.remove(stage).unwrap_or_default());
            *totals.entry(stage).or_default() += m;
            row.push(format!("{m:.2}"));
        }
        row.push(out_bytes.to_string());
        println!("{}", row.join("\t"));
    }
    let n = files.len() as f64;
    let mut row = vec!["MEAN".to_string()];
    for stage in STAGES.iter().chain(["total"].iter()) {
        row.push(format!(
            "{:.2}",
            totals.get(stage).copied().unwrap_or(0.0) / n
        ));
    }
    println!("{}", row.join("\t"));
    if keep.is_none() {
        std::fs::remove_dir_all(&out_dir).map_err(|e| e.to_string())?;
    }
    Ok(())
}

//! `bench-publisher`: publishes `--count` `echo.echo` jobs to `--queue` with publisher
//! confirms, for the throughput benchmark's pre-published backlog. Ids are `<prefix>-<n>`.
//! With `--retry-every K`, every K-th job (n % K == 0) fails once transiently and is retried
//! through the broker's delay queues.

use std::path::Path;
use std::time::Instant;

use anyhow::Context;
use clap::Parser;
use mediafarm::client::{build_message, SendOptions};
use mediafarm::{Client, Settings};
use serde_json::json;

#[derive(Parser)]
struct Args {
    #[arg(long)]
    queue: String,
    #[arg(long, default_value_t = 20_000)]
    count: usize,
    #[arg(long, default_value = "bench")]
    id_prefix: String,
    #[arg(long, default_value_t = 1_000)]
    batch: usize,
    #[arg(long)]
    retry_every: Option<usize>,
}

#[global_allocator]
static ALLOCATOR: mediafarm::FastAllocator = mediafarm::FastAllocator;

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let settings = Settings::load(Path::new("mediafarm.toml"), false)?;
    let client = Client::connect(&settings).await.context("connecting")?;
    let began = Instant::now();
    let mut next = 0;
    while next < args.count {
        let end = (next + args.batch.max(1)).min(args.count);
        let batch: Vec<_> = (next..end)
            .map(|i| {
                let retried = args.retry_every.is_some_and(|k| k > 0 && i % k == 0);
                let kwargs = if retried {
                    json!({"n": i, "fail_times": 1, "retry_after_s": 0})
                } else {
                    json!({"n": i})
                };
                let kwargs = kwargs.as_object().cloned().unwrap_or_default();
                let mut msg = build_message("echo.echo", kwargs, &SendOptions::default());
                msg.id = format!("{}-{i}", args.id_prefix);
                msg
            })
            .collect();
        client.publish_batch(&args.queue, &batch).await?;
        next = end;
    }
    eprintln!(
        "published {} jobs to {} in {:.2} s",
        args.count,
        args.queue,
        began.elapsed().as_secs_f64()
    );
    Ok(())
}

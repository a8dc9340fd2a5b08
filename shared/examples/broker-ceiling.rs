//! `broker-ceiling`: what RabbitMQ alone allows a chain worker on this machine (issue 14). It
//! publishes `--chains` 3-step `echo.step` chains through mediafarm's producer (the same wire
//! as a chain's first step), then, for each delivery and nothing else: publish the next
//! message (the delivery's own body and properties, persistent, one extra header counting the
//! hops, on a confirm-mode channel of a second connection, as the worker's publisher does),
//! wait for its publisher confirm, optionally store a result in Redis (`--redis`: SET +
//! PUBLISH in one pipeline, as the result backend does), then ack. No decoding, no task, no
//! slot. The channel's `basic.qos` is `--window`: the worker's defaults hold at most 16
//! (prefetch 8, widened by 8 for finishing jobs).
//!
//! Prints the steps/s from the first ack to the last and the CPU time per step of RabbitMQ
//! (`beam.smp`, read from /proc; a shared service, so anyone else's traffic counts too), of
//! Redis (`redis-server`) and of this program.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use chrono::Utc;
use clap::Parser;
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use mediafarm::amqp::broker;
use mediafarm::client::{chain, Signature};
use mediafarm::{Client, Settings};
use serde_json::{json, Map, Value};

#[derive(Parser)]
struct Args {
    /// Chains to run (each `--steps` steps).
    #[arg(long, default_value_t = 2000)]
    chains: usize,
    #[arg(long, default_value_t = 3)]
    steps: u32,
    /// The channel's `basic.qos`: messages unacknowledged at once.
    #[arg(long, default_value_t = 16)]
    window: u16,
    /// Also store each step's result here before the ack (e.g. redis://127.0.0.1:6379/14).
    #[arg(long)]
    redis: Option<String>,
    /// Queue name (declared and deleted here).
    #[arg(long, default_value = "ceiling-canvas")]
    queue: String,
    #[arg(long, default_value_t = 300)]
    max_seconds: u64,
}

#[global_allocator]
static ALLOCATOR: mediafarm::FastAllocator = mediafarm::FastAllocator;

const HOP: &str = "x-ceiling-hop";

/// User + system seconds of a process (all its threads).
fn cpu_of(pid: u32) -> f64 {
    let tick = 100.0; // USER_HZ on Linux
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return 0.0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let n = |i: usize| f.get(i).and_then(|s| s.parse::<f64>().ok()).unwrap_or(0.0);
    (n(11) + n(12)) / tick
}

fn pid_of(name: &str) -> Option<u32> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
        (comm.trim() == name).then_some(pid)
    })
}

fn hops(props: &lapin::BasicProperties) -> u32 {
    props
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get(HOP).cloned())
        .and_then(|v| match v {
            AMQPValue::LongUInt(n) => Some(n),
            _ => None,
        })
        .unwrap_or(0)
}

fn task_id(props: &lapin::BasicProperties) -> String {
    props
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get("id").cloned())
        .and_then(|v| match v {
            AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
            _ => None,
        })
        .unwrap_or_default()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let settings = Settings::load(Path::new("mediafarm.toml"), false)?;
    let queue = args.queue.clone();

    // The backlog: real chain messages, as `chain(...).apply_async()` sends them.
    let client = Client::connect(&settings).await.context("connecting")?;
    let step = |kwargs: Map<String, Value>| Signature::new("echo.step", kwargs).queue(&queue);
    let mut backlog = Vec::with_capacity(args.chains);
    for n in 0..args.chains {
        let first = json!({"i": n}).as_object().cloned().unwrap_or_default();
        let steps = std::iter::once(step(first))
            .chain((1..args.steps).map(|_| step(Map::new())))
            .collect::<Vec<_>>();
        backlog.push(chain(steps).plan(Utc::now())?.msg);
    }
    for part in backlog.chunks(500) {
        client.publish_batch(&queue, part).await?;
    }
    drop(client);

    let rabbit = pid_of("beam.smp");
    let redis_pid = pid_of("redis-server");
    let redis = match &args.redis {
        Some(url) => Some(
            redis::Client::open(url.as_str())?
                .get_connection_manager()
                .await
                .context("redis")?,
        ),
        None => None,
    };
    let consuming = broker::connect(&settings, "broker-ceiling consumer").await?;
    let publishing = broker::connect(&settings, "broker-ceiling publisher").await?;
    let channel = consuming.create_channel().await?;
    channel
        .basic_qos(args.window, BasicQosOptions { global: true })
        .await?;
    let out = publishing.create_channel().await?;
    out.confirm_select(ConfirmSelectOptions::default()).await?;

    let total = args.chains * args.steps as usize;
    let done = Arc::new(AtomicUsize::new(0));
    let (finished_tx, mut finished) = tokio::sync::mpsc::unbounded_channel::<Instant>();
    let mut consumer = channel
        .basic_consume(
            queue.as_str().into(),
            "ceiling".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let deadline = tokio::time::sleep(Duration::from_secs(args.max_seconds));
    tokio::pin!(deadline);
    let mut began: Option<(Instant, Vec<f64>)> = None;
    let sample = || {
        vec![
            rabbit.map_or(0.0, cpu_of),
            redis_pid.map_or(0.0, cpu_of),
            cpu_of(std::process::id()),
        ]
    };
    let ended = loop {
        let delivery = tokio::select! {
            _ = &mut deadline => bail!("not done after {} s", args.max_seconds),
            at = finished.recv() => break at,
            d = consumer.next() => match d {
                Some(d) => d?,
                None => bail!("the consumer ended"),
            },
        };
        if began.is_none() {
            began = Some((Instant::now(), sample()));
        }
        let out = out.clone();
        let done = done.clone();
        let finished_tx = finished_tx.clone();
        let mut redis = redis.clone();
        let (queue, steps) = (queue.clone(), args.steps);
        tokio::spawn(async move {
            let hop = hops(&delivery.properties) + 1;
            if hop < steps {
                let mut headers = delivery.properties.headers().clone().unwrap_or_default();
                headers.insert(HOP.into(), AMQPValue::LongUInt(hop));
                let props = delivery.properties.clone().with_headers(headers);
                let confirmed = match out
                    .basic_publish(
                        "".into(),
                        queue.as_str().into(),
                        BasicPublishOptions::default(),
                        &delivery.data,
                        props,
                    )
                    .await
                {
                    Ok(confirm) => confirm.await.map(|c| c.is_ack()).unwrap_or(false),
                    Err(_) => false,
                };
                if !confirmed {
                    eprintln!("a publish was not confirmed");
                    return;
                }
            }
            if let Some(r) = redis.as_mut() {
                let key = format!("celery-task-meta-{}", task_id(&delivery.properties));
                let meta = r#"{"status": "SUCCESS", "result": {"parent": {"i": 0}}, "traceback": null, "children": []}"#;
                let stored: redis::RedisResult<()> = redis::pipe()
                    .set_ex(&key, meta, 86_400)
                    .ignore()
                    .publish(&key, meta)
                    .ignore()
                    .query_async(r)
                    .await;
                if stored.is_err() {
                    eprintln!("a result store failed");
                    return;
                }
            }
            let _ = delivery.acker.ack(BasicAckOptions::default()).await;
            if done.fetch_add(1, Ordering::Relaxed) + 1 == total {
                let _ = finished_tx.send(Instant::now());
            }
        });
    };
    let after = sample();
    let (Some(ended), Some((start, before))) = (ended, began) else {
        bail!("nothing was consumed");
    };
    let secs = (ended - start).as_secs_f64();
    let per_step = |i: usize| (after[i] - before[i]) * 1e6 / total as f64;
    println!(
        "window {} redis {}: {} steps in {:.3} s = {:.0} steps/s ({:.0} chains/s); \
         CPU µs/step: rabbitmq {:.0}, redis {:.0}, this program {:.0}",
        args.window,
        args.redis.is_some(),
        total,
        secs,
        total as f64 / secs,
        args.chains as f64 / secs,
        per_step(0),
        per_step(1),
        per_step(2),
    );
    let _ = channel
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await;
    let _ = consuming.close(200, "done".into()).await;
    let _ = publishing.close(200, "done".into()).await;
    Ok(())
}

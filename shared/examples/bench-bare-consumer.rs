//! `bench-bare-consumer`: the throughput ceiling for the runtime benchmark. A bare lapin
//! consumer that, for each message, writes one Redis key under the task id and acks it —
//! no decoding beyond the id header, no result envelope, no metrics. Stops on SIGTERM or
//! after `--max-seconds`.

use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Connection, ConnectionProperties};
use redis::AsyncCommands;

#[derive(Parser)]
struct Args {
    #[arg(long)]
    queue: String,
    #[arg(long, default_value_t = 8)]
    prefetch: u16,
    #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    broker: String,
    #[arg(long, default_value = "redis://127.0.0.1:6379/14")]
    redis: String,
    #[arg(long, default_value_t = 600)]
    max_seconds: u64,
}

#[global_allocator]
static ALLOCATOR: mediafarm::FastAllocator = mediafarm::FastAllocator;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let redis = redis::Client::open(args.redis.as_str())?
        .get_connection_manager()
        .await
        .context("redis")?;
    let conn = Connection::connect(&args.broker, ConnectionProperties::default())
        .await
        .context("rabbitmq")?;
    let channel = conn.create_channel().await?;
    channel
        .basic_qos(args.prefetch, BasicQosOptions::default())
        .await?;
    let mut consumer = channel
        .basic_consume(
            args.queue.as_str().into(),
            "bare".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let deadline = tokio::time::sleep(Duration::from_secs(args.max_seconds));
    tokio::pin!(deadline);
    eprintln!("consuming {}", args.queue);
    loop {
        let delivery = tokio::select! {
            _ = term.recv() => break,
            _ = &mut deadline => break,
            d = consumer.next() => match d {
                Some(d) => d?,
                None => break,
            },
        };
        let mut redis = redis.clone();
        tokio::spawn(async move {
            let id = delivery
                .properties
                .headers()
                .as_ref()
                .and_then(|h| h.inner().get("id").cloned())
                .and_then(|v| match v {
                    AMQPValue::LongString(s) => {
                        Some(String::from_utf8_lossy(s.as_bytes()).into_owned())
                    }
                    _ => None,
                })
                .unwrap_or_default();
            let stored: redis::RedisResult<()> = redis
                .set(format!("celery-task-meta-{id}"), r#"{"status": "SUCCESS"}"#)
                .await;
            if stored.is_ok() {
                let _ = delivery.acker.ack(BasicAckOptions::default()).await;
            }
        });
    }
    let _ = conn.close(200, "done".into()).await;
    Ok(())
}

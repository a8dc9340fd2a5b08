//! `decode-bench`: the per-message CPU of the worker's hot path on a message exactly as Python
//! Celery 5.7 publishes it (`app.send_task("echo.echo", kwargs={"n": 1}, queue=...)`, headers
//! typed as py-amqp writes them, captured from RabbitMQ), without broker or Redis: reading the
//! AMQP properties, decoding the task message, cloning the metric handles, and building and
//! serialising the SUCCESS record. Prints nanoseconds per message for each step and in all.
//!
//! `cargo run --release -p mediafarm --example decode-bench -- [--iterations 200000]`

use std::hint::black_box;
use std::time::Instant;

use lapin::types::{AMQPValue, FieldArray, FieldTable, LongString, ShortString};
use lapin::BasicProperties;
use mediafarm::amqp::table::read_properties;
use mediafarm::observe::metrics::{Metrics, TaskLabels};
use mediafarm::protocol::TaskMessage;
use mediafarm::ResultMeta;
use serde_json::Value;

const ID: &str = "ceff9413-e419-40fd-986b-5db342815409";
const BODY: &[u8] =
    br#"[[], {"n": 1}, {"callbacks": null, "errbacks": null, "chain": null, "chord": null}]"#;

/// The properties and headers Celery 5.7 sent for that call (py-amqp's types: str as a long
/// string, int as a signed 32-bit integer, None as void, list as an array, dict as a table).
fn celery_properties() -> BasicProperties {
    let s = |v: &str| AMQPValue::LongString(LongString::from(v.as_bytes().to_vec()));
    let mut h = FieldTable::default();
    let mut put = |k: &str, v: AMQPValue| {
        h.insert(ShortString::from(k), v);
    };
    put("lang", s("py"));
    put("task", s("echo.echo"));
    put("id", s(ID));
    put("shadow", AMQPValue::Void);
    put("eta", AMQPValue::Void);
    put("expires", AMQPValue::Void);
    put("group", AMQPValue::Void);
    put("group_index", AMQPValue::Void);
    put("retries", AMQPValue::LongInt(0));
    put(
        "timelimit",
        AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::Void, AMQPValue::Void])),
    );
    put("root_id", s(ID));
    put("parent_id", AMQPValue::Void);
    put("argsrepr", s("()"));
    put("kwargsrepr", s("{'n': 1}"));
    put("origin", s("gen19461@vm"));
    put("ignore_result", AMQPValue::Void);
    put("replaced_task_nesting", AMQPValue::LongInt(0));
    put("stamped_headers", AMQPValue::Void);
    put("stamps", AMQPValue::FieldTable(FieldTable::default()));
    BasicProperties::default()
        .with_content_type("application/json".into())
        .with_content_encoding("utf-8".into())
        .with_correlation_id(ID.into())
        .with_reply_to("248bfe95-0c7b-3feb-a90d-bd0d9969872c".into())
        .with_delivery_mode(2)
        .with_priority(0)
        .with_headers(h)
}

fn per_message(label: &str, iterations: u32, mut f: impl FnMut()) -> f64 {
    // Once to warm caches and the allocator, then timed.
    for _ in 0..iterations / 10 {
        f();
    }
    let began = Instant::now();
    for _ in 0..iterations {
        f();
    }
    let ns = began.elapsed().as_nanos() as f64 / f64::from(iterations);
    println!("{label:44} {ns:8.0} ns/message");
    ns
}

#[global_allocator]
static ALLOCATOR: mediafarm::FastAllocator = mediafarm::FastAllocator;

fn main() {
    let mut args = std::env::args().skip(1);
    let mut iterations = 200_000u32;
    while let Some(a) = args.next() {
        if a == "--iterations" {
            iterations = args
                .next()
                .and_then(|v| v.parse().ok())
                .unwrap_or(iterations);
        }
    }
    let basic = celery_properties();
    let (props, headers) = read_properties(&basic);
    let metrics = Metrics::new();
    let handles = metrics.task(&TaskLabels {
        name: "echo.echo".into(),
        hostname: "vm".into(),
        queue_name: "bench-queue".into(),
    });

    let mut total = 0.0;
    total += per_message("read_properties (AMQP table → JSON)", iterations, || {
        black_box(read_properties(black_box(&basic)));
    });
    total += per_message("TaskMessage::decode", iterations, || {
        black_box(TaskMessage::decode(&props, &headers, black_box(BODY), 1 << 20).ok());
    });
    total += per_message("metric handles clone (per job)", iterations, || {
        black_box(black_box(&handles).clone());
    });
    let msg = TaskMessage::decode(&props, &headers, BODY, 1 << 20).expect("Celery's message");
    total += per_message("SUCCESS record: build + serialise", iterations, || {
        let meta = ResultMeta::success(&msg.id, Value::Object(msg.kwargs.clone()));
        black_box(serde_json::to_string(&meta).ok());
    });
    println!("{:44} {total:8.0} ns/message", "sum");
}

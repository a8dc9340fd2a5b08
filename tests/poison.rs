//! Poison messages: messages built to break the worker rather than the job, against the real
//! RabbitMQ and Redis. Each must end *resolved* — refused with a reason a person can act on
//! (FAILURE stored for its id, the message in `<queue>.dead` with `x-mediafarm-dead-reason`)
//! or run normally — while the worker stays up and keeps consuming. Without the carried
//! amq-protocol-types patch (patches/README.md) the deep-header cases abort the process: the
//! header parser on lapin's I/O thread overflows its stack, and every worker that takes the
//! redelivered message dies the same way.
//!
//! Messages are published with `raw_amqp` rather than lapin: lapin serialises headers by
//! recursion, so it cannot send what these tests need. To add a case, build its header bytes
//! with `raw_amqp::wire`, call [`publish_raw`], then [`assert_refused`] or [`assert_ran`].

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use mediafarm::deadletter::{self, DeadLetter};
use mediafarm::{Client, Settings};
use mediafarm_tests::raw_amqp::{self, wire, RawError};
use mediafarm_tests::{
    binary, delete_queue, echo_registry, failed, kwargs, ready_count, settings, to, unique_queue,
    Farm,
};
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(30);

/// The reason a too-deep header is refused with (the rest names the limit's origin).
const TOO_DEEP: &str = "header `x-deep` nests tables or arrays deeper than 128 levels";

fn new_id(label: &str) -> String {
    format!("{label}-{}", uuid::Uuid::new_v4())
}

/// A Celery protocol v2 body: no args, these kwargs, an empty embed.
fn body(kwargs: Value) -> Vec<u8> {
    let embed = json!({"callbacks": null, "errbacks": null, "chain": null, "chord": null});
    serde_json::to_vec(&json!([[], kwargs, embed])).expect("JSON")
}

/// Publishes one JSON message with hand-built header-table bytes to `queue`, confirmed, with
/// `id` as its correlation id. The queue is declared first (as kombu and the worker declare
/// it): a worker that has just started may not have declared it yet.
async fn publish_raw(
    s: &Settings,
    queue: &str,
    headers: Vec<u8>,
    id: &str,
    body: Vec<u8>,
) -> Result<(), RawError> {
    ready_count(s, queue).await;
    let (url, queue, id) = (s.broker_url.clone(), queue.to_owned(), id.to_owned());
    tokio::task::spawn_blocking(move || raw_amqp::publish(&url, &queue, &headers, &id, &body))
        .await
        .expect("publisher thread")
}

/// Waits until `<queue>.dead` holds `n` letters; returns them.
async fn dead_letters(s: &Settings, queue: &str, n: usize) -> Vec<DeadLetter> {
    let end = Instant::now() + WAIT;
    loop {
        let letters = deadletter::list(s, queue, 100).await.expect("dead list");
        if letters.len() >= n || Instant::now() > end {
            assert_eq!(letters.len(), n, "dead letters of {queue}: {letters:?}");
            return letters;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The worker still answers a good job, and nothing is left waiting in its queue.
async fn assert_still_consuming(farm: &Farm) {
    let r = farm
        .client
        .send_task("echo.echo", kwargs(json!({"after": 1})), &to(&farm.queue))
        .await
        .unwrap();
    assert_eq!(r.get(WAIT).await.unwrap(), json!({"after": 1}));
    assert_eq!(ready_count(&farm.settings, &farm.queue).await, 0);
}

/// Resolved by refusal: FAILURE `InvalidMessage` whose message contains `reason` stored for
/// `id`, the message dead-lettered with that reason, and the worker still consuming.
async fn assert_refused(farm: &Farm, id: &str, reason: &str) {
    let err = failed(farm.client.result(id).get(WAIT).await);
    assert_eq!(err.exc_type, "InvalidMessage", "{}", err.message);
    assert!(err.message.contains(reason), "{}", err.message);
    let letters = dead_letters(&farm.settings, &farm.queue, 1).await;
    let letter = &letters[0];
    assert_eq!(letter.id.as_deref(), Some(id), "{letter:?}");
    assert_eq!(letter.kind.as_deref(), Some("InvalidMessage"), "{letter:?}");
    assert!(
        letter.reason.as_deref().unwrap_or("").contains(reason),
        "{letter:?}"
    );
    assert_still_consuming(farm).await;
}

/// Resolved by running: the job's result is `expected`, nothing was dead-lettered, and the
/// worker still consumes.
async fn assert_ran(farm: &Farm, id: &str, expected: Value) {
    assert_eq!(farm.client.result(id).get(WAIT).await.unwrap(), expected);
    dead_letters(&farm.settings, &farm.queue, 0).await;
    assert_still_consuming(farm).await;
}

/// One `echo.echo` job whose `x-deep` header holds `levels` nested tables or arrays.
async fn deep_header_is_refused(label: &str, levels: usize, tables: bool) {
    let farm = Farm::start(label, settings(), echo_registry()).await;
    let id = new_id(label);
    let deep = vec![("x-deep".to_owned(), wire::nested(levels, tables))];
    let headers = wire::celery_headers(&id, "echo.echo", deep);
    publish_raw(&farm.settings, &farm.queue, headers, &id, body(json!({})))
        .await
        .expect("the broker takes the message");
    assert_refused(&farm, &id, TOO_DEEP).await;
    farm.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_1_000_tables_deep_is_refused_and_the_worker_goes_on() {
    deep_header_is_refused("deep1k", 1_000, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_5_000_arrays_deep_is_refused_and_the_worker_goes_on() {
    deep_header_is_refused("deep5k", 5_000, false).await;
}

/// 20,000 arrays are 100 kB of header: near the most a content header frame can carry under
/// RabbitMQ's default frame_max of 128 KiB (about 26,000 levels of arrays).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_20_000_arrays_deep_is_refused_and_the_worker_goes_on() {
    deep_header_is_refused("deep20k", 20_000, false).await;
}

/// A million levels are 5 MB of header, far over frame_max: RabbitMQ answers the oversized
/// frame with `connection.close` 501 (frame error) and drops the connection, so no worker ever
/// sees the message. The publisher gets the close, or a reset socket when the broker drops the
/// connection while the frame is still being written. (The parser's limit covers such a
/// header all the same: the `amqp_table` unit tests parse one on a 512 KiB stack.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_1_000_000_deep_is_refused_by_the_broker_before_any_worker() {
    let farm = Farm::start("deep1m", settings(), echo_registry()).await;
    let id = new_id("deep1m");
    let deep = vec![("x-deep".to_owned(), wire::nested(1_000_000, false))];
    let headers = wire::celery_headers(&id, "echo.echo", deep);
    let refused = publish_raw(&farm.settings, &farm.queue, headers, &id, body(json!({}))).await;
    match refused {
        Err(RawError::Closed { code: 501, .. }) => {}
        Err(RawError::Io(e))
            if matches!(
                e.kind(),
                std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
            ) => {}
        other => panic!("expected the broker to refuse the frame, got {other:?}"),
    }
    assert_still_consuming(&farm).await;
    dead_letters(&farm.settings, &farm.queue, 0).await;
    farm.stop().await;
}

/// Width is not depth: 10,000 header keys (80 kB, within one frame) parse without recursion
/// and the job runs as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_table_of_10_000_keys_runs_as_a_normal_job() {
    let farm = Farm::start("wide", settings(), echo_registry()).await;
    let id = new_id("wide");
    let wide = (0..10_000u32)
        .map(|n| (format!("w{n:04}"), wire::short_short_uint((n % 256) as u8)))
        .collect();
    let headers = wire::celery_headers(&id, "echo.echo", wide);
    let kwargs = json!({"wide": true});
    publish_raw(
        &farm.settings,
        &farm.queue,
        headers,
        &id,
        body(kwargs.clone()),
    )
    .await
    .expect("the broker takes the message");
    assert_ran(&farm, &id, kwargs).await;
    farm.stop().await;
}

/// Kills the worker process if a test fails before it stops it.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// The real `echo-worker` binary: a deep header must not abort the process (exit 134 before
/// the patch), and the message must not come back to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_worker_process_survives_a_deep_header() {
    let s = settings();
    let q = unique_queue("deepbin");
    let id = new_id("deepbin");
    let deep = vec![("x-deep".to_owned(), wire::nested(20_000, false))];
    let headers = wire::celery_headers(&id, "echo.echo", deep);
    publish_raw(&s, &q, headers, &id, body(json!({})))
        .await
        .expect("the broker takes the message");

    let mut worker = Running(
        Command::new(binary("echo-worker"))
            .args(["--concurrency", "2", "--queues", &q, "--loglevel", "warn"])
            .env("MEDIAFARM_METRICS_ADDR", "127.0.0.1:0")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("echo-worker starts"),
    );
    let client = Client::connect(&s).await.unwrap();
    let outcome = client.result(&id).get(WAIT).await;
    let exited = worker.0.try_wait().unwrap();
    assert_eq!(exited, None, "the worker process exited ({outcome:?})");
    let err = failed(outcome);
    assert_eq!(err.exc_type, "InvalidMessage", "{}", err.message);
    assert!(err.message.contains(TOO_DEEP), "{}", err.message);
    let after = client
        .send_task("echo.echo", kwargs(json!({"after": 1})), &to(&q))
        .await
        .unwrap();
    assert_eq!(after.get(WAIT).await.unwrap(), json!({"after": 1}));
    assert_eq!(worker.0.try_wait().unwrap(), None, "the worker exited");
    let letters = dead_letters(&s, &q, 1).await;
    assert!(letters[0]
        .reason
        .as_deref()
        .unwrap_or("")
        .contains(TOO_DEEP));
    assert_eq!(ready_count(&s, &q).await, 0);

    let status = Command::new("kill")
        .args(["-TERM", &worker.0.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = tokio::task::spawn_blocking(move || {
        let end = Instant::now() + WAIT;
        loop {
            if let Some(status) = worker.0.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < end, "the worker did not stop on SIGTERM");
            std::thread::sleep(Duration::from_millis(50));
        }
    })
    .await
    .unwrap();
    assert!(exit.success(), "{exit:?}");
    delete_queue(&s, &q).await;
    delete_queue(&s, &mediafarm::reroute::dead_queue(&q)).await;
}

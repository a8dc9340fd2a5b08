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

use mediafarm::{Client, Settings};
use mediafarm_tests::raw_amqp::{self, wire, RawError};
use mediafarm_tests::{
    binary, dead_letters, delete_queue, echo_registry, failed, kwargs, new_id, ready_count,
    settings, still_consuming, to, unique_queue, Farm,
};
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(30);

/// The reason a too-deep header is refused with (the rest names the limit's origin).
const TOO_DEEP: &str = "header `x-deep` nests tables or arrays deeper than 128 levels";

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

/// The worker still answers a good job, and nothing is left waiting in its queue.
async fn assert_still_consuming(farm: &Farm) {
    still_consuming(farm).await;
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

/// Sends SIGTERM and waits (up to `WAIT`) for the worker to exit with status 0.
async fn stops_cleanly_on_sigterm(mut worker: Running) {
    mediafarm_tests::process::sigterm(worker.0.id());
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
}

/// Kills the worker process if a test fails before it stops it.
struct Running(Child);

impl Running {
    /// The real `echo-worker` binary on `queue` at `-c 2`, its output discarded.
    fn echo_worker(queue: &str) -> Running {
        Running(
            Command::new(binary("echo-worker"))
                .args([
                    "--concurrency",
                    "2",
                    "--queues",
                    queue,
                    "--loglevel",
                    "error",
                ])
                .env("MEDIAFARM_METRICS_ADDR", "127.0.0.1:0")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("echo-worker starts"),
        )
    }
}

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

    let mut worker = Running::echo_worker(&q);
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

    stops_cleanly_on_sigterm(worker).await;
    delete_queue(&s, &q).await;
    delete_queue(&s, &mediafarm::amqp::reroute::dead_queue(&q)).await;
}

/// The poison class, generated: for every header Celery defines, values of every wrong type,
/// huge numbers and a huge string; bodies with huge numbers, deep JSON and huge strings; all
/// published at once to the real `echo-worker` binary at `-c 2`. Every message must end
/// resolved — a stored result (a FAILURE naming what was wrong, or SUCCESS where the value is
/// in range) and a dead letter for each failure — and the process must stay up, keep
/// consuming, leave nothing in its queue, and stop cleanly on SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_poison_against_the_worker_binary_is_all_resolved() {
    let s = settings();
    let q = unique_queue("poison");
    let huge_string = "x".repeat(100_000);
    // Infinity and NaN doubles are not here: RabbitMQ itself closes the publisher's connection
    // (541 INTERNAL_ERROR) on them, so no worker can receive one.
    let wrong_values: Vec<(&str, Vec<u8>)> = vec![
        ("a string", wire::long_string("not-what-was-expected")),
        ("a huge string", wire::long_string(&huge_string)),
        ("a whole number", wire::long_long_int(i64::MAX)),
        ("a negative number", wire::long_long_int(i64::MIN)),
        ("a huge double", wire::double(1e308)),
        ("a boolean", wire::boolean(true)),
        ("an array", wire::array(&[wire::double(1e20), wire::void()])),
        (
            "a table",
            wire::table_value(&[("k".to_owned(), wire::long_long_int(1))]),
        ),
    ];
    let headers = [
        "id",
        "task",
        "lang",
        "shadow",
        "eta",
        "expires",
        "group",
        "group_index",
        "retries",
        "timelimit",
        "root_id",
        "parent_id",
        "argsrepr",
        "kwargsrepr",
        "origin",
        "ignore_result",
        "replaced_task_nesting",
        "stamped_headers",
        "stamps",
        "compression",
    ];
    // (label, header bytes, body, the id its result is stored under)
    let mut cases: Vec<(String, Vec<u8>, Vec<u8>, String)> = Vec::new();
    for header in headers {
        for (what, value) in &wrong_values {
            if header == "ignore_result" && *what == "a boolean" {
                // The right type: the job runs and, as asked, stores no result.
                continue;
            }
            let mut id = new_id("poison");
            let mut value = value.clone();
            if header == "id" && value[0] == b'S' {
                // A string id is an id: the job is stored under it (made unique here).
                let long = if *what == "a huge string" { 90_000 } else { 0 };
                let text = format!("{}{id}", &huge_string[..long]);
                value = wire::long_string(&text);
                id = text;
            }
            let value = &value;
            let mut entries = vec![
                ("lang".to_owned(), wire::long_string("py")),
                ("task".to_owned(), wire::long_string("echo.echo")),
                ("id".to_owned(), wire::long_string(&id)),
            ];
            entries.retain(|(k, _)| k != header);
            entries.push((header.to_owned(), value.clone()));
            let label = format!("header {header} = {what}");
            cases.push((label, wire::table(&entries), body(json!({})), id));
        }
    }
    let time_limits = [
        wire::array(&[wire::double(1e20), wire::void()]),
        wire::array(&[wire::void(), wire::double(1e20)]),
        wire::array(&[wire::long_long_int(i64::MAX), wire::long_long_int(i64::MAX)]),
        wire::array(&[wire::double(-1.0), wire::void()]),
    ];
    for limits in time_limits {
        let id = new_id("poison");
        let extra = vec![("timelimit".to_owned(), limits)];
        cases.push((
            "a huge time limit".into(),
            wire::celery_headers(&id, "echo.echo", extra),
            body(json!({})),
            id,
        ));
    }
    for time in [
        "0000-01-01T00:00:00",
        "9999-12-31T23:59:59.999999+00:00",
        "+99999-01-01T00:00:00Z",
    ] {
        for name in ["eta", "expires"] {
            if name == "eta" && time.starts_with("9999") {
                // In range: it would wait in the delay queues until then, as asked.
                continue;
            }
            let id = new_id("poison");
            let extra = vec![(name.to_owned(), wire::long_string(time))];
            cases.push((
                format!("{name} = {time}"),
                wire::celery_headers(&id, "echo.echo", extra),
                body(json!({})),
                id,
            ));
        }
    }
    let deep_json = format!(
        "[[], {{\"a\": {}1{}}}, {{}}]",
        "[".repeat(10_000),
        "]".repeat(10_000)
    );
    let bodies: Vec<(&str, Vec<u8>)> = vec![
        (
            "a body number past f64",
            b"[[], {\"n\": 1e999999}, {}]".to_vec(),
        ),
        (
            "a body integer past u64",
            format!("[[], {{\"n\": {}}}, {{}}]", "9".repeat(5_000)).into_bytes(),
        ),
        ("a body nested 10,000 deep", deep_json.into_bytes()),
        (
            "a huge kwarg string",
            body(json!({"s": "y".repeat(500_000)})),
        ),
        (
            "a body past task_message_max_bytes",
            body(json!({"s": "z".repeat(11 << 20)})),
        ),
        ("a body of NUL bytes", vec![0u8; 4096]),
        ("an empty body", Vec::new()),
    ];
    for (label, raw) in bodies {
        let id = new_id("poison");
        cases.push((
            label.into(),
            wire::celery_headers(&id, "echo.echo", vec![]),
            raw,
            id,
        ));
    }

    for (label, headers, raw, id) in &cases {
        // The correlation id is a short string (255 bytes at most): the id's tail.
        let correlation = &id[id.len().saturating_sub(200)..];
        publish_raw(&s, &q, headers.clone(), correlation, raw.clone())
            .await
            .unwrap_or_else(|e| panic!("{label}: the broker refused it: {e}"));
    }
    let mut worker = Running::echo_worker(&q);
    let client = Client::connect(&s).await.unwrap();
    let mut failures = 0;
    for (label, _, _, id) in &cases {
        let outcome = client.result(id).get(WAIT).await;
        assert_eq!(
            worker.0.try_wait().unwrap(),
            None,
            "the worker exited at {label}"
        );
        match outcome {
            Ok(_) => {}
            Err(mediafarm::ClientError::Failed { error, .. }) => {
                failures += 1;
                assert!(
                    !error.message.is_empty() && error.message.len() < 2_000,
                    "{label}: the message is short and says something: {}",
                    error.message
                );
            }
            Err(e) => panic!("{label}: no result for {id}: {e}"),
        }
    }
    assert!(
        failures > cases.len() / 2,
        "most of these are refused: {failures} of {}",
        cases.len()
    );
    let letters = dead_letters(&s, &q, failures).await;
    assert!(
        letters.iter().all(|l| l.reason.is_some()),
        "every dead letter says why"
    );
    let after = client
        .send_task("echo.echo", kwargs(json!({"after": 1})), &to(&q))
        .await
        .unwrap();
    assert_eq!(after.get(WAIT).await.unwrap(), json!({"after": 1}));
    assert_eq!(ready_count(&s, &q).await, 0);
    stops_cleanly_on_sigterm(worker).await;
    delete_queue(&s, &q).await;
    delete_queue(&s, &mediafarm::amqp::reroute::dead_queue(&q)).await;
}

//! Queue arguments from the settings, on the machine's RabbitMQ: priority queues
//! (`task_queue_max_priority`, per-job and default priorities, from Rust and from Python
//! Celery), the error and the worker's behaviour when a queue exists with other arguments, and
//! quorum queues (`task_default_queue_type = "quorum"`): normal, countdown and failing jobs, and
//! a message delivered past `task_quorum_delivery_limit` landing in the dead-letter queue; and
//! `task_inherit_parent_priority` passing a job's priority on to the workflow steps it sends.
//! Also a producer's large batch: whole and in publish order, and stopped at a message that
//! cannot be written.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use lapin::options::{BasicGetOptions, BasicNackOptions};
use mediafarm::amqp::broker::{self, BrokerError, QueueShape};
use mediafarm::amqp::reroute::dead_queue;
use mediafarm::client::{chain, chord, group, Signature, Step};
use mediafarm::{SendOptions, Settings, TaskState};
use mediafarm_tests::process::Proc;
use mediafarm_tests::{
    binary, dead_letters, delete_queue, echo_registry, failed, kwargs, python_env, ready_count,
    run_python, settings, to, unique_queue, Farm,
};
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(60);

/// When job `id` finished, from its stored result.
async fn done_at(farm: &Farm, id: &str) -> DateTime<Utc> {
    let meta = farm
        .client
        .backend()
        .wait(id, WAIT)
        .await
        .unwrap_or_else(|e| panic!("job {id} finished: {e}"));
    assert_eq!(meta.status, TaskState::Success, "{id}: {meta:?}");
    let at = meta
        .date_done
        .clone()
        .expect("a finished job has date_done");
    DateTime::parse_from_rfc3339(&at)
        .unwrap_or_else(|e| panic!("date_done {at:?}: {e}"))
        .with_timezone(&Utc)
}

/// How many of `low` finished after `sent` (when the urgent job `high` was confirmed in the
/// queue) but before `high`. With priorities these can only be jobs the worker already held
/// at `sent`: at most one prefetch window. In a FIFO queue it is every job still waiting then.
async fn overtaken(farm: &Farm, low: &[String], high: &str, sent: DateTime<Utc>) -> usize {
    let high_at = done_at(farm, high).await;
    let mut n = 0;
    for id in low {
        let at = done_at(farm, id).await;
        if at >= sent && at < high_at {
            n += 1;
        }
    }
    n
}

/// One job at a time, holding at most two: the prefetch window is 2.
fn priority_settings() -> Settings {
    let mut s = settings();
    s.task_queue_max_priority = Some(10);
    s.task_default_priority = Some(1);
    s.worker_concurrency = 1;
    s.worker_prefetch_multiplier = 2;
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_high_priority_job_overtakes_the_backlog_within_one_prefetch_window() {
    let s = priority_settings();
    let window = s.prefetch_count() as usize;
    assert_eq!(window, 2);
    let q = unique_queue("prio");
    // The backlog waits in the queue before the worker starts and takes its window of it.
    let client = mediafarm::Client::connect(&s).await.unwrap();
    let backlog = 12;
    let mut low = Vec::new();
    for i in 0..backlog {
        // No priority given: task_default_priority (1) is sent.
        let r = client
            .send_task(
                "echo.echo",
                kwargs(json!({"i": i, "sleep_ms": 50})),
                &to(&q),
            )
            .await
            .unwrap();
        low.push(r.id);
    }
    let farm = Farm::start_on(q.clone(), s.clone(), echo_registry()).await;
    let high = farm
        .client
        .send_task(
            "echo.echo",
            kwargs(json!({"urgent": true})),
            &SendOptions {
                priority: Some(9),
                ..to(&q)
            },
        )
        .await
        .unwrap();
    let sent = Utc::now();
    let n = overtaken(&farm, &low, &high.id, sent).await;
    assert!(
        n <= window,
        "{n} backlog jobs finished after the urgent one was queued but before it (window {window})"
    );
    farm.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_celery_with_task_queue_max_priority_sends_priorities_that_count() {
    let s = priority_settings();
    let window = s.prefetch_count() as usize;
    let farm = Farm::start("pyprio", s.clone(), echo_registry()).await;
    // Celery declares the queue itself (x-max-priority 10, as the worker did): a different
    // declaration would make its send fail and the script with it.
    let out = run_python(
        "priority_producer.py",
        &[&farm.queue, "12"],
        &python_env(&s),
    );
    let sent: Value = serde_json::from_str(out.trim()).expect("the producer prints JSON");
    let low: Vec<String> = sent["low"]
        .as_array()
        .expect("low ids")
        .iter()
        .map(|v| v.as_str().expect("an id").to_owned())
        .collect();
    let high = sent["high"].as_str().expect("the urgent id");
    let at = sent["sent"]
        .as_f64()
        .expect("when the urgent job was confirmed");
    let at = DateTime::from_timestamp_micros((at * 1e6) as i64).expect("a time");
    let n = overtaken(&farm, &low, high, at).await;
    assert!(
        n <= window,
        "{n} backlog jobs finished after Python's urgent one was queued but before it \
         (window {window})"
    );
    farm.stop().await;
}

/// Declares `queue` as Celery does by default: classic, no arguments.
async fn declare_plain(s: &Settings, queue: &str) {
    let conn = broker::connect(s, "test plain").await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    broker::declare_queue(&ch, queue, &QueueShape::default())
        .await
        .unwrap();
    mediafarm::amqp::broker::close_quietly(&conn, &[&ch], "done").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_with_other_arguments_gets_an_error_that_says_what_to_do() {
    let plain = settings();
    let q = unique_queue("inequivalent");
    declare_plain(&plain, &q).await;

    // The producer: its send fails at once (no retries), naming queue, argument and values.
    let mut s = settings();
    s.task_queue_max_priority = Some(10);
    let client = mediafarm::Client::connect(&s).await.unwrap();
    let Err(err) = client
        .send_task("echo.echo", kwargs(json!({})), &to(&q))
        .await
    else {
        panic!("RabbitMQ accepted a declaration with other arguments");
    };
    let text = err.to_string();
    assert!(
        matches!(
            &err,
            mediafarm::ClientError::Broker(BrokerError::QueueArguments { argument, existing, wanted, .. })
                if argument == "x-max-priority" && existing == "none" && wanted == "'10'"
        ),
        "{err:?}"
    );
    for part in [
        q.as_str(),
        "shovel",
        "drain",
        "delete_queue",
        "new queue name",
    ] {
        assert!(text.contains(part), "{part:?} missing from: {text}");
    }

    // The worker (a process, as deployed): it logs the same explanation and keeps trying.
    let mut child = Proc::spawn(
        Command::new(binary("echo-worker"))
            .args(["--concurrency", "1", "--queues", &q, "--loglevel", "info"])
            .env("MEDIAFARM_METRICS_ADDR", "127.0.0.1:0")
            .env("MEDIAFARM_TASK_QUEUE_MAX_PRIORITY", "10")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped()),
    );
    let stderr = child.0.stderr.take().expect("stderr is piped");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let line = loop {
        let line = rx
            .recv_timeout(WAIT)
            .expect("the worker logs the refused declaration");
        if line.contains("cannot declare a work queue") {
            break line;
        }
    };
    for part in [
        q.as_str(),
        "x-max-priority",
        "none",
        "'10'",
        "shovel",
        "drain",
    ] {
        assert!(line.contains(part), "{part:?} missing from: {line}");
    }
    child.kill9();

    // The queue is untouched: a Celery-style declaration still succeeds.
    declare_plain(&plain, &q).await;
    delete_queue(&plain, &q).await;
}

fn quorum_settings(limit: u32) -> Settings {
    let mut s = settings();
    s.task_default_queue_type = "quorum".into();
    s.task_quorum_delivery_limit = limit;
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_quorum_queues_jobs_countdowns_and_dead_letters_work() {
    let s = quorum_settings(5);
    let farm = Farm::start("quorum", s.clone(), echo_registry()).await;
    let q = farm.queue.clone();

    let r = farm
        .client
        .send_task("echo.echo", kwargs(json!({"plain": 1})), &to(&q))
        .await
        .unwrap();
    assert_eq!(r.get(WAIT).await.unwrap(), json!({"plain": 1}));

    let r = farm
        .client
        .send_task(
            "echo.echo",
            kwargs(json!({"later": 1})),
            &SendOptions {
                countdown: Some(0.5),
                ..to(&q)
            },
        )
        .await
        .unwrap();
    assert_eq!(r.get(WAIT).await.unwrap(), json!({"later": 1}));

    let r = farm
        .client
        .send_task(
            "echo.echo",
            kwargs(json!({"fail": "broken input"})),
            &to(&q),
        )
        .await
        .unwrap();
    let id = r.id.clone();
    failed(r.get(WAIT).await);
    let letters = dead_letters(&s, &q, 1).await;
    assert_eq!(letters[0].id.as_deref(), Some(id.as_str()));

    // Both queues really are quorum queues: a classic declaration of either is refused.
    let conn = broker::connect(&s, "test classic").await.unwrap();
    for declare in [true, false] {
        let ch = conn.create_channel().await.unwrap();
        let refused = if declare {
            broker::declare_queue(&ch, &q, &QueueShape::default()).await
        } else {
            broker::declare_dead_queue(&ch, &q, &QueueShape::default())
                .await
                .map(|_| ())
        };
        assert!(
            matches!(refused, Err(BrokerError::QueueArguments { .. })),
            "{refused:?}"
        );
    }
    mediafarm::amqp::broker::close_quietly(&conn, &[], "done").await;
    farm.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_celery_declaring_the_readmes_quorum_arguments_sends_to_a_quorum_queue() {
    let s = quorum_settings(20);
    let farm = Farm::start("pyquorum", s.clone(), echo_registry()).await;
    // Celery declares the queue too: other arguments would make its send fail.
    let out = run_python("quorum_producer.py", &[&farm.queue, "20"], &python_env(&s));
    let got: Value = serde_json::from_str(out.trim()).expect("the producer prints JSON");
    assert_eq!(got, json!({"from": "python"}));
    farm.stop().await;
}

/// Letters in `<queue>.dead`, asked without declaring it.
async fn dead_count(s: &Settings, queue: &str) -> u32 {
    let conn = broker::connect(s, "test dead count").await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    let q = ch
        .queue_declare(
            dead_queue(queue).as_str().into(),
            lapin::options::QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            Default::default(),
        )
        .await
        .expect("the dead-letter queue exists");
    mediafarm::amqp::broker::close_quietly(&conn, &[&ch], "done").await;
    q.message_count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_delivered_past_the_limit_lands_in_the_dead_letter_queue() {
    let limit = 2;
    let s = quorum_settings(limit);
    let q = unique_queue("limit");
    // Published by the client (which declares both quorum queues), taken by no worker: a
    // consumer that gives it back each time stands for workers that die holding it.
    let client = mediafarm::Client::connect(&s).await.unwrap();
    let sent = client
        .send_task("echo.echo", kwargs(json!({"poison": true})), &to(&q))
        .await
        .unwrap();
    let conn = broker::connect(&s, "test returner").await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    let mut deliveries = 0;
    let mut empty_polls = 0;
    while empty_polls < 200 && deliveries < 50 {
        match ch
            .basic_get(q.as_str().into(), BasicGetOptions { no_ack: false })
            .await
            .unwrap()
        {
            Some(msg) => {
                deliveries += 1;
                empty_polls = 0;
                msg.delivery
                    .acker
                    .nack(BasicNackOptions {
                        requeue: true,
                        ..Default::default()
                    })
                    .await
                    .unwrap();
            }
            None => {
                // Dead-lettered, or not back in the queue yet.
                if dead_count(&s, &q).await == 1 {
                    break;
                }
                empty_polls += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    assert!(
        deliveries > limit as usize && deliveries < 50,
        "{deliveries} deliveries with x-delivery-limit {limit}"
    );
    let letters = dead_letters(&s, &q, 1).await;
    assert_eq!(letters[0].id.as_deref(), Some(sent.id.as_str()));
    assert_eq!(letters[0].kind.as_deref(), Some("DeliveryLimitExceeded"));
    assert_eq!(letters[0].queue.as_deref(), Some(q.as_str()));
    assert!(
        letters[0]
            .reason
            .as_deref()
            .is_some_and(|r| r.contains("task_quorum_delivery_limit")),
        "{:?}",
        letters[0].reason
    );
    assert_eq!(ready_count(&s, &q).await, 0);
    mediafarm::amqp::broker::close_quietly(&conn, &[&ch], "done").await;

    // Not lost: replayed once a worker is there, it runs.
    let farm = Farm::start_on(q.clone(), s.clone(), echo_registry()).await;
    let replayed = mediafarm::amqp::dead_letters::replay(&s, farm.client.backend(), &q, None)
        .await
        .expect("replay");
    assert_eq!(replayed, 1);
    assert_eq!(
        farm.client.result(&sent.id).get(WAIT).await.unwrap(),
        json!({"poison": true})
    );
    farm.stop().await;
}

#[test]
fn priorities_on_quorum_queues_are_refused_at_start_up() {
    let out = Command::new(binary("echo-worker"))
        .args(["--check-settings"])
        .env("MEDIAFARM_TASK_DEFAULT_QUEUE_TYPE", "quorum")
        .env("MEDIAFARM_TASK_QUEUE_MAX_PRIORITY", "10")
        .stdin(Stdio::null())
        .output()
        .expect("echo-worker runs");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("task_queue_max_priority") && err.contains("quorum"),
        "{err}"
    );
}

/// `task_inherit_parent_priority`: what a job sends on when it succeeds (a callback, a chain's
/// group step's members) and the body a chord header sends take the job's delivery priority
/// unless they set their own; off, they get `task_default_priority`. Read from the priority
/// queue nothing consumes, where they wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workflow_steps_inherit_the_parents_priority_when_the_setting_is_on() {
    for inherit in [true, false] {
        let mut s = priority_settings();
        s.worker_concurrency = 4;
        s.task_inherit_parent_priority = inherit;
        let farm = Farm::start("inheritprio", s.clone(), echo_registry()).await;
        let next = unique_queue("inheritprio-next");
        let echo = |k: &str| {
            Signature::new("echo.echo", kwargs(json!({ k: 1 })))
                .si()
                .queue(&next)
        };
        let first = Signature::new("echo.echo", kwargs(json!({"a": 1})))
            .queue(&farm.queue)
            .priority(7)
            .link(echo("callback"));
        chain([
            Step::from(first),
            group([echo("member"), echo("own").priority(2)]).into(),
        ])
        .apply_async_group(&farm.client)
        .await
        .expect("chain sent");
        let header = (0..2).map(|i| {
            Signature::new("echo.echo", kwargs(json!({ "i": i })))
                .queue(&farm.queue)
                .priority(5)
        });
        chord(header, echo("body"))
            .apply_async(&farm.client)
            .await
            .expect("chord sent");

        let conn = broker::connect(&s, "test inherited priorities")
            .await
            .unwrap();
        let ch = conn.create_channel().await.unwrap();
        // Declared as the worker declares it, so it can be read before the first arrives.
        broker::declare_queue(&ch, &next, &QueueShape::of(&s))
            .await
            .unwrap();
        let mut seen = std::collections::BTreeMap::new();
        let deadline = std::time::Instant::now() + WAIT;
        while seen.len() < 4 && std::time::Instant::now() < deadline {
            let got = ch
                .basic_get(next.as_str().into(), BasicGetOptions { no_ack: true })
                .await;
            let Ok(Some(msg)) = got else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            let body: Value = serde_json::from_slice(&msg.delivery.data).expect("a JSON body");
            let key = body[1]
                .as_object()
                .and_then(|k| k.keys().next().cloned())
                .expect("one kwarg");
            seen.insert(key, *msg.delivery.properties.priority());
        }
        // As Celery's worker: on, the parent's priority wins even over a member's own; the
        // chord's body never inherits (Celery's join sends it with its own options only).
        let (parent, own) = if inherit { (7, 7) } else { (1, 2) };
        let want: std::collections::BTreeMap<String, Option<u8>> = [
            ("callback", Some(parent)),
            ("member", Some(parent)),
            ("own", Some(own)),
            ("body", Some(1)),
        ]
        .into_iter()
        .map(|(k, p)| (k.to_owned(), p))
        .collect();
        assert_eq!(seen, want, "task_inherit_parent_priority = {inherit}");
        mediafarm::amqp::broker::close_quietly(&conn, &[&ch], "done").await;
        farm.stop().await;
        delete_queue(&s, &next).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mediafarm_submit_sends_the_priority_given_or_the_default() {
    let mut s = settings();
    s.task_queue_max_priority = Some(10);
    let q = unique_queue("cliprio");
    let cli = binary("mediafarm");
    // The default first: only a priority queue hands out the later, higher one first.
    for args in [vec![], vec!["--priority", "7"]] {
        let out = Command::new(&cli)
            .args(["submit", "echo.echo", "--queue", &q])
            .args(args)
            .env("MEDIAFARM_TASK_QUEUE_MAX_PRIORITY", "10")
            .env("MEDIAFARM_TASK_DEFAULT_PRIORITY", "3")
            .stdin(Stdio::null())
            .output()
            .expect("mediafarm runs");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let conn = broker::connect(&s, "test priorities").await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    let mut seen = Vec::new();
    for _ in 0..2 {
        let msg = ch
            .basic_get(q.as_str().into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap()
            .expect("both jobs wait in the queue");
        seen.push(*msg.delivery.properties.priority());
    }
    // Highest first: the queue was declared with x-max-priority by the CLI.
    assert_eq!(seen, [Some(7), Some(3)]);
    mediafarm::amqp::broker::close_quietly(&conn, &[&ch], "done").await;
    delete_queue(&s, &q).await;
}

/// A batch larger than the publisher queues on a channel at once (256) arrives whole and in
/// order; a message that cannot be written (an id too long for AMQP's `correlation_id`) ends
/// the batch there with an error naming it, everything before it published once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_batch_arrives_in_order_and_stops_at_an_unpublishable_message() {
    use mediafarm::protocol::TaskMessage;
    use mediafarm::{Client, ClientError};

    let s = settings();
    let q = unique_queue("batch-order");
    let client = Client::connect(&s).await.expect("client");
    let batch = |n: usize| -> Vec<TaskMessage> {
        (0..n)
            .map(|i| TaskMessage::new("echo.echo", kwargs(json!({ "n": i }))))
            .collect()
    };
    let good = batch(600);
    client.publish_batch(&q, &good).await.expect("published");
    let mut bad = batch(600);
    bad[400].id = "x".repeat(300);
    match client.publish_batch(&q, &bad).await {
        Err(ClientError::Broker(BrokerError::Unpublishable { id, .. })) => {
            assert!(id.starts_with("xxx"), "{id}")
        }
        other => panic!("not refused as unpublishable: {other:?}"),
    }

    let conn = broker::connect(&s, "test batch order").await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    let mut seen = Vec::new();
    while let Some(msg) = ch
        .basic_get(q.as_str().into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
    {
        let id = msg.delivery.properties.correlation_id().clone();
        seen.push(id.map(|i| i.to_string()).unwrap_or_default());
    }
    let want: Vec<String> = good
        .iter()
        .chain(&bad[..400])
        .map(|m| m.id.clone())
        .collect();
    assert_eq!(seen.len(), want.len(), "messages in the queue");
    assert!(seen == want, "not in publish order");
    mediafarm::amqp::broker::close_quietly(&conn, &[&ch], "done").await;
    delete_queue(&s, &q).await;
}

//! Fault tolerance inside one worker process, against the real RabbitMQ and Redis: delays and
//! retries that wait in RabbitMQ, dead letters with their reasons (every bad message in
//! `fixtures/messages/`, checked against the table in `fixtures/README.md`), soft and hard time limits (also for CPU-bound work), revokes from Rust and from
//! Python's `app.control.revoke`, dead-letter replay, and the once-only helper.

use std::time::{Duration, Instant};

use lapin::BasicProperties;

use mediafarm::amqp::dead_letters;
use mediafarm::backend::once::Claim;
use mediafarm::{SendOptions, Settings, TaskError, TaskState};
use mediafarm_tests::{
    celery_props, dead_letters, echo_registry, failed, kwargs, new_id, publish_raw, python_env,
    ready_count, run_python, settings, still_consuming, to, Farm,
};
use serde_json::{json, Map, Value};

const WAIT: Duration = Duration::from_secs(30);

async fn delete_dead(s: &Settings, queue: &str) {
    mediafarm_tests::delete_queue(s, &mediafarm::amqp::reroute::dead_queue(queue)).await;
}

/// Publishes one bad message; checks the FAILURE (when an id is known), the dead letter's
/// reason and that the worker goes on.
async fn bad_message(
    label: &str,
    settings: Settings,
    props: BasicProperties,
    body: &[u8],
    id: Option<&str>,
    reason: &str,
) {
    bad_message_saying(label, settings, props, body, id, &[reason]).await;
}

/// [`bad_message`] with several pieces the reason must hold; returns the FAILURE it stored.
async fn bad_message_saying(
    label: &str,
    settings: Settings,
    props: BasicProperties,
    body: &[u8],
    id: Option<&str>,
    reason: &[&str],
) -> Option<TaskError> {
    let farm = Farm::start(label, settings, echo_registry()).await;
    publish_raw(&farm.settings, &farm.queue, props, body).await;
    let letters = dead_letters(&farm.settings, &farm.queue, 1).await;
    let letter = &letters[0];
    for reason in reason {
        assert!(
            letter.reason.as_deref().unwrap_or("").contains(reason),
            "{label}: {letter:?}"
        );
    }
    assert_eq!(letter.queue.as_deref(), Some(farm.queue.as_str()));
    assert!(letter.at.is_some() && letter.worker.is_some(), "{letter:?}");
    let mut stored = None;
    if let Some(id) = id {
        let err = failed(farm.client.result(id).get(WAIT).await);
        for reason in reason {
            assert!(err.message.contains(reason), "{label}: {}", err.message);
        }
        assert_eq!(letter.id.as_deref(), Some(id));
        stored = Some(err);
    }
    still_consuming(&farm).await;
    assert_eq!(ready_count(&farm.settings, &farm.queue).await, 0);
    let (s, q) = (farm.settings.clone(), farm.queue.clone());
    farm.stop().await;
    delete_dead(&s, &q).await;
    stored
}

/// Every message in `fixtures/messages/` ends as its row in `fixtures/README.md` says: a
/// FAILURE with that `exc_type` and words (when it carries an id), a dead letter whose reason
/// holds the words, and a worker that goes on. One slot (`-c 1`): a message that wedged its
/// slot (as `timelimit` 1e20 once did) would leave no slot for the good job after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_messages_are_dead_lettered_with_their_reason() {
    let runs = mediafarm_tests::fixtures::cases("messages")
        .into_iter()
        .map(|case| async move {
            let label = case.file_name().trim_end_matches(".json").to_owned();
            let raw = mediafarm_tests::fixtures::message(&case.path, &new_id(&label));
            let mut s = settings();
            s.worker_concurrency = 1;
            let words: Vec<&str> = case.words.iter().map(String::as_str).collect();
            // Bounded, so a stuck case fails naming its fixture instead of hanging the run; past
            // the bounds of `Farm::stop`'s steps, so a stuck stop names its step instead.
            let run =
                bad_message_saying(&label, s, raw.props, &raw.body, raw.id.as_deref(), &words);
            let Ok(stored) = tokio::time::timeout(Duration::from_secs(240), run).await else {
                return Some(format!("{}: did not end within 240 s", case.name));
            };
            let exc = stored.map(|e| e.exc_type.into_owned());
            (exc != case.exc_type)
                .then(|| format!("{}: {exc:?}, not {:?}", case.name, case.exc_type))
        });
    let wrong: Vec<String> = futures_util::future::join_all(runs)
        .await
        .into_iter()
        .flatten()
        .collect();
    assert!(
        wrong.is_empty(),
        "exc_type differs from fixtures/README.md: {wrong:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_while_reading_the_kwargs_is_a_failure_and_a_dead_letter() {
    // A task whose argument type panics while it is deserialised: the panic happens on the
    // message's path before the task runs, and still ends in FAILURE + dead letter.
    #[derive(serde::Serialize)]
    struct Never;
    impl<'de> serde::Deserialize<'de> for Never {
        fn deserialize<D: serde::Deserializer<'de>>(_: D) -> Result<Never, D::Error> {
            panic!("arguments nobody can read")
        }
    }
    struct Fragile;
    impl mediafarm::Task for Fragile {
        const NAME: &'static str = "echo.fragile";
        type Args = Never;
        type Output = Never;
        async fn run(&self, _: mediafarm::TaskContext, a: Never) -> Result<Never, TaskError> {
            Ok(a)
        }
    }
    let farm = Farm::start("panic", settings(), echo_registry().register(Fragile)).await;
    let r = farm
        .client
        .send_task("echo.fragile", kwargs(json!({})), &to(&farm.queue))
        .await
        .unwrap();
    let e = failed(r.get(WAIT).await);
    assert!(
        e.message.contains("arguments nobody can read"),
        "{}",
        e.message
    );
    let letters = dead_letters(&farm.settings, &farm.queue, 1).await;
    assert_eq!(letters[0].id.as_deref(), Some(r.id.as_str()));
    still_consuming(&farm).await;
    let (s, q) = (farm.settings.clone(), farm.queue.clone());
    farm.stop().await;
    delete_dead(&s, &q).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_message_is_dead_lettered() {
    let mut s = settings();
    s.task_message_max_bytes = 4096;
    let id = new_id("big");
    let props = celery_props(&id, "echo.echo");
    let body = format!("[[], {{\"pad\": \"{}\"}}, {{}}]", "x".repeat(5000));
    let reason = "task_message_max_bytes";
    bad_message("big", s, props, body.as_bytes(), Some(&id), reason).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_job_is_revoked_and_dead_lettered() {
    let farm = Farm::start("expired", settings(), echo_registry()).await;
    let opts = SendOptions {
        countdown: Some(1.0),
        expires: Some(0.5),
        ..to(&farm.queue)
    };
    let r = farm
        .client
        .send_task("echo.echo", kwargs(json!({"late": 1})), &opts)
        .await
        .unwrap();
    let err = failed(r.get(WAIT).await);
    assert_eq!(err.exc_type, "TaskRevokedError");
    assert_eq!(r.state().await.unwrap(), TaskState::Revoked);
    let letters = dead_letters(&farm.settings, &farm.queue, 1).await;
    assert_eq!(letters[0].kind.as_deref(), Some("Expired"));
    assert!(letters[0].reason.as_deref().unwrap().contains("expired at"));
    still_consuming(&farm).await;
    let (s, q) = (farm.settings.clone(), farm.queue.clone());
    farm.stop().await;
    delete_dead(&s, &q).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn countdown_waits_in_rabbitmq_and_survives_the_worker() {
    let farm = Farm::start("countdown", settings(), echo_registry()).await;
    let (s, q) = (farm.settings.clone(), farm.queue.clone());
    let opts = SendOptions {
        countdown: Some(3.0),
        ..to(&q)
    };
    let sent = chrono::Utc::now();
    let r = farm
        .client
        .send_task("echo.echo", kwargs(json!({"c": 1})), &opts)
        .await
        .unwrap();
    // The worker hands the job to a delay queue at once and holds nothing.
    tokio::time::sleep(Duration::from_millis(500)).await;
    farm.worker.shutdown().await;
    assert_eq!(ready_count(&s, &q).await, 0);
    assert_eq!(r.state().await.unwrap(), TaskState::Pending);

    let farm = Farm::start_on(q, s, echo_registry()).await;
    assert_eq!(r.get(WAIT).await.unwrap(), json!({"c": 1}));
    let meta = r.meta().await.unwrap().unwrap();
    let done = mediafarm::protocol::parse_time(meta.date_done.as_deref().unwrap()).unwrap();
    assert!(
        done >= sent + chrono::Duration::milliseconds(3000),
        "ran before its ETA: sent {sent}, done {done}"
    );
    assert!(
        done < sent + chrono::Duration::seconds(10),
        "ran late: {done}"
    );
    farm.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_failures_retry_with_backoff_until_they_succeed() {
    let mut s = settings();
    s.task_default_retry_delay = Duration::from_millis(300);
    s.result_extended = true;
    let farm = Farm::start("retry", s, echo_registry()).await;
    let started = Instant::now();
    let r = farm
        .client
        .send_task(
            "echo.echo",
            kwargs(json!({"fail_times": 3})),
            &to(&farm.queue),
        )
        .await
        .unwrap();
    assert_eq!(r.get(WAIT).await.unwrap(), json!({"fail_times": 3}));
    let meta = r.meta().await.unwrap().unwrap();
    assert_eq!(meta.extra["retries"], 3, "{meta:?}");
    // Backoff 0.3 s, 0.6 s, 1.2 s, each jittered over its upper half: at least 1.05 s.
    assert!(
        started.elapsed() >= Duration::from_millis(1050),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(ready_count(&farm.settings, &farm.queue).await, 0);
    farm.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_run_out_into_failure_and_a_dead_letter_that_can_be_replayed() {
    let mut s = settings();
    s.task_max_retries = 2;
    s.task_default_retry_delay = Duration::from_millis(200);
    let farm = Farm::start("giveup", s, echo_registry()).await;
    let (s, q) = (farm.settings.clone(), farm.queue.clone());
    let r = farm
        .client
        .send_task(
            "echo.echo",
            kwargs(json!({"fail_times": 10, "retry_after_s": 0.2})),
            &to(&q),
        )
        .await
        .unwrap();
    let err = failed(r.get(WAIT).await);
    assert_eq!(err.exc_type, "EchoTransient");
    assert!(
        err.message.contains("gave up after 2 retries"),
        "{}",
        err.message
    );
    let letters = dead_letters(&s, &q, 1).await;
    assert_eq!(letters[0].kind.as_deref(), Some("MaxRetriesExceeded"));
    assert_eq!(letters[0].id.as_deref(), Some(r.id.as_str()));

    // A permanent failure whose cause is then fixed: replaying it by id runs it again.
    let key = format!("t-replay-{}", uuid::Uuid::new_v4());
    let fixable = farm
        .client
        .send_task("echo.echo", kwargs(json!({"require_key": key})), &to(&q))
        .await
        .unwrap();
    assert_eq!(failed(fixable.get(WAIT).await).exc_type, "MissingKey");
    dead_letters(&s, &q, 2).await;
    let mut conn = farm.client.backend().connection();
    let _: () = redis::cmd("SET")
        .arg(&key)
        .arg(1)
        .arg("EX")
        .arg(60)
        .query_async(&mut conn)
        .await
        .unwrap();
    let replayed = dead_letters::replay(&s, farm.client.backend(), &q, Some(&fixable.id))
        .await
        .unwrap();
    assert_eq!(replayed, 1);
    let end = Instant::now() + WAIT;
    while fixable.state().await.unwrap() != TaskState::Success {
        assert!(Instant::now() < end, "replayed job did not succeed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The other letter stays.
    let left = dead_letters(&s, &q, 1).await;
    assert_eq!(left[0].id.as_deref(), Some(r.id.as_str()));
    farm.stop().await;
    delete_dead(&s, &q).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hard_limit_frees_the_slot_even_from_cpu_bound_work() {
    let mut s = settings();
    s.worker_concurrency = 1;
    let farm = Farm::start("cpuhard", s, echo_registry()).await;
    let (s, q) = (farm.settings.clone(), farm.queue.clone());
    let hard = SendOptions {
        time_limit: Some(1.0),
        ..to(&q)
    };
    // Spins for 6 s without ever looking at its stop signal.
    let stuck = farm
        .client
        .send_task("echo.echo", kwargs(json!({"spin_ms": 6000})), &hard)
        .await
        .unwrap();
    let started = Instant::now();
    let err = failed(stuck.get(WAIT).await);
    assert_eq!(err.exc_type, "TimeLimitExceeded");
    // With one slot, the next job runs while the abandoned spin is still going.
    let next = farm
        .client
        .send_task("echo.echo", kwargs(json!({"n": 2})), &to(&q))
        .await
        .unwrap();
    assert_eq!(next.get(WAIT).await.unwrap(), json!({"n": 2}));
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the slot was not freed at the hard limit"
    );
    let letters = dead_letters(&s, &q, 1).await;
    assert_eq!(letters[0].kind.as_deref(), Some("TimeLimitExceeded"));
    farm.stop().await;
    delete_dead(&s, &q).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soft_limit_tells_the_job_which_can_clean_up() {
    let farm = Farm::start("soft", settings(), echo_registry()).await;
    let q = farm.queue.clone();
    let limits = SendOptions {
        time_limit: Some(20.0),
        soft_time_limit: Some(0.5),
        ..to(&q)
    };
    // Async work notices the soft limit and returns what it has.
    let r = farm
        .client
        .send_task(
            "echo.echo",
            kwargs(json!({"sleep_ms": 15000, "until_soft": true})),
            &limits,
        )
        .await
        .unwrap();
    let started = Instant::now();
    assert_eq!(r.get(WAIT).await.unwrap()["stopped_at_soft_limit"], true);
    assert!(started.elapsed() < Duration::from_secs(10));
    // CPU work checks its stop signal and ends early too.
    let r = farm
        .client
        .send_task(
            "echo.echo",
            kwargs(json!({"spin_ms": 15000, "cooperative": true})),
            &limits,
        )
        .await
        .unwrap();
    let started = Instant::now();
    assert_eq!(failed(r.get(WAIT).await).exc_type, "SoftTimeLimitExceeded");
    assert!(started.elapsed() < Duration::from_secs(10));
    let s = farm.settings.clone();
    farm.stop().await;
    delete_dead(&s, &q).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoke_skips_waiting_jobs_and_terminates_running_ones() {
    let farm = Farm::start("revoke", settings(), echo_registry()).await;
    let (s, q) = (farm.settings.clone(), farm.queue.clone());
    let backend = farm.client.backend().clone();
    // Waiting for its countdown in a delay queue when revoked.
    let later = farm
        .client
        .send_task(
            "echo.echo",
            kwargs(json!({"x": 1})),
            &SendOptions {
                countdown: Some(2.0),
                ..to(&q)
            },
        )
        .await
        .unwrap();
    mediafarm::amqp::pidbox::broadcast(&s, &backend, std::slice::from_ref(&later.id), false)
        .await
        .unwrap();
    assert_eq!(failed(later.get(WAIT).await).exc_type, "TaskRevokedError");
    assert_eq!(later.state().await.unwrap(), TaskState::Revoked);

    // Running for 60 s when revoked with terminate.
    let long = farm
        .client
        .send_task("echo.echo", kwargs(json!({"sleep_ms": 60000})), &to(&q))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let started = Instant::now();
    mediafarm::amqp::pidbox::broadcast(&s, &backend, std::slice::from_ref(&long.id), true)
        .await
        .unwrap();
    let err = failed(long.get(WAIT).await);
    assert_eq!(err.exc_type, "TaskRevokedError");
    assert!(err.message.contains("terminated"), "{}", err.message);
    assert!(started.elapsed() < Duration::from_secs(10));
    still_consuming(&farm).await;
    farm.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_control_revoke_reaches_the_worker() {
    let farm = Farm::start("pyrevoke", settings(), echo_registry()).await;
    let q = farm.queue.clone();
    let long = farm
        .client
        .send_task("echo.echo", kwargs(json!({"sleep_ms": 60000})), &to(&q))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let out = run_python(
        "control.py",
        &["revoke", &long.id, "--terminate"],
        &python_env(&farm.settings),
    );
    assert!(out.contains("sent"), "{out}");
    let err = failed(long.get(WAIT).await);
    assert_eq!(err.exc_type, "TaskRevokedError");

    // A plain revoke (no terminate) of a job that has not arrived yet.
    let id = uuid::Uuid::new_v4().to_string();
    run_python("control.py", &["revoke", &id], &python_env(&farm.settings));
    let opts = SendOptions {
        task_id: Some(id.clone()),
        ..to(&q)
    };
    let r = farm
        .client
        .send_task("echo.echo", kwargs(json!({"y": 1})), &opts)
        .await
        .unwrap();
    assert_eq!(failed(r.get(WAIT).await).exc_type, "TaskRevokedError");
    farm.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn once_claims_a_side_effect_for_one_attempt_only() {
    let s = settings();
    let backend = mediafarm::ResultBackend::connect(&s.result_backend, None)
        .await
        .unwrap();
    let key = format!("t-once-{}", uuid::Uuid::new_v4());
    let lease = Duration::from_secs(30);
    let Claim::Run(guard) = mediafarm::backend::once::claim(&backend, &key, lease)
        .await
        .unwrap()
    else {
        panic!("the first claim runs");
    };
    assert!(matches!(
        mediafarm::backend::once::claim(&backend, &key, lease)
            .await
            .unwrap(),
        Claim::Busy { .. }
    ));
    // Released (the effect did not happen): the next attempt may claim it.
    guard.release().await.unwrap();
    let Claim::Run(guard) = mediafarm::backend::once::claim(&backend, &key, lease)
        .await
        .unwrap()
    else {
        panic!("claimable after release");
    };
    assert!(guard.complete(&json!({"message_id": "m-1"})).await.unwrap());
    match mediafarm::backend::once::claim(&backend, &key, lease)
        .await
        .unwrap()
    {
        Claim::Done(v) => assert_eq!(v, json!({"message_id": "m-1"})),
        other => panic!("expected Done, got {other:?}"),
    }
    // A lease that runs out (its holder died) can be claimed again.
    let key2 = format!("{key}-lease");
    let short = Duration::from_millis(200);
    assert!(matches!(
        mediafarm::backend::once::claim(&backend, &key2, short)
            .await
            .unwrap(),
        Claim::Run(_)
    ));
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(matches!(
        mediafarm::backend::once::claim(&backend, &key2, short)
            .await
            .unwrap(),
        Claim::Run(_)
    ));
}

/// A task with its own limits: sleeps `ms`, stopping at its soft limit if `until_soft`.
struct Limited;

impl mediafarm::Task for Limited {
    const NAME: &'static str = "limited.sleep";
    const TIME_LIMIT: Option<f64> = Some(1.0);
    const SOFT_TIME_LIMIT: Option<f64> = Some(0.3);
    const MAX_RETRIES: Option<u32> = Some(0);
    type Args = Map<String, Value>;
    type Output = Value;

    async fn run(&self, ctx: mediafarm::TaskContext, args: Self::Args) -> Result<Value, TaskError> {
        let ms = args.get("ms").and_then(Value::as_u64).unwrap_or(0);
        if args.get("transient").is_some() {
            return Err(TaskError::transient("Flaky", "not now"));
        }
        let soft_seen = tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(ms)) => false,
            _ = ctx.soft_time_limit_reached(), if args.get("until_soft").is_some() => true,
        };
        Ok(json!({"soft_seen": soft_seen}))
    }
}

/// A task whose own hard limit is past RabbitMQ's delivery-ack timeout.
struct TooLong;

impl mediafarm::Task for TooLong {
    const NAME: &'static str = "limited.too_long";
    const TIME_LIMIT: Option<f64> = Some(7200.0);
    type Args = Map<String, Value>;
    type Output = ();

    async fn run(&self, _: mediafarm::TaskContext, _: Self::Args) -> Result<(), TaskError> {
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tasks_own_limits_and_retry_count_apply_and_must_fit_the_ack_timeout() {
    let registry = mediafarm::Registry::new().register(Limited);
    let farm = Farm::start("limited", settings(), registry).await;
    let (s, q) = (farm.settings.clone(), farm.queue.clone());
    let send = |kw: Value| {
        let client = farm.client.clone();
        let q = q.clone();
        async move {
            client
                .send_task("limited.sleep", kwargs(kw), &to(&q))
                .await
                .unwrap()
        }
    };
    let r = send(json!({"ms": 5000})).await;
    assert_eq!(failed(r.get(WAIT).await).exc_type, "TimeLimitExceeded");
    let r = send(json!({"ms": 5000, "until_soft": true})).await;
    assert_eq!(r.get(WAIT).await.unwrap(), json!({"soft_seen": true}));
    // MAX_RETRIES = 0: a transient failure is final at once.
    let r = send(json!({"transient": true})).await;
    let err = failed(r.get(WAIT).await);
    assert!(
        err.message.contains("gave up after 0 retries"),
        "{}",
        err.message
    );
    farm.stop().await;
    delete_dead(&s, &q).await;

    let refused = mediafarm::Worker::new(
        settings(),
        mediafarm::Registry::new().register(TooLong),
        vec!["t-never-consumed".into()],
    )
    .start()
    .await;
    let err = refused.err().expect("start-up is refused").to_string();
    assert!(
        err.contains("limited.too_long") && err.contains("broker_consumer_timeout"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_resumes_after_its_queue_is_deleted_under_it() {
    // RabbitMQ cancels the consumer when its queue goes (deleted, or lost with a node); the
    // worker re-connects, re-declares the queue and consumes again.
    let farm = Farm::start("cancelled", settings(), echo_registry()).await;
    let (s, q) = (farm.settings.clone(), farm.queue.clone());
    still_consuming(&farm).await;
    mediafarm_tests::delete_queue(&s, &q).await;
    // The worker re-declares the queue itself: wait for it to exist again, without declaring it.
    let end = Instant::now() + WAIT;
    loop {
        let conn = mediafarm::amqp::broker::connect(&s, "test passive")
            .await
            .unwrap();
        let ch = conn.create_channel().await.unwrap();
        let exists = ch
            .queue_declare(
                q.as_str().into(),
                lapin::options::QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                Default::default(),
            )
            .await
            .is_ok();
        mediafarm::amqp::broker::close_quietly(&conn, &[&ch], "done").await;
        if exists {
            break;
        }
        assert!(
            Instant::now() < end,
            "the worker did not re-declare its queue"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    still_consuming(&farm).await;
    farm.stop().await;
}

//! TLS end to end, with a CA the test makes (openssl): a `redis-server` the test starts with
//! only a TLS port, and a TLS listener the test opens at runtime on the machine's RabbitMQ
//! (`rabbit_networking:start_ssl_listener`, closed again when the test ends; the broker's
//! configuration files and its plain listener are not touched). Real jobs run through a
//! worker over `rediss://` and `amqps://`, with client certificates where the server asks
//! for them, from Rust and from Python Celery; a wrong CA and a missing client certificate
//! fail with errors that say what to set.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use mediafarm::settings::{BrokerSsl, CertReqs, RedisBackendSsl, TlsOptions};
use mediafarm::{ResultBackend, Settings, Worker};
use mediafarm_tests::certs::{test_pki, TestPki};
use mediafarm_tests::process::{wait_port, Proc};
use mediafarm_tests::{
    echo_registry, free_port, kwargs, run_python, settings, temp_dir, to, unique_queue, Farm,
};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(20);

/// A `redis-server` with a TLS port only (plain port 0), killed when dropped.
struct TlsRedis {
    port: u16,
    _proc: Proc,
}

impl TlsRedis {
    /// `auth_clients`: the server asks every client for a certificate signed by the CA.
    fn start(pki: &TestPki, dir: &Path, auth_clients: bool) -> TlsRedis {
        let port = free_port();
        let path = |p: &PathBuf| p.display().to_string();
        let proc = Proc::spawn(
            Command::new("redis-server")
                .args(["--port", "0", "--bind", "127.0.0.1", "--save", ""])
                .args(["--appendonly", "no", "--tls-port", &port.to_string()])
                .args(["--tls-cert-file", &path(&pki.server_cert)])
                .args(["--tls-key-file", &path(&pki.server_key)])
                .args(["--tls-ca-cert-file", &path(&pki.ca)])
                .args([
                    "--tls-auth-clients",
                    if auth_clients { "yes" } else { "no" },
                ])
                .arg("--dir")
                .arg(dir)
                .stdout(Stdio::null()),
        );
        wait_port(port);
        TlsRedis { port, _proc: proc }
    }

    fn url(&self, query: &str) -> String {
        format!("rediss://127.0.0.1:{}/0{query}", self.port)
    }
}

/// A TLS listener opened at runtime on the machine's RabbitMQ, closed when dropped. The
/// server asks for a client certificate and refuses a connection without one.
struct RabbitTls {
    port: u16,
}

fn rabbitmqctl_eval(expr: &str) -> String {
    let out = Command::new("rabbitmqctl")
        .args(["eval", expr])
        .stdin(Stdio::null())
        .output()
        .expect("rabbitmqctl runs (RabbitMQ is installed by scripts/setup.sh)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "rabbitmqctl eval {expr}: {text}");
    text
}

impl RabbitTls {
    fn open(pki: &TestPki) -> RabbitTls {
        let port = free_port();
        let path = |p: &PathBuf| p.display().to_string();
        let said = rabbitmqctl_eval(&format!(
            "rabbit_networking:start_ssl_listener({{\"127.0.0.1\", {port}}}, \
             [{{certfile, \"{}\"}}, {{keyfile, \"{}\"}}, {{cacertfile, \"{}\"}}, \
             {{verify, verify_peer}}, {{fail_if_no_peer_cert, true}}], 1).",
            path(&pki.server_cert),
            path(&pki.server_key),
            path(&pki.ca)
        ));
        assert_eq!(
            said.trim(),
            "ok",
            "RabbitMQ did not open a TLS listener: {said}"
        );
        wait_port(port);
        RabbitTls { port }
    }

    fn url(&self) -> String {
        format!("amqps://guest:guest@127.0.0.1:{}//", self.port)
    }
}

impl Drop for RabbitTls {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl")
            .args([
                "eval",
                &format!(
                    "rabbit_networking:stop_tcp_listener({{\"127.0.0.1\", {}}}).",
                    self.port
                ),
            ])
            .stdin(Stdio::null())
            .output();
    }
}

fn options(ca: &Path, client: Option<&TestPki>) -> TlsOptions {
    TlsOptions {
        ca_certs: Some(ca.to_owned()),
        certfile: client.map(|p| p.client_cert.clone()),
        keyfile: client.map(|p| p.client_key.clone()),
        cert_reqs: CertReqs::Required,
    }
}

/// Runs one echo job through a worker with `s` and checks its result.
async fn one_job(s: Settings, prefix: &str) {
    let farm = Farm::start(prefix, s, echo_registry()).await;
    let r = farm
        .client
        .send_task(
            "echo.echo",
            kwargs(json!({"over": "tls"})),
            &to(&farm.queue),
        )
        .await
        .expect("published");
    assert_eq!(r.get(WAIT).await.expect("result"), json!({"over": "tls"}));
    farm.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_stores_its_result_over_rediss_and_a_wrong_ca_is_named() {
    let dir = temp_dir("tls-redis");
    let pki = test_pki(&dir.join("pki"));
    let other = test_pki(&dir.join("other"));
    let redis = TlsRedis::start(&pki, &dir, false);

    // Celery's URL form: the CA and the verification in the query.
    let mut s = settings();
    s.result_backend = redis.url(&format!(
        "?ssl_cert_reqs=CERT_REQUIRED&ssl_ca_certs={}",
        pki.ca.display()
    ));
    one_job(s.clone(), "tls-redis").await;

    // The record is in the TLS Redis: read it back through the setting form.
    let backend = ResultBackend::connect_with(
        &redis.url(""),
        Some(&RedisBackendSsl(options(&pki.ca, None))),
        None,
    )
    .await
    .expect("redis_backend_use_ssl connects");
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("celery-task-meta-*")
        .query_async(&mut backend.connection())
        .await
        .unwrap();
    assert_eq!(keys.len(), 1, "{keys:?}");

    // A CA that did not sign the server's certificate.
    let wrong = redis.url(&format!("?ssl_ca_certs={}", other.ca.display()));
    let err = ResultBackend::connect(&wrong, None)
        .await
        .err()
        .expect("a wrong CA is refused")
        .to_string();
    assert!(
        err.contains("UnknownIssuer") && err.contains("ssl_ca_certs"),
        "{err}"
    );
    // The worker stops at start-up with the same words.
    let mut bad = settings();
    bad.result_backend = wrong.clone();
    let err = Worker::new(bad, echo_registry(), vec![unique_queue("tls-redis-bad")])
        .start()
        .await
        .err()
        .expect("the worker refuses to start")
        .to_string();
    assert!(err.contains("UnknownIssuer"), "{err}");
    // CERT_NONE takes any certificate (and logs a warning).
    let insecure = redis.url(&format!(
        "?ssl_cert_reqs=CERT_NONE&ssl_ca_certs={}",
        other.ca.display()
    ));
    let backend = ResultBackend::connect(&insecure, None)
        .await
        .expect("CERT_NONE connects whatever the CA");
    backend.ping().await.unwrap();
    // A missing CA file is named before anything connects.
    let missing = redis.url(&format!("?ssl_ca_certs={}", dir.join("nope.pem").display()));
    let err = ResultBackend::connect(&missing, None)
        .await
        .err()
        .expect("a missing CA file is refused")
        .to_string();
    assert!(
        err.contains("ssl_ca_certs: cannot read") && err.contains("nope.pem"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_with_client_certificates_when_redis_asks_for_them() {
    let dir = temp_dir("tls-redis-auth");
    let pki = test_pki(&dir.join("pki"));
    let redis = TlsRedis::start(&pki, &dir, true);

    // No client certificate: Redis ends the handshake.
    let without = ResultBackend::connect_with(
        &redis.url(""),
        Some(&RedisBackendSsl(options(&pki.ca, None))),
        None,
    )
    .await;
    let err = match without {
        Ok(backend) => backend.ping().await.err().map(|e| e.to_string()),
        Err(e) => Some(e.to_string()),
    }
    .expect("Redis refuses a client without a certificate");
    assert!(!err.is_empty());

    let mut s = settings();
    s.result_backend = redis.url("");
    s.redis_backend_use_ssl = Some(RedisBackendSsl(options(&pki.ca, Some(&pki))));
    one_job(s, "tls-redis-auth").await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_runs_over_amqps_with_a_client_certificate_and_a_wrong_ca_is_named() {
    let dir = temp_dir("tls-amqp");
    let pki = test_pki(&dir.join("pki"));
    let other = test_pki(&dir.join("other"));
    let listener = RabbitTls::open(&pki);

    let mut s = settings();
    s.broker_url = listener.url();
    s.broker_use_ssl = Some(BrokerSsl(options(&pki.ca, Some(&pki))));
    let farm = Farm::start("tls-amqp", s.clone(), echo_registry()).await;
    let r = farm
        .client
        .send_task(
            "echo.echo",
            kwargs(json!({"over": "amqps"})),
            &to(&farm.queue),
        )
        .await
        .expect("published over amqps");
    assert_eq!(r.get(WAIT).await.unwrap(), json!({"over": "amqps"}));
    // Pidbox over the same TLS listener: the worker answers a ping.
    let node = format!("test@{}", farm.queue);
    let replies = mediafarm::amqp::pidbox::mailbox::call(
        &s,
        "ping",
        json!({}),
        Some(std::slice::from_ref(&node)),
        Duration::from_secs(5),
    )
    .await
    .expect("ping over amqps");
    assert_eq!(replies.len(), 1, "{replies:?}");
    farm.stop().await;

    // broker_use_ssl on an amqp:// URL turns TLS on, as kombu does.
    let mut kombu_style = s.clone();
    kombu_style.broker_url = format!("amqp://guest:guest@127.0.0.1:{}//", listener.port);
    let conn = mediafarm::amqp::broker::connect(&kombu_style, "test tls")
        .await
        .expect("amqp:// with broker_use_ssl speaks TLS");
    mediafarm::amqp::broker::close_quietly(&conn, &[], "done").await;

    // A CA that did not sign the broker's certificate.
    let mut wrong = s.clone();
    wrong.broker_use_ssl = Some(BrokerSsl(options(&other.ca, Some(&pki))));
    let err = mediafarm::amqp::broker::connect(&wrong, "test tls")
        .await
        .expect_err("a wrong CA is refused")
        .to_string();
    assert!(
        err.contains("UnknownIssuer") && err.contains("broker_use_ssl ca_certs"),
        "{err}"
    );
    // No client certificate: RabbitMQ (fail_if_no_peer_cert) refuses the connection.
    let mut anonymous = s.clone();
    anonymous.broker_use_ssl = Some(BrokerSsl(options(&pki.ca, None)));
    assert!(
        mediafarm::amqp::broker::connect(&anonymous, "test tls")
            .await
            .is_err(),
        "RabbitMQ asks for a client certificate"
    );
    // A missing key file stops a worker at start-up, naming the file.
    let mut missing = s.clone();
    missing.broker_use_ssl = Some(BrokerSsl(TlsOptions {
        keyfile: Some(dir.join("nope.key")),
        ..options(&pki.ca, Some(&pki))
    }));
    let err = Worker::new(missing, echo_registry(), vec![unique_queue("tls-amqp-bad")])
        .start()
        .await
        .err()
        .expect("the worker refuses to start")
        .to_string();
    assert!(
        err.contains("broker_use_ssl keyfile: cannot read") && err.contains("nope.key"),
        "{err}"
    );
    drop(listener);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_celery_sends_over_amqps_and_reads_over_rediss() {
    let dir = temp_dir("tls-python");
    let pki = test_pki(&dir.join("pki"));
    let listener = RabbitTls::open(&pki);
    let redis = TlsRedis::start(&pki, &dir, true);

    let mut s = settings();
    s.broker_url = listener.url();
    s.broker_use_ssl = Some(BrokerSsl(options(&pki.ca, Some(&pki))));
    s.result_backend = redis.url("?ssl_cert_reqs=required");
    s.redis_backend_use_ssl = Some(RedisBackendSsl(options(&pki.ca, Some(&pki))));
    let farm = Farm::start("tls-python", s.clone(), echo_registry()).await;

    let path = |p: &PathBuf| p.display().to_string();
    let backend = redis.url(&format!(
        "?ssl_cert_reqs=required&ssl_ca_certs={}&ssl_certfile={}&ssl_keyfile={}",
        path(&pki.ca),
        path(&pki.client_cert),
        path(&pki.client_key)
    ));
    let out = run_python(
        "tls_producer.py",
        &[&farm.queue],
        &[
            ("BROKER_URL", listener.url()),
            ("RESULT_BACKEND", backend),
            ("TLS_CA", path(&pki.ca)),
            ("TLS_CERT", path(&pki.client_cert)),
            ("TLS_KEY", path(&pki.client_key)),
        ],
    );
    let seen: serde_json::Value = serde_json::from_str(out.trim()).expect("one JSON line");
    assert_eq!(
        seen,
        json!({"ok": {"from": "python", "over": "tls"}, "state": "SUCCESS"})
    );
    farm.stop().await;
    drop(listener);
    let _ = std::fs::remove_dir_all(&dir);
}

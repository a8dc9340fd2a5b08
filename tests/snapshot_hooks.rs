//! `snapshot-hooks` end to end: the real binary on the real RabbitMQ and Redis. nginx with the
//! RTMP module calls it on `on_publish` / `on_publish_done` while FFmpeg publishes, and the
//! real snapshot-worker runs the session it starts until the publisher stops; SRS's documented
//! `http_hooks` payloads are posted to it as SRS sends them. Also: a wrong or missing token is
//! refused with nothing started, a repeated publish starts one session, an unwatched
//! application starts none, malformed and oversized hooks get 400 / 413.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use mediafarm::{Client, Settings};
use mediafarm_tests::media::{nginx_rtmp_with, rtmp_publisher};
use mediafarm_tests::process::{wait_port, Proc};
use mediafarm_tests::{delete_queue, free_port, ready_count, unique_queue};
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(120);
const TOKEN: &str = "test-hooks-token-0123456789";

/// One test's world: a queue, a directory, the settings every process gets.
struct World {
    settings: Settings,
    queue: String,
    dir: PathBuf,
    client: Client,
    env: Vec<(String, String)>,
    procs: Vec<Proc>,
}

impl World {
    async fn new(label: &str) -> World {
        let settings = mediafarm_tests::settings();
        let queue = unique_queue(label);
        let dir = mediafarm_tests::temp_dir(&format!("hooks-{label}"));
        std::fs::create_dir_all(dir.join("storage")).unwrap();
        let env = [
            ("MEDIAFARM_BROKER_URL", settings.broker_url.clone()),
            ("MEDIAFARM_RESULT_BACKEND", settings.result_backend.clone()),
            (
                "MEDIAFARM_STORAGE_URL",
                format!("file://{}", dir.join("storage").display()),
            ),
            ("MEDIAFARM_SOURCE_ALLOWED_HOSTS", "127.0.0.1".into()),
            ("MEDIAFARM_SOURCE_ALLOW_PRIVATE", "true".into()),
            ("MEDIAFARM_WORKER_SHUTDOWN_GRACE", "5".into()),
            ("MEDIAFARM_HOOKS_TOKEN", TOKEN.into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        let client = Client::connect(&settings).await.expect("client connects");
        World {
            settings,
            queue,
            dir,
            client,
            env,
            procs: Vec::new(),
        }
    }

    /// Starts snapshot-hooks on `port` with `apps` as its policy.
    fn start_hooks(&mut self, port: u16, apps: Value) {
        self.start_hooks_with(port, apps, &[]);
    }

    /// [`World::start_hooks`] with more environment variables.
    fn start_hooks_with(&mut self, port: u16, apps: Value, extra: &[(&str, &str)]) {
        let log = std::fs::File::create(self.dir.join(format!("hooks-{port}.log"))).unwrap();
        let proc = Proc::spawn(
            Command::new(mediafarm_tests::package_binary(
                "snapshot-worker",
                "snapshot-hooks",
            ))
            .args(["--addr", &format!("127.0.0.1:{port}"), "-l", "info"])
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .envs(extra.iter().copied())
            .env("MEDIAFARM_HOOKS_APPS", apps.to_string())
            .env("NO_COLOR", "1")
            .stdout(log.try_clone().unwrap())
            .stderr(log),
        );
        wait_port(port);
        self.procs.push(proc);
    }

    /// Starts snapshot-worker on the test's queue; waits until it consumes.
    fn start_worker(&mut self) {
        let log = self.dir.join("worker.log");
        let out = std::fs::File::create(&log).unwrap();
        let proc = Proc::spawn(
            Command::new(mediafarm_tests::worker_binary("snapshot-worker"))
                .args(["-Q", &self.queue, "-n", &format!("a@{}", self.queue)])
                .args(["--metrics-addr", "127.0.0.1:0", "-c", "4", "-l", "info"])
                .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
                // Other tests' streams' outboxes (shared Redis) are theirs to send.
                .env("MEDIAFARM_SNAPSHOT_OUTBOX_SWEEP", "0")
                .env("NO_COLOR", "1")
                .stdout(out.try_clone().unwrap())
                .stderr(out),
        );
        for _ in 0..600 {
            if std::fs::read_to_string(&log)
                .unwrap_or_default()
                .contains("consuming")
            {
                self.procs.push(proc);
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "the worker did not start: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }

    async fn get(&self, key: &str) -> Option<String> {
        let mut conn = self.client.backend().connection();
        redis::cmd("GET")
            .arg(key)
            .query_async(&mut conn)
            .await
            .unwrap()
    }

    async fn forget(&self, stream_id: &str) {
        let mut conn = self.client.backend().connection();
        for prefix in [
            "mediafarm-snapshot-stop-",
            "mediafarm-snapshot-hook-",
            "mediafarm-snapshot-owner-",
            "mediafarm-snapshot-session-",
        ] {
            redis::cmd("DEL")
                .arg(format!("{prefix}{stream_id}"))
                .query_async::<()>(&mut conn)
                .await
                .unwrap();
        }
    }

    async fn stop(mut self) {
        self.procs.clear();
        delete_queue(&self.settings, &self.queue).await;
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// POSTs `body` to the endpoint; returns the status and the body.
fn post(port: u16, path: &str, content_type: &str, body: &[u8]) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status in {out:?}"));
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

fn srs(port: u16, token: &str, body: &Value) -> (u16, String) {
    post(
        port,
        &format!("/srs?token={token}"),
        "application/json",
        body.to_string().as_bytes(),
    )
}

fn short_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..10].to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_rtmp_publish_starts_a_session_and_its_end_stops_it() {
    let mut w = World::new("hooks-rtmp").await;
    let name = format!("room-{}", short_id());
    let stream_id = format!("live.{name}");
    // nginx calls the hooks on a port chosen now; the policy names nginx's port.
    let hooks_port = free_port();
    let (_nginx, port) = nginx_rtmp_with(
        &w.dir.join("nginx"),
        // nginx-rtmp's default: a player (the session) that comes before the publisher's
        // first packets waits for them.
        &format!(
            "idle_streams on; \
             on_publish http://127.0.0.1:{hooks_port}/nginx-rtmp?token={TOKEN}; \
             on_publish_done http://127.0.0.1:{hooks_port}/nginx-rtmp?token={TOKEN};"
        ),
    );
    w.start_hooks(
        hooks_port,
        json!({"live": {
            "stream_url": format!("rtmp://127.0.0.1:{port}/{{app}}/{{name}}"),
            "key": "h/{stream_id}/{seq}.jpg",
            "interval_s": 1,
            "queue": w.queue,
        }}),
    );
    w.start_worker();

    // A hook with a wrong or no token is refused, and starts nothing.
    let form = format!("call=publish&addr=127.0.0.1&clientid=1&app=live&name={name}&tcurl=rtmp%3A%2F%2F127.0.0.1%2Flive");
    let (status, _) = post(
        hooks_port,
        "/nginx-rtmp?token=wrong-token-0123456789",
        "application/x-www-form-urlencoded",
        form.as_bytes(),
    );
    assert_eq!(status, 403);
    let (status, _) = post(
        hooks_port,
        "/nginx-rtmp",
        "application/x-www-form-urlencoded",
        form.as_bytes(),
    );
    assert_eq!(status, 403);
    assert_eq!(
        w.get(&format!("mediafarm-snapshot-hook-{stream_id}")).await,
        None
    );

    // FFmpeg publishes: nginx calls on_publish, and a session starts.
    let url = format!("rtmp://127.0.0.1:{port}/live/{name}");
    let publisher = rtmp_publisher(&url);
    let owner_key = format!("mediafarm-snapshot-owner-{stream_id}");
    let mut session = None;
    for _ in 0..600 {
        session = w.get(&owner_key).await;
        if session.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let session = session.unwrap_or_else(|| {
        panic!(
            "no session claimed {stream_id}; hooks log:\n{}",
            std::fs::read_to_string(w.dir.join(format!("hooks-{hooks_port}.log")))
                .unwrap_or_default()
        )
    });
    let job = w.client.result(&session);
    for _ in 0..1200 {
        let meta = w.client.backend().get(&session).await.unwrap();
        if meta
            .as_ref()
            .is_some_and(|m| m.result["frames"].as_u64().unwrap_or(0) >= 2)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The same publish hook again (nginx retrying, a second replica): nothing new is sent.
    let (status, body) = post(
        hooks_port,
        &format!("/nginx-rtmp?token={TOKEN}"),
        "application/x-www-form-urlencoded",
        form.as_bytes(),
    );
    assert_eq!(
        (status, body.trim()),
        (200, format!("watched by {session}").as_str())
    );
    assert_eq!(ready_count(&w.settings, &w.queue).await, 0);

    // The publisher stops: nginx calls on_publish_done, and the session ends as stopped.
    // When the hook sent the job and when the session began (both logs), for the record.
    for log in [format!("hooks-{hooks_port}.log"), "worker.log".to_owned()] {
        let text = std::fs::read_to_string(w.dir.join(&log)).unwrap_or_default();
        for line in text
            .lines()
            .filter(|l| l.contains("publish: session started") || l.contains("session running"))
        {
            eprintln!("{log}: {line}");
        }
    }
    drop(publisher);
    let out = job.get(WAIT).await.unwrap();
    assert_eq!(out["ended"], "stopped", "{out}");
    assert_eq!(out["stream_id"], stream_id.as_str());
    assert!(out["frames"].as_u64().unwrap() >= 2, "{out}");
    let last = out["last_frame"]["key"].as_str().unwrap();
    assert!(last.starts_with(&format!("h/{stream_id}/")), "{out}");
    assert!(w.dir.join("storage").join(last).exists());
    // The session's end cleared its claim, stop request and guard.
    assert_eq!(w.get(&owner_key).await, None);
    assert_eq!(
        w.get(&format!("mediafarm-snapshot-hook-{stream_id}")).await,
        None
    );
    w.forget(&stream_id).await;
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn srs_hooks_are_answered_as_srs_expects() {
    let mut w = World::new("hooks-srs").await;
    let port = free_port();
    let apps = json!({"live": {
        "stream_url": "rtmp://127.0.0.1:1935/{app}/{name}",
        "key": "s/{stream_id}/{seq}.jpg",
        "queue": w.queue,
    }});
    w.start_hooks(port, apps);
    let name = format!("livestream{}", short_id());
    let stream_id = format!("live.{name}");
    // SRS's documented on_publish body (v5/v6: string ids, server and stream ids).
    let publish = json!({
        "server_id": "vid-0xk989d", "service_id": "z1l4ylgs", "action": "on_publish",
        "client_id": "341w361a", "ip": "127.0.0.1", "vhost": "__defaultVhost__", "app": "live",
        "tcUrl": "rtmp://127.0.0.1:1935/live", "stream": name, "param": "?token=xxx&salt=yyy",
        "stream_url": format!("/live/{name}"), "stream_id": "vid-124q9y3"
    });

    // Wrong and missing token: 403 with a non-zero code, nothing sent.
    let (status, body) = srs(port, "wrong-token-0123456789", &publish);
    assert_eq!(status, 403);
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["code"], 403);
    let (status, _) = post(
        port,
        "/srs",
        "application/json",
        publish.to_string().as_bytes(),
    );
    assert_eq!(status, 403);
    assert_eq!(ready_count(&w.settings, &w.queue).await, 0);

    // on_publish: HTTP 200, body 0; one job on the queue, for the policy's stream.
    let (status, body) = srs(port, TOKEN, &publish);
    assert_eq!((status, body.as_str()), (200, "0"));
    assert_eq!(ready_count(&w.settings, &w.queue).await, 1);
    let job = w
        .get(&format!("mediafarm-snapshot-hook-{stream_id}"))
        .await
        .expect("the start guard holds the job id");
    // The same hook again (SRS retries, or a second SRS edge): still one job.
    let (status, body) = srs(port, TOKEN, &publish);
    assert_eq!((status, body.as_str()), (200, "0"));
    assert_eq!(ready_count(&w.settings, &w.queue).await, 1);
    assert_eq!(
        w.get(&format!("mediafarm-snapshot-hook-{stream_id}"))
            .await
            .as_deref(),
        Some(job.as_str())
    );

    // Other actions and unwatched applications: allowed, nothing sent.
    let connect = json!({"action": "on_connect", "client_id": 1985, "ip": "192.168.1.10", "vhost": "video.test.com", "app": "live", "tcUrl": "rtmp://video.test.com/live?key=d2fa801d08e3f90ed1e1670e6e52651a", "pageUrl": "http://www.test.com/live.html"});
    assert_eq!(srs(port, TOKEN, &connect), (200, "0".into()));
    let mut other = publish.clone();
    other["app"] = json!("unwatched");
    assert_eq!(srs(port, TOKEN, &other), (200, "0".into()));
    assert_eq!(ready_count(&w.settings, &w.queue).await, 1);

    // Malformed and oversized hooks.
    let (status, body) = post(
        port,
        &format!("/srs?token={TOKEN}"),
        "application/json",
        b"{\"action\": ",
    );
    assert_eq!(status, 400, "{body}");
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["code"], 400);
    let (status, _) = srs(port, TOKEN, &json!({"action": "on_publish", "app": "live"}));
    assert_eq!(status, 400);
    let big = vec![b' '; 20_000];
    let (status, _) = post(
        port,
        &format!("/srs?token={TOKEN}"),
        "application/json",
        &big,
    );
    assert_eq!(status, 413);

    // on_unpublish: the stop request `mediafarm streams stop` makes, the guard dropped, and
    // the job that never began is revoked.
    let mut unpublish = publish.clone();
    unpublish["action"] = json!("on_unpublish");
    assert_eq!(srs(port, TOKEN, &unpublish), (200, "0".into()));
    assert!(w
        .get(&format!("mediafarm-snapshot-stop-{stream_id}"))
        .await
        .is_some());
    assert_eq!(
        w.get(&format!("mediafarm-snapshot-hook-{stream_id}")).await,
        None
    );
    let mut conn = w.client.backend().connection();
    let revoked: Option<f64> = redis::cmd("ZSCORE")
        .arg(mediafarm::amqp::pidbox::REVOKED_KEY)
        .arg(&job)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(revoked.is_some(), "job {job} was not revoked");

    // A caller outside hooks_allow_from is refused even with the right token.
    let fenced = free_port();
    let apps = json!({"live": {
        "stream_url": "rtmp://127.0.0.1:1935/{app}/{name}",
        "key": "s/{stream_id}/{seq}.jpg",
        "queue": w.queue,
    }});
    w.start_hooks_with(
        fenced,
        apps,
        &[("MEDIAFARM_HOOKS_ALLOW_FROM", "10.0.0.0/8")],
    );
    let (status, body) = srs(fenced, TOKEN, &publish);
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("hooks_allow_from"), "{body}");
    assert_eq!(
        w.get(&format!("mediafarm-snapshot-hook-{stream_id}")).await,
        None
    );

    // Health.
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    w.forget(&stream_id).await;
    w.stop().await;
}

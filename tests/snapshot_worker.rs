//! snapshot-worker end to end: the real `snapshot-worker` binary on the real RabbitMQ and
//! Redis, with streams made at test time by the FFmpeg CLI (`testsrc2` → H.264, small sizes,
//! short GOPs) and served for real — a file, HLS from a local HTTP server while ffmpeg is still
//! writing the playlist, RTMP through nginx with the RTMP module on a free port, RTSP over TCP
//! from GStreamer's RTSP server. Checks frame timing in stream time, JPEG/PNG/WebP validity and
//! sizes, crash-resume after `kill -9`, the hand-off to a continuation, stopping by CLI and by
//! revoke, reconnecting, signed webhook delivery, deliveries that survive `kill -9` (the Redis
//! outbox, dead letters), the audit manifest in a real S3-compatible server (moto), frame uploads
//! to an authority over mutual TLS (a local rustls server that demands a client certificate),
//! every bad source, and the Python celery client.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use mediafarm::{Client, ClientError, SendOptions, Settings, TaskState};
use mediafarm_tests::certs::{test_pki, TestPki};
use mediafarm_tests::media::{
    hls_writer, http_server, make_video, nginx_rtmp, rtmp_publisher, rtmp_publisher_h263,
    rtsp_server, silent_listener,
};
use mediafarm_tests::mtls::MtlsReceiver;
use mediafarm_tests::process::Proc;
use mediafarm_tests::s3::Moto;
use mediafarm_tests::webhook::{Hook, SECRET};
use mediafarm_tests::{delete_queue, failed, kwargs, python, unique_queue};
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(120);

/// Builds snapshot-worker once per test run.
fn snapshot_binary() -> PathBuf {
    mediafarm_tests::worker_binary("snapshot-worker")
}

/// One test's world: a queue, a directory for media and storage, a client, the worker's
/// environment.
struct World {
    settings: Settings,
    queue: String,
    dir: PathBuf,
    client: Client,
    env: Vec<(String, String)>,
    workers: Vec<Proc>,
}

impl World {
    async fn new(label: &str, extra: &[(&str, &str)]) -> World {
        let settings = mediafarm_tests::settings();
        let queue = unique_queue(label);
        let dir = mediafarm_tests::temp_dir(&format!("snap-{label}"));
        std::fs::create_dir_all(dir.join("media")).unwrap();
        std::fs::create_dir_all(dir.join("storage")).unwrap();
        let mut env: Vec<(String, String)> = vec![
            ("MEDIAFARM_BROKER_URL", settings.broker_url.clone()),
            ("MEDIAFARM_RESULT_BACKEND", settings.result_backend.clone()),
            (
                "MEDIAFARM_STORAGE_URL",
                format!("file://{}", dir.join("storage").display()),
            ),
            (
                "MEDIAFARM_SOURCE_ALLOWED_ROOTS",
                dir.join("media").display().to_string(),
            ),
            ("MEDIAFARM_SOURCE_ALLOWED_HOSTS", "127.0.0.1".into()),
            ("MEDIAFARM_SOURCE_ALLOW_PRIVATE", "true".into()),
            ("MEDIAFARM_SOURCE_ALLOW_HTTP", "true".into()),
            ("MEDIAFARM_WEBHOOK_ALLOW_PRIVATE", "true".into()),
            ("MEDIAFARM_WEBHOOK_ALLOW_HTTP", "true".into()),
            ("MEDIAFARM_WEBHOOK_SECRET", SECRET.into()),
            ("MEDIAFARM_WORKER_SHUTDOWN_GRACE", "5".into()),
            ("MEDIAFARM_SNAPSHOT_RECONNECT_WINDOW", "3".into()),
            ("MEDIAFARM_TASK_DEFAULT_RETRY_DELAY", "1".into()),
            // Redis is shared: a sweeper would send other tests' stranded outboxes. The
            // sweeper's own test turns it on.
            ("MEDIAFARM_SNAPSHOT_OUTBOX_SWEEP", "0".into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        for (k, v) in extra {
            env.push(((*k).to_owned(), (*v).to_owned()));
        }
        let client = Client::connect(&settings).await.expect("client connects");
        World {
            settings,
            queue,
            dir,
            client,
            env,
            workers: Vec::new(),
        }
    }

    fn media(&self, name: &str) -> PathBuf {
        self.dir.join("media").join(name)
    }

    fn file_url(&self, name: &str) -> String {
        format!("file://{}", self.media(name).display())
    }

    /// Starts a worker; returns its index. Waits until it consumes (its log says so).
    fn start_worker(&mut self, name: &str) -> usize {
        self.start_worker_c(name, 8)
    }

    /// [`World::start_worker`] with `concurrency` job slots.
    fn start_worker_c(&mut self, name: &str, concurrency: usize) -> usize {
        let log = self.dir.join(format!("{name}.log"));
        let out = std::fs::File::create(&log).unwrap();
        let proc = Proc::spawn(
            Command::new(snapshot_binary())
                .args(["-Q", &self.queue, "-n", &format!("{name}@{}", self.queue)])
                .args(["--metrics-addr", "127.0.0.1:0", "-l", "info"])
                .args(["-c", &concurrency.to_string()])
                .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
                .env("NO_COLOR", "1")
                .stdout(out.try_clone().unwrap())
                .stderr(out),
        );
        for _ in 0..600 {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if text.contains("consuming") {
                self.workers.push(proc);
                return self.workers.len() - 1;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "worker {name} did not start:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }

    async fn send(&self, task: &str, kw: Value) -> mediafarm::AsyncResult {
        let opts = SendOptions {
            queue: Some(self.queue.clone()),
            ..Default::default()
        };
        self.client
            .send_task(task, kwargs(kw), &opts)
            .await
            .expect("published")
    }

    async fn run(&self, task: &str, kw: Value) -> Result<Value, ClientError> {
        self.send(task, kw).await.get(WAIT).await
    }

    fn stored(&self, key: &str) -> Vec<u8> {
        std::fs::read(self.dir.join("storage").join(key))
            .unwrap_or_else(|e| panic!("stored {key}: {e}"))
    }

    fn stored_keys(&self, under: &str) -> Vec<String> {
        let mut keys: Vec<String> = std::fs::read_dir(self.dir.join("storage").join(under))
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .map(|e| format!("{under}/{}", e.file_name().to_string_lossy()))
                    .collect()
            })
            .unwrap_or_default();
        keys.sort();
        keys
    }

    /// Polls a job until it is PROGRESS with at least `frames` frames; returns its meta.
    async fn progress(&self, id: &str, frames: u64) -> Value {
        for _ in 0..1200 {
            if let Some(meta) = self.client.backend().get(id).await.unwrap() {
                assert!(
                    !meta.status.is_ready(),
                    "job ended before {frames} frames: {:?}",
                    meta.result
                );
                if meta.status == TaskState::Custom("PROGRESS".into())
                    && meta.result["frames"].as_u64().unwrap_or(0) >= frames
                {
                    return meta.result;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("job {id} never reached {frames} frames");
    }

    async fn stop(mut self) {
        self.workers.clear();
        delete_queue(&self.settings, &self.queue).await;
        delete_queue(
            &self.settings,
            &mediafarm::amqp::reroute::dead_queue(&self.queue),
        )
        .await;
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn decode(data: &[u8], format: image::ImageFormat) -> image::DynamicImage {
    image::load_from_memory_with_format(data, format).expect("a valid image")
}

fn assert_jpeg(data: &[u8], width: u32, height: u32) {
    assert_eq!(&data[..3], &[0xFF, 0xD8, 0xFF], "JPEG magic");
    assert_eq!(&data[data.len() - 2..], &[0xFF, 0xD9], "JPEG end marker");
    let img = decode(data, image::ImageFormat::Jpeg);
    assert_eq!((img.width(), img.height()), (width, height));
    // testsrc2 is colourful: a grey or black picture would mean a broken conversion.
    let rgb = img.to_rgb8();
    let colourful = rgb.pixels().filter(|p| {
        let (r, g, b) = (i32::from(p[0]), i32::from(p[1]), i32::from(p[2]));
        (r - g).abs() > 60 || (g - b).abs() > 60
    });
    assert!(
        colourful.count() > (width * height / 10) as usize,
        "the picture has the test pattern's colours"
    );
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("a number: {v}"))
}

// ---------------------------------------------------------------------------------------
// snapshot.capture

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capture_from_a_file_at_a_time_in_every_format() {
    let mut w = World::new("cap-file", &[]).await;
    make_video(&w.media("clip.mp4"), 6, "320x240", 15);
    w.start_worker("a");
    let url = w.file_url("clip.mp4");
    let out = w
        .run(
            "snapshot.capture",
            json!({"stream_url": url, "key": "caps/at-{time}.jpg", "at_s": 3.5}),
        )
        .await
        .unwrap();
    // The frame shown at 3.5 s: not the keyframe before it (3.0 s).
    assert!((f(&out["pts_s"]) - 3.5).abs() < 0.02, "{out}");
    assert_eq!(
        (out["width"].as_u64(), out["height"].as_u64()),
        (Some(320), Some(240))
    );
    let key = out["key"].as_str().unwrap();
    assert!(
        key.starts_with("caps/at-2") && key.ends_with("Z.jpg"),
        "{key}"
    );
    let data = w.stored(key);
    assert_eq!(out["bytes"].as_u64(), Some(data.len() as u64));
    assert_jpeg(&data, 320, 240);
    assert!(out["url"].as_str().unwrap().starts_with("file://"));
    assert!(out["captured_at"].as_str().unwrap().ends_with("+00:00"));

    let small = w
        .run("snapshot.capture", json!({"stream_url": url, "key": "caps/small.jpg", "at_s": 0, "max_width": 160, "quality": 40}))
        .await
        .unwrap();
    assert_eq!(f(&small["pts_s"]), 0.0);
    assert_jpeg(&w.stored("caps/small.jpg"), 160, 120);
    assert!(
        small["bytes"].as_u64() < out["bytes"].as_u64(),
        "quality 40 at half size is smaller"
    );

    let png = w
        .run("snapshot.capture", json!({"stream_url": url, "key": "caps/p.png", "at_s": 1, "format": "png", "max_width": 200}))
        .await
        .unwrap();
    let img = decode(&w.stored("caps/p.png"), image::ImageFormat::Png);
    assert_eq!((img.width(), img.height()), (200, 150));
    assert_eq!(png["format"], "png");
    w.run(
        "snapshot.capture",
        json!({"stream_url": url, "key": "caps/w.webp", "at_s": 2, "format": "webp"}),
    )
    .await
    .unwrap();
    let img = decode(&w.stored("caps/w.webp"), image::ImageFormat::WebP);
    assert_eq!((img.width(), img.height()), (320, 240));

    let err = failed(
        w.run(
            "snapshot.capture",
            json!({"stream_url": url, "key": "x.jpg", "at_s": 60}),
        )
        .await,
    );
    assert_eq!(err.exc_type, "AtPastEnd");
    assert!(err.message.contains("past the end"), "{}", err.message);
    let err = failed(
        w.run(
            "snapshot.capture",
            json!({"stream_url": url, "key": "x-{nope}.jpg"}),
        )
        .await,
    );
    assert_eq!(err.exc_type, "InvalidKeyTemplate");
    let err = failed(
        w.run(
            "snapshot.capture",
            json!({"stream_url": url, "key": "x.jpg", "quality": 0}),
        )
        .await,
    );
    assert!(err.message.contains("quality"), "{}", err.message);
    let err = failed(
        w.run(
            "snapshot.capture",
            json!({"stream_url": "file:///etc/hostname", "key": "x.jpg"}),
        )
        .await,
    );
    assert_eq!(err.exc_type, "SourceRefused");
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_sources_fail_clearly_within_the_timeout() {
    let mut w = World::new("cap-bad", &[]).await;
    // Every file of fixtures/media/, copied under the worker's allowed root.
    let cases = mediafarm_tests::fixtures::cases("media");
    for case in &cases {
        std::fs::copy(&case.path, w.media(case.file_name())).unwrap();
    }
    w.start_worker("a");
    let (silent, handle, done) = silent_listener();
    let (_http, http_port) = http_server(&w.dir.join("media"));

    for case in &cases {
        let err = failed(
            w.run(
                "snapshot.capture",
                json!({"stream_url": w.file_url(case.file_name()), "key": "x.jpg"}),
            )
            .await,
        );
        assert_eq!(
            Some(&*err.exc_type),
            case.exc_type.as_deref(),
            "{}: {}",
            case.name,
            err.message
        );
        case.assert_words(&err.message);
    }

    for url in [
        format!("http://127.0.0.1:{silent}/live/index.m3u8"),
        format!("rtmp://127.0.0.1:{silent}/live/room"),
        format!("rtsp://127.0.0.1:{silent}/cam"),
    ] {
        let err = failed(
            w.run(
                "snapshot.capture",
                json!({"stream_url": url, "key": "x.jpg", "timeout_s": 2}),
            )
            .await,
        );
        assert_eq!(err.exc_type, "SourceTimeout", "{url}: {err:?}");
        assert!(err.message.contains("within 2 s"), "{}", err.message);
    }

    let missing = format!("http://127.0.0.1:{http_port}/nope/index.m3u8");
    let err = failed(
        w.run(
            "snapshot.capture",
            json!({"stream_url": missing, "key": "x.jpg", "timeout_s": 5}),
        )
        .await,
    );
    assert_eq!(err.exc_type, "SourceNotFound", "{err:?}");
    assert!(err.message.contains("404"), "{}", err.message);

    // A watch fails the same way when its stream never worked.
    let err = failed(
        w.run(
            "snapshot.watch",
            json!({"stream_id": "gone", "stream_url": missing, "key": "w/{seq}.jpg", "interval_s": 1}),
        )
        .await,
    );
    assert_eq!(err.exc_type, "SourceNotFound", "{err:?}");
    // The worker is still there.
    make_video(&w.media("ok.mp4"), 1, "160x120", 15);
    w.run(
        "snapshot.capture",
        json!({"stream_url": w.file_url("ok.mp4"), "key": "ok.jpg"}),
    )
    .await
    .unwrap();
    *done.lock().unwrap() = true;
    let _ = handle.join();
    w.stop().await;
}

// ---------------------------------------------------------------------------------------
// snapshot.watch

/// Ticks `interval` apart in stream time, within one GOP.
fn assert_timing(pts: &[f64], interval: f64, gop: f64) {
    assert!(pts.len() >= 2, "{pts:?}");
    for pair in pts.windows(2) {
        let gap = pair[1] - pair[0];
        assert!(
            gap >= interval - gop - 0.01 && gap <= interval + gop + 0.01,
            "ticks {pts:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_a_file_ticks_in_stream_time_and_ends_with_the_file() {
    let mut w = World::new("watch-file", &[]).await;
    // 30 fps, a keyframe every 0.5 s, 12 s.
    make_video(&w.media("room.mp4"), 12, "320x240", 15);
    w.start_worker("a");
    let out = w
        .run(
            "snapshot.watch",
            json!({"stream_id": "room-1", "stream_url": w.file_url("room.mp4"), "interval_s": 2, "key": "rooms/{stream_id}/{seq}.jpg", "max_width": 240}),
        )
        .await
        .unwrap();
    assert_eq!(out["ended"], "stream_ended", "{out}");
    assert_eq!(out["frames"], 6, "{out}");
    let keys = w.stored_keys("rooms/room-1");
    let want: Vec<String> = (0..6).map(|i| format!("rooms/room-1/{i:06}.jpg")).collect();
    assert_eq!(keys, want);
    for key in &keys {
        assert_jpeg(&w.stored(key), 240, 180);
    }
    let last = &out["last_frame"];
    assert_eq!(last["seq"], 5);
    assert!((f(&last["pts_s"]) - 10.0).abs() < 0.6, "{last}");
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_resume_after_kill_9_misses_no_tick() {
    let mut w = World::new("watch-crash", &[]).await;
    // 20 s at its own pace, a keyframe every 0.5 s, a tick every second.
    make_video(&w.media("live.mp4"), 20, "320x240", 15);
    let hook = Hook::start();
    let first = w.start_worker("a");
    let stream_id = unique_stream("crashy");
    let job = w
        .send(
            "snapshot.watch",
            json!({"stream_id": stream_id, "stream_url": w.file_url("live.mp4"), "interval_s": 1, "realtime": true,
                   "key": "c/{seq}.jpg", "deliver": hook.url()}),
        )
        .await;
    let before = w.progress(&job.id, 3).await;
    // The other worker is consuming before the first dies, so the redelivery goes straight to it.
    w.start_worker("b");
    w.workers[first].kill9();
    let out = job.get(WAIT).await.unwrap();
    assert_eq!(out["ended"], "stream_ended", "{out}");
    assert!(
        out["frames_this_job"].as_u64().unwrap() < out["frames"].as_u64().unwrap(),
        "the second worker resumed: {out}"
    );
    assert!(f(&before["last_frame"]["pts_s"]) < f(&out["last_frame"]["pts_s"]));
    // Every seq once, none missing: the resumed session went on from the last recorded tick.
    let frames = out["frames"].as_u64().unwrap();
    let keys = w.stored_keys("c");
    assert_eq!(keys.len() as u64, frames, "{keys:?}");
    assert!(
        (19..=21).contains(&frames),
        "a tick a second for 20 s: {frames}"
    );
    // Deliveries carry each frame's stream time: ticks stay a second apart across the crash.
    let mut by_seq: Vec<(u64, f64)> = hook
        .bodies()
        .iter()
        .map(|b| (b["seq"].as_u64().unwrap(), f(&b["pts_s"])))
        .collect();
    by_seq.sort_by_key(|x| x.0);
    by_seq.dedup_by_key(|x| x.0);
    // No delivery is lost: the outbox in Redis outlives the worker (one in flight when it died
    // may come twice, under the same id: deduplicated above).
    assert_eq!(by_seq.len() as u64, frames, "{by_seq:?}");
    for pair in by_seq.windows(2) {
        let (a, b) = (pair[0], pair[1]);
        let ticks = (b.0 - a.0) as f64;
        let gap = b.1 - a.1;
        assert!(
            gap >= ticks - 0.5 - 0.01 && gap <= ticks + 0.5 + 0.01,
            "{by_seq:?}"
        );
    }
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_session_hands_itself_on_before_the_ack_timeout() {
    let mut w = World::new("watch-slice", &[("MEDIAFARM_SNAPSHOT_SESSION_SLICE", "3")]).await;
    make_video(&w.media("long.mp4"), 9, "160x120", 15);
    w.start_worker("a");
    let first = w
        .run(
            "snapshot.watch",
            json!({"stream_id": unique_stream("sliced"), "stream_url": w.file_url("long.mp4"), "interval_s": 1, "realtime": true, "key": "s/{seq}.jpg"}),
        )
        .await
        .unwrap();
    assert_eq!(first["ended"], "continued", "{first}");
    let session = first["session_id"].as_str().unwrap().to_owned();
    let mut next = first["continued_as"].as_str().unwrap().to_owned();
    let mut hops = 1;
    let last = loop {
        let out = w.client.result(&next).get(WAIT).await.unwrap();
        assert_eq!(
            out["session_id"],
            session.as_str(),
            "one session across jobs"
        );
        if out["ended"] != "continued" {
            break out;
        }
        hops += 1;
        next = out["continued_as"].as_str().unwrap().to_owned();
    };
    assert!(
        hops >= 2,
        "a 9 s stream in 3 s slices is handed on at least twice"
    );
    assert_eq!(last["ended"], "stream_ended", "{last}");
    let frames = last["frames"].as_u64().unwrap();
    assert!((8..=10).contains(&frames), "{last}");
    assert_eq!(w.stored_keys("s").len() as u64, frames);
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hls_while_written_capture_and_watch_until_duration() {
    let mut w = World::new("hls", &[]).await;
    let live = w.dir.join("media/hls");
    std::fs::create_dir_all(&live).unwrap();
    let _writer = hls_writer(&live);
    let (_http, port) = http_server(&w.dir.join("media"));
    w.start_worker("a");
    let url = format!("http://127.0.0.1:{port}/hls/index.m3u8");
    let cap = w
        .run(
            "snapshot.capture",
            json!({"stream_url": url, "key": "hls/cap.jpg", "timeout_s": 20}),
        )
        .await
        .unwrap();
    assert_jpeg(&w.stored("hls/cap.jpg"), 320, 240);
    assert!(f(&cap["pts_s"]) >= 0.0);
    let hook = Hook::start();
    let out = w
        .run(
            "snapshot.watch",
            json!({"stream_id": "hls-1", "stream_url": url, "interval_s": 1.5, "duration_s": 7, "key": "hls/{stream_id}/{seq}.jpg", "deliver": hook.url()}),
        )
        .await
        .unwrap();
    assert_eq!(out["ended"], "duration", "{out}");
    let frames = out["frames"].as_u64().unwrap();
    assert!(frames >= 3, "{out}");
    let bodies = hook.bodies();
    assert_eq!(bodies.len() as u64, frames, "one signed delivery per frame");
    let pts: Vec<f64> = bodies.iter().map(|b| f(&b["pts_s"])).collect();
    assert_timing(&pts, 1.5, 0.5);
    for b in &bodies {
        assert_eq!(b["stream_id"], "hls-1");
        assert_jpeg(&w.stored(b["key"].as_str().unwrap()), 320, 240);
    }
    w.stop().await;
}

fn mediafarm_cli(w: &World, args: &[&str]) -> String {
    let out = Command::new(mediafarm_tests::binary("mediafarm"))
        .args(args)
        .envs(w.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .output()
        .expect("mediafarm runs");
    assert!(
        out.status.success(),
        "mediafarm {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rtmp_through_nginx_stopped_by_the_cli_and_by_revoke() {
    let mut w = World::new("rtmp", &[]).await;
    let (_nginx, port) = nginx_rtmp(&w.dir.join("nginx"));
    let url = format!("rtmp://127.0.0.1:{port}/live/room7");
    let _publisher = rtmp_publisher(&url);
    w.start_worker("a");
    let cap = w
        .run(
            "snapshot.capture",
            json!({"stream_url": url, "key": "r/cap.jpg", "timeout_s": 20}),
        )
        .await
        .unwrap();
    assert_jpeg(&w.stored("r/cap.jpg"), 320, 240);
    assert!(cap["pts_s"].is_number());

    let hook = Hook::start();
    let job = w
        .send("snapshot.watch", json!({"stream_id": "room7", "stream_url": url, "interval_s": 1, "key": "r/{stream_id}/{seq}.jpg", "deliver": hook.url()}))
        .await;
    let progress = w.progress(&job.id, 3).await;
    assert_eq!(progress["stream_id"], "room7");
    assert!(progress["last_frame"]["key"]
        .as_str()
        .unwrap()
        .starts_with("r/room7/"));
    let said = mediafarm_cli(&w, &["streams", "stop", "room7"]);
    assert!(said.contains("room7"), "{said}");
    let out = job.get(WAIT).await.unwrap();
    assert_eq!(out["ended"], "stopped", "{out}");
    let pts: Vec<f64> = hook.bodies().iter().map(|b| f(&b["pts_s"])).collect();
    assert_timing(&pts, 1.0, 0.5);

    // Revoking the job (no terminate) ends a running session too, with its summary.
    let job = w
        .send("snapshot.watch", json!({"stream_id": "room7b", "stream_url": url, "interval_s": 1, "key": "r/{stream_id}/{seq}.jpg"}))
        .await;
    w.progress(&job.id, 2).await;
    mediafarm_cli(&w, &["revoke", &job.id]);
    let out = job.get(WAIT).await.unwrap();
    assert_eq!(out["ended"], "revoked", "{out}");
    assert!(out["frames"].as_u64().unwrap() >= 2);

    // Revoke with terminate: the runtime stops the job and stores REVOKED.
    let job = w
        .send("snapshot.watch", json!({"stream_id": "room7c", "stream_url": url, "interval_s": 1, "key": "r/{stream_id}/{seq}.jpg"}))
        .await;
    w.progress(&job.id, 1).await;
    mediafarm_cli(&w, &["revoke", "--terminate", &job.id]);
    // The CLI records the revoke in Redis, then broadcasts it. The session polls Redis every
    // few hundred milliseconds, so on a loaded machine it can see the revoke, and end with its
    // summary, before the broadcast reaches the runtime that terminates it. Both end the
    // session because of the revoke; which path wins is timing.
    match job.get(WAIT).await {
        Err(ClientError::Failed { error, .. }) => assert_eq!(error.exc_type, "TaskRevokedError"),
        Ok(out) => assert_eq!(out["ended"], "revoked", "{out}"),
        Err(e) => panic!("the terminated session ended with {e}"),
    }
    // A terminated job leaves its session record (it would resume a redelivery); drop it.
    let mut redis = w.client.backend().connection();
    redis::cmd("DEL")
        .arg("mediafarm-snapshot-session-room7c")
        .query_async::<()>(&mut redis)
        .await
        .unwrap();
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_celery_client_captures_and_reads_progress() {
    let mut w = World::new("py", &[]).await;
    let stream_id = unique_stream("py");
    make_video(&w.media("py.mp4"), 30, "320x240", 15);
    w.start_worker("a");
    let script = r#"
import json, os, sys, time
from celery import Celery
app = Celery("p", broker=os.environ["BROKER_URL"], backend=os.environ["RESULT_BACKEND"])
app.conf.update(task_serializer="json", result_serializer="json", accept_content=["json"])
queue, url, stream_id = sys.argv[1], sys.argv[2], sys.argv[3]
cap = app.send_task("snapshot.capture", kwargs={"stream_url": url, "key": "py/cap.jpg", "at_s": 2}, queue=queue).get(timeout=60)
watch = app.send_task("snapshot.watch", kwargs={"stream_id": stream_id, "stream_url": url, "interval_s": 1, "realtime": True, "duration_s": 60, "key": "py/{seq}.jpg"}, queue=queue)
seen = None
for _ in range(600):
    if watch.state == "PROGRESS" and watch.info.get("frames", 0) >= 2:
        seen = {"state": watch.state, "info": watch.info}
        break
    time.sleep(0.1)
print(json.dumps({"capture": cap, "progress": seen, "watch_id": watch.id}))
"#;
    let out = Command::new(python())
        .args(["-c", script, &w.queue, &w.file_url("py.mp4"), &stream_id])
        .env("BROKER_URL", &w.settings.broker_url)
        .env("RESULT_BACKEND", &w.settings.result_backend)
        .output()
        .expect("python runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seen: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!((f(&seen["capture"]["pts_s"]) - 2.0).abs() < 0.02, "{seen}");
    assert_eq!(seen["capture"]["width"], 320);
    assert_jpeg(&w.stored("py/cap.jpg"), 320, 240);
    assert_eq!(seen["progress"]["state"], "PROGRESS", "{seen}");
    assert!(seen["progress"]["info"]["frames"].as_u64().unwrap() >= 2);
    assert_eq!(seen["progress"]["info"]["stream_id"], stream_id);
    mediafarm_cli(&w, &["streams", "stop", &stream_id]);
    let id = seen["watch_id"].as_str().unwrap();
    let out = w.client.result(id).get(WAIT).await.unwrap();
    assert_eq!(out["ended"], "stopped");
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_stream_is_reconnected_and_an_ended_one_ends_the_session() {
    let mut w = World::new("rtmp-drop", &[]).await;
    let (_nginx, port) = nginx_rtmp(&w.dir.join("nginx"));
    let url = format!("rtmp://127.0.0.1:{port}/live/flaky");
    let mut first = rtmp_publisher(&url);
    w.start_worker("a");
    let job = w
        .send(
            "snapshot.watch",
            json!({"stream_id": "flaky", "stream_url": url, "interval_s": 1, "key": "d/{seq}.jpg"}),
        )
        .await;
    w.progress(&job.id, 3).await;
    // The publisher goes away; a new one comes back a moment later.
    first.kill9();
    std::thread::sleep(Duration::from_secs(1));
    let mut second = rtmp_publisher(&url);
    let before = w.progress(&job.id, 3).await["frames"].as_u64().unwrap();
    w.progress(&job.id, before + 3).await;
    // Then the stream ends for good: after the reconnect window the session ends by itself.
    second.kill9();
    let out = job.get(WAIT).await.unwrap();
    assert_eq!(out["ended"], "stream_ended", "{out}");
    assert!(out["reconnects"].as_u64().unwrap() >= 1, "{out}");
    let frames = out["frames"].as_u64().unwrap();
    assert!(frames >= before + 3, "{out}");
    let keys = w.stored_keys("d");
    let want: Vec<String> = (0..frames).map(|i| format!("d/{i:06}.jpg")).collect();
    assert_eq!(keys, want);
    w.stop().await;
}

/// The names of a running process's threads.
fn thread_names(proc: &Proc) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{}/task", proc.0.id()))
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter_map(|e| std::fs::read_to_string(e.path().join("comm")).ok())
                .map(|n| n.trim().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_rtmp_sessions_share_a_few_threads_and_store_every_tick() {
    const SESSIONS: usize = 50;
    let mut w = World::new("rtmp-many", &[("MEDIAFARM_SNAPSHOT_MAX_SESSIONS", "60")]).await;
    let (_nginx, port) = nginx_rtmp(&w.dir.join("nginx"));
    let url = format!("rtmp://127.0.0.1:{port}/live/many");
    let _publisher = rtmp_publisher(&url);
    let worker = w.start_worker_c("a", SESSIONS + 4);
    let ids: Vec<String> = (0..SESSIONS).map(|_| unique_stream("many")).collect();
    let mut jobs = Vec::new();
    for id in &ids {
        let job = w
            .send(
                "snapshot.watch",
                json!({"stream_id": id, "stream_url": url, "interval_s": 1,
                       "duration_s": 6, "key": "m/{stream_id}/{seq}.jpg"}),
            )
            .await;
        jobs.push(job);
    }
    // Every session is running, on the engine: none has a thread of its own (the thread
    // path names each `session-<stream_id>`).
    w.progress(&jobs[SESSIONS - 1].id, 1).await;
    let names = thread_names(&w.workers[worker]);
    assert!(!names.is_empty());
    assert!(
        !names.iter().any(|n| n.starts_with("session-")),
        "session threads: {names:?}"
    );
    for (id, job) in ids.iter().zip(&jobs) {
        let out = job.get(WAIT).await.unwrap();
        assert_eq!(out["ended"], "duration", "{out}");
        let frames = out["frames"].as_u64().unwrap();
        // Every tick stored, under consecutive seqs, each a real picture.
        let keys = w.stored_keys(&format!("m/{id}"));
        let want: Vec<String> = (0..frames).map(|s| format!("m/{id}/{s:06}.jpg")).collect();
        assert_eq!(keys, want, "{out}");
        for key in &keys {
            assert_jpeg(&w.stored(key), 320, 240);
        }
        let last = &out["last_frame"];
        assert_eq!(last["seq"].as_u64(), Some(frames - 1), "{out}");
        assert_eq!(out["reconnects"], 0, "{out}");
    }
    w.stop().await;
}

/// The worker's `/metrics` address, from its log (`-l info` logs `metrics_addr` at start).
fn logged_metrics_addr(w: &World, name: &str) -> std::net::SocketAddr {
    let log = std::fs::read_to_string(w.dir.join(format!("{name}.log"))).unwrap_or_default();
    log.split_whitespace()
        .find_map(|f| f.strip_prefix("metrics_addr=")?.parse().ok())
        .unwrap_or_else(|| panic!("no metrics_addr in the log:\n{log}"))
}

/// `GET /metrics`, whole.
async fn metrics_text(addr: std::net::SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    conn.read_to_string(&mut out).await.unwrap();
    out
}

/// `mediafarm_snapshot_frame_late_seconds_count{stage="<stage>"}`, 0 when absent.
fn late_count(metrics: &str, stage: &str) -> u64 {
    let series = format!("mediafarm_snapshot_frame_late_seconds_count{{stage=\"{stage}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&series))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// An RTMP engine session's frames carry their tick's due time (`due_at`) in the delivery,
/// and the worker's `/metrics` times every frame against it at each stage, up to the
/// webhook's 2xx.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rtmp_frames_are_timed_against_their_due_time_up_to_delivery() {
    let mut w = World::new("rtmp-due", &[]).await;
    let (_nginx, port) = nginx_rtmp(&w.dir.join("nginx"));
    let stream = unique_stream("due");
    let url = format!("rtmp://127.0.0.1:{port}/live/{stream}");
    let _publisher = rtmp_publisher(&url);
    w.start_worker("a");
    let hook = Hook::start();
    let out = w
        .run(
            "snapshot.watch",
            json!({"stream_id": stream, "stream_url": url, "interval_s": 1, "duration_s": 4,
                   "key": "due/{stream_id}/{seq}.jpg", "deliver": hook.url()}),
        )
        .await
        .unwrap();
    assert_eq!(out["deliveries_failed"], 0, "{out}");
    let frames = out["frames"].as_u64().unwrap();
    assert!(frames >= 2, "{out}");
    let bodies = hook.bodies();
    assert_eq!(bodies.len() as u64, frames, "{bodies:?}");
    let dues: Vec<_> = bodies
        .iter()
        .map(|b| {
            b["due_at"]
                .as_str()
                .and_then(mediafarm::protocol::parse_time)
                .unwrap_or_else(|| panic!("no due_at time in {b}"))
        })
        .collect();
    assert!(dues.windows(2).all(|d| d[0] < d[1]), "{dues:?}");
    let metrics = metrics_text(logged_metrics_addr(&w, "a")).await;
    for stage in ["read", "encoded", "stored", "queued", "delivered"] {
        assert!(
            late_count(&metrics, stage) >= frames,
            "{stage}: {frames} frames\n{metrics}"
        );
    }
    assert_eq!(late_count(&metrics, "stored"), frames, "{metrics}");
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rtmp_sessions_fail_clearly_on_a_dead_server_a_missing_stream_and_another_codec() {
    let mut w = World::new("rtmp-bad", &[]).await;
    let (_nginx, port) = nginx_rtmp(&w.dir.join("nginx"));
    w.start_worker("a");
    let watch = |id: &str, url: String| json!({"stream_id": id, "stream_url": url, "interval_s": 1, "key": "b/{stream_id}/{seq}.jpg"});
    // Nothing listens there.
    let closed = mediafarm_tests::free_port();
    let err = failed(
        w.run(
            "snapshot.watch",
            watch("dead", format!("rtmp://127.0.0.1:{closed}/live/x")),
        )
        .await,
    );
    assert_eq!(err.exc_type, "SourceUnreachable", "{err:?}");
    assert!(err.message.contains("refused"), "{}", err.message);
    // The server is there, the stream is never published (nginx-rtmp refuses the play).
    let err = failed(
        w.run(
            "snapshot.watch",
            watch("nobody", format!("rtmp://127.0.0.1:{port}/live/nobody")),
        )
        .await,
    );
    assert!(
        ["SourceUnreachable", "SourceUnreadable"].contains(&&*err.exc_type),
        "{err:?}"
    );
    assert!(err.message.contains("/live/nobody"), "{}", err.message);
    // Published in a codec the engine does not decode: named in the failure.
    let h263 = format!("rtmp://127.0.0.1:{port}/live/h263");
    let _publisher = rtmp_publisher_h263(&h263);
    let err = failed(w.run("snapshot.watch", watch("h263", h263)).await);
    assert_eq!(err.exc_type, "UnsupportedCodec", "{err:?}");
    assert!(err.message.contains("Sorenson H.263"), "{}", err.message);
    // The worker is still there.
    let url = format!("rtmp://127.0.0.1:{port}/live/fine");
    let _fine = rtmp_publisher(&url);
    let job = w
        .send(
            "snapshot.watch",
            json!({"stream_id": "fine", "stream_url": url, "interval_s": 1, "duration_s": 2,
                   "key": "b/fine/{seq}.jpg"}),
        )
        .await;
    let out = job.get(WAIT).await.unwrap();
    assert!(out["frames"].as_u64().unwrap() >= 1, "{out}");
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rtsp_over_tcp_capture_and_watch() {
    let mut w = World::new("rtsp", &[]).await;
    let (_server, port) = rtsp_server(&w.dir);
    w.start_worker("a");
    let url = format!("rtsp://127.0.0.1:{port}/cam");
    let cap = w
        .run(
            "snapshot.capture",
            json!({"stream_url": url, "key": "rtsp/cap.jpg", "timeout_s": 20, "max_width": 160}),
        )
        .await
        .unwrap();
    assert_eq!(
        (cap["width"].as_u64(), cap["height"].as_u64()),
        (Some(160), Some(120))
    );
    assert_jpeg(&w.stored("rtsp/cap.jpg"), 160, 120);
    let hook = Hook::start();
    let out = w
        .run(
            "snapshot.watch",
            json!({"stream_id": "cam", "stream_url": url, "interval_s": 1, "duration_s": 5, "key": "rtsp/{seq}.jpg", "deliver": hook.url()}),
        )
        .await
        .unwrap();
    assert_eq!(out["ended"], "duration", "{out}");
    let pts: Vec<f64> = hook.bodies().iter().map(|b| f(&b["pts_s"])).collect();
    assert!(pts.len() >= 3, "{out}");
    assert_timing(&pts, 1.0, 0.5);
    assert_jpeg(&w.stored("rtsp/000000.jpg"), 320, 240);
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_beyond_the_limit_wait_for_a_free_slot() {
    let mut w = World::new("limit", &[("MEDIAFARM_SNAPSHOT_MAX_SESSIONS", "1")]).await;
    make_video(&w.media("a.mp4"), 4, "160x120", 15);
    w.start_worker("a");
    let url = w.file_url("a.mp4");
    let kw = |id: &str| json!({"stream_id": id, "stream_url": url, "interval_s": 1, "realtime": true, "key": "l/{stream_id}/{seq}.jpg"});
    let first = w.send("snapshot.watch", kw("one")).await;
    w.progress(&first.id, 1).await;
    let second = w.send("snapshot.watch", kw("two")).await;
    let a = first.get(WAIT).await.unwrap();
    let b = second.get(WAIT).await.unwrap();
    assert_eq!(
        (a["ended"].as_str(), b["ended"].as_str()),
        (Some("stream_ended"), Some("stream_ended"))
    );
    assert_eq!(a["frames"], b["frames"], "both sessions ran in full");
    // The second began only after the first had taken its last frame.
    let ended_a =
        chrono::DateTime::parse_from_rfc3339(a["last_frame"]["captured_at"].as_str().unwrap())
            .unwrap();
    let began_b = chrono::DateTime::parse_from_rfc3339(b["started_at"].as_str().unwrap()).unwrap();
    assert!(began_b >= ended_a, "{a}\n{b}");
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_session_for_a_watched_stream_is_refused() {
    let mut w = World::new("dup", &[]).await;
    // Long enough that a loaded machine still stops it before the file ends.
    make_video(&w.media("d.mp4"), 120, "160x120", 15);
    w.start_worker("a");
    let url = w.file_url("d.mp4");
    let stream_id = unique_stream("dup");
    let kw = json!({"stream_id": stream_id, "stream_url": url, "interval_s": 1, "realtime": true, "key": "d/{seq}.jpg"});
    let first = w.send("snapshot.watch", kw.clone()).await;
    w.progress(&first.id, 1).await;
    let second = w.send("snapshot.watch", kw.clone()).await;
    let err = failed(second.get(WAIT).await);
    assert_eq!(err.exc_type, "StreamBusy", "{}", err.message);
    assert!(err.message.contains(&first.id), "{}", err.message);
    // The refused one did not disturb the running session, and once that one is stopped the
    // stream can be watched again.
    mediafarm_cli(&w, &["streams", "stop", &stream_id]);
    let out = first.get(WAIT).await.unwrap();
    assert_eq!(out["ended"], "stopped", "{out}");
    let third = w.send("snapshot.watch", kw).await;
    w.progress(&third.id, 1).await;
    mediafarm_cli(&w, &["streams", "stop", &stream_id]);
    let out = third.get(WAIT).await.unwrap();
    assert_eq!(out["ended"], "stopped", "{out}");
    w.stop().await;
}

/// One worker looks up all its sessions' stop requests, revokes and claims together (one
/// batched Redis look per poll): each session still obeys only what concerns it — a stop of its
/// stream, a revoke of its job, its claim taken by another session — and the others run on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_polled_together_each_obey_only_their_own_signals() {
    let mut w = World::new("poll", &[]).await;
    make_video(&w.media("p.mp4"), 20, "160x120", 15);
    w.start_worker("a");
    let url = w.file_url("p.mp4");
    let ids: Vec<String> = ["stopped", "revoked", "superseded", "runs-on"]
        .iter()
        .map(|l| unique_stream(l))
        .collect();
    let mut jobs = Vec::new();
    for id in &ids {
        let kw = json!({"stream_id": id, "stream_url": url, "interval_s": 1, "realtime": true,
                        "loop": true, "key": "p/{stream_id}/{seq}.jpg"});
        jobs.push(w.send("snapshot.watch", kw).await);
    }
    for job in &jobs {
        w.progress(&job.id, 1).await;
    }
    mediafarm_cli(&w, &["streams", "stop", &ids[0]]);
    mediafarm_cli(&w, &["revoke", &jobs[1].id]);
    // Another session takes the third stream's claim (as after a lapse): the next renewal
    // finds it held and ends this one.
    let mut redis = w.client.backend().connection();
    redis::cmd("SET")
        .arg(format!("mediafarm-snapshot-owner-{}", ids[2]))
        .arg("someone-else")
        .arg("EX")
        .arg(60)
        .query_async::<()>(&mut redis)
        .await
        .unwrap();
    for (job, want) in jobs.iter().zip(["stopped", "revoked", "superseded"]) {
        let out = job.get(WAIT).await.unwrap();
        assert_eq!(out["ended"], want, "{out}");
    }
    // The fourth heard none of it: still running, still taking frames.
    let before = w.progress(&jobs[3].id, 1).await["frames"].as_u64().unwrap();
    w.progress(&jobs[3].id, before + 1).await;
    mediafarm_cli(&w, &["streams", "stop", &ids[3]]);
    let out = jobs[3].get(WAIT).await.unwrap();
    assert_eq!(out["ended"], "stopped", "{out}");
    for id in &ids {
        forget_stream(&w, id).await;
        redis::cmd("DEL")
            .arg(format!("mediafarm-snapshot-owner-{id}"))
            .arg(format!("mediafarm-snapshot-stop-{id}"))
            .query_async::<()>(&mut redis)
            .await
            .unwrap();
    }
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_delivery_refused_for_a_while_is_tried_again() {
    let mut w = World::new("deliver-retry", &[]).await;
    make_video(&w.media("r.mp4"), 6, "160x120", 15);
    w.start_worker("a");
    // The receiver is unavailable for its first three requests.
    let hook = Hook::flaky(3);
    let out = w
        .run(
            "snapshot.watch",
            json!({"stream_id": "retried", "stream_url": w.file_url("r.mp4"), "interval_s": 2, "key": "rt/{seq}.jpg", "deliver": hook.url()}),
        )
        .await
        .unwrap();
    assert_eq!(out["deliveries_failed"], 0, "{out}");
    let seqs: Vec<u64> = hook
        .bodies()
        .iter()
        .map(|b| b["seq"].as_u64().unwrap())
        .collect();
    let frames = out["frames"].as_u64().unwrap();
    assert!(frames >= 3, "{out}");
    assert_eq!(
        seqs,
        (0..frames).collect::<Vec<_>>(),
        "each frame once, in order"
    );
    // The first frame was tried four times under one id.
    let ids = hook.ids.lock().unwrap().clone();
    assert_eq!(ids.len() as u64, frames + 3, "{ids:?}");
    assert!(ids[..4].iter().all(|id| id == &ids[0]), "{ids:?}");
    assert!(ids[0].ends_with("-0"), "{ids:?}");
    w.stop().await;
}

/// A stream id no other run uses (the outbox and dead letters are per stream, in shared Redis).
fn unique_stream(label: &str) -> String {
    format!(
        "{label}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..10]
    )
}

/// The length of one of a stream's Redis lists (outbox, dead letters).
async fn list_len(w: &World, prefix: &str, stream_id: &str) -> u64 {
    let mut redis = w.client.backend().connection();
    redis::cmd("LLEN")
        .arg(format!("{prefix}{stream_id}"))
        .query_async(&mut redis)
        .await
        .unwrap()
}

async fn dead_letters_of(w: &World, stream_id: &str) -> Vec<Value> {
    let mut redis = w.client.backend().connection();
    let raw: Vec<String> = redis::cmd("LRANGE")
        .arg(format!("mediafarm-snapshot-dead-{stream_id}"))
        .arg(0)
        .arg(-1)
        .query_async(&mut redis)
        .await
        .unwrap();
    raw.iter()
        .map(|r| serde_json::from_str(r).unwrap())
        .collect()
}

async fn forget_stream(w: &World, stream_id: &str) {
    let mut redis = w.client.backend().connection();
    for prefix in [
        "mediafarm-snapshot-outbox-",
        "mediafarm-snapshot-dead-",
        "mediafarm-snapshot-upload-outbox-",
        "mediafarm-snapshot-upload-dead-",
        "mediafarm-snapshot-session-",
    ] {
        redis::cmd("DEL")
            .arg(format!("{prefix}{stream_id}"))
            .query_async::<()>(&mut redis)
            .await
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_survive_kill_9_while_the_receiver_is_down() {
    let mut w = World::new(
        "durable",
        &[("MEDIAFARM_SNAPSHOT_DELIVERY_BACKOFF_MAX", "2")],
    )
    .await;
    let (_nginx, port) = nginx_rtmp(&w.dir.join("nginx"));
    let stream_id = unique_stream("durable");
    let url = format!("rtmp://127.0.0.1:{port}/live/{stream_id}");
    let _publisher = rtmp_publisher(&url);
    // The receiver is down: nothing listens on its port until the end.
    let hook_port = mediafarm_tests::free_port();
    let first = w.start_worker("a");
    let job = w
        .send(
            "snapshot.watch",
            json!({"stream_id": stream_id, "stream_url": url, "interval_s": 1, "key": "d/{seq}.jpg",
                   "deliver": format!("http://127.0.0.1:{hook_port}/frames")}),
        )
        .await;
    w.progress(&job.id, 3).await;
    let waiting = list_len(&w, "mediafarm-snapshot-outbox-", &stream_id).await;
    assert!(
        waiting >= 3,
        "the frames' deliveries wait in Redis: {waiting}"
    );
    // Killed with deliveries pending; the other worker takes the redelivered job.
    w.start_worker("b");
    w.workers[first].kill9();
    let at_kill = w.progress(&job.id, 0).await["frames"].as_u64().unwrap();
    w.progress(&job.id, at_kill + 3).await;
    // The receiver comes back.
    let hook = Hook::at(hook_port);
    let end = std::time::Instant::now() + Duration::from_secs(60);
    while (hook.bodies().len() as u64) < at_kill + 3 {
        assert!(
            std::time::Instant::now() < end,
            "the outbox was not sent within 60 s: {} of {}",
            hook.bodies().len(),
            at_kill + 3
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    mediafarm_cli(&w, &["streams", "stop", &stream_id]);
    let out = job.get(WAIT).await.unwrap();
    assert_eq!(out["ended"], "stopped", "{out}");
    assert!(
        out["frames_this_job"].as_u64().unwrap() < out["frames"].as_u64().unwrap(),
        "the second worker resumed: {out}"
    );
    assert_eq!(out["deliveries_failed"], 0, "{out}");
    assert_eq!(out["deliveries_pending"], 0, "{out}");
    // Every frame exactly once, in order, each under its stable id.
    let frames = out["frames"].as_u64().unwrap();
    let session = out["session_id"].as_str().unwrap();
    let seqs: Vec<u64> = hook
        .bodies()
        .iter()
        .map(|b| b["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(
        seqs,
        (0..frames).collect::<Vec<_>>(),
        "each frame once, in order"
    );
    let ids = hook.delivery_ids.lock().unwrap().clone();
    let want: Vec<String> = (0..frames)
        .map(|seq| format!("{stream_id}/{session}/{seq}"))
        .collect();
    assert_eq!(ids, want);
    for b in hook.bodies() {
        assert_eq!(
            b["delivery_id"].as_str().unwrap(),
            format!("{stream_id}/{session}/{}", b["seq"])
        );
        assert_jpeg(&w.stored(b["key"].as_str().unwrap()), 320, 240);
    }
    assert_eq!(
        list_len(&w, "mediafarm-snapshot-outbox-", &stream_id).await,
        0
    );
    assert!(dead_letters_of(&w, &stream_id).await.is_empty());
    forget_stream(&w, &stream_id).await;
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_outbox_and_a_missed_deadline_leave_dead_letters() {
    let mut w = World::new(
        "dead-letters",
        &[
            ("MEDIAFARM_SNAPSHOT_OUTBOX_MAX", "3"),
            ("MEDIAFARM_SNAPSHOT_DELIVERY_DEADLINE", "4"),
            ("MEDIAFARM_SNAPSHOT_DELIVERY_BACKOFF_MAX", "1"),
        ],
    )
    .await;
    // Read as fast as the disk allows: all frames are taken before the first delivery's
    // deadline, so the outbox fills up.
    make_video(&w.media("d.mp4"), 8, "160x120", 15);
    w.start_worker("a");
    let stream_id = unique_stream("dead");
    let down = mediafarm_tests::free_port();
    let out = w
        .run(
            "snapshot.watch",
            json!({"stream_id": stream_id, "stream_url": w.file_url("d.mp4"), "interval_s": 1, "key": "dl/{seq}.jpg",
                   "deliver": format!("http://127.0.0.1:{down}/frames")}),
        )
        .await
        .unwrap();
    assert_eq!(out["ended"], "stream_ended", "{out}");
    let frames = out["frames"].as_u64().unwrap();
    assert!(frames >= 6, "{out}");
    assert_eq!(out["deliveries_failed"], frames, "{out}");
    assert_eq!(out["deliveries_pending"], 0, "{out}");
    let dead = dead_letters_of(&w, &stream_id).await;
    let mut by_seq: Vec<(u64, String)> = dead
        .iter()
        .map(|d| {
            (
                d["seq"].as_u64().unwrap(),
                d["reason"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    by_seq.sort();
    let want: Vec<(u64, String)> = (0..frames)
        .map(|seq| {
            let reason = if seq < 3 { "deadline" } else { "outbox_full" };
            (seq, reason.to_owned())
        })
        .collect();
    assert_eq!(by_seq, want, "{dead:?}");
    for d in &dead {
        let body: Value = serde_json::from_str(d["body"].as_str().unwrap()).unwrap();
        assert_eq!(body["seq"], d["seq"]);
        assert!(!d["detail"].as_str().unwrap().is_empty(), "{d}");
    }
    forget_stream(&w, &stream_id).await;
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_manifest_lists_every_frame_and_the_gaps_in_s3() {
    let moto = Moto::start().await;
    let bucket = moto.bucket().await;
    // Credentials come from the environment, as in production; moto accepts any.
    std::env::set_var("AWS_ACCESS_KEY_ID", "test-key");
    std::env::set_var("AWS_SECRET_ACCESS_KEY", "test-secret");
    let endpoint = moto.endpoint();
    let storage_url = format!("s3://{bucket}/media");
    let mut w = World::new(
        "manifest",
        &[
            ("MEDIAFARM_STORAGE_URL", &storage_url),
            ("MEDIAFARM_STORAGE_S3_ENDPOINT", &endpoint),
            ("MEDIAFARM_STORAGE_S3_PATH_STYLE", "true"),
            ("AWS_ACCESS_KEY_ID", "test-key"),
            ("AWS_SECRET_ACCESS_KEY", "test-secret"),
            ("MEDIAFARM_SNAPSHOT_MANIFEST_PREFIX", "audit"),
            ("MEDIAFARM_SNAPSHOT_RECONNECT_WINDOW", "30"),
        ],
    )
    .await;
    let mut s = mediafarm_tests::settings();
    s.storage_url = storage_url.clone();
    s.storage_s3_endpoint = Some(endpoint.clone());
    s.storage_s3_path_style = true;
    let storage = mediafarm::storage::Storage::from_settings(&s).unwrap();

    let (_nginx, port) = nginx_rtmp(&w.dir.join("nginx"));
    let stream_id = unique_stream("audit");
    let url = format!("rtmp://127.0.0.1:{port}/live/{stream_id}");
    let publisher = rtmp_publisher(&url);
    w.start_worker("a");
    let day_before = chrono::Utc::now().format("%Y-%m-%d").to_string();
    let job = w
        .send(
            "snapshot.watch",
            json!({"stream_id": stream_id, "stream_url": url, "interval_s": 1, "key": "a/{seq}.jpg"}),
        )
        .await;
    let before = w.progress(&job.id, 3).await["frames"].as_u64().unwrap();
    // The stream is down for a few seconds: the session reconnects, the manifest has a gap.
    drop(publisher);
    tokio::time::sleep(Duration::from_secs(4)).await;
    let _publisher = rtmp_publisher(&url);
    w.progress(&job.id, before + 3).await;
    mediafarm_cli(&w, &["streams", "stop", &stream_id]);
    let out = job.get(WAIT).await.unwrap();
    assert_eq!(out["ended"], "stopped", "{out}");
    assert!(out["reconnects"].as_u64().unwrap() >= 1, "{out}");
    let frames = out["frames"].as_u64().unwrap();
    let day_after = chrono::Utc::now().format("%Y-%m-%d").to_string();

    let mut dates = vec![day_before];
    if !dates.contains(&day_after) {
        dates.push(day_after);
    }
    let mut lines: Vec<Value> = Vec::new();
    for date in &dates {
        let dir = format!("audit/{stream_id}/{date}");
        let Ok(index) = storage.get(&format!("{dir}/index.json"), 1 << 20).await else {
            continue;
        };
        let index: Value = serde_json::from_slice(&index).unwrap();
        assert_eq!(index["format"], "mediafarm.snapshot.manifest/1", "{index}");
        assert_eq!(index["stream_id"], stream_id.as_str());
        let mut counted = 0;
        for part in index["parts"].as_array().unwrap() {
            let text = storage
                .get(part["key"].as_str().unwrap(), 1 << 20)
                .await
                .unwrap();
            assert_eq!(
                part["sha256"].as_str().unwrap(),
                sha256_hex(&text),
                "{part}"
            );
            assert_eq!(part["bytes"].as_u64().unwrap(), text.len() as u64);
            let part_lines: Vec<Value> = std::str::from_utf8(&text)
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect();
            assert_eq!(part["entries"].as_u64().unwrap(), part_lines.len() as u64);
            counted += part_lines.len() as u64;
            lines.extend(part_lines);
        }
        assert_eq!(index["entries"].as_u64().unwrap(), counted, "{index}");
    }
    assert_eq!(lines.first().unwrap()["type"], "session_start", "{lines:?}");
    let end = lines.last().unwrap();
    assert_eq!(end["type"], "session_end", "{lines:?}");
    assert_eq!(end["ended"], "stopped");
    assert_eq!(end["frames"].as_u64().unwrap(), frames);
    // Every frame, in order, each checkable against the stored object.
    let listed: Vec<&Value> = lines.iter().filter(|l| l["type"] == "frame").collect();
    let seqs: Vec<u64> = listed.iter().map(|l| l["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (0..frames).collect::<Vec<_>>());
    for l in &listed {
        let data = storage
            .get(l["key"].as_str().unwrap(), 1 << 24)
            .await
            .unwrap();
        assert_eq!(l["sha256"].as_str().unwrap(), sha256_hex(&data), "{l}");
        assert_eq!(l["bytes"].as_u64().unwrap(), data.len() as u64);
        assert!(
            l["pts_s"].is_number() && l["captured_at"].is_string(),
            "{l}"
        );
    }
    // The drop is a gap between two listed frames, with its reason.
    let gap = lines
        .iter()
        .position(|l| l["type"] == "gap")
        .unwrap_or_else(|| panic!("a gap is recorded: {lines:?}"));
    assert_eq!(lines[gap]["reason"], "stream_dropped", "{}", lines[gap]);
    assert!(
        lines[gap]["missed"].as_u64().unwrap() >= 1,
        "{}",
        lines[gap]
    );
    assert_eq!(lines[gap + 1]["type"], "frame");
    assert_eq!(lines[gap]["to"], lines[gap + 1]["captured_at"]);
    let mut redis = w.client.backend().connection();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("mediafarm-snapshot-manifest-{stream_id}-*"))
        .query_async(&mut redis)
        .await
        .unwrap();
    for k in keys {
        redis::cmd("DEL")
            .arg(k)
            .query_async::<()>(&mut redis)
            .await
            .unwrap();
    }
    forget_stream(&w, &stream_id).await;
    w.stop().await;
}

fn sha256_hex(data: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(data))
}

async fn upload_dead_letters_of(w: &World, stream_id: &str) -> Vec<Value> {
    let mut redis = w.client.backend().connection();
    let raw: Vec<String> = redis::cmd("LRANGE")
        .arg(format!("mediafarm-snapshot-upload-dead-{stream_id}"))
        .arg(0)
        .arg(-1)
        .query_async(&mut redis)
        .await
        .unwrap();
    raw.iter()
        .map(|r| serde_json::from_str(r).unwrap())
        .collect()
}

/// The frame lines of a stream's audit manifest in the world's file storage (prefix `audit`),
/// seq → SHA-256; and the stream's manifest lists in Redis dropped.
async fn manifest_frames(w: &World, stream_id: &str) -> std::collections::BTreeMap<u64, String> {
    let mut frames = std::collections::BTreeMap::new();
    let root = w.dir.join("storage").join("audit").join(stream_id);
    for day in std::fs::read_dir(&root).unwrap().flatten() {
        for part in std::fs::read_dir(day.path()).unwrap().flatten() {
            if part.path().extension().is_some_and(|e| e == "jsonl") {
                for line in std::fs::read_to_string(part.path()).unwrap().lines() {
                    let v: Value = serde_json::from_str(line).unwrap();
                    if v["type"] == "frame" {
                        frames.insert(
                            v["seq"].as_u64().unwrap(),
                            v["sha256"].as_str().unwrap().to_owned(),
                        );
                    }
                }
            }
        }
    }
    let mut redis = w.client.backend().connection();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("mediafarm-snapshot-manifest-{stream_id}-*"))
        .query_async(&mut redis)
        .await
        .unwrap();
    for k in keys {
        redis::cmd("DEL")
            .arg(k)
            .query_async::<()>(&mut redis)
            .await
            .unwrap();
    }
    frames
}

/// `[snapshot_authorities.<name>]` as the environment's JSON: the receiver's CA, and the
/// client certificate of `client` (none when `None`).
/// The upload URL of a test authority listening on `port`.
fn authority_url(port: u16) -> String {
    format!("https://127.0.0.1:{port}/frames/{{stream_id}}/{{seq}}.jpg")
}

/// The paths the authority got are frames 0..`frames` of `stream_id`, each once, in order.
fn assert_uploaded_in_order(got: &[String], stream_id: &str, frames: u64) {
    let want: Vec<String> = (0..frames)
        .map(|seq| format!("/frames/{stream_id}/{seq}.jpg"))
        .collect();
    assert_eq!(got, want);
}

fn authority(url: &str, ca: &TestPki, client: Option<&TestPki>) -> Value {
    let mut table = json!({"url": url, "ca_certs": ca.ca});
    if let Some(c) = client {
        table["certfile"] = json!(c.client_cert);
        table["keyfile"] = json!(c.client_key);
    }
    table
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_are_uploaded_to_an_authority_over_mutual_tls() {
    let pki_dir = mediafarm_tests::temp_dir("snap-mtls-pki");
    let pki = test_pki(&pki_dir.join("authority"));
    // Another CA: its client certificate is one the authority does not trust.
    let stranger = test_pki(&pki_dir.join("stranger"));
    let receiver = MtlsReceiver::start(&pki);
    let url = authority_url(receiver.port);
    let authorities = json!({
        "city": authority(&url, &pki, Some(&pki)),
        "nocert": authority(&url, &pki, None),
        "stranger": authority(&url, &pki, Some(&stranger)),
    })
    .to_string();
    let mut w = World::new(
        "mtls",
        &[
            ("MEDIAFARM_SNAPSHOT_AUTHORITIES", &authorities),
            ("MEDIAFARM_SNAPSHOT_MANIFEST_PREFIX", "audit"),
        ],
    )
    .await;
    make_video(&w.media("m.mp4"), 5, "160x120", 15);

    // A key file that cannot be read stops the worker at start, naming the authority and file.
    let missing = pki_dir.join("no-such.key");
    let bad = json!({"broken": {"url": url, "certfile": pki.client_cert, "keyfile": missing}})
        .to_string();
    let log = w.dir.join("bad-start.log");
    let mut proc = std::process::Command::new(snapshot_binary())
        .args(["-Q", &w.queue, "--metrics-addr", "127.0.0.1:0"])
        .envs(w.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .env("MEDIAFARM_SNAPSHOT_AUTHORITIES", &bad)
        .env("NO_COLOR", "1")
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::fs::File::create(w.dir.join("bad-start.err")).unwrap())
        .spawn()
        .unwrap();
    let status = (0..600)
        .find_map(|_| {
            let s = proc.try_wait().unwrap();
            if s.is_none() {
                std::thread::sleep(Duration::from_millis(100));
            }
            s
        })
        .unwrap_or_else(|| {
            let _ = proc.kill();
            panic!("a worker with an unreadable key file kept running")
        });
    assert!(!status.success());
    let said = std::fs::read_to_string(w.dir.join("bad-start.err")).unwrap()
        + &std::fs::read_to_string(&log).unwrap();
    assert!(
        said.contains("snapshot_authorities.broken keyfile: cannot read")
            && said.contains("no-such.key"),
        "{said}"
    );

    w.start_worker("a");
    // Without a client certificate, and with one the authority's CA did not sign: each frame's
    // upload is a dead letter naming the cause, at once, and the worker goes on.
    for (name, hint) in [
        (
            "nocert",
            "set snapshot_authorities.nocert certfile and keyfile",
        ),
        ("stranger", "did not accept the client certificate"),
    ] {
        let stream_id = unique_stream(name);
        let out = w
            .run(
                "snapshot.watch",
                json!({"stream_id": stream_id, "stream_url": w.file_url("m.mp4"), "interval_s": 1,
                       "key": "mt/{stream_id}/{seq}.jpg", "authority": name}),
            )
            .await
            .unwrap();
        let frames = out["frames"].as_u64().unwrap();
        assert!(frames >= 3, "{out}");
        assert_eq!(out["uploads_failed"], frames, "{out}");
        assert_eq!(out["uploads_pending"], 0, "{out}");
        let dead = upload_dead_letters_of(&w, &stream_id).await;
        assert_eq!(dead.len() as u64, frames, "{dead:?}");
        for d in &dead {
            assert_eq!(d["reason"], "tls", "{d}");
            let detail = d["detail"].as_str().unwrap();
            assert!(
                detail.contains(&format!("handshake with authority {name} failed"))
                    && detail.contains(hint),
                "{detail}"
            );
        }
        manifest_frames(&w, &stream_id).await;
        forget_stream(&w, &stream_id).await;
    }
    assert!(receiver.received().is_empty());
    let refused = receiver.refused();
    assert!(refused.len() >= 2, "{refused:?}");

    // A name the worker does not have fails the job, listing those it has.
    let err = failed(
        w.run(
            "snapshot.watch",
            json!({"stream_id": unique_stream("nobody"), "stream_url": w.file_url("m.mp4"),
                   "key": "mt/{seq}.jpg", "authority": "nobody"}),
        )
        .await,
    );
    assert_eq!(err.exc_type, "UnknownAuthority", "{err:?}");
    assert!(
        err.message.contains("city, nocert, stranger"),
        "{}",
        err.message
    );

    // With the authority's client certificate: every frame arrives, in order, whole.
    let stream_id = unique_stream("city");
    let out = w
        .run(
            "snapshot.watch",
            json!({"stream_id": stream_id, "stream_url": w.file_url("m.mp4"), "interval_s": 1,
                   "key": "mt/{stream_id}/{seq}.jpg", "authority": "city"}),
        )
        .await
        .unwrap();
    let frames = out["frames"].as_u64().unwrap();
    assert!(frames >= 3, "{out}");
    assert_eq!(out["uploads_failed"], 0, "{out}");
    assert_eq!(out["uploads_pending"], 0, "{out}");
    let session = out["session_id"].as_str().unwrap();
    let manifest = manifest_frames(&w, &stream_id).await;
    assert_eq!(manifest.len() as u64, frames, "{manifest:?}");
    let got = receiver.received();
    assert_eq!(got.len() as u64, frames, "one PUT per frame");
    for (seq, r) in got.iter().enumerate() {
        assert_eq!(r.method, "PUT");
        assert_eq!(r.path, format!("/frames/{stream_id}/{seq}.jpg"));
        let header = |name: &str| r.headers.get(name).cloned().unwrap_or_default();
        assert_eq!(header("content-type"), "image/jpeg");
        assert_eq!(header("x-mediafarm-stream-id"), stream_id);
        assert_eq!(header("x-mediafarm-seq"), seq.to_string());
        assert_eq!(
            header("x-mediafarm-delivery-id"),
            format!("{stream_id}/{session}/{seq}")
        );
        assert!(!header("x-mediafarm-captured-at").is_empty());
        let sha = sha256_hex(&r.body);
        assert_eq!(header("x-mediafarm-sha256"), sha);
        assert_eq!(manifest[&(seq as u64)], sha, "the manifest's SHA-256");
        assert_eq!(
            r.body,
            w.stored(&format!("mt/{stream_id}/{seq:06}.jpg")),
            "the stored frame"
        );
        assert_jpeg(&r.body, 160, 120);
    }
    assert!(upload_dead_letters_of(&w, &stream_id).await.is_empty());
    forget_stream(&w, &stream_id).await;
    w.stop().await;
    let _ = std::fs::remove_dir_all(pki_dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authority_uploads_survive_kill_9_while_the_authority_is_down() {
    let pki_dir = mediafarm_tests::temp_dir("snap-mtls-down-pki");
    let pki = test_pki(&pki_dir);
    // The authority is down: nothing listens on its port until later.
    let port = mediafarm_tests::free_port();
    let url = authority_url(port);
    let authorities = json!({"late": authority(&url, &pki, Some(&pki))}).to_string();
    let mut w = World::new(
        "mtls-down",
        &[
            ("MEDIAFARM_SNAPSHOT_AUTHORITIES", &authorities),
            ("MEDIAFARM_SNAPSHOT_MANIFEST_PREFIX", "audit"),
            ("MEDIAFARM_SNAPSHOT_DELIVERY_BACKOFF_MAX", "1"),
        ],
    )
    .await;
    // 12 s at its own pace, a tick every second.
    make_video(&w.media("late.mp4"), 12, "160x120", 15);
    let stream_id = unique_stream("late");
    let first = w.start_worker("a");
    let job = w
        .send(
            "snapshot.watch",
            json!({"stream_id": stream_id, "stream_url": w.file_url("late.mp4"), "interval_s": 1,
                   "realtime": true, "key": "ml/{stream_id}/{seq}.jpg", "authority": "late"}),
        )
        .await;
    w.progress(&job.id, 3).await;
    let waiting = list_len(&w, "mediafarm-snapshot-upload-outbox-", &stream_id).await;
    assert!(waiting >= 3, "the uploads wait in Redis: {waiting}");
    assert_eq!(
        list_len(&w, "mediafarm-snapshot-outbox-", &stream_id).await,
        0,
        "no webhook lane for a session without deliver"
    );
    // Killed with uploads pending; the other worker takes the redelivered job.
    w.start_worker("b");
    w.workers[first].kill9();
    let at_kill = w.progress(&job.id, 0).await["frames"].as_u64().unwrap();
    w.progress(&job.id, at_kill + 2).await;
    // The authority comes back.
    let receiver = MtlsReceiver::at(&pki, port);
    let out = job.get(WAIT).await.unwrap();
    assert_eq!(out["ended"], "stream_ended", "{out}");
    assert!(
        out["frames_this_job"].as_u64().unwrap() < out["frames"].as_u64().unwrap(),
        "the second worker resumed: {out}"
    );
    assert_eq!(out["uploads_failed"], 0, "{out}");
    assert_eq!(out["uploads_pending"], 0, "{out}");
    // Every frame exactly once (the authority was down while the worker died), in order.
    let frames = out["frames"].as_u64().unwrap();
    let manifest = manifest_frames(&w, &stream_id).await;
    assert_eq!(manifest.len() as u64, frames, "{manifest:?}");
    let got = receiver.received();
    let paths: Vec<String> = got.iter().map(|r| r.path.clone()).collect();
    assert_uploaded_in_order(&paths, &stream_id, frames);
    for (seq, r) in got.iter().enumerate() {
        assert_eq!(manifest[&(seq as u64)], sha256_hex(&r.body));
    }
    assert_eq!(
        list_len(&w, "mediafarm-snapshot-upload-outbox-", &stream_id).await,
        0
    );
    assert!(upload_dead_letters_of(&w, &stream_id).await.is_empty());
    forget_stream(&w, &stream_id).await;
    w.stop().await;
    let _ = std::fs::remove_dir_all(pki_dir);
}

/// The tests whose worker runs the outbox sweeper, one at a time: a sweeper sends every
/// stranded outbox in the shared Redis, so beside another such test it would also sweep that
/// test's streams (and race its sweeper) while the other test counts its deliveries.
static SWEEPER_ON: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stranded_outbox_is_swept_without_a_new_session() {
    let _sweeper_on = SWEEPER_ON.lock().await;
    let pki_dir = mediafarm_tests::temp_dir("snap-sweep-pki");
    let pki = test_pki(&pki_dir);
    // Webhook receiver and authority both down while the session runs and ends.
    let (hook_port, authority_port) = (mediafarm_tests::free_port(), mediafarm_tests::free_port());
    let url = authority_url(authority_port);
    let authorities = json!({"late": authority(&url, &pki, Some(&pki))}).to_string();
    let mut w = World::new(
        "sweep",
        &[
            ("MEDIAFARM_SNAPSHOT_AUTHORITIES", &authorities),
            ("MEDIAFARM_SNAPSHOT_DELIVERY_BACKOFF_MAX", "1"),
            ("MEDIAFARM_SNAPSHOT_OUTBOX_SWEEP", "1"),
        ],
    )
    .await;
    make_video(&w.media("s.mp4"), 5, "160x120", 15);
    w.start_worker("a");
    let stream_id = unique_stream("swept");
    let out = w
        .run(
            "snapshot.watch",
            json!({"stream_id": stream_id, "stream_url": w.file_url("s.mp4"), "interval_s": 1,
                   "key": "sw/{stream_id}/{seq}.jpg", "authority": "late",
                   "deliver": format!("http://127.0.0.1:{hook_port}/frames")}),
        )
        .await
        .unwrap();
    let frames = out["frames"].as_u64().unwrap();
    assert!(frames >= 3, "{out}");
    // The session ended with everything still queued, and no session follows on the stream.
    assert_eq!(out["deliveries_pending"], frames, "{out}");
    assert_eq!(out["uploads_pending"], frames, "{out}");
    // Both come back; the worker's sweeper sends both outboxes, in order.
    let hook = Hook::at(hook_port);
    let receiver = MtlsReceiver::at(&pki, authority_port);
    let end = std::time::Instant::now() + Duration::from_secs(60);
    while (hook.bodies().len() as u64) < frames || (receiver.received().len() as u64) < frames {
        assert!(
            std::time::Instant::now() < end,
            "not swept within 60 s: {} deliveries and {} uploads of {frames}",
            hook.bodies().len(),
            receiver.received().len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let seqs: Vec<u64> = hook
        .bodies()
        .iter()
        .map(|b| b["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, (0..frames).collect::<Vec<_>>());
    let paths: Vec<String> = receiver.received().iter().map(|r| r.path.clone()).collect();
    assert_uploaded_in_order(&paths, &stream_id, frames);
    // Emptied, nothing given up.
    for prefix in [
        "mediafarm-snapshot-outbox-",
        "mediafarm-snapshot-upload-outbox-",
    ] {
        let end = std::time::Instant::now() + Duration::from_secs(10);
        while list_len(&w, prefix, &stream_id).await > 0 {
            assert!(std::time::Instant::now() < end, "{prefix} not emptied");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    assert!(dead_letters_of(&w, &stream_id).await.is_empty());
    assert!(upload_dead_letters_of(&w, &stream_id).await.is_empty());
    forget_stream(&w, &stream_id).await;
    let mut redis = w.client.backend().connection();
    redis::cmd("DEL")
        .arg(format!("mediafarm-snapshot-sweep-{stream_id}"))
        .query_async::<()>(&mut redis)
        .await
        .unwrap();
    w.stop().await;
    let _ = std::fs::remove_dir_all(pki_dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_in_flight_when_the_grace_ends_is_not_sent_again() {
    let _sweeper_on = SWEEPER_ON.lock().await;
    let hook_port = mediafarm_tests::free_port();
    // Each answer takes 3 s, so the session's 10 s grace ends with a delivery in flight.
    let hook = Hook::slow_at(hook_port, Duration::from_secs(3));
    let mut w = World::new("inflight", &[("MEDIAFARM_SNAPSHOT_OUTBOX_SWEEP", "1")]).await;
    make_video(&w.media("v.mp4"), 8, "160x120", 15);
    w.start_worker("a");
    let stream_id = unique_stream("inflight");
    let out = w
        .run(
            "snapshot.watch",
            json!({"stream_id": stream_id, "stream_url": w.file_url("v.mp4"), "interval_s": 1,
                   "key": "if/{stream_id}/{seq}.jpg",
                   "deliver": format!("http://127.0.0.1:{hook_port}/frames")}),
        )
        .await
        .unwrap();
    let frames = out["frames"].as_u64().unwrap();
    assert!(frames >= 6, "{out}");
    // The grace ended before the outbox was empty: the sweeper sends the rest.
    assert!(out["deliveries_pending"].as_u64().unwrap() > 0, "{out}");
    hook.wait_for_deliveries(frames as usize, Duration::from_secs(90))
        .await;
    // A second send of the delivery cut off at the grace would still be on its way.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let session = out["session_id"].as_str().unwrap();
    let want: Vec<String> = (0..frames)
        .map(|seq| format!("{stream_id}/{session}/{seq}"))
        .collect();
    assert_eq!(
        *hook.delivery_ids.lock().unwrap(),
        want,
        "each frame once, in order"
    );
    assert!(dead_letters_of(&w, &stream_id).await.is_empty());
    forget_stream(&w, &stream_id).await;
    let mut redis = w.client.backend().connection();
    redis::cmd("DEL")
        .arg(format!("mediafarm-snapshot-sweep-{stream_id}"))
        .query_async::<()>(&mut redis)
        .await
        .unwrap();
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_starting_on_a_swept_stream_takes_over_without_sending_twice() {
    let _sweeper_on = SWEEPER_ON.lock().await;
    let hook_port = mediafarm_tests::free_port();
    let url = format!("http://127.0.0.1:{hook_port}/frames");
    let mut w = World::new(
        "handover",
        &[
            ("MEDIAFARM_SNAPSHOT_DELIVERY_BACKOFF_MAX", "1"),
            ("MEDIAFARM_SNAPSHOT_OUTBOX_SWEEP", "1"),
        ],
    )
    .await;
    make_video(&w.media("long.mp4"), 8, "160x120", 15);
    make_video(&w.media("short.mp4"), 4, "160x120", 15);
    w.start_worker("a");
    let stream_id = unique_stream("handover");
    // The receiver is down while the first session runs: it ends with every frame queued.
    let first = w
        .run(
            "snapshot.watch",
            json!({"stream_id": stream_id, "stream_url": w.file_url("long.mp4"), "interval_s": 1,
                   "key": "ho/{stream_id}/{seq}.jpg", "deliver": url}),
        )
        .await
        .unwrap();
    let queued = first["frames"].as_u64().unwrap();
    assert!(queued >= 6, "{first}");
    assert_eq!(first["deliveries_pending"], queued, "{first}");
    // It comes back slow, so the sweeper has a delivery in flight most of the time...
    let hook = Hook::slow_at(hook_port, Duration::from_millis(800));
    let end = std::time::Instant::now() + Duration::from_secs(30);
    while hook.delivery_ids.lock().unwrap().is_empty() {
        assert!(std::time::Instant::now() < end, "the sweeper sent nothing");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // ...when a session starts on the stream and takes the outbox over.
    let second = w
        .run(
            "snapshot.watch",
            json!({"stream_id": stream_id, "stream_url": w.file_url("short.mp4"), "interval_s": 1,
                   "realtime": true, "key": "ho/{stream_id}/{seq}.jpg", "deliver": url}),
        )
        .await
        .unwrap();
    let taken = second["frames_this_job"].as_u64().unwrap();
    assert!(taken >= 3, "{second}");
    let total = (queued + taken) as usize;
    hook.wait_for_deliveries(total, Duration::from_secs(60))
        .await;
    // A duplicate would be a request still queued at the receiver: give it time to show.
    tokio::time::sleep(Duration::from_secs(2)).await;
    // Each delivery once: the first session's frames in order, then the second's.
    let ids = hook.delivery_ids.lock().unwrap().clone();
    let (s1, s2) = (
        first["session_id"].as_str().unwrap(),
        second["session_id"].as_str().unwrap(),
    );
    let mut want: Vec<String> = (0..queued)
        .map(|seq| format!("{stream_id}/{s1}/{seq}"))
        .collect();
    let second_seqs: Vec<u64> = hook
        .bodies()
        .iter()
        .filter(|b| b["session_id"] == s2)
        .map(|b| b["seq"].as_u64().unwrap())
        .collect();
    want.extend(
        second_seqs
            .iter()
            .map(|seq| format!("{stream_id}/{s2}/{seq}")),
    );
    assert_eq!(ids, want, "each frame once, in order");
    assert_eq!(second_seqs.len() as u64, taken);
    assert!(
        second_seqs.windows(2).all(|p| p[0] < p[1]),
        "{second_seqs:?}"
    );
    assert!(dead_letters_of(&w, &stream_id).await.is_empty());
    forget_stream(&w, &stream_id).await;
    w.stop().await;
}

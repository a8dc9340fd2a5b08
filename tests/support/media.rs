//! Media sources made at test time with the real tools: FFmpeg test patterns (`testsrc2` →
//! H.264, small sizes, short GOPs) as files, a live HLS playlist being written, an RTMP
//! publisher through nginx's RTMP module, GStreamer's RTSP server, a static HTTP server, and a
//! TCP server that never answers. Each server runs on a free port as a [`Proc`], stopped when
//! dropped.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::free_port;
use crate::process::{wait_port, Proc};

/// Runs the ffmpeg CLI quietly (overwriting outputs); panics when it fails.
pub fn ffmpeg(args: &[&str]) {
    let status = Command::new("ffmpeg")
        .args(["-hide_banner", "-loglevel", "error", "-y"])
        .args(args)
        .stdin(Stdio::null())
        .status()
        .expect("ffmpeg runs (scripts/setup.d/snapshot.sh installs it)");
    assert!(status.success(), "ffmpeg {args:?} failed");
}

/// ffmpeg's H.264 encoder arguments for a `size` picture with a keyframe every `gop` frames.
pub fn h264_args(size: &str, gop: u32) -> Vec<String> {
    [
        "-c:v",
        "libx264",
        "-preset",
        "ultrafast",
        "-tune",
        "zerolatency",
        "-g",
        &gop.to_string(),
        "-keyint_min",
        &gop.to_string(),
        "-sc_threshold",
        "0",
        "-pix_fmt",
        "yuv420p",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .chain(std::iter::once("-s".to_owned()))
    .chain(std::iter::once(size.to_owned()))
    .collect()
}

/// An H.264 MP4 of `testsrc2`: `secs` seconds at 30 fps, `size`, a keyframe every `gop` frames.
pub fn make_video(path: &Path, secs: u32, size: &str, gop: u32) {
    let mut args: Vec<String> = vec![
        "-f".into(),
        "lavfi".into(),
        "-i".into(),
        format!("testsrc2=size={size}:rate=30"),
        "-t".into(),
        secs.to_string(),
    ];
    args.extend(h264_args(size, gop));
    args.push(path.display().to_string());
    ffmpeg(&args.iter().map(String::as_str).collect::<Vec<_>>());
}

/// A TCP server that accepts connections and never says anything.
pub fn silent_listener() -> (u16, std::thread::JoinHandle<()>, Arc<Mutex<bool>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    listener.set_nonblocking(true).unwrap();
    let done = Arc::new(Mutex::new(false));
    let flag = done.clone();
    let handle = std::thread::spawn(move || {
        let mut held = Vec::new();
        while !*flag.lock().unwrap() {
            if let Ok((s, _)) = listener.accept() {
                held.push(s);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    (port, handle, done)
}

/// `python3 -m http.server` on a free port serving `dir`.
pub fn http_server(dir: &Path) -> (Proc, u16) {
    let port = free_port();
    let proc = Proc::spawn(
        Command::new("python3")
            .args([
                "-m",
                "http.server",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--directory",
            ])
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    );
    wait_port(port);
    (proc, port)
}

/// How long a live test source runs if its test does not stop it first. A test kills its
/// source when it drops it; the limit is long because on a loaded machine a session may start
/// a minute after its source did (a 60 s source once ended before its session opened it).
const LIVE_SOURCE_LIMIT_S: u32 = 600;

/// ffmpeg's arguments for a live 320x240 `testsrc2` of `secs` seconds read at real time and
/// encoded as H.264 (GOP 15); the caller adds the output.
fn live_h264_args(secs: u32) -> Vec<String> {
    let mut args: Vec<String> = [
        "-hide_banner",
        "-loglevel",
        "error",
        "-re",
        "-f",
        "lavfi",
        "-i",
        "testsrc2=size=320x240:rate=30",
        "-t",
    ]
    .map(String::from)
    .into();
    args.push(secs.to_string());
    args.extend(h264_args("320x240", 15));
    args
}

/// ffmpeg writing a live HLS playlist (1 s segments) into `dir` at real time until dropped.
pub fn hls_writer(dir: &Path) -> Proc {
    let mut args = live_h264_args(LIVE_SOURCE_LIMIT_S);
    args.extend(
        [
            "-f",
            "hls",
            "-hls_time",
            "1",
            "-hls_list_size",
            "6",
            "-hls_flags",
            "delete_segments",
        ]
        .iter()
        .map(|s| (*s).to_owned()),
    );
    args.push(dir.join("index.m3u8").display().to_string());
    let proc = Proc::spawn(Command::new("ffmpeg").args(&args).stdout(Stdio::null()));
    for _ in 0..200 {
        if dir.join("index.m3u8").exists() {
            return proc;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("ffmpeg wrote no playlist");
}

/// nginx with the RTMP module on a free port, its config and files in `dir`, run as this user.
pub fn nginx_rtmp(dir: &Path) -> (Proc, u16) {
    nginx_rtmp_with(dir, "idle_streams off;")
}

/// [`nginx_rtmp`] with these directives in application `live` instead of `idle_streams off;`
/// (e.g. `on_publish URL;`).
pub fn nginx_rtmp_with(dir: &Path, live_directives: &str) -> (Proc, u16) {
    let port = free_port();
    let module = [
        "/usr/lib/nginx/modules/ngx_rtmp_module.so",
        "/usr/lib64/nginx/modules/ngx_rtmp_module.so",
    ]
    .into_iter()
    .find(|p| Path::new(p).exists())
    .expect("nginx's RTMP module (libnginx-mod-rtmp; scripts/setup.d/snapshot.sh)");
    std::fs::create_dir_all(dir.join("logs")).unwrap();
    let conf = format!(
        "load_module {module};\n\
         daemon off;\nmaster_process off;\nerror_log {d}/logs/error.log warn;\npid {d}/nginx.pid;\n\
         events {{ worker_connections 256; }}\n\
         rtmp {{ server {{ listen 127.0.0.1:{port}; application live {{ live on; record off; {live_directives} }} }} }}\n",
        d = dir.display()
    );
    std::fs::write(dir.join("nginx.conf"), conf).unwrap();
    let proc = Proc::spawn(
        Command::new("nginx")
            .args([
                "-p",
                dir.to_str().unwrap(),
                "-c",
                dir.join("nginx.conf").to_str().unwrap(),
                "-e",
                dir.join("logs/error.log").to_str().unwrap(),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    );
    wait_port(port);
    (proc, port)
}

/// ffmpeg publishing a live `testsrc2` to `url` over RTMP until dropped, returned once the
/// stream can be played.
pub fn rtmp_publisher(url: &str) -> Proc {
    rtmp_publisher_of(url, live_h264_args(LIVE_SOURCE_LIMIT_S))
}

/// [`rtmp_publisher`] in Sorenson H.263 (FLV's own codec, `-c:v flv`) instead of H.264: a
/// stream FFmpeg reads but the RTMP engine does not decode.
pub fn rtmp_publisher_h263(url: &str) -> Proc {
    let limit = LIVE_SOURCE_LIMIT_S.to_string();
    let args = [
        "-hide_banner",
        "-loglevel",
        "error",
        "-re",
        "-f",
        "lavfi",
        "-i",
        "testsrc2=size=320x240:rate=30",
        "-t",
        &limit,
        "-c:v",
        "flv",
        "-g",
        "15",
    ];
    rtmp_publisher_of(url, args.map(String::from).into())
}

fn rtmp_publisher_of(url: &str, mut args: Vec<String>) -> Proc {
    args.extend(["-f".to_owned(), "flv".to_owned(), url.to_owned()]);
    // nginx-rtmp refuses a player until the stream is published ("Operation not permitted"),
    // and refuses a publisher while it still holds the previous one of the same name (a
    // publisher killed a moment ago, on a loaded machine): start the publisher again if it
    // exits, and return only once ffprobe can read the stream, so a test never races either.
    let end = std::time::Instant::now() + Duration::from_secs(30);
    let mut publisher = Proc::spawn(Command::new("ffmpeg").args(&args).stdout(Stdio::null()));
    while std::time::Instant::now() < end {
        if publisher.0.try_wait().is_ok_and(|exited| exited.is_some()) {
            std::thread::sleep(Duration::from_millis(500));
            publisher = Proc::spawn(Command::new("ffmpeg").args(&args).stdout(Stdio::null()));
            continue;
        }
        let probed = Command::new("timeout")
            // A short probe: with ffprobe's defaults, a video-only FLV live stream is analysed
            // for more than 5 s, so the check would never pass in time.
            .args(["5", "ffprobe", "-v", "quiet", "-analyzeduration", "100000"])
            .args(["-probesize", "32768", url])
            .status()
            .is_ok_and(|s| s.success());
        if probed {
            return publisher;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!("the RTMP publisher to {url} was not readable within 30 s");
}

/// An RTSP server from Debian (GStreamer's libgstrtspserver, driven through python3-gi): a
/// live H.264 test pattern at `rtsp://127.0.0.1:<port>/cam`, TCP interleaved only.
pub fn rtsp_server(dir: &Path) -> (Proc, u16) {
    let port = free_port();
    let script = r#"
import sys, gi
gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
gi.require_version("GstRtsp", "1.0")
from gi.repository import Gst, GstRtsp, GstRtspServer, GLib
Gst.init(None)
server = GstRtspServer.RTSPServer()
server.set_address("127.0.0.1")
server.set_service(sys.argv[1])
factory = GstRtspServer.RTSPMediaFactory()
factory.set_launch("( videotestsrc is-live=true pattern=smpte ! video/x-raw,width=320,height=240,framerate=30/1 "
                   "! x264enc tune=zerolatency speed-preset=ultrafast key-int-max=15 "
                   "! rtph264pay name=pay0 pt=96 config-interval=1 )")
factory.set_shared(True)
factory.set_protocols(GstRtsp.RTSPLowerTrans.TCP)
server.get_mount_points().add_factory("/cam", factory)
server.attach(None)
GLib.MainLoop().run()
"#;
    let log = std::fs::File::create(dir.join("rtsp.log")).unwrap();
    let proc = Proc::spawn(
        // Debian's python3: python3-gi and the GStreamer typelibs are system packages.
        Command::new("/usr/bin/python3")
            .args(["-c", script, &port.to_string()])
            .stdout(Stdio::null())
            .stderr(log),
    );
    wait_port(port);
    (proc, port)
}

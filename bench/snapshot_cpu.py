"""snapshot-worker benchmark (issue 5), two parts, every contender in the same run:

1. CPU per snapshot. Same input for all: 1080p30 H.264, 2 s GOP, 120 s (made here with the
   ffmpeg CLI from `testsrc2`), one full-size JPEG every 20 s (6 per pass):
     (a) a `snapshot.watch` session in the release snapshot-worker (a real worker on the real
         RabbitMQ and Redis, job sent with the Python celery client), CPU read from the
         worker process's CPU clock (nanoseconds; /proc/<pid>/stat's 10 ms ticks where that
         clock cannot be read) around the session, less the worker's idle CPU;
         `--compare BINARY` runs a second worker's sessions beside it in the same rounds (A/B);
     (b) `ffmpeg -i IN -vf fps=1/20 OUT%03d.jpg` (decodes every frame);
     (c) `ffmpeg -skip_frame nokey -i IN -vf fps=1/20 OUT%03d.jpg` (decodes keyframes only),
     (d) the same with `-threads 1` (no frame-threading hand-offs: ffmpeg's least CPU);
   ffmpeg's CPU from getrusage(RUSAGE_CHILDREN). Rounds interleaved; medians printed with the
   ratios. `--input noisy-1080p-h264` (6 Mbit/s), `noisy-720p-h264` (3 Mbit/s) or
   `noisy-1080p-hevc` (4 Mbit/s) measure content like users' streams instead: a `mandelbrot`
   zoom with temporal grain, 4 s GOP, 60 s (3 snapshots a pass).
2. Sessions per core: one worker pinned to one core (`taskset -c 0`) runs N watch sessions on
   looping local copies of the input read at their own pace (`realtime`, `loop`), one tick per
   20 s, each frame delivered to a local webhook. A session is on schedule when no tick lands
   later than one GOP (2 s) behind its stream time; the largest N that keeps every session on
   schedule is printed. Bounded: each level runs --level-seconds.

3. RTMP sessions per core (`--rtmp`, issue 17): one nginx-rtmp on 127.0.0.1 (pinned to core
   1) with one stream published from a looped file (`-c copy`, so publishing costs next to
   nothing): `lowrate` is 640x360 H.264 at 300 kbit/s with a 2 s GOP, `noisy-1080p-h264` the
   realistic 6 Mbit/s one. N `snapshot.watch` sessions all play it (a tick per 20 s, each
   frame delivered to a webhook) in a worker pinned to core 0, on the RTMP engine
   (`snapshot_rtmp_engine = true`) and on the thread path (`false`) in the same run. The
   webhook receiver is `bench/webhook_sink.py` (asyncio, keep-alive, backlog 4096) in its own
   process on core 1, so it is not what makes frames late. Lateness of a frame: when its
   delivery reached the receiver, less its tick's due time — `due_at` in the delivery, which
   the engine takes from the connection's stream clock (the promptest arrival of the stream's
   messages; `watch::timing`). The worker's own histogram
   `mediafarm_snapshot_frame_late_seconds{stage}` (scraped from its /metrics before the level
   stops) splits that lateness into read, encoded, stored, queued and delivered. The thread
   path knows no due time: its frames are timed against the stream's wall-clock origin (the
   earliest `captured_at - pts_s` of the run), marked as such. On schedule: every frame within
   1 s of its due time and no session short of ticks.
   `--streams 1,20` runs every level twice: all sessions on one published stream (the aligned
   worst case: every session's tick falls on one of that stream's keyframes, so at a 2 s GOP a
   tenth of all sessions decode at once), then spread round-robin over 20 publishers of the
   same file started GOP/20 apart (unaligned, as unrelated rooms' keyframes are). Also printed:
   frames over 1 s late, the worker's time waiting on a run queue (its threads' schedstat: CPU
   it wanted but other processes had, as % of the level's wall time), the TCP segments per second
   the worker sent to Redis (`ss -tinp`: its writes; the multiplexed connection coalesces
   commands into one write when they queue up, so on a busy worker this counts fewer than its
   round trips) and the Redis server's commands per second (the whole server: other users
   count too). Per level also: the worker's CPU per session-second, both cores' split (busy,
   irq + softirq, idle from /proc/stat: whether core 0 was full, and with what) and, for
   workers that export them, the keyframe decodes' CPU and wall time (a wall time well above
   the CPU time: the decoding thread waited for the core). `--compare BINARY` runs every RTMP
   engine level on SNAPSHOT_WORKER (A) and on BINARY (B) back to back, alternating which goes
   first, so both see the same minutes.

Usage: .venv/bin/python bench/snapshot_cpu.py [--rounds 3] [--levels 50,100,200] [--level-seconds 50] [--stagger 20]
       .venv/bin/python bench/snapshot_cpu.py --rtmp --levels 500,1000,2000 --old-levels 500,1000 [--rtmp-input lowrate] [--streams 1,20]
Needs ffmpeg (scripts/setup.d/snapshot.sh), RabbitMQ and Redis on 127.0.0.1. Local only.
"""
import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from celery import Celery

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "target" / "snapshot-bench"
INPUT = WORK / "in-1080p30-gop2-120s.mp4"
# SNAPSHOT_WORKER: a release binary built elsewhere (then nothing is built here).
WORKER = Path(os.environ.get("SNAPSHOT_WORKER", ROOT / "target" / "release" / "snapshot-worker"))
BROKER = os.environ.get("BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//")
BACKEND = os.environ.get("RESULT_BACKEND", "redis://127.0.0.1:6379/0")
TICKS = os.sysconf("SC_CLK_TCK")
GOP_S = 2.0
INTERVAL_S = 20


def sh(*cmd, **kw):
    return subprocess.run(cmd, check=True, timeout=1800, **kw)


# Inputs like users' streams (issue 17): detail everywhere that changes every frame (a
# `mandelbrot` zoom) with temporal grain, 4 s GOP, at the bitrates platforms ingest. Each is
# (file name, lavfi source, encoder arguments).
NOISY = "mandelbrot=s={size}:r=30,noise=alls=14:allf=t+u,format=yuv420p"
INPUTS = {
    "pattern": ("in-1080p30-gop2-120s.mp4", "testsrc2=size=1920x1080:rate=30", 120,
                ["-c:v", "libx264", "-preset", "veryfast", "-g", "60", "-keyint_min", "60",
                 "-sc_threshold", "0", "-pix_fmt", "yuv420p"]),
    "noisy-1080p-h264": ("noisy-1080p30-h264-6M-gop4-60s.mp4", NOISY.format(size="1920x1080"), 60,
                         ["-c:v", "libx264", "-preset", "veryfast", "-b:v", "6M", "-maxrate", "6M",
                          "-bufsize", "12M", "-g", "120", "-keyint_min", "120", "-sc_threshold", "0"]),
    "noisy-720p-h264": ("noisy-720p30-h264-3M-gop4-60s.mp4", NOISY.format(size="1280x720"), 60,
                        ["-c:v", "libx264", "-preset", "veryfast", "-b:v", "3M", "-maxrate", "3M",
                         "-bufsize", "6M", "-g", "120", "-keyint_min", "120", "-sc_threshold", "0"]),
    "noisy-1080p-hevc": ("noisy-1080p30-hevc-4M-gop4-60s.mp4", NOISY.format(size="1920x1080"), 60,
                         ["-c:v", "libx265", "-preset", "ultrafast", "-b:v", "4M",
                          "-x265-params", "keyint=120:min-keyint=120:scenecut=0:log-level=error"]),
}


# More realistic inputs made from the 1080p H.264 one (its decoded pictures with fresh grain,
# re-encoded: making the mandelbrot zoom again costs minutes per input on 2 shared cores). Each
# is (file name, input it is made from, ffmpeg filter, encoder arguments).
DERIVED = {
    "noisy-720p-h264-3m": ("noisy-720p30-h264-3M-gop4-60s-from-h264.mp4", "noisy-1080p-h264",
                           "scale=1280:720,noise=alls=14:allf=t+u,format=yuv420p",
                           ["-c:v", "libx264", "-preset", "veryfast", "-b:v", "3M", "-maxrate", "3M",
                            "-bufsize", "6M", "-g", "120", "-keyint_min", "120", "-sc_threshold", "0"]),
    "noisy-1080p-h264-8m": ("noisy-1080p30-h264-8M-gop4-60s-from-h264.mp4", "noisy-1080p-h264",
                            "noise=alls=14:allf=t+u,format=yuv420p",
                            ["-c:v", "libx264", "-preset", "veryfast", "-b:v", "8M", "-maxrate", "8M",
                             "-bufsize", "16M", "-g", "120", "-keyint_min", "120", "-sc_threshold", "0"]),
    "noisy-1080p-hevc-4m": ("noisy-1080p30-hevc-4M-gop4-60s-from-h264.mp4", "noisy-1080p-h264",
                            "noise=alls=14:allf=t+u,format=yuv420p",
                            ["-c:v", "libx265", "-preset", "ultrafast", "-b:v", "4M",
                             "-x265-params", "keyint=120:min-keyint=120:scenecut=0:log-level=error"]),
    "noisy-720p-hevc": ("noisy-720p30-hevc-3M-gop4-60s-from-h264.mp4", "noisy-1080p-h264",
                        "scale=1280:720,noise=alls=14:allf=t+u,format=yuv420p",
                        ["-c:v", "libx265", "-preset", "ultrafast", "-b:v", "3M",
                         "-x265-params", "keyint=120:min-keyint=120:scenecut=0:log-level=error"]),
}


LOWRATE = ("lowrate-640x360-300k-gop2-60s.mp4", "testsrc2=size=640x360:rate=30", 60,
           ["-c:v", "libx264", "-preset", "veryfast", "-b:v", "300k", "-maxrate", "300k",
            "-bufsize", "600k", "-g", "60", "-keyint_min", "60", "-sc_threshold", "0",
            "-pix_fmt", "yuv420p"])
INPUTS["lowrate"] = LOWRATE


def ensure_input(name):
    global INPUT
    if name in DERIVED:
        file, parent, vf, encode = DERIVED[name]
        ensure_input(parent)
        source = INPUT
        INPUT = WORK / file
        if not INPUT.exists():
            print(f"making the {name} input from {source.name} (once)...", file=sys.stderr)
            tmp = INPUT.with_suffix(".part.mp4")
            sh("ffmpeg", "-hide_banner", "-loglevel", "error", "-y", "-i", str(source), "-vf", vf,
               *encode, str(tmp))
            tmp.rename(INPUT)
        return
    file, source, seconds, encode = INPUTS[name]
    INPUT = WORK / file
    WORK.mkdir(parents=True, exist_ok=True)
    if not INPUT.exists():
        print(f"making the {name} input (once)...", file=sys.stderr)
        tmp = INPUT.with_suffix(".part.mp4")
        sh("ffmpeg", "-hide_banner", "-loglevel", "error", "-y", "-f", "lavfi",
           "-i", source, "-t", str(seconds), *encode, str(tmp))
        tmp.rename(INPUT)
    if "SNAPSHOT_WORKER" not in os.environ:
        sh("cargo", "build", "--release", "-q", "-p", "snapshot-worker", "--bin", "snapshot-worker", cwd=ROOT)


def proc_cpu_s(pid):
    """CPU time of a process (its finished threads included), in seconds: Linux's CPU clock of
    that process (clock_getcpuclockid(pid), to the nanosecond), else utime + stime from
    /proc/<pid>/stat, which counts in 10 ms ticks (±10 ms on each reading)."""
    try:
        # MAKE_PROCESS_CPUCLOCK(pid, CPUCLOCK_SCHED): what glibc's clock_getcpuclockid returns.
        return time.clock_gettime((~pid << 3) | 2)
    except OSError:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICKS


def proc_run_wait_s(pid):
    """(on-CPU, waiting on a run queue) seconds summed over the process's live threads
    (/proc/<pid>/task/*/schedstat): a worker that waits for a CPU as long as it runs was starved
    by other processes, not limited by its own work."""
    run = wait = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "schedstat").read_text().split()
        except OSError:  # the thread ended meanwhile
            continue
        run, wait = run + int(fields[0]), wait + int(fields[1])
    return run / 1e9, wait / 1e9


def proc_switches(pid):
    """(voluntary, involuntary) context switches summed over the process's live threads: a
    voluntary one is a thread going to sleep (so about one wake-up each)."""
    vol = invol = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            text = (task / "status").read_text()
        except OSError:  # the thread ended meanwhile
            continue
        for line in text.splitlines():
            if line.startswith("voluntary_ctxt_switches:"):
                vol += int(line.split()[1])
            elif line.startswith("nonvoluntary_ctxt_switches:"):
                invol += int(line.split()[1])
    return vol, invol


def proc_rss_mb(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


class Worker:
    def __init__(self, queue, storage, extra_env=None, pin=None, concurrency=4, metrics_port=0, binary=None):
        self.queue = queue
        self.metrics_port = metrics_port
        env = dict(os.environ)
        env.update({
            "MEDIAFARM_BROKER_URL": BROKER,
            "MEDIAFARM_RESULT_BACKEND": BACKEND,
            "MEDIAFARM_STORAGE_URL": f"file://{storage}",
            "MEDIAFARM_SOURCE_ALLOWED_ROOTS": str(WORK),
            "MEDIAFARM_WEBHOOK_ALLOW_PRIVATE": "true",
            "MEDIAFARM_WEBHOOK_ALLOW_HTTP": "true",
            "NO_COLOR": "1",
        })
        env.update(extra_env or {})
        cmd = [str(binary or WORKER), "-Q", queue, "-n", f"bench@{queue}", "--metrics-addr", f"127.0.0.1:{metrics_port}",
               "-c", str(concurrency), "-l", "warning"]
        if pin is not None:
            cmd = ["taskset", "-c", str(pin)] + cmd
        self.log = tempfile.NamedTemporaryFile(prefix="snapbench-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=self.log, stdin=subprocess.DEVNULL)
        time.sleep(1.5)
        if self.proc.poll() is not None:
            raise SystemExit("snapshot-worker did not start: " + Path(self.log.name).read_text())

    def cpu(self):
        return proc_cpu_s(self.proc.pid)

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        if os.environ.get("KEEP_WORKER_LOG"):
            print(f"  worker log kept: {self.log.name}", file=sys.stderr)
        else:
            os.unlink(self.log.name)
        with celery_app().connection_for_write() as conn:
            for q in (self.queue, f"{self.queue}.dead"):
                try:
                    conn.default_channel.queue_delete(q)
                except Exception:  # already gone
                    pass


def celery_app():
    app = Celery("snapbench", broker=BROKER, backend=BACKEND)
    app.conf.update(task_serializer="json", result_serializer="json", accept_content=["json"])
    return app


def run_watch(app, worker, idle_rate):
    kwargs = {"stream_id": f"cpu-{uuid.uuid4().hex[:8]}", "stream_url": f"file://{INPUT}",
              "interval_s": INTERVAL_S, "key": "cpu/{stream_id}/{seq}.jpg", "quality": 80}
    before, t0 = worker.cpu(), time.monotonic()
    out = app.send_task("snapshot.watch", kwargs=kwargs, queue=worker.queue).get(timeout=600)
    cpu = worker.cpu() - before - idle_rate * (time.monotonic() - t0)
    return cpu, out["frames"]


def run_ffmpeg(extra, outdir):
    shutil.rmtree(outdir, ignore_errors=True)
    outdir.mkdir(parents=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    sh("ffmpeg", "-hide_banner", "-loglevel", "error", "-y", *extra, "-i", str(INPUT),
       "-vf", f"fps=1/{INTERVAL_S}", "-q:v", "3", str(outdir / "f%03d.jpg"))
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return cpu, len(list(outdir.glob("*.jpg")))


def psnr_against(jpg, at):
    """(luma, all-plane) PSNR of `jpg` against the full decode of INPUT's picture at `at` s."""
    out = subprocess.run(
        ["ffmpeg", "-hide_banner", "-nostats", "-i", str(jpg), "-ss", f"{at:g}", "-i", str(INPUT),
         # The first picture at `at`, its time set to the JPEG's (0), so psnr pairs the two.
         "-lavfi", "[1:v]trim=end_frame=1,setpts=PTS-STARTPTS,format=yuvj420p[b];"
                   "[0:v]format=yuvj420p[a];[a][b]psnr",
         "-f", "null", "-"], capture_output=True, text=True, timeout=300).stderr
    line = next((l for l in out.splitlines() if "PSNR y:" in l), None)
    if line is None:
        return None
    fields = dict(f.split(":", 1) for f in line.split("PSNR", 1)[1].split() if ":" in f)
    return float(fields["y"]), float(fields["average"])


def jpeg_quality(jpegs, gop_s=4.0):
    """(luma PSNR mean, worst, all-plane PSNR mean, mean KB) of JPEGs against the full decode
    (every frame, loop filter on) of the picture each shows, compared as full-range 4:2:0 by
    FFmpeg's psnr filter. The i-th JPEG shows a keyframe near i × INTERVAL_S (ffmpeg's fps
    filter rounds to the nearest slot, so it may show one a GOP or two away): the best match
    among those keyframes is the picture it shows (the content changes every frame, so a wrong
    one scores ~13 dB)."""
    ys, avgs, sizes = [], [], []
    for i, jpg in enumerate(jpegs):
        best = None
        for k in (0, -1, 1, -2, 2, -3, 3):
            at = i * INTERVAL_S + k * gop_s
            if at < 0:
                continue
            got = psnr_against(jpg, at)
            if got and (best is None or got[0] > best[0]):
                best = got
            if best and best[0] > 25:
                break
        if best is None:
            continue
        ys.append(best[0])
        avgs.append(best[1])
        sizes.append(jpg.stat().st_size / 1024)
    if not ys:
        return None
    return statistics.mean(ys), min(ys), statistics.mean(avgs), statistics.mean(sizes)


def cpu_per_snapshot(rounds, sessions=3, compare=None):
    """`compare`: a second snapshot-worker binary (B), its sessions run in the same rounds right
    beside the first one's (A), in alternating order, so both see the same minutes of load."""
    storage = WORK / "storage-cpu"
    contenders = [("mediafarm watch", WORKER, storage)]
    if compare:
        contenders.append(("mediafarm watch [B]", Path(compare), WORK / "storage-cpu-b"))
    workers = {}
    app = celery_app()
    for name, binary, store in contenders:
        w = Worker(f"bench-snap-{uuid.uuid4().hex[:8]}", store, binary=binary)
        workers[name] = w
        # One warm-up session (page cache, first connections), then the idle rate over 3 s.
        run_watch(app, w, 0.0)
        c0, t0 = w.cpu(), time.monotonic()
        time.sleep(3)
        w.idle_rate = (w.cpu() - c0) / (time.monotonic() - t0)
    # ffmpeg gets its cheapest flags too: keyframes only, and a single decoding thread (frame
    # threading spends CPU on hand-offs; CPU, not latency, is what is compared).
    ffmpeg_variants = {
        "ffmpeg fps=1/20": [],
        "ffmpeg -skip_frame nokey fps=1/20": ["-skip_frame", "nokey"],
        "ffmpeg -threads 1 -skip_frame nokey fps=1/20": ["-threads", "1", "-skip_frame", "nokey"],
    }
    results = {**{name: [] for name, _, _ in contenders}, **{name: [] for name in ffmpeg_variants}}
    frames = {}
    quality = {}
    try:
        for r in range(rounds):
            # `sessions` sessions per round and contender (the worker's CPU is read to the
            # nanosecond where Linux allows, else in /proc's 10 ms ticks: then raise it).
            order = contenders if r % 2 == 0 else contenders[::-1]
            for name, _, _ in order:
                total, n = 0.0, 0
                for _ in range(sessions):
                    cpu, k = run_watch(app, workers[name], workers[name].idle_rate)
                    total, n = total + cpu, n + k
                results[name].append(total * 1000 / n)
                frames[name] = n // sessions
            for i, (name, extra) in enumerate(ffmpeg_variants.items()):
                cpu, k = run_ffmpeg(extra, WORK / f"ffmpeg-{i}")
                results[name].append(cpu * 1000 / k)
                frames[name] = k
            print(f"round {r + 1}: " + ", ".join(f"{name} {v[-1]:.1f} ms" for name, v in results.items()),
                  file=sys.stderr)
        # Output quality: the last session's JPEGs and each ffmpeg variant's last ones.
        for name, _, store in contenders:
            done = sorted((store / "cpu").iterdir(), key=lambda d: d.stat().st_mtime)
            quality[name] = jpeg_quality(sorted(done[-1].glob("*.jpg"), key=lambda f: int(f.stem)))
        for i, name in enumerate(ffmpeg_variants):
            quality[name] = jpeg_quality(sorted((WORK / f"ffmpeg-{i}").glob("*.jpg")))
    finally:
        for (_, _, store), w in zip(contenders, workers.values()):
            w.stop()
            shutil.rmtree(store, ignore_errors=True)
    ours = statistics.median(results["mediafarm watch"])
    print(f"\nCPU per snapshot ({INPUT.name}, one full-size JPEG per 20 s), median of {rounds} rounds "
          f"of {sessions} sessions:")
    for name, binary, _ in contenders:
        print(f"  {name}: {binary}")
    print(f"{'contender':44} {'snapshots':>9} {'CPU ms/snapshot':>16} {'rounds':>18} {'÷ mediafarm':>12} "
          f"{'JPEG KB':>8} {'PSNR Y mean/worst':>18} {'PSNR avg':>9}")
    for name, values in results.items():
        med = statistics.median(values)
        q = quality.get(name)
        qtext = f"{q[3]:>8.0f} {q[0]:>11.2f}/{q[1]:<6.2f} {q[2]:>9.2f}" if q else f"{'-':>8}"
        spread = f"{min(values):.1f}–{max(values):.1f}"
        print(f"{name:44} {frames[name]:>9} {med:>16.1f} {spread:>18} {med / ours:>11.2f}× {qtext}")
    best = min(ffmpeg_variants, key=lambda name: statistics.median(results[name]))
    cheapest = statistics.median(results[best])
    for name, _, _ in contenders:
        mine = statistics.median(results[name])
        print(f"cheapest ffmpeg ({best}): {cheapest / mine:.1f}× {name}'s CPU; "
              f"{name} = {mine / cheapest:.3f}× ffmpeg (target ≤ 0.15×: {'met' if mine <= 0.15 * cheapest else 'NOT met'})")
    print("PSNR: each JPEG against the full decode of the same picture (FFmpeg's psnr filter, full-range 4:2:0)")
    print(f"load average at the end: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print(f"target ≤ 20 ms per snapshot: {'met' if ours <= 20 else 'NOT met'} ({ours:.1f} ms)")


class Deliveries(BaseHTTPRequestHandler):
    got = []
    lock = threading.Lock()

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        got = json.loads(body)
        got["_received"] = time.time()
        with Deliveries.lock:
            Deliveries.got.append(got)
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


def when(text):
    return datetime.fromisoformat(text).timestamp()


def measure_then_stop(worker, ids, seconds, storage, before_stop=None):
    """Measures the worker for `seconds` while sessions `ids` run, then stops every session
    (the stop key each polls) and the worker and cleans up. Returns (CPU s, wall s, RSS MB,
    threads, the deliveries received)."""
    c0, t0 = worker.cpu(), time.monotonic()
    rw0 = proc_run_wait_s(worker.proc.pid)
    time.sleep(seconds)
    cpu = worker.cpu() - c0
    wall = time.monotonic() - t0
    rw1 = proc_run_wait_s(worker.proc.pid)
    worker.waited = 100 * (rw1[1] - rw0[1]) / wall
    rss_mb = proc_rss_mb(worker.proc.pid)
    threads = len(os.listdir(f"/proc/{worker.proc.pid}/task"))
    worker.scraped = before_stop() if before_stop else None
    import redis
    r = redis.Redis.from_url(BACKEND)
    now = f"{time.time():.3f}"
    for sid in ids:
        r.set(f"mediafarm-snapshot-stop-{sid}", now, ex=3600)
    time.sleep(3)
    worker.stop()
    for sid in ids:
        r.delete(f"mediafarm-snapshot-stop-{sid}", f"mediafarm-snapshot-session-{sid}")
    shutil.rmtree(storage, ignore_errors=True)
    with Deliveries.lock:
        frames = list(Deliveries.got)
    return cpu, wall, rss_mb, threads, frames


def sessions_level(n, seconds, hook_port, stagger):
    storage = WORK / f"storage-sessions-{n}"
    queue = f"bench-sessions-{uuid.uuid4().hex[:8]}"
    worker = Worker(queue, storage, pin=0, concurrency=n + 4,
                    extra_env={"MEDIAFARM_SNAPSHOT_MAX_SESSIONS": str(n)})
    app = celery_app()
    with Deliveries.lock:
        Deliveries.got.clear()
    ids = [f"s{n}-{i}" for i in range(n)]
    for sid in ids:
        # Rooms go live at different moments: spread over `stagger` seconds, the sessions'
        # ticks are spread too; with 0 every session ticks at the same instant (a burst).
        time.sleep(stagger / n)
        app.send_task("snapshot.watch", queue=queue, kwargs={
            "stream_id": sid, "stream_url": f"file://{INPUT}", "interval_s": INTERVAL_S,
            "realtime": True, "loop": True, "key": "sessions/{stream_id}/{seq}.jpg",
            "deliver": f"http://127.0.0.1:{hook_port}/hook"})
    cpu, wall, rss_mb, threads, frames = measure_then_stop(worker, ids, seconds, storage)
    by_stream = {}
    for f in frames:
        by_stream.setdefault(f["stream_id"], []).append(f)
    worst, ticks, missing = 0.0, 0, 0
    expected = int(seconds // INTERVAL_S) + 1
    for sid in ids:
        fs = sorted(by_stream.get(sid, []), key=lambda f: f["seq"])
        ticks += len(fs)
        # Ticks that never came within the run count as late.
        if len(fs) < expected - 1:
            missing += 1
        for f in fs[1:]:
            late = (when(f["captured_at"]) - when(fs[0]["captured_at"])) - (f["pts_s"] - fs[0]["pts_s"])
            worst = max(worst, late)
    on_schedule = worst <= GOP_S and missing == 0
    print(f"{n:>8} sessions: {ticks:>5} ticks, worst lateness {worst:5.2f} s, sessions short of ticks {missing:>4}, "
          f"worker CPU {100 * cpu / wall:5.1f} % of one core, RSS {rss_mb:.0f} MB, {threads} threads "
          f"→ {'on schedule' if on_schedule else 'LATE'}")
    return on_schedule


def sessions_per_core(levels, seconds, stagger):
    server = ThreadingHTTPServer(("127.0.0.1", 0), Deliveries)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    print(f"\nWatch sessions on one core (taskset -c 0), 1080p30 looping files read at their own pace, "
          f"a tick per {INTERVAL_S} s, starts spread over {stagger:g} s, {seconds} s per level after the last start:")
    best = 0
    for n in levels:
        if sessions_level(n, seconds, server.server_address[1], stagger):
            best = n
        else:
            break
    server.shutdown()
    print(f"most sessions kept on schedule (no tick later than one GOP): {best}")


LATE_OK_S = 1.0


def nginx_rtmp(pin):
    """nginx with the RTMP module on a free port, pinned to core `pin`; returns (proc, port, dir)."""
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    d = Path(tempfile.mkdtemp(prefix="snapbench-nginx-"))
    (d / "logs").mkdir()
    (d / "nginx.conf").write_text(
        "load_module /usr/lib/nginx/modules/ngx_rtmp_module.so;\n"
        f"daemon off;\nmaster_process off;\nerror_log {d}/logs/error.log warn;\npid {d}/nginx.pid;\n"
        "worker_rlimit_nofile 20000;\nevents { worker_connections 16000; }\n"
        f"rtmp {{ server {{ listen 127.0.0.1:{port}; application live {{ live on; record off; idle_streams off; }} }} }}\n")
    proc = subprocess.Popen(["taskset", "-c", str(pin), "nginx", "-p", str(d), "-c", str(d / "nginx.conf"),
                             "-e", str(d / "logs/error.log")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    return proc, port, d


def rtmp_publisher(url, pin, wait=3.0):
    """ffmpeg publishing INPUT looped at its own pace (stream copy) until stopped."""
    flv = INPUT.with_suffix(".flv")
    if not flv.exists():
        sh("ffmpeg", "-hide_banner", "-loglevel", "error", "-y", "-i", str(INPUT), "-c", "copy", str(flv))
    proc = subprocess.Popen(["taskset", "-c", str(pin), "ffmpeg", "-hide_banner", "-loglevel", "error",
                             "-re", "-stream_loop", "-1", "-i", str(flv), "-c", "copy", "-f", "flv", url],
                            stdin=subprocess.DEVNULL)
    time.sleep(wait)
    if wait and proc.poll() is not None:
        raise SystemExit("the RTMP publisher did not start")
    return proc


def free_port():
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Sink:
    """bench/webhook_sink.py on core `pin`: the deliveries of one level."""

    def __init__(self, pin):
        self.port = free_port()
        self.out = Path(tempfile.mkstemp(prefix="snapbench-sink-", suffix=".jsonl")[1])
        self.proc = subprocess.Popen(["taskset", "-c", str(pin), sys.executable, str(ROOT / "bench" / "webhook_sink.py"),
                                      str(self.port), str(self.out)], stdin=subprocess.DEVNULL)
        time.sleep(0.5)
        if self.proc.poll() is not None:
            raise SystemExit("the webhook sink did not start")

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        frames = [json.loads(line) for line in self.out.read_text().splitlines() if line.strip()]
        self.out.unlink()
        return frames


def scrape_late(port):
    """The worker's mediafarm_snapshot_frame_late_seconds: {stage: [(le, cumulative count)]}."""
    import urllib.request
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    except OSError as e:
        print(f"  (cannot scrape the worker's metrics: {e})", file=sys.stderr)
        return {}
    out = {}
    for line in text.splitlines():
        # The decodes' clocks (workers from 2026-12-01 on): "_decode" = [cpu s, wall s, count].
        if line.startswith(("mediafarm_snapshot_decode_seconds_total{", "mediafarm_snapshot_decodes_total ")):
            name, value = line.rsplit(" ", 1)
            d = out.setdefault("_decode", [0.0, 0.0, 0])
            if 'clock="cpu"' in name:
                d[0] = float(value)
            elif 'clock="wall"' in name:
                d[1] = float(value)
            else:
                d[2] = int(float(value))
            continue
        if not line.startswith("mediafarm_snapshot_frame_late_seconds_bucket{"):
            continue
        labels, value = line.rsplit(" ", 1)
        fields = dict(kv.split("=", 1) for kv in labels[labels.index("{") + 1:labels.rindex("}")].split(","))
        stage, le = fields["stage"].strip('"'), fields["le"].strip('"')
        out.setdefault(stage, []).append((float("inf") if le == "+Inf" else float(le), int(float(value))))
    return out


def bucket_quantile(buckets, q):
    """The upper bound of the bucket holding quantile q."""
    total = buckets[-1][1] if buckets else 0
    for le, count in buckets:
        if total and count >= q * total:
            return le
    return float("nan")


def redis_commands():
    """The Redis server's commands processed so far (the whole server: other users count too)."""
    import redis
    return int(redis.Redis.from_url(BACKEND).info("stats")["total_commands_processed"])


def redis_segments_out(pid):
    """TCP segments process `pid` has sent to Redis (port 6379) over its open connections
    (`ss -tinp`): its own writes to Redis, whoever else uses the server (commands queued
    together on the multiplexed connection share a write, so this is a lower bound on its
    round trips)."""
    import re
    out = subprocess.run(["ss", "-tinpH", "dport = :6379"], capture_output=True, text=True).stdout
    total, mine = 0, False
    for line in out.splitlines():
        if not line.startswith((" ", "\t")):
            mine = f"pid={pid}," in line
        elif mine:
            m = re.search(r"\bsegs_out:(\d+)", line)
            total += int(m.group(1)) if m else 0
    return total


def cpu_times(core):
    """/proc/stat's jiffies of one core: {user, nice, system, idle, iowait, irq, softirq, steal}."""
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith(f"cpu{core} "):
            names = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")
            return dict(zip(names, (int(x) for x in line.split()[1:9])))
    return {}


def core_split(before, after):
    """Where a core's time went between two cpu_times readings, % of the interval: busy (user,
    nice, system), irq (irq + softirq: mostly the loopback TCP the worker's sockets cause),
    idle (idle + iowait)."""
    d = {k: after[k] - before.get(k, 0) for k in after}
    total = sum(d.values()) or 1
    return {"busy": 100 * (d["user"] + d["nice"] + d["system"]) / total,
            "irq": 100 * (d["irq"] + d["softirq"]) / total,
            "idle": 100 * (d["idle"] + d["iowait"]) / total}


def rtmp_level(engine, n, seconds, stagger, urls, binary=None, label=None):
    """Runs n sessions on `engine` (new: the RTMP engine; old: a thread each), spread round-robin
    over the streams `urls`, in `binary` (default SNAPSHOT_WORKER); returns the deliveries and
    the worker's figures."""
    storage = WORK / f"storage-rtmp-{engine}-{n}"
    queue = f"bench-rtmp-{uuid.uuid4().hex[:8]}"
    sink = Sink(pin=1)
    metrics_port = free_port()
    worker = Worker(queue, storage, pin=0, concurrency=n + 4, metrics_port=metrics_port, binary=binary, extra_env={
        "MEDIAFARM_SNAPSHOT_MAX_SESSIONS": str(n),
        "MEDIAFARM_SNAPSHOT_RTMP_ENGINE": "true" if engine == "new" else "false",
        "MEDIAFARM_SNAPSHOT_OUTBOX_SWEEP": "0",
        "MEDIAFARM_SOURCE_ALLOWED_HOSTS": "127.0.0.1",
        "MEDIAFARM_SOURCE_ALLOW_PRIVATE": "true",
    })
    app = celery_app()
    ids = [f"r{engine}{n}-{i}-{uuid.uuid4().hex[:6]}" for i in range(n)]
    for i, sid in enumerate(ids):
        time.sleep(stagger / n)
        app.send_task("snapshot.watch", queue=queue, kwargs={
            "stream_id": sid, "stream_url": urls[i % len(urls)], "interval_s": INTERVAL_S,
            "key": "rtmp/{stream_id}/{seq}.jpg", "deliver": f"http://127.0.0.1:{sink.port}/hook"})
    load0 = os.getloadavg()[0]
    cmds0, segs0, t0 = redis_commands(), redis_segments_out(worker.proc.pid), time.monotonic()
    core0 = [cpu_times(c) for c in (0, 1)]
    sw0 = proc_switches(worker.proc.pid)
    # The decode clocks so far (the starts): the level's figures are the difference.
    decode0 = scrape_late(metrics_port).get("_decode", [0.0, 0.0, 0])

    def before_stop():
        took = time.monotonic() - t0
        worker.redis_rate = (redis_commands() - cmds0) / took
        worker.redis_segs = (redis_segments_out(worker.proc.pid) - segs0) / took
        worker.cores = [core_split(b, cpu_times(c)) for c, b in enumerate(core0)]
        worker.switches = [(a - b) / took for a, b in zip(proc_switches(worker.proc.pid), sw0)]
        return scrape_late(metrics_port)
    cpu, wall, rss_mb, threads, _ = measure_then_stop(worker, ids, seconds, storage, before_stop=before_stop)
    stages = worker.scraped
    d1 = stages.get("_decode")
    decode = [a - b for a, b in zip(d1, decode0)] if d1 else None
    frames = sink.stop()
    return {"engine": engine, "n": n, "ids": ids, "frames": frames, "seconds": seconds, "stages": stages,
            "label": label or engine, "decode": decode, "cores": worker.cores, "switches": worker.switches, "cpu_s": cpu, "wall": wall,
            "cpu": 100 * cpu / wall, "rss": rss_mb, "threads": threads, "streams": len(urls),
            "redis_rate": worker.redis_rate, "redis_segs": worker.redis_segs, "waited": worker.waited, "load": (load0, os.getloadavg()[0])}


def pct(values, q):
    return values[int(q * (len(values) - 1))] if values else float("nan")


def rtmp_report(levels):
    """Lateness against each tick's due time (`due_at`); the thread path's against the
    stream's wall-clock origin (the earliest captured_at - pts seen)."""
    origin = min((when(f["captured_at"]) - f["pts_s"] for lv in levels for f in lv["frames"]), default=0.0)
    print(f"{'build':>6} {'streams':>7} {'sessions':>8} {'ticks':>6} {'short':>5} {'worst late':>10} {'p99 late':>8} "
          f"{'p50 late':>8} {'over 1 s':>8} {'CPU core 0':>10} {'RSS MB':>7} {'KB/session':>10} {'threads':>7} "
          f"{'run-queue wait':>14} {'to Redis seg/s':>14} {'Redis cmd/s':>11} {'load avg':>10}  on schedule")
    for lv in levels:
        by_stream = {}
        for f in lv["frames"]:
            by_stream.setdefault(f["stream_id"], []).append(f)
        timed = all("due_at" in f for f in lv["frames"])
        due = (lambda f: when(f["due_at"])) if timed else (lambda f: origin + f["pts_s"])
        lates = sorted(f["_received"] - due(f) for f in lv["frames"])
        expected = int(lv["seconds"] // INTERVAL_S) + 1
        short = sum(1 for sid in lv["ids"] if len(by_stream.get(sid, [])) < expected - 1)
        worst = lates[-1] if lates else float("nan")
        ok = bool(lates) and worst <= LATE_OK_S and short == 0
        over = sum(1 for x in lates if x > LATE_OK_S)
        print(f"{lv['label']:>6} {lv['streams']:>7} {lv['n']:>8} {len(lv['frames']):>6} {short:>5} {worst:>9.2f}s "
              f"{pct(lates, 0.99):>7.2f}s {pct(lates, 0.5):>7.2f}s {over:>8} {lv['cpu']:>9.1f}% {lv['rss']:>7.0f} "
              f"{1024 * lv['rss'] / lv['n']:>10.0f} {lv['threads']:>7} {lv['waited']:>13.1f}% {lv['redis_segs']:>14.0f} {lv['redis_rate']:>11.0f} "
              f"{lv['load'][0]:>4.1f}-{lv['load'][1]:<4.1f}  {'yes' if ok else 'NO'}"
              f"{'' if timed else '  (thread path: against the origin estimate)'}")
        if timed and lates:
            reads = sorted(when(f["captured_at"]) - due(f) for f in lv["frames"])
            print(f"       {lv['engine']} {lv['n']}: keyframe read late (captured_at - due_at) worst {reads[-1]:.2f} s, "
                  f"p99 {pct(reads, 0.99):.2f} s; deliveries later than 1 s: {sum(1 for x in lates if x > LATE_OK_S)}")
        per_session_ms = 1000 * lv["cpu_s"] / (lv["n"] * lv["wall"])
        c0, c1 = lv["cores"]
        line = (f"       {lv['label']} {lv['n']}: worker CPU {per_session_ms:.3f} ms per session-second; "
                f"core 0 busy {c0['busy']:.0f} % irq {c0['irq']:.0f} % idle {c0['idle']:.0f} %; "
                f"core 1 busy {c1['busy']:.0f} % irq {c1['irq']:.0f} % idle {c1['idle']:.0f} %; "
                f"thread switches {lv['switches'][0]:.0f}/s voluntary, {lv['switches'][1]:.0f}/s involuntary")
        if lv["decode"] and lv["decode"][2]:
            cpu_s, wall_s, count = lv["decode"]
            line += (f"; decodes {count} ({count / lv['wall']:.0f}/s): {1000 * cpu_s / count:.2f} ms CPU, "
                     f"{1000 * wall_s / count:.2f} ms wall each ({100 * cpu_s / lv['cpu_s']:.0f} % of the worker's CPU)")
        print(line)
        for stage in ("read", "decoding", "encoded", "stored", "queued", "delivered"):
            b = lv["stages"].get(stage)
            if b:
                over = b[-1][1] - next((c for le, c in b if le == 1.0), 0)
                print(f"       worker histogram {stage:>9}: {b[-1][1]:>6} frames, p50 ≤ {bucket_quantile(b, 0.5):g} s, "
                      f"p99 ≤ {bucket_quantile(b, 0.99):g} s, over 1 s: {over}")


def rtmp_sessions(new_levels, old_levels, seconds, stagger, input_name, streams=(1,), compare=None):
    levels = []
    for p in streams:
        levels += rtmp_sessions_on(p, new_levels, old_levels, seconds, stagger, compare)
    rtmp_report(levels)


def rtmp_sessions_on(p, new_levels, old_levels, seconds, stagger, compare=None):
    """The levels with the sessions spread over `p` published streams. p = 1: every session plays
    one stream, so all their ticks fall on that stream's keyframes (the aligned worst case: a
    burst of n / (interval / GOP) decodes per keyframe). p > 1: p publishers of the same file
    started GOP / p apart, so the streams' keyframes are spread over the GOP as unrelated rooms'
    are (a burst is n / (p * interval / GOP) decodes)."""
    nginx, port, ndir = nginx_rtmp(pin=1)
    tag = uuid.uuid4().hex[:6]
    urls = [f"rtmp://127.0.0.1:{port}/live/bench-{tag}-{i}" for i in range(p)]
    publishers = []
    print(f"\nRTMP watch sessions on one core (worker taskset -c 0; nginx-rtmp, {p} publisher(s) and the webhook "
          f"receiver on core 1), input {INPUT.name}, {p} stream(s) "
          f"{'(aligned: one keyframe instant for all)' if p == 1 else f'(keyframes {GOP_S / p:.2f} s apart)'}, "
          f"a tick per {INTERVAL_S} s, starts spread over {stagger:g} s, {seconds} s per level after the last start:",
          flush=True)
    levels = []
    try:
        for i, url in enumerate(urls):
            # Each publisher's start sets its keyframe phase; rtmp_publisher waits 3 s itself.
            t0 = time.monotonic()
            publishers.append(rtmp_publisher(url, pin=1, wait=0.0))
            time.sleep(max(0.0, GOP_S / p - (time.monotonic() - t0)))
        time.sleep(3)
        if any(pub.poll() is not None for pub in publishers):
            raise SystemExit("an RTMP publisher did not start")
        # Interleaved: each old level right after the new one of the same size.
        plan = [("new", n) for n in new_levels]
        for n in old_levels:
            at = next((i + 1 for i, (e, m) in enumerate(plan) if e == "new" and m == n), len(plan))
            plan.insert(at, ("old", n))
        # --compare: each RTMP engine level on both binaries back to back, A first, then B
        # first at the next level (so neither always runs second, e.g. on a warmer nginx).
        runs = []
        for i, (engine, n) in enumerate(plan):
            if compare and engine == "new":
                pair = [(None, "A"), (compare, "B")]
                runs += [(engine, n, b, l) for b, l in (pair if len(runs) // 2 % 2 == 0 else pair[::-1])]
            else:
                runs.append((engine, n, None, None))
        for engine, n, binary, label in runs:
            lv = rtmp_level(engine, n, seconds, stagger, urls, binary=binary, label=label)
            levels.append(lv)
            print(f"  ran {lv['label']} {n}: {len(lv['frames'])} ticks, CPU {lv['cpu']:.1f} %, RSS {lv['rss']:.0f} MB, "
                  f"load {lv['load'][0]:.1f}-{lv['load'][1]:.1f}", file=sys.stderr, flush=True)
    finally:
        for proc in publishers + [nginx]:
            proc.terminate()
        for proc in publishers + [nginx]:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(ndir, ignore_errors=True)
    return levels


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--levels", default="50,100,200")
    ap.add_argument("--level-seconds", type=int, default=50)
    ap.add_argument("--stagger", type=float, default=0.0,
                    help="spread the sessions' starts over this many seconds (default 0: all at once)")
    ap.add_argument("--skip-sessions", action="store_true")
    ap.add_argument("--sessions", type=int, default=3,
                    help="CPU part: watch sessions per round and worker (each a pass of the file)")
    ap.add_argument("--compare", default=None,
                    help="CPU part: a second snapshot-worker binary whose sessions run beside "
                         "SNAPSHOT_WORKER's in the same rounds (A/B in the same minutes); --rtmp: "
                         "each RTMP engine level runs on SNAPSHOT_WORKER (A) and on this binary (B) "
                         "back to back")
    ap.add_argument("--skip-cpu", action="store_true")
    ap.add_argument("--input", default="pattern",
                    help="pattern: testsrc2, 2 s GOP (the default); noisy-*: realistic content; "
                         "a comma-separated list measures each in turn (CPU part only). One of: "
                         + ", ".join(sorted([*INPUTS, *DERIVED])))
    ap.add_argument("--rtmp", action="store_true",
                    help="RTMP sessions per core through nginx-rtmp, RTMP engine and thread path (part 3 only)")
    ap.add_argument("--old-levels", default="",
                    help="--rtmp: the levels also run on the thread path (default: none)")
    ap.add_argument("--rtmp-input", choices=["lowrate", "noisy-1080p-h264", "noisy-720p-h264"], default="lowrate")
    ap.add_argument("--streams", default="1",
                    help="--rtmp: published streams the sessions are spread over, a list run in turn "
                         "(1: aligned worst case, all ticks on one stream's keyframes; e.g. 20: unaligned)")
    args = ap.parse_args()
    if args.rtmp:
        ensure_input(args.rtmp_input)
        old = [int(x) for x in args.old_levels.split(",") if x]
        rtmp_sessions([int(x) for x in args.levels.split(",")], old, args.level_seconds, args.stagger,
                      args.rtmp_input, [int(x) for x in args.streams.split(",")], args.compare)
        return
    names = args.input.split(",")
    unknown = [n for n in names if n not in INPUTS and n not in DERIVED]
    if unknown:
        raise SystemExit(f"unknown input(s) {unknown}: one of {sorted([*INPUTS, *DERIVED])}")
    for name in names:
        ensure_input(name)
        if not args.skip_cpu:
            print(f"\n== input {name}: load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
            cpu_per_snapshot(args.rounds, args.sessions, args.compare)
    if not args.skip_sessions:
        sessions_per_core([int(x) for x in args.levels.split(",")], args.level_seconds, args.stagger)


if __name__ == "__main__":
    main()

"""Cold start (issue 20): how long the first job waits when a worker kind was scaled to zero.

Per run: a fresh queue; one job is published (Python Celery's client, as a producer would)
while no worker consumes the queue; then the worker binary is started, and the time from the
publish to the job's result in Redis (`AsyncResult.get`, the producer's view) is measured,
with the part from the worker's start. Several runs; medians. What this leaves out, on
Kubernetes, is KEDA's polling (pollingInterval, 15 s at most), scheduling the pod and pulling
its image: those come on top (README, "Kubernetes").

Jobs: notify-worker sends one `notify.email` to its outbox directory (no SMTP server: the
worker's start-up and the job path are what is measured); image-worker runs one
`image.transform` of a 256x256 PNG in a local storage directory to a 128 px JPEG.

Usage: .venv/bin/python bench/cold_start.py [--runs 5] [--worker notify-worker]
       [--worker image-worker] [--bin-dir target/release] [--no-build]
Only 127.0.0.1 is contacted; every phase has a time limit and every process is stopped.
"""
import argparse
import os
import shutil
import statistics
import struct
import subprocess
import sys
import time
import uuid
import zlib
from pathlib import Path

from celery import Celery

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import delete_queue, stop  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BROKER = os.environ.get("BENCH_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//")
BACKEND = os.environ.get("BENCH_RESULT_BACKEND", "redis://127.0.0.1:6379/13")
WORK = ROOT / "var" / "bench" / "cold-start"


def png(width, height):
    """A small RGB gradient PNG (no imaging library needed)."""
    rows = b"".join(
        b"\x00" + b"".join(bytes((x * 255 // width, y * 255 // height, 128)) for x in range(width))
        for y in range(height))

    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def job(worker, run):
    """(task name, kwargs) of the one job a run publishes."""
    if worker == "notify-worker":
        return "notify.email", {"to": "cold@example.com", "subject": f"cold start {run}",
                                "text": "The first job after an idle spell."}
    return "image.transform", {"source": "src/cold.png", "outputs": [
        {"key": f"out/cold-{run}.jpg", "width": 128, "fit": "inside", "format": "jpeg"}]}


def one_run(app, binary, worker, run, timeout):
    """Seconds from publish to result, and from the worker's start to the result."""
    queue = f"bench-cold-{uuid.uuid4().hex[:8]}"
    task, kwargs = job(worker, run)
    env = {
        **os.environ,
        "MEDIAFARM_BROKER_URL": BROKER,
        "MEDIAFARM_RESULT_BACKEND": BACKEND,
        "MEDIAFARM_METRICS_ADDR": "127.0.0.1:0",
        "MEDIAFARM_STORAGE_URL": f"file://{WORK / 'storage'}",
        "MEDIAFARM_EMAIL_OUTBOX_DIR": str(WORK / "outbox"),
        "MEDIAFARM_EMAIL_FROM": "bench <bench@example.com>",
    }
    log_path = WORK / f"{worker}-{run}.log"
    published = time.monotonic()
    result = app.send_task(task, kwargs=kwargs, queue=queue)
    with open(log_path, "w") as log:
        started = time.monotonic()
        proc = subprocess.Popen([str(binary), "--queues", queue, "--concurrency", "1"],
                                cwd=WORK, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        try:
            value = result.get(timeout=timeout)
            done = time.monotonic()
        finally:
            stop(proc)
            delete_queue(BROKER, queue)
    if result.status != "SUCCESS":
        raise SystemExit(f"{worker} run {run}: {result.status} {value!r}; see {log_path}")
    return done - published, done - started


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--worker", action="append", choices=["notify-worker", "image-worker"],
                        help="repeatable; default: both")
    parser.add_argument("--bin-dir", type=Path, default=ROOT / "target" / "release",
                        help="where the worker binaries are (built there first unless --no-build)")
    parser.add_argument("--no-build", action="store_true")
    parser.add_argument("--timeout", type=float, default=60, help="per run, seconds")
    args = parser.parse_args()
    workers = args.worker or ["notify-worker", "image-worker"]
    if not args.no_build:
        for w in workers:
            subprocess.run(["cargo", "build", "--release", "--locked", "-q", "-p", w, "--bin", w],
                           cwd=ROOT, check=True, timeout=3600)
    shutil.rmtree(WORK, ignore_errors=True)
    (WORK / "storage" / "src").mkdir(parents=True)
    (WORK / "outbox").mkdir()
    (WORK / "storage" / "src" / "cold.png").write_bytes(png(256, 256))
    app = Celery("bench_cold_start", broker=BROKER, backend=BACKEND)
    app.conf.update(task_serializer="json", accept_content=["json"], result_serializer="json")
    print(f"binaries: {args.bin_dir.resolve()}; {args.runs} runs each; seconds")
    for w in workers:
        binary = (args.bin_dir / w).resolve()
        if not binary.is_file():
            raise SystemExit(f"{binary} is missing")
        totals, from_start = [], []
        for run in range(args.runs):
            total, started = one_run(app, binary, w, run, args.timeout)
            totals.append(total)
            from_start.append(started)
            print(f"  {w} run {run}: publish -> result {total:.3f} (worker start -> result {started:.3f})")
        print(f"{w}: median publish -> result {statistics.median(totals):.3f} s "
              f"(min {min(totals):.3f}, max {max(totals):.3f}); "
              f"worker start -> result {statistics.median(from_start):.3f} s")


if __name__ == "__main__":
    main()

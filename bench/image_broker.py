"""Image jobs through the broker (issue 4): images/s of `image-worker -c 2` against a Celery 5.7
prefork worker (`-c 2`) doing the same job with Pillow (bench/image_celery_app.py), and the peak
RSS of image-worker at concurrency 2 on 50 MP sources.

Job: one source → 1280, 640 and 160 px wide JPEG q80, stored in a local storage directory
(var/bench/image-storage, both workers read and write it); results in Redis; late acks. Each
variant gets a fresh queue holding N jobs published (by the Python celery client) before its
worker starts; the rate counts from the first stored result to the N-th, so start-up is left out.

Sources: the distinct JPEGs of bench/image_pipeline.py's corpus (Debian's
plasma-workspace-wallpapers, 5120×2880 and 2560×1600, baseline and progressive). For the
memory run, 50 MP sources (9400×5300, baseline and progressive) are made from a 5120×2880
wallpaper (or, where the mirror has none, the largest landscape photo of --corpus photos) with
libvips and written under var/bench/ (never committed); image-worker's peak RSS is its
/proc/<pid>/status VmHWM when the drain ends (Celery's is the largest of its processes').

CPU per image (issue 18; the machine is shared, so images/s alone moves with other work): the
user+system CPU time (/proc/<pid>/stat) of the worker process and every process under it (Celery
prefork's pool children included), counted over the same window as the rate, divided by the jobs
finished in it; and, for reference, that of RabbitMQ (beam.smp) and Redis over the window, which
other users of the machine's services add to.

--corpus photos (the default): bench/image_stages.py's 8–24 MP photographs (portrait and
landscape, baseline and progressive, 4:4:4/4:2:2/4:2:0, EXIF-rotated copies); --corpus
wallpapers: the wallpapers above, as earlier runs used.

A/B of builds: give --worker several times (each `PATH` or `LABEL=PATH`); every round runs
each of them and Celery once, in an order rotated from round to round, so the builds share the
same minutes of a shared machine.

Usage: .venv/bin/python bench/image_broker.py [--jobs 48] [--big-jobs 12] [--rounds 1]
       [--corpus photos|wallpapers] [--memory-only] [--no-memory] [--worker [LABEL=]PATH]...
Only 127.0.0.1 is contacted; every phase has a time limit and every process is stopped.
"""
import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import image_pipeline  # noqa: E402  (corpus fetching and tool installs)
import image_stages  # noqa: E402  (the photo corpus)
from bench_common import delete_queue, stop

BROKER = os.environ.get("BENCH_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//")
BACKEND = os.environ.get("BENCH_RESULT_BACKEND", "redis://127.0.0.1:6379/12")
WORK = ROOT / "var" / "bench"
STORAGE = WORK / "image-storage"
BIG = WORK / "image-50mp"
WIDTHS = (1280, 640, 160)


def build():
    subprocess.run(["cargo", "build", "--release", "--locked", "-q", "-p", "image-worker",
                    "--bin", "image-worker"], cwd=ROOT, check=True, timeout=1800)


def stage(files, prefix):
    """Copies `files` into the storage directory; returns their keys."""
    keys = []
    for i, f in enumerate(files):
        key = f"src/{prefix}{i}.jpg"
        (STORAGE / key).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, STORAGE / key)
        keys.append(key)
    return keys


def make_50mp():
    """9400×5300 (49.8 MP) JPEGs from one wallpaper: baseline and progressive with 4:2:0 chroma
    (as cameras and most encoders write them), and progressive 4:4:4."""
    import pyvips
    BIG.mkdir(parents=True, exist_ok=True)
    variants = {"baseline.jpg": dict(subsample_mode="on"),
                "progressive.jpg": dict(subsample_mode="on", interlace=True),
                "progressive-444.jpg": dict(subsample_mode="off", interlace=True)}
    out = {name: BIG / name for name in variants}
    if all(p.exists() for p in out.values()):
        return out
    by_size = image_pipeline.ensure_corpus()
    wallpaper = [f for f, kind in by_size.get((5120, 2880), []) if kind == "baseline"]
    if wallpaper:
        img = pyvips.Image.new_from_file(wallpaper[0])
    else:
        # Not every Debian mirror still has a 5120×2880 wallpaper: the largest landscape
        # photograph of the photo corpus instead (the same content kind, stretched to 50 MP).
        img = max((pyvips.Image.new_from_file(f) for f in image_stages.ensure_photos()),
                  key=lambda i: i.width * i.height if i.width > i.height else 0)
    img = img.resize(9400 / img.width, vscale=5300 / img.height)
    for name, options in variants.items():
        img.write_to_file(str(out[name]), Q=90, **options)
    return out


def publish(app, queue, keys, jobs):
    for i in range(jobs):
        key = keys[i % len(keys)]
        outputs = [{"key": f"out/{queue}/{i}/{w}.jpg", "width": w, "format": "jpeg", "quality": 80}
                   for w in WIDTHS]
        app.send_task("image.transform", kwargs={"source": key, "outputs": outputs},
                      queue=queue, task_id=f"{queue}-{i}")


def peak_rss_mb(pid):
    """VmHWM of `pid` and, for Celery, the largest among its children."""
    pids = [pid]
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        pids += [int(c) for c in children]
    except OSError:
        pass
    best = 0
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    best = max(best, int(line.split()[1]))
        except OSError:
            pass
    return best / 1024


TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid, faults=False):
    """utime + stime of `pid` and of every process under it, in seconds (with `faults`: the
    minor page faults of the same processes instead)."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[7]) if faults else int(fields[11]) + int(fields[12])
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, ValueError, IndexError):
            pass
    return total if faults else total / TICK


def service_pids():
    """RabbitMQ's and Redis's processes on this machine."""
    found = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if (d / "comm").read_text().strip() in ("beam.smp", "redis-server"):
                    found.append(int(d.name))
            except OSError:
                pass
    return found


def services_cpu(pids):
    return sum(cpu_seconds(p) for p in pids)


def drain(app, label, command, keys, jobs, timeout, env):
    """Publishes `jobs`, starts `command(queue)`, waits until every job has a result; returns
    (images/s, peak RSS MB, worker CPU ms per image, services CPU ms per image, worker minor
    page faults per image)."""
    # BENCH_QUEUE_TAG names who ran it when several share the broker.
    queue = f"bench-img-{os.environ.get('BENCH_QUEUE_TAG', '')}{uuid.uuid4().hex[:8]}"
    store = redis.Redis.from_url(BACKEND)
    ids = [f"celery-task-meta-{queue}-{i}" for i in range(jobs)]
    publish(app, queue, keys, jobs)
    services = service_pids()
    log_path = WORK / f"{''.join(c if c.isalnum() or c in '.-' else '_' for c in label)}.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command(queue), cwd=ROOT / "bench", env={**os.environ, **env},
                                stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        try:
            began = time.monotonic()
            first = None
            while True:
                values = store.mget(ids)
                done = sum(v is not None for v in values)
                now = time.monotonic()
                if done and first is None:
                    first = (now, done, cpu_seconds(proc.pid), services_cpu(services),
                             cpu_seconds(proc.pid, faults=True))
                if done >= jobs:
                    cpu = cpu_seconds(proc.pid) - first[2]
                    faults = cpu_seconds(proc.pid, faults=True) - first[4]
                    service_cpu = services_cpu(services) - first[3]
                    rss = peak_rss_mb(proc.pid)
                    break
                if proc.poll() is not None:
                    raise SystemExit(f"{label} exited early ({proc.returncode}); see {log_path}")
                if now - began > timeout:
                    raise SystemExit(f"{label}: only {done}/{jobs} results after {timeout} s")
                time.sleep(0.01)
            failed = [v for v in values if b'"SUCCESS"' not in v]
            if failed:
                raise SystemExit(f"{label}: {len(failed)} jobs did not succeed: {failed[0][:300]!r}")
        finally:
            stop(proc, grace=60)
            delete_queue(BROKER, queue)
            store.delete(*ids)
    seconds = now - first[0]
    counted = jobs - first[1]
    rate = counted / seconds if seconds > 0 else float("inf")
    per_image = 1000 / max(counted, 1)
    return rate, rss, cpu * per_image, service_cpu * per_image, faults / max(counted, 1)


def wallpapers():
    """The distinct wallpapers of bench/image_pipeline.py's corpus."""
    by_size = image_pipeline.ensure_corpus()
    files = []
    for size in ((5120, 2880), (2560, 1600)):
        seen = set()
        for f, _kind in by_size.get(size, []):
            digest = Path(f).stat().st_size, Path(f).read_bytes()[-4096:]
            if digest not in seen:
                seen.add(digest)
                files.append(f)
    return files


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=48)
    parser.add_argument("--big-jobs", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--corpus", choices=("photos", "wallpapers"), default="photos")
    parser.add_argument("--memory-only", action="store_true", help="only the 50 MP peak-RSS runs")
    parser.add_argument("--no-memory", action="store_true", help="skip the 50 MP peak-RSS runs")
    parser.add_argument("--worker", action="append", default=[], metavar="[LABEL=]PATH",
                        help="an image-worker binary to run instead of building "
                        "target/release/image-worker; repeat it to compare builds in the same "
                        "rounds")
    parser.add_argument("--worker-env", action="append", default=[], metavar="NAME=VALUE",
                        help="an environment variable for image-worker only (repeatable)")
    parser.add_argument("--label", default="image-worker -c 2", help="image-worker's row label")
    args = parser.parse_args()
    if not args.no_memory:
        image_pipeline.ensure_tools()  # libvips, for the 50 MP sources
    if not args.worker:
        build()
    workers = {}
    for w in args.worker or [str(ROOT / "target/release/image-worker")]:
        label, _, path = w.rpartition("=")
        # Resolved here: the workers run from bench/.
        workers[label or (args.label if not workers else path)] = Path(path).resolve()
    worker = next(iter(workers.values()))
    shutil.rmtree(STORAGE, ignore_errors=True)
    if args.corpus == "photos":
        files = image_stages.ensure_photos()
        described = f"{len(files)} photographs of 8–24 MP (bench/image_stages.py)"
    else:
        files = wallpapers()
        described = f"{len(files)} distinct wallpapers (5120×2880 and 2560×1600)"
    keys = stage(files, "w")

    os.environ.update({"BENCH_BROKER_URL": BROKER, "BENCH_RESULT_BACKEND": BACKEND,
                       "BENCH_STORAGE_DIR": str(STORAGE)})
    from celery import Celery
    app = Celery("image_bench_client", broker=BROKER, backend=BACKEND)
    worker_env = {"MEDIAFARM_BROKER_URL": BROKER, "MEDIAFARM_RESULT_BACKEND": BACKEND,
                  "MEDIAFARM_STORAGE_URL": STORAGE.as_uri(), "MEDIAFARM_METRICS_ADDR": "127.0.0.1:0",
                  **dict(kv.split("=", 1) for kv in args.worker_env)}

    def rust(q, binary=worker):
        return [binary, "--concurrency", "2", "--queues", q,
                "--loglevel", "warning"]

    def celery(q):
        return [sys.executable, "-m", "celery", "-A", "image_celery_app", "worker", "-P", "prefork",
                "-c", "2", "-Q", q, "-l", "warning", "--without-gossip", "--without-mingle",
                "--without-heartbeat"]

    WORK.mkdir(parents=True, exist_ok=True)
    celery_label = "celery prefork -c 2 (Pillow)"
    variants = [(label, lambda q, b=binary: rust(q, b), worker_env)
                for label, binary in workers.items()]
    variants.append((celery_label, celery, {}))
    runs = {label: [] for label, _, _ in variants}
    for r in range(0 if args.memory_only else args.rounds):
        turn = r % len(variants)
        for label, command, env in variants[turn:] + variants[:turn]:
            runs[label].append(drain(app, label, command, keys, args.jobs, 900, env))
            print(f"round {r + 1}: {label}: {runs[label][-1][0]:.1f} images/s, "
                  f"{runs[label][-1][2]:.1f} CPU ms/image, {runs[label][-1][4]:.0f} faults/image, "
                  f"load {os.getloadavg()[0]:.1f}", flush=True)
    if not args.memory_only:
        print(f"\n{args.jobs} jobs per variant over {described}, each → "
              f"{', '.join(map(str, WIDTHS))} px JPEG q80; median of {args.rounds} round(s); "
              f"{os.cpu_count()} cores; {time.strftime('%Y-%m-%d')}")
        print("| worker | images/s | × Celery | worker CPU ms/image | Celery CPU ÷ this | "
              "RabbitMQ + Redis CPU ms/image | minor faults/image | peak RSS MB |")
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")

        def med(label, i):
            return statistics.median(r[i] for r in runs[label])

        for label in runs:
            print(f"| {label} | {med(label, 0):.1f} | {med(label, 0) / med(celery_label, 0):.2f}× "
                  f"| {med(label, 2):.1f} | {med(celery_label, 2) / med(label, 2):.2f}× "
                  f"| {med(label, 3):.1f} | {med(label, 4):.0f} "
                  f"| {max(r[1] for r in runs[label]):.0f} |")
        print(f"load average at the end: {os.getloadavg()}")
    if args.no_memory:
        return

    big = make_50mp()
    big_keys = {
        "baseline 4:2:0": stage([big["baseline.jpg"]], "b"),
        "baseline + progressive, 4:2:0": stage([big["baseline.jpg"], big["progressive.jpg"]], "bp"),
        "progressive 4:4:4": stage([big["progressive-444.jpg"]], "p444"),
    }
    print(f"\n50 MP sources (9400×5300), {args.big_jobs} jobs, image-worker -c 2:")
    print("| sources | images/s | peak RSS MB (VmHWM) | target |")
    print("| --- | ---: | ---: | --- |")
    for label, ks in big_keys.items():
        rate, peak, *_ = drain(app, f"image-worker 50MP {label}", rust, ks, args.big_jobs, 900,
                                 worker_env)
        print(f"| {label} | {rate:.1f} | {peak:.0f} | ≤ 256 MB: {'met' if peak <= 256 else 'NOT met'} |",
              flush=True)


if __name__ == "__main__":
    main()

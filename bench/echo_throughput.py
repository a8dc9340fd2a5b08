"""Runtime-core throughput benchmark (issues 2 and 3): drain a pre-published backlog of
`echo.echo` jobs, every result stored in Redis and every message acknowledged after its result,
with

  (a) mediafarm's echo-worker, also with 1 job in 100 failing once and retried through the
      broker's delay queues (issue 3's "throughput with retries enabled"),
  (b) a plain Celery 5.7 worker (prefork -c 2, JSON, task_acks_late, prefetch multiplier 4),
  (c) a bare lapin consumer that writes one Redis key per message and acks it (the ceiling),

against the same RabbitMQ and Redis in one run. Each variant gets a fresh queue holding N jobs
published before it starts; the rate is measured from the first stored result to the N-th
(polling Redis DBSIZE on a dedicated database), so process start-up is not counted.

With `--baseline-worker PATH` (an echo-worker built from an earlier commit, e.g. the runtime
core as it landed) that build runs too, for a before/after ratio in the same run.

Usage: .venv/bin/python bench/echo_throughput.py [--jobs 20000] [--rounds 1] [--quick]
       [--baseline-worker PATH]
Only 127.0.0.1 is contacted; every phase has a time limit and every process is stopped.
"""
import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

import redis
from bench_common import delete_queue, stop

ROOT = Path(__file__).resolve().parent.parent
RELEASE = ROOT / "target" / "release"
BROKER = os.environ.get("BENCH_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//")
BACKEND = os.environ.get("BENCH_RESULT_BACKEND", "redis://127.0.0.1:6379/14")
LOGS = ROOT / "var" / "bench"


def build():
    subprocess.run(
        ["cargo", "build", "--release", "--locked", "-q", "-p", "mediafarm", "--examples"],
        cwd=ROOT,
        check=True,
    )


def publish(queue, jobs, retry_every=None):
    extra = ["--retry-every", str(retry_every)] if retry_every else []
    subprocess.run(
        [RELEASE / "examples" / "bench-publisher", "--queue", queue, "--count", str(jobs),
         "--id-prefix", queue, *extra],
        env={**os.environ, "MEDIAFARM_BROKER_URL": BROKER},
        check=True,
        stderr=subprocess.DEVNULL,
    )


def drain(label, command, jobs, timeout, cwd=None, env=None, retry_every=None):
    """Publishes `jobs` to a fresh queue, starts `command(queue)`, times the drain (until every
    job has a result, and every retried one its final SUCCESS)."""
    queue = f"bench-{uuid.uuid4().hex[:8]}"
    store = redis.Redis.from_url(BACKEND)
    store.flushdb()
    publish(queue, jobs, retry_every)
    retried = [f"celery-task-meta-{queue}-{i}" for i in range(0, jobs, retry_every)] if retry_every else []
    LOGS.mkdir(parents=True, exist_ok=True)
    log_path = LOGS / f"{label.replace(' ', '_')}.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command(queue), cwd=cwd, env={**os.environ, **(env or {})},
                                stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        try:
            began = time.monotonic()
            first = None
            while True:
                stored = store.dbsize()
                now = time.monotonic()
                if stored and first is None:
                    first = (now, stored)
                if stored >= jobs and all(b'"SUCCESS"' in (v or b"") for v in
                                          (store.mget(retried) if retried else [])):
                    break
                if proc.poll() is not None:
                    raise SystemExit(f"{label} exited early ({proc.returncode}); see {log_path}")
                if now - began > timeout:
                    raise SystemExit(f"{label}: only {stored}/{jobs} results after {timeout} s")
                time.sleep(0.005)
        finally:
            stop(proc)
            delete_queue(BROKER, queue)
    seconds = now - first[0]
    return (jobs - first[1]) / seconds if seconds > 0 else float("inf")


def echo_worker(concurrency, binary=None):
    binary = binary or RELEASE / "examples" / "echo-worker"
    return lambda q: [binary, "--concurrency", str(concurrency), "--queues", q,
                      "--loglevel", "warning"]


def bare(prefetch):
    return lambda q: [RELEASE / "examples" / "bench-bare-consumer", "--queue", q,
                      "--prefetch", str(prefetch), "--redis", BACKEND, "--max-seconds", "600"]


def celery(q):
    return [sys.executable, "-m", "celery", "-A", "celery_echo_app", "worker", "-P", "prefork",
            "-c", "2", "-Q", q, "-l", "warning", "--without-gossip", "--without-mingle",
            "--without-heartbeat"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=1, help="repeat and take the median")
    parser.add_argument("--quick", action="store_true", help="2,000 jobs, for a smoke run")
    parser.add_argument("--high-concurrency", type=int, default=64)
    parser.add_argument("--baseline-worker", type=Path,
                        help="an earlier build of echo-worker to compare with")
    args = parser.parse_args()
    jobs = 2_000 if args.quick else args.jobs
    build()
    worker_env = {
        "MEDIAFARM_BROKER_URL": BROKER,
        "MEDIAFARM_RESULT_BACKEND": BACKEND,
        "MEDIAFARM_METRICS_ADDR": "127.0.0.1:0",
    }
    celery_env = {"BENCH_BROKER_URL": BROKER, "BENCH_RESULT_BACKEND": BACKEND}
    hc = args.high_concurrency
    variants = [
        ("celery prefork -c 2", celery, jobs * 40 // 1000 + 300, ROOT / "bench", celery_env, 8),
        ("echo-worker -c 2", echo_worker(2), 300, None, worker_env, 8),
        ("bare lapin prefetch 8", bare(8), 300, None, None, 8),
        (f"echo-worker -c {hc}", echo_worker(hc), 300, None, worker_env, hc * 4),
        (f"bare lapin prefetch {hc * 4}", bare(hc * 4), 300, None, None, hc * 4),
        (f"echo-worker -c {hc}, 1 % retried once", echo_worker(hc), 300, None, worker_env, hc * 4),
    ]
    retry_every = {f"echo-worker -c {hc}, 1 % retried once": 100}
    baseline = f"baseline echo-worker -c {hc}"
    if args.baseline_worker:
        variants.append((baseline, echo_worker(hc, args.baseline_worker.resolve()), 300, None,
                         worker_env, hc * 4))
    rates = {label: [] for label, *_ in variants}
    for _ in range(args.rounds):
        for label, command, timeout, cwd, env, _prefetch in variants:
            rates[label].append(drain(label, command, jobs, timeout, cwd, env,
                                      retry_every.get(label)))
    rate = {label: statistics.median(r) for label, r in rates.items()}
    celery_rate = rate["celery prefork -c 2"]
    bare_by_prefetch = {p: rate[l] for l, *_, p in variants if l.startswith("bare")}

    print(f"\n{jobs} echo.echo jobs per variant, median of {args.rounds} round(s); "
          f"{os.cpu_count()} cores, {platform.platform()}, {time.strftime('%Y-%m-%d')}")
    print("| variant | prefetch | jobs/s | × Celery | % of bare ceiling (same prefetch) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for label, *_, prefetch in variants:
        ceiling = bare_by_prefetch[prefetch]
        share = "—" if label.startswith("bare") else f"{100 * rate[label] / ceiling:.0f} %"
        print(f"| {label} | {prefetch} | {rate[label]:,.0f} | {rate[label] / celery_rate:.1f} | {share} |")
    plain, retrying = f"echo-worker -c {hc}", f"echo-worker -c {hc}, 1 % retried once"
    print(f"\nwith 1 % of jobs retried once through the delay queues: "
          f"{100 * rate[retrying] / rate[plain]:.0f} % of the plain rate (goal ≥ 90 %)")
    if args.baseline_worker:
        print(f"this build vs the baseline build ({args.baseline_worker}): "
              f"{100 * rate[plain] / rate[baseline]:.0f} % plain, "
              f"{100 * rate[retrying] / rate[baseline]:.0f} % with 1 % retried once "
              f"(goal ≥ 90 %)")
    best = max((l for l in rate if l.startswith("echo-worker") and "retried" not in l),
               key=lambda l: rate[l])
    best_prefetch = next(p for l, *_, p in variants if l == best)
    print(f"\nbest echo-worker ({best}): {rate[best] / celery_rate:.1f}× Celery (target ≥ 10×), "
          f"{100 * rate[best] / bare_by_prefetch[best_prefetch]:.0f} % of the bare ceiling (target ≥ 85 %)")


if __name__ == "__main__":
    main()

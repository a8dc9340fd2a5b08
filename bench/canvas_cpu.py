"""Where a chain step's CPU goes (issue 14): N Celery-canvas chains of 3 `echo.step` steps,
published beforehand as in bench/canvas_throughput.py, then run by one contender while the CPU
time (user + system, from /proc) of each process involved is read at the first stored result and
at the last: the contender's process tree, RabbitMQ (beam.smp), Redis (redis-server) and this
script (which polls Redis for the count). Prints CPU microseconds per chain step per process and
the chains/s of that run, for echo-worker and for Celery prefork -c 2 in the same run.

RabbitMQ and Redis are shared services: whatever else uses them during a run is counted too,
so their idle CPU over a quiet second is printed first for comparison.

Usage: .venv/bin/python bench/canvas_cpu.py [--chains 2000] [--rounds 1] [--only mediafarm|celery]
       [--worker PATH[@VAR=VALUE,...]]... [--concurrency N]
Assumes a release build (target/release/examples/echo-worker) unless --worker is given.
"""
import argparse
import os
import sys
import time
import uuid
from pathlib import Path

import redis
from bench_common import cpu_of, delete_queue, pid_of, worker_spec
from canvas_throughput import (BACKEND, BROKER, RELEASE, Worker, celery, load,
                               publish_chains)

ROOT = Path(__file__).resolve().parent.parent
POLLER = "poller (this script)"


def sample(pids):
    # The script's own process is the contender's parent: counted with its descendants it
    # would count the worker twice.
    return {name: cpu_of(pid, descendants=name != POLLER) for name, pid in pids.items()}


def run(label, command, env, cwd, chains, rabbit, redis_pid):
    queue = f"bench-canvas-cpu-{uuid.uuid4().hex[:8]}"
    store = redis.Redis.from_url(BACKEND)
    store.flushdb()
    try:
        lasts = publish_chains(queue, chains)
        with Worker(label, command, env, cwd, queue, 600) as w:
            w.wait_for(lambda: store.dbsize() > 0)
            pids = {"worker": w.proc.pid, "rabbitmq": rabbit, "redis": redis_pid,
                    POLLER: os.getpid()}
            before, began = sample(pids), time.monotonic()
            ended = w.wait_for(lambda: store.dbsize() >= 3 * chains)
            after = sample(pids)
            for n in (0, chains - 1):
                meta = load(store, lasts[n])
                if not meta or meta["status"] != "SUCCESS":
                    raise SystemExit(f"{label}: chain {n} ended {meta!r}")
    finally:
        delete_queue(BROKER, queue)
    steps = 3 * chains
    seconds = ended - began
    print(f"\n{label}: {chains / seconds:,.0f} chains/s over {seconds:.2f} s "
          f"(timed from the first result)")
    total = 0.0
    for name in pids:
        used = after[name] - before[name]
        total += used
        print(f"  {name:22} {used:6.2f} s CPU = {used / steps * 1e6:7.0f} µs per step "
              f"({used / seconds * 100:4.0f}% of a core)")
    print(f"  {'all':22} {total:6.2f} s CPU = {total / steps * 1e6:7.0f} µs per step")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chains", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--only", choices=["mediafarm", "celery"])
    parser.add_argument("--worker", action="append", metavar="PATH[@VAR=VALUE,...]",
                        help="echo-worker binary, with settings in its environment; repeat to "
                             "interleave several (default: the release build)")
    parser.add_argument("--concurrency", type=int)
    args = parser.parse_args()
    rabbit, redis_pid = pid_of("beam.smp"), pid_of("redis-server")
    idle = sample({"rabbitmq": rabbit, "redis": redis_pid})
    time.sleep(1)
    quiet = sample({"rabbitmq": rabbit, "redis": redis_pid})
    print(f"load average {os.getloadavg()}; over 1 s before the runs: RabbitMQ "
          f"{(quiet['rabbitmq'] - idle['rabbitmq']) * 100:.0f}%, Redis "
          f"{(quiet['redis'] - idle['redis']) * 100:.0f}% of a core")
    worker_env = {"MEDIAFARM_BROKER_URL": BROKER, "MEDIAFARM_RESULT_BACKEND": BACKEND,
                  "MEDIAFARM_METRICS_ADDR": "127.0.0.1:0"}
    given = ["--concurrency", str(args.concurrency)] if args.concurrency else []
    mfs = []
    for spec in args.worker or [str(RELEASE / "examples" / "echo-worker")]:
        label, path, env = worker_spec(spec)
        mfs.append((label, lambda q, path=path: [path, "--queues", q, *given, "--loglevel",
                                                  "warning"],
                    {**worker_env, **env}, None))
    cy = ("celery prefork -c 2", celery,
          {"BENCH_BROKER_URL": BROKER, "BENCH_RESULT_BACKEND": BACKEND}, ROOT / "bench")
    variants = ([cy] if args.only in (None, "celery") else []) + \
        (mfs if args.only in (None, "mediafarm") else [])
    for _ in range(args.rounds):
        for label, command, env, cwd in variants:
            run(label, command, env, cwd, args.chains, rabbit, redis_pid)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()

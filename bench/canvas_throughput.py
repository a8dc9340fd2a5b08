"""Canvas benchmark (issue 14): Celery workflows run by mediafarm's echo-worker and by a plain
Celery 5.7 worker, both produced by Python Celery's own canvas, so the wire is Celery's:

  (1) chains of 3 no-op steps, each step taking its parent's result (not immutable):
      `chain(echo.step(i=n), echo.step(), echo.step()).apply_async()` N times, published before
      the worker starts; the rate is N chains over the time from the first result to the
      last (the records' own `date_done`), so publishing and process start-up are not counted;
  (2) a chord of 1,000 no-op headers with a no-op body, published once the worker has
      answered a probe: the time from the start of `chord(...).apply_async()` (publishing
      included, as a user waits for it) to the body's SUCCESS stored in Redis;
  (3) for mediafarm only, the same live chord sent by mediafarm's own producer
      (`mediafarm submit --workflow -`), as a Rust app or a script would send it: the live
      figure without Python's publishing time; twice: timed from the process's start, and
      from writing the chord to a `mediafarm submit` already running and connected (it sent a
      probe first), as Celery's side is timed in a running process with its connection up.

Contenders: echo-worker (release build) at its default concurrency and settings, and Celery
5.7 prefork `-c 2` (bench/celery_echo_app.py: JSON, late acks, prefetch multiplier 4, Redis
backend, the same task name `echo.step`). Same RabbitMQ and Redis (a dedicated database,
flushed before each phase), a fresh queue per variant and round, rounds interleaved; medians.
Every result is checked: each chain's last result is SUCCESS and holds its parents' results,
the chord body got all header results in order.

Usage: .venv/bin/python bench/canvas_throughput.py [--chains 500] [--chord-size 1000]
       [--rounds 3] [--quick] [--concurrency N] [--no-build] [--worker PATH[@VAR=VALUE,...]]...
Only 127.0.0.1 is contacted; every phase has a time limit and every process is stopped.
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

import redis
from bench_common import (bench_app, build_release_examples, delete_queue, stop,
                          worker_spec)
from celery import chain, chord, signature

ROOT = Path(__file__).resolve().parent.parent
RELEASE = ROOT / "target" / "release"
BROKER = os.environ.get("BENCH_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//")
BACKEND = os.environ.get("BENCH_RESULT_BACKEND", "redis://127.0.0.1:6379/15")
LOGS = ROOT / "var" / "bench"
TASK = "echo.step"


class Producer:
    """Python Celery's client with the Redis backend (a chord needs it: `apply_async` sets the
    header's size at celery-taskset-meta-<gid>.s). A fresh one per phase, closed after, so the
    result subscriptions Celery opens for every sent task do not pile up across phases."""

    def __enter__(self):
        self.app = bench_app("bench_canvas_producer", BACKEND)
        return self.app

    def __exit__(self, *exc):
        # Celery keeps every sent task's result object until the task is ready or forgotten,
        # and each one's __del__ unsubscribes it: at interpreter exit that fails with a
        # traceback per object. Drop them here, then close the subscription connection.
        backend = self.app.backend
        for mapping in getattr(backend, "_pending_results", ()):
            for waiters in list(mapping.values()):
                for result in list(waiters.values()):
                    result.backend = None
            mapping.clear()
        consumer = getattr(backend, "result_consumer", None)
        if consumer is not None and getattr(consumer, "_pubsub", None) is not None:
            consumer.stop()
        self.app.close()


def step(queue, **kwargs):
    return signature(TASK, kwargs=kwargs, queue=queue)


class Worker:
    """The contender's process on `queue`, logging to var/bench/, stopped on exit."""

    def __init__(self, label, command, env, cwd, queue, timeout):
        self.label, self.timeout = label, timeout
        LOGS.mkdir(parents=True, exist_ok=True)
        self.log_path = log_path(label)
        self.log = open(self.log_path, "a")
        self.proc = subprocess.Popen(command(queue), cwd=cwd, env={**os.environ, **env},
                                     stdin=subprocess.DEVNULL, stdout=self.log,
                                     stderr=self.log)

    def wait_for(self, done, interval=0.02):
        """Polls `done()` every `interval` seconds; returns when it became true. Fails on
        timeout or if the worker exits. The times the rates are computed from are the records'
        own `date_done`, not this poll's: a poll every 2 ms cost 13 % of a core, taken from the
        contender being measured."""
        began = time.monotonic()
        while not done():
            if self.proc.poll() is not None:
                raise SystemExit(f"{self.label} exited early ({self.proc.returncode}); "
                                 f"see {self.log_path}")
            if time.monotonic() - began > self.timeout:
                raise SystemExit(f"{self.label}: timed out after {self.timeout} s; "
                                 f"see {self.log_path}")
            time.sleep(interval)
        return time.monotonic()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        stop(self.proc)
        self.log.close()


def publish_chains(queue, chains):
    """Publishes `chains` 3-step `echo.step` chains through Celery's canvas; returns each chain's
    last task id."""
    with Producer():
        return [chain(step(queue, i=n), step(queue), step(queue)).apply_async().id
                for n in range(chains)]


def load(store, task_id):
    raw = store.get(f"celery-task-meta-{task_id}")
    return json.loads(raw) if raw else None


def done_at(meta):
    """The Unix time a result record says its task ended (`date_done`, which Celery and
    mediafarm both write just before storing the record)."""
    done = datetime.fromisoformat(meta["date_done"])
    if done.tzinfo is None:
        done = done.replace(tzinfo=timezone.utc)
    return done.timestamp()


def done_times(store, skip=()):
    """`date_done` of every task result record in the database but the ids in `skip`."""
    keys = [k for k in store.scan_iter(match="celery-task-meta-*", count=1000)
            if k.decode().removeprefix("celery-task-meta-") not in skip]
    times = []
    for start in range(0, len(keys), 1000):
        times += [done_at(json.loads(raw)) for raw in store.mget(keys[start:start + 1000])]
    return times


def send_chord(queue, size):
    return chord([step(queue, i=k) for k in range(size)], step(queue, body=True)).apply_async().id


def check_chord(label, store, body, size):
    meta = load(store, body)
    want = {"body": True, "parent": [{"i": k} for k in range(size)]}
    if meta["status"] != "SUCCESS" or meta["result"] != want:
        raise SystemExit(f"{label}: chord body ended {meta['status']} "
                         f"{str(meta['result'])[:300]}, not the {size} header results")


def log_path(label):
    return LOGS / f"canvas_{label.replace(' ', '_').replace('/', '_')}.log"


def rust_chord(queue, size, body_id):
    """The same chord as `send_chord`, as the JSON `mediafarm submit --workflow` reads."""
    def sig(**kwargs):
        return {"task": TASK, "kwargs": kwargs, "options": {"queue": queue}}
    body = sig(body=True)
    body["options"]["task_id"] = body_id
    return json.dumps({"chord": {"header": [sig(i=k) for k in range(size)], "body": body}})


def run_variant(label, command, env, cwd, chains, chord_size, timeout, rust_producer=False):
    """One round of one contender. Returns chains per second, the live chord's seconds (and
    its publishing's), the pre-published chord's seconds, and (with `rust_producer`) the live
    chord's seconds when mediafarm's own producer sends it, else None."""
    queue = f"bench-canvas-{uuid.uuid4().hex[:8]}"
    store = redis.Redis.from_url(BACKEND)
    store.flushdb()
    try:
        lasts = publish_chains(queue, chains)
        with Worker(label, command, env, cwd, queue, timeout) as w:
            w.wait_for(lambda: store.dbsize() >= 3 * chains)
            for n, task_id in enumerate(lasts):
                meta = load(store, task_id)
                want = {"parent": {"parent": {"i": n}}}
                if not meta or meta["status"] != "SUCCESS" or meta["result"] != want:
                    raise SystemExit(f"{label}: chain {n} ended {meta!r}, not SUCCESS {want}")
            times = done_times(store)
            chain_rate = chains / (max(times) - min(times))

            # Live chord: the worker is up (a probe makes sure it consumes), the clock starts
            # before publishing, as a user waits.
            store.flushdb()
            with Producer():
                probe = step(queue, probe=True).apply_async().id
            w.wait_for(lambda: load(store, probe) is not None)
            store.flushdb()
            with Producer():
                began = time.time()
                body = send_chord(queue, chord_size)
                published = time.time()
                w.wait_for(lambda: store.exists(f"celery-task-meta-{body}"))
            ended = done_at(load(store, body))
            check_chord(label, store, body, chord_size)

            rust_live = warm_live = None
            if rust_producer:
                store.flushdb()
                body = str(uuid.uuid4())
                workflow = rust_chord(queue, chord_size, body)
                rust_began = time.time()
                subprocess.run([env.get("BENCH_MEDIAFARM", RELEASE / "mediafarm"), "submit",
                                "--workflow", "-"],
                               input=workflow, text=True, env={**os.environ, **env},
                               stdout=subprocess.DEVNULL, check=True, timeout=timeout)
                submitted = time.time()
                w.wait_for(lambda: store.exists(f"celery-task-meta-{body}"))
                check_chord(label, store, body, chord_size)
                rust_live = done_at(load(store, body)) - rust_began
                first = min(done_times(store, skip={body})) - rust_began
                print(f"  {label}: mediafarm submit ran {submitted - rust_began:.3f} s; first "
                      f"header result at {first:.3f} s, body at {rust_live:.3f} s",
                      file=sys.stderr, flush=True)
                warm_live = warm_rust_chord(env, queue, chord_size, store, w, label, timeout)

        # Pre-published chord: the worker alone, as for the chains, from the first header's
        # `date_done` to the body's.
        store.flushdb()
        with Producer():
            body = send_chord(queue, chord_size)
        with Worker(label, command, env, cwd, queue, timeout) as w:
            w.wait_for(lambda: store.exists(f"celery-task-meta-{body}"))
        check_chord(label, store, body, chord_size)
        drain_began = min(done_times(store, skip={body}))
        drain_ended = done_at(load(store, body))
    finally:
        delete_queue(BROKER, queue)
    return (chain_rate, ended - began, published - began, drain_ended - drain_began, rust_live,
            warm_live)


def warm_rust_chord(env, queue, chord_size, store, worker, label, timeout):
    """The live chord sent by a `mediafarm submit --workflow -` that is already running and
    connected, as Celery's side is timed in a running process with its producer's connection
    up: a probe workflow first (its id printed, its result stored: connected, and the worker
    consuming), then the clock starts and the chord's JSON is written to the same stdin."""
    store.flushdb()
    proc = subprocess.Popen([env.get("BENCH_MEDIAFARM", RELEASE / "mediafarm"), "submit",
                             "--workflow", "-"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            env={**os.environ, **env}, text=True)
    try:
        probe = json.dumps({"task": TASK, "kwargs": {"probe": True},
                            "options": {"queue": queue}})
        proc.stdin.write(probe + "\n")
        proc.stdin.flush()
        probe_id = proc.stdout.readline().strip()
        if not probe_id:
            raise SystemExit(f"{label}: mediafarm submit printed no id for the probe")
        worker.wait_for(lambda: load(store, probe_id) is not None)
        store.flushdb()
        body = str(uuid.uuid4())
        workflow = rust_chord(queue, chord_size, body)
        began = time.time()
        proc.stdin.write(workflow + "\n")
        proc.stdin.close()
        worker.wait_for(lambda: store.exists(f"celery-task-meta-{body}"))
        check_chord(label, store, body, chord_size)
        live = done_at(load(store, body)) - began
        if proc.wait(timeout=timeout) != 0:
            raise SystemExit(f"{label}: mediafarm submit exited {proc.returncode}")
    finally:
        stop(proc)
    print(f"  {label}: warm mediafarm submit: body at {live:.3f} s", file=sys.stderr, flush=True)
    return live


def celery(queue):
    # A node name of its own: another Celery worker on this host would hold `celery@host`'s
    # pidbox queue.
    return [sys.executable, "-m", "celery", "-A", "celery_echo_app", "worker",
            "-P", "prefork", "-c", "2", "-Q", queue, "-n", f"{queue}@%h", "-l", "warning",
            "--without-gossip", "--without-mingle", "--without-heartbeat"]


def echo_worker(concurrency, path=RELEASE / "examples" / "echo-worker"):
    given = ["--concurrency", str(concurrency)] if concurrency else []
    return lambda queue: [path, "--queues", queue, *given, "--loglevel", "warning"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chains", type=int, default=500)
    parser.add_argument("--chord-size", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds, variants interleaved within each; medians")
    parser.add_argument("--quick", action="store_true", help="50 chains, for a smoke run")
    parser.add_argument("--concurrency", type=int,
                        help="echo-worker's --concurrency (default: its own default, the "
                             "number of cores)")
    parser.add_argument("--no-build", action="store_true")
    parser.add_argument("--worker", action="append", metavar="PATH[@VAR=VALUE,...]",
                        help="an echo-worker binary to run instead of the release build, with "
                             "settings in its environment; repeat to interleave several "
                             "(BENCH_MEDIAFARM=PATH among the settings: the `mediafarm` binary "
                             "that sends that variant's live chord)")
    args = parser.parse_args()
    chains = 50 if args.quick else args.chains
    if not args.no_build:
        build_release_examples()
    worker_env = {
        "MEDIAFARM_BROKER_URL": BROKER,
        "MEDIAFARM_RESULT_BACKEND": BACKEND,
        "MEDIAFARM_METRICS_ADDR": "127.0.0.1:0",
    }
    celery_env = {"BENCH_BROKER_URL": BROKER, "BENCH_RESULT_BACKEND": BACKEND}
    celery_label = "celery prefork -c 2"
    mf_label = (f"echo-worker -c {args.concurrency}" if args.concurrency
                else "echo-worker (defaults)")
    celery_timeout = (chains * 3 + args.chord_size) * 40 // 1000 + 120
    variants = [(celery_label, celery, celery_env, ROOT / "bench", celery_timeout)]
    if args.worker:
        for spec in args.worker:
            label, path, env = worker_spec(spec)
            variants.append((label, echo_worker(args.concurrency, path), {**worker_env, **env},
                             None, 120))
    else:
        variants.append((mf_label, echo_worker(args.concurrency), worker_env, None, 120))
    mf_labels = [label for label, *_ in variants[1:]]
    if not (RELEASE / "mediafarm").exists():
        raise SystemExit(f"{RELEASE / 'mediafarm'} is missing: run without --no-build")
    for label, *_ in variants:
        log_path(label).unlink(missing_ok=True)
    results = {label: [] for label, *_ in variants}
    for r in range(args.rounds):
        for label, command, env, cwd, timeout in variants:
            rate, live, publish, drain, rust_live, warm_live = run_variant(
                label, command, env, cwd, chains, args.chord_size, timeout,
                rust_producer=label in mf_labels)
            results[label].append((rate, live, publish, drain, rust_live, warm_live))
            rust = (f"; live with mediafarm's producer {rust_live:.3f} s (process start "
                    f"included), {warm_live:.3f} s (already running)") if rust_live else ""
            print(f"round {r + 1}: {label}: {rate:,.0f} chains/s; chord of {args.chord_size} "
                  f"live {live:.3f} s (publishing {publish:.3f} s), pre-published "
                  f"{drain:.3f} s{rust}", file=sys.stderr, flush=True)

    def median(label, i):
        return statistics.median(x[i] for x in results[label])

    def spread(label, i, fmt):
        return " / ".join(format(x[i], fmt) for x in results[label])

    print(f"\nchains of 3 `{TASK}` steps (each takes its parent's result): {chains} per variant, "
          f"published beforehand, timed from the first stored result to the last chain's end; "
          f"chord of {args.chord_size} `{TASK}` headers + body: live = from the start of "
          f"publishing to the body's result, the worker running; pre-published = from the first "
          f"header result to the body's, published beforehand. Python Celery's canvas publishes. "
          f"Median of {args.rounds} interleaved round(s); {os.cpu_count()} cores, "
          f"{platform.platform()}, {time.strftime('%Y-%m-%d')}")
    print("| variant | chains/s | rounds | chord live s | rounds | of which publishing | "
          "chord pre-published s | rounds |")
    print("| --- | ---: | --- | ---: | --- | ---: | ---: | --- |")
    for label, *_ in variants:
        print(f"| {label} | {median(label, 0):,.0f} | {spread(label, 0, ',.0f')} | "
              f"{median(label, 1):.3f} | {spread(label, 1, '.3f')} | {median(label, 2):.3f} | "
              f"{median(label, 3):.3f} | {spread(label, 3, '.3f')} |")
    cy = celery_label
    for mf in mf_labels:
        print(f"\nchains: {mf} = {median(mf, 0) / median(cy, 0):.1f}× {cy} (target ≥ 8×)")
        print(f"chord of {args.chord_size}, live: {median(cy, 1) / median(mf, 1):.1f}× ({cy}'s "
              f"time ÷ ours; target ≥ 8×; publishing alone, by Celery's client, took "
              f"{median(cy, 2):.2f} s and {median(mf, 2):.2f} s of them)")
        print(f"chord of {args.chord_size}, pre-published: {median(cy, 3) / median(mf, 3):.1f}× "
              f"({cy}'s time ÷ ours)")
        print(f"chord of {args.chord_size}, live, each side's own producer (Celery's canvas for "
              f"Celery, `mediafarm submit --workflow` for mediafarm, its process start "
              f"included: {median(mf, 4):.3f} s, rounds {spread(mf, 4, '.3f')}): "
              f"{median(cy, 1) / median(mf, 4):.1f}× (target ≥ 8×)")
        print(f"chord of {args.chord_size}, live, each side's own producer already running and "
              f"connected, as Celery's is timed (a `mediafarm submit --workflow -` that sent a "
              f"probe first: {median(mf, 5):.3f} s, rounds {spread(mf, 5, '.3f')}): "
              f"{median(cy, 1) / median(mf, 5):.1f}× (target ≥ 8×)")
    print(f"load average at the end: {os.getloadavg()}")


if __name__ == "__main__":
    main()

"""Runtime-core throughput benchmark (issues 2, 3 and 12): drain a pre-published backlog of
`echo.echo` jobs, every result stored in Redis and every message acknowledged after its result,
with

  (a) mediafarm's echo-worker: the headline at `--concurrency 8` with default settings
      (prefetch multiplier 4), and with --set full also at -c 2 and -c 64, and at -c 64 with
      1 job in 100 failing once and retried through the broker's delay queues (issue 3),
  (b) a plain Celery 5.7 worker (JSON, task_acks_late, prefetch multiplier 4, Redis backend),
      in each set-up given by --celery (default prefork -c 2, its fastest on two cores for
      this task; see BENCHMARKS.md); the fastest by median is the competitor,
  (c) a bare lapin consumer that reads the id header, writes one Redis key per message and acks
      it (the ceiling, at the same prefetch as the echo-worker it is compared with),

against the same RabbitMQ and Redis in one run, rounds interleaved. Each variant gets a fresh
queue holding N jobs published before it starts — by default with Python Celery's own client
(bench/celery_publish.py: every header Celery writes), or with --publisher lean by mediafarm's
bench-publisher — and the rate is measured from the first stored result to the N-th (polling
Redis DBSIZE on a dedicated database), so publishing and process start-up are not counted.

With `--baseline-worker PATH` (an echo-worker built from an earlier commit, e.g. the runtime
core as it landed) that build runs too, for a before/after ratio in the same run.

With `--events` (issue 15) each Celery set-up also runs with `-E` and the headline echo-worker
with `-E` (task events and worker heartbeats on the `celeryev` exchange), in the same rounds,
and the cost of events is printed for each side as the % of its own rate without them. No
receiver is bound to `celeryev` (the broker drops what nobody listens to), for either side.

With `--otel` (issue 15) the headline echo-worker also runs with OpenTelemetry export on
(`OTEL_EXPORTER_OTLP_ENDPOINT` pointing at bench/otlp_sink.py, a trivial local OTLP/HTTP sink):
a span per job, batched and posted as OTLP/JSON; the cost is its rate against the same worker
with export off, in the same rounds.

With `BENCH_BROKER_URL=redis://127.0.0.1:6379/N` (issue 19) both sides use Redis as the broker
(kombu's Redis transport; the echo-worker's `broker_url` is the same URL) and the bare lapin
ceiling is not run (it is an AMQP consumer).

Usage: .venv/bin/python bench/echo_throughput.py [--jobs 20000] [--rounds 3] [--quick]
       [--publisher celery|lean] [--celery prefork:2] [--concurrency 8] [--set headline|full]
       [--baseline-worker PATH] [--events] [--otel] [--no-build]
Only 127.0.0.1 is contacted; every phase has a time limit and every process is stopped.
"""
import argparse
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

import redis
from bench_common import build_release_examples, delete_queue, stop


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

ROOT = Path(__file__).resolve().parent.parent
RELEASE = ROOT / "target" / "release"
BROKER = os.environ.get("BENCH_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//")
BACKEND = os.environ.get("BENCH_RESULT_BACKEND", "redis://127.0.0.1:6379/14")
REDIS_BROKER = BROKER.startswith(("redis://", "rediss://", "redis+unix://", "unix://"))
LOGS = ROOT / "var" / "bench"


def publish(queue, jobs, retry_every=None, publisher="celery"):
    """Puts `jobs` on `queue` before the consumer starts; returns the ids of the jobs that fail
    once. "celery": Python Celery's own client with its defaults (every header Celery writes);
    "lean": mediafarm's bench-publisher (only what mediafarm's client writes, ids
    `<queue>-<n>`)."""
    extra = ["--retry-every", str(retry_every)] if retry_every else []
    if publisher == "celery":
        out = subprocess.run(
            [sys.executable, ROOT / "bench" / "celery_publish.py", "--queue", queue,
             "--count", str(jobs), *extra],
            env={**os.environ, "BENCH_BROKER_URL": BROKER},
            check=True, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
            timeout=600,
        )
        return out.stdout.split()
    subprocess.run(
        [RELEASE / "examples" / "bench-publisher", "--queue", queue, "--count", str(jobs),
         "--id-prefix", queue, *extra],
        env={**os.environ, "MEDIAFARM_BROKER_URL": BROKER},
        check=True,
        stderr=subprocess.DEVNULL,
        timeout=600,
    )
    return [f"{queue}-{i}" for i in range(0, jobs, retry_every)] if retry_every else []


def drain(label, command, jobs, timeout, cwd=None, env=None, retry_every=None,
          publisher="celery"):
    """Publishes `jobs` to a fresh queue, starts `command(queue)`, times the drain (until every
    job has a result, and every retried one its final SUCCESS)."""
    queue = f"bench-{uuid.uuid4().hex[:8]}"
    store = redis.Redis.from_url(BACKEND)
    store.flushdb()
    retried = [f"celery-task-meta-{i}" for i in publish(queue, jobs, retry_every, publisher)]
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


def echo_worker(concurrency, binary=None, events=False):
    binary = binary or RELEASE / "examples" / "echo-worker"
    return lambda q: [binary, "--concurrency", str(concurrency), "--queues", q,
                      "--loglevel", "warning", *(["-E"] if events else [])]


def bare(prefetch):
    return lambda q: [RELEASE / "examples" / "bench-bare-consumer", "--queue", q,
                      "--prefetch", str(prefetch), "--redis", BACKEND, "--max-seconds", "600"]


def celery(pool, concurrency, events=False):
    # With -E Celery's worker heartbeats stay on too, as events bring them in mediafarm.
    quiet = [] if events else ["--without-heartbeat"]
    return lambda q: [sys.executable, "-m", "celery", "-A", "celery_echo_app", "worker",
                      "-P", pool, "-c", str(concurrency), "-Q", q, "-l", "warning",
                      "--without-gossip", "--without-mingle", *quiet,
                      *(["-E"] if events else [])]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds, variants interleaved within each; medians")
    parser.add_argument("--quick", action="store_true", help="2,000 jobs, for a smoke run")
    parser.add_argument("--publisher", choices=("celery", "lean"), default="celery",
                        help="celery: Python Celery's client with its defaults (the headline); "
                             "lean: mediafarm's bench-publisher")
    parser.add_argument("--celery", default="prefork:2",
                        help="Celery set-ups, POOL:CONCURRENCY, comma-separated; the fastest by "
                             "median is the competitor")
    parser.add_argument("--concurrency", type=int, default=8,
                        help="the headline echo-worker's --concurrency (default settings otherwise)")
    parser.add_argument("--high-concurrency", type=int, default=64)
    parser.add_argument("--set", choices=("headline", "full"), default="full",
                        help="headline: Celery, echo-worker --concurrency N and its bare ceiling; "
                             "full: also -c 2, -c HIGH, HIGH with retries and their ceilings")
    parser.add_argument("--baseline-worker", type=Path,
                        help="an earlier build of echo-worker to compare with")
    parser.add_argument("--events", action="store_true",
                        help="also run each Celery set-up with -E and the headline echo-worker "
                             "with -E, and print what events cost each side")
    parser.add_argument("--otel", action="store_true",
                        help="also the headline echo-worker with OTLP trace export on, to a "
                             "local sink")
    parser.add_argument("--no-build", action="store_true")
    args = parser.parse_args()
    jobs = 2_000 if args.quick else args.jobs
    if not args.no_build:
        build_release_examples()
    worker_env = {
        "MEDIAFARM_BROKER_URL": BROKER,
        "MEDIAFARM_RESULT_BACKEND": BACKEND,
        "MEDIAFARM_METRICS_ADDR": "127.0.0.1:0",
    }
    celery_env = {"BENCH_BROKER_URL": BROKER, "BENCH_RESULT_BACKEND": BACKEND}
    c, hc = args.concurrency, args.high_concurrency
    celery_timeout = jobs * 40 // 1000 + 300
    variants = []
    for setup in filter(None, args.celery.split(",")):
        pool, cc = setup.split(":")
        prefetch = 4 * (1 if pool == "solo" else int(cc))
        variants.append((f"celery {pool} -c {cc}", celery(pool, cc), celery_timeout,
                         ROOT / "bench", celery_env, prefetch))
        if args.events:
            variants.append((f"celery {pool} -c {cc} -E", celery(pool, cc, events=True),
                             celery_timeout, ROOT / "bench", celery_env, prefetch))
    variants += [
        (f"echo-worker -c {c}", echo_worker(c), 300, None, worker_env, c * 4),
        (f"bare lapin prefetch {c * 4}", bare(c * 4), 300, None, None, c * 4),
    ]
    if REDIS_BROKER:
        variants.pop()
    if args.events:
        variants.insert(len(variants) - 1, (f"echo-worker -c {c} -E",
                                            echo_worker(c, events=True), 300, None, worker_env,
                                            c * 4))
    retrying = f"echo-worker -c {hc}, 1 % retried once"
    if args.set == "full":
        for n in (2, hc):
            if n != c:  # the headline's pair is there already
                variants += [
                    (f"echo-worker -c {n}", echo_worker(n), 300, None, worker_env, n * 4),
                    (f"bare lapin prefetch {n * 4}", bare(n * 4), 300, None, None, n * 4),
                ][:1 if REDIS_BROKER else 2]
        variants.append((retrying, echo_worker(hc), 300, None, worker_env, hc * 4))
    # The earlier build runs at the headline concurrency, right after this build's headline.
    baseline = f"baseline echo-worker -c {c}"
    if args.baseline_worker:
        variants.insert(len([v for v in variants if v[0].startswith("celery")]) + 1,
                        (baseline, echo_worker(c, args.baseline_worker.resolve()), 300, None,
                         worker_env, c * 4))
    traced = f"echo-worker -c {c}, OTLP export on"
    sink = None
    if args.otel:
        port, counts = free_port(), LOGS / "otlp_sink.counts"
        LOGS.mkdir(parents=True, exist_ok=True)
        sink = subprocess.Popen([sys.executable, ROOT / "bench" / "otlp_sink.py", str(port),
                                 counts], stdin=subprocess.DEVNULL)
        otel_env = {**worker_env, "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
                    "OTEL_SERVICE_NAME": "bench-echo-worker"}
        at = [label for label, *_ in variants].index(f"echo-worker -c {c}") + 1
        variants.insert(at, (traced, echo_worker(c), 300, None, otel_env, c * 4))
    rates = {label: [] for label, *_ in variants}
    try:
        for r in range(args.rounds):
            for label, command, timeout, cwd, env, _prefetch in variants:
                rate = drain(label, command, jobs, timeout, cwd, env,
                             100 if label == retrying else None, args.publisher)
                rates[label].append(rate)
                print(f"round {r + 1}: {label} {rate:,.0f} jobs/s", file=sys.stderr,
                      flush=True)
    finally:
        if sink:
            stop(sink)
    if sink:
        requests, spans = counts.read_text().split()
        print(f"OTLP sink: {spans} spans in {requests} requests", file=sys.stderr)
    rate = {label: statistics.median(r) for label, r in rates.items()}
    celery_labels = [l for l in rate if l.startswith("celery") and not l.endswith(" -E")]
    competitor = max(celery_labels, key=rate.get)
    celery_rate = rate[competitor]
    bare_by_prefetch = {p: rate[l] for l, *_, p in variants if l.startswith("bare")}

    print(f"\n{jobs} echo.echo jobs per variant, published by "
          f"{'Python Celery' if args.publisher == 'celery' else 'bench-publisher (lean)'}; "
          f"median of {args.rounds} interleaved round(s); {os.cpu_count()} cores, "
          f"{platform.platform()}, {time.strftime('%Y-%m-%d')}")
    print(f"| variant | prefetch | jobs/s (median) | rounds | × {competitor} | "
          f"% of bare ceiling (same prefetch) |")
    print("| --- | ---: | ---: | --- | ---: | ---: |")
    for label, *_, prefetch in variants:
        ceiling = bare_by_prefetch.get(prefetch)
        share = ("—" if label.startswith(("bare", "celery")) or not ceiling
                 else f"{100 * rate[label] / ceiling:.0f} %")
        spread = " / ".join(f"{x:,.0f}" for x in rates[label])
        print(f"| {label} | {prefetch} | {rate[label]:,.0f} | {spread} | "
              f"{rate[label] / celery_rate:.1f} | {share} |")
    head = f"echo-worker -c {c}"
    per_round = [a / b for a, b in zip(rates[head], rates[competitor])]
    ceiling = (f", {100 * rate[head] / bare_by_prefetch[c * 4]:.0f} % of the bare ceiling"
               if c * 4 in bare_by_prefetch else "")
    print(f"\nheadline: {head} (default settings) = {rate[head] / celery_rate:.1f}× "
          f"{competitor} (per round {min(per_round):.1f}–{max(per_round):.1f}×; target ≥ 10×)"
          f"{ceiling}; broker {BROKER}")
    if args.baseline_worker:
        per_round = [a / b for a, b in zip(rates[head], rates[baseline])]
        print(f"this build vs the baseline build ({args.baseline_worker}), both -c {c}: "
              f"{100 * rate[head] / rate[baseline]:.0f} % (per round "
              f"{100 * min(per_round):.0f}–{100 * max(per_round):.0f} %)")
    if args.events:
        print("\ncost of events (-E), each side against itself without events, same rounds:")
        for plain in [*celery_labels, head]:
            with_events = f"{plain} -E"
            costs = [100 * (1 - e / p) for e, p in zip(rates[with_events], rates[plain])]
            print(f"  {plain}: {rate[plain]:,.0f} → {rate[with_events]:,.0f} jobs/s with -E: "
                  f"{100 * (1 - rate[with_events] / rate[plain]):.1f} % slower (per round "
                  f"{min(costs):.1f} to {max(costs):.1f} %)"
                  + ("; target ≤ 10 %" if plain == head else ""))
    if args.otel:
        per_round = [a / b for a, b in zip(rates[traced], rates[head])]
        print(f"with OTLP trace export on: {100 * rate[traced] / rate[head]:.0f} % of the "
              f"same worker's rate with export off (per round {100 * min(per_round):.0f}–"
              f"{100 * max(per_round):.0f} %)")
    if args.set == "full":
        plain = f"echo-worker -c {hc}"
        print(f"with 1 % of jobs retried once through the delay queues: "
              f"{100 * rate[retrying] / rate[plain]:.0f} % of the plain rate (goal ≥ 90 %)")



if __name__ == "__main__":
    main()

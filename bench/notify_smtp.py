"""notify-worker benchmark (issue 6): emails per second delivered to a local SMTP server by

  (a) notify-worker (one pooled SMTP connection per concurrent job slot, reused across jobs),
  (b) a plain Celery 5.7 worker whose task sends with smtplib, one connection per email, as
      typical Django code does, in each of the set-ups given by --celery (pool and
      concurrency); the fastest of them by median is the competitor. For this I/O-bound task
      prefork with more processes than cores is usually Celery's best (`-P threads` pays for
      the GIL, gevent is not installed),

in one run, rounds interleaved, against the same RabbitMQ, Redis and SMTP server (aiosmtpd,
counting only, in --sink-processes processes sharing one listening socket, TCP_NODELAY on
every accepted connection, the same server for every side). Each variant gets a fresh queue
holding N `notify.email` jobs published by Python Celery's client before its worker starts;
the rate is measured from the first message the SMTP server accepts to the N-th, so start-up
is not counted. Every job stores its result in Redis and is acknowledged after it.

Usage: .venv/bin/python bench/notify_smtp.py [--jobs 2000] [--rounds 3] [--concurrency 4]
       [--celery prefork:4,prefork:8,threads:8] [--sink-processes 2] [--no-notify-worker]
       [--worker PATH] [--no-build]
Only 127.0.0.1 is contacted; every phase has a time limit and every process is stopped.
"""
import argparse
import asyncio
import json
import multiprocessing
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

from celery import Celery
from bench_common import delete_queue, stop

ROOT = Path(__file__).resolve().parent.parent
BROKER = os.environ.get("BENCH_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//")
BACKEND = os.environ.get("BENCH_RESULT_BACKEND", "redis://127.0.0.1:6379/14")
LOGS = ROOT / "var" / "bench"


class Sink:
    """aiosmtpd counting messages and connections, in `processes` forked processes sharing one
    listening socket (so the Python server is not what limits the faster side)."""

    def __init__(self, processes):
        # The protocol number matters: asyncio sets TCP_NODELAY on an accepted connection only
        # when the socket says IPPROTO_TCP, and accepted sockets inherit it from this one.
        # Without it every multi-line SMTP reply waits out the client's 40 ms delayed ACK
        # (Nagle), which capped the one-connection-per-email side at ~80 emails/s.
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(1024)
        self.port = self.sock.getsockname()[1]
        self.lock = multiprocessing.Lock()
        self._count = multiprocessing.Value("q", 0, lock=False)
        self._connections = multiprocessing.Value("q", 0, lock=False)
        self._first = multiprocessing.Value("d", 0.0, lock=False)
        self._last = multiprocessing.Value("d", 0.0, lock=False)
        self.procs = [multiprocessing.Process(target=self._serve, daemon=True)
                      for _ in range(processes)]
        for p in self.procs:
            p.start()
        if not processes:  # 0: a thread of this process
            threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        from aiosmtpd.smtp import SMTP

        sink = self

        class Handler:
            async def handle_DATA(self, server, session, envelope):
                now = time.monotonic()
                with sink.lock:
                    sink._count.value += 1
                    if not sink._first.value:
                        sink._first.value = now
                    sink._last.value = now
                return "250 OK"

        class Counting(SMTP):
            def connection_made(self, transport):
                # Explicit as well, so no listening-socket detail can bring the stall back.
                conn = transport.get_extra_info("socket")
                if conn is not None:
                    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                with sink.lock:
                    sink._connections.value += 1
                super().connection_made(transport)

        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        loop.run_until_complete(loop.create_server(
            lambda: Counting(Handler(), hostname="bench.sink"), sock=self.sock))
        loop.run_forever()

    @property
    def count(self):
        return self._count.value

    @property
    def connections(self):
        return self._connections.value

    @property
    def first(self):
        return self._first.value

    @property
    def last(self):
        return self._last.value

    def reset(self):
        with self.lock:
            self._count.value = self._connections.value = 0
            self._first.value = self._last.value = 0.0

    def close(self):
        for p in self.procs:
            p.terminate()
            p.join(5)


def publish(queue, jobs):
    app = Celery("bench_producer", broker=BROKER, backend=BACKEND)
    app.conf.update(task_serializer="json", accept_content=["json"])
    with app.producer_or_acquire() as producer:
        for i in range(jobs):
            app.send_task("notify.email", queue=queue, producer=producer, kwargs={
                "to": f"user{i}@example.com",
                "subject": f"Your receipt #{i}",
                "text": "Thank you for your order.\nThe receipt is attached as text.\n" * 8,
            })


def run(label, command, env, sink, jobs, timeout):
    queue = f"bench-notify-{uuid.uuid4().hex[:8]}"
    publish(queue, jobs)
    sink.reset()
    LOGS.mkdir(parents=True, exist_ok=True)
    log_path = LOGS / f"notify_{label.split()[0]}.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command(queue), cwd=ROOT / "bench", env={**os.environ, **env},
                                stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        try:
            began = time.monotonic()
            while sink.count < jobs:
                if proc.poll() is not None:
                    raise SystemExit(f"{label} exited early ({proc.returncode}); see {log_path}")
                if time.monotonic() - began > timeout:
                    raise SystemExit(f"{label}: only {sink.count}/{jobs} emails after {timeout} s")
                time.sleep(0.01)
        finally:
            stop(proc)
            delete_queue(BROKER, queue)
    seconds = sink.last - sink.first
    rate = (jobs - 1) / seconds if seconds > 0 else float("inf")
    return rate, sink.connections


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3, help="rounds, interleaved; medians")
    parser.add_argument("--concurrency", type=int, default=4, help="notify-worker's")
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--sink-processes", type=int, default=2,
                        help="SMTP server processes (one listening socket); 0: a thread here")
    parser.add_argument("--celery", default="prefork:4,prefork:8,threads:8",
                        help="Celery set-ups to run, POOL:CONCURRENCY, comma-separated; the "
                             "fastest (by median) is the competitor; empty: none")
    parser.add_argument("--no-notify-worker", action="store_true",
                        help="run the Celery side only")
    parser.add_argument("--worker", type=Path, default=ROOT / "target" / "release" / "notify-worker",
                        help="the notify-worker binary (built first unless --no-build)")
    parser.add_argument("--no-build", action="store_true")
    args = parser.parse_args()
    if not args.no_notify_worker and not args.no_build:
        subprocess.run(["cargo", "build", "--release", "--locked", "-q", "-p", "notify-worker",
                        "--bin", "notify-worker"], cwd=ROOT, check=True)
    sink = Sink(args.sink_processes)
    worker = args.worker.resolve()
    rust_env = {
        "MEDIAFARM_BROKER_URL": BROKER,
        "MEDIAFARM_RESULT_BACKEND": BACKEND,
        "MEDIAFARM_SMTP_URL": f"smtp://127.0.0.1:{sink.port}",
        "MEDIAFARM_SMTP_POOL_SIZE": str(args.concurrency),
        "MEDIAFARM_METRICS_ADDR": "127.0.0.1:0",
    }
    celery_env = {
        "BENCH_BROKER_URL": BROKER,
        "BENCH_RESULT_BACKEND": BACKEND,
        "BENCH_SMTP_PORT": str(sink.port),
    }
    c = str(args.concurrency)
    variants = []
    if not args.no_notify_worker:
        variants.append((f"notify-worker -c {c}",
                         lambda q: [worker, "--concurrency", c, "--queues", q,
                                    "--loglevel", "warning"], rust_env))

    def celery(pool, cc):
        return lambda q: [sys.executable, "-m", "celery", "-A", "notify_celery_app", "worker",
                          "-P", pool, "-c", cc, "-Q", q, "-n", f"{q}@%h", "-l", "warning",
                          "--without-gossip", "--without-mingle", "--without-heartbeat"]

    for setup in filter(None, args.celery.split(",")):
        pool, cc = setup.split(":")
        variants.append((f"celery {pool} -c {cc} + smtplib", celery(pool, cc), celery_env))
    rates = {label: [] for label, *_ in variants}
    conns = {}
    for r in range(args.rounds):
        for label, command, env in variants:
            rate, conns[label] = run(label, command, env, sink, args.jobs, args.timeout)
            rates[label].append(rate)
            print(f"round {r + 1}: {label} {rate:.0f} emails/s", file=sys.stderr, flush=True)
    sink.close()
    print(f"{args.jobs} emails per variant, median of {args.rounds} interleaved round(s), "
          f"{os.cpu_count()} CPUs, {args.sink_processes} SMTP server processes, "
          f"{time.strftime('%Y-%m-%d')}")
    median = {label: statistics.median(v) for label, v in rates.items()}
    print("| variant | emails/s (median) | rounds | SMTP connections |")
    print("| --- | ---: | --- | ---: |")
    for label, v in rates.items():
        print(f"| {label} | {median[label]:,.0f} | {' / '.join(f'{x:.0f}' for x in v)} | "
              f"{conns[label]:,} |")
    summary = {"median": {k: round(v) for k, v in median.items()}}
    celery_labels = [label for label in median if label.startswith("celery")]
    if celery_labels and not args.no_notify_worker:
        best = max(celery_labels, key=median.get)
        ours = variants[0][0]
        ratio = median[ours] / median[best]
        per_round = [a / b for a, b in zip(rates[ours], rates[best])]
        print(f"ratio {ours} / fastest Celery ({best}): {ratio:.1f}x "
              f"(per round {min(per_round):.1f}–{max(per_round):.1f}x; target >= 10x)")
        summary["ratio"] = round(ratio, 2)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()

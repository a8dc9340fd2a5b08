"""notify-worker benchmark (issue 6): emails per second delivered to a local SMTP server by

  (a) notify-worker (one pooled SMTP connection per concurrent job slot, reused across jobs),
  (b) a plain Celery 5.7 worker whose task sends with smtplib, one connection per email, as
      typical Django code does (prefork, same concurrency),

in one run, against the same RabbitMQ, Redis and SMTP server (aiosmtpd, counting only, in
--sink-processes processes sharing one listening socket). Each
side gets a fresh queue holding N `notify.email` jobs published before its worker starts; the
rate is measured from the first message the SMTP server accepts to the N-th, so start-up is not
counted. Every job stores its result in Redis and is acknowledged after it.

Usage: .venv/bin/python bench/notify_smtp.py [--jobs 3000] [--concurrency 4] [--sink-processes 2]
Only 127.0.0.1 is contacted; every phase has a time limit and every process is stopped.
"""
import argparse
import asyncio
import json
import multiprocessing
import os
import socket
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
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
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
    parser.add_argument("--jobs", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--sink-processes", type=int, default=2,
                        help="SMTP server processes (one listening socket); 0: a thread here")
    parser.add_argument("--sides", default="notify-worker,celery+smtplib",
                        help="which sides to run (comma-separated)")
    args = parser.parse_args()
    subprocess.run(["cargo", "build", "--release", "-q", "-p", "notify-worker"], cwd=ROOT,
                   check=True)
    sink = Sink(args.sink_processes)
    worker = ROOT / "target" / "release" / "notify-worker"
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
    results = {}
    sides = args.sides.split(",")
    if "notify-worker" in sides:
        results["notify-worker"] = run(
            "notify-worker", lambda q: [worker, "--concurrency", c, "--queues", q,
                                        "--loglevel", "warning"],
            rust_env, sink, args.jobs, args.timeout)
    if "celery+smtplib" in sides:
        results["celery+smtplib"] = run(
            "celery+smtplib", lambda q: [sys.executable, "-m", "celery", "-A",
                                         "notify_celery_app", "worker", "-P", "prefork", "-c", c,
                                         "-Q", q, "-n", f"{q}@%h", "-l", "warning",
                                         "--without-gossip", "--without-mingle",
                                         "--without-heartbeat"],
            celery_env, sink, args.jobs, args.timeout)
    sink.close()
    print(f"{args.jobs} emails each, concurrency {c}, {os.cpu_count()} CPUs, "
          f"{args.sink_processes} SMTP server processes")
    for label, (rate, conns) in results.items():
        print(f"  {label:16s} {rate:8.0f} emails/s  ({conns} SMTP connections)")
    summary = {k: {"emails_per_s": round(v[0]), "connections": v[1]} for k, v in results.items()}
    if len(results) == 2:
        ratio = results["notify-worker"][0] / results["celery+smtplib"][0]
        print(f"  ratio notify-worker / celery+smtplib: {ratio:.1f}x (target >= 10x)")
        summary["ratio"] = round(ratio, 2)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()

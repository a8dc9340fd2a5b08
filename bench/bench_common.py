"""What the benchmark scripts share: the Celery app their Celery side runs, configured as
mediafarm's workers are (JSON only, late acks, prefetch multiplier 4, Redis backend; broker and
backend from BENCH_BROKER_URL / BENCH_RESULT_BACKEND), stopping a contender, deleting a
benchmark queue with its exchange, and reading a process's CPU time from /proc.
"""
import os
import signal
import subprocess
from pathlib import Path

from celery import Celery
from kombu import Connection


def bench_app(name, default_backend):
    app = Celery(
        name,
        broker=os.environ.get("BENCH_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//"),
        backend=os.environ.get("BENCH_RESULT_BACKEND", default_backend),
    )
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        task_acks_late=True,
        worker_prefetch_multiplier=4,
    )
    return app


def stop(proc, grace=30):
    """SIGTERM (the contender drains), then SIGKILL after `grace` seconds."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def delete_queue(broker, queue):
    with Connection(broker) as conn:
        channel = conn.channel()
        channel.queue_delete(queue)
        channel.exchange_delete(queue)


TICK = os.sysconf("SC_CLK_TCK")


def cpu_of(pid, descendants=True):
    """User + system seconds of `pid` and (unless `descendants` is False) of its live
    descendants."""
    total = 0.0
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / TICK
        if not descendants:
            return total
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                for child in f.read().split():
                    total += cpu_of(int(child))
    except (FileNotFoundError, ProcessLookupError):
        pass
    return total


def pid_of(name):
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/comm") as f:
                    if f.read().strip() == name:
                        return int(entry)
            except FileNotFoundError:
                continue
    raise SystemExit(f"no process named {name}")


def build_release_examples():
    """Builds the release examples (echo-worker, the bare consumer, the bench publisher) and
    the `mediafarm` CLI the runtime benchmarks start."""
    subprocess.run(
        ["cargo", "build", "--release", "--locked", "-q", "-p", "mediafarm", "--examples",
         "--bins"],
        cwd=Path(__file__).resolve().parent.parent,
        check=True,
    )


def worker_spec(spec):
    """`PATH` or `PATH@VAR=VALUE,VAR=VALUE`: a worker binary to benchmark and the environment
    it runs with (settings such as MEDIAFARM_WORKER_FINISHING_LIMIT), so several builds or
    settings can be interleaved in one run. Returns (label, path, env); the label is the
    binary's directory name, then the settings."""
    path, _, settings = spec.partition("@")
    env = dict(kv.split("=", 1) for kv in settings.split(",") if kv)
    label = f"echo-worker {Path(path).parent.name}"
    if env:
        label += " " + " ".join(f"{k.removeprefix('MEDIAFARM_').lower()}={v}"
                                for k, v in env.items())
    return label, path, env

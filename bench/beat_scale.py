#!/usr/bin/env python3
"""mediafarm beat vs Celery beat, same run: N periodic entries (one per live room) every P
seconds into one queue, both publishing to the machine's RabbitMQ. Not a test.

For each tick's burst of N jobs it reports when the first and the last job of the burst reached
a consumer, and the beat process's CPU per tick (user + system, from /proc, over the ticks after
the first burst). mediafarm beat's ticks sit on a fixed grid, so its lateness is measured from
the grid time; Celery beat has no grid (each entry runs `every` after its last run), so its
figure is the burst's spread, first to last job. mediafarm beat does more per tick than Celery
beat: it claims every tick in Redis (the HA guarantee) and waits for publisher confirms.

    .venv/bin/python bench/beat_scale.py [--entries 2000] [--every 5] [--ticks 3]
        [--bin target/release/mediafarm]
"""
import argparse
import faulthandler
import os
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime

import kombu

BROKER = os.environ.get("BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//")
BACKEND = os.environ.get("RESULT_BACKEND", "redis://127.0.0.1:6379/0")
CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_s(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def measure(name, proc, queue, entries, ticks, every, due_of):
    """Consumes `ticks + 1` bursts of `entries` jobs; returns per-burst figures and CPU/tick."""
    bursts = []  # [first_arrival, last_arrival, count, due]
    total = entries * (ticks + 1)
    cpu_after_first = None
    seen = 0
    deadline = time.time() + 60 + every * (ticks + 3)
    with kombu.Connection(BROKER) as conn:
        q = kombu.Queue(queue, kombu.Exchange(queue, "direct", durable=True), routing_key=queue)

        def on_message(body, message):
            nonlocal seen, cpu_after_first
            now = time.time()
            due = due_of(message.headers)
            # Every entry publishes once per tick, so the k-th N jobs are tick k's burst
            # (bursts of a beat that cannot keep up run into each other, not apart).
            if not bursts or bursts[-1][2] >= entries:
                bursts.append([now, now, 0, due])
            b = bursts[-1]
            b[1] = now
            b[2] += 1
            seen += 1
            if seen == entries:
                cpu_after_first = cpu_s(proc.pid)

        with conn.Consumer(q, callbacks=[on_message], no_ack=True, prefetch_count=1000):
            while seen < total:
                if time.time() > deadline or proc.poll() is not None:
                    sys.exit(f"{name}: only {seen} of {total} jobs arrived")
                try:
                    conn.drain_events(timeout=1)
                except TimeoutError:
                    pass
    cpu_per_tick = (cpu_s(proc.pid) - cpu_after_first) / ticks
    # A callback batch can run past the last full burst; keep whole bursts only.
    return [b for b in bursts if b[2] == entries], cpu_per_tick


def declare(queue):
    with kombu.Connection(BROKER) as conn:
        q = kombu.Queue(queue, kombu.Exchange(queue, "direct", durable=True), routing_key=queue)
        q(conn.default_channel).declare()


def delete(queue):
    with kombu.Connection(BROKER) as conn:
        ch = conn.default_channel
        ch.queue_delete(queue)
        ch.exchange_delete(queue)


def run_mediafarm(args, tmp):
    queue = f"bench-beat-mf-{uuid.uuid4().hex[:8]}"
    prefix = f"bench-beat-{uuid.uuid4().hex[:8]}"
    config = os.path.join(tmp, "mediafarm.toml")
    with open(config, "w") as f:
        for i in range(args.entries):
            f.write(
                f'[beat_schedule.room-{i}]\ntask = "echo.echo"\nevery = {args.every}\n'
                f'queue = "{queue}"\nkwargs = {{ room = {i} }}\n'
            )
    declare(queue)
    env = dict(os.environ, MEDIAFARM_BEAT_KEY_PREFIX=prefix, RUST_LOG="warn")
    proc = subprocess.Popen(
        [args.bin, "--config", config, "beat"], env=env, stdout=subprocess.DEVNULL
    )

    def due_of(headers):
        return datetime.fromisoformat(headers["beat_due"].replace("Z", "+00:00")).timestamp()

    try:
        bursts, cpu = measure("mediafarm beat", proc, queue, args.entries, args.ticks, args.every, due_of)
    finally:
        proc.terminate()
        proc.wait()
        delete(queue)
        import redis

        r = redis.Redis.from_url(BACKEND)
        keys = list(r.scan_iter(f"{prefix}:*", count=1000))
        for i in range(0, len(keys), 1000):
            r.delete(*keys[i : i + 1000])
    return bursts, cpu


def run_celery(args, tmp):
    queue = f"bench-beat-cel-{uuid.uuid4().hex[:8]}"
    with open(os.path.join(tmp, "beatbench.py"), "w") as f:
        f.write(
            "from celery import Celery\n"
            f"app = Celery('beatbench', broker={BROKER!r})\n"
            "app.conf.update(task_serializer='json', accept_content=['json'])\n"
            "app.conf.beat_schedule = {\n"
            f"    f'room-{{i}}': {{'task': 'echo.echo', 'schedule': {float(args.every)},\n"
            f"                    'kwargs': {{'room': i}}, 'options': {{'queue': {queue!r}}}}}\n"
            f"    for i in range({args.entries})\n"
            "}\n"
        )
    declare(queue)
    proc = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "beatbench", "beat", "-l", "warning",
         "-s", os.path.join(tmp, "celerybeat-schedule"), "--max-interval", "1"],
        cwd=tmp, stdout=subprocess.DEVNULL,
    )
    try:
        bursts, cpu = measure("celery beat", proc, queue, args.entries, args.ticks, args.every, lambda h: None)
    finally:
        proc.terminate()
        proc.wait()
        delete(queue)
    return bursts, cpu


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--entries", type=int, default=2000)
    p.add_argument("--every", type=int, default=5)
    p.add_argument("--ticks", type=int, default=3)
    p.add_argument("--bin", default="target/release/mediafarm")
    args = p.parse_args()
    # Bounded wall time: a run that hangs says where, then exits.
    faulthandler.dump_traceback_later(2 * (120 + args.every * (args.ticks + 3)), exit=True)
    print(f"{args.entries} entries every {args.every} s, {args.ticks} ticks after the first; "
          f"mediafarm binary {args.bin}")
    with tempfile.TemporaryDirectory() as tmp:
        mf, mf_cpu = run_mediafarm(args, tmp)
    with tempfile.TemporaryDirectory() as tmp:
        cel, cel_cpu = run_celery(args, tmp)
    for name, bursts in (("mediafarm beat", mf), ("celery beat", cel)):
        for first, last, n, due in bursts[1:]:
            late = f"first {1000 * (first - due):6.0f} ms, last {1000 * (last - due):6.0f} ms after due" if due else ""
            print(f"  {name:15} burst of {n}: spread {1000 * (last - first):6.0f} ms  {late}")
    mf_spread = max(b[1] - b[0] for b in mf[1:])
    cel_spread = max(b[1] - b[0] for b in cel[1:])
    print(f"mediafarm beat: CPU {1000 * mf_cpu:.0f} ms per tick of {args.entries} jobs, "
          f"worst burst spread {1000 * mf_spread:.0f} ms")
    print(f"celery beat:    CPU {1000 * cel_cpu:.0f} ms per tick of {args.entries} jobs, "
          f"worst burst spread {1000 * cel_spread:.0f} ms")
    print(f"ratio (celery / mediafarm): CPU {cel_cpu / mf_cpu:.1f}x, spread {cel_spread / mf_spread:.1f}x")


if __name__ == "__main__":
    main()

"""persist-worker benchmark (issue 16): rows per second written into PostgreSQL by

  (a) persist-worker from `persist.write` jobs (one row each, published by Python Celery's
      client), batched across jobs by the worker;
  (b) persist-worker from the Redis write-behind buffer (rows XADDed with redis-py, read
      continuously: `persist_stream_continuous = true`);
  (c) the honest competitor: a Celery 5.7 worker (prefork, --celery-concurrency processes)
      whose task writes a batch of --batch rows per job with psycopg 3 `executemany` (pipelined:
      one round trip per batch) in one transaction on a persistent connection
      (bench/persist_celery_app.py), the same upsert SQL persist-worker runs;
  (d) with --per-row: the same Celery worker saving one row per task, Django-style (one
      `INSERT … ON CONFLICT` per task, bench.persist_row);
  (e) the ceiling: `psql \copy` of the same rows from a CSV file into an empty table (the whole
      psql run timed; COPY is append-only, no upsert);

in one run, against the same RabbitMQ, Redis and PostgreSQL. Each side gets a fresh table, a
fresh queue or stream, and its whole backlog before its worker starts; the rate is measured from
the first row seen committed to the last (the table polled every 20 ms), so start-up is not
counted. Rows are upserts of new keys with a version column, as in the tests.

Usage: .venv/bin/python bench/persist_throughput.py [--rows 100000] [--batch 1000]
       [--celery-concurrency 2] [--per-row] [--worker PATH] [--no-build]
Needs psycopg (bench/persist_requirements.txt). Only 127.0.0.1 is contacted; every phase has
a time limit and every process is stopped.
"""
import argparse
import json
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psycopg
import redis
from celery import Celery

from bench_common import delete_queue, stop

ROOT = Path(__file__).resolve().parent.parent
BROKER = os.environ.get("BENCH_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//")
BACKEND = os.environ.get("BENCH_RESULT_BACKEND", "redis://127.0.0.1:6379/14")
PG_DSN = os.environ.get("BENCH_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")
PG_URL = PG_DSN.replace("postgresql://", "postgres://", 1)
LOGS = ROOT / "var" / "bench"
LIMIT_S = 600


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def row(i):
    return {"id": i, "name": f"user-{i}", "score": i / 4.0, "version": 1}


def create_table(pg, table):
    pg.execute(
        f'CREATE TABLE "{table}" (id BIGINT PRIMARY KEY, name TEXT, '
        "score DOUBLE PRECISION, version BIGINT NOT NULL)"
    )


def wait_rows(pg, table, n, proc):
    """Polls until `n` rows are in `table`; returns rows per second from the first row seen."""
    first = None
    deadline = time.monotonic() + LIMIT_S
    while True:
        (count,) = pg.execute(f'SELECT count(*) FROM "{table}"').fetchone()
        now = time.monotonic()
        if count and first is None:
            first = (now, count)
        if count >= n:
            t0, c0 = first
            return (n - c0) / max(now - t0, 1e-6) if now > t0 else float("inf")
        if proc.poll() is not None:
            sys.exit(f"the worker exited ({proc.returncode}) with {count} of {n} rows written")
        if now > deadline:
            sys.exit(f"{count} of {n} rows after {LIMIT_S} s")
        time.sleep(0.02)


def persist_worker(args, queue, table, prefix, continuous, log):
    spec = {"key": ["id"], "version": "version", "database_url": PG_URL,
            "columns": {"id": "int", "name": "text", "score": "float", "version": "int"}}
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "MEDIAFARM_BROKER_URL": BROKER,
        "MEDIAFARM_RESULT_BACKEND": BACKEND,
        "MEDIAFARM_PERSIST_TABLES": json.dumps({table: spec}),
        "MEDIAFARM_PERSIST_STREAM_PREFIX": prefix,
        "MEDIAFARM_PERSIST_STREAM_CONTINUOUS": "true" if continuous else "false",
        "MEDIAFARM_PERSIST_BATCH_SIZE": str(args.worker_batch),
    }
    return subprocess.Popen(
        [args.worker, "-Q", queue, "--loglevel", "warning",
         "--metrics-addr", f"127.0.0.1:{free_port()}"],
        env=env, cwd=LOGS, stdout=subprocess.DEVNULL, stderr=log,
    )


def run_jobs(args, pg, app):
    table, queue = f"bench_pw_{uuid.uuid4().hex[:8]}", f"bench-persist-{uuid.uuid4().hex[:8]}"
    create_table(pg, table)
    try:
        with app.connection_for_write() as conn:
            for i in range(1, args.rows + 1):
                r = row(i)
                app.send_task("persist.write", queue=queue, connection=conn, kwargs={
                    "table": table, "key": {"id": r["id"]},
                    "values": {"name": r["name"], "score": r["score"]},
                    "version": r["version"]})
        with open(LOGS / "persist-write.log", "w") as log:
            proc = persist_worker(args, queue, table, "bench-unused:", False, log)
            try:
                return wait_rows(pg, table, args.rows, proc)
            finally:
                stop(proc)
    finally:
        pg.execute(f'DROP TABLE IF EXISTS "{table}"')
        delete_queue(BROKER, queue)


def run_stream(args, pg):
    table, queue = f"bench_ps_{uuid.uuid4().hex[:8]}", f"bench-persist-{uuid.uuid4().hex[:8]}"
    prefix = f"bench-{uuid.uuid4().hex[:8]}:"
    stream = prefix + table
    create_table(pg, table)
    r = redis.Redis.from_url(BACKEND)
    try:
        for start in range(1, args.rows + 1, 1000):
            pipe = r.pipeline(transaction=False)
            for i in range(start, min(start + 1000, args.rows + 1)):
                x = row(i)
                pipe.xadd(stream, {"key": json.dumps({"id": x["id"]}),
                                   "values": json.dumps({"name": x["name"], "score": x["score"]}),
                                   "version": str(x["version"])})
            pipe.execute()
        with open(LOGS / "persist-stream.log", "w") as log:
            proc = persist_worker(args, queue, table, prefix, True, log)
            try:
                return wait_rows(pg, table, args.rows, proc)
            finally:
                stop(proc)
    finally:
        r.delete(stream)
        pg.execute(f'DROP TABLE IF EXISTS "{table}"')
        delete_queue(BROKER, queue)


def run_celery(args, pg, app, per_row=False):
    table, queue = f"bench_pc_{uuid.uuid4().hex[:8]}", f"bench-persist-{uuid.uuid4().hex[:8]}"
    create_table(pg, table)
    try:
        with app.connection_for_write() as conn:
            if per_row:
                for i in range(1, args.rows + 1):
                    app.send_task("bench.persist_row", queue=queue, connection=conn,
                                  kwargs={"table": table, "row": row(i)})
            else:
                for start in range(1, args.rows + 1, args.batch):
                    rows = [row(i) for i in range(start, min(start + args.batch, args.rows + 1))]
                    app.send_task("bench.persist_batch", queue=queue, connection=conn,
                                  kwargs={"table": table, "rows": rows})
        env = dict(os.environ, BENCH_BROKER_URL=BROKER, BENCH_RESULT_BACKEND=BACKEND,
                   BENCH_PG_DSN=PG_DSN)
        with open(LOGS / "persist-celery.log", "w") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", "persist_celery_app", "worker", "-Q", queue,
                 "-P", "prefork", "-c", str(args.celery_concurrency), "-l", "warning",
                 "--without-gossip", "--without-mingle", "--without-heartbeat"],
                cwd=ROOT / "bench", env=env, stdout=subprocess.DEVNULL, stderr=log,
            )
            try:
                return wait_rows(pg, table, args.rows, proc)
            finally:
                stop(proc)
    finally:
        pg.execute(f'DROP TABLE IF EXISTS "{table}"')
        delete_queue(BROKER, queue)


def run_copy(args, pg):
    table = f"bench_cp_{uuid.uuid4().hex[:8]}"
    create_table(pg, table)
    path = LOGS / f"{table}.csv"
    try:
        with open(path, "w") as f:
            for i in range(1, args.rows + 1):
                r = row(i)
                f.write(f"{r['id']},{r['name']},{r['score']},{r['version']}\n")
        start = time.monotonic()
        subprocess.run(["psql", PG_DSN, "-q", "-c", f"\\copy {table} FROM '{path}' CSV"],
                       check=True, timeout=LIMIT_S)
        elapsed = time.monotonic() - start
        (count,) = pg.execute(f'SELECT count(*) FROM "{table}"').fetchone()
        assert count == args.rows, (count, args.rows)
        return args.rows / elapsed
    finally:
        path.unlink(missing_ok=True)
        pg.execute(f'DROP TABLE IF EXISTS "{table}"')


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--batch", type=int, default=1000, help="rows per Celery task")
    p.add_argument("--celery-concurrency", type=int, default=2)
    p.add_argument("--worker-batch", type=int, default=500,
                   help="persist-worker's persist_batch_size (its default: 500)")
    p.add_argument("--per-row", action="store_true",
                   help="also run Celery saving one row per task (slow: minutes at 100,000)")
    p.add_argument("--worker", default=str(ROOT / "target" / "release" / "persist-worker"))
    p.add_argument("--no-build", action="store_true")
    args = p.parse_args()
    args.worker = str(Path(args.worker).resolve())
    LOGS.mkdir(parents=True, exist_ok=True)
    if not args.no_build:
        subprocess.run(["cargo", "build", "--release", "--locked", "-q", "-p", "persist-worker"],
                       cwd=ROOT, check=True)
    app = Celery("bench_persist_client", broker=BROKER, backend=BACKEND)
    app.conf.update(task_serializer="json", accept_content=["json"])
    with psycopg.connect(PG_DSN, autocommit=True) as pg:
        rates = {
            "persist-worker, persist.write jobs": run_jobs(args, pg, app),
            "persist-worker, Redis stream (continuous)": run_stream(args, pg),
            f"Celery + psycopg executemany, {args.batch} rows/task, "
            f"prefork -c {args.celery_concurrency}": run_celery(args, pg, app),
        }
        celery = list(rates.values())[-1]
        if args.per_row:
            rates[f"Celery, one row per task, prefork -c {args.celery_concurrency}"] = \
                run_celery(args, pg, app, per_row=True)
        rates["psql \\copy from CSV (ceiling, append only)"] = run_copy(args, pg)
    copy = rates["psql \\copy from CSV (ceiling, append only)"]
    print(f"{args.rows} rows into PostgreSQL (worker: {args.worker})")
    for name, rate in rates.items():
        print(f"  {name:<60} {rate:>10.0f} rows/s  {rate / celery:6.2f}x Celery batch"
              f"  {rate / copy:6.1%} of \\copy")


if __name__ == "__main__":
    main()

"""persist-worker benchmark (issue 16): rows per second written into PostgreSQL by

  (a) persist-worker from `persist.write` jobs (one row each, published by Python Celery's
      client), batched across jobs by the worker;
  (b) persist-worker from the Redis write-behind buffer (rows XADDed with redis-py, read
      continuously: `persist_stream_continuous = true`);
  (c) the honest competitor: a Celery 5.7 worker (prefork, --celery-concurrency processes)
      whose task writes a batch of --batch rows per job with psycopg 3 `executemany` (pipelined:
      one round trip per batch) in one transaction on a persistent connection
      (bench/persist_celery_app.py), the same upsert SQL persist-worker runs; and the same
      worker whose task COPYs the batch (binary) into a temporary staging table and upserts
      from it with one `INSERT … SELECT … ON CONFLICT`; ratios are against the better of the two;
  (d) with --per-row: the same Celery worker saving one row per task, Django-style (one
      `INSERT … ON CONFLICT` per task, bench.persist_row);
  (e) the ceiling: `psql \copy` of the same rows from a CSV file into an empty table (the whole
      psql run timed; COPY is append-only, no upsert);

in one run, against the same RabbitMQ, Redis and PostgreSQL. Each side gets a fresh table, a
fresh queue or stream, and its whole backlog before its worker starts; the rate is measured from
the first row seen committed to the last (the table polled every 20 ms), so start-up is not
counted. Rows are upserts of new keys with a version column, as in the tests.

With --db mariadb the same runs go to MariaDB (root@127.0.0.1:3306/test): the Celery task
writes its batch with PyMySQL's `executemany`, which sends one multi-row `INSERT … ON
DUPLICATE KEY UPDATE` per batch (the same SQL persist-worker runs); the ceiling is the
`mariadb` client's `LOAD DATA LOCAL INFILE` of the same rows (append only). MariaDB has no
COPY, so there is no staging-table variant.

Usage: .venv/bin/python bench/persist_throughput.py [--db postgres|mariadb] [--rows 100000]
       [--batch 1000] [--celery-concurrency 2] [--per-row] [--worker PATH] [--no-build]
Needs psycopg and PyMySQL (bench/persist_requirements.txt). Only 127.0.0.1 is contacted; every
phase has a time limit and every process is stopped.
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
import pymysql
import redis
from celery import Celery

from bench_common import delete_queue, stop

ROOT = Path(__file__).resolve().parent.parent
BROKER = os.environ.get("BENCH_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//")
BACKEND = os.environ.get("BENCH_RESULT_BACKEND", "redis://127.0.0.1:6379/14")
PG_DSN = os.environ.get("BENCH_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")
PG_URL = PG_DSN.replace("postgresql://", "postgres://", 1)
MY_URL = os.environ.get("BENCH_MY_URL", "mysql://root@127.0.0.1:3306/test")
LOGS = ROOT / "var" / "bench"
LIMIT_S = 600


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def row(i):
    return {"id": i, "name": f"user-{i}", "score": i / 4.0, "version": 1}


class Postgres:
    """The benchmark's PostgreSQL: a table per run, its row count, the \\copy ceiling."""
    name = "PostgreSQL"
    url = PG_URL
    celery_batch_tasks = {
        "psycopg executemany": "bench.persist_batch",
        "psycopg COPY to staging + upsert": "bench.persist_batch_copy",
    }
    celery_row_task = "bench.persist_row"
    ceiling = "psql \\copy from CSV (ceiling, append only)"

    def __init__(self):
        self.conn = psycopg.connect(PG_DSN, autocommit=True)

    def create_table(self, table):
        self.conn.execute(
            f'CREATE TABLE "{table}" (id BIGINT PRIMARY KEY, name TEXT, '
            "score DOUBLE PRECISION, version BIGINT NOT NULL)"
        )

    def drop(self, table):
        self.conn.execute(f'DROP TABLE IF EXISTS "{table}"')

    def count(self, table):
        (count,) = self.conn.execute(f'SELECT count(*) FROM "{table}"').fetchone()
        return count

    def load(self, table, path):
        subprocess.run(["psql", PG_DSN, "-q", "-c", f"\\copy {table} FROM '{path}' CSV"],
                       check=True, timeout=LIMIT_S)


class MariaDb:
    """The benchmark's MariaDB: the same, with LOAD DATA LOCAL INFILE as the ceiling."""
    name = "MariaDB"
    url = MY_URL
    celery_batch_tasks = {"PyMySQL executemany (multi-row INSERT)": "bench.persist_batch_my"}
    celery_row_task = "bench.persist_row_my"
    ceiling = "mariadb LOAD DATA LOCAL INFILE (ceiling, append only)"

    def __init__(self):
        self.conn = pymysql.connect(host="127.0.0.1", port=3306, user="root", database="test",
                                    autocommit=True)

    def execute(self, sql):
        with self.conn.cursor() as cur:
            cur.execute(sql)
            return cur.fetchall()

    def create_table(self, table):
        self.execute(f"CREATE TABLE `{table}` (id BIGINT PRIMARY KEY, name TEXT, "
                     "score DOUBLE, version BIGINT NOT NULL) ENGINE=InnoDB")

    def drop(self, table):
        self.execute(f"DROP TABLE IF EXISTS `{table}`")

    def count(self, table):
        return self.execute(f"SELECT count(*) FROM `{table}`")[0][0]

    def load(self, table, path):
        subprocess.run(["mariadb", "--local-infile=1", "-h", "127.0.0.1", "-u", "root", "test",
                        "-e", f"LOAD DATA LOCAL INFILE '{path}' INTO TABLE `{table}` "
                              "FIELDS TERMINATED BY ','"],
                       check=True, timeout=LIMIT_S)


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
# Where each run's CPU went while it wrote (seconds per process group), printed at the end.
CPU = {}


def cpu_by_group(worker_pid):
    """CPU seconds used so far by the worker (and its children), the database server, Redis
    and RabbitMQ, read from /proc."""
    procs = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        name = stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2:].split()
        procs[int(entry)] = (name, int(fields[1]), (int(fields[11]) + int(fields[12])))
    groups = {"worker": 0, "database": 0, "redis": 0, "rabbitmq": 0}
    for pid, (name, ppid, ticks) in procs.items():
        p, chain = pid, set()
        while p in procs and p not in chain:
            if p == worker_pid:
                groups["worker"] += ticks
                break
            chain.add(p)
            p = procs[p][1]
        else:
            if name.startswith("postgres") or name.startswith("mariadbd"):
                groups["database"] += ticks
            elif name.startswith("redis-server"):
                groups["redis"] += ticks
            elif name.startswith("beam.smp"):
                groups["rabbitmq"] += ticks
    return {k: v / CLOCK_TICKS for k, v in groups.items()}


def wait_rows(db, table, n, proc, label):
    """Polls until `n` rows are in `table`; returns rows per second from the first row seen,
    and records in CPU where the CPU went over the same window."""
    first = None
    deadline = time.monotonic() + LIMIT_S
    while True:
        count = db.count(table)
        now = time.monotonic()
        if count and first is None:
            first = (now, count, cpu_by_group(proc.pid))
        if count >= n:
            t0, c0, cpu0 = first
            cpu1 = cpu_by_group(proc.pid)
            CPU[label] = dict({k: cpu1[k] - cpu0[k] for k in cpu1}, wall=now - t0)
            return (n - c0) / max(now - t0, 1e-6) if now > t0 else float("inf")
        if proc.poll() is not None:
            sys.exit(f"the worker exited ({proc.returncode}) with {count} of {n} rows written")
        if now > deadline:
            sys.exit(f"{count} of {n} rows after {LIMIT_S} s")
        time.sleep(0.02)


def persist_worker(args, queue, table, prefix, continuous, log):
    spec = {"key": ["id"], "version": "version", "database_url": args.database.url,
            "columns": {"id": "int", "name": "text", "score": "float", "version": "int"}}
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "MEDIAFARM_BROKER_URL": BROKER,
        "MEDIAFARM_RESULT_BACKEND": BACKEND,
        "MEDIAFARM_PERSIST_TABLES": json.dumps({table: spec}),
        "MEDIAFARM_PERSIST_STREAM_PREFIX": prefix,
        "MEDIAFARM_PERSIST_STREAM_CONTINUOUS": "true" if continuous else "false",
        "MEDIAFARM_PERSIST_BATCH_SIZE": str(args.worker_batch),
        "MEDIAFARM_PERSIST_WRITE_LANES": str(args.worker_lanes),
    }
    return subprocess.Popen(
        [args.worker, "-Q", queue, "--loglevel", "warning",
         "--metrics-addr", f"127.0.0.1:{free_port()}"],
        env=env, cwd=LOGS, stdout=subprocess.DEVNULL, stderr=log,
    )


def run_jobs(args, db, app):
    table, queue = f"bench_pw_{uuid.uuid4().hex[:8]}", f"bench-persist-{uuid.uuid4().hex[:8]}"
    db.create_table(table)
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
                return wait_rows(db, table, args.rows, proc, "persist.write")
            finally:
                stop(proc)
    finally:
        db.drop(table)
        delete_queue(BROKER, queue)


def run_stream(args, db):
    table, queue = f"bench_ps_{uuid.uuid4().hex[:8]}", f"bench-persist-{uuid.uuid4().hex[:8]}"
    prefix = f"bench-{uuid.uuid4().hex[:8]}:"
    stream = prefix + table
    db.create_table(table)
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
                return wait_rows(db, table, args.rows, proc, "stream")
            finally:
                stop(proc)
    finally:
        r.delete(stream)
        db.drop(table)
        delete_queue(BROKER, queue)


def run_celery(args, db, app, task):
    table, queue = f"bench_pc_{uuid.uuid4().hex[:8]}", f"bench-persist-{uuid.uuid4().hex[:8]}"
    db.create_table(table)
    try:
        with app.connection_for_write() as conn:
            if task == db.celery_row_task:
                for i in range(1, args.rows + 1):
                    app.send_task(task, queue=queue, connection=conn,
                                  kwargs={"table": table, "row": row(i)})
            else:
                for start in range(1, args.rows + 1, args.batch):
                    rows = [row(i) for i in range(start, min(start + args.batch, args.rows + 1))]
                    app.send_task(task, queue=queue, connection=conn,
                                  kwargs={"table": table, "rows": rows})
        env = dict(os.environ, BENCH_BROKER_URL=BROKER, BENCH_RESULT_BACKEND=BACKEND,
                   BENCH_PG_DSN=PG_DSN, BENCH_MY_URL=MY_URL)
        with open(LOGS / "persist-celery.log", "w") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", "persist_celery_app", "worker", "-Q", queue,
                 "-P", "prefork", "-c", str(args.celery_concurrency), "-l", "warning",
                 "--without-gossip", "--without-mingle", "--without-heartbeat"],
                cwd=ROOT / "bench", env=env, stdout=subprocess.DEVNULL, stderr=log,
            )
            try:
                return wait_rows(db, table, args.rows, proc, task)
            finally:
                stop(proc)
    finally:
        db.drop(table)
        delete_queue(BROKER, queue)


def run_copy(args, db):
    table = f"bench_cp_{uuid.uuid4().hex[:8]}"
    db.create_table(table)
    path = LOGS / f"{table}.csv"
    try:
        with open(path, "w") as f:
            for i in range(1, args.rows + 1):
                r = row(i)
                f.write(f"{r['id']},{r['name']},{r['score']},{r['version']}\n")
        start = time.monotonic()
        db.load(table, path)
        elapsed = time.monotonic() - start
        count = db.count(table)
        assert count == args.rows, (count, args.rows)
        return args.rows / elapsed
    finally:
        path.unlink(missing_ok=True)
        db.drop(table)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--db", choices=["postgres", "mariadb"], default="postgres")
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--batch", type=int, default=1000, help="rows per Celery task")
    p.add_argument("--celery-concurrency", type=int, default=2)
    p.add_argument("--worker-batch", type=int, default=2000,
                   help="persist-worker's persist_batch_size (its default: 2000)")
    p.add_argument("--worker-lanes", type=int, default=2,
                   help="persist-worker's persist_write_lanes (its default: 2)")
    p.add_argument("--per-row", action="store_true",
                   help="also run Celery saving one row per task (slow: minutes at 100,000)")
    p.add_argument("--skip-jobs", action="store_true",
                   help="leave out persist-worker's persist.write jobs")
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
    db = args.database = Postgres() if args.db == "postgres" else MariaDb()
    c = args.celery_concurrency
    rates = {}
    if not args.skip_jobs:
        rates["persist-worker, persist.write jobs"] = run_jobs(args, db, app)
    rates["persist-worker, Redis stream (continuous)"] = run_stream(args, db)
    batches = []
    for label, task in db.celery_batch_tasks.items():
        name = f"Celery + {label}, {args.batch} rows/task, prefork -c {c}"
        rates[name] = run_celery(args, db, app, task)
        batches.append(rates[name])
    celery = max(batches)
    if args.per_row:
        rates[f"Celery, one row per task, prefork -c {c}"] = \
            run_celery(args, db, app, db.celery_row_task)
    rates[db.ceiling] = run_copy(args, db)
    copy = rates[db.ceiling]
    print(f"{args.rows} rows into {db.name} (worker: {args.worker}, "
          f"persist_batch_size {args.worker_batch}, persist_write_lanes {args.worker_lanes})")
    for name, rate in rates.items():
        print(f"  {name:<66} {rate:>10.0f} rows/s  {rate / celery:6.2f}x best Celery batch"
              f"  {rate / copy:6.1%} of the ceiling")
    print("CPU seconds while writing (worker incl. children / database / Redis / RabbitMQ, wall):")
    for label, cpu in CPU.items():
        print(f"  {label:<30} " + "  ".join(f"{k} {v:6.2f}" for k, v in cpu.items()))


if __name__ == "__main__":
    main()

"""The Celery side of the persist benchmark. Task `bench.persist_batch` writes a batch of rows
(each `{id, name, score, version}`) the best way psycopg offers a Celery user: one persistent
connection per worker process, one transaction per batch, `executemany` of the same
`INSERT … ON CONFLICT (id) DO UPDATE … WHERE excluded.version >= t.version` persist-worker
runs (psycopg 3 pipelines executemany: one round trip per batch, not per row). JSON only, late
acks, prefetch multiplier 4, Redis backend (bench_common). The database comes from
BENCH_PG_DSN, the table from the task's kwargs. Task `bench.persist_row` is the Django-style
save: one row per task, one `INSERT … ON CONFLICT` statement in its own transaction.
"""
import os

import psycopg
from psycopg import sql

from bench_common import bench_app

app = bench_app("bench_persist", "redis://127.0.0.1:6379/14")
DSN = os.environ.get("BENCH_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")
_conn = None


def connection():
    global _conn
    if _conn is None or _conn.closed:
        _conn = psycopg.connect(DSN)
    return _conn


def upsert(table):
    return sql.SQL(
        "INSERT INTO {t} AS t (id, name, score, version) VALUES (%s, %s, %s, %s) "
        "ON CONFLICT (id) DO UPDATE SET name = excluded.name, score = excluded.score, "
        "version = excluded.version WHERE excluded.version >= t.version"
    ).format(t=sql.Identifier(table))


@app.task(name="bench.persist_row")
def persist_row(table, row):
    conn = connection()
    with conn.transaction():
        conn.execute(upsert(table), (row["id"], row["name"], row["score"], row["version"]))
    return {"rows": 1, "table": table}


@app.task(name="bench.persist_batch")
def persist_batch(table, rows):
    statement = upsert(table)
    conn = connection()
    with conn.transaction():
        with conn.cursor() as cur:
            cur.executemany(
                statement,
                [(r["id"], r["name"], r["score"], r["version"]) for r in rows],
            )
    return {"rows": len(rows), "table": table}

"""The Celery side of the persist benchmark. Task `bench.persist_batch` writes a batch of rows
(each `{id, name, score, version}`) the best way psycopg offers a Celery user: one persistent
connection per worker process, one transaction per batch, `executemany` of the same
`INSERT … ON CONFLICT (id) DO UPDATE … WHERE excluded.version >= t.version` persist-worker
runs (psycopg 3 pipelines executemany: one round trip per batch, not per row). JSON only, late
acks, prefetch multiplier 4, Redis backend (bench_common). The database comes from
BENCH_PG_DSN, the table from the task's kwargs. Task `bench.persist_batch_copy` is the other
best batch: `COPY` (binary) of the batch into a temporary staging table, then one
`INSERT … SELECT … ON CONFLICT` from it, in one transaction. Task `bench.persist_row` is the
Django-style save: one row per task, one `INSERT … ON CONFLICT` statement in its own
transaction. `bench.persist_batch_my` and `bench.persist_row_my` are the same for MariaDB
(BENCH_MY_URL) through PyMySQL, whose `executemany` sends a batch as one multi-row
`INSERT … ON DUPLICATE KEY UPDATE`, the statement persist-worker runs there.
"""
import os

import psycopg
import pymysql
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


@app.task(name="bench.persist_batch_copy")
def persist_batch_copy(table, rows):
    conn = connection()
    with conn.transaction():
        with conn.cursor() as cur:
            cur.execute(
                "CREATE TEMP TABLE IF NOT EXISTS staging (id BIGINT, name TEXT, "
                "score DOUBLE PRECISION, version BIGINT) ON COMMIT DELETE ROWS"
            )
            with cur.copy(
                "COPY staging (id, name, score, version) FROM STDIN (FORMAT BINARY)"
            ) as copy:
                copy.set_types(["int8", "text", "float8", "int8"])
                for r in rows:
                    copy.write_row((r["id"], r["name"], r["score"], r["version"]))
            cur.execute(
                sql.SQL(
                    "INSERT INTO {t} AS t (id, name, score, version) "
                    "SELECT id, name, score, version FROM staging "
                    "ON CONFLICT (id) DO UPDATE SET name = excluded.name, "
                    "score = excluded.score, version = excluded.version "
                    "WHERE excluded.version >= t.version"
                ).format(t=sql.Identifier(table))
            )
    return {"rows": len(rows), "table": table}


MY_URL = os.environ.get("BENCH_MY_URL", "mysql://root@127.0.0.1:3306/test")
_my = None


def my_connection():
    global _my
    if _my is None or not _my.open:
        rest = MY_URL.split("://", 1)[1]
        user, rest = rest.split("@", 1)
        hostport, database = rest.split("/", 1)
        host, port = hostport.split(":")
        _my = pymysql.connect(host=host, port=int(port), user=user, database=database)
    return _my


def my_upsert(table):
    guard = "IF(VALUES(version) >= version, VALUES({c}), {c})"
    return (
        f"INSERT INTO `{table}` (id, name, score, version) VALUES (%s, %s, %s, %s) "
        f"ON DUPLICATE KEY UPDATE name = {guard.format(c='name')}, "
        f"score = {guard.format(c='score')}, version = {guard.format(c='version')}"
    )


@app.task(name="bench.persist_row_my")
def persist_row_my(table, row):
    conn = my_connection()
    with conn.cursor() as cur:
        cur.execute(my_upsert(table), (row["id"], row["name"], row["score"], row["version"]))
    conn.commit()
    return {"rows": 1, "table": table}


@app.task(name="bench.persist_batch_my")
def persist_batch_my(table, rows):
    conn = my_connection()
    with conn.cursor() as cur:
        cur.executemany(
            my_upsert(table),
            [(r["id"], r["name"], r["score"], r["version"]) for r in rows],
        )
    conn.commit()
    return {"rows": len(rows), "table": table}

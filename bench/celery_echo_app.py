"""The Celery side of the echo throughput benchmark: a plain Celery 5.7 app with task
`echo.echo` returning its kwargs. JSON only, late acks, prefetch multiplier 4, Redis backend.
Broker and backend come from BENCH_BROKER_URL / BENCH_RESULT_BACKEND.
"""
import os

from celery import Celery

app = Celery(
    "bench",
    broker=os.environ.get("BENCH_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//"),
    backend=os.environ.get("BENCH_RESULT_BACKEND", "redis://127.0.0.1:6379/14"),
)
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    task_acks_late=True,
    worker_prefetch_multiplier=4,
)


@app.task(name="echo.echo")
def echo(**kwargs):
    return kwargs

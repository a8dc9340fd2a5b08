"""The Celery app every benchmark's Celery side runs, configured as mediafarm's workers are:
JSON only, late acks, prefetch multiplier 4, Redis backend. Broker and backend come from
BENCH_BROKER_URL / BENCH_RESULT_BACKEND.
"""
import os

from celery import Celery


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

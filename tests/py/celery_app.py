"""A plain Python Celery worker app, to prove a Python worker accepts what mediafarm publishes.

Run: python -m celery -A celery_app worker -Q QUEUE -P solo (cwd tests/py). BROKER_URL,
RESULT_BACKEND and (optional, JSON) BROKER_TRANSPORT_OPTIONS and
RESULT_BACKEND_TRANSPORT_OPTIONS come from the environment.
"""
import json
import os

from celery import Celery

app = Celery(
    "interop",
    broker=os.environ.get("BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//"),
    backend=os.environ.get("RESULT_BACKEND", "redis://127.0.0.1:6379/0"),
)
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    task_acks_late=True,
    worker_prefetch_multiplier=1,
    worker_hijack_root_logger=False,
)
if os.environ.get("BROKER_TRANSPORT_OPTIONS"):
    app.conf.broker_transport_options = json.loads(os.environ["BROKER_TRANSPORT_OPTIONS"])
if os.environ.get("RESULT_BACKEND_TRANSPORT_OPTIONS"):
    app.conf.result_backend_transport_options = json.loads(
        os.environ["RESULT_BACKEND_TRANSPORT_OPTIONS"])


@app.task(name="echo.echo", bind=True)
def echo(self, **kwargs):
    return {
        "worker": "python",
        "kwargs": kwargs,
        "retries": self.request.retries,
        "eta": self.request.eta,
        "timelimit": list(self.request.timelimit or []),
    }


@app.task(name="echo.fail")
def fail(message):
    raise ValueError(message)


@app.task(name="pyside.wrap")
def wrap(parent, **kwargs):
    """A chain step on Python between Rust steps: takes the parent's result positionally."""
    return {"worker": "python", "parent": parent, "kwargs": kwargs}


@app.task(name="pyside.on_error")
def on_error(task_id):
    """An old-style errback, as Celery sends one it cannot call inline: the failed job's id."""
    exc = app.AsyncResult(task_id).result
    return {"task_id": task_id, "exc_type": type(exc).__name__, "message": str(exc)}

"""A Celery producer writing a row through persist-worker, as a Django app would.

Usage: persist_client.py QUEUE JOB_JSON. Sends JOB_JSON's kwargs as `persist.write`, then the
same row with a value of the wrong type; prints {"ok": <result>, "bad": <what Python raised>}.
"""
import copy
import json
import os
import sys

from celery import Celery

app = Celery(
    "persist_client",
    broker=os.environ.get("BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//"),
    backend=os.environ.get("RESULT_BACKEND", "redis://127.0.0.1:6379/0"),
)
app.conf.task_serializer = "json"
app.conf.accept_content = ["json"]


def main():
    queue, job = sys.argv[1], json.loads(sys.argv[2])
    ok = app.send_task("persist.write", kwargs=job, queue=queue).get(timeout=30)
    bad_job = copy.deepcopy(job)
    bad_job["values"]["score"] = "not a number"
    try:
        app.send_task("persist.write", kwargs=bad_job, queue=queue).get(timeout=30)
        bad = {"exc_type": None}
    except Exception as exc:  # the test checks what Python raised
        bad = {"exc_type": type(exc).__name__, "message": str(exc)}
    print(json.dumps({"ok": ok, "bad": bad}))


if __name__ == "__main__":
    main()

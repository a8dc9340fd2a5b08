"""Celery's remote control from Python, as an operator's script would use it.

Usage: control.py revoke TASK_ID [--terminate]. Prints "sent". BROKER_URL and RESULT_BACKEND
come from the environment.
"""
import os
import sys

from celery import Celery

app = Celery(
    "control",
    broker=os.environ.get("BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//"),
    backend=os.environ.get("RESULT_BACKEND", "redis://127.0.0.1:6379/0"),
)
app.conf.task_serializer = "json"
app.conf.accept_content = ["json"]


def main():
    command, task_id = sys.argv[1], sys.argv[2]
    if command != "revoke":
        sys.exit(f"unknown command {command}")
    app.control.revoke(task_id, terminate="--terminate" in sys.argv[3:])
    print("sent")


if __name__ == "__main__":
    main()

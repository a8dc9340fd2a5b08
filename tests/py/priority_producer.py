"""A Celery producer with priorities switched on: task_queue_max_priority makes Celery declare
the queue with x-max-priority, as mediafarm does with the same setting.

Usage: priority_producer.py QUEUE LOW_COUNT. Sends LOW_COUNT jobs with priority=0, then one
with priority=9, each confirmed by the broker, and prints {"low": [ids], "high": id, "sent":
unix time once the urgent one was confirmed}. BROKER_URL and RESULT_BACKEND come
from the environment.
"""
import json
import os
import sys
import time

from celery import Celery

app = Celery(
    "priority-producer",
    broker=os.environ.get("BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//"),
    backend=os.environ.get("RESULT_BACKEND", "redis://127.0.0.1:6379/0"),
)
app.conf.task_serializer = "json"
app.conf.accept_content = ["json"]
app.conf.task_queue_max_priority = 10
app.conf.broker_transport_options = {"confirm_publish": True}


def main():
    queue, count = sys.argv[1], int(sys.argv[2])
    low = [
        app.send_task("echo.echo", kwargs={"i": i, "sleep_ms": 50}, queue=queue, priority=0).id
        for i in range(count)
    ]
    high = app.send_task("echo.echo", kwargs={"urgent": True}, queue=queue, priority=9).id
    print(json.dumps({"low": low, "high": high, "sent": time.time()}))


if __name__ == "__main__":
    main()

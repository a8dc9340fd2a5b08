"""A Celery producer of a queue that mediafarm declares as a quorum queue with its delivery
limit: the README's task_queues entry, which declares the same arguments.

Usage: quorum_producer.py QUEUE LIMIT. Sends one echo.echo job and prints its result as JSON.
BROKER_URL and RESULT_BACKEND come from the environment.
"""
import json
import os
import sys

from celery import Celery
from kombu import Exchange, Queue

queue, limit = sys.argv[1], int(sys.argv[2])
app = Celery(
    "quorum-producer",
    broker=os.environ.get("BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//"),
    backend=os.environ.get("RESULT_BACKEND", "redis://127.0.0.1:6379/0"),
)
app.conf.task_serializer = "json"
app.conf.accept_content = ["json"]
app.conf.task_queues = [
    Queue(queue, Exchange(queue, type="direct"), routing_key=queue, queue_arguments={
        "x-queue-type": "quorum", "x-delivery-limit": limit,
        "x-dead-letter-exchange": "", "x-dead-letter-routing-key": f"{queue}.dead"}),
]

if __name__ == "__main__":
    result = app.send_task("echo.echo", kwargs={"from": "python"}, queue=queue)
    print(json.dumps(result.get(timeout=30)))

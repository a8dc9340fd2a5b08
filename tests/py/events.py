"""Captures Celery events with Celery's own receiver and state, as Flower does.

Usage: events.py --hosts H1,H2 --until HOST --deadline SECONDS

Prints "ready" once its queue is bound to the event exchange, then each event whose hostname is
one of --hosts as it arrives (`{"event": ...}`, a worker-heartbeat with `"alive"`: whether
State counts that worker alive right after it), and, when a worker-offline event from HOST
arrives (or the deadline passes), a report: `{"report": {"timed_out": ..., "states": ...}}`,
the state `celery.events.state.State` derived for each task id seen.
BROKER_URL comes from the environment.
"""
import argparse
import json
import os
import time

from celery import Celery
from celery.events.state import State

app = Celery(
    "events",
    broker=os.environ.get("BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//"),
)
app.conf.accept_content = ["json"]
app.conf.event_serializer = "json"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--hosts", required=True)
    parser.add_argument("--until", required=True)
    parser.add_argument("--deadline", type=float, required=True)
    args = parser.parse_args()
    hosts = set(args.hosts.split(","))
    deadline = time.monotonic() + args.deadline
    state = State()
    captured = []
    finished = {"offline": False}

    def on_event(event):
        state.event(event)
        host = event.get("hostname")
        if host not in hosts:
            return
        captured.append(event)
        line = {"event": event}
        if event["type"] == "worker-heartbeat":
            worker = state.workers.get(host)
            line["alive"] = bool(worker and worker.alive)
        print(json.dumps(line), flush=True)
        if event["type"] == "worker-offline" and host == args.until:
            finished["offline"] = True

    with app.connection_for_read() as conn:
        receiver = app.events.Receiver(conn, handlers={"*": on_event})
        announce = receiver.on_consume_ready

        def ready(*a, **kw):
            print("ready", flush=True)
            return announce(*a, **kw)

        def check():
            receiver.should_stop = finished["offline"] or time.monotonic() > deadline

        receiver.on_consume_ready = ready
        receiver.on_iteration = check
        receiver.capture(limit=None, timeout=None, wakeup=True)

    uuids = {e["uuid"] for e in captured if "uuid" in e}
    print(json.dumps({"report": {
        "timed_out": not finished["offline"],
        "states": {u: state.tasks[u].state for u in uuids if u in state.tasks},
    }}), flush=True)


if __name__ == "__main__":
    main()

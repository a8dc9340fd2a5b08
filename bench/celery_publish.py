"""Publishes a backlog of `echo.echo` jobs the way a Celery user does: Python Celery's own client,
`app.send_task("echo.echo", kwargs=..., queue=...)` with Celery's default settings, so every
header and property is as Celery 5.7 writes it (protocol 2: lang, task, id, shadow, eta,
expires, group, group_index, retries, timelimit, root_id, parent_id, argsrepr, kwargsrepr,
origin, ignore_result, replaced_task_nesting, stamped_headers, stamps; correlation_id,
reply_to, priority, delivery_info). The benchmarks run it before a worker starts, so
publishing is not in the measured window.

Job n carries kwargs {"n": n}; with --retry-every K every K-th job (n % K == 0) also carries
{"fail_times": 1, "retry_after_s": 0}, so echo-worker fails it once and retries it through
the broker. Ids are Celery's default kind (uuid4 strings); the ids of the retried jobs are
printed one per line on stdout. The script returns once the queue holds every message
(Celery does not wait for publisher confirms by default).

Usage: .venv/bin/python bench/celery_publish.py --queue Q --count N [--retry-every K]
Only 127.0.0.1 is contacted (BENCH_BROKER_URL).
"""
import argparse
import os
import sys
import time
import uuid

from celery import Celery

BROKER = os.environ.get("BENCH_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queue", required=True)
    parser.add_argument("--count", type=int, default=20_000)
    parser.add_argument("--retry-every", type=int)
    parser.add_argument("--timeout", type=float, default=300)
    args = parser.parse_args()
    # Broker only: a result backend changes nothing in the message (the Redis backend would
    # only subscribe this short-lived process to every result's channel).
    app = Celery("bench_producer", broker=BROKER)
    began = time.monotonic()
    retried = []
    with app.producer_or_acquire() as producer:
        for n in range(args.count):
            kwargs = {"n": n}
            task_id = str(uuid.uuid4())  # what Celery would pick; kept for the retried ones
            if args.retry_every and n % args.retry_every == 0:
                kwargs.update(fail_times=1, retry_after_s=0)
                retried.append(task_id)
            app.send_task("echo.echo", kwargs=kwargs, queue=args.queue, task_id=task_id,
                          producer=producer)
    with app.connection_for_write() as conn:
        while True:
            _, depth, _ = conn.default_channel.queue_declare(args.queue, passive=True)
            if depth >= args.count:
                break
            if time.monotonic() - began > args.timeout:
                sys.exit(f"only {depth}/{args.count} messages in {args.queue} after "
                         f"{args.timeout} s")
            time.sleep(0.05)
    print(f"published {args.count} jobs to {args.queue} with Celery's client in "
          f"{time.monotonic() - began:.2f} s", file=sys.stderr)
    print("\n".join(retried))


if __name__ == "__main__":
    main()

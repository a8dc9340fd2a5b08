"""A plain Celery producer, as a Django app would be: send_task + AsyncResult.get().

Usage: producer.py QUEUE SCENARIO. Prints one JSON object describing what Python saw.
BROKER_URL, RESULT_BACKEND and (optional, JSON) BROKER_TRANSPORT_OPTIONS and
RESULT_BACKEND_TRANSPORT_OPTIONS come from the environment.
"""
import json
import os
import sys
import time

from celery import Celery

app = Celery(
    "producer",
    broker=os.environ.get("BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//"),
    backend=os.environ.get("RESULT_BACKEND", "redis://127.0.0.1:6379/0"),
)
app.conf.task_serializer = "json"
app.conf.result_serializer = "json"
app.conf.accept_content = ["json"]
if os.environ.get("BROKER_TRANSPORT_OPTIONS"):
    app.conf.broker_transport_options = json.loads(os.environ["BROKER_TRANSPORT_OPTIONS"])
if os.environ.get("RESULT_BACKEND_TRANSPORT_OPTIONS"):
    app.conf.result_backend_transport_options = json.loads(
        os.environ["RESULT_BACKEND_TRANSPORT_OPTIONS"])


def outcome(result, timeout=20):
    try:
        return {"ok": result.get(timeout=timeout), "state": result.state}
    except Exception as exc:  # the test inspects what Python raised
        return {
            "exc_type": type(exc).__name__,
            "exc_module": type(exc).__module__,
            "message": str(exc),
            "state": result.state,
        }


def main():
    queue, scenario = sys.argv[1], sys.argv[2]
    send = lambda name, **kw: app.send_task(name, queue=queue, **kw)
    if scenario == "roundtrip":
        out = outcome(send("echo.echo", kwargs={"x": 1, "s": "中文", "nested": {"l": [1, 2.5, None]}}))
    elif scenario == "failure":
        out = outcome(send("echo.echo", kwargs={"fail": "source image is 61 MP; the limit is 50 MP"}))
    elif scenario == "positional":
        out = outcome(send("echo.echo", args=[1, 2]))
    elif scenario == "unknown":
        out = outcome(send("echo.nope", kwargs={}))
    elif scenario == "countdown":
        start = time.monotonic()
        out = outcome(send("echo.echo", kwargs={"c": 1}, countdown=1.5))
        out["elapsed"] = time.monotonic() - start
    elif scenario == "expired":
        out = outcome(send("echo.echo", kwargs={"e": 1}, countdown=2, expires=1))
    elif scenario == "extended":
        result = send("echo.echo", kwargs={"k": 1})
        out = outcome(result)
        out.update(name=result.name, kwargs=result.kwargs, args=result.args,
                   queue=result.queue, worker=result.worker, retries=result.retries)
    elif scenario == "avatar":
        # A Django view after an upload: one job, every variant's URL back.
        user = os.environ["AVATAR_USER"]
        outputs = [{"key": f"avatars/{user}/{size}.jpg", "width": size, "height": size,
                    "fit": "cover", "format": "jpeg", "quality": 82} for size in (512, 128, 64)]
        out = outcome(send("image.transform", kwargs={
            "source": os.environ["AVATAR_SOURCE"], "outputs": outputs}), timeout=60)
    elif scenario == "huge-limits":
        # Python's way of saying "no limit": exactly what wedged workers before (issue 12).
        results = [send("echo.echo", kwargs={"i": i}, time_limit=1e20) for i in range(4)]
        results += [send("echo.echo", kwargs={"i": i}, soft_time_limit=1e20) for i in range(4, 8)]
        after = send("echo.echo", kwargs={"after": True})
        out = {"limits": [outcome(r) for r in results], "after": outcome(after),
               "ids": [r.id for r in results]}
    elif scenario == "compressed":
        # Every compression kombu registers, as task_compression / compression= sends it.
        out = {}
        for method in ("gzip", "bzip2", "lzma", "zstd", "brotli"):
            out[method] = outcome(send("echo.echo", kwargs={"method": method, "pad": "é" * 2000},
                                       compression=method))
    elif scenario == "binary":
        # Raw bytes published as JSON: kombu labels them content_encoding "binary".
        import uuid
        task_id = str(uuid.uuid4())
        body = json.dumps([[], {"raw": "bytes"}, {}]).encode()
        with app.producer_or_acquire() as producer:
            producer.publish(
                body, routing_key=queue, exchange="", content_type="application/json",
                content_encoding="binary", headers={"task": "echo.echo", "id": task_id, "lang": "py"},
                retry=True, declare=[], delivery_mode=2)
        out = outcome(app.AsyncResult(task_id))
    elif scenario == "surrogate":
        out = outcome(send("echo.echo", kwargs={"s": "a\ud800b", "pair": "\U0001F600"}))
        out["sent"] = json.dumps({"s": "a\ud800b"})
    elif scenario == "many":
        results = [send("echo.echo", kwargs={"i": i}) for i in range(50)]
        out = {"ok": [r.get(timeout=30)["i"] for r in results]}
    else:
        raise SystemExit(f"unknown scenario {scenario}")
    print(json.dumps(out, ensure_ascii=False))


if __name__ == "__main__":
    main()

"""A plain Celery producer, as a Django app would be: send_task + AsyncResult.get().

Usage: producer.py QUEUE SCENARIO. Prints one JSON object describing what Python saw.
BROKER_URL and RESULT_BACKEND come from the environment.
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
    elif scenario == "many":
        results = [send("echo.echo", kwargs={"i": i}) for i in range(50)]
        out = {"ok": [r.get(timeout=30)["i"] for r in results]}
    else:
        raise SystemExit(f"unknown scenario {scenario}")
    print(json.dumps(out, ensure_ascii=False))


if __name__ == "__main__":
    main()

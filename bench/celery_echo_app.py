"""The Celery side of the echo throughput benchmark: a plain Celery 5.7 app with task
`echo.echo` returning its kwargs, and `echo.step` (bench/canvas_throughput.py) taking a parent's
result too. JSON only, late acks, prefetch multiplier 4, Redis backend.
Broker and backend come from BENCH_BROKER_URL / BENCH_RESULT_BACKEND.
"""

from bench_common import bench_app

app = bench_app("bench", "redis://127.0.0.1:6379/14")


@app.task(name="echo.echo")
def echo(**kwargs):
    return kwargs


@app.task(name="echo.step")
def step(*parent, **kwargs):
    """The no-op for workflows, as echo-worker's `echo.step`: a parent's result (Celery's first
    positional argument) is returned under `parent`, with the kwargs."""
    if parent:
        kwargs["parent"] = parent[0]
    return kwargs

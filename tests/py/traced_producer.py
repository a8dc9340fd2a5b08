"""A Celery producer instrumented with opentelemetry-instrumentation-celery, exporting its
spans over OTLP/HTTP (protobuf) to OTEL_EXPORTER_OTLP_TRACES_ENDPOINT.

Usage: traced_producer.py QUEUE. Sends, inside one request span each: a job, a two-step chain
and a failing job, all to mediafarm's echo.echo on QUEUE; waits for the results; flushes the
spans; prints {"single": id, "chain": [id1, id2], "failing": id, "results": {...}}.
"""
import json
import os
import sys

from celery import Celery, chain
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.instrumentation.celery import CeleryInstrumentor
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

provider = TracerProvider(resource=Resource.create({"service.name": "python-producer"}))
provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
trace.set_tracer_provider(provider)
CeleryInstrumentor().instrument()
tracer = trace.get_tracer("traced_producer")

app = Celery(
    "producer",
    broker=os.environ.get("BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//"),
    backend=os.environ.get("RESULT_BACKEND", "redis://127.0.0.1:6379/0"),
)
app.conf.task_serializer = "json"
app.conf.result_serializer = "json"
app.conf.accept_content = ["json"]


# Declared here only so the instrumentation finds the task by name when it is published (its
# publish span ends in after_task_publish, which skips names it cannot find); it runs in
# mediafarm.
@app.task(name="echo.echo")
def echo(**kwargs):
    raise RuntimeError("runs in the mediafarm worker, not here")


def main():
    queue = sys.argv[1]
    out = {"results": {}}
    with tracer.start_as_current_span("request/single"):
        single = echo.apply_async(kwargs={"x": 1}, queue=queue)
    out["single"] = single.id
    out["results"]["single"] = single.get(timeout=30)
    with tracer.start_as_current_span("request/chain"):
        last = chain(
            echo.s(a=1).set(queue=queue),
            echo.si(b=2).set(queue=queue),
        ).apply_async()
    out["results"]["chain"] = last.get(timeout=30)
    out["chain"] = [last.parent.id, last.id]
    with tracer.start_as_current_span("request/failing"):
        failing = echo.apply_async(kwargs={"fail": "source image is 61 MP"}, queue=queue)
    out["failing"] = failing.id
    try:
        failing.get(timeout=30)
        out["results"]["failing"] = "succeeded?"
    except Exception as exc:  # the test checks the worker's span, not this
        out["results"]["failing"] = type(exc).__name__
    provider.force_flush()
    print(json.dumps(out))


if __name__ == "__main__":
    main()

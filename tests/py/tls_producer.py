"""A Celery producer over TLS, configured as a Django app on a managed broker would be:
amqps:// with broker_use_ssl (CA, client certificate, CERT_REQUIRED) and a rediss:// result
backend with Celery's ssl_* query keys.

Usage: tls_producer.py QUEUE. Prints one JSON object: the result, or what Python raised.
BROKER_URL, RESULT_BACKEND, TLS_CA, TLS_CERT and TLS_KEY come from the environment.
"""
import json
import os
import ssl
import sys

from celery import Celery

app = Celery("tls_producer", broker=os.environ["BROKER_URL"], backend=os.environ["RESULT_BACKEND"])
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    broker_use_ssl={
        "ca_certs": os.environ["TLS_CA"],
        "certfile": os.environ["TLS_CERT"],
        "keyfile": os.environ["TLS_KEY"],
        "cert_reqs": ssl.CERT_REQUIRED,
    },
    broker_connection_retry_on_startup=False,
    broker_connection_max_retries=1,
)


def main():
    queue = sys.argv[1]
    result = app.send_task("echo.echo", kwargs={"from": "python", "over": "tls"}, queue=queue)
    try:
        out = {"ok": result.get(timeout=20), "state": result.state}
    except Exception as exc:  # the test shows what Python raised
        out = {"exc_type": type(exc).__name__, "message": str(exc), "state": result.state}
    print(json.dumps(out))


if __name__ == "__main__":
    main()

"""A Django-style producer for notify-worker: send_task("notify.email" / "notify.sms") with the
real celery client and wait with AsyncResult.get(). Prints what Python saw as JSON.

Usage: notify_client.py QUEUE TO_EMAIL TO_PHONE. BROKER_URL and RESULT_BACKEND from the env.
"""
import json
import os
import sys

from celery import Celery

app = Celery(
    "producer",
    broker=os.environ.get("BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//"),
    backend=os.environ.get("RESULT_BACKEND", "redis://127.0.0.1:6379/0"),
)
app.conf.task_serializer = "json"
app.conf.result_serializer = "json"
app.conf.accept_content = ["json"]

queue, to_email, to_phone = sys.argv[1:4]
email = app.send_task("notify.email", queue=queue, kwargs={
    "to": f"李雷 <{to_email}>",
    "subject": "欢迎 from Celery",
    "text": "你好，来自 Python 的问候",
})
sms = app.send_task("notify.sms", queue=queue, kwargs={"to": to_phone, "body": "验证码 123456"})
bad = app.send_task("notify.email", queue=queue, kwargs={
    "to": "a@example.com", "subject": "x\r\nBcc: evil@example.com", "text": "b"})
out = {"email": email.get(timeout=30), "sms": sms.get(timeout=30), "email_id": email.id}
try:
    bad.get(timeout=30)
    out["bad"] = None
except Exception as exc:  # the test checks what Python raised
    out["bad"] = {"type": type(exc).__name__, "message": str(exc)}
print(json.dumps(out))

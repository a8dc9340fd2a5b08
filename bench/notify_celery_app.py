"""The Celery side of the notify benchmark: task `notify.email` as typical Django code sends
mail, with `smtplib` and one SMTP connection per message (connect, EHLO, MAIL, RCPT, DATA,
QUIT). JSON only, late acks, prefetch multiplier 4, Redis backend. Broker, backend and the SMTP
server come from BENCH_BROKER_URL, BENCH_RESULT_BACKEND and BENCH_SMTP_PORT.
"""
import os
import smtplib
from email.message import EmailMessage

from bench_common import bench_app

app = bench_app("bench_notify", "redis://127.0.0.1:6379/14")
SMTP_PORT = int(os.environ.get("BENCH_SMTP_PORT", "25"))


@app.task(name="notify.email")
def email(to, subject, text, **_):
    msg = EmailMessage()
    msg["From"] = "mediafarm <mediafarm@localhost>"
    msg["To"] = to
    msg["Subject"] = subject
    msg.set_content(text)
    with smtplib.SMTP("127.0.0.1", SMTP_PORT) as smtp:
        refused = smtp.send_message(msg)
    return {"message_id": None, "accepted": [to], "rejected": list(refused)}

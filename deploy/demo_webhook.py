"""The app's end of the demo upload pipeline in deploy/up.sh: a local webhook receiver.

Usage: demo_webhook.py PORT DIR. Every POST body is written to DIR/<time>-<n>.json (with the
X-Mediafarm-* headers it came with) and answered 200; a GET answers 200, for the readiness
check. Standard library only; stopped by deploy/down.sh (SIGTERM).
"""
import json
import os
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Receiver(BaseHTTPRequestHandler):
    count = 0

    def do_GET(self):
        self._reply(200, b'{"ok": true}')

    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length)
        Receiver.count += 1
        record = {
            "headers": {k: v for k, v in self.headers.items() if k.lower().startswith("x-mediafarm")},
            "json": json.loads(body or b"null"),
        }
        path = os.path.join(sys.argv[2], f"{time.strftime('%Y%m%dT%H%M%S')}-{Receiver.count}.json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump(record, f, indent=2)
        self._reply(200, b'{"received": true}')

    def _reply(self, status, body):
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, fmt, *args):
        sys.stderr.write("[demo-webhook] " + fmt % args + "\n")


if __name__ == "__main__":
    os.makedirs(sys.argv[2], exist_ok=True)
    ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Receiver).serve_forever()

"""A trivial local OTLP/HTTP sink for the benchmarks' `--otel` runs: answers every POST with
200 (an empty ExportTraceServiceResponse) and, on SIGTERM, writes how many requests and spans
it took to COUNT_FILE, so a run can show that export really happened.

Usage: otlp_sink.py PORT COUNT_FILE. Listens on 127.0.0.1 only.
"""
import signal
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

COUNTS = {"requests": 0, "spans": 0}
LOCK = threading.Lock()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        with LOCK:
            COUNTS["requests"] += 1
            # OTLP/JSON: one "spanId" per span (mediafarm sends JSON).
            COUNTS["spans"] += body.count(b'"spanId"')
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def main():
    port, count_file = int(sys.argv[1]), sys.argv[2]
    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)

    def done(*_):
        with LOCK, open(count_file, "w") as f:
            f.write(f"{COUNTS['requests']} {COUNTS['spans']}\n")
        sys.exit(0)

    signal.signal(signal.SIGTERM, done)
    server.serve_forever()


if __name__ == "__main__":
    main()

"""A real OTLP/HTTP trace receiver for the trace tests, built on opentelemetry-proto.

Usage: otlp_receiver.py PORT SPANS_FILE. Listens on 127.0.0.1:PORT, accepts POST /v1/traces as application/x-protobuf (what Python's OTLP exporter sends) or
application/json (OTLP/JSON: what mediafarm sends; ids in hex as the OTLP spec says, checked
by decoding into the protobuf message, so a malformed document is refused with 400), and
after each export rewrites SPANS_FILE (atomically) with every span received so far, flattened
to JSON (also served at GET /spans). Exits when the process that started it is gone.
"""
import base64
import json
import os
import sys
import time
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from google.protobuf import json_format
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

SPANS = []
SPANS_FILE = None
LOCK = threading.Lock()


def hex_ids_to_base64(doc):
    """OTLP/JSON writes trace and span ids in hex; protobuf's JSON mapping expects base64."""
    for rs in doc.get("resourceSpans", []):
        for ss in rs.get("scopeSpans", []):
            for span in ss.get("spans", []):
                for key in ("traceId", "spanId", "parentSpanId"):
                    if span.get(key):
                        span[key] = base64.b64encode(bytes.fromhex(span[key])).decode()
    return doc


def value_of(any_value):
    kind = any_value.WhichOneof("value")
    return getattr(any_value, kind) if kind else None


def flatten(request):
    out = []
    for rs in request.resource_spans:
        resource = {kv.key: value_of(kv.value) for kv in rs.resource.attributes}
        for ss in rs.scope_spans:
            for span in ss.spans:
                out.append({
                    "service": resource.get("service.name"),
                    "scope": ss.scope.name,
                    "trace_id": span.trace_id.hex(),
                    "span_id": span.span_id.hex(),
                    "parent_span_id": span.parent_span_id.hex(),
                    "name": span.name,
                    "kind": span.kind,
                    "start": span.start_time_unix_nano,
                    "end": span.end_time_unix_nano,
                    "attributes": {kv.key: value_of(kv.value) for kv in span.attributes},
                    "status_code": span.status.code,
                    "status_message": span.status.message,
                    "events": [e.name for e in span.events],
                })
    return out


class Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        if self.path != "/v1/traces":
            return self.send_error(404)
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        request = ExportTraceServiceRequest()
        try:
            if self.headers.get("Content-Type", "").startswith("application/json"):
                json_format.Parse(json.dumps(hex_ids_to_base64(json.loads(body))), request)
            else:
                request.ParseFromString(body)
        except Exception as exc:  # a malformed export is the sender's bug: say so
            print(f"refused an export: {exc}", file=sys.stderr, flush=True)
            return self.send_error(400, str(exc))
        with LOCK:
            SPANS.extend(flatten(request))
            with open(SPANS_FILE + ".tmp", "w") as f:
                json.dump(SPANS, f)
            os.replace(SPANS_FILE + ".tmp", SPANS_FILE)
        reply = ExportTraceServiceResponse().SerializeToString()
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def do_GET(self):
        if self.path != "/spans":
            return self.send_error(404)
        with LOCK:
            body = json.dumps(SPANS).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def exit_with_parent(parent):
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(0)


def main():
    global SPANS_FILE
    port, SPANS_FILE = int(sys.argv[1]), sys.argv[2]
    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    threading.Thread(target=exit_with_parent, args=(os.getppid(),), daemon=True).start()
    server.serve_forever()


if __name__ == "__main__":
    main()

"""A small OTLP/HTTP trace receiver for orderflow's tracing test: it decodes every export
with the official protocol definitions (opentelemetry-proto, pinned) and writes each span as
one JSON line, so the test reads exactly what a trace backend would.

    python receiver.py SPANS.jsonl      # prints `ready <port>` once listening on 127.0.0.1

POST /v1/traces with `application/x-protobuf` (what OTLP/HTTP exporters send): an
ExportTraceServiceRequest; answered with an empty ExportTraceServiceResponse. Each line of
SPANS.jsonl: {"service", "traceId", "spanId", "parentSpanId", "name", "kind" (SPAN_KIND_*),
"attributes": {key: value}, "links": [{"traceId", "spanId"}], "droppedLinks", "status"}.
"""

import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

OUT = open(sys.argv[1], "a", encoding="utf-8")
# Every process of the system exports at once when it stops: one writer at a time (a text file
# object is not safe to write from several threads), each export's lines together.
WRITING = threading.Lock()


def value(v):
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [value(x) for x in v.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: value(kv.value) for kv in v.kvlist_value.values}
    if kind == "bytes_value":
        return v.bytes_value.hex()
    return getattr(v, kind) if kind else None


class Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        if self.path != "/v1/traces":
            self.send_response(404)
            self.end_headers()
            return
        request = ExportTraceServiceRequest()
        request.ParseFromString(body)
        lines = []
        for resource_spans in request.resource_spans:
            resource = {kv.key: value(kv.value) for kv in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    lines.append(json.dumps({
                        "service": resource.get("service.name"),
                        "traceId": span.trace_id.hex(),
                        "spanId": span.span_id.hex(),
                        "parentSpanId": span.parent_span_id.hex(),
                        "name": span.name,
                        "kind": Span.SpanKind.Name(span.kind),
                        "attributes": {kv.key: value(kv.value) for kv in span.attributes},
                        "links": [{"traceId": l.trace_id.hex(), "spanId": l.span_id.hex()} for l in span.links],
                        "droppedLinks": span.dropped_links_count,
                        "status": Status.StatusCode.Name(span.status.code),
                    }) + "\n")
        with WRITING:
            OUT.write("".join(lines))
            OUT.flush()
        answer = ExportTraceServiceResponse().SerializeToString()
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args):
        pass


class Server(ThreadingHTTPServer):
    # Seven processes connect at once when they stop; the default backlog of 5 could drop one.
    request_queue_size = 128


if __name__ == "__main__":
    server = Server(("127.0.0.1", 0), Handler)
    print(f"ready {server.server_address[1]}", flush=True)
    server.serve_forever()

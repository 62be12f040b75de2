"""A local OTLP/HTTP trace receiver for host/tests/tracing.rs.

Serves POST /v1/traces on a loopback port (printed first, as `port N`), decodes each request
with the official OpenTelemetry protobuf definitions (`opentelemetry-proto`), and prints one
JSON line per request: the content type and, per span, its ids in hex, name, kind, times,
attributes and flags. Answers with an empty ExportTraceServiceResponse.
"""

import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from opentelemetry.proto.collector.trace.v1 import trace_service_pb2


def value_of(any_value):
    kind = any_value.WhichOneof("value")
    return getattr(any_value, kind) if kind else None


class Handler(BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802 (http.server's name)
        body = self.rfile.read(int(self.headers.get("content-length", "0")))
        request = trace_service_pb2.ExportTraceServiceRequest()
        request.ParseFromString(body)
        spans = []
        resource = {}
        for rs in request.resource_spans:
            resource = {kv.key: value_of(kv.value) for kv in rs.resource.attributes}
            for ss in rs.scope_spans:
                for s in ss.spans:
                    spans.append(
                        {
                            "trace_id": s.trace_id.hex(),
                            "span_id": s.span_id.hex(),
                            "parent_span_id": s.parent_span_id.hex(),
                            "trace_state": s.trace_state,
                            "name": s.name,
                            "kind": s.kind,
                            "start": s.start_time_unix_nano,
                            "end": s.end_time_unix_nano,
                            "flags": s.flags,
                            "status_code": s.status.code,
                            "attributes": {kv.key: value_of(kv.value) for kv in s.attributes},
                            "scope": ss.scope.name,
                        }
                    )
        line = {
            "path": self.path,
            "content_type": self.headers.get("content-type"),
            "x_test_header": self.headers.get("x-test-header"),
            "resource": resource,
            "spans": spans,
        }
        print(json.dumps(line), flush=True)
        answer = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args):
        pass


def main():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    print(f"port {server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    sys.exit(main())

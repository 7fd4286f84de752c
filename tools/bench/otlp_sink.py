"""An OpenTelemetry collector that accepts every trace export and keeps nothing, so a bench
runs services with tracing as deployed (`OTEL_EXPORTER_OTLP_ENDPOINT`, batched, over OTLP/gRPC
or, as the production gateway, OTLP/HTTP) and measures the services' cost of it, not a
collector's. `count` says how many exports came, `exports` how many over each protocol.
"""

from __future__ import annotations

import threading
from concurrent import futures
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc

_SERVICE = "opentelemetry.proto.collector.trace.v1.TraceService"
_HTTP_TRACES_PATH = "/v1/traces"
PRODUCTION_SAMPLE_RATIO = 0.1  # SNAPSELL_TRACE_SAMPLE_RATIO in deploy/base/kustomization.yaml
# OTEL_EXPORTER_OTLP_PROTOCOL of the gateway in deploy/overlays/prod (the other services: grpc).
GATEWAY_PROTOCOL = "http/protobuf"
PROTOCOLS = ("grpc", "http/protobuf")


class _HttpExports(BaseHTTPRequestHandler):
    """POST /v1/traces: 200 with an empty ExportTraceServiceResponse (an empty protobuf body)."""

    protocol_version = "HTTP/1.1"  # the exporter keeps its connection, as with a collector
    server: _HttpSinkServer

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.path != _HTTP_TRACES_PATH:
            self.send_response(HTTPStatus.NOT_FOUND)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.server.sink.counted("http/protobuf")
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass  # one line per export would drown a bench's output


class _HttpSinkServer(ThreadingHTTPServer):
    def __init__(self, sink: OtlpSink) -> None:
        super().__init__(("127.0.0.1", 0), _HttpExports)
        self.sink = sink


class OtlpSink:
    def __init__(self) -> None:
        self.exports = dict.fromkeys(PROTOCOLS, 0)
        self._lock = threading.Lock()
        # No (de)serializers: requests stay bytes, and b"" is an empty ExportTraceServiceResponse.
        export: grpc.RpcMethodHandler[bytes, bytes] = grpc.unary_unary_rpc_method_handler(
            self._export
        )
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        self._server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(_SERVICE, {"Export": export}),)
        )
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        self._http = _HttpSinkServer(self)
        self.http_port = self._http.server_address[1]
        self._http_thread = threading.Thread(
            target=self._http.serve_forever, name="otlp-http-sink", daemon=True
        )

    @property
    def count(self) -> int:
        return sum(self.exports.values())

    def counted(self, protocol: str) -> None:
        with self._lock:
            self.exports[protocol] += 1

    def _export(self, _request: bytes, _context: Any) -> bytes:
        self.counted("grpc")
        return b""

    def __enter__(self) -> OtlpSink:
        self._server.start()
        self._http_thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._server.stop(grace=None)
        self._http.shutdown()
        self._http.server_close()
        self._http_thread.join()

    def env(
        self, sample_ratio: float = PRODUCTION_SAMPLE_RATIO, protocol: str = "grpc"
    ) -> dict[str, str]:
        """A service's environment for tracing as production runs it (deploy/base), exporting
        over `protocol` (`grpc` or `http/protobuf`) to this sink."""
        if protocol == "grpc":
            endpoint = {
                "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{self.port}",
                "OTEL_EXPORTER_OTLP_INSECURE": "true",
            }
        elif protocol == "http/protobuf":
            endpoint = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{self.http_port}"}
        else:
            raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
        return {
            **endpoint,
            "OTEL_EXPORTER_OTLP_PROTOCOL": protocol,
            "SNAPSELL_TRACE_SAMPLE_RATIO": str(sample_ratio),
        }

"""An OpenTelemetry collector that accepts every trace export and keeps nothing, so a bench
runs services with tracing as deployed (`OTEL_EXPORTER_OTLP_ENDPOINT`, OTLP gRPC, batched)
and measures the services' cost of it, not a collector's. `count` says how many exports came.
"""

from __future__ import annotations

from concurrent import futures
from typing import Any

import grpc

_SERVICE = "opentelemetry.proto.collector.trace.v1.TraceService"
PRODUCTION_SAMPLE_RATIO = 0.1  # SNAPSELL_TRACE_SAMPLE_RATIO in deploy/base/kustomization.yaml


class OtlpSink:
    def __init__(self) -> None:
        self.count = 0
        # No (de)serializers: requests stay bytes, and b"" is an empty ExportTraceServiceResponse.
        export: grpc.RpcMethodHandler[bytes, bytes] = grpc.unary_unary_rpc_method_handler(
            self._export
        )
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        self._server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(_SERVICE, {"Export": export}),)
        )
        self.port = self._server.add_insecure_port("127.0.0.1:0")

    def _export(self, _request: bytes, _context: Any) -> bytes:
        self.count += 1
        return b""

    def __enter__(self) -> OtlpSink:
        self._server.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._server.stop(grace=None)

    def env(self, sample_ratio: float = PRODUCTION_SAMPLE_RATIO) -> dict[str, str]:
        """A service's environment for tracing as production runs it (deploy/base)."""
        return {
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{self.port}",
            "OTEL_EXPORTER_OTLP_INSECURE": "true",
            "SNAPSELL_TRACE_SAMPLE_RATIO": str(sample_ratio),
        }

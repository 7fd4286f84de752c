"""List a shop's opt-outs from routing: the smallest whole client of a SnapSell gRPC API.

    SNAPSELL_TOKEN=<JWT for audience "routing"> ROUTING_ADDR=127.0.0.1:50051 \
        python list_opt_outs.py [TENANT_ID]

Needs only the `snapsell-contracts` wheel (and the grpcio it depends on).
"""

import os
import sys

import grpc
from snapsell.routing.v1 import routing_pb2, routing_pb2_grpc


def main() -> int:
    metadata = (("authorization", f"Bearer {os.environ['SNAPSELL_TOKEN']}"),)
    # Owners and managers may omit the tenant (their token names it); admins must name one.
    tenant_id = sys.argv[1] if len(sys.argv) > 1 else ""
    with grpc.insecure_channel(os.environ.get("ROUTING_ADDR", "127.0.0.1:50051")) as channel:
        stub = routing_pb2_grpc.RoutingServiceStub(channel)
        page_token = ""
        while True:
            try:
                page = stub.ListOptOuts(
                    routing_pb2.ListOptOutsRequest(tenant_id=tenant_id, page_token=page_token),
                    metadata=metadata,
                    timeout=10,
                )
            except grpc.RpcError as error:
                print(f"error: {error.code().name}: {error.details()}", file=sys.stderr)
                return 1
            for opt_out in page.opt_outs:
                print(opt_out.address.value, opt_out.opted_out_at.ToJsonString())
            page_token = page.next_page_token
            if not page_token:
                return 0


if __name__ == "__main__":
    sys.exit(main())

"""Enqueue one outbound message for a shop, as its owner would through outbox.Enqueue, and print
what became of it (sent, blocked because the person opted out, ...).

    python -m tools.send_message --tenant chez-marie --from whatsapp:+14155238886 \\
        --to whatsapp:+33698765432 --body "Le live commence à 20 h !"

The owner token (five minutes, for the outbox only) is signed with the operator key, found as
the operator CLI finds it (`SNAPSELL_SIGNING_KEY_FILE`, else `make run`'s `.state/keys/`); the
outbox is at `OUTBOX_ADDR` (default 127.0.0.1:50052). Prints one JSON object: the message id and
its status once the outbox has decided (at most 15 s); a refusal or an unreachable outbox is one
line on stderr and exit status 1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import uuid

import grpc
from snapsell.common.v1 import address_pb2
from snapsell.outbox.v1 import outbox_pb2, outbox_pb2_grpc

from infra.auth import issue_token
from infra.config import ConfigError, env_address
from infra.keys import OPERATOR, SigningKey
from services.seller_admin.cli import use_local_stack_credentials

DECIDED_WITHIN_S = 15.0
_UNDECIDED = {outbox_pb2.MESSAGE_STATUS_PENDING, outbox_pb2.MESSAGE_STATUS_SENDING}
_PREFIXES = {"whatsapp": address_pb2.CHANNEL_WHATSAPP, "messenger": address_pb2.CHANNEL_MESSENGER}


def recipient(raw: str) -> address_pb2.Address:
    """`whatsapp:+33...` as Twilio writes it; no prefix is SMS."""
    prefix, sep, rest = raw.partition(":")
    channel = _PREFIXES.get(prefix.lower()) if sep else None
    if channel is None:
        return address_pb2.Address(channel=address_pb2.CHANNEL_SMS, value=raw.strip())
    return address_pb2.Address(channel=channel, value=rest.strip())


async def send(args: argparse.Namespace, address: str) -> dict[str, str]:
    token = issue_token(
        SigningKey.from_env(OPERATOR),
        sub="operator-cli",
        role="owner",
        tenant_id=args.tenant,
        audience="outbox",
        ttl_s=300,
    )
    metadata = (("authorization", f"Bearer {token}"),)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = outbox_pb2_grpc.OutboxServiceStub(channel)
        reply = await stub.Enqueue(
            outbox_pb2.EnqueueRequest(
                sender=args.sender,
                recipient=recipient(args.to),
                body=args.body,
                kind=outbox_pb2.MESSAGE_KIND_CONVERSATIONAL,
                idempotency_key=f"send-message:{uuid.uuid4()}",
            ),
            metadata=metadata,
            timeout=10,
        )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + DECIDED_WITHIN_S
        while True:
            got = await stub.GetMessage(
                outbox_pb2.GetMessageRequest(message_id=reply.message_id),
                metadata=metadata,
                timeout=10,
            )
            if got.message.status not in _UNDECIDED or loop.time() > deadline:
                break
            await asyncio.sleep(0.2)
    status = outbox_pb2.MessageStatus.Name(got.message.status).removeprefix("MESSAGE_STATUS_")
    return {"message_id": reply.message_id, "status": status.lower()}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tenant", required=True)
    parser.add_argument("--from", dest="sender", required=True, help="one of the shop's channels")
    parser.add_argument("--to", required=True, help="whatsapp:+E164, or +E164 for SMS")
    parser.add_argument("--body", required=True)
    args = parser.parse_args(argv)
    local = use_local_stack_credentials("send-message", account_sid_given=True)
    if local:
        print(local, file=sys.stderr)
    try:
        address = env_address("OUTBOX_ADDR", "127.0.0.1:50052")
        result = asyncio.run(send(args, address))
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except grpc.aio.AioRpcError as error:
        if error.code() is grpc.StatusCode.UNAVAILABLE:
            print(f"outbox not reachable at {address} — is `make run` up?", file=sys.stderr)
        else:
            print(f"error: {error.code().name}: {error.details()}", file=sys.stderr)
        return 1
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Operator commands to bootstrap a shop against a running seller_admin.

    python -m services.seller_admin.cli create-tenant --tenant chez-marie --name "Chez Marie"
    python -m services.seller_admin.cli add-channel --tenant chez-marie \\
        --address whatsapp:+14155238886 [--account-sid AC...] [--alphanumeric-sender "Chez Marie"]
    python -m services.seller_admin.cli add-seller --tenant chez-marie --phone "+33 6 12 34 56 78"
    python -m services.seller_admin.cli add-seller --tenant chez-marie --whatsapp-user-id US.1349...
    python -m services.seller_admin.cli list-sellers --tenant chez-marie
    python -m services.seller_admin.cli issue-token --role owner --tenant chez-marie \\
        --audience routing [--audience outbox] [--sub marie] [--ttl 900]

Tokens are signed with the operator's own key (`SNAPSELL_SIGNING_KEY_FILE`, published in the
services' trusted key set under `SNAPSELL_SIGNING_KEY_ID`, default `operator`) and live at most
an hour. Every command but `issue-token` calls the service at `SELLER_ADMIN_ADDR` (default
127.0.0.1:50054) as `admin`, with a five-minute token, so the changes go through the same
validation, RBAC and audit trail as any caller's. Results are
printed as JSON; a refused call prints `error: <CODE>: <message>` and exits 1, a configuration
problem exits 2.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message
from snapsell.seller_admin.v1 import seller_admin_pb2 as pb
from snapsell.seller_admin.v1 import seller_admin_pb2_grpc

from infra.auth import HUMAN_ROLES, MAX_TOKEN_TTL_S, issue_token
from infra.config import ConfigError, env_address, env_optional
from infra.grpc_client import service_channel
from infra.keys import OPERATOR, SigningKey

_CLI_TOKEN_TTL_S = 300
# The services a token may be for: each accepts only tokens naming it.
AUDIENCES = ("live_session", "outbox", "routing", "seller_admin")


class _StaticToken:
    def __init__(self, token: str) -> None:
        self._token = token

    def token(self) -> str:
        return self._token


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m services.seller_admin.cli", description="Bootstrap and inspect shops."
    )
    parser.add_argument("--as", dest="actor", default="operator-cli", help="audit `sub`")
    commands = parser.add_subparsers(dest="command", required=True)

    tenant = commands.add_parser("create-tenant", help="create a tenant (idempotent)")
    tenant.add_argument("--tenant", default="", help="slug; generated when omitted")
    tenant.add_argument("--name", required=True, help="display name")

    channel = commands.add_parser("add-channel", help="register a receiving address")
    channel.add_argument("--tenant", required=True)
    channel.add_argument("--address", required=True, help="whatsapp:+E164, +E164 or MG... SID")
    channel.add_argument("--account-sid", help="default: TWILIO_ACCOUNT_SID")
    channel.add_argument(
        "--alphanumeric-sender",
        default="",
        help="SMS numbers and Messaging Services: a sender ID the shop may send SMS under",
    )

    seller = commands.add_parser("add-seller", help="register a seller phone (idempotent)")
    seller.add_argument("--tenant", required=True)
    who = seller.add_mutually_exclusive_group(required=True)
    who.add_argument("--phone", help="international number, e.g. '+33 6 12 34 56 78'")
    who.add_argument("--whatsapp-user-id", help="e.g. US.13491208655302741918")

    sellers = commands.add_parser("list-sellers", help="list a tenant's seller phones")
    sellers.add_argument("--tenant", required=True)

    token = commands.add_parser("issue-token", help="print a JWT for a role (and tenant)")
    token.add_argument("--role", required=True, choices=sorted(HUMAN_ROLES))
    token.add_argument("--tenant", help="required for owner, manager and staff")
    token.add_argument("--sub", default="operator-cli")
    token.add_argument(
        "--audience",
        action="append",
        required=True,
        choices=AUDIENCES,
        help="a service the token is for (repeat for several)",
    )
    token.add_argument(
        "--ttl",
        type=int,
        default=MAX_TOKEN_TTL_S,
        help=f"seconds, at most {MAX_TOKEN_TTL_S} (the default)",
    )
    return parser


def _operator_key() -> SigningKey:
    return SigningKey.from_env(OPERATOR)


async def _call(args: argparse.Namespace) -> Message:
    address = env_address("SELLER_ADMIN_ADDR", "127.0.0.1:50054")
    admin_token = issue_token(
        _operator_key(),
        sub=args.actor,
        role="admin",
        audience="seller_admin",
        ttl_s=_CLI_TOKEN_TTL_S,
    )
    async with service_channel(address, token_provider=_StaticToken(admin_token)) as channel:
        stub = seller_admin_pb2_grpc.SellerAdminServiceStub(channel)
        if args.command == "create-tenant":
            return await stub.CreateTenant(
                pb.CreateTenantRequest(tenant_id=args.tenant, display_name=args.name)
            )
        if args.command == "add-channel":
            account_sid = args.account_sid or env_optional("TWILIO_ACCOUNT_SID")
            if not account_sid:
                raise ConfigError("--account-sid or TWILIO_ACCOUNT_SID is required")
            return await stub.AddChannel(
                pb.AddChannelRequest(
                    tenant_id=args.tenant,
                    address=args.address,
                    account_sid=account_sid,
                    alphanumeric_sender_id=args.alphanumeric_sender,
                )
            )
        if args.command == "add-seller":
            request = pb.AddSellerPhoneRequest(tenant_id=args.tenant)
            if args.phone is not None:
                request.phone_number = args.phone
            else:
                request.whatsapp_user_id = args.whatsapp_user_id
            return await stub.AddSellerPhone(request)
        return await _list_sellers(stub, args.tenant)


async def _list_sellers(
    stub: seller_admin_pb2_grpc.SellerAdminServiceStub, tenant_id: str
) -> pb.ListSellerPhonesResponse:
    everything = pb.ListSellerPhonesResponse()
    page_token = ""
    while True:
        page = await stub.ListSellerPhones(
            pb.ListSellerPhonesRequest(tenant_id=tenant_id, page_size=500, page_token=page_token)
        )
        everything.seller_phones.extend(page.seller_phones)
        page_token = page.next_page_token
        if not page_token:
            return everything


def _print_token(args: argparse.Namespace) -> int:
    if not 0 < args.ttl <= MAX_TOKEN_TTL_S:
        print(f"error: --ttl must be between 1 and {MAX_TOKEN_TTL_S} seconds", file=sys.stderr)
        return 2
    audience = sorted(set(args.audience))
    try:
        token = issue_token(
            _operator_key(),
            sub=args.sub,
            role=args.role,
            tenant_id=args.tenant,
            audience=audience[0] if len(audience) == 1 else audience,
            ttl_s=args.ttl,
        )
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(token)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "issue-token":
            return _print_token(args)
        reply = asyncio.run(_call(args))
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except grpc.aio.AioRpcError as error:
        print(f"error: {error.code().name}: {error.details()}", file=sys.stderr)
        return 1
    document = json_format.MessageToDict(reply, always_print_fields_with_no_presence=True)
    print(json.dumps(document, indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())

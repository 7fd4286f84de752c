"""Operator commands to bootstrap a shop against a running seller_admin.

    python -m services.seller_admin.cli create-tenant --tenant chez-marie --name "Chez Marie"
    python -m services.seller_admin.cli add-channel --tenant chez-marie \\
        --address whatsapp:+14155238886 [--account-sid AC...] [--alphanumeric-sender "Chez Marie"]
    python -m services.seller_admin.cli add-seller --tenant chez-marie --phone "+33 6 12 34 56 78"
    python -m services.seller_admin.cli add-seller --tenant chez-marie --whatsapp-user-id US.1349...
    python -m services.seller_admin.cli list-sellers --tenant chez-marie
    python -m services.seller_admin.cli issue-token --role owner --tenant chez-marie \\
        --audience routing [--audience outbox] [--sub marie] [--ttl 900]

What operators do by hand, each against the service that owns it:

    python -m services.seller_admin.cli list-tenants
    python -m services.seller_admin.cli list-channels --tenant chez-marie
    python -m services.seller_admin.cli remove-seller --tenant chez-marie --phone +33612345678
    python -m services.seller_admin.cli list-opt-outs --tenant chez-marie          # routing
    python -m services.seller_admin.cli set-consent --tenant chez-marie \\
        --address whatsapp:+33612345678 --state opted-out --reason "asked by phone"
    python -m services.seller_admin.cli list-dead-letters --tenant chez-marie      # outbox
    python -m services.seller_admin.cli get-message --tenant chez-marie MESSAGE_ID
    python -m services.seller_admin.cli redrive --tenant chez-marie MESSAGE_ID...
    python -m services.seller_admin.cli discard --tenant chez-marie --reason "..." MESSAGE_ID...
    python -m services.seller_admin.cli audit --tenant chez-marie \\
        --since 2026-12-01T00:00:00Z [--until 2026-12-07T18:00:00Z]   # who changed what

Tokens are signed with the operator's own key (`SNAPSELL_SIGNING_KEY_FILE`, published in the
services' trusted key set under `SNAPSELL_SIGNING_KEY_ID`, default `operator`) and live at most
an hour. Against the local stack nothing needs exporting: when `SNAPSELL_SIGNING_KEY_FILE` or
`TWILIO_ACCOUNT_SID` is unset, the CLI uses what `make run` keeps in `.state/` (the operator key
`.state/keys/operator.pem`, the sandbox account of `.state/dev-credentials.json`) and says so in
one line on stderr; variables that are set always win (`SNAPSELL_STATE_DIR` moves `.state/`).
Every command but `issue-token` calls its service (seller_admin at `SELLER_ADMIN_ADDR`,
default 127.0.0.1:50054; routing at `ROUTING_ADDR`, 127.0.0.1:50051; outbox at `OUTBOX_ADDR`,
127.0.0.1:50052) as `admin`, with a five-minute token, so the changes go through the same
validation, RBAC and audit trail as any caller's. Results are printed as JSON; a refused call
prints `error: <CODE>: <message>` and exits 1, a configuration problem exits 2.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp
from snapsell.common.v1 import address_pb2
from snapsell.outbox.v1 import outbox_pb2, outbox_pb2_grpc
from snapsell.routing.v1 import routing_pb2, routing_pb2_grpc
from snapsell.seller_admin.v1 import seller_admin_pb2 as pb
from snapsell.seller_admin.v1 import seller_admin_pb2_grpc

from infra.auth import HUMAN_ROLES, MAX_TOKEN_TTL_S, issue_token
from infra.config import ConfigError, env_address, env_optional
from infra.grpc_client import service_channel
from infra.keys import OPERATOR, SigningKey

_CLI_TOKEN_TTL_S = 300
_REPOSITORY = Path(__file__).resolve().parents[2]


def local_state_dir() -> Path:
    """Where `make run` keeps the local stack's keys and sandbox account (tools/run.py)."""
    return Path(os.environ.get("SNAPSELL_STATE_DIR", "").strip() or _REPOSITORY / ".state")


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
    _add_operations(commands)
    return parser


def use_local_stack_credentials(command: str, account_sid_given: bool) -> str | None:
    """Fill the unset variables from `make run`'s `.state/` (the environment wins); the line that
    says what was taken, or None when nothing was."""
    used = []
    state = local_state_dir()
    operator_key = state / "keys" / f"{OPERATOR}.pem"
    if not os.environ.get("SNAPSELL_SIGNING_KEY_FILE", "").strip() and operator_key.exists():
        os.environ["SNAPSELL_SIGNING_KEY_FILE"] = str(operator_key)
        used.append(f"operator key {operator_key}")
    wants_account = command == "add-channel" and not account_sid_given
    if wants_account and not os.environ.get("TWILIO_ACCOUNT_SID", "").strip():
        try:
            credentials = json.loads((state / "dev-credentials.json").read_text())
            account_sid = str(credentials["TWILIO_ACCOUNT_SID"])
        except (OSError, ValueError, KeyError):
            account_sid = ""
        if account_sid:
            os.environ["TWILIO_ACCOUNT_SID"] = account_sid
            used.append(f"Twilio account {account_sid} of {state / 'dev-credentials.json'}")
    if not used:
        return None
    return f"using the local stack's {' and '.join(used)} (make run's; the environment wins)"


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
    stub: seller_admin_pb2_grpc.SellerAdminServiceAsyncStub, tenant_id: str
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


# --- What operators do by hand: each command calls the service that owns the data, as `admin`,
# with a token for that service alone.

# The address setting and its `make run` default of each service the commands call.
_SERVICE_ADDRESSES = {
    "seller_admin": ("SELLER_ADMIN_ADDR", "127.0.0.1:50054"),
    "routing": ("ROUTING_ADDR", "127.0.0.1:50051"),
    "outbox": ("OUTBOX_ADDR", "127.0.0.1:50052"),
}
# `--address` prefixes; a bare `+E164` is an SMS number.
_ADDRESS_CHANNELS = {
    "whatsapp": address_pb2.CHANNEL_WHATSAPP,
    "messenger": address_pb2.CHANNEL_MESSENGER,
    "sms": address_pb2.CHANNEL_SMS,
}
_CONSENT_STATES = {
    "opted-out": routing_pb2.CONSENT_STATE_OPTED_OUT,
    "opted-in": routing_pb2.CONSENT_STATE_OPTED_IN,
}
_DEAD_REASONS = {
    "outside-session-window": outbox_pb2.DEAD_REASON_OUTSIDE_SESSION_WINDOW,
    "permanent-error": outbox_pb2.DEAD_REASON_PERMANENT_ERROR,
    "attempts-exhausted": outbox_pb2.DEAD_REASON_ATTEMPTS_EXHAUSTED,
    "outcome-unknown": outbox_pb2.DEAD_REASON_OUTCOME_UNKNOWN,
}
_PAGE_SIZE = 500

Operation = Callable[[argparse.Namespace, grpc.aio.Channel], Awaitable[Message]]


def _add_operations(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    def add(name: str, service: str, operation: Operation, text: str) -> argparse.ArgumentParser:
        command = commands.add_parser(name, help=f"{text} ({service})")
        command.set_defaults(operation=functools.partial(_operate, service, operation))
        return command

    add("list-tenants", "seller_admin", _list_tenants, "list every tenant")
    add("list-channels", "seller_admin", _list_channels, "list a tenant's channels").add_argument(
        "--tenant", required=True
    )
    remove = add("remove-seller", "seller_admin", _remove_seller, "remove a seller phone")
    remove.add_argument("--tenant", required=True)
    who = remove.add_mutually_exclusive_group(required=True)
    who.add_argument("--phone", help="as registered, e.g. '+33612345678'")
    who.add_argument("--whatsapp-user-id")

    opt_outs = add("list-opt-outs", "routing", _list_opt_outs, "list who opted out")
    opt_outs.add_argument("--tenant", required=True)
    consent = add("set-consent", "routing", _set_consent, "record consent given or withdrawn")
    consent.add_argument("--tenant", required=True)
    consent.add_argument(
        "--address", required=True, help="whatsapp:+E164, messenger:ID, or +E164 (SMS)"
    )
    consent.add_argument("--state", required=True, choices=sorted(_CONSENT_STATES))
    consent.add_argument("--reason", default="", help="kept in the audit trail")

    dead = add("list-dead-letters", "outbox", _list_dead_letters, "list undeliverable messages")
    dead.add_argument("--tenant", required=True)
    dead.add_argument("--reason", choices=sorted(_DEAD_REASONS), help="only this reason")
    dead.add_argument("--sender", default="", help="only from this sender, e.g. whatsapp:+1415...")
    message = add("get-message", "outbox", _get_message, "a message with its attempts")
    message.add_argument("--tenant", required=True)
    message.add_argument("message_id", metavar="MESSAGE_ID")
    redrive = add("redrive", "outbox", _redrive, "send dead letters again")
    redrive.add_argument("--tenant", required=True)
    redrive.add_argument("message_ids", nargs="+", metavar="MESSAGE_ID")
    discard = add("discard", "outbox", _discard, "give up on dead letters for good")
    discard.add_argument("--tenant", required=True)
    discard.add_argument("--reason", required=True, help="kept in the audit trail")
    discard.add_argument("message_ids", nargs="+", metavar="MESSAGE_ID")

    audit = add("audit", "seller_admin", _audit, "who changed what for a tenant, and when")
    audit.add_argument("--tenant", required=True)
    audit.add_argument("--since", required=True, type=_instant, help="ISO 8601, e.g. 2026-12-01")
    audit.add_argument("--until", type=_instant, help="ISO 8601 (default: now)")


def _instant(raw: str) -> Timestamp:
    """An ISO 8601 date or date-time; without an offset, UTC."""
    moment = datetime.fromisoformat(raw)
    stamp = Timestamp()
    stamp.FromDatetime(moment if moment.tzinfo else moment.replace(tzinfo=UTC))
    return stamp


async def _operate(service: str, operation: Operation, args: argparse.Namespace) -> Message:
    address = env_address(*_SERVICE_ADDRESSES[service])
    admin_token = issue_token(
        _operator_key(), sub=args.actor, role="admin", audience=service, ttl_s=_CLI_TOKEN_TTL_S
    )
    async with service_channel(address, token_provider=_StaticToken(admin_token)) as channel:
        return await operation(args, channel)


async def _every_page(fetch: Callable[[str], Awaitable[Any]], field: str) -> Message:
    """Every page of a paginated list, as one response."""
    everything: Message | None = None
    page_token = ""
    while True:
        page = await fetch(page_token)
        if everything is None:
            everything = type(page)()
        getattr(everything, field).extend(getattr(page, field))
        page_token = page.next_page_token
        if not page_token:
            return everything


async def _list_tenants(args: argparse.Namespace, channel: grpc.aio.Channel) -> Message:
    stub = seller_admin_pb2_grpc.SellerAdminServiceStub(channel)
    return await _every_page(
        lambda token: stub.ListTenants(
            pb.ListTenantsRequest(page_size=_PAGE_SIZE, page_token=token)
        ),
        "tenants",
    )


async def _list_channels(args: argparse.Namespace, channel: grpc.aio.Channel) -> Message:
    stub = seller_admin_pb2_grpc.SellerAdminServiceStub(channel)
    return await _every_page(
        lambda token: stub.ListChannels(
            pb.ListChannelsRequest(tenant_id=args.tenant, page_size=_PAGE_SIZE, page_token=token)
        ),
        "channels",
    )


async def _remove_seller(args: argparse.Namespace, channel: grpc.aio.Channel) -> Message:
    request = pb.RemoveSellerPhoneRequest(tenant_id=args.tenant)
    if args.phone is not None:
        request.phone_number = args.phone
    else:
        request.whatsapp_user_id = args.whatsapp_user_id
    return await seller_admin_pb2_grpc.SellerAdminServiceStub(channel).RemoveSellerPhone(request)


async def _list_opt_outs(args: argparse.Namespace, channel: grpc.aio.Channel) -> Message:
    stub = routing_pb2_grpc.RoutingServiceStub(channel)
    return await _every_page(
        lambda token: stub.ListOptOuts(
            routing_pb2.ListOptOutsRequest(
                tenant_id=args.tenant, page_size=_PAGE_SIZE, page_token=token
            )
        ),
        "opt_outs",
    )


def _address(raw: str) -> address_pb2.Address:
    prefix, colon, value = raw.strip().partition(":")
    if not colon:
        return address_pb2.Address(channel=address_pb2.CHANNEL_SMS, value=raw.strip())
    if prefix.lower() not in _ADDRESS_CHANNELS:
        known = ", ".join(f"{name}:" for name in sorted(_ADDRESS_CHANNELS))
        raise ConfigError(f"--address {raw!r} must start with one of {known} or be +E164")
    return address_pb2.Address(channel=_ADDRESS_CHANNELS[prefix.lower()], value=value)


async def _set_consent(args: argparse.Namespace, channel: grpc.aio.Channel) -> Message:
    return await routing_pb2_grpc.RoutingServiceStub(channel).SetConsent(
        routing_pb2.SetConsentRequest(
            tenant_id=args.tenant,
            address=_address(args.address),
            state=_CONSENT_STATES[args.state],
            reason=args.reason,
        )
    )


async def _list_dead_letters(args: argparse.Namespace, channel: grpc.aio.Channel) -> Message:
    stub = outbox_pb2_grpc.OutboxServiceStub(channel)
    return await _every_page(
        lambda token: stub.ListDeadLetters(
            outbox_pb2.ListDeadLettersRequest(
                tenant_id=args.tenant,
                page_size=_PAGE_SIZE,
                page_token=token,
                reason=_DEAD_REASONS.get(args.reason or "", outbox_pb2.DEAD_REASON_UNSPECIFIED),
                sender=args.sender,
            )
        ),
        "messages",
    )


async def _get_message(args: argparse.Namespace, channel: grpc.aio.Channel) -> Message:
    return await outbox_pb2_grpc.OutboxServiceStub(channel).GetMessage(
        outbox_pb2.GetMessageRequest(tenant_id=args.tenant, message_id=args.message_id)
    )


async def _redrive(args: argparse.Namespace, channel: grpc.aio.Channel) -> Message:
    return await outbox_pb2_grpc.OutboxServiceStub(channel).Redrive(
        outbox_pb2.RedriveRequest(tenant_id=args.tenant, message_ids=args.message_ids)
    )


async def _discard(args: argparse.Namespace, channel: grpc.aio.Channel) -> Message:
    return await outbox_pb2_grpc.OutboxServiceStub(channel).Discard(
        outbox_pb2.DiscardRequest(
            tenant_id=args.tenant, message_ids=args.message_ids, reason=args.reason
        )
    )


async def _audit(args: argparse.Namespace, channel: grpc.aio.Channel) -> Message:
    request = pb.ListAuditRecordsRequest(tenant_id=args.tenant, since=args.since)
    if args.until is not None:
        request.until.CopyFrom(args.until)
    return await seller_admin_pb2_grpc.SellerAdminServiceStub(channel).ListAuditRecords(request)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    local = use_local_stack_credentials(args.command, bool(getattr(args, "account_sid", None)))
    if local:
        print(local, file=sys.stderr)
    try:
        if args.command == "issue-token":
            return _print_token(args)
        operation = getattr(args, "operation", None)
        reply = asyncio.run(operation(args) if operation else _call(args))
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

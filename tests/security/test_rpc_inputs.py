"""Whatever a caller puts in a request, every RPC of every gRPC service answers with a deliberate
status and a one-line message: never UNKNOWN, never the text of an exception (a driver's error,
SQL, a class name). NUL characters, which PostgreSQL cannot store in text, are INVALID_ARGUMENT;
so is any page token no response of that list, for that tenant, could have carried.

The RPCs are enumerated from the generated descriptors, so a new RPC or service is covered
without editing this file; each is called as the first caller the service lets in (admin, else a
service identity), since a refused call would prove nothing about the servicer behind it.
"""

from __future__ import annotations

import base64
import importlib
import json
import pkgutil
import re
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import grpc
import pytest
import snapsell
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from google.protobuf.timestamp_pb2 import Timestamp
from snapsell.common.v1 import address_pb2
from snapsell.routing.v1 import routing_pb2

from tools.stack import DB_SERVICES, SystemStack

MakeToken = Callable[..., str]
NUL_TEXT = "nul\0text"
# What a caller must never read: driver and database messages, SQL, stack traces, class names.
INTERNAL_TEXT = re.compile(
    r"asyncpg|postgres|traceback|invalid byte sequence|out of range|\bselect\b|\binsert\b"
    r"|\bupdate\b.*\bset\b|\bwhere\b|unexpected <class|\b[A-Z]\w*(Error|Exception)\b",
    re.IGNORECASE,
)
# Forged page tokens of every kind a client can make up (the format of some services before
# this suite included: `micros:id`, which reached PostgreSQL as an out-of-range bigint).
FORGED_PAGE_TOKENS = {
    "not-base64": "%%%not-a-token%%%",
    "not-text": base64.urlsafe_b64encode(b"\xff\xfe\xfd\xfc").decode(),
    "huge-numbers": base64.urlsafe_b64encode(b"99999999999999999999999:99999999999999999").decode(),
    "beyond-int64": base64.urlsafe_b64encode(b"0:9223372036854775808").decode(),
    "negative": base64.urlsafe_b64encode(b"-1:-1").decode(),
    "json-other-version": base64.urlsafe_b64encode(json.dumps([99, "x", "y", 1]).encode()).decode(),
    "json-huge": base64.urlsafe_b64encode(
        json.dumps([1, "x", "y", 10**30, -(2**70)]).encode()
    ).decode(),
    "too-long": "A" * 5000,
}


def grpc_services() -> Iterator[Any]:
    """Every service of every generated module under `snapsell`."""
    for module in pkgutil.walk_packages(snapsell.__path__, "snapsell."):
        if module.name.endswith("_pb2"):
            descriptor = importlib.import_module(module.name).DESCRIPTOR
            yield from descriptor.services_by_name.values()


RPCS: list[MethodDescriptor] = [method for service in grpc_services() for method in service.methods]


def rpc_id(method: MethodDescriptor) -> str:
    return method.full_name


def process_of(method: MethodDescriptor) -> str:
    """`snapsell.<context>.v1.XService` runs in the process named `<context>`."""
    return method.containing_service.full_name.split(".")[1]


def string_paths(descriptor: Descriptor, depth: int = 0) -> Iterator[tuple[FieldDescriptor, ...]]:
    """Every path to a string field of `descriptor` (nested messages, three levels deep; maps
    of text to text, the only maps our contracts have)."""
    for field in descriptor.fields:
        if field.type == FieldDescriptor.TYPE_STRING:
            yield (field,)
        elif field.type == FieldDescriptor.TYPE_MESSAGE and depth < 3:
            if field.message_type.GetOptions().map_entry:
                entry = field.message_type.fields_by_name
                assert entry["key"].type == entry["value"].type == FieldDescriptor.TYPE_STRING
                yield (field,)
            else:
                for rest in string_paths(field.message_type, depth + 1):
                    yield (field, *rest)


def set_text(message: Message, path: tuple[FieldDescriptor, ...], text: str) -> None:
    field, rest = path[0], path[1:]
    if field.type == FieldDescriptor.TYPE_MESSAGE and field.message_type.GetOptions().map_entry:
        getattr(message, field.name)[text] = text
        return
    if not rest:
        if field.is_repeated:
            getattr(message, field.name).append(text)
        else:
            setattr(message, field.name, text)
        return
    if field.is_repeated:
        container = getattr(message, field.name)
        nested = container[0] if len(container) else container.add()
    else:
        nested = getattr(message, field.name)
    set_text(nested, rest, text)


# Plausible values, so a request gets past the servicer's own checks to its store: a NUL then
# reaches PostgreSQL unless something refuses it first. Other text fields get "x".
PLAUSIBLE_TEXT = {
    "tenant_id": "sec-shop",
    "value": "+33611110009",
    "address": "whatsapp:+14155230009",
    "phone_number": "+33611110008",
    "sender": "whatsapp:+14155230009",
    "account_sid": "AC" + "0" * 32,
    "message_id": "00000000-0000-4000-8000-000000000001",
    "message_ids": "00000000-0000-4000-8000-000000000001",
    "session_id": "00000000-0000-4000-8000-000000000002",
    "page_token": "",
}


def plausible(path: tuple[FieldDescriptor, ...]) -> str:
    return PLAUSIBLE_TEXT.get(path[-1].name, "x")


def request_with(method: MethodDescriptor, nul_in: list[tuple[FieldDescriptor, ...]]) -> Message:
    """Every text field plausible, except those of `nul_in` which end with a NUL; every enum
    its first real value."""
    request = GetMessageClass(method.input_type)()
    for path in string_paths(method.input_type):
        set_text(request, path, plausible(path))
    for path in nul_in:  # last, so that it is the one set of its oneof
        set_text(request, path, plausible(path) + NUL_TEXT)
    set_enums(request)
    return request


def set_enums(message: Message) -> None:
    for field in message.DESCRIPTOR.fields:
        if field.type == FieldDescriptor.TYPE_ENUM and not field.is_repeated:
            values = field.enum_type.values
            setattr(message, field.name, values[min(1, len(values) - 1)].number)
        elif field.type == FieldDescriptor.TYPE_MESSAGE and not (
            field.message_type.GetOptions().map_entry
        ):
            if field.is_repeated:
                for nested in getattr(message, field.name):
                    set_enums(nested)
            elif message.HasField(field.name):
                set_enums(getattr(message, field.name))


class Caller:
    """Calls any RPC of the running system as the first caller its service lets in."""

    def __init__(self, stack: SystemStack, make_token: MakeToken) -> None:
        self._stack = stack
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._tokens = [make_token("admin", sub="security-admin")] + [
            make_token("service", sub=name) for name in DB_SERVICES
        ]

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()

    async def call(
        self, method: MethodDescriptor, request: Message
    ) -> grpc.aio.AioRpcError | Message:
        process = process_of(method)
        if process not in self._channels:
            self._channels[process] = grpc.aio.insecure_channel(self._stack.address(process))
        stub = self._channels[process].unary_unary(
            f"/{method.containing_service.full_name}/{method.name}",
            request_serializer=lambda message: message.SerializeToString(),
            response_deserializer=GetMessageClass(method.output_type).FromString,
        )
        outcome: grpc.aio.AioRpcError | Message
        for token in self._tokens:
            try:
                outcome = await stub(
                    request, metadata=(("authorization", f"Bearer {token}"),), timeout=10
                )
            except grpc.aio.AioRpcError as error:
                outcome = error
                if error.code() in (
                    grpc.StatusCode.PERMISSION_DENIED,
                    grpc.StatusCode.UNAUTHENTICATED,
                ):
                    continue  # not this caller: try the next
            return outcome
        return outcome


@pytest.fixture
async def caller(system: SystemStack, make_token: MakeToken) -> AsyncIterator[Caller]:
    caller = Caller(system, make_token)
    try:
        yield caller
    finally:
        await caller.close()


def describe(outcome: grpc.aio.AioRpcError | Message) -> str:
    if isinstance(outcome, grpc.aio.AioRpcError):
        return f"{outcome.code().name} {(outcome.details() or '')[:160]!r}"
    return "accepted"


def leak(outcome: grpc.aio.AioRpcError | Message) -> str | None:
    """What is wrong with a refusal as the caller reads it, if anything."""
    if not isinstance(outcome, grpc.aio.AioRpcError):
        return None
    details = outcome.details() or ""
    if outcome.code() is grpc.StatusCode.UNKNOWN or INTERNAL_TEXT.search(details):
        return f"leaks {describe(outcome)}"
    if "\n" in details.strip():
        return f"not one line: {describe(outcome)}"
    return None


def nul_problem(outcome: grpc.aio.AioRpcError | Message) -> str | None:
    problem = leak(outcome)
    if problem is None and not describe(outcome).startswith("INVALID_ARGUMENT 'text fields"):
        problem = describe(outcome)
    return problem


def page_token_problem(outcome: grpc.aio.AioRpcError | Message) -> str | None:
    problem = leak(outcome)
    if problem is None and describe(outcome) != "INVALID_ARGUMENT 'invalid page_token'":
        problem = describe(outcome)
    return problem


def test_every_service_of_the_system_is_walked() -> None:
    services = {method.containing_service.full_name for method in RPCS}
    assert {process_of(method) for method in RPCS} == set(DB_SERVICES)
    assert len(services) == len(DB_SERVICES) and len(RPCS) >= 20


@pytest.mark.parametrize("method", RPCS, ids=rpc_id)
async def test_nul_in_any_text_field_is_invalid_argument(
    caller: Caller, method: MethodDescriptor
) -> None:
    paths = list(string_paths(method.input_type))
    assert paths, f"{method.full_name} has no text field"
    cases = {".".join(field.name for field in path): [path] for path in paths}
    cases["every field"] = paths
    problems = []
    for what, nul_in in cases.items():
        if problem := nul_problem(await caller.call(method, request_with(method, nul_in))):
            problems.append(f"{what}: {problem}")
    assert not problems, f"{method.name}: " + "; ".join(problems)


PAGED_RPCS = [method for method in RPCS if "page_token" in method.input_type.fields_by_name]


def paged_request(method: MethodDescriptor, tenant_id: str, page_token: str) -> Message:
    request = GetMessageClass(method.input_type)(page_token=page_token)
    if "tenant_id" in method.input_type.fields_by_name:
        request.tenant_id = tenant_id
    if "session_id" in method.input_type.fields_by_name:  # a list within one live session
        request.session_id = str(uuid.uuid4())
    return request


def test_every_list_rpc_is_walked() -> None:
    assert {method.name for method in PAGED_RPCS} >= {
        "ListOptOuts",
        "ListDeadLetters",
        "ListSessions",
        "ListTenants",
        "ListChannels",
        "ListSellerPhones",
    }


@pytest.mark.parametrize("method", PAGED_RPCS, ids=rpc_id)
async def test_a_forged_page_token_is_invalid(caller: Caller, method: MethodDescriptor) -> None:
    problems = []
    for what, token in FORGED_PAGE_TOKENS.items():
        outcome = await caller.call(method, paged_request(method, "sec-shop", token))
        if problem := page_token_problem(outcome):
            problems.append(f"{what}: {problem}")
    assert not problems, f"{method.name}: " + "; ".join(problems)


@pytest.fixture
async def opt_outs_token(caller: Caller) -> str:
    """A genuine next_page_token: the first page of shop `sec-shop`'s opt-outs, one per page."""
    rpcs = {method.name: method for method in RPCS}
    for number in ("+33611110001", "+33611110002"):
        request = routing_pb2.SetConsentRequest(
            tenant_id="sec-shop",
            address=address_pb2.Address(channel=address_pb2.CHANNEL_WHATSAPP, value=number),
            state=routing_pb2.CONSENT_STATE_OPTED_OUT,
        )
        assert isinstance(await caller.call(rpcs["SetConsent"], request), Message)
    first = await caller.call(
        rpcs["ListOptOuts"], routing_pb2.ListOptOutsRequest(tenant_id="sec-shop", page_size=1)
    )
    assert isinstance(first, routing_pb2.ListOptOutsResponse) and first.next_page_token
    return first.next_page_token


@pytest.mark.parametrize("method", PAGED_RPCS, ids=rpc_id)
async def test_a_page_token_of_another_tenant_or_list_is_invalid(
    caller: Caller, method: MethodDescriptor, opt_outs_token: str
) -> None:
    tenants = ["other-shop"] if method.name == "ListOptOuts" else ["sec-shop", "other-shop"]
    problems = []
    for tenant in tenants:
        outcome = await caller.call(method, paged_request(method, tenant, opt_outs_token))
        if problem := page_token_problem(outcome):
            problems.append(f"for {tenant}: {problem}")
    assert not problems, f"{method.name}: " + "; ".join(problems)


def timestamp_fields(descriptor: Descriptor) -> list[FieldDescriptor]:
    return [
        field
        for field in descriptor.fields
        if field.type == FieldDescriptor.TYPE_MESSAGE
        and field.message_type.full_name == "google.protobuf.Timestamp"
        and not field.is_repeated
    ]


TIMESTAMPED_RPCS = [method for method in RPCS if timestamp_fields(method.input_type)]


@pytest.mark.parametrize("method", TIMESTAMPED_RPCS, ids=rpc_id)
async def test_a_timestamp_out_of_range_is_invalid(
    caller: Caller, method: MethodDescriptor
) -> None:
    """Seconds past year 9999 or nanos past a second: what a Timestamp may not hold."""
    problems = []
    for field in timestamp_fields(method.input_type):
        for seconds, nanos in ((2**62, 0), (0, 2**30)):
            request = request_with(method, [])
            getattr(request, field.name).CopyFrom(Timestamp(seconds=seconds, nanos=nanos))
            outcome = await caller.call(method, request)
            if (problem := leak(outcome)) is None and not describe(outcome).startswith(
                "INVALID_ARGUMENT"
            ):
                problem = describe(outcome)
            if problem:
                problems.append(f"{field.name}={seconds}s {nanos}ns: {problem}")
    assert not problems, f"{method.name}: " + "; ".join(problems)

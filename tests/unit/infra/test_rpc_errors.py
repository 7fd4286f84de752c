"""One table per service from its errors to gRPC status codes, read by one decorator."""

from __future__ import annotations

from typing import Any

import asyncpg
import grpc
import pytest

from infra.grpc_server import (
    CONCURRENT_UPDATE_TEXT,
    DATABASE_UNAVAILABLE_TEXT,
    ErrorStatus,
    InvalidInputError,
    map_errors,
)


class NotFoundError(LookupError):
    pass


class TenantNotFoundError(NotFoundError):
    pass


class LockedError(Exception):
    pass


TABLE: ErrorStatus = {
    NotFoundError: grpc.StatusCode.NOT_FOUND,
    LockedError: (grpc.StatusCode.FAILED_PRECONDITION, "locked, ask an operator"),
    # A service's entry wins over the common one.
    TimeoutError: (grpc.StatusCode.DEADLINE_EXCEEDED, "too slow"),
}


class Aborted(Exception):
    pass


class Context:
    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise Aborted(code, details)


class Api:
    @map_errors(TABLE)
    async def Get(self, request: BaseException, context: Any) -> str:
        raise request


@pytest.mark.parametrize(
    ("error", "status"),
    [
        # The error's own one-line message; a LookupError's str() would be its repr.
        (NotFoundError("no such item"), (grpc.StatusCode.NOT_FOUND, "no such item")),
        (TenantNotFoundError("no such tenant"), (grpc.StatusCode.NOT_FOUND, "no such tenant")),
        (
            LockedError("row 42 locked by pid 7"),
            (grpc.StatusCode.FAILED_PRECONDITION, "locked, ask an operator"),
        ),
        (TimeoutError(), (grpc.StatusCode.DEADLINE_EXCEEDED, "too slow")),
        (
            InvalidInputError("invalid page_token"),
            (grpc.StatusCode.INVALID_ARGUMENT, "invalid page_token"),
        ),
        (
            ConnectionRefusedError("10.0.0.5:5432"),
            (grpc.StatusCode.UNAVAILABLE, DATABASE_UNAVAILABLE_TEXT),
        ),
        (
            asyncpg.SerializationError("could not serialize"),
            (grpc.StatusCode.ABORTED, CONCURRENT_UPDATE_TEXT),
        ),
        (
            asyncpg.DeadlockDetectedError("deadlock"),
            (grpc.StatusCode.ABORTED, CONCURRENT_UPDATE_TEXT),
        ),
    ],
)
async def test_errors_map_along_their_class_hierarchy(
    error: Exception, status: tuple[grpc.StatusCode, str]
) -> None:
    with pytest.raises(Aborted) as caught:
        await Api().Get(error, Context())
    assert caught.value.args == status


async def test_unmapped_errors_pass_through_to_the_interceptor() -> None:
    # RpcErrorInterceptor answers them INTERNAL "internal error" (tests/integration).
    with pytest.raises(KeyError):
        await Api().Get(KeyError("secret"), Context())

"""Sending the replies the store queued: a round takes the pending `replies` rows, hands them
to the outbox's EnqueueMany (at most `batch_size` per call, at most `calls_in_flight` calls at
once), each with its idempotency key, then marks them enqueued in one statement.

The row is written in the transaction that decided the reply and sent after it committed, so
a crash before the commit sends nothing and a crash between EnqueueMany and the mark sends
again with the same keys, which the outbox answers with the first messages (never a second
send). Several replicas share the rows with FOR UPDATE SKIP LOCKED. The outbox answers each
request alone: a reply it refuses as invalid (INVALID_ARGUMENT, FAILED_PRECONDITION) has the
refusal recorded in `failure` and is not retried, one it could not take (any other code), or
a call that failed or timed out as a whole, stays pending for the next round; the others of
the call are marked all the same.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import asyncpg
import grpc
from prometheus_client import Counter
from snapsell.outbox.v1 import outbox_pb2, outbox_pb2_grpc

from infra.backlog import report_queue
from infra.events import wait_any
from infra.log import get_logger
from services.live_catalog.domain import Channel, Contact
from services.live_catalog.events import address

_log = get_logger(__name__)

REPLIES_SENT = Counter(
    "snapsell_live_catalog_replies_total",
    "Replies handed to the outbox, by outcome (enqueued, rejected, retry)",
    ["outcome"],
)

_CLAIM = """
SELECT id, tenant_id, idempotency_key, sender, recipient_channel, recipient_value, account_sid,
    body, content_sid, correlation_id
FROM replies WHERE enqueued_at IS NULL
ORDER BY created_at
LIMIT $1
FOR UPDATE SKIP LOCKED
"""
# The replies waiting for the outbox (replies_pending), exported every few seconds.
_BACKLOG = """
SELECT count(*) AS depth,
    coalesce(extract(epoch FROM now() - min(created_at)), 0)::float8 AS oldest_age_s
FROM replies WHERE enqueued_at IS NULL
"""
BACKLOG_QUEUE = "live_catalog.replies"
BACKLOG_INTERVAL_S = 5.0
_MARK = """
UPDATE replies SET enqueued_at = now(), outbox_message_id = marked.message_id,
    failure = marked.failure
FROM unnest($1::uuid[], $2::text[], $3::text[]) AS marked (id, message_id, failure)
WHERE replies.id = marked.id
"""


class ReplyRejectedError(Exception):
    """The outbox refused the reply; sending it again cannot succeed."""


class PeerUnavailableError(Exception):
    """The outbox could not be reached or answered an error worth retrying."""


@dataclass(frozen=True, slots=True)
class PendingReply:
    tenant_id: str
    idempotency_key: str
    sender: str
    recipient: Contact
    account_sid: str
    body: str
    content_sid: str | None
    correlation_id: str


# What the outbox answered for one reply: its message id, or why it was not taken.
Outcome = str | ReplyRejectedError | PeerUnavailableError


class ReplySender(Protocol):
    async def enqueue_many(self, replies: Sequence[PendingReply]) -> list[Outcome]:
        """One outcome per reply, in order; raises PeerUnavailableError when the call as a
        whole failed."""
        ...


def _request(reply: PendingReply) -> outbox_pb2.EnqueueRequest:
    """A text, or the template with the text as its variable "1"."""
    request = outbox_pb2.EnqueueRequest(
        tenant_id=reply.tenant_id,
        sender=reply.sender,
        recipient=address(reply.recipient),
        kind=outbox_pb2.MESSAGE_KIND_CONVERSATIONAL,
        idempotency_key=reply.idempotency_key,
        correlation_id=reply.correlation_id,
        account_sid=reply.account_sid,
    )
    if reply.content_sid:
        request.template.content_sid = reply.content_sid
        request.template.variables["1"] = reply.body
    else:
        request.body = reply.body
    return request


_CODES = {code.value[0]: code for code in grpc.StatusCode}
_REJECTED = frozenset({grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION})


class GrpcReplySender:
    """outbox.EnqueueMany, read request by request."""

    def __init__(self, channel: grpc.aio.Channel, *, deadline_s: float) -> None:
        self._stub = outbox_pb2_grpc.OutboxServiceStub(channel)
        self._deadline_s = deadline_s

    async def enqueue_many(self, replies: Sequence[PendingReply]) -> list[Outcome]:
        request = outbox_pb2.EnqueueManyRequest(requests=[_request(reply) for reply in replies])
        try:
            answer = await self._stub.EnqueueMany(request, timeout=self._deadline_s)
        except grpc.aio.AioRpcError as error:
            detail = f"outbox.EnqueueMany: {error.code().name}: {error.details() or ''}"
            raise PeerUnavailableError(detail.strip()) from None
        if len(answer.results) != len(replies):
            raise PeerUnavailableError("outbox.EnqueueMany: not one result per request")
        outcomes: list[Outcome] = []
        for result in answer.results:
            code = _CODES.get(result.code, grpc.StatusCode.UNKNOWN)
            detail = f"outbox.EnqueueMany: {code.name}: {result.error}"
            if code is grpc.StatusCode.OK:
                outcomes.append(result.message_id)
            elif code in _REJECTED:
                outcomes.append(ReplyRejectedError(detail))
            else:  # e.g. PERMISSION_DENIED: a misconfiguration an operator will fix
                outcomes.append(PeerUnavailableError(detail))
        return outcomes


def _pending(row: asyncpg.Record) -> PendingReply:
    return PendingReply(
        tenant_id=row["tenant_id"],
        idempotency_key=row["idempotency_key"],
        sender=row["sender"],
        recipient=Contact(Channel(row["recipient_channel"]), row["recipient_value"]),
        account_sid=row["account_sid"],
        body=row["body"],
        content_sid=row["content_sid"],
        correlation_id=row["correlation_id"],
    )


class ReplyDispatcher:
    def __init__(
        self,
        pool: asyncpg.Pool,
        sender: ReplySender,
        *,
        batch_size: int = 100,
        calls_in_flight: int = 4,
        poll_interval_s: float = 1.0,
    ) -> None:
        self._pool = pool
        self._sender = sender
        self._batch_size = batch_size
        self._round_size = batch_size * calls_in_flight
        self._poll_interval_s = poll_interval_s
        self._wake = asyncio.Event()

    def wake(self) -> None:
        """Replies were just committed: send them now rather than at the next poll."""
        self._wake.set()

    async def _send(self, replies: Sequence[PendingReply]) -> list[Outcome]:
        try:
            return await self._sender.enqueue_many(replies)
        except PeerUnavailableError as error:
            return [error] * len(replies)

    async def dispatch_once(self) -> tuple[int, int]:
        """Hand one round to the outbox; returns (rows settled, rows left for a retry)."""
        async with self._pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(_CLAIM, self._round_size)
            replies = [_pending(row) for row in rows]
            calls = [
                self._send(replies[start : start + self._batch_size])
                for start in range(0, len(replies), self._batch_size)
            ]
            outcomes = [outcome for answer in await asyncio.gather(*calls) for outcome in answer]
            marked: list[tuple[object, str | None, str | None]] = []
            retries: list[PeerUnavailableError] = []
            for row, outcome in zip(rows, outcomes, strict=True):
                if isinstance(outcome, str):
                    marked.append((row["id"], outcome, None))
                    REPLIES_SENT.labels("enqueued").inc()
                elif isinstance(outcome, ReplyRejectedError):
                    marked.append((row["id"], None, str(outcome)[:500]))
                    REPLIES_SENT.labels("rejected").inc()
                    _log.error(
                        "live_catalog.reply_rejected",
                        extra={"fields": {"key": row["idempotency_key"], "error": str(outcome)}},
                    )
                else:
                    REPLIES_SENT.labels("retry").inc()
                    retries.append(outcome)
            if marked:
                ids, message_ids, failures = zip(*marked, strict=True)
                await conn.execute(_MARK, ids, message_ids, failures)
        if retries:
            _log.warning(
                "live_catalog.reply_retry",
                extra={"fields": {"replies": len(retries), "error": str(retries[0])}},
            )
        return len(marked), len(retries)

    async def report_backlog(self) -> None:
        try:
            row = await self._pool.fetchrow(_BACKLOG)
        except Exception as error:  # metrics must never stop the dispatcher
            _log.warning("live_catalog.backlog_failed", extra={"fields": {"error": str(error)}})
            return
        assert row is not None
        report_queue(BACKLOG_QUEUE, row["depth"], row["oldest_age_s"])

    async def run(self, stop: asyncio.Event) -> None:
        """Send until `stop`; an outbox or database outage is waited out, never fatal."""
        reported_at = -BACKLOG_INTERVAL_S
        while not stop.is_set():
            if time.monotonic() - reported_at >= BACKLOG_INTERVAL_S:
                reported_at = time.monotonic()
                await self.report_backlog()
            self._wake.clear()
            try:
                settled, retry = await self.dispatch_once()
            except Exception as error:
                _log.warning(
                    "live_catalog.dispatch_failed", extra={"fields": {"error": str(error)}}
                )
                settled, retry = 0, 1
            if settled == self._round_size and not retry:
                continue  # more are waiting
            await wait_any(self._wake, stop, timeout_s=self._poll_interval_s)

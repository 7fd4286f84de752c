"""Sending the replies the store queued: each `replies` row is handed to the outbox's Enqueue
with its idempotency key, then marked enqueued.

The row is written in the transaction that decided the reply and sent after it committed, so
a crash before the commit sends nothing and a crash between Enqueue and the mark sends again
with the same key, which the outbox answers with the first message (never a second send).
Several replicas share the rows with FOR UPDATE SKIP LOCKED. An outbox that is down or slow
leaves rows pending for the next round; one that refuses a reply as invalid
(INVALID_ARGUMENT, FAILED_PRECONDITION) has the refusal recorded in `failure`, not retried.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Protocol

import asyncpg
import grpc
from prometheus_client import Counter
from snapsell.outbox.v1 import outbox_pb2, outbox_pb2_grpc

from infra.backlog import report_queue
from infra.events import wait_any
from services.live_catalog.domain import Channel, Contact
from services.live_catalog.events import address

log = logging.getLogger(__name__)

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
_MARK = "UPDATE replies SET enqueued_at = now(), outbox_message_id = $2, failure = $3 WHERE id = $1"


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


class ReplySender(Protocol):
    async def enqueue(self, reply: PendingReply) -> str: ...


class GrpcReplySender:
    """outbox.Enqueue: a text, or the template with the text as its variable "1"."""

    def __init__(self, channel: grpc.aio.Channel, *, deadline_s: float) -> None:
        self._stub = outbox_pb2_grpc.OutboxServiceStub(channel)
        self._deadline_s = deadline_s

    async def enqueue(self, reply: PendingReply) -> str:
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
        try:
            answer = await self._stub.Enqueue(request, timeout=self._deadline_s)
        except grpc.aio.AioRpcError as error:
            detail = f"outbox.Enqueue: {error.code().name}: {error.details() or ''}".strip()
            if error.code() in (
                grpc.StatusCode.INVALID_ARGUMENT,
                grpc.StatusCode.FAILED_PRECONDITION,
            ):
                raise ReplyRejectedError(detail) from None
            raise PeerUnavailableError(detail) from None
        return answer.message_id


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
        poll_interval_s: float = 1.0,
    ) -> None:
        self._pool = pool
        self._sender = sender
        self._batch_size = batch_size
        self._poll_interval_s = poll_interval_s
        self._wake = asyncio.Event()

    def wake(self) -> None:
        """Replies were just committed: send them now rather than at the next poll."""
        self._wake.set()

    async def dispatch_once(self) -> tuple[int, int]:
        """Hand one batch to the outbox; returns (rows settled, rows left for a retry)."""
        async with self._pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(_CLAIM, self._batch_size)
            outcomes = await asyncio.gather(
                *(self._sender.enqueue(_pending(row)) for row in rows), return_exceptions=True
            )
            settled = retry = 0
            for row, outcome in zip(rows, outcomes, strict=True):
                if isinstance(outcome, str):
                    await conn.execute(_MARK, row["id"], outcome, None)
                    REPLIES_SENT.labels("enqueued").inc()
                    settled += 1
                elif isinstance(outcome, ReplyRejectedError):
                    await conn.execute(_MARK, row["id"], None, str(outcome)[:500])
                    REPLIES_SENT.labels("rejected").inc()
                    log.error(
                        "live_catalog.reply_rejected",
                        extra={"fields": {"key": row["idempotency_key"], "error": str(outcome)}},
                    )
                    settled += 1
                else:
                    REPLIES_SENT.labels("retry").inc()
                    log.warning(
                        "live_catalog.reply_retry",
                        extra={"fields": {"key": row["idempotency_key"], "error": str(outcome)}},
                    )
                    retry += 1
        return settled, retry

    async def report_backlog(self) -> None:
        try:
            row = await self._pool.fetchrow(_BACKLOG)
        except Exception as error:  # metrics must never stop the dispatcher
            log.warning("live_catalog.backlog_failed", extra={"fields": {"error": str(error)}})
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
                log.warning("live_catalog.dispatch_failed", extra={"fields": {"error": str(error)}})
                settled, retry = 0, 1
            if settled == self._batch_size and not retry:
                continue  # more are waiting
            await wait_any(self._wake, stop, timeout_s=self._poll_interval_s)

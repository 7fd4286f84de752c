"""NATS JetStream plumbing: connecting, declaring streams and consumers idempotently,
publishing with de-duplication ids and trace context, and a durable pull-consumer loop.

A consumer handler returns a decision — `Ack()`, `Nak(delay_s)` or `Term(reason)` — and the
loop carries it out, so handlers never touch the message's acknowledgement themselves. An
exception escaping a handler is logged and answered with a delayed Nak that grows with the
delivery count. `run_pull_consumer` hands messages over one by one; `run_batch_consumer`
hands over what one fetch brought, for a handler that does one unit of work per batch.
`follow_new_events` is the ephemeral follower of a cache's invalidating events.

Poison messages: an event no delivery can ever handle — larger than `MAX_EVENT_BYTES`, not the
protobuf message its subject promises, or carrying an enum value this build does not know — is
terminated at once and counted in `snapsell_events_rejected_total{consumer,reason}`, so it is
never redelivered and never holds up the messages behind it. Handlers decode with `decode`,
which raises `RejectedEventError`; the loop turns that into the Term and the count.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import ssl
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple, TypeVar

import nats
import nats.js.errors
from google.protobuf.message import DecodeError
from google.protobuf.message import Message as ProtoMessage
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api
from nats.js.errors import BadRequestError
from prometheus_client import Counter

from infra import telemetry
from infra.backlog import QUEUE_DEPTH, InFlight
from infra.config import ConfigError, env_optional, url_list
from infra.log import get_logger
from infra.nats_users import INBOX_ROOT

_log = get_logger(__name__)

MSG_ID = "Nats-Msg-Id"

# The largest event a stream stores and a consumer handles. Every stream refuses a larger
# publish (its max_msg_size); the consumer loop terminates one that got in before the limit.
# Far above any real event (a gateway message with the default 64 KiB body limit), far below
# NATS's 1 MiB max_payload.
MAX_EVENT_BYTES = 256 * 1024

RejectReason = Literal["too_large", "undecodable", "unknown_enum"]

EVENTS_REJECTED = Counter(
    "snapsell_events_rejected_total",
    "Consumed events terminated as poison (too large, undecodable, unknown enum value)",
    ["consumer", "reason"],
)


@dataclass(frozen=True)
class NatsCredentials:
    """This process's NATS identity (`NATS_USER` / `NATS_PASSWORD`, see infra/nats_users.py)
    and the CA that signs the server's certificate (`NATS_TLS_CA_FILE`, for `tls://` URLs
    whose server certificate is not signed by a public CA)."""

    user: str | None = None
    password: str | None = None
    tls_ca_file: str | None = None

    @classmethod
    def from_env(cls) -> NatsCredentials:
        user, password = env_optional("NATS_USER"), env_optional("NATS_PASSWORD")
        if (user is None) != (password is None):
            raise ConfigError("NATS_USER and NATS_PASSWORD are set together or not at all")
        ca_file = env_optional("NATS_TLS_CA_FILE")
        if ca_file is not None and not Path(ca_file).is_file():
            raise ConfigError(f"NATS_TLS_CA_FILE: {ca_file} is not a readable file")
        return cls(user, password, ca_file)

    def options(self) -> dict[str, Any]:
        options: dict[str, Any] = {}
        if self.user is not None:
            # Replies and deliveries come to the user's own inbox prefix, the only subjects
            # its permissions let it subscribe to.
            options |= {
                "user": self.user,
                "password": self.password,
                "inbox_prefix": f"{INBOX_ROOT}.{self.user}",
            }
        if self.tls_ca_file is not None:
            options["tls"] = ssl.create_default_context(cafile=self.tls_ca_file)
        return options


async def connect(
    url: str,
    name: str,
    *,
    connect_timeout_s: float = 2.0,
    credentials: NatsCredentials | None = None,
) -> NatsClient:
    """Connect, retrying the first connection for up to ~30 s, then reconnect forever. `url`
    may list a cluster's servers, separated by commas: the client connects to one and moves to
    another when it fails (the servers do not advertise each other to clients). The
    credentials default to the environment's (`NatsCredentials.from_env`); without a user,
    those in the URL (`nats://user:password@host`) are used, if any."""
    options = (credentials or NatsCredentials.from_env()).options()
    attempts = 0
    while True:
        try:
            return await nats.connect(
                url_list(url),
                name=name,
                connect_timeout=connect_timeout_s,
                reconnect_time_wait=0.5,
                max_reconnect_attempts=-1,
                allow_reconnect=True,
                **options,
            )
        except (OSError, nats.errors.NoServersError, TimeoutError):
            attempts += 1
            if attempts >= 30:
                raise
            await asyncio.sleep(1.0)


@dataclass(frozen=True)
class StreamSpec:
    name: str
    subjects: tuple[str, ...]
    duplicate_window_s: float = 600.0
    max_age_s: float = 7 * 24 * 3600.0
    replicas: int = 1
    max_msg_size: int = MAX_EVENT_BYTES

    def config(self) -> api.StreamConfig:
        return api.StreamConfig(
            name=self.name,
            subjects=list(self.subjects),
            retention=api.RetentionPolicy.LIMITS,
            storage=api.StorageType.FILE,
            num_replicas=self.replicas,
            duplicate_window=self.duplicate_window_s,
            max_age=self.max_age_s,
            max_msg_size=self.max_msg_size,
        )


async def ensure_stream(js: JetStreamContext, spec: StreamSpec) -> None:
    """Create the stream, or bring an existing one to this configuration."""
    config = spec.config()
    try:
        await js.add_stream(config)
    except BadRequestError as exc:
        # 10058: the name is taken with a different configuration.
        if exc.err_code != 10058:
            raise
        await js.update_stream(config)


async def publish(
    js: JetStreamContext,
    subject: str,
    data: bytes,
    *,
    msg_id: str,
    ack_timeout_s: float = 2.0,
    headers: dict[str, str] | None = None,
) -> api.PubAck:
    """Publish and wait for the stream's acknowledgement. JetStream drops a second message
    with the same `msg_id` inside the stream's duplicate window (the ack says `duplicate`)."""
    all_headers = {MSG_ID: msg_id, **(headers or {})}
    telemetry.inject(all_headers)
    return await js.publish(subject, data, timeout=ack_timeout_s, headers=all_headers)


class Outgoing(NamedTuple):
    """One message of `AckedPublisher.publish_batch`; `headers` beside the de-duplication id."""

    subject: str
    data: bytes
    msg_id: str
    headers: dict[str, str] | None = None


class AckedPublisher:
    """Publishes to JetStream and awaits each PubAck through one wildcard reply subscription.

    The same exchange as `publish` (a request whose reply is the stream's acknowledgement) with
    less work per message, for a process that publishes on every request it serves: a counter
    instead of a NUID per reply subject, one timer instead of `asyncio.wait_for`, and the ack
    decoded only when it reports an error. Raises what `publish` raises: `nats.errors.
    TimeoutError`, `nats.js.errors.NoStreamResponseError` (no stream holds the subject),
    `nats.js.errors.APIError` (the stream refused the message), connection errors."""

    def __init__(self, nc: NatsClient) -> None:
        self._nc = nc
        self._prefix = ""
        self._tokens = itertools.count()
        self._waiting: dict[str, asyncio.Future[Msg]] = {}

    async def start(self) -> None:
        # The subscription survives reconnections: nats-py subscribes again on the new server.
        self._prefix = self._nc.new_inbox() + "."
        await self._nc.subscribe(self._prefix + "*", cb=self._on_reply)

    async def _on_reply(self, msg: Msg) -> None:
        future = self._waiting.pop(msg.subject[len(self._prefix) :], None)
        if future is not None and not future.done():
            future.set_result(msg)

    async def publish(
        self,
        subject: str,
        data: bytes,
        *,
        msg_id: str,
        ack_timeout_s: float = 2.0,
        headers: dict[str, str] | None = None,
    ) -> None:
        """Publish and wait for the stream's acknowledgement (a duplicate counts as stored)."""
        assert self._prefix, "start() first"
        all_headers = {MSG_ID: msg_id, **(headers or {})}
        if "traceparent" not in all_headers:  # a relayed event carries its own
            telemetry.inject(all_headers)
        token = str(next(self._tokens))
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Msg] = loop.create_future()
        self._waiting[token] = future
        timer = loop.call_later(ack_timeout_s, _time_out, (future,))
        try:
            await self._nc.publish(subject, data, reply=self._prefix + token, headers=all_headers)
            _check_ack(await future)
        finally:
            timer.cancel()
            self._waiting.pop(token, None)

    async def publish_batch(
        self, messages: Sequence[Outgoing], *, ack_timeout_s: float = 2.0
    ) -> None:
        """Publish every message, then wait until the stream acknowledged them all, with one
        timer for the batch and no task per message. Messages carry their own trace context
        (none is added); the first failure in the batch's order is raised. `publish` does the
        same for one message without the batch's lists: it runs on every webhook, and going
        through here would cost it ~1.5 µs more."""
        assert self._prefix, "start() first"
        loop = asyncio.get_running_loop()
        tokens: list[str] = []
        futures: list[asyncio.Future[Msg]] = []
        timer = loop.call_later(ack_timeout_s, _time_out, futures)  # sees those added below
        try:
            for message in messages:
                token = str(next(self._tokens))
                future: asyncio.Future[Msg] = loop.create_future()
                self._waiting[token] = future
                tokens.append(token)
                futures.append(future)
                headers = {MSG_ID: message.msg_id, **(message.headers or {})}
                await self._nc.publish(
                    message.subject, message.data, reply=self._prefix + token, headers=headers
                )
            for future in futures:
                _check_ack(await future)
        finally:
            timer.cancel()
            for token in tokens:
                self._waiting.pop(token, None)
            for future in futures:
                if not future.done():
                    future.cancel()
                elif not future.cancelled():
                    future.exception()  # seen: asyncio would log it as never retrieved


def _check_ack(reply: Msg) -> None:
    if not reply.data:  # a status message: 503 when no stream listens on the subject
        raise nats.js.errors.NoStreamResponseError
    if b'"error"' in reply.data:
        answer = json.loads(reply.data)
        if "error" in answer:
            raise nats.js.errors.APIError.from_error(answer["error"])


def _time_out(futures: Iterable[asyncio.Future[Msg]]) -> None:
    for future in futures:
        if not future.done():
            future.set_exception(nats.errors.TimeoutError())


@dataclass(frozen=True)
class Ack:
    pass


@dataclass(frozen=True)
class Nak:
    delay_s: float = 1.0


@dataclass(frozen=True)
class Term:
    reason: str


Decision = Ack | Nak | Term
Handler = Callable[[Msg], Awaitable[Decision]]
BatchHandler = Callable[[Sequence[Msg]], Awaitable[Sequence[Decision]]]
M = TypeVar("M", bound=ProtoMessage)


class RejectedEventError(Exception):
    """An event no delivery can ever handle; `run_pull_consumer` terminates and counts it."""

    def __init__(self, reason: RejectReason, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason: RejectReason = reason


def decode(message_type: type[M], data: bytes) -> M:
    """`data` as a `message_type`, or RejectedEventError: not that message, or an enum field
    (at any depth) holding a value this build does not know."""
    try:
        message = message_type.FromString(data)
    except DecodeError as error:
        raise RejectedEventError(
            "undecodable", f"not a {message_type.DESCRIPTOR.full_name}: {error}"
        ) from error
    unknown = _unknown_enum_field(message)
    if unknown is not None:
        raise RejectedEventError("unknown_enum", f"{unknown} holds an unknown value")
    return message


def _unknown_enum_field(message: ProtoMessage) -> str | None:
    for field, value in message.ListFields():
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            value_field = field.message_type.fields_by_name["value"]
            values = list(value.values())
            field = value_field
        else:
            values = list(value) if field.is_repeated else [value]
        for item in values:
            if field.enum_type is not None and item not in field.enum_type.values_by_number:
                return field.full_name
            if field.message_type is not None:
                inner = _unknown_enum_field(item)
                if inner is not None:
                    return inner
    return None


def count_rejected(consumer: str, error: RejectedEventError) -> None:
    """Count a poison event; for a consumer that terminates it outside `run_pull_consumer`."""
    EVENTS_REJECTED.labels(consumer, error.reason).inc()
    _log.error(
        "jetstream.event_rejected",
        extra={"fields": {"consumer": consumer, "reason": error.reason, "error": str(error)}},
    )


@dataclass(frozen=True)
class ConsumerSpec:
    stream: str
    durable: str
    filter_subject: str
    ack_wait_s: float = 30.0
    max_deliver: int = 20
    max_ack_pending: int = 1000

    @property
    def queue(self) -> str:
        """Its name in the backlog metrics (infra.backlog)."""
        return f"{self.stream}/{self.durable}"

    def config(self) -> api.ConsumerConfig:
        return api.ConsumerConfig(
            durable_name=self.durable,
            ack_policy=api.AckPolicy.EXPLICIT,
            deliver_policy=api.DeliverPolicy.ALL,
            filter_subject=self.filter_subject,
            ack_wait=self.ack_wait_s,
            max_deliver=self.max_deliver,
            max_ack_pending=self.max_ack_pending,
        )


def is_last_delivery(msg: Msg, spec: ConsumerSpec) -> bool:
    return msg.metadata.num_delivered >= spec.max_deliver


async def ensure_consumer(js: JetStreamContext, spec: ConsumerSpec) -> None:
    """Create the durable consumer; the server updates an existing one in place."""
    await js.add_consumer(spec.stream, spec.config())


def failure_delay(num_delivered: int, *, cap_s: float = 30.0) -> float:
    return min(cap_s, 0.5 * 2.0 ** max(0, num_delivered - 1))


async def follow_new_events(
    js: JetStreamContext,
    subject: str,
    on_event: Callable[[Msg], Awaitable[None]],
    on_gap: Callable[[], None],
    stop: asyncio.Event,
    *,
    retry_s: float = 2.0,
) -> None:
    """Hand every new event on `subject` to `on_event` until `stop` is set (an ephemeral ordered
    consumer that sees only what is published once it is subscribed). When the subscription
    fails, `on_gap()` is called (events may be missed until it is back: a cache drops what it
    kept) and it subscribes again after `retry_s`."""
    while not stop.is_set():
        try:
            subscription = await js.subscribe(
                subject, ordered_consumer=True, deliver_policy=api.DeliverPolicy.NEW, cb=on_event
            )
            try:
                await stop.wait()
            finally:
                await subscription.unsubscribe()
        except Exception as error:
            fields = {"subject": subject, "error": str(error)}
            _log.warning("jetstream.follow_failed", extra={"fields": fields})
            on_gap()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=retry_s)


async def run_pull_consumer(
    js: JetStreamContext,
    spec: ConsumerSpec,
    handler: Handler,
    *,
    stop: asyncio.Event,
    concurrency: int = 16,
    fetch_timeout_s: float = 1.0,
) -> None:
    """Fetch and handle messages until `stop` is set, with at most `concurrency` in flight.
    In-flight handlers finish (and ack) before this returns. The consumer's backlog is
    exported meanwhile (infra.backlog)."""

    async def handle(msgs: Sequence[Msg]) -> None:
        for msg in msgs:
            await _settle(msg, await _decide(handler, msg, spec.durable))

    await _run_fetch_loop(
        js,
        spec,
        handle,
        stop=stop,
        fetch_size=lambda running: concurrency - running,
        fetch_timeout_s=fetch_timeout_s,
        one_task_per_message=True,
    )


async def run_batch_consumer(
    js: JetStreamContext,
    spec: ConsumerSpec,
    handler: BatchHandler,
    *,
    stop: asyncio.Event,
    batch_size: int,
    batches_in_flight: int = 2,
    fetch_timeout_s: float = 1.0,
    linger_s: float = 0.0,
) -> None:
    """Fetch and handle messages until `stop` is set, each fetch's messages (at most
    `batch_size`: those available, no waiting for more) as one batch, with at most
    `batches_in_flight` batches being handled. The handler returns one decision per message,
    in order. In-flight batches finish (and ack) before this returns. After a fetch that
    came back short of `batch_size`, the next one waits `linger_s`: at a moderate rate the
    messages of those few ms then make one batch instead of one batch each (the first
    message after a quiet spell is never delayed)."""

    async def handle(msgs: Sequence[Msg]) -> None:
        try:
            decisions = await handler(msgs)
        except Exception:
            _log.exception("jetstream.handler_failed", extra={"fields": {"subject": spec.durable}})
            decisions = [Nak(failure_delay(msg.metadata.num_delivered)) for msg in msgs]
        for msg, decision in zip(msgs, decisions, strict=True):
            await _settle(msg, decision)

    await _run_fetch_loop(
        js,
        spec,
        handle,
        stop=stop,
        fetch_size=lambda running: batch_size if running < batches_in_flight else 0,
        fetch_timeout_s=fetch_timeout_s,
        one_task_per_message=False,
        linger_s=linger_s,
    )


async def _run_fetch_loop(
    js: JetStreamContext,
    spec: ConsumerSpec,
    handle: Callable[[Sequence[Msg]], Coroutine[Any, Any, None]],
    *,
    stop: asyncio.Event,
    fetch_size: Callable[[int], int],
    fetch_timeout_s: float,
    one_task_per_message: bool,
    linger_s: float = 0.0,
) -> None:
    """Fetch while `fetch_size(tasks running)` is positive, else wait for a task to end; each
    fetch's messages are handled by one task, or one task each. Meanwhile the consumer's
    backlog is exported: its depth as the server counts it, the age of the oldest message held."""
    await ensure_consumer(js, spec)
    subscription = await js.pull_subscribe_bind(spec.durable, stream=spec.stream)
    running: set[asyncio.Task[None]] = set()
    in_flight = InFlight(spec.queue)
    depth = asyncio.create_task(_report_depth(js, spec), name=f"{spec.queue} depth")

    async def hold(msgs: Sequence[Msg]) -> None:
        with in_flight.holding(min(msg.metadata.timestamp.timestamp() for msg in msgs)):
            await handle(msgs)

    try:
        while not stop.is_set():
            size = fetch_size(len(running))
            # Below zero too: a fetch may return more than it asked for (nats-py hands over
            # whatever its queue holds, e.g. answers to an earlier pull that arrived late
            # after a reconnect), and a fetch of less than one message raises ValueError.
            if size <= 0:
                await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                continue
            try:
                msgs = await subscription.fetch(size, timeout=fetch_timeout_s)
            except (TimeoutError, nats.errors.TimeoutError):
                continue
            except (nats.errors.Error, nats.js.errors.Error) as exc:
                # NATS restarting, the consumer briefly missing: wait and fetch again.
                _log.warning("jetstream.fetch_failed", extra={"fields": {"error": str(exc)}})
                await asyncio.sleep(fetch_timeout_s)
                continue
            if not msgs:  # a fetch may come back empty (e.g. while the cluster elects a leader)
                continue
            for work in [[msg] for msg in msgs] if one_task_per_message else [msgs]:
                task = asyncio.create_task(hold(work))
                running.add(task)
                task.add_done_callback(running.discard)
            if linger_s and len(msgs) < size:
                await asyncio.sleep(linger_s)
    finally:
        depth.cancel()
        if running:
            await asyncio.gather(*running, return_exceptions=True)
        await subscription.unsubscribe()


async def _report_depth(js: JetStreamContext, spec: ConsumerSpec, every_s: float = 5.0) -> None:
    """The consumer's backlog as the server counts it (delivered or not, unacknowledged),
    until cancelled; the age is its in-flight tracker's (see run_pull_consumer)."""
    queue = spec.queue
    while True:
        try:
            info = await js.consumer_info(spec.stream, spec.durable)
        except Exception as error:  # metrics must never stop the consumer
            _log.debug("jetstream.consumer_info_failed", extra={"fields": {"error": str(error)}})
        else:
            depth = (info.num_pending or 0) + (info.num_ack_pending or 0)
            QUEUE_DEPTH.labels(queue).set(depth)
        await asyncio.sleep(every_s)


async def _decide(handler: Handler, msg: Msg, consumer: str) -> Decision:
    try:
        if len(msg.data) > MAX_EVENT_BYTES:
            raise RejectedEventError("too_large", f"{len(msg.data)} bytes on {msg.subject}")
        return await handler(msg)
    except RejectedEventError as error:
        count_rejected(consumer, error)
        return Term(error.reason)
    except Exception:
        _log.exception("jetstream.handler_failed", extra={"fields": {"subject": msg.subject}})
        return Nak(failure_delay(msg.metadata.num_delivered))


async def _settle(msg: Msg, decision: Decision) -> None:
    try:
        if isinstance(decision, Ack):
            await msg.ack()
        elif isinstance(decision, Nak):
            await msg.nak(delay=decision.delay_s)
        else:
            await msg.term()
    except Exception as exc:
        # Unacknowledged messages are redelivered after AckWait; handlers are idempotent.
        _log.warning("jetstream.settle_failed", extra={"fields": {"error": str(exc)}})

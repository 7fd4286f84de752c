"""What really reached a JetStream stream: every stored message's `Nats-Msg-Id`, read back.

The gateway publishes each webhook with `Nats-Msg-Id = MessageSid`, so reading the ids of the
INBOUND stream tells which MessageSids were handed over, and how many times. An ordered
consumer with `headers_only` reads them without the payloads and without acks.
"""

from __future__ import annotations

import nats

from infra.jetstream import MSG_ID

_READ_TIMEOUT_S = 10.0


async def stored_message_ids(nats_url: str, stream: str, subjects: str) -> list[str | None]:
    """The `Nats-Msg-Id` of every message in `stream` (None where a message has none)."""
    client = await nats.connect(nats_url, name="bench-stream-check")
    try:
        js = client.jetstream()
        info = await js.stream_info(stream)
        total = info.state.messages
        ids: list[str | None] = []
        if total == 0:
            return ids
        sub = await js.subscribe(subjects, stream=stream, ordered_consumer=True, headers_only=True)
        try:
            while len(ids) < total:
                msg = await sub.next_msg(timeout=_READ_TIMEOUT_S)
                ids.append((msg.headers or {}).get(MSG_ID))
        finally:
            await sub.unsubscribe()
        return ids
    finally:
        await client.close()

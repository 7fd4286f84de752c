"""Waiting for a JetStream consumer to have settled everything published to it."""

from __future__ import annotations

from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from tests.support.polling import eventually


async def wait_settled(
    js: JetStreamContext, stream: str, durable: str, subject: str, *, timeout_s: float = 20.0
) -> None:
    """Until the consumer (created by a loop that may not have started yet) acked or terminated
    every message on `subject` so far. Its ack floor is compared with the subject's last
    sequence: the consumer's pending count can still read 0 for a moment after a publish was
    acknowledged, before the consumer has seen it."""
    last = (await js.get_last_msg(stream, subject)).seq

    async def settled() -> bool:
        try:
            info = await js.consumer_info(stream, durable)
        except NotFoundError:  # the consumer loop has not created it yet
            return False
        return info.ack_floor.stream_seq >= last and info.num_ack_pending == 0

    await eventually(settled, f"{durable} settled", timeout_s=timeout_s, every_s=0.05)

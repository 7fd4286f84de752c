"""Settling an unknown outcome from Twilio's own record (pure): which listed Twilio message,
if any, an unconfirmed attempt created. See `send.py` for when this runs and what the
pipeline does with the answer."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

from services.outbox.domain import is_messaging_service_sid


@dataclass(frozen=True, slots=True)
class TwilioMessageView:
    """The fields of a Twilio Message resource that reconciliation compares."""

    sid: str
    to: str
    from_: str | None
    messaging_service_sid: str | None
    body: str
    date_created: datetime | None


@dataclass(frozen=True, slots=True)
class ExpectedSend:
    """What our unconfirmed attempt(s) would have created at Twilio."""

    to: str
    sender: str
    # None for templates: Twilio lists the rendered text, which we never saw.
    body: str | None
    # The start of the earliest unconfirmed attempt.
    since: datetime


def sender_matches(candidate: TwilioMessageView, sender: str) -> bool:
    if is_messaging_service_sid(sender):
        return candidate.messaging_service_sid == sender
    return candidate.from_ == sender


def find_reconciled_send(
    candidates: Iterable[TwilioMessageView],
    expected: ExpectedSend,
    *,
    taken_sids: frozenset[str],
    clock_skew: timedelta,
) -> TwilioMessageView | None:
    """The Twilio message our unconfirmed attempt created, or None if there is none.

    Twilio has no client reference field, so the match is on what we sent: same recipient,
    same sender, same body (free-form), created no earlier than the attempt began (less the
    allowed clock skew), and not already recorded for another outbox message. Among several
    matches (identical messages whose outcomes are all unknown) the oldest is adopted; they
    are indistinguishable to the recipient, and the unique SID constraint gives each Twilio
    message to at most one outbox message. The caller must not reconcile while another
    identical message is mid-send (its SID is not recorded yet)."""
    earliest = expected.since - clock_skew
    matches = [
        c
        for c in candidates
        if c.sid not in taken_sids
        and c.to == expected.to
        and sender_matches(c, expected.sender)
        and (expected.body is None or c.body == expected.body)
        and (c.date_created is None or c.date_created >= earliest)
    ]
    if not matches:
        return None
    return min(matches, key=lambda c: (c.date_created or expected.since, c.sid))

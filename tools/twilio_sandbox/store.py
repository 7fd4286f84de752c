"""In-memory record of accepted messages, their Twilio JSON shape, listing filters and counters."""

from __future__ import annotations

import calendar
import email.utils
import os
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

API_VERSION = "2010-04-01"

# GSM 03.38 basic character set (plus the escaped extension set, counted as one character
# here); a body outside it is sent as UCS-2 with shorter segments.
_GSM7 = frozenset(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà^{}\\[~]|€"
)


def count_segments(body: str) -> int:
    if not body:
        return 1
    single, multi = (160, 153) if _GSM7.issuperset(body) else (70, 67)
    return 1 if len(body) <= single else -(-len(body) // multi)


def rfc2822(moment: datetime) -> str:
    return email.utils.format_datetime(moment)


def new_message_sid() -> str:
    return "SM" + os.urandom(16).hex()


@dataclass(slots=True)
class SentMessage:
    sid: str
    account_sid: str
    to: str
    from_: str | None
    body: str
    messaging_service_sid: str | None
    content_sid: str | None
    content_variables: str | None
    status_callback: str | None
    created_at: datetime
    status: str = "queued"
    error_code: int | None = None
    updated_at: datetime | None = None
    sent_epoch_s: int = field(init=False)

    def __post_init__(self) -> None:
        self.sent_epoch_s = calendar.timegm(self.created_at.utctimetuple())

    def uri(self) -> str:
        return f"/{API_VERSION}/Accounts/{self.account_sid}/Messages/{self.sid}.json"

    def to_twilio_json(self) -> dict[str, Any]:
        created = rfc2822(self.created_at)
        uri = self.uri()
        return {
            "account_sid": self.account_sid,
            "api_version": API_VERSION,
            "body": self.body,
            # The sandbox hands every accepted message over at once: sent date = creation date.
            "date_created": created,
            "date_sent": created,
            "date_updated": rfc2822(self.updated_at) if self.updated_at else created,
            "direction": "outbound-api",
            "error_code": self.error_code,
            "error_message": None,
            "from": self.from_,
            "messaging_service_sid": self.messaging_service_sid,
            "num_media": "0",
            "num_segments": str(count_segments(self.body)),
            "price": None,
            "price_unit": "USD",
            "sid": self.sid,
            "status": self.status,
            "subresource_uris": {"media": uri[: -len(".json")] + "/Media.json"},
            "to": self.to,
            "uri": uri,
        }

    def to_sandbox_json(self) -> dict[str, Any]:
        """Twilio's shape plus the request fields Twilio does not echo back."""
        data = self.to_twilio_json()
        data["content_sid"] = self.content_sid
        data["content_variables"] = self.content_variables
        data["status_callback"] = self.status_callback
        return data


@dataclass(slots=True)
class SandboxStats:
    accepted: int = 0
    timeouts_after_accept: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    accepted_by_to: Counter[str] = field(default_factory=Counter)
    callbacks_sent: int = 0
    callbacks_failed: int = 0

    def clear(self) -> None:
        self.accepted = self.timeouts_after_accept = 0
        self.callbacks_sent = self.callbacks_failed = 0
        self.rejected.clear()
        self.accepted_by_to.clear()

    def to_json(self) -> dict[str, Any]:
        return {
            "accepted": self.accepted,
            "timeouts_after_accept": self.timeouts_after_accept,
            "rejected": sum(self.rejected.values()),
            "rejected_by_fault": dict(self.rejected),
            "accepted_by_to": dict(self.accepted_by_to),
            "callbacks": {"sent": self.callbacks_sent, "failed": self.callbacks_failed},
        }


@dataclass(frozen=True, slots=True)
class DateSentFilter:
    """Twilio's `DateSent`, `DateSent>` (on or after) and `DateSent<` (on or before) filters."""

    on: tuple[int, int] | None = None
    after: int | None = None
    before: int | None = None

    @classmethod
    def parse(cls, on: str | None, after: str | None, before: str | None) -> DateSentFilter:
        return cls(
            on=_day_or_second(on) if on else None,
            after=_day_or_second(after)[0] if after else None,
            before=_day_or_second(before)[1] if before else None,
        )

    def matches(self, epoch_s: int) -> bool:
        if self.after is not None and epoch_s < self.after:
            return False
        if self.before is not None and epoch_s > self.before:
            return False
        return self.on is None or self.on[0] <= epoch_s <= self.on[1]


def _day_or_second(value: str) -> tuple[int, int]:
    """The inclusive span in epoch seconds a date (`YYYY-MM-DD`) or a datetime stands for."""
    text = value.strip()
    if len(text) == 10:
        start = calendar.timegm(time.strptime(text, "%Y-%m-%d"))
        return start, start + 86_399
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    second = calendar.timegm(moment.utctimetuple())
    return second, second


class MessageStore:
    """Accepted messages in arrival order; listings are newest first, as Twilio's are."""

    def __init__(self) -> None:
        self._messages: list[SentMessage] = []
        self._by_sid: dict[str, tuple[int, SentMessage]] = {}

    def __len__(self) -> int:
        return len(self._messages)

    def add(self, message: SentMessage) -> None:
        self._by_sid[message.sid] = (len(self._messages), message)
        self._messages.append(message)

    def get(self, sid: str) -> SentMessage | None:
        entry = self._by_sid.get(sid)
        return entry[1] if entry else None

    def all(self) -> list[SentMessage]:
        return list(self._messages)

    def clear(self) -> None:
        self._messages.clear()
        self._by_sid.clear()

    def page(
        self,
        account_sid: str,
        *,
        to: str | None,
        from_: str | None,
        dates: DateSentFilter,
        page_size: int,
        after_sid: str | None,
    ) -> tuple[list[SentMessage], bool]:
        """One page of matches older than `after_sid` (the page token), and whether more remain."""
        start = len(self._messages) - 1
        if after_sid is not None:
            entry = self._by_sid.get(after_sid)
            start = entry[0] - 1 if entry else -1
        found: list[SentMessage] = []
        for message in self._newest_first(start):
            if (
                message.account_sid == account_sid
                and (to is None or message.to == to)
                and (from_ is None or message.from_ == from_)
                and dates.matches(message.sent_epoch_s)
            ):
                if len(found) == page_size:
                    return found, True
                found.append(message)
        return found, False

    def _newest_first(self, start: int) -> Iterator[SentMessage]:
        for index in range(start, -1, -1):
            yield self._messages[index]

"""Twilio for the sending pipeline: one send, classified into the domain's results, and the
recent messages to one recipient that reconciliation compares against.

Every answer becomes a `SendAccepted` or a `SendFailure`; no exception escapes `send`.
Anything that is not a clear answer -- a timeout after the request left, a dropped connection,
an unreadable success body -- is OUTCOME_UNKNOWN, never retryable: Twilio may hold the message.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any

from twilio.base.exceptions import TwilioException, TwilioRestException
from twilio.rest import Client

from infra.twilio_http import (
    TwilioOutcomeUnknownError,
    TwilioUnreachableError,
    capture_twilio_response,
    retry_after_s,
)
from services.outbox.domain import (
    ClaimedMessage,
    ErrorClass,
    SendAccepted,
    SendFailure,
    SendResult,
    classify_http_error,
    is_messaging_service_sid,
)
from services.outbox.sending.reconcile import TwilioMessageView

STATUS_CALLBACK_PATH = "/webhooks/twilio/status"
_LIST_PAGE_SIZE = 50
# Reconciliation looks this many pages back at most (newest first); a busy recipient with
# more messages than that since the attempt is settled as "unknown" and retried later.
_MAX_LIST_PAGES = 20


class ReconciliationError(Exception):
    """Twilio's message list could not be read; the outcome stays unknown."""


def status_callback_url(public_base_url: str) -> str:
    return public_base_url.rstrip("/") + STATUS_CALLBACK_PATH


def _one_line(text: object) -> str:
    return " ".join(str(text).split())[:300]


class TwilioSender:
    """Sends through the official client of the message's Twilio account."""

    def __init__(self, clients: Mapping[str, Client], status_callback: str | None) -> None:
        self._clients = dict(clients)
        self._status_callback = status_callback

    @property
    def account_sids(self) -> frozenset[str]:
        return frozenset(self._clients)

    def warm_up(self) -> None:
        """Load the SDK's lazily imported API modules now (about a second of imports) rather
        than on the first send."""
        for client in self._clients.values():
            _ = client.messages

    async def send(self, message: ClaimedMessage) -> SendResult:
        client = self._clients.get(message.account_sid)
        if client is None:
            # Configuration changed since enqueue: wait for an operator, do not drop it.
            return SendFailure(ErrorClass.RETRYABLE, f"no credentials for {message.account_sid}")
        with capture_twilio_response() as captured:
            try:
                created = await client.messages.create_async(**self._create_params(message))
            except TwilioRestException as error:
                wait = retry_after_s(captured.response) if error.status == 429 else None
                return SendFailure(
                    classify_http_error(error.status, error.code),
                    _one_line(error.msg),
                    http_status=error.status,
                    error_code=error.code,
                    retry_after_s=wait,
                )
            except TwilioUnreachableError as error:
                return SendFailure(ErrorClass.RETRYABLE, _one_line(error))
            except TwilioOutcomeUnknownError as error:
                return SendFailure(ErrorClass.OUTCOME_UNKNOWN, _one_line(error))
            except Exception as error:  # e.g. a 2xx whose body could not be parsed
                return SendFailure(
                    ErrorClass.OUTCOME_UNKNOWN, _one_line(f"{type(error).__name__}: {error}")
                )
        response = captured.response
        if not created.sid:
            return SendFailure(ErrorClass.OUTCOME_UNKNOWN, "Twilio answered without a SID")
        return SendAccepted(
            twilio_sid=created.sid,
            twilio_status=str(created.status or "queued"),
            http_status=response.status_code if response is not None else 201,
        )

    def _create_params(self, message: ClaimedMessage) -> dict[str, Any]:
        params: dict[str, Any] = {"to": message.to}
        if is_messaging_service_sid(message.sender):
            params["messaging_service_sid"] = message.sender
        else:
            params["from_"] = message.sender
        if message.content_sid is not None:
            params["content_sid"] = message.content_sid
            if message.content_variables:
                params["content_variables"] = message.content_variables
        else:
            params["body"] = message.body
        if self._status_callback:
            params["status_callback"] = self._status_callback
        return params

    async def recent_messages(
        self, message: ClaimedMessage, since: datetime, clock_skew: timedelta
    ) -> list[TwilioMessageView]:
        """Messages to the recipient from the message's sender created since `since` (less the
        skew), newest first. No date filter is sent: Twilio filters on the *sent* date, which
        a message still queued at Twilio does not have yet."""
        client = self._clients.get(message.account_sid)
        if client is None:
            raise ReconciliationError(f"no credentials for {message.account_sid}")
        from_filter = None if is_messaging_service_sid(message.sender) else message.sender
        earliest = since - clock_skew
        views: list[TwilioMessageView] = []
        try:
            page = await client.messages.page_async(
                to=message.to,
                **({"from_": from_filter} if from_filter else {}),
                page_size=_LIST_PAGE_SIZE,
            )
            for _ in range(_MAX_LIST_PAGES):
                older_seen = False
                for record in page:
                    created = record.date_created
                    if created is not None and created < earliest:
                        older_seen = True
                        continue
                    views.append(_view(record))
                if older_seen:
                    return views
                page = await page.next_page_async()
                if page is None:
                    return views
        except (TwilioException, ValueError) as error:  # HTTP error, transport, bad JSON
            raise ReconciliationError(_one_line(error)) from error
        raise ReconciliationError("too many recent messages to this recipient to compare")

    async def close(self) -> None:
        for client in self._clients.values():
            http = client.http_client
            close = getattr(http, "close", None)
            if close is not None:
                await close()


def _view(record: Any) -> TwilioMessageView:
    return TwilioMessageView(
        sid=str(record.sid),
        to=str(record.to or ""),
        from_=record.from_,
        messaging_service_sid=record.messaging_service_sid,
        body=str(record.body or ""),
        date_created=record.date_created,
    )

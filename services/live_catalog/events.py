"""The live_catalog contract's messages built from domain values: the API's `Item`,
`Reservation` and `SessionSummary`, and the events this service records."""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING

from google.protobuf.duration_pb2 import Duration
from snapsell.common.v1 import address_pb2
from snapsell.live_catalog.v1 import events_pb2, live_catalog_pb2

from infra.convert import channel_maps, timestamp
from services.live_catalog.domain import (
    Channel,
    Contact,
    Item,
    ItemStatus,
    ReleaseReason,
    Reservation,
    ReservationStatus,
    SessionTotals,
)

if TYPE_CHECKING:
    from services.live_catalog.store import Summarized

ITEM_POSTED = "live_catalog.v1.item.posted"
ITEM_UPDATED = "live_catalog.v1.item.updated"
ITEM_SOLD_OUT = "live_catalog.v1.item.sold_out"
ITEM_CLOSED = "live_catalog.v1.item.closed"
RESERVATION_HELD = "live_catalog.v1.reservation.held"
RESERVATION_CONFIRMED = "live_catalog.v1.reservation.confirmed"
RESERVATION_RELEASED = "live_catalog.v1.reservation.released"
RESERVATION_PROMOTED = "live_catalog.v1.reservation.promoted"
WAITLIST_JOINED = "live_catalog.v1.waitlist.joined"
SESSION_SUMMARIZED = "live_catalog.v1.session.summarized"

CHANNEL_TO_PROTO, CHANNEL_FROM_PROTO = channel_maps(Channel)
ITEM_STATUS_TO_PROTO = {
    ItemStatus.OPEN: live_catalog_pb2.ITEM_STATUS_OPEN,
    ItemStatus.CLOSED: live_catalog_pb2.ITEM_STATUS_CLOSED,
}
RESERVATION_STATUS_TO_PROTO = {
    ReservationStatus.HELD: live_catalog_pb2.RESERVATION_STATUS_HELD,
    ReservationStatus.WAITING: live_catalog_pb2.RESERVATION_STATUS_WAITING,
    ReservationStatus.CONFIRMED: live_catalog_pb2.RESERVATION_STATUS_CONFIRMED,
    ReservationStatus.RELEASED: live_catalog_pb2.RESERVATION_STATUS_RELEASED,
}
RELEASE_REASON_TO_PROTO = {
    ReleaseReason.CANCELLED: live_catalog_pb2.RELEASE_REASON_CANCELLED,
    ReleaseReason.EXPIRED: live_catalog_pb2.RELEASE_REASON_EXPIRED,
    ReleaseReason.ITEM_CLOSED: live_catalog_pb2.RELEASE_REASON_ITEM_CLOSED,
    ReleaseReason.SESSION_ENDED: live_catalog_pb2.RELEASE_REASON_SESSION_ENDED,
}


def address(contact: Contact) -> address_pb2.Address:
    return address_pb2.Address(channel=CHANNEL_TO_PROTO[contact.channel], value=contact.value)


def item_message(item: Item) -> live_catalog_pb2.Item:
    return live_catalog_pb2.Item(
        item_id=str(item.id),
        tenant_id=item.tenant_id,
        session_id=str(item.session_id),
        code=item.code,
        title=item.title,
        price_cents=item.price_cents or 0,
        currency=item.currency,
        stock=item.stock,
        held=item.held,
        confirmed=item.confirmed,
        waiting=item.waiting,
        max_per_client=item.max_per_client,
        status=ITEM_STATUS_TO_PROTO[item.status],
        created_at=timestamp(item.created_at),
        updated_at=timestamp(item.updated_at),
    )


def reservation_message(reservation: Reservation) -> live_catalog_pb2.Reservation:
    message = live_catalog_pb2.Reservation(
        reservation_id=str(reservation.id),
        tenant_id=reservation.tenant_id,
        session_id=str(reservation.session_id),
        item_id=str(reservation.item_id),
        item_code=reservation.item_code,
        client=address(reservation.client),
        quantity=reservation.quantity,
        status=RESERVATION_STATUS_TO_PROTO[reservation.status],
        waitlist_position=reservation.waitlist_position,
        message_sid=reservation.message_sid,
        received_at=timestamp(reservation.received_at),
        updated_at=timestamp(reservation.updated_at),
    )
    if reservation.release_reason is not None:
        message.release_reason = RELEASE_REASON_TO_PROTO[reservation.release_reason]
    if reservation.expires_at is not None:
        message.expires_at.CopyFrom(timestamp(reservation.expires_at))
    return message


def summary_message(totals: SessionTotals, hold: timedelta) -> live_catalog_pb2.SessionSummary:
    duration = Duration()
    duration.FromTimedelta(hold)
    message = live_catalog_pb2.SessionSummary(
        tenant_id=totals.tenant_id,
        session_id=str(totals.session_id),
        buyers=totals.buyers,
        hold_duration=duration,
        items=[
            live_catalog_pb2.ItemSummary(
                code=item.code,
                title=item.title,
                stock=item.stock,
                held=item.held,
                confirmed=item.confirmed,
                released=item.released,
                waiting=item.waiting,
            )
            for item in totals.items
        ],
    )
    if totals.summarized_at is not None:
        message.summarized_at.CopyFrom(timestamp(totals.summarized_at))
    return message


def item_changed(item: Item, correlation_id: str) -> events_pb2.ItemChanged:
    return events_pb2.ItemChanged(item=item_message(item), correlation_id=correlation_id)


def reservation_changed(
    reservation: Reservation, correlation_id: str
) -> events_pb2.ReservationChanged:
    return events_pb2.ReservationChanged(
        reservation=reservation_message(reservation), correlation_id=correlation_id
    )


def waitlist_joined(reservation: Reservation, correlation_id: str) -> events_pb2.WaitlistJoined:
    return events_pb2.WaitlistJoined(
        reservation=reservation_message(reservation), correlation_id=correlation_id
    )


def session_summarized(summarized: Summarized, hold: timedelta) -> events_pb2.SessionSummarized:
    return events_pb2.SessionSummarized(
        summary=summary_message(summarized.totals, hold),
        buyer_summaries=summarized.buyer_summaries,
        seller_summary=summarized.seller_summary,
    )

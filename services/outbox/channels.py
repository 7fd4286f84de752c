"""Which senders a tenant may send from: the channels seller_admin lists for it.

A message's `sender` (WhatsApp or SMS number, Messaging Service SID, or a declared
alphanumeric sender ID) must be a channel of the message's tenant, and its account the
channel's account: otherwise one shop could send from another's number, drain that number's
rate bucket, and dodge the opt-outs recorded for it.

- `TenantChannels`: one tenant's channels as a lookup (pure).
- `ChannelDirectory`: `TenantChannels` per tenant, loaded from `seller_admin.ListChannels` on a
  miss and kept (an `infra.cache.LoadingCache`) until a seller_admin channel event for that
  tenant or the TTL, whichever comes first (the TTL bounds staleness when events are missed,
  e.g. during a NATS outage). A sender absent from the cached copy is looked up afresh before it is
  refused, so a channel added a moment ago (its event not yet relayed) works at once.
- `follow_channel_changes`: the ephemeral JetStream consumer of those events.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import grpc
from google.protobuf.message import DecodeError
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from snapsell.seller_admin.v1 import events_pb2, seller_admin_pb2

from infra.cache import LoadingCache
from infra.jetstream import follow_new_events
from infra.log import get_logger
from services.outbox.domain import is_messaging_service_sid

CHANNEL_CHANGES = "seller_admin.v1.channel.>"
_CHANNEL_EVENTS: Mapping[str, type[events_pb2.ChannelAdded] | type[events_pb2.ChannelRemoved]] = {
    "seller_admin.v1.channel.added": events_pb2.ChannelAdded,
    "seller_admin.v1.channel.removed": events_pb2.ChannelRemoved,
}
LIST_PAGE_SIZE = 500

_log = get_logger(__name__)


class SenderNotAChannelError(Exception):
    """The sender or account is not one of the tenant's channels (FAILED_PRECONDITION)."""


class ChannelDirectoryUnavailableError(Exception):
    """seller_admin could not say which channels the tenant has; the caller may retry."""


def sender_key(sender: str) -> str:
    """The form seller_admin lists a sender in: Messaging Service SIDs with lowercase hex."""
    if is_messaging_service_sid(sender):
        return "MG" + sender[2:].lower()
    return sender


@dataclass(frozen=True, slots=True)
class TenantChannels:
    tenant_id: str
    # Sender as seller_admin lists it (`whatsapp:+1...`, `+1...`, `MG...`, or an alphanumeric
    # sender ID) -> the account SID (`AC...`) of its channel.
    accounts: Mapping[str, str]

    def account_for(self, sender: str, account_sid: str) -> str:
        """The account to send `sender`'s message with: its channel's. An account named by the
        caller must be that one."""
        account = self.accounts.get(sender_key(sender))
        if account is None:
            raise SenderNotAChannelError(
                f"sender {sender} is not a channel of tenant {self.tenant_id};"
                " add it with add-channel"
            )
        if account_sid and "AC" + account_sid[2:].lower() != account:
            raise SenderNotAChannelError(
                f"account {account_sid} is not the account of channel {sender}"
                f" of tenant {self.tenant_id}"
            )
        return account


def tenant_channels(tenant_id: str, channels: list[seller_admin_pb2.Channel]) -> TenantChannels:
    accounts: dict[str, str] = {}
    for channel in channels:
        accounts[channel.address] = channel.account_sid
        if channel.alphanumeric_sender_id:
            # Declared on an SMS number or Messaging Service: SMS under that name, same account.
            accounts[channel.alphanumeric_sender_id] = channel.account_sid
    return TenantChannels(tenant_id, accounts)


class ChannelLister(Protocol):
    """seller_admin's `ListChannels` (a `SellerAdminServiceStub`)."""

    def ListChannels(
        self, request: seller_admin_pb2.ListChannelsRequest, *, timeout: float
    ) -> Any: ...


class ChannelDirectory:
    def __init__(
        self,
        seller_admin: ChannelLister,
        *,
        ttl_s: float,
        deadline_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._seller_admin = seller_admin
        self._deadline_s = deadline_s
        self._tenants: LoadingCache[str, TenantChannels] = LoadingCache(ttl_s=ttl_s, clock=clock)

    async def channels_for(self, tenant_id: str, sender: str) -> TenantChannels:
        """The tenant's channels, from the cache when it has an answer for `sender`."""
        cached = self._tenants.cached(tenant_id)
        if cached is not None and sender_key(sender) in cached.accounts:
            return cached
        # One ListChannels per tenant at a time: concurrent misses wait for the same answer.
        channels = await self._tenants.load(tenant_id, lambda: self._list_channels(tenant_id))
        assert channels is not None  # _list_channels always answers
        return channels

    def invalidate(self, tenant_id: str) -> None:
        self._tenants.invalidate(tenant_id)

    def invalidate_all(self) -> None:
        self._tenants.invalidate_all()

    async def _list_channels(self, tenant_id: str) -> TenantChannels:
        channels: list[seller_admin_pb2.Channel] = []
        token = ""
        try:
            while True:
                reply = await self._seller_admin.ListChannels(
                    seller_admin_pb2.ListChannelsRequest(
                        tenant_id=tenant_id, page_size=LIST_PAGE_SIZE, page_token=token
                    ),
                    timeout=self._deadline_s,
                )
                channels.extend(reply.channels)
                token = reply.next_page_token
                if not token:
                    break
        except grpc.aio.AioRpcError as error:
            # An unknown or malformed tenant has no channels; anything else is seller_admin's.
            if error.code() not in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT):
                _log.warning(
                    "outbox.channel_directory_failed",
                    extra={"fields": {"tenant_id": tenant_id, "code": error.code().name}},
                )
                raise ChannelDirectoryUnavailableError(
                    "channel directory (seller_admin) unavailable, retry"
                ) from None
        return tenant_channels(tenant_id, channels)


async def follow_channel_changes(
    js: JetStreamContext, directory: ChannelDirectory, stop: asyncio.Event
) -> None:
    """Drop a tenant's cached channels when seller_admin adds or removes one of them (while the
    follower is not subscribed, every tenant is dropped and the TTL bounds staleness)."""

    async def on_event(msg: Msg) -> None:
        decode = _CHANNEL_EVENTS.get(msg.subject)
        try:
            tenant_id = decode.FromString(msg.data).channel.tenant_id if decode else ""
        except DecodeError:  # an undecodable event: forget everything rather than guess
            tenant_id = ""
        if tenant_id:
            directory.invalidate(tenant_id)
        else:
            directory.invalidate_all()

    await follow_new_events(js, CHANNEL_CHANGES, on_event, directory.invalidate_all, stop)

"""Which senders a tenant may send from: the lookup of its channels, and the directory's cache
(TTL, invalidation by seller_admin's events, one load at a time, seller_admin's failures),
against a hand-written seller_admin."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from snapsell.seller_admin.v1 import seller_admin_pb2

from services.outbox.channels import (
    ChannelDirectory,
    ChannelDirectoryUnavailableError,
    SenderNotAChannelError,
    TenantChannels,
    tenant_channels,
)

ACCOUNT = "AC" + "a" * 32
OTHER_ACCOUNT = "AC" + "b" * 32
SERVICE = "MG" + "c" * 32


def channel(address: str, account: str = ACCOUNT) -> seller_admin_pb2.Channel:
    return seller_admin_pb2.Channel(tenant_id="shop", address=address, account_sid=account)


def rpc_error(code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), code.name)


class FakeSellerAdmin:
    """ListChannels over a dict, `page_size` at a time; counts calls; can fail or stall."""

    def __init__(self, channels: dict[str, list[seller_admin_pb2.Channel]]) -> None:
        self.channels = channels
        self.calls: list[str] = []
        self.error: grpc.StatusCode | None = None
        self.gate: asyncio.Event | None = None

    async def ListChannels(  # the stub's signature: a deadline named `timeout`
        self,
        request: seller_admin_pb2.ListChannelsRequest,
        *,
        timeout: float,  # noqa: ASYNC109
    ) -> seller_admin_pb2.ListChannelsResponse:
        self.calls.append(request.tenant_id)
        if self.gate is not None:
            await self.gate.wait()
        if self.error is not None:
            raise rpc_error(self.error)
        if request.tenant_id not in self.channels:
            raise rpc_error(grpc.StatusCode.NOT_FOUND)
        start = int(request.page_token or 0)
        found = self.channels[request.tenant_id]
        end = start + request.page_size
        return seller_admin_pb2.ListChannelsResponse(
            channels=found[start:end], next_page_token=str(end) if end < len(found) else ""
        )


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def directory(seller_admin: FakeSellerAdmin, clock: Clock, ttl_s: float = 30) -> ChannelDirectory:
    return ChannelDirectory(seller_admin, ttl_s=ttl_s, deadline_s=1, clock=clock)


def test_a_channel_sends_with_its_own_account() -> None:
    channels = TenantChannels("shop", {"whatsapp:+14155238886": ACCOUNT, SERVICE: ACCOUNT})
    assert channels.account_for("whatsapp:+14155238886", "") == ACCOUNT
    assert channels.account_for("whatsapp:+14155238886", "AC" + "A" * 32) == ACCOUNT
    # Twilio SIDs' hex is matched whatever its case.
    assert channels.account_for("MG" + "C" * 32, "") == ACCOUNT


def test_an_alphanumeric_sender_id_is_the_tenants_only_as_declared() -> None:
    declared = channel("+14155550100", OTHER_ACCOUNT)
    declared.alphanumeric_sender_id = "ShopA"
    channels = tenant_channels("shop", [declared, channel(SERVICE)])
    assert channels.account_for("ShopA", "") == OTHER_ACCOUNT
    for undeclared in ("SHOPA", "ShopB", "MG" + "shop"):
        with pytest.raises(SenderNotAChannelError):
            channels.account_for(undeclared, "")


@pytest.mark.parametrize(
    ("sender", "account", "reason"),
    [
        ("whatsapp:+14155238887", "", "is not a channel of tenant shop; add it with add-channel"),
        ("+14155238886", "", "is not a channel of tenant shop"),  # the WhatsApp one is not SMS
        ("whatsapp:+14155238886", OTHER_ACCOUNT, "is not the account of channel"),
    ],
)
def test_other_senders_and_accounts_are_refused_saying_why(
    sender: str, account: str, reason: str
) -> None:
    channels = TenantChannels("shop", {"whatsapp:+14155238886": ACCOUNT})
    with pytest.raises(SenderNotAChannelError, match=reason):
        channels.account_for(sender, account)


async def test_a_tenant_is_loaded_once_and_reused_until_its_ttl() -> None:
    seller_admin = FakeSellerAdmin({"shop": [channel("+14155550100")]})
    clock = Clock()
    channels = directory(seller_admin, clock)
    for _ in range(3):
        found = await channels.channels_for("shop", "+14155550100")
        assert found.accounts == {"+14155550100": ACCOUNT}
    assert seller_admin.calls == ["shop"]
    clock.now += 31
    await channels.channels_for("shop", "+14155550100")
    assert seller_admin.calls == ["shop", "shop"]


async def test_a_sender_missing_from_the_cache_is_looked_up_again() -> None:
    seller_admin = FakeSellerAdmin({"shop": [channel("+14155550100")]})
    channels = directory(seller_admin, Clock())
    await channels.channels_for("shop", "+14155550100")
    seller_admin.channels["shop"].append(channel("+14155550101"))  # event not seen yet
    found = await channels.channels_for("shop", "+14155550101")
    assert found.account_for("+14155550101", "") == ACCOUNT


async def test_an_event_drops_the_tenant_and_a_load_started_before_it_is_not_kept() -> None:
    seller_admin = FakeSellerAdmin({"shop": [channel("+14155550100")], "other": []})
    channels = directory(seller_admin, Clock())
    await channels.channels_for("shop", "+14155550100")
    seller_admin.channels["shop"] = []  # removed in seller_admin
    channels.invalidate("shop")
    assert (await channels.channels_for("shop", "+14155550100")).accounts == {}
    seller_admin.gate = asyncio.Event()
    loading = asyncio.create_task(channels.channels_for("other", "+14155550199"))
    await asyncio.sleep(0)
    channels.invalidate("other")  # a change while the load was in flight
    seller_admin.gate.set()
    await loading
    calls = len(seller_admin.calls)
    await channels.channels_for("other", "+14155550199")
    assert len(seller_admin.calls) == calls + 1


async def test_concurrent_misses_share_one_call_and_pages_are_all_read() -> None:
    many = [channel(f"+1415555{i:04d}") for i in range(1200)]
    seller_admin = FakeSellerAdmin({"shop": many})
    seller_admin.gate = asyncio.Event()
    channels = directory(seller_admin, Clock())
    waiting = [asyncio.create_task(channels.channels_for("shop", "+14155550000")) for _ in range(5)]
    await asyncio.sleep(0)
    seller_admin.gate.set()
    found = await asyncio.gather(*waiting)
    assert all(len(f.accounts) == 1200 for f in found)
    assert seller_admin.calls == ["shop"] * 3  # one load: three pages of 500


async def test_an_unknown_tenant_has_no_channels_and_an_unavailable_directory_says_retry() -> None:
    seller_admin = FakeSellerAdmin({})
    channels = directory(seller_admin, Clock())
    with pytest.raises(SenderNotAChannelError, match="not a channel of tenant nobody"):
        (await channels.channels_for("nobody", "+14155550100")).account_for("+14155550100", "")
    seller_admin.error = grpc.StatusCode.UNAVAILABLE
    with pytest.raises(ChannelDirectoryUnavailableError, match="unavailable, retry"):
        await channels.channels_for("shop", "+14155550100")

"""What ops see of the running system: one trace per message across every process, the
Prometheus metrics each process exports (that docs/OPERATIONS.md documents and
deploy/overlays/prod/alerts.yaml alerts on), and logs that carry trace ids and never a phone
number, token or JWT."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import grpc
import yaml
from prometheus_client.parser import text_string_to_metric_families
from snapsell.live_catalog.v1 import live_catalog_pb2, live_catalog_pb2_grpc
from snapsell.live_session.v1 import live_session_pb2, live_session_pb2_grpc
from snapsell.outbox.v1 import outbox_pb2, outbox_pb2_grpc
from snapsell.routing.v1 import events_pb2 as routing_events
from snapsell.routing.v1 import routing_pb2, routing_pb2_grpc
from snapsell.seller_admin.v1 import seller_admin_pb2, seller_admin_pb2_grpc

from infra.auth import issue_token
from infra.keys import new_signing_key
from tests.e2e.harness import Harness, Shop, issued_phones, new_mobile
from tests.support.polling import eventually
from tools.stack import ROOT, SERVICES, SystemStack

OPERATIONS = ROOT / "docs" / "OPERATIONS.md"
# The SLO alerts, as the prod overlay applies them (a PrometheusRule).
ALERT_RULES = ROOT / "deploy" / "overlays" / "prod" / "alerts.yaml"

RPC_METRICS = (
    "snapsell_grpc_server_handled_total",
    "snapsell_grpc_server_handling_seconds",
    "snapsell_auth_denials_total",
    # infra/supervisor.py: every gRPC service runs background tasks.
    "snapsell_background_task_restarts_total",
    "snapsell_background_tasks_down",
)
# Work waiting, in every service that has a queue (infra/backlog.py).
QUEUE_METRICS = ("snapsell_queue_depth", "snapsell_queue_oldest_age_seconds")
# Every metric ops rely on, by the process that exports it (documented in OPERATIONS.md).
EXPORTED_METRICS: dict[str, tuple[str, ...]] = {
    "gateway": (
        "snapsell_gateway_webhook_requests_total",
        "snapsell_gateway_webhook_duration_seconds",
        "snapsell_gateway_jetstream_publish_duration_seconds",
    ),
    "routing": (
        *RPC_METRICS,
        "snapsell_routing_inbound_handled_total",
        "snapsell_routing_inbound_lag_seconds",
        "snapsell_routing_inbound_handling_seconds",
        "snapsell_routing_inbound_redeliveries_total",
        *QUEUE_METRICS,
        "snapsell_routing_peer_call_seconds",
        "snapsell_events_rejected_total",
    ),
    "outbox": (
        *RPC_METRICS,
        *QUEUE_METRICS,
        "snapsell_outbox_enqueue_to_accepted_seconds",
        "snapsell_outbox_backlog_messages",
        "snapsell_outbox_send_results_total",
        "snapsell_outbox_send_seconds",
        "snapsell_outbox_dead_letters_total",
        "snapsell_outbox_blocked_optout_total",
        "snapsell_outbox_status_callbacks_total",
        "snapsell_events_rejected_total",
    ),
    "live_session": (
        *RPC_METRICS,
        "snapsell_live_session_active_sessions",
        "snapsell_live_session_idle_closed_total",
    ),
    "seller_admin": RPC_METRICS,
    "live_catalog": (
        *RPC_METRICS,
        *QUEUE_METRICS,
        "snapsell_live_catalog_inbound_handled_total",
        "snapsell_live_catalog_replies_total",
        "snapsell_events_rejected_total",
    ),
}
GRPC_SERVICES = ("routing", "outbox", "live_session", "seller_admin", "live_catalog")

# --- tracing -------------------------------------------------------------------------------


async def _trace_of(stack: SystemStack, message_sid: str) -> str | None:
    for span in stack.spans():
        if span["attributes"].get("twilio.message_sid") == message_sid:
            return str(span["trace_id"])
    return None


async def _wait_for_spans(
    stack: SystemStack, message_sid: str, wanted: set[tuple[str, str]]
) -> list[dict[str, Any]]:
    """The spans of the webhook's trace, once the `(service, name)` spans `wanted` ended (a
    span is written when it ends, and a parent often ends after its children)."""
    trace_id = await eventually(lambda: _trace_of(stack, message_sid))

    async def ended() -> list[dict[str, Any]] | None:
        spans = [span for span in stack.spans() if span["trace_id"] == trace_id]
        return spans if wanted <= {(s["service"], s["name"]) for s in spans} else None

    return list(await eventually(ended))


def _one(spans: list[dict[str, Any]], service: str, name: str, kind: str) -> dict[str, Any]:
    found = [s for s in spans if (s["service"], s["name"], s["kind"]) == (service, name, kind)]
    assert found, f"no {kind} span {name!r} in {service}: {_summary(spans)}"
    return found[0]


def _summary(spans: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    return [(s["service"], s["kind"], s["name"]) for s in spans]


def _is_descendant(spans: list[dict[str, Any]], child: dict[str, Any], ancestor: str) -> bool:
    by_id = {span["span_id"]: span for span in spans}
    parent = child["parent_id"]
    while parent is not None:
        if parent == ancestor:
            return True
        parent = by_id[parent]["parent_id"] if parent in by_id else None
    return False


async def test_one_trace_follows_a_stop_from_the_webhook_to_the_twilio_send(
    system: SystemStack, harness: Harness, cli_shop: Shop
) -> None:
    message_sid = await harness.send(cli_shop, new_mobile(), "STOP")
    spans = await _wait_for_spans(
        system,
        message_sid,
        {
            ("routing", "routing.route_inbound"),
            ("outbox", "outbox.send"),
        },
    )
    webhook = _one(spans, "gateway", "POST /webhooks/twilio/messages", "SERVER")
    consumer = _one(spans, "routing", "routing.route_inbound", "CONSUMER")
    assert consumer["parent_id"] == webhook["span_id"]  # carried by the NATS traceparent header
    for peer, method in (
        ("seller_admin", "/snapsell.seller_admin.v1.SellerAdminService/ResolveSender"),
        ("outbox", "/snapsell.outbox.v1.OutboxService/EnqueueMany"),
    ):
        client = _one(spans, "routing", method, "CLIENT")
        server = _one(spans, peer, method, "SERVER")
        assert _is_descendant(spans, client, consumer["span_id"])
        assert server["parent_id"] == client["span_id"]  # carried by gRPC metadata
    enqueue = _one(spans, "outbox", "/snapsell.outbox.v1.OutboxService/EnqueueMany", "SERVER")
    send = _one(spans, "outbox", "outbox.send", "PRODUCER")
    # The send happens later, in a worker: it joins the trace through the stored traceparent.
    assert send["parent_id"] == enqueue["span_id"]
    # Consent is checked once per claimed batch, in a trace of its own linked both ways.
    everything = system.spans()
    [check] = [
        s
        for s in everything
        if s["name"] == "outbox.check_consent"
        and {"trace_id": send["trace_id"], "span_id": enqueue["span_id"]} in s["links"]
    ]
    assert {"trace_id": check["trace_id"], "span_id": check["span_id"]} in send["links"]
    consent = _one(
        [s for s in everything if s["trace_id"] == check["trace_id"]],
        "routing",
        "/snapsell.routing.v1.RoutingService/CheckOptOuts",
        "SERVER",
    )
    assert _is_descendant(everything, consent, check["span_id"])
    queries = [s for s in spans if s["kind"] == "CLIENT" and "db.statement" in s["attributes"]]
    assert {"routing", "outbox"} <= {s["service"] for s in queries}  # asyncpg spans joined too
    assert {"gateway", "routing", "seller_admin", "outbox"} <= {s["service"] for s in spans}
    # Events recorded while handling it carry the trace on JetStream (relayed from the row).
    [(_, headers)] = await harness.events_with_headers(
        "ROUTING_EVENTS",
        "routing.v1.message.routed",
        routing_events.MessageRouted,
        lambda event: event.message.message_sid == message_sid,
    )
    assert headers["traceparent"].split("-")[1] == webhook["trace_id"]
    # Background queries (polls, sweeps, relays) start no trace of their own.
    assert not [
        s for s in system.spans() if "db.statement" in s["attributes"] and not s["parent_id"]
    ]


async def test_a_sellers_message_is_traced_into_live_session(
    system: SystemStack, harness: Harness, cli_shop: Shop
) -> None:
    message_sid = await harness.send(cli_shop, cli_shop.seller, "Live dans 5 minutes !")
    method = "/snapsell.live_session.v1.LiveSessionService/Touch"
    spans = await _wait_for_spans(
        system, message_sid, {("live_session", method), ("routing", "routing.route_inbound")}
    )
    consumer = _one(spans, "routing", "routing.route_inbound", "CONSUMER")
    client = _one(spans, "routing", method, "CLIENT")
    assert _is_descendant(spans, client, consumer["span_id"])
    assert _one(spans, "live_session", method, "SERVER")["parent_id"] == client["span_id"]


# --- metrics -------------------------------------------------------------------------------


async def _families(stack: SystemStack, service: str) -> dict[str, Any]:
    text = await stack.scrape(service)
    return {family.name: family for family in text_string_to_metric_families(text)}


def _family_name(metric: str) -> str:
    # prometheus_client's parser names counters without `_total`.
    return metric.removesuffix("_total")


async def _refused_call(stack: SystemStack, service: str) -> None:
    """One call with a JWT signed by someone else, which the service must refuse and count."""
    forged = issue_token(
        new_signing_key("operator"), sub="intruder", role="admin", audience=service
    )
    metadata = (("authorization", f"Bearer {forged}"),)
    calls = {
        "routing": lambda ch: routing_pb2_grpc.RoutingServiceStub(ch).ListOptOuts(
            routing_pb2.ListOptOutsRequest(tenant_id="x"), metadata=metadata, timeout=5
        ),
        "outbox": lambda ch: outbox_pb2_grpc.OutboxServiceStub(ch).ListDeadLetters(
            outbox_pb2.ListDeadLettersRequest(tenant_id="x"), metadata=metadata, timeout=5
        ),
        "live_session": lambda ch: live_session_pb2_grpc.LiveSessionServiceStub(ch).ListSessions(
            live_session_pb2.ListSessionsRequest(tenant_id="x"), metadata=metadata, timeout=5
        ),
        "seller_admin": lambda ch: seller_admin_pb2_grpc.SellerAdminServiceStub(ch).ListTenants(
            seller_admin_pb2.ListTenantsRequest(), metadata=metadata, timeout=5
        ),
        "live_catalog": lambda ch: live_catalog_pb2_grpc.LiveCatalogServiceStub(ch).ListItems(
            live_catalog_pb2.ListItemsRequest(tenant_id="x"), metadata=metadata, timeout=5
        ),
    }
    async with grpc.aio.insecure_channel(stack.address(service)) as channel:
        try:
            await calls[service](channel)
        except grpc.aio.AioRpcError as error:
            assert error.code() is grpc.StatusCode.UNAUTHENTICATED
        else:
            raise AssertionError(f"{service} accepted a forged token")


async def test_every_process_exports_its_metrics(system: SystemStack, harness: Harness) -> None:
    for service in GRPC_SERVICES:
        await _refused_call(system, service)
    for service, metrics in EXPORTED_METRICS.items():
        families = await _families(system, service)
        missing = [m for m in metrics if _family_name(m) not in families]
        assert not missing, f"{service} does not export {missing}"
    for service in GRPC_SERVICES:
        denials = (await _families(system, service))["snapsell_auth_denials"]
        refused = [s for s in denials.samples if s.labels.get("reason") and s.value >= 1]
        assert refused and all(s.labels["service"] == service for s in refused)
        handled = (await _families(system, service))["snapsell_grpc_server_handled"]
        assert any(s.labels["code"] == "UNAUTHENTICATED" for s in handled.samples)


async def test_every_exported_metric_is_documented_and_alerts_use_real_metrics(
    system: SystemStack,
) -> None:
    docs = OPERATIONS.read_text()
    exported: set[str] = set()
    for service in SERVICES:
        text = await system.scrape(service)
        exported |= set(re.findall(r"^# TYPE (snapsell_\w+) ", text, flags=re.MULTILINE))
    listed = {m for metrics in EXPORTED_METRICS.values() for m in metrics}
    assert {_family_name(m) for m in listed} <= {_family_name(m) for m in exported}
    undocumented = sorted(m for m in listed if f"`{m}`" not in docs)
    assert not undocumented, f"not in docs/OPERATIONS.md: {undocumented}"

    rules = yaml.safe_load(ALERT_RULES.read_text())["spec"]
    alerts = [rule for group in rules["groups"] for rule in group["rules"]]
    assert {"alert", "expr", "for", "labels", "annotations"} <= set(alerts[0])
    known = {_family_name(m) for m in exported}
    for alert in alerts:
        for name in re.findall(r"\bsnapsell_\w+", alert["expr"]):
            base = re.sub(r"_(bucket|count|sum|total)$", "", name)
            assert base in known, f"alert {alert['alert']} uses unknown metric {name}"


# --- logs (last: it reads what every test before it made the processes log) ---------------

_E164 = re.compile(r"\+\d{8,15}")
_JWT = re.compile(r"eyJ[\w-]{5,}\.eyJ[\w-]{5,}\.[\w-]+")


def _log_lines(stack: SystemStack) -> dict[str, list[str]]:
    return {
        name: [line for line in Path(path).read_text(errors="replace").splitlines() if line]
        for name, path in stack.log_files().items()
    }


async def test_logs_are_json_with_trace_ids_and_leak_no_phone_token_or_jwt(
    system: SystemStack, harness: Harness, cli_shop: Shop
) -> None:
    signing_key = system.keys.key("outbox").private_pem().decode().splitlines()[1]
    secrets = {"Twilio auth token": system.auth_token, "signing key": signing_key}
    phones = {phone.removeprefix("+") for phone in issued_phones()}
    logs = _log_lines(system)
    for service, lines in logs.items():
        assert lines, f"{service} logged nothing"
        for line in lines:
            record = json.loads(line)  # every line is one JSON object
            assert {"ts", "level", "service", "event"} <= set(record), line
            assert record["service"] == service
            assert not _E164.search(line), f"{service} logged a full phone number: {line}"
            leaked = [p for p in phones if p in line]
            assert not leaked, f"{service} logged a phone number's digits: {line}"
            assert not _JWT.search(line), f"{service} logged a JWT: {line}"
            for what, value in secrets.items():
                assert value not in line, f"{service} logged the {what}: {line}"

    batches = [json.loads(line) for line in logs["routing"] if "routing.batch_handled" in line]
    assert batches
    for record in batches:
        assert record["messages"] == sum(record["outcomes"].values()) > 0, record
        if "routed" in record["outcomes"]:  # logged in the batch's span
            assert re.fullmatch(r"[0-9a-f]{32}", record.get("trace_id", "")), record
    assert not [line for line in logs["routing"] if "routing.inbound_handled" in line]
    denied = [json.loads(line) for line in logs["seller_admin"] if '"auth.denied"' in line]
    assert denied and all(record["event"] == "auth.denied" for record in denied)

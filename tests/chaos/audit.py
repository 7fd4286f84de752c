"""The verdict: what the system recorded (`records.Records`) against what the load did.

- Inbound: every webhook answered 200 has exactly one ledger row and exactly one
  `MessageRouted` on JetStream, and nothing else is there.
- Outbound: every message (enqueued by the load, or a COMPLIANCE reply from routing) ended
  sent exactly once by the sandbox's count, blocked, or dead with a reason; the sandbox accepted
  nothing that no message records (a second send); every STOP / START / HELP got one reply.
- Consent: no message enqueued to a recipient reported opted out was sent; and, over every
  conversational message Twilio accepted, none went to a recipient whose opt-out was committed
  before the message was enqueued, unless an opt-in may have been committed before the
  message's consent check.
- Claims: every item code or cancel a client sent was handled by the catalog once, with one
  reply handed to the outbox as one message; no item is held beyond its stock nor has
  counters its reservations disagree with, and no client holds an item twice.
- Processes: every service is still running, and none logged an error beyond the expected
  NATS reconnect attempts (a crashed loop, a handler exception, a dropped result).
Each check is counted in the printed report and any finding is a problem that fails the run.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field

import asyncpg

from tests.chaos.load import Load
from tests.chaos.records import OPT_OUT_RECORDED, OPT_OUT_REMOVED, Records

SENT = frozenset({"sent", "delivered", "read", "failed", "undelivered"})
UNSETTLED = frozenset({"pending", "sending"})
REPLY_KEY_SUFFIX = ":consent"  # routing keys each reply `<MessageSid>:consent`
CLAIM_REPLY_KEY = "live_catalog:reply:"  # the catalog keys its reply to a message by its sid


@dataclass
class Report:
    sections: list[tuple[str, list[tuple[str, str]]]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def section(self, title: str, rows: Iterable[tuple[str, object]]) -> None:
        self.sections.append((title, [(label, str(value)) for label, value in rows]))

    def expect_none(self, what: str, found: Collection[object]) -> None:
        if found:
            examples = ", ".join(str(item) for item in list(found)[:5])
            self.problems.append(f"{len(found)} {what} (e.g. {examples})")

    def render(self) -> str:
        lines: list[str] = []
        for title, rows in self.sections:
            lines.append(title)
            lines.extend(f"  {label:<46} {value}" for label, value in rows)
        lines.append("problems: " + ("none" if not self.problems else ""))
        lines.extend(f"  - {problem}" for problem in self.problems)
        return "\n".join(lines)


def counts(counter: Mapping[str, int]) -> str:
    return ", ".join(f"{key} {count}" for key, count in sorted(counter.items())) or "none"


def audit(records: Records, load: Load, accepted: Mapping[str, str], report: Report) -> None:
    """`accepted`: MessageSid -> what it carried, for every webhook answered 200."""
    _inbound(records, accepted, report)
    _outbound(records, load, report)
    _consent(records, load, report)
    _claims(records, load, accepted, report)
    report.section(
        "processes",
        [
            ("exited on their own", ", ".join(records.exited) or "none"),
            ("errors logged (apart from NATS reconnects)", counts(records.logged_errors)),
        ],
    )
    report.expect_none("service processes that died and stayed dead", records.exited)
    report.expect_none("kinds of error logged by the services", records.logged_errors.keys())


def _inbound(records: Records, accepted: Mapping[str, str], report: Report) -> None:
    ledger, routed = records.ledger, records.routed
    no_row = [sid for sid in accepted if sid not in ledger]
    unroutable = [sid for sid in accepted if ledger.get(sid, "routed") != "routed"]
    no_event = [sid for sid in accepted if not routed[sid]]
    doubled = [sid for sid in accepted if routed[sid] > 1]
    report.section(
        "inbound",
        [
            ("webhooks answered 200", len(accepted)),
            ("  by content", counts(Counter(accepted.values()))),
            ("routing ledger rows for them", len(accepted) - len(no_row)),
            ("  missing / unroutable", f"{len(no_row)} / {len(unroutable)}"),
            ("MessageRouted on JetStream for them", sum(routed[sid] for sid in accepted)),
            ("  missing / doubled", f"{len(no_event)} / {len(doubled)}"),
        ],
    )
    report.expect_none("webhooks answered 200 without a ledger row", no_row)
    report.expect_none("webhooks to a known shop recorded unroutable", unroutable)
    report.expect_none("ledger rows for no webhook answered 200", ledger.keys() - accepted.keys())
    report.expect_none("webhooks answered 200 without MessageRouted", no_event)
    report.expect_none("webhooks with more than one MessageRouted", doubled)
    report.expect_none("MessageRouted for no webhook answered 200", routed.keys() - accepted.keys())


def _outbound(records: Records, load: Load, report: Report) -> None:
    messages = records.messages
    by_id = {message["id"]: message for message in messages}
    recorded = {message["twilio_sid"] for message in messages if message["twilio_sid"]}
    accepted = {sent["sid"] for sent in records.sandbox}
    bodies = Counter(sent["body"] for sent in records.sandbox)
    replies = [m for m in messages if m["idempotency_key"].endswith(REPLY_KEY_SUFFIX)]
    replied = Counter(m["idempotency_key"].removesuffix(REPLY_KEY_SUFFIX) for m in replies)
    enqueued_ids = {e.message_id for e in load.enqueued}
    ours = [m["id"] for m in messages if m["idempotency_key"].startswith(load.key_prefix)]
    stats = records.sandbox_stats
    faults = Counter(stats["rejected_by_fault"])
    report.section(
        "outbound",
        [
            ("outbox messages", len(messages)),
            ("  enqueued by the load / COMPLIANCE replies", f"{len(ours)} / {len(replies)}"),
            ("  by status", counts(Counter(m["status"] for m in messages))),
            ("  dead, by reason", counts(Counter(m["dead_reason"] for m in _dead(messages)))),
            ("sandbox accepted (Twilio's count)", len(records.sandbox)),
            ("  recorded by exactly one message", len(accepted & recorded)),
            ("  recorded by none (second sends)", len(accepted - recorded)),
            ("STOP / START / HELP webhooks", counts(Counter(load.keywords.values()))),
            ("  answered by exactly one reply", sum(replied[sid] == 1 for sid in load.keywords)),
            ("sandbox faults answered", counts(faults)),
            ("sandbox timeouts after accepting", stats["timeouts_after_accept"]),
            (
                "status callbacks answered 2xx / not",
                f"{stats['callbacks']['sent']} / {stats['callbacks']['failed']}",
            ),
            ("outbox attempts, by outcome", counts(records.attempts)),
        ],
    )
    if records.dead_letter_attempts:
        report.section(
            "attempts of the messages dead for attempts_exhausted / outcome_unknown",
            [(row["message_id"], _attempt(row)) for row in records.dead_letter_attempts],
        )
    report.expect_none(
        "outbound messages still pending or sending",
        [m["id"] for m in messages if m["status"] in UNSETTLED],
    )
    report.expect_none("sends Twilio accepted that no message records", accepted - recorded)
    report.expect_none("messages recorded as sent that Twilio never accepted", recorded - accepted)
    report.expect_none(
        "messages sent without a Twilio SID",
        [m["id"] for m in messages if m["status"] in SENT and not m["twilio_sid"]],
    )
    report.expect_none(
        "dead letters without a reason", [m["id"] for m in _dead(messages) if not m["dead_reason"]]
    )
    report.expect_none(
        "acknowledged enqueues without a message",
        [e.message_id for e in load.enqueued if e.message_id not in by_id],
    )
    report.expect_none(
        "load messages accepted by Twilio a number of times other than their status says",
        [
            f"{e.message_id} ({_status(by_id, e.message_id)}, accepted {bodies[e.body]}x)"
            for e in load.enqueued
            if bodies[e.body] != int(_status(by_id, e.message_id) in SENT)
        ],
    )
    report.expect_none(
        "messages to a refused or never-writing number not dead-lettered",
        [
            e.message_id
            for e in load.enqueued
            if e.must_die and _status(by_id, e.message_id) != "dead"
        ],
    )
    report.expect_none("messages under the load's keys it never enqueued", set(ours) - enqueued_ids)
    report.expect_none(
        "STOP/START/HELP without exactly one reply",
        [sid for sid in load.keywords if replied[sid] != 1],
    )
    report.expect_none("replies to no STOP/START/HELP", replied.keys() - load.keywords.keys())
    report.expect_none(
        "consent replies not of kind COMPLIANCE",
        [m["id"] for m in replies if m["kind"] != "compliance"],
    )
    # A run that never met one of Twilio's faults proved less than it claims.
    unmet = [fault for fault in ("server_error", "rate_limited") if not faults[fault]]
    if not stats["timeouts_after_accept"]:
        unmet.append("timeout_after_accept")
    report.expect_none("Twilio fault kinds the run never met", unmet)


def _consent(records: Records, load: Load, report: Report) -> None:
    by_id = {message["id"]: message for message in records.messages}
    bodies = Counter(sent["body"] for sent in records.sandbox)
    to_opted_out = [e for e in load.enqueued if e.must_block]
    sent_anyway = [e.message_id for e in to_opted_out if bodies[e.body]]
    not_blocked = [e.message_id for e in to_opted_out if _status(by_id, e.message_id) != "blocked"]
    subjects = Counter(event["subject"] for event in records.consent_events)
    violations = consent_violations(records)
    report.section(
        "consent",
        [
            (
                "opt-outs / opt-ins recorded",
                f"{subjects[OPT_OUT_RECORDED]} / {subjects[OPT_OUT_REMOVED]}",
            ),
            ("messages enqueued to opted-out recipients", len(to_opted_out)),
            (
                "  blocked / accepted by Twilio",
                f"{len(to_opted_out) - len(not_blocked)} / {len(sent_anyway)}",
            ),
            ("conversational sends after a committed opt-out", len(violations)),
        ],
    )
    report.expect_none("messages to opted-out recipients accepted by Twilio", sent_anyway)
    report.expect_none("messages to opted-out recipients not blocked", not_blocked)
    report.expect_none("consent violations", violations)


def _claims(records: Records, load: Load, accepted: Mapping[str, str], report: Report) -> None:
    claims = [sid for sid in load.claims if sid in accepted]
    unhandled = [sid for sid in claims if sid not in records.catalog_ledger]
    replies = {sid: records.claim_replies.get(f"{CLAIM_REPLY_KEY}{sid}") for sid in claims}
    unanswered = [sid for sid, reply in replies.items() if reply is None]
    answered = {sid: reply for sid, reply in replies.items() if reply is not None}
    refused = [sid for sid, reply in answered.items() if reply["failure"]]
    not_enqueued = [
        sid for sid, reply in answered.items() if not (reply["enqueued"] or reply["failure"])
    ]
    outbox_count = Counter(reply["in_outbox"] for reply in answered.values() if reply["enqueued"])
    report.section(
        "claims (live_catalog)",
        [
            ("claims and cancels answered 200", len(claims)),
            ("  by content", counts(Counter(load.claims[sid] for sid in claims))),
            ("  handled by the catalog (its ledger)", len(claims) - len(unhandled)),
            ("  with one reply / none", f"{len(answered)} / {len(unanswered)}"),
            ("  replies refused by the outbox for good", len(refused)),
            ("  outbox messages per enqueued reply", counts(Counter(map(str, outbox_count)))),
            ("reservations, by status", counts(records.reservations)),
            ("items oversold or miscounted", len(records.oversold)),
            ("clients holding an item twice", len(records.twice_reserved)),
        ],
    )
    report.expect_none("claims the catalog never handled (lost)", unhandled)
    report.expect_none("claims without a reply", unanswered)
    report.expect_none("claim replies never handed to the outbox", not_enqueued)
    report.expect_none("claim replies refused by the outbox", refused)
    report.expect_none(
        "claim replies without exactly one outbox message",
        [sid for sid, reply in answered.items() if reply["enqueued"] and reply["in_outbox"] != 1],
    )
    report.expect_none(
        "items oversold or whose counters disagree with their reservations",
        [dict(row) for row in records.oversold],
    )
    report.expect_none("clients with two live reservations of one item", records.twice_reserved)
    if not records.reservations["held"] or not records.reservations["waiting"]:
        report.problems.append(
            f"the run never held and waitlisted claims: {counts(records.reservations)}"
        )


def consent_violations(records: Records) -> list[str]:
    """Conversational messages Twilio accepted although the recipient's opt-out was committed
    before the message was enqueued (its event was relayed, which happens only after commit)
    and no opt-in can have been committed before the message's consent check (which precedes
    the message's final write)."""
    history: dict[tuple[str, str], list[asyncpg.Record]] = defaultdict(list)
    for event in records.consent_events:
        history[(event["tenant_id"], event["aggregate_id"])].append(event)
    accepted = {sent["sid"] for sent in records.sandbox}
    found: list[str] = []
    for message in records.messages:
        if message["kind"] == "compliance" or message["twilio_sid"] not in accepted:
            continue
        changes = history[
            (message["tenant_id"], f"{message['recipient_channel']}:{message['recipient']}")
        ]
        committed_before = [
            e
            for e in changes
            if e["subject"] == OPT_OUT_RECORDED
            and e["published_at"] is not None
            and e["published_at"] < message["created_at"]
        ]
        if not committed_before:
            continue
        latest = max(e["created_at"] for e in committed_before)
        if not any(
            e["subject"] == OPT_OUT_REMOVED and latest < e["created_at"] < message["updated_at"]
            for e in changes
        ):
            found.append(message["id"])
    return found


def _attempt(row: asyncpg.Record) -> str:
    took = (row["finished_at"] - row["started_at"]).total_seconds()
    started = row["started_at"].strftime("%H:%M:%S.%f")[:-3]
    detail = " ".join(
        str(value)
        for value in (row["http_status"], row["error_code"], row["error_message"])
        if value is not None
    )
    return f"{started} +{took:.2f}s {row['outcome']} {detail} [{row['worker_id']}]"


def _dead(messages: Iterable[asyncpg.Record]) -> list[asyncpg.Record]:
    return [message for message in messages if message["status"] == "dead"]


def _status(by_id: Mapping[str, asyncpg.Record], message_id: str) -> str | None:
    message = by_id.get(message_id)
    return None if message is None else str(message["status"])

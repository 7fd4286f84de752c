"""Routing's pure rules: consent keywords, live signals and what to do with one inbound message.

No I/O here. The consumer gathers the facts (the message, the sender's role from seller_admin,
the tenant's consent settings) and asks `decide()`; everything it returns is data.

Consent keywords are matched on the whole message: one word, trimmed of spaces and of
surrounding punctuation, compared without case and without accents ("Arrêt !" is ARRET). Twilio's
`OptOutType` (set when Advanced Opt-Out is enabled on a Messaging Service) wins over our own
match: Twilio has then already classified the message with the keywords configured in its
console, and has already sent its own confirmation, so we record the change but do not reply.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum

import phonenumbers

OPT_OUT_KEYWORDS = frozenset({"STOP", "STOPALL", "UNSUBSCRIBE", "CANCEL", "END", "QUIT", "ARRET"})
OPT_IN_KEYWORDS = frozenset({"START", "YES", "UNSTOP"})
HELP_KEYWORDS = frozenset({"HELP", "INFO", "AIDE"})

DEFAULT_ITEM_CODE_PATTERN = r"^[A-Za-z]{1,3}\d{1,4}$"

# Messages made only of these words are small talk, never a live signal, even from a seller.
GREETINGS = frozenset(
    "SALUT BONJOUR BONSOIR COUCOU HELLO HI HEY YO CC SLT BJR MERCI THANKS OK OKAY "
    "A TOUS TOUT LE MONDE".split()
)

DEFAULT_OPT_OUT_REPLY = (
    "Vous êtes désinscrit(e) et ne recevrez plus de messages de notre part. "
    "Répondez START pour vous réinscrire."
)
DEFAULT_OPT_IN_REPLY = "Vous êtes réinscrit(e). Répondez STOP pour ne plus recevoir de messages."
DEFAULT_HELP_REPLY = (
    "Pour réserver un article pendant un live, répondez avec son code (ex. A12). "
    "Répondez STOP pour vous désinscrire, START pour vous réinscrire."
)

_PUNCTUATION_AROUND = ".,;:!?¡¿'\"()[]{}«»-_*~ \t\r\n"
_WORD = re.compile(r"[A-Z0-9]+")


class ConsentIntent(StrEnum):
    OPT_OUT = "opt_out"
    OPT_IN = "opt_in"
    HELP = "help"


class SenderRole(StrEnum):
    SELLER = "seller"
    CLIENT = "client"


class DecisionKind(StrEnum):
    OPT_OUT = "opt_out"
    OPT_IN = "opt_in"
    HELP = "help"
    LIVE_SIGNAL = "live_signal"
    CONVERSATION = "conversation"


class LiveSignalKind(StrEnum):
    SELLER_MESSAGE = "seller_message"
    ITEM_CODE = "item_code"


# Twilio's OptOutType values (Advanced Opt-Out) and the intent each one means.
TWILIO_OPT_OUT_TYPES: Mapping[str, ConsentIntent] = {
    "STOP": ConsentIntent.OPT_OUT,
    "START": ConsentIntent.OPT_IN,
    "HELP": ConsentIntent.HELP,
}


def normalise_keyword(text: str) -> str:
    """`"  Arrêt ! "` -> `"ARRET"`: trimmed of spaces and punctuation, accents removed
    (NFKD then dropping combining marks), upper case."""
    decomposed = unicodedata.normalize("NFKD", text.strip(_PUNCTUATION_AROUND))
    bare = "".join(c for c in decomposed if not unicodedata.combining(c))
    return bare.upper()


class KeywordConflictError(ValueError):
    """A keyword was given two meanings (e.g. a tenant adds STOP as an opt-in word)."""


@dataclass(frozen=True, slots=True)
class ConsentKeywords:
    opt_out: frozenset[str] = OPT_OUT_KEYWORDS
    opt_in: frozenset[str] = OPT_IN_KEYWORDS
    help: frozenset[str] = HELP_KEYWORDS

    def __post_init__(self) -> None:
        for left, right in ((self.opt_out, self.opt_in), (self.opt_out, self.help)):
            if clash := left & right:
                raise KeywordConflictError(f"keyword(s) with two meanings: {sorted(clash)}")
        if clash := self.opt_in & self.help:
            raise KeywordConflictError(f"keyword(s) with two meanings: {sorted(clash)}")

    def extended(
        self,
        *,
        opt_out: Iterable[str] = (),
        opt_in: Iterable[str] = (),
        help: Iterable[str] = (),
    ) -> ConsentKeywords:
        """These keywords plus a tenant's additions (normalised; each must be one word)."""
        return ConsentKeywords(
            opt_out=self.opt_out | _single_words(opt_out),
            opt_in=self.opt_in | _single_words(opt_in),
            help=self.help | _single_words(help),
        )

    def match(self, body: str) -> tuple[ConsentIntent, str] | None:
        """The intent of a one-word message and the keyword it matched, else None."""
        keyword = normalise_keyword(body)
        if not keyword or any(c.isspace() for c in keyword):
            return None
        if keyword in self.opt_out:
            return ConsentIntent.OPT_OUT, keyword
        if keyword in self.opt_in:
            return ConsentIntent.OPT_IN, keyword
        if keyword in self.help:
            return ConsentIntent.HELP, keyword
        return None


def _single_words(words: Iterable[str]) -> frozenset[str]:
    normalised = set()
    for word in words:
        keyword = normalise_keyword(word)
        if not keyword or any(c.isspace() for c in keyword):
            raise KeywordConflictError(f"consent keyword {word!r} must be a single word")
        normalised.add(keyword)
    return frozenset(normalised)


@dataclass(frozen=True, slots=True)
class ConsentReplies:
    opt_out: str = DEFAULT_OPT_OUT_REPLY
    opt_in: str = DEFAULT_OPT_IN_REPLY
    help: str = DEFAULT_HELP_REPLY

    def for_intent(self, intent: ConsentIntent) -> str:
        return {
            ConsentIntent.OPT_OUT: self.opt_out,
            ConsentIntent.OPT_IN: self.opt_in,
            ConsentIntent.HELP: self.help,
        }[intent]


class ConsentScope(StrEnum):
    """What one consent expression covers. PERSON (the default): the person's phone number on
    every phone channel of the tenant, so a STOP on WhatsApp stops SMS to the same number too.
    CHANNEL (a tenant's narrower setting): the channel it was expressed on only. Messenger
    addresses are page-scoped ids, never phone numbers: consent there is always per channel."""

    PERSON = "person"
    CHANNEL = "channel"


@dataclass(frozen=True, slots=True)
class TenantRules:
    """Everything tenant-specific `decide()` and the consent ledger need."""

    keywords: ConsentKeywords = field(default_factory=ConsentKeywords)
    replies: ConsentReplies = field(default_factory=ConsentReplies)
    item_code: re.Pattern[str] = re.compile(DEFAULT_ITEM_CODE_PATTERN)
    consent_scope: ConsentScope = ConsentScope.PERSON


@dataclass(frozen=True, slots=True)
class InboundFacts:
    """The parts of an inbound message the rules look at."""

    body: str
    media_count: int = 0
    opt_out_type: str = ""


@dataclass(frozen=True, slots=True)
class Decision:
    """What to do with one inbound message. `reply` is the text to send back (None: nothing)."""

    kind: DecisionKind
    keyword: str = ""
    consent: ConsentIntent | None = None
    live_signal: LiveSignalKind | None = None
    reply: str | None = None
    # True when Twilio already classified (and answered) the keyword itself.
    twilio_handled: bool = False

    @property
    def touches_live_session(self) -> bool:
        return self.live_signal is not None


_DECISION_FOR_INTENT = {
    ConsentIntent.OPT_OUT: DecisionKind.OPT_OUT,
    ConsentIntent.OPT_IN: DecisionKind.OPT_IN,
    ConsentIntent.HELP: DecisionKind.HELP,
}


def consent_intent(
    facts: InboundFacts, keywords: ConsentKeywords
) -> tuple[ConsentIntent, str, bool] | None:
    """(intent, keyword, decided by Twilio) for a consent message, else None."""
    twilio_intent = TWILIO_OPT_OUT_TYPES.get(facts.opt_out_type.strip().upper())
    if twilio_intent is not None:
        return twilio_intent, normalise_keyword(facts.body) or facts.opt_out_type.upper(), True
    matched = keywords.match(facts.body)
    if matched is None:
        return None
    return matched[0], matched[1], False


def is_greeting(body: str) -> bool:
    words = _WORD.findall(normalise_keyword(body))
    return bool(words) and all(word in GREETINGS for word in words)


def live_signal(
    facts: InboundFacts, role: SenderRole, item_code: re.Pattern[str]
) -> LiveSignalKind | None:
    """Seed story 2.6, option A: any seller message, or a client message that is an item code.
    Empty, media-only and greeting messages are never a signal, whoever sends them."""
    text = facts.body.strip()
    if not text or is_greeting(text):
        return None
    if role is SenderRole.SELLER:
        return LiveSignalKind.SELLER_MESSAGE
    if item_code.fullmatch(text):
        return LiveSignalKind.ITEM_CODE
    return None


class ConsentOutcome(StrEnum):
    """What the consent ledger did with a keyword."""

    CHANGED = "changed"
    UNCHANGED = "unchanged"
    # A newer consent message from the same person was applied first (messages are processed
    # concurrently and redelivered out of order); this older one must not undo it.
    STALE = "stale"


def consent_reply(decision: Decision, outcome: ConsentOutcome) -> str | None:
    """The confirmation to send once the ledger has applied the decision.

    A stale keyword gets no reply: the person already has the confirmation of their newer
    choice, and a contradicting one would mislead them. An opt-in that changed nothing (a "YES"
    in conversation from someone who never opted out) gets none either. A repeated STOP is
    confirmed again: the person wants to be sure it worked."""
    if decision.reply is None or outcome is ConsentOutcome.STALE:
        return None
    if decision.consent is ConsentIntent.OPT_IN and outcome is ConsentOutcome.UNCHANGED:
        return None
    return decision.reply


@dataclass(frozen=True, slots=True)
class RulesBook:
    """The default rules and each tenant's own (configured additions, replies, code pattern)."""

    default: TenantRules = field(default_factory=TenantRules)
    tenants: Mapping[str, TenantRules] = field(default_factory=dict)

    def for_tenant(self, tenant_id: str) -> TenantRules:
        return self.tenants.get(tenant_id, self.default)


def decide(facts: InboundFacts, role: SenderRole, rules: TenantRules) -> Decision:
    """The routing decision for one inbound message. Consent comes first and applies to sellers
    too; a consent keyword is never a live signal."""
    consent = consent_intent(facts, rules.keywords)
    if consent is not None:
        intent, keyword, twilio_handled = consent
        return Decision(
            kind=_DECISION_FOR_INTENT[intent],
            keyword=keyword,
            consent=intent,
            reply=None if twilio_handled else rules.replies.for_intent(intent),
            twilio_handled=twilio_handled,
        )
    signal = live_signal(facts, role, rules.item_code)
    if signal is not None:
        return Decision(kind=DecisionKind.LIVE_SIGNAL, live_signal=signal)
    return Decision(kind=DecisionKind.CONVERSATION)


class Channel(StrEnum):
    SMS = "sms"
    WHATSAPP = "whatsapp"
    MESSENGER = "messenger"


class ConsentState(StrEnum):
    OPTED_OUT = "opted_out"
    OPTED_IN = "opted_in"


class ConsentSource(StrEnum):
    KEYWORD = "keyword"
    OPERATOR = "operator"
    CARRIER = "carrier"


PHONE_CHANNELS = (Channel.SMS, Channel.WHATSAPP)
# The key of the person-wide opt-out row (opt_outs.scope_key), next to the channels' own keys.
PERSON_KEY = "person"


@dataclass(frozen=True, slots=True)
class Contact:
    """One person as seen by one tenant on one channel: the key of the 24-hour window, and of
    consent once widened to the person's number by `ConsentScope`."""

    tenant_id: str
    channel: Channel
    address: str

    @property
    def is_phone(self) -> bool:
        return self.channel in PHONE_CHANNELS

    @property
    def person_key(self) -> str | None:
        """The key of the person-wide opt-out that covers this contact (None on Messenger)."""
        return PERSON_KEY if self.is_phone else None

    @property
    def blocking_keys(self) -> tuple[str, ...]:
        """The opt-out keys any of which stops sending to this contact: its channel's, and the
        person-wide one on a phone channel."""
        return (self.channel.value, PERSON_KEY) if self.is_phone else (self.channel.value,)

    @property
    def lock_key(self) -> tuple[str, str, str]:
        """What consent changes of this contact are serialised on: the person on a phone
        channel (whatever the tenant's scope, so a STOP on WhatsApp and a START on SMS for one
        number never interleave), the channel's address otherwise."""
        return (self.tenant_id, PERSON_KEY if self.is_phone else self.channel.value, self.address)


@dataclass(frozen=True, slots=True)
class ConsentChange:
    """A consent expression to apply to the ledger. `effective_at` is when the person expressed
    it (the message's receive time), which orders it against their other expressions."""

    contact: Contact
    state: ConsentState
    effective_at: datetime
    source: ConsentSource
    actor: str
    message_sid: str = ""
    keyword: str = ""
    reason: str = ""
    # The tenant's setting; `scope` is what this change covers on its channel.
    tenant_scope: ConsentScope = ConsentScope.PERSON

    @property
    def scope(self) -> ConsentScope:
        return self.tenant_scope if self.contact.is_phone else ConsentScope.CHANNEL

    @property
    def lifted_keys(self) -> tuple[str, ...]:
        """The opt-out keys an opt-in deletes. A person's START on any channel lifts their
        person-wide opt-out (it stopped the channel they are writing on); under PERSON scope it
        also lifts the per-channel opt-outs of their other phone channels (recorded before the
        scope was per person), so the person is opted in everywhere, as they were opted out."""
        if self.scope is ConsentScope.PERSON:
            return (*(c.value for c in PHONE_CHANNELS), PERSON_KEY)
        return self.contact.blocking_keys

    @property
    def ordering_channels(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(channels whose every expression, channels whose person-wide expressions) order this
        change against: one newer than it makes it STALE."""
        phones = tuple(c.value for c in PHONE_CHANNELS)
        if self.scope is ConsentScope.PERSON:
            return phones, ()
        return (self.contact.channel.value,), (phones if self.contact.is_phone else ())


class ConsentLockedError(Exception):
    """An opt-in that may not lift the current opt-out; the message is safe to return."""


def check_opt_in_may_lift(opt_out_source: ConsentSource | None, change: ConsentChange) -> None:
    """Raise `ConsentLockedError` when `change` is an opt-in that may not lift the opt-out
    recorded with `opt_out_source` (None: no opt-out).

    A person's own STOP (keyword) and an opt-out their carrier reports (Twilio 21610, sent after
    a STOP to the carrier) are lifted only by that person: their START, a keyword opt-in. Nobody
    else re-subscribes them, whatever their role, operators (admin) included: a shop keen to
    message a client must not be able to undo the client's choice. An opt-out an operator set
    (SetConsent) may be lifted by an operator's opt-in, and that change is audited as any other.
    """
    if change.state is not ConsentState.OPTED_IN or opt_out_source is None:
        return
    if change.source is ConsentSource.KEYWORD or opt_out_source is ConsentSource.OPERATOR:
        return
    raise ConsentLockedError(f"{_LOCKED_BY[opt_out_source]}; only their own START opts them in")


_LOCKED_BY = {
    ConsentSource.KEYWORD: "the contact opted out with a STOP keyword",
    ConsentSource.CARRIER: "the contact's carrier reported an opt-out",
}


class InvalidAddressError(ValueError):
    """An address that cannot be a recipient; the message is safe to return to a caller."""


_E164 = re.compile(r"^\+[1-9]\d{6,14}$")


def normalise_address(channel: Channel, value: str) -> str:
    """The canonical form consent is keyed on: E.164 for phone numbers (`+33 6 12 34 56 78` ->
    `+33612345678`); WhatsApp user IDs and Messenger IDs are kept as given (trimmed)."""
    text = value.strip()
    if not text:
        raise InvalidAddressError("address is empty")
    if _E164.match(text):
        return text
    looks_like_number = text.startswith("+") or channel is Channel.SMS
    if not looks_like_number:
        return text
    try:
        parsed = phonenumbers.parse(text, None)
    except phonenumbers.NumberParseException:
        raise InvalidAddressError(f"{text!r} is not an E.164 phone number") from None
    if not phonenumbers.is_possible_number(parsed):
        raise InvalidAddressError(f"{text!r} is not an E.164 phone number")
    return phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164)

"""The live catalog's pure rules: the message grammar, the reply texts, the summaries. No I/O.

Grammar (keywords compared without case and without accents, French and English):
- a seller posts or edits an item: `A12 Robe rouge T38 25€ x3` (code first; a price `25€`,
  `25,50 €`, `€25` or `25 eur`; a stock `x3`, 1 when absent; an optional per-client limit
  `max2`; the remaining words are the title). A title or a price is required.
- a seller changes the stock: `A12 stock 5`; closes an item: `A12 fin` (`end`, `close`).
- a client claims: `A12` (one unit) or `A12 x2`; cancels: `ANNULER A12` (`CANCEL A12`).

A seller message that starts with an item code but fits none of these gets the help reply; one
that does not start with a code is conversation and not the catalog's. A client message that
is neither a claim nor a cancel is conversation too.

The claim itself (who gets a unit, who waits) is decided by one conditional UPDATE in
`store.py`: the database is the only place that sees every concurrent claim.
"""

from __future__ import annotations

import re
import string
import unicodedata
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from datetime import datetime, timedelta
from enum import StrEnum

DEFAULT_ITEM_CODE_PATTERN = r"[A-Za-z]{1,3}\d{1,4}"
CANCEL_KEYWORDS = frozenset({"ANNULER", "ANNULE", "ANNULATION", "CANCEL"})
STOCK_KEYWORDS = frozenset({"STOCK"})
CLOSE_KEYWORDS = frozenset({"FIN", "FINI", "FERME", "END", "CLOSE", "CLOSED"})

MAX_STOCK = 10_000
MAX_PER_CLIENT = 100
MAX_TITLE_CHARS = 200
MAX_PRICE_CENTS = 100_000_000
# WhatsApp free-form replies are only delivered within 24 hours of the client's last message.
WHATSAPP_WINDOW = timedelta(hours=24)
# Twilio's limit for one message body.
MAX_BODY_CHARS = 1600

_QUANTITY = re.compile("^[x\u00d7*]([0-9]{1,5})$", re.IGNORECASE)
_MAX = re.compile(r"^max(\d{1,3})$", re.IGNORECASE)
_AMOUNT = r"\d{1,7}(?:[.,]\d{1,2})?"
_PRICE = re.compile(
    rf"(?:^|\s)(?:€\s*(?P<before>{_AMOUNT})|(?P<after>{_AMOUNT})\s*(?:€|eur|euros?))(?=\s|$)",
    re.IGNORECASE,
)
_MAX_SPLIT = re.compile(r"(?:^|\s)max\s+(\d{1,3})(?=\s|$)", re.IGNORECASE)


class InvalidRequestError(ValueError):
    """A request value is malformed (INVALID_ARGUMENT); the message is one line."""


class NotFoundError(LookupError):
    """No such item, reservation or session for this tenant (NOT_FOUND)."""


class AlreadyExistsError(Exception):
    """The item code is taken in this session (ALREADY_EXISTS)."""


class PreconditionError(Exception):
    """The change contradicts the current state, e.g. stock below what is held
    (FAILED_PRECONDITION)."""


class ItemStatus(StrEnum):
    OPEN = "open"
    CLOSED = "closed"


class ReservationStatus(StrEnum):
    HELD = "held"
    WAITING = "waiting"
    CONFIRMED = "confirmed"
    RELEASED = "released"


class ReleaseReason(StrEnum):
    CANCELLED = "cancelled"
    EXPIRED = "expired"
    ITEM_CLOSED = "item_closed"
    SESSION_ENDED = "session_ended"


# --- the grammar --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PostItem:
    code: str
    title: str
    price_cents: int | None
    stock: int
    max_per_client: int | None


@dataclass(frozen=True, slots=True)
class SetStock:
    code: str
    stock: int


@dataclass(frozen=True, slots=True)
class CloseItem:
    code: str


@dataclass(frozen=True, slots=True)
class SellerHelp:
    """Starts with an item code but is not a command this grammar knows."""

    code: str


@dataclass(frozen=True, slots=True)
class Claim:
    code: str
    quantity: int


@dataclass(frozen=True, slots=True)
class Cancel:
    code: str


SellerCommand = PostItem | SetStock | CloseItem | SellerHelp
ClientCommand = Claim | Cancel


def normalise_word(word: str) -> str:
    """`"Annulé!"` -> `"ANNULE"`: accents and surrounding punctuation removed, upper case."""
    decomposed = unicodedata.normalize("NFKD", word.strip(string.punctuation + " "))
    return "".join(c for c in decomposed if not unicodedata.combining(c)).upper()


@dataclass(frozen=True, slots=True)
class Grammar:
    """The keywords and item-code pattern of one tenant (defaults, plus its additions)."""

    item_code: re.Pattern[str] = re.compile(DEFAULT_ITEM_CODE_PATTERN)
    cancel: frozenset[str] = CANCEL_KEYWORDS
    stock: frozenset[str] = STOCK_KEYWORDS
    close: frozenset[str] = CLOSE_KEYWORDS

    def extended(
        self,
        *,
        cancel: Iterable[str] = (),
        stock: Iterable[str] = (),
        close: Iterable[str] = (),
        item_code: str | None = None,
    ) -> Grammar:
        return Grammar(
            item_code=re.compile(item_code) if item_code else self.item_code,
            cancel=self.cancel | {normalise_word(w) for w in cancel},
            stock=self.stock | {normalise_word(w) for w in stock},
            close=self.close | {normalise_word(w) for w in close},
        )

    def code(self, word: str) -> str | None:
        """The word as an item code (upper case), or None."""
        bare = word.strip(string.punctuation.replace("*", "") + " ")
        return bare.upper() if self.item_code.fullmatch(bare) else None

    def parse_client(self, body: str) -> ClientCommand | None:
        words = body.split()
        if len(words) == 1:
            code = self.code(words[0])
            return None if code is None else Claim(code, 1)
        if len(words) == 2:
            if normalise_word(words[0]) in self.cancel:
                code = self.code(words[1])
                return None if code is None else Cancel(code)
            code, quantity = self.code(words[0]), _QUANTITY.match(words[1])
            if code is not None and quantity is not None:
                return Claim(code, int(quantity.group(1)))
        return None

    def parse_seller(self, body: str) -> SellerCommand | None:
        words = body.split()
        if not words:
            return None
        code = self.code(words[0])
        if code is None:
            return None
        rest = words[1:]
        keyword = normalise_word(rest[0]) if rest else ""
        if len(rest) == 1 and keyword in self.close:
            return CloseItem(code)
        if len(rest) == 2 and keyword in self.stock and rest[1].isdigit():
            stock = int(rest[1])
            return SetStock(code, stock) if stock <= MAX_STOCK else SellerHelp(code)
        if keyword in self.stock or keyword in self.close:
            return SellerHelp(code)
        return _post_item(code, " ".join(rest))


def _post_item(code: str, text: str) -> SellerCommand:
    price_cents = None
    match = _PRICE.search(text)
    if match is not None:
        price_cents = parse_price(match.group("before") or match.group("after"))
        text = text[: match.start()] + " " + text[match.end() :]
    text = _MAX_SPLIT.sub(lambda m: f" max{m.group(1)}", text)
    stock, max_per_client, title_words = 1, None, []
    for word in text.split():
        if quantity := _QUANTITY.match(word):
            stock = int(quantity.group(1))
        elif limit := _MAX.match(word):
            max_per_client = int(limit.group(1))
        else:
            title_words.append(word)
    title = " ".join(title_words)
    if (not title and price_cents is None) or len(title) > MAX_TITLE_CHARS:
        return SellerHelp(code)
    if not 1 <= stock <= MAX_STOCK or (max_per_client is not None and max_per_client < 1):
        return SellerHelp(code)
    return PostItem(code, title, price_cents, stock, max_per_client)


def parse_price(amount: str) -> int:
    """`"25"` -> 2500, `"25,5"` -> 2550, `"25.50"` -> 2550."""
    units, _, decimals = amount.replace(",", ".").partition(".")
    return int(units) * 100 + int((decimals + "00")[:2])


def format_price(cents: int, currency: str = "EUR") -> str:
    """2550 -> `"25,50 €"`; whole amounts without decimals (`"25 €"`)."""
    units, rest = divmod(cents, 100)
    amount = f"{units}" if rest == 0 else f"{units},{rest:02d}"
    return f"{amount} €" if currency == "EUR" else f"{amount} {currency}"


# --- values checked at the API's edge -------------------------------------------------------


def item_code(value: str, grammar: Grammar | None = None) -> str:
    code = (grammar or Grammar()).code(value.strip())
    if code is None:
        raise InvalidRequestError(f"code {value[:20]!r} is not an item code such as A12")
    return code


def stock(value: int) -> int:
    if not 0 <= value <= MAX_STOCK:
        raise InvalidRequestError(f"stock must be between 0 and {MAX_STOCK}, got {value}")
    return value


def max_per_client(value: int) -> int:
    if not 1 <= value <= MAX_PER_CLIENT:
        raise InvalidRequestError(
            f"max_per_client must be between 1 and {MAX_PER_CLIENT}, got {value}"
        )
    return value


def title(value: str) -> str:
    text = " ".join(value.split())
    if len(text) > MAX_TITLE_CHARS:
        raise InvalidRequestError(f"title is longer than {MAX_TITLE_CHARS} characters")
    return text


def price_cents(value: int) -> int:
    if not 0 <= value <= MAX_PRICE_CENTS:
        raise InvalidRequestError(f"price_cents must be between 0 and {MAX_PRICE_CENTS}")
    return value


def currency(value: str) -> str:
    code = value.strip().upper() or "EUR"
    if not re.fullmatch(r"[A-Z]{3}", code):
        raise InvalidRequestError(f"currency {value[:10]!r} is not an ISO 4217 code")
    return code


def uuid_of(field_name: str, value: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except ValueError:
        raise InvalidRequestError(f"{field_name} must be a UUID") from None


def within_whatsapp_window(last_inbound: datetime, now: datetime) -> bool:
    return now - last_inbound < WHATSAPP_WINDOW


# --- replies --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Replies:
    """Reply texts; `{placeholders}` are filled by `render`. French defaults, each replaceable
    per tenant (LIVE_CATALOG_TENANT_SETTINGS)."""

    held: str = "{code} est réservé pour vous ({quantity} x {title}) pendant {hold_minutes} min."
    waiting: str = (
        "{code} est épuisé pour le moment : vous êtes n°{position} sur la liste d'attente."
    )
    sold_out: str = "{code} est épuisé."
    unknown_code: str = "Code {code} inconnu. Vérifiez le code annoncé pendant le live."
    session_ended: str = "Ce live est terminé : {code} n'est plus disponible."
    item_closed: str = "{code} n'est plus disponible."
    over_limit: str = "{code} : {limit} unité(s) au maximum par personne."
    already_held: str = "Vous avez déjà une réservation pour {code}."
    already_waiting: str = "Vous êtes déjà n°{position} sur la liste d'attente de {code}."
    cancelled: str = "Votre réservation de {code} est annulée."
    nothing_to_cancel: str = "Vous n'avez pas de réservation pour {code}."
    confirmed_cannot_cancel: str = (
        "Votre réservation de {code} est déjà confirmée : contactez le vendeur."
    )
    promoted: str = "{code} est à vous ! Il vous est réservé pendant {hold_minutes} min."
    expired: str = "Votre réservation de {code} a expiré."
    seller_posted: str = "{code} publié : {details}, stock {stock}."
    seller_updated: str = "{code} modifié : {details}, stock {stock}."
    seller_stock: str = "Stock de {code} : {stock}."
    seller_stock_refused: str = (
        "Stock de {code} inchangé : {committed} unité(s) déjà réservée(s) ou vendue(s), "
        "impossible de descendre à {stock}."
    )
    seller_closed: str = "{code} est fermé aux réservations."
    seller_unknown_code: str = "Code {code} inconnu dans ce live."
    seller_no_session: str = "Aucun live en cours."
    seller_help: str = (
        "Pour publier : A12 Robe rouge T38 25€ x3 (max2 : 2 par client). "
        "Stock : A12 stock 5. Fermer : A12 fin."
    )
    buyer_summary: str = "Récapitulatif du live : {lines}. Merci !"
    seller_summary: str = "Récapitulatif du live : {lines}."

    def render(self, name: str, **values: object) -> str:
        text: str = getattr(self, name).format(**values)
        return text[:MAX_BODY_CHARS]

    def overridden(self, texts: Mapping[str, str]) -> Replies:
        """These replies with some replaced; unknown names or placeholders raise ValueError."""
        known = {f.name for f in fields(self)}
        for name, text in texts.items():
            if name not in known:
                raise ValueError(f"unknown reply {name!r}")
            allowed = set(_placeholders(getattr(self, name)))
            extra = set(_placeholders(text)) - allowed
            if extra:
                raise ValueError(f"reply {name!r} uses unknown placeholder(s) {sorted(extra)}")
        return replace(self, **dict(texts))


def _placeholders(text: str) -> list[str]:
    return [name for _, name, _, _ in string.Formatter().parse(text) if name]


@dataclass(frozen=True, slots=True)
class TenantSettings:
    grammar: Grammar = field(default_factory=Grammar)
    replies: Replies = field(default_factory=Replies)
    # The WhatsApp template for a summary outside the 24-hour window; variable "1" is the text.
    summary_content_sid: str = ""


@dataclass(frozen=True, slots=True)
class SettingsBook:
    default: TenantSettings = field(default_factory=TenantSettings)
    tenants: Mapping[str, TenantSettings] = field(default_factory=dict)

    def for_tenant(self, tenant_id: str) -> TenantSettings:
        return self.tenants.get(tenant_id, self.default)


# --- summaries ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BuyerLine:
    code: str
    title: str
    quantity: int
    status: ReservationStatus
    price_cents: int | None
    currency: str


_BUYER_STATUS = {
    ReservationStatus.HELD: "réservé",
    ReservationStatus.CONFIRMED: "confirmé",
    ReservationStatus.WAITING: "liste d'attente",
    ReservationStatus.RELEASED: "libéré",
}


def buyer_summary_lines(lines: Sequence[BuyerLine]) -> str:
    """`A12 Robe (25 €) x1 réservé ; B3 Sac x1 liste d'attente`, in code order."""
    parts = []
    for line in sorted(lines, key=lambda line: line.code):
        price = f" ({format_price(line.price_cents, line.currency)})" if line.price_cents else ""
        label = f"{line.code} {line.title}".strip()
        parts.append(f"{label}{price} x{line.quantity} {_BUYER_STATUS[line.status]}")
    return " ; ".join(parts)


@dataclass(frozen=True, slots=True)
class ItemTotals:
    code: str
    title: str
    stock: int
    held: int
    confirmed: int
    released: int
    waiting: int


def seller_summary_lines(items: Sequence[ItemTotals]) -> str:
    """Totals first, then one part per item: `A12 2/3 réservés, 1 confirmé, 4 en attente`."""
    held = sum(i.held for i in items)
    confirmed = sum(i.confirmed for i in items)
    released = sum(i.released for i in items)
    waiting = sum(i.waiting for i in items)
    parts = [
        f"{len(items)} article(s), {held} réservé(s), {confirmed} confirmé(s), "
        f"{released} libéré(s), {waiting} en attente"
    ]
    for item in sorted(items, key=lambda i: i.code):
        parts.append(
            f"{item.code} {item.held + item.confirmed}/{item.stock} pris "
            f"({item.confirmed} confirmé(s)), {item.waiting} en attente"
        )
    return " ; ".join(parts)


# --- values ---------------------------------------------------------------------------------


class Channel(StrEnum):
    SMS = "sms"
    WHATSAPP = "whatsapp"
    MESSENGER = "messenger"


@dataclass(frozen=True, slots=True)
class Contact:
    channel: Channel
    value: str


@dataclass(frozen=True, slots=True)
class ReplyRoute:
    """How to answer someone: Twilio `From` (the business address or Messaging Service the
    message came through) and the account it belongs to."""

    sender: str
    account_sid: str


@dataclass(frozen=True, slots=True)
class Inbound:
    """One routed inbound message, as the catalog needs it."""

    message_sid: str
    tenant_id: str
    from_seller: bool
    # Set when routing touched the live session (a live signal).
    session_id: uuid.UUID | None
    body: str
    received_at: datetime
    contact: Contact
    route: ReplyRoute


@dataclass(frozen=True, slots=True)
class Item:
    id: uuid.UUID
    tenant_id: str
    session_id: uuid.UUID
    code: str
    title: str
    price_cents: int | None
    currency: str
    stock: int
    held: int
    confirmed: int
    waiting: int
    max_per_client: int
    status: ItemStatus
    created_at: datetime
    updated_at: datetime

    @property
    def sold_out(self) -> bool:
        return self.held + self.confirmed >= self.stock

    @property
    def sold_for_good(self) -> bool:
        """Every unit confirmed: no hold can lapse, so a waitlist would never be served."""
        return self.held == 0 and self.confirmed >= self.stock


@dataclass(frozen=True, slots=True)
class Reservation:
    id: uuid.UUID
    tenant_id: str
    session_id: uuid.UUID
    item_id: uuid.UUID
    item_code: str
    client: Contact
    quantity: int
    status: ReservationStatus
    release_reason: ReleaseReason | None
    message_sid: str
    received_at: datetime
    expires_at: datetime | None
    updated_at: datetime
    waitlist_position: int = 0


@dataclass(frozen=True, slots=True)
class SessionTotals:
    tenant_id: str
    session_id: uuid.UUID
    items: Sequence[ItemTotals]
    buyers: int
    summarized_at: datetime | None

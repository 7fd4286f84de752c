"""Fault injection settings of the sandbox and the per-request decision (no I/O).

Each create request draws one number from a seeded generator, so a sequence of requests
sent one after another gets the same outcomes on every run with the same seed.
"""

from __future__ import annotations

import enum
import random
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

# Statuses a message can be moved to by a status callback, in Twilio's forward order.
CALLBACK_STATUSES = ("queued", "sent", "delivered", "read", "failed", "undelivered")


class FaultConfigError(ValueError):
    """The fault configuration JSON is malformed; the message is one line for the caller."""


class Outcome(enum.Enum):
    ACCEPT = "accept"
    RATE_LIMIT = "rate_limit"
    SERVER_ERROR = "server_error"
    TIMEOUT_AFTER_ACCEPT = "timeout_after_accept"


@dataclass(frozen=True, slots=True)
class FaultConfig:
    error_rate: float = 0.0
    error_status: int = 500
    rate_limit_rate: float = 0.0
    retry_after_s: float = 1.0
    timeout_after_accept_rate: float = 0.0
    timeout_s: float = 10.0
    latency_ms: float = 0.0
    error_code_for: Mapping[str, int] = field(default_factory=dict)
    auto_callbacks: tuple[str, ...] = ()
    callback_delay_ms: float = 0.0
    seed: int | None = None

    @classmethod
    def from_json(cls, data: Any) -> FaultConfig:
        """Build from the `/_sandbox/faults` JSON; keys left out take their default."""
        if not isinstance(data, dict):
            raise FaultConfigError("fault config must be a JSON object")
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise FaultConfigError(f"unknown fault config keys: {', '.join(sorted(unknown))}")
        values: dict[str, Any] = {}
        for name in ("error_rate", "rate_limit_rate", "timeout_after_accept_rate"):
            if name in data:
                values[name] = _number(data, name, 0.0, 1.0)
        for name in ("retry_after_s", "timeout_s", "latency_ms", "callback_delay_ms"):
            if name in data:
                values[name] = _number(data, name, 0.0, 3600_000.0)
        if "error_status" in data:
            values["error_status"] = int(_number(data, "error_status", 400, 599))
        if "seed" in data and data["seed"] is not None:
            values["seed"] = int(_number(data, "seed", -(2**63), 2**63))
        if "error_code_for" in data:
            codes = data["error_code_for"]
            if not isinstance(codes, dict) or not all(
                isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool)
                for k, v in codes.items()
            ):
                raise FaultConfigError("error_code_for must map phone numbers to integer codes")
            values["error_code_for"] = dict(codes)
        if "auto_callbacks" in data:
            statuses = data["auto_callbacks"]
            if not isinstance(statuses, list) or not all(s in CALLBACK_STATUSES for s in statuses):
                raise FaultConfigError(
                    f"auto_callbacks must be a list of: {', '.join(CALLBACK_STATUSES)}"
                )
            values["auto_callbacks"] = tuple(statuses)
        config = cls(**values)
        if config.error_rate + config.rate_limit_rate + config.timeout_after_accept_rate > 1.0:
            raise FaultConfigError("the fault rates must add up to at most 1")
        return config

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["error_code_for"] = dict(self.error_code_for)
        data["auto_callbacks"] = list(self.auto_callbacks)
        return data


def _number(data: Mapping[str, Any], name: str, low: float, high: float) -> float:
    value = data[name]
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise FaultConfigError(f"{name} must be a number between {low:g} and {high:g}")
    return float(value)


class FaultPlan:
    """The active fault config plus its seeded generator."""

    def __init__(self, config: FaultConfig | None = None) -> None:
        self.config = config or FaultConfig()
        self._rng = random.Random(self.config.seed)

    def permanent_error_for(self, to: str) -> int | None:
        codes = self.config.error_code_for
        if not codes:
            return None
        code = codes.get(to)
        if code is None and ":" in to:
            code = codes.get(to.split(":", 1)[1])
        return code

    def draw(self) -> Outcome:
        config = self.config
        if not (config.rate_limit_rate or config.error_rate or config.timeout_after_accept_rate):
            return Outcome.ACCEPT
        # One draw per request; the rates split [0, 1) into consecutive bands.
        roll = self._rng.random()
        bound = config.rate_limit_rate
        if roll < bound:
            return Outcome.RATE_LIMIT
        bound += config.error_rate
        if roll < bound:
            return Outcome.SERVER_ERROR
        bound += config.timeout_after_accept_rate
        if roll < bound:
            return Outcome.TIMEOUT_AFTER_ACCEPT
        return Outcome.ACCEPT

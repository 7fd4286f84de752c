"""`NATS_URL` names one server or every server of a cluster, separated by commas; each URL is
checked, and the services connect with the whole list."""

from __future__ import annotations

import pytest

from infra.config import ConfigError, env_url_list, url_list

SCHEMES = ("nats", "tls")


def test_a_cluster_is_listed_with_commas_and_blanks_around_them_are_dropped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    value = "nats://nats-0:4222, nats://nats-1:4222,nats://nats-2:4222"
    monkeypatch.setenv("NATS_URL", value)
    assert env_url_list("NATS_URL", schemes=SCHEMES) == value
    assert url_list(value) == ["nats://nats-0:4222", "nats://nats-1:4222", "nats://nats-2:4222"]


def test_one_url_is_a_list_of_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NATS_URL", "tls://nats:4222")
    assert url_list(env_url_list("NATS_URL", schemes=SCHEMES)) == ["tls://nats:4222"]


@pytest.mark.parametrize(
    "value",
    ["nats://nats-0:4222,http://nats-1:4222", "nats://nats-0:4222,nats-1:4222", ", ,"],
)
def test_a_list_with_any_malformed_url_is_refused(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("NATS_URL", value)
    with pytest.raises(ConfigError, match="NATS_URL must be nats:// or tls:// URLs"):
        env_url_list("NATS_URL", schemes=SCHEMES)

"""`python -m tools.keys` builds a trusted key set the verifier loads, from public PEMs only."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from infra.auth import JwtVerifier, issue_token
from infra.keys import KeySetFile, new_signing_key
from tools.keys import main


def test_key_set_from_public_pems_verifies_tokens_of_those_keys(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    routing = new_signing_key("routing")
    public = routing.private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    (tmp_path / "routing.pub.pem").write_bytes(public)
    assert main([f"routing={tmp_path / 'routing.pub.pem'}"]) == 0
    (tmp_path / "trusted.json").write_text(capsys.readouterr().out)
    trusted = KeySetFile(
        str(tmp_path / "trusted.json"), setting="t", algorithms=frozenset({"ES256"})
    )
    token = issue_token(routing, sub="routing", role="service", audience="outbox")
    assert JwtVerifier(audience="outbox", trusted_keys=trusted).verify(token).sub == "routing"


def test_keys_other_than_p256_are_refused(tmp_path: Path) -> None:
    p384 = ec.generate_private_key(ec.SECP384R1())
    pem = p384.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    (tmp_path / "k.pem").write_bytes(pem)
    assert main([f"routing={tmp_path / 'k.pem'}"]) == 2
    assert main(["no-equals-sign"]) == 2

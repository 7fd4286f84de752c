"""NATS over TLS, as the prod overlay runs it: a server with a `tls` block and the users of
infra/nats_users.py; a service connects with `tls://` and NATS_TLS_CA_FILE, and a client that
does not trust the server's CA is refused before it sends its password."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import nats.errors
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from infra import jetstream
from infra.config import ConfigError
from infra.jetstream import NatsCredentials
from infra.nats_users import render_authorization
from tools.devstack import _nats_binary, free_port

PASSWORD = "gateway-test-password"


async def _close(client: nats.NATS) -> None:
    # After a failed handshake nats-py's close waits for the TLS writer forever (2.16).
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(client.close(), 1.0)


@dataclass(frozen=True)
class TlsServer:
    port: int
    ca_file: Path
    other_ca_file: Path


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _certificate(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: str,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    ca: bool,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsServer]:
    directory = tmp_path_factory.mktemp("nats-tls")
    ca_key, other_key, server_key = _key(), _key(), _key()
    (directory / "ca.crt").write_bytes(
        _pem(_certificate("test ca", ca_key, "test ca", ca_key, ca=True))
    )
    (directory / "other-ca.crt").write_bytes(
        _pem(_certificate("other ca", other_key, "other ca", other_key, ca=True))
    )
    (directory / "tls.crt").write_bytes(
        _pem(_certificate("nats", server_key, "test ca", ca_key, ca=False))
    )
    (directory / "tls.key").write_bytes(
        server_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    config = directory / "nats.conf"
    config.write_text(
        render_authorization(lambda user: f'"{PASSWORD}"')
        + f'tls {{\n  cert_file: "{directory / "tls.crt"}"\n'
        + f'  key_file: "{directory / "tls.key"}"\n}}\n'
    )
    port = free_port()
    with (directory / "nats-server.log").open("ab") as log:
        server = subprocess.Popen(
            [str(_nats_binary()), "-c", str(config), "-a", "127.0.0.1", "-p", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, "no nats-server"
                time.sleep(0.05)
        yield TlsServer(port, directory / "ca.crt", directory / "other-ca.crt")
    finally:
        server.terminate()
        server.wait(10)


async def test_a_service_connects_over_tls_with_the_configured_ca(tls_server: TlsServer) -> None:
    credentials = NatsCredentials("gateway", PASSWORD, str(tls_server.ca_file))
    client = await jetstream.connect(
        f"tls://127.0.0.1:{tls_server.port}", name="tls-test", credentials=credentials
    )
    try:
        await client.publish("gateway.v1.message.received", b"over tls")
        await client.flush()
        assert client.is_connected and client.connected_url.scheme == "tls"
    finally:
        await client.close()


@pytest.mark.parametrize("ca", ["other", "system"])
async def test_a_server_the_client_does_not_trust_is_refused(
    tls_server: TlsServer, ca: str
) -> None:
    ca_file = str(tls_server.other_ca_file) if ca == "other" else None
    options = NatsCredentials("gateway", PASSWORD, ca_file).options()
    client = nats.NATS()
    try:
        with pytest.raises(Exception, match="CERTIFICATE_VERIFY_FAILED"):
            await client.connect(
                f"tls://127.0.0.1:{tls_server.port}", allow_reconnect=False, **options
            )
    finally:
        await _close(client)


async def test_a_plain_connection_is_not_served(tls_server: TlsServer) -> None:
    """A `nats://` client meets a server that requires TLS: nats-py upgrades, then fails to
    verify a certificate the system does not trust; nothing is ever sent in clear."""
    client = nats.NATS()
    try:
        with pytest.raises((nats.errors.Error, OSError)):
            await client.connect(
                f"nats://127.0.0.1:{tls_server.port}",
                user="gateway",
                password=PASSWORD,
                allow_reconnect=False,
            )
    finally:
        await _close(client)


def test_credentials_are_validated_at_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NATS_USER", "gateway")
    monkeypatch.delenv("NATS_PASSWORD", raising=False)
    with pytest.raises(ConfigError, match="NATS_USER and NATS_PASSWORD"):
        NatsCredentials.from_env()
    monkeypatch.setenv("NATS_PASSWORD", "x")
    monkeypatch.setenv("NATS_TLS_CA_FILE", "/nonexistent/ca.crt")
    with pytest.raises(ConfigError, match="NATS_TLS_CA_FILE"):
        NatsCredentials.from_env()

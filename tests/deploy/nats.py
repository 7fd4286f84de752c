"""Loading a rendered overlay's NATS configuration into the nats-server the tests run (`-t`:
parse, resolve variables and includes, load TLS files, then exit), as the StatefulSet would."""

from __future__ import annotations

import datetime
import re
import subprocess
from collections.abc import Callable
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tools.deploy.render import Manifest
from tools.devstack import _nats_binary

from .manifests import container, find, find_generated

TLS_DIR = "/etc/nats-tls"


def check_nats_config(
    docs: list[Manifest], directory: Path, edit: Callable[[str], str] = lambda text: text
) -> subprocess.CompletedProcess[str]:
    """Every file of the nats-config ConfigMap (`edit`ed), a throw-away certificate where the
    Secret would be mounted, and exactly the environment the StatefulSet defines (values from
    Secrets or the pod replaced by stand-ins), so a password variable it lacks fails."""
    _self_signed(directory)
    for file, text in find_generated(docs, "ConfigMap", "nats-config-")["data"].items():
        (directory / file).write_text(edit(text).replace(TLS_DIR, str(directory)))
    env: dict[str, str] = {}
    for item in container(find(docs, "StatefulSet", "nats"), "nats")["env"]:
        value = item.get("value", f"value-of-{item['name']}")
        # Kubernetes expands $(VAR) from the variables defined before it.
        env[item["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], value)
    return subprocess.run(
        [str(_nats_binary()), "-t", "-c", str(directory / "nats.conf")],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def _self_signed(directory: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "nats")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("nats")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    (directory / "tls.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / "tls.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )

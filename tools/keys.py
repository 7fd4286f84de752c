"""Build the trusted key set (`SNAPSELL_TRUSTED_KEYS_FILE`) from public keys.

    openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out routing.pem
    openssl pkey -in routing.pem -pubout -out routing.pub.pem
    python -m tools.keys routing=routing.pub.pem outbox=outbox.pub.pem ... > trusted-keys.json

Each argument is `<kid>=<PEM file>`; the kid names the identity (`routing`, `operator.alice`,
`routing.2027-01` during a rotation). A private key PEM is accepted too, and only its public
half is written.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

import jwt
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_private_key, load_pem_public_key

from infra.keys import SIGNING_ALGORITHM


def public_jwk(kid: str, pem: bytes) -> dict[str, str]:
    try:
        key = load_pem_public_key(pem)
    except ValueError:
        key = load_pem_private_key(pem, password=None).public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise ValueError(f"{kid}: not a P-256 (ES256) key")
    jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key))
    return jwk | {"kid": kid, "alg": SIGNING_ALGORITHM, "use": "sig"}


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or any("=" not in arg for arg in args):
        print("usage: python -m tools.keys <kid>=<PEM file> ...", file=sys.stderr)
        return 2
    keys = []
    for arg in args:
        kid, _, path = arg.partition("=")
        try:
            keys.append(public_jwk(kid, Path(path).read_bytes()))
        except (OSError, ValueError, TypeError) as error:
            print(f"error: {kid}: {error}", file=sys.stderr)
            return 2
    print(json.dumps({"keys": keys}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Send a correctly signed Twilio inbound-message webhook to a running gateway.

    python -m tools.send_webhook --body A12 --from whatsapp:+33612345678 --to whatsapp:+14155238886

Signs with TWILIO_AUTH_TOKEN (or the local account `make run` created in .state/, or in
SNAPSELL_STATE_DIR) for PUBLIC_BASE_URL (default http://127.0.0.1:8080) and prints the
MessageSid it sent and the gateway's answer. A gateway that does not answer is one line on
stderr and exit status 1, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
import uuid
from urllib.parse import urlencode

from twilio.request_validator import RequestValidator

from services.seller_admin.cli import local_state_dir

PATH = "/webhooks/twilio/messages"


def local_credentials() -> dict[str, str]:
    path = local_state_dir() / "dev-credentials.json"
    return dict(json.loads(path.read_text())) if path.exists() else {}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--body", default="A12")
    parser.add_argument("--from", dest="sender", default="whatsapp:+33612345678")
    parser.add_argument("--to", dest="recipient", default="whatsapp:+14155238886")
    parser.add_argument("--message-sid", default="SM" + uuid.uuid4().hex)
    parser.add_argument("--gateway", default=None, help="where to POST (default: public URL)")
    args = parser.parse_args(argv)

    local = local_credentials()
    account_sid = os.environ.get("TWILIO_ACCOUNT_SID") or local.get("TWILIO_ACCOUNT_SID", "")
    token = os.environ.get("TWILIO_AUTH_TOKEN") or local.get("TWILIO_AUTH_TOKEN")
    if not token:
        print("send_webhook: set TWILIO_AUTH_TOKEN or run `make run` once", file=sys.stderr)
        return 2
    base_url = os.environ.get("PUBLIC_BASE_URL", "http://127.0.0.1:8080").rstrip("/")
    public = base_url + PATH
    params = {
        "MessageSid": args.message_sid,
        "SmsMessageSid": args.message_sid,
        "AccountSid": account_sid,
        "From": args.sender,
        "To": args.recipient,
        "Body": args.body,
        "NumMedia": "0",
        "ApiVersion": "2010-04-01",
    }
    target = args.gateway.rstrip("/") if args.gateway else base_url
    request = urllib.request.Request(
        target + PATH,
        data=urlencode(params).encode(),
        headers={
            "Content-Type": "application/x-www-form-urlencoded",
            "X-Twilio-Signature": RequestValidator(token).compute_signature(public, params),
        },
    )
    print(f"MessageSid {args.message_sid}")
    # No proxies: an http_proxy in the environment must not intercept the local gateway.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=10) as reply:
            print(reply.status, reply.read().decode())
    except urllib.error.HTTPError as error:
        print(error.code, error.read().decode().strip())
        return 1
    except (urllib.error.URLError, OSError):
        print(f"gateway not reachable at {target} — is `make run` up?", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

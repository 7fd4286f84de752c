"""Send a correctly signed Twilio inbound-message webhook to a running gateway.

    python -m tools.send_webhook --body A12 --from whatsapp:+33612345678 --to whatsapp:+14155238886

Signs with TWILIO_AUTH_TOKEN (or the local account `make run` created in .state/) for
PUBLIC_BASE_URL (default http://127.0.0.1:8080) and prints the gateway's answer.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from urllib.parse import urlencode

from twilio.request_validator import RequestValidator

CREDENTIALS = Path(__file__).resolve().parent.parent / ".state" / "dev-credentials.json"
PATH = "/webhooks/twilio/messages"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--body", default="A12")
    parser.add_argument("--from", dest="sender", default="whatsapp:+33612345678")
    parser.add_argument("--to", dest="recipient", default="whatsapp:+14155238886")
    parser.add_argument("--message-sid", default="SM" + uuid.uuid4().hex)
    parser.add_argument("--gateway", default=None, help="where to POST (default: public URL)")
    args = parser.parse_args(argv)

    local = json.loads(CREDENTIALS.read_text()) if CREDENTIALS.exists() else {}
    account_sid = os.environ.get("TWILIO_ACCOUNT_SID") or local.get("TWILIO_ACCOUNT_SID", "")
    token = os.environ.get("TWILIO_AUTH_TOKEN") or local.get("TWILIO_AUTH_TOKEN")
    if not token:
        print("send_webhook: set TWILIO_AUTH_TOKEN or run `make run` once", file=sys.stderr)
        return 2
    public = os.environ.get("PUBLIC_BASE_URL", "http://127.0.0.1:8080").rstrip("/") + PATH
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
    request = urllib.request.Request(
        (args.gateway.rstrip("/") + PATH) if args.gateway else public,
        data=urlencode(params).encode(),
        headers={
            "Content-Type": "application/x-www-form-urlencoded",
            "X-Twilio-Signature": RequestValidator(token).compute_signature(public, params),
        },
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            print(reply.status, reply.read().decode())
    except urllib.error.HTTPError as error:
        print(error.code, error.read().decode().strip())
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

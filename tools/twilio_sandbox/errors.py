"""Twilio-shaped error bodies: `{"code", "message", "more_info", "status"}`."""

from __future__ import annotations

import json

from starlette.responses import Response

# Twilio's wording for the codes the sandbox answers with; others get a generic message.
ERROR_MESSAGES: dict[int, str] = {
    20001: "Invalid parameter: {name}",
    20003: "Authenticate",
    20404: "The requested resource {path} was not found",
    20429: "Too Many Requests",
    20500: "Internal Server Error",
    21211: "Invalid 'To' Phone Number: {to}",
    21602: "Message body is required.",
    21603: "A 'From' phone number is required.",
    21604: "A 'To' phone number is required.",
    21610: "Attempt to send to unsubscribed recipient",
    21617: "The concatenated message body exceeds the 1600 character limit.",
    63016: (
        "Failed to send freeform message because you are outside the allowed window. "
        "If you are using WhatsApp, please use a Message Template."
    ),
}

# The HTTP status Twilio pairs with an error code, when it is not 400.
_STATUS_FOR_CODE = {20003: 401, 20404: 404, 20429: 429, 20500: 500}


def twilio_error(
    code: int,
    *,
    status: int | None = None,
    headers: dict[str, str] | None = None,
    **details: str,
) -> Response:
    template = ERROR_MESSAGES.get(code, "Error {code} injected by the Twilio sandbox")
    http_status = status or _STATUS_FOR_CODE.get(code, 400)
    body = {
        "code": code,
        "message": template.format(code=code, **details),
        "more_info": f"https://www.twilio.com/docs/errors/{code}",
        "status": http_status,
    }
    return Response(
        json.dumps(body), status_code=http_status, headers=headers, media_type="application/json"
    )

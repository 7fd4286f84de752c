"""Local stand-in for the part of Twilio's REST API the outbox uses (see ARCHITECTURE.md)."""

from tools.twilio_sandbox.app import Sandbox, create_app

__all__ = ["Sandbox", "create_app"]

"""Routing: exactly-once processing of inbound messages, consent and live signals."""

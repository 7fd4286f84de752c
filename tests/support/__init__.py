"""Helpers only the tests use: starting a service process, polling until a condition holds,
Twilio test accounts, a gateway process, JetStream settling."""

"""The security suite: one test per attack a review found, each written so that it fails on the
code before the fix. Tests here use the same real PostgreSQL, NATS and gRPC fixtures as the
integration tests; the attacker's side is whatever a caller outside the trust boundary controls
(webhook bodies and headers, RPC fields and page tokens, tokens and their claims)."""

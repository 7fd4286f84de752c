"""Shared infrastructure for SnapSell's services: configuration, storage, messaging, RPC and
observability plumbing. No domain rules live here."""

"""Give a test module a clean schema for one service (the code lives in `tools.system`)."""

from __future__ import annotations

from tools.system import reset_service_schema

__all__ = ["reset_service_schema"]

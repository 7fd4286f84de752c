"""The whole system as `make run` starts it, for end-to-end tests.

The code lives in `tools.system`, shared with the end-to-end benchmark (tools/ never imports
tests/); the names stay importable from here.
"""

from __future__ import annotations

from tools.system import DB_SERVICES, SERVICES, SystemStack, start_system

__all__ = ["DB_SERVICES", "SERVICES", "SystemStack", "start_system"]

"""The running app's services, for extension-facing code that is given no other way in.

A `p` an extension builds itself (say in an API route) must find the job queue, and A1111's
`shared.sd_model` must find the loaded model. webui.py binds the services once at start
(through `modules.shared.bind`); nothing in the core reads this module.
"""
from __future__ import annotations

from typing import Any

_services: Any = None


def bind(services: Any) -> None:
    global _services
    _services = services


def services() -> Any:
    """The bound services, or None before the app is built (and in plain unit tests)."""
    return _services

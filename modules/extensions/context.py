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


class JobAwareOptions:
    """A1111's `shared.opts`: reads on a job's thread see that job's settings snapshot (A1111 applies
    a request's override_settings to opts while its job runs); registering, writing and saving go to
    the live settings."""

    _LIVE = frozenset({"add_option", "onchange", "set", "save", "load", "templates", "data", "sections",
                       "get_default", "validate_values", "frozen", "path", "snapshot"})

    def __init__(self, live: Any, current: Any):
        object.__setattr__(self, "_live", live)
        object.__setattr__(self, "_current", current)   # () -> the snapshot or the live options

    def __getattr__(self, name: str) -> Any:
        if name in self._LIVE or name.startswith("_"):
            return getattr(self._live, name)
        return getattr(self._current(), name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._live, name, value)

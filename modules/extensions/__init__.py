"""The extension host (loader, script runner, callback registry, A1111's `p`), and A1111's
``modules.extensions`` names for extensions that import it.

The package's own modules import nothing from here; the A1111 names are looked up lazily so
that importing a submodule costs nothing extra.
"""
from __future__ import annotations

import importlib
from typing import Any


def active() -> list[Any]:
    """The enabled extensions, in load order (A1111's extensions.active())."""
    return [ext for ext in _services_extensions() if getattr(ext, "enabled", True)]


def _services_extensions() -> list[Any]:
    services = importlib.import_module("modules.extensions.context").services()
    return list(services.extensions) if services is not None else []


def __getattr__(name: str) -> Any:
    if name == "extensions":  # A1111's module-level list of every discovered extension
        return _services_extensions()
    if name.startswith("__"):  # import machinery probing the package
        raise AttributeError(name)
    loader = importlib.import_module("modules.extensions.loader")
    try:
        return getattr(loader, name)
    except AttributeError:
        raise AttributeError(f"module 'modules.extensions' has no attribute {name!r}") from None

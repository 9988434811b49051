"""A1111's ``modules.extra_networks``: ``ExtraNetwork``, ``ExtraNetworkParams``, ``register_extra_network``,
``parse_prompt(s)``, ``activate``/``deactivate``, over modules/core/extension_networks.py.

A registered network gets ``activate(p, params_list)`` for each batch (its ``<name:...>`` tags' params, or [])
and ``deactivate(p)`` after the job, called by the job itself; the registry is the bound app's.
"""
from typing import Any

from modules.core.extension_networks import (  # noqa: F401 - re-exported for extensions
    ExtraNetwork, ExtraNetworkParams, parse_prompt, parse_prompts)
from modules.extensions import context


def _registry() -> Any:
    services = context.services()
    if services is None or services.networks is None:
        raise RuntimeError("extra networks are registered once the app is built (modules.shared.bind)")
    return services.networks.handlers


def register_extra_network(extra_network: Any) -> None:
    _registry().register(extra_network)


def register_extra_network_alias(extra_network: Any, alias: str) -> None:
    _registry().register_alias(extra_network, alias)


def activate(p: Any, extra_network_data: dict) -> None:
    _registry().activate_data(p, extra_network_data)


def deactivate(p: Any, extra_network_data: dict) -> None:
    _registry().deactivate_data(p, extra_network_data)


def __getattr__(name: str) -> Any:
    if name == "extra_network_registry":   # name -> ExtraNetwork, live
        return _registry().registry
    if name == "extra_network_aliases":
        return _registry().aliases
    raise AttributeError(f"module 'modules.extra_networks' has no attribute {name!r}")

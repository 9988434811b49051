"""Extra-network types that extensions register (A1111's ``extra_networks.register_extra_network``).

A registered network named N gets ``activate(p, [params, ...])`` for each batch whose first prompt has
``<N:...>`` tags (their tags are taken out of the prompt before it is encoded), and ``activate(p, [])``
when the prompt has none, as A1111 does; ``deactivate(p)`` at the end of a job whose prompt had any
extra-network tag. An extension's exception is logged and never stops the job. ``p`` is A1111's
processing object the scripts see. LoRA and hypernetworks are built in (engine/networks) and not here.

Torch-free; the A1111 names (``modules/extra_networks.py``) re-export these.
"""
from __future__ import annotations

import logging
import threading
from collections import defaultdict
from typing import Any, Iterable

from modules.engine.prompt_parser import parse_extra_networks

log = logging.getLogger(__name__)


class ExtraNetworkParams:
    """One tag's arguments, A1111's shape: ``items`` as written, ``positional`` and ``named`` (k=v)."""

    def __init__(self, items: Iterable[str] | None = None):
        self.items = list(items or [])
        self.positional = [x for x in self.items if "=" not in x]
        self.named = dict(x.split("=", 1) for x in self.items if "=" in x)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ExtraNetworkParams) and self.items == other.items

    def __repr__(self) -> str:
        return f"ExtraNetworkParams({self.items!r})"


class ExtraNetwork:
    """The base class extensions subclass (A1111's): a tag name, activate and deactivate."""

    def __init__(self, name: str):
        self.name = name

    def activate(self, p: Any, params_list: list[ExtraNetworkParams]) -> None:
        raise NotImplementedError

    def deactivate(self, p: Any) -> None:
        raise NotImplementedError


def parse_prompt(prompt: str) -> tuple[str, defaultdict]:
    """The prompt without its ``<name:args>`` tags, and name -> [ExtraNetworkParams] (A1111's parse_prompt)."""
    text, calls = parse_extra_networks(prompt)
    found: defaultdict = defaultdict(list)
    for call in calls:
        found[call.name].append(ExtraNetworkParams(call.items))
    return text, found


def parse_prompts(prompts: list[str]) -> tuple[list[str], defaultdict]:
    """Every prompt without tags; the networks of the first one (A1111 activates those)."""
    cleaned, first = [], None
    for prompt in prompts:
        text, found = parse_prompt(prompt)
        cleaned.append(text)
        first = found if first is None else first
    return cleaned, first if first is not None else defaultdict(list)


class ExtensionNetworks:
    """The registry (by name and alias) and its calls. One per app: ExtraNetworksService.handlers."""

    def __init__(self) -> None:
        self.registry: dict[str, Any] = {}
        self.aliases: dict[str, Any] = {}
        self._lock = threading.Lock()

    def register(self, network: Any) -> None:
        with self._lock:
            self.registry[network.name] = network

    def register_alias(self, network: Any, alias: str) -> None:
        with self._lock:
            self.aliases[alias] = network

    def find(self, name: str) -> Any:
        return self.registry.get(name) or self.aliases.get(name)

    def names(self) -> set[str]:
        return set(self.registry) | set(self.aliases)

    def strip(self, prompts: list[str]) -> list[str]:
        """The prompts without the registered networks' tags (the built-in networks never see them)."""
        names = self.names()
        return [parse_extra_networks(prompt, names)[0] for prompt in prompts] if names else list(prompts)

    def activate(self, p: Any, prompts: list[str], *, hires: bool = False) -> None:
        """Each registered network's activate with the first prompt's params (or []). The batch's tags are
        A1111's ``p.extra_network_data`` (``p.hr_extra_network_data`` for the hires pass's own prompt)."""
        data = parse_prompts(list(prompts))[1]
        if p is not None:
            setattr(p, "hr_extra_network_data" if hires else "extra_network_data", data)
        if self.registry or self.aliases:
            self.activate_data(p, data)

    def activate_data(self, p: Any, data: dict[str, list[ExtraNetworkParams]]) -> None:
        activated: list[Any] = []
        for name, params in data.items():
            network = self.find(name)
            if network is not None and not any(network is a for a in activated):
                _call(f"activating extra network {name} with {params}", network.activate, p, params)
                activated.append(network)
        for name, network in list(self.registry.items()):
            if not any(network is a for a in activated):
                _call(f"activating extra network {name}", network.activate, p, [])

    def deactivate(self, p: Any, prompts: list[str]) -> None:
        """Every registered network's deactivate, when the first prompt had any extra-network tag."""
        data = parse_prompts(list(prompts))[1]
        if data:
            self.deactivate_data(p, data)

    def deactivate_data(self, p: Any, data: dict[str, list[ExtraNetworkParams]]) -> None:
        ordered = [self.find(name) for name in data] + list(self.registry.values())   # the prompt's first
        done: list[Any] = []
        for network in ordered:
            if network is not None and not any(network is d for d in done):
                _call(f"deactivating extra network {getattr(network, 'name', network)}", network.deactivate, p)
                done.append(network)


def _call(what: str, method: Any, *args: Any) -> None:
    try:
        method(*args)
    except Exception:   # an extension's bug is reported; the image is still made (A1111 does the same)
        log.exception("Error %s", what)

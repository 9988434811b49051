"""A1111's ``modules.sd_samplers`` names for extensions (X/Y/Z-style scripts list samplers this way).

Read-only views of modules/samplers.py; the core never imports this module.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from modules.engine import sampler_catalog as _samplers


@dataclass(frozen=True)
class SamplerData:
    """A1111's (name, constructor, aliases, options); there is no constructor here (None)."""
    name: str
    constructor: Any
    aliases: list[str]
    options: dict[str, Any] = field(default_factory=dict)


all_samplers: list[SamplerData] = [SamplerData(s.name, None, list(s.aliases), dict(s.options))
                                   for s in _samplers.SAMPLERS]
all_samplers_map: dict[str, SamplerData] = {s.name: s for s in all_samplers}
samplers = all_samplers
samplers_for_img2img = all_samplers
samplers_map: dict[str, str] = {alias.lower(): s.name for s in all_samplers for alias in [s.name, *s.aliases]}


def visible_sampler_names() -> list[str]:
    return _samplers.sampler_names()


def find_sampler_config(name: str | None) -> SamplerData | None:
    if not name:
        return all_samplers[0]
    canonical = samplers_map.get(name.lower())
    return all_samplers_map.get(canonical) if canonical else None

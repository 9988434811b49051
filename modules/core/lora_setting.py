"""A1111's ``sd_lora`` setting (Settings > Extra Networks): one LoRA added to every prompt of a job.

As in A1111, ``<lora:NAME:M>`` (M: ``extra_networks_default_multiplier``) is appended to each prompt that
does not name that LoRA already, so it is applied, written in the infotext prompt and in ``Lora hashes``.
A name no LoRA file has is reported (A1111 skips it silently) and the image is still made.

Torch-free: the choices are file names from the registry's scan.
"""
from __future__ import annotations

import logging
from typing import Any

from modules.engine.prompt_parser import parse_extra_networks

SETTING = "sd_lora"
NONE = "None"
_TAGS = ("lora", "lyco")
log = logging.getLogger(__name__)


def choices(registry: Any) -> list[str]:
    """"None" and every LoRA file's name (A1111 offers the file names too)."""
    return [NONE, *sorted({entry.name for entry in registry.list()}, key=str.lower)]


def bind(options: Any, registry: Any) -> None:
    """The setting becomes a dropdown of the LoRA files, refreshed by rescanning the folders."""
    info = options.templates[SETTING]
    info.kind = "dropdown"
    info.choices = lambda: choices(registry)
    info.refresh = registry.refresh


def _names_it(call: Any, name: str, entry: Any, registry: Any) -> bool:
    written = call.positional[0].strip() if call.positional else ""
    return written == name or (bool(written) and registry.find(written) is entry)


def add_to_prompts(prompts: list[str], registry: Any, options: Any) -> list[str]:
    """Append the setting's LoRA tag to each prompt (in place) that lacks it; returns warnings."""
    name = str(options.get(SETTING, NONE) or NONE).strip()
    if name in ("", NONE):
        return []
    entry = registry.find(name)
    if entry is None:
        registry.refresh()   # a file added since the last scan, as a <lora:...> tag would find it
        entry = registry.find(name)
    if entry is None:
        message = f"Setting 'Lora added to prompts' names {name}, which no LoRA file has; not added"
        log.warning("%s", message)
        return [message]
    tag = f"<lora:{name}:{options.get('extra_networks_default_multiplier', 1.0)}>"
    for i, prompt in enumerate(prompts):
        _, calls = parse_extra_networks(prompt, _TAGS)
        if not any(_names_it(call, name, entry, registry) for call in calls):
            prompts[i] = prompt + tag
    return []

"""A1111's "add network to prompt" settings (Settings > Extra Networks): ``sd_hypernetwork`` and ``sd_lora``.

As in A1111, the named network's ``<TAG:NAME:M>`` (M: ``extra_networks_default_multiplier``) is appended to
each prompt of a job that does not name that network already, so it is applied and written in the infotext
prompt (and, for a LoRA, in ``Lora hashes``). A name no file has is reported (A1111 skips it silently) and
the image is still made. A1111 adds the hypernetwork's tag before the LoRA's; so do we (``SETTINGS`` order).

Torch-free: the choices are file names from the registries' scans.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from modules.core.options_a1111 import TABLE
from modules.engine.prompt_parser import parse_extra_networks

NONE = "None"
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PromptNetworkSetting:
    """One "add network to prompt" setting; `registry` (list/find/refresh) is its kind of network files."""
    key: str                   # the options key
    tag: str                   # the tag it writes
    tags: tuple[str, ...]      # the tags that name this kind of network in a prompt
    kind: str                  # what the warning calls its files

    def choices(self, registry: Any) -> list[str]:
        """"None" and every file's name (A1111 offers the file names too)."""
        return [NONE, *sorted({entry.name for entry in registry.list()}, key=str.lower)]

    def bind(self, options: Any, registry: Any) -> None:
        """The setting becomes a dropdown of the files, refreshed by rescanning the folders."""
        info = options.templates[self.key]
        info.kind = "dropdown"
        info.choices = lambda: self.choices(registry)
        info.refresh = registry.refresh

    def add_to_prompts(self, prompts: list[str], registry: Any, options: Any) -> list[str]:
        """Append the setting's tag to each prompt (in place) that lacks it; returns warnings."""
        name = str(options.get(self.key, NONE) or NONE).strip()
        if name in ("", NONE):
            return []
        entry = registry.find(name)
        if entry is None:
            registry.refresh()   # a file added since the last scan, as a tag in the prompt would find it
            entry = registry.find(name)
        if entry is None:
            message = f"Setting '{_label(self.key)}' names {name}, which no {self.kind} file has; not added"
            log.warning("%s", message)
            return [message]
        tag = f"<{self.tag}:{name}:{options.get('extra_networks_default_multiplier', 1.0)}>"
        for i, prompt in enumerate(prompts):
            _, calls = parse_extra_networks(prompt, self.tags)
            if not any(_names_it(call, name, entry, registry) for call in calls):
                prompts[i] = prompt + tag
        return []


def _label(key: str) -> str:
    """The setting's label in the Settings tab (options_a1111's table owns it; a job's options have no labels)."""
    return next(label for _, rows in TABLE for row_key, _, label, *_ in rows if row_key == key)


def _names_it(call: Any, name: str, entry: Any, registry: Any) -> bool:
    written = call.positional[0].strip() if call.positional else ""
    return written == name or (bool(written) and registry.find(written) == entry)


HYPERNETWORK = PromptNetworkSetting("sd_hypernetwork", "hypernet", ("hypernet",), "hypernetwork")
LORA = PromptNetworkSetting("sd_lora", "lora", ("lora", "lyco"), "LoRA")
SETTINGS = (HYPERNETWORK, LORA)

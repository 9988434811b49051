"""A1111's ``modules.infotext_utils`` (formerly ``generation_parameters_copypaste``) parsing names
for extensions. The paste buttons themselves are the UI's (modules/ui/paste.py)."""
from __future__ import annotations

from typing import Any

from modules.core.infotext import parse_infotext


def parse_generation_parameters(x: str, skip_fields: list[str] | None = None) -> dict[str, Any]:
    """The infotext as {"Prompt", "Negative prompt", "Steps", "Size-1", "Size-2", ...}."""
    parsed = dict(parse_infotext(x or ""))
    for key in skip_fields or []:
        parsed.pop(key, None)
    return parsed

"""What a setting is (OptionInfo, sections), apart from the values that options.py keeps.

OptionInfo keeps A1111's constructor shape because extensions build it positionally
(`OptionInfo(default, label, gr.Slider, {...}, section=...)`). The core never imports gradio:
a component given by an extension is stored as-is and only the UI layer interprets it.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

Section = tuple[str, str]  # (id, label), as in A1111

COMPAT_NOTE = "kept for compatibility, no effect"
"""Shown with every `compat_only` setting (an A1111 key this product stores but does not use)."""


class OptionError(ValueError):
    """A value that does not fit its setting; the message names both."""


class OptionInfo:
    def __init__(
        self,
        default: Any = None,
        label: str = "",
        component: Any = None,
        component_args: dict | Callable[[], dict] | None = None,
        onchange: Callable[[], None] | None = None,
        section: Section | None = None,
        refresh: Callable[[], None] | None = None,
        comment_before: str = "",
        comment_after: str = "",
        infotext: str | None = None,
        restrict_api: bool = False,
        category_id: str | None = None,
        *,
        choices: Iterable[Any] | Callable[[], Iterable[Any]] | None = None,
        kind: str | None = None,
        minimum: float | None = None,
        maximum: float | None = None,
        step: float | None = None,
        restart_required: bool = False,
        hidden: bool = False,
        compat_only: bool = False,
        value_type: type | None = None,
    ):
        self.default = default
        self.label = label
        self.component = component
        self.component_args = component_args
        self.onchange = onchange
        self.section = section or ("other", "Other")
        self.refresh = refresh
        self.comment_before = comment_before
        self.comment_after = comment_after
        self.infotext = infotext
        self.restrict_api = restrict_api
        self.category_id = category_id
        self.choices = choices
        self.kind = kind or _guess_kind(default, choices, minimum)
        self.minimum, self.maximum, self.step = minimum, maximum, step
        self.restart_required = restart_required
        self.hidden = hidden
        # An A1111 key kept so clients can read and write it; nothing here reads it.
        self.compat_only = compat_only
        if compat_only:
            self.comment_after = f" ({COMPAT_NOTE})" + self.comment_after
        # For a None default: the type of the other values (None stays allowed).
        self.value_type = value_type

    # A1111's fluent helpers, used by extensions.
    def info(self, text: str) -> "OptionInfo":
        self.comment_after += f" ({text})"
        return self

    def html(self, text: str) -> "OptionInfo":
        self.comment_after += " " + text
        return self

    def needs_restart(self) -> "OptionInfo":
        self.restart_required = True
        return self

    def needs_reload_ui(self) -> "OptionInfo":
        self.restart_required = True
        return self

    def current_choices(self) -> list[Any] | None:
        if self.choices is None:
            args = self.component_args() if callable(self.component_args) else self.component_args
            if isinstance(args, dict) and "choices" in args:
                return list(args["choices"])
            return None
        return list(self.choices() if callable(self.choices) else self.choices)


def _guess_kind(default: Any, choices: Any, minimum: Any) -> str:
    if choices is not None:
        return "multiselect" if isinstance(default, list) else "dropdown"
    if isinstance(default, bool):
        return "checkbox"
    if isinstance(default, (int, float)):
        return "slider" if minimum is not None else "number"
    if isinstance(default, list):
        return "multiselect"
    return "text"



SAVING = ("saving-images", "Saving images/grids")
PATHS = ("saving-paths", "Paths for saving")
SD = ("sd", "Stable Diffusion")
SAMPLER = ("sampler-params", "Sampler parameters")
UI = ("ui", "User interface")
LIVE = ("ui_live", "Live previews")
EXT = ("extensions", "Extensions")

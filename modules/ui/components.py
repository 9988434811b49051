"""Settings -> Gradio components. Only the UI layer turns OptionInfo into widgets."""
from __future__ import annotations

from typing import Any

import gradio as gr

from modules.core.options import OptionInfo


def component_for_option(key: str, info: OptionInfo, value: Any, *, interactive: bool = True) -> gr.components.Component:
    label = info.label or key
    info_text = info.comment_after.strip(" ()") or None
    if info.component is not None:  # an extension gave a gradio class, A1111-style
        args = info.component_args() if callable(info.component_args) else dict(info.component_args or {})
        return info.component(label=label, value=value, elem_id=f"setting_{key}", interactive=interactive, **args)
    common = dict(label=label, elem_id=f"setting_{key}", interactive=interactive, info=info_text)
    kind = info.kind
    if kind == "checkbox":
        return gr.Checkbox(value=bool(value), **common)
    if kind == "slider":
        return gr.Slider(value=value, minimum=info.minimum, maximum=info.maximum, step=info.step or 1, **common)
    if kind == "number":
        return gr.Number(value=value, precision=0 if isinstance(info.default, int) else None, **common)
    if kind in ("dropdown", "multiselect"):
        choices = info.current_choices() or []
        multiselect = kind == "multiselect"
        if not multiselect and value in (None, ""):
            value = None  # "nothing chosen": an empty string is not a valid choice for Gradio
        elif not multiselect and value not in choices:
            choices = [value, *choices]
        elif multiselect and value:
            choices = list(dict.fromkeys([*choices, *value]))  # stored items stay selectable
        return gr.Dropdown(choices=choices, value=value, multiselect=multiselect,
                           allow_custom_value=info.choices is None, **common)
    return gr.Textbox(value="" if value is None else str(value), lines=1, **common)

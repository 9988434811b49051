"""Infotext -> UI field values, for PNG Info's "Send to" buttons and the ↙ button ("read
generation parameters from the prompt, or from the last generation if the prompt is empty"), as
A1111's paste fields do.

`values_from_infotext(parsed, tab)` maps a parsed infotext to ``{control name: value}``, where the
control names are the field names of `Txt2ImgControls` / `Img2ImgControls`: the `ui` column of
infotext.INFOTEXT_FIELDS, plus the two values derived from several keys (styles, hires enabled).
`bind` turns that into one gradio update per component. Keys the infotext does not name leave their
field as it is, except where the writer leaves a value out at its default (no ``Variation seed
strength`` means 0): the table's `omitted` column.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

from modules.core import infotext
from modules.engine import sampler_catalog as samplers

log = logging.getLogger(__name__)

TXT2IMG, IMG2IMG = infotext.TXT2IMG, infotext.IMG2IMG

__all__ = ["apply_defaults", "bind", "checkpoint_for", "override_choices", "parse_for_paste",
           "values_from_infotext"]


def _sampler(v: Any) -> str:
    return samplers.resolve_sampler(str(v), None).name


def _schedule(v: Any) -> str:
    if str(v) not in samplers.schedule_labels():
        raise ValueError(f"unknown schedule type {v!r}")
    return str(v)


def _hires_sampler(v: Any) -> str:
    return "Use same sampler" if str(v) in ("", "Use same sampler") else _sampler(v)


def _hires_upscaler(v: Any) -> str:
    from modules.core.pipeline import LATENT_UPSCALE_MODES, image_upscaler_names

    return infotext.one_of((*LATENT_UPSCALE_MODES, *image_upscaler_names()[1:]))(v)


# What the dropdowns can show: a value they lack leaves the field alone.
_UI_CHECKS: dict[str, Callable[[Any], Any]] = {
    "sampler_name": _sampler,
    "scheduler": _schedule,
    "hires_upscaler": _hires_upscaler,
    "hires_sampler": _hires_sampler,
}


def _styles(d: Mapping[str, Any]) -> Any:
    found = d.get("Styles array")
    if isinstance(found, str):  # written by another tool as a JSON list
        try:
            found = json.loads(found)
        except ValueError:
            return None
    return list(found) if isinstance(found, (list, tuple)) else None


# Controls whose value comes from several keys: (control, tabs, value of the parsed dict or None).
_DERIVED: tuple[tuple[str, tuple[str, ...], Callable[[Mapping[str, Any]], Any]], ...] = (
    ("styles", (TXT2IMG, IMG2IMG), _styles),
    ("hires_enabled", (TXT2IMG,), infotext.hires_enabled),
)


def _control_names(tab: str) -> list[str]:
    table = [t.ui for f in infotext.INFOTEXT_FIELDS if tab in f.kinds for t in f.targets if t.ui]
    return list(dict.fromkeys([*table, *(name for name, tabs, _ in _DERIVED if tab in tabs)]))


def apply_defaults(parsed: Mapping[str, Any]) -> dict[str, Any]:
    """`parsed` plus the values the infotext means by leaving a key out (the `omitted` column)."""
    out = dict(parsed)
    for f in infotext.INFOTEXT_FIELDS:
        if f.omitted is not None:
            for target in f.targets:
                out.setdefault(target.key, f.omitted)
    return out


def parse_for_paste(text: str, *, styles: Any = None, extract_styles: bool = True) -> dict[str, Any]:
    """parse_infotext + A1111's paste-time additions: the omitted defaults, and the styles whose
    text the prompts end with (``Styles array``, the prompts without them)."""
    from modules.core.infotext import parse_infotext

    parsed = dict(parse_infotext(text or ""))
    if styles is not None and extract_styles and "Styles array" not in parsed:
        prompt, negative = str(parsed.get("Prompt", "")), str(parsed.get("Negative prompt", ""))
        found, prompt, negative = styles.extract_styles_from_prompt(prompt, negative)
        if found:
            parsed["Styles array"] = found
            parsed["Prompt"], parsed["Negative prompt"] = prompt, negative
    return apply_defaults(parsed)


def values_from_infotext(parsed: Mapping[str, Any], tab: str) -> dict[str, Any]:
    """{control name: value} for every field of `tab` that the infotext names (and converts)."""
    out: dict[str, Any] = {}
    for name, tabs, derive in _DERIVED:
        value = derive(parsed) if tab in tabs else None
        if value is not None:
            out[name] = value
    for field, target, raw in infotext.read_fields(parsed, tab, "ui"):
        try:
            value = field.parse(raw)
            check = _UI_CHECKS.get(target.ui)
            out[target.ui] = check(value) if check is not None else value
        except (TypeError, ValueError, LookupError):
            continue  # a value this UI cannot show (unknown sampler...): leave the field alone
    if "sampler_name" in out and "Schedule type" not in parsed:
        # Old infotexts name the schedule in the sampler ("DPM++ 2M Karras").
        try:
            out["scheduler"] = samplers.resolve_sampler(str(parsed["Sampler"]), None).schedule
        except (ValueError, LookupError):
            pass
    return out


def override_choices(parsed: Mapping[str, Any], options: Any) -> list[str]:
    """Settings the infotext names that differ from the current ones, as A1111's "Override
    settings" entries (``"Clip skip: 2"``); the generation then runs with them."""
    out = []
    for key, info in getattr(options, "templates", {}).items():
        label = getattr(info, "infotext", None)
        if not label or label not in parsed or key == "sd_model_checkpoint":
            continue
        try:
            value = type(info.default)(parsed[label]) if info.default is not None else parsed[label]
        except (TypeError, ValueError):
            continue
        if value != options.get(key):
            out.append(f"{label}: {parsed[label]}")
    return out


def overrides_from_choices(choices: Iterable[str] | None, options: Any) -> dict[str, Any]:
    """The other direction: ["Clip skip: 2"] -> {"CLIP_stop_at_last_layers": 2}."""
    by_label = {info.infotext: (key, info) for key, info in getattr(options, "templates", {}).items()
                if getattr(info, "infotext", None)}
    out: dict[str, Any] = {}
    for entry in choices or []:
        label, _, raw = str(entry).partition(": ")
        if label not in by_label:
            continue
        key, info = by_label[label]
        default = info.default
        try:
            if isinstance(default, bool):
                out[key] = infotext.to_bool(raw)
            elif isinstance(default, (int, float)):
                out[key] = type(default)(float(raw))
            else:
                out[key] = raw
        except ValueError:
            continue
    return out


def checkpoint_for(parsed: Mapping[str, Any], registry: Any) -> str | None:
    """The title of the known checkpoint the infotext names (hash first, then name), else None."""
    if registry is None:
        return None
    for key in ("Model hash", "Model"):
        value = parsed.get(key)
        if value:
            found = registry.get_closest(str(value))
            if found is not None:
                return found.title
    return None


# --------------------------------------------------------------------------- gradio binding


SCRIPT_FIELD = "infotext:"   # targets key prefix for extension scripts' infotext_fields
_script_field_functions: dict[str, Callable[[Mapping[str, Any]], Any]] = {}


def script_field_targets(fields: Iterable[tuple[Any, Any]]) -> dict[str, Any]:
    """Targets for scripts' `infotext_fields` [(component, label or fn(parsed) -> value)]."""
    out: dict[str, Any] = {}
    for component, label in fields:
        if callable(label):
            key = f"{SCRIPT_FIELD}fn:{id(label)}"
            _script_field_functions[key] = label
        else:
            key = f"{SCRIPT_FIELD}{label}"
        out[key] = component
    return out


def _script_values(parsed: Mapping[str, Any], names: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in names:
        if not name.startswith(SCRIPT_FIELD):
            continue
        fn = _script_field_functions.get(name)
        if fn is not None:
            try:
                value = fn(parsed)
            except Exception:  # noqa: BLE001 - an extension's converter; leave its field alone
                log.exception("infotext field function %r failed", fn)
                continue
        else:
            value = parsed.get(name[len(SCRIPT_FIELD):])
        if value is not None:
            out[name] = value
    return out


def bind(targets: Mapping[str, Any], tab: str) -> tuple[list[str], list[Any]]:
    """The control names of `tab` that have a component in `targets`, and those components,
    in the order `updates` returns values for them."""
    names = [name for name in _control_names(tab) if name in targets]
    names += [n for n in targets if n.startswith(SCRIPT_FIELD)]
    names = list(dict.fromkeys(names))
    return names, [targets[n] for n in names]


def updates(values: Mapping[str, Any], names: list[str]) -> list[Any]:
    import gradio as gr

    return [values[n] if n in values else gr.update() for n in names]


@dataclass
class PasteContext:
    """What every paste/send handler needs: the services, the top-level tabs and the checkpoint
    dropdown (set, then loaded, when the infotext names a known checkpoint)."""
    services: Any
    top_tabs: Any
    checkpoint: Any | None
    pending_checkpoint: Any     # gr.State: the title to load after a paste


def infotext_updates(ctx: PasteContext, text: str | None, tab: str, names: list[str]) -> list[Any]:
    """[field updates..., override settings update, checkpoint title or None] for pasting `text`."""
    import gradio as gr

    if not text or not text.strip():
        return [*updates({}, names), gr.update(), None]
    services = ctx.services
    parsed = parse_for_paste(text, styles=getattr(services, "styles", None))
    callbacks = getattr(services, "callbacks", None)
    if callbacks is not None:  # on_infotext_pasted: extensions may add or change parsed fields in place
        callbacks.infotext_pasted(text, parsed)
    values = values_from_infotext(parsed, tab)
    values.update(_script_values(parsed, names))
    overrides = override_choices(parsed, services.options)
    title = checkpoint_for(parsed, services.models.registry)
    return [*updates(values, names),
            gr.update(choices=overrides, value=overrides, visible=bool(overrides)),
            title]


def connect_checkpoint_load(event: Any, ctx: PasteContext) -> None:
    """After a paste: select and load the checkpoint the infotext named (through the job queue)."""
    import gradio as gr

    if ctx.checkpoint is None:
        return
    services = ctx.services

    def load(title: str | None):
        if not title:
            return gr.update()
        try:
            current = services.models.selected_info().title
        except Exception:  # noqa: BLE001 - no checkpoint selected yet
            current = None
        if title == current:  # the title may have gained its [hash] since the page was built
            return gr.update(choices=services.models.titles(), value=title)
        try:
            model = services.generation.submit_model_switch(title).result()
        except Exception as err:  # noqa: BLE001 - the previous model stays loaded
            gr.Warning(f"Could not load {title}: {err}")
            return gr.update()
        return gr.update(choices=services.models.titles(), value=model.info.title if model.info else title)

    event.then(load, inputs=ctx.pending_checkpoint, outputs=ctx.checkpoint, show_progress="hidden")


def connect_paste_button(ctx: PasteContext, *, tab: str, button: Any, prompt: Any, generation_info: Any,
                         targets: Mapping[str, Any], override_settings: Any) -> None:
    """↙: parse the prompt box as an infotext, or the last generation's when the prompt is empty."""
    names, comps = bind(targets, tab)

    def read(prompt_text: str, info: dict | None):
        text = prompt_text
        if not (text or "").strip() and info:
            infotexts = info.get("infotexts") or []
            first = int(info.get("index_of_first_image") or 0)
            text = infotexts[first] if first < len(infotexts) else (infotexts[0] if infotexts else "")
        return infotext_updates(ctx, text, tab, names)

    event = button.click(read, inputs=[prompt, generation_info], outputs=[*comps, override_settings,
                                                                         ctx.pending_checkpoint],
                         show_progress="hidden")
    connect_checkpoint_load(event, ctx)


def connect_send(ctx: PasteContext, *, button: Any, tab: str, top_tab_id: str, targets: Mapping[str, Any],
                 override_settings: Any, read: Callable[..., tuple[str | None, Any]], inputs: list[Any],
                 image_outputs: list[Any] = (), image_value: Callable[[Any], list[Any]] | None = None) -> None:
    """A "Send to ..." button: `read(*inputs)` gives (infotext, image); the image goes to
    `image_outputs` through `image_value(image)` (sub-tab switch, mode, the image itself...)."""
    import gradio as gr

    names, comps = bind(targets, tab)
    image_outputs = list(image_outputs)

    def send(*values):
        text, image = read(*values)
        extra = list(image_value(image)) if image_value is not None else []
        return [gr.Tabs(selected=top_tab_id), *extra, *infotext_updates(ctx, text, tab, names)]

    event = button.click(send, inputs=inputs,
                         outputs=[ctx.top_tabs, *image_outputs, *comps, override_settings, ctx.pending_checkpoint],
                         show_progress="hidden")
    connect_checkpoint_load(event, ctx)

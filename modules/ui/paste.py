"""Infotext -> UI field values: the one table that PNG Info's "Send to" buttons and the ↙ button
("read generation parameters from the prompt, or from the last generation if the prompt is
empty") both use, as A1111's paste fields do.

`values_from_infotext(parsed, tab)` maps a parsed infotext to ``{control name: value}``, where the
control names are the field names of `Txt2ImgControls` / `Img2ImgControls`; `bind` turns that into
one gradio update per component. Keys the infotext does not name leave their field as it is, except
where the infotext format itself omits a default (no ``Variation seed strength`` means 0, no
``Mask blur`` on an inpaint infotext means the inpaint defaults), which are filled in the way
A1111's parser fills them.
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

from modules.engine import sampler_catalog as samplers

log = logging.getLogger(__name__)

TXT2IMG, IMG2IMG = "txt2img", "img2img"
MASK_MODES = ("Inpaint masked", "Inpaint not masked")
INPAINT_AREAS = ("Whole picture", "Only masked")

__all__ = ["MASK_MODES", "INPAINT_AREAS", "PasteField", "TABLE", "apply_defaults", "bind", "checkpoint_for",
           "override_choices", "parse_for_paste", "values_from_infotext"]


def _int(v: Any) -> int:
    return int(float(v))


def _float(v: Any) -> float:
    return float(v)


def _str(v: Any) -> str:
    return "" if v is None else str(v)


def _bool(v: Any) -> bool:
    return v is True or str(v).strip().lower() in ("true", "1", "yes")


def _choice(choices: Iterable[str]) -> Callable[[Any], str]:
    allowed = tuple(choices)

    def convert(v: Any) -> str:
        if str(v) not in allowed:
            raise ValueError(f"{v!r} is not one of {allowed}")
        return str(v)
    return convert


def _sampler(v: Any) -> str:
    return samplers.resolve_sampler(str(v), None).name


def _schedule(v: Any) -> str:
    if str(v) not in samplers.schedule_labels():
        raise ValueError(f"unknown schedule type {v!r}")
    return str(v)


def _hires_sampler(v: Any) -> str:
    return "Use same sampler" if str(v) in ("", "Use same sampler") else _sampler(v)


def _hires_upscaler(v: Any) -> str:
    from modules.core.pipeline import IMAGE_UPSCALERS, LATENT_UPSCALE_MODES

    return _choice([*LATENT_UPSCALE_MODES, *IMAGE_UPSCALERS[1:]])(v)


def _styles(d: Mapping[str, Any]) -> Any:
    found = d.get("Styles array")
    if isinstance(found, str):  # written by another tool as a JSON list
        try:
            found = json.loads(found)
        except ValueError:
            return None
    return list(found) if isinstance(found, (list, tuple)) else None


def _hires_enabled(d: Mapping[str, Any]) -> bool:
    # A1111's rule: hires was on when the first pass had a denoising strength and a hires key.
    return "Denoising strength" in d and any(k in d for k in ("Hires upscale", "Hires upscaler", "Hires resize-1"))


@dataclass(frozen=True)
class PasteField:
    target: str                                   # control name (Txt2ImgControls / Img2ImgControls field)
    key: str | Callable[[Mapping[str, Any]], Any]  # infotext key, or a function of the parsed dict
    convert: Callable[[Any], Any] = _str
    tabs: tuple[str, ...] = (TXT2IMG, IMG2IMG)


_BOTH = (TXT2IMG, IMG2IMG)
TABLE: tuple[PasteField, ...] = (
    PasteField("prompt", "Prompt"),
    PasteField("negative_prompt", "Negative prompt"),
    PasteField("styles", _styles, lambda v: v),
    PasteField("steps", "Steps", _int),
    PasteField("sampler_name", "Sampler", _sampler),
    PasteField("scheduler", "Schedule type", _schedule),
    PasteField("cfg_scale", "CFG scale", _float),
    PasteField("seed", "Seed", _int),
    PasteField("width", "Size-1", _int),
    PasteField("height", "Size-2", _int),
    PasteField("batch_size", "Batch size", _int),
    PasteField("subseed", "Variation seed", _int),
    PasteField("subseed_strength", "Variation seed strength", _float),
    PasteField("seed_resize_from_w", "Seed resize from-1", _int),
    PasteField("seed_resize_from_h", "Seed resize from-2", _int),
    PasteField("tiling", "Tiling", _bool),
    # txt2img: hires fix
    PasteField("hires_enabled", _hires_enabled, _bool, (TXT2IMG,)),
    PasteField("hires_scale", "Hires upscale", _float, (TXT2IMG,)),
    PasteField("hires_upscaler", "Hires upscaler", _hires_upscaler, (TXT2IMG,)),
    PasteField("hires_steps", "Hires steps", _int, (TXT2IMG,)),
    PasteField("hires_resize_x", "Hires resize-1", _int, (TXT2IMG,)),
    PasteField("hires_resize_y", "Hires resize-2", _int, (TXT2IMG,)),
    PasteField("hires_denoising", "Denoising strength", _float, (TXT2IMG,)),
    PasteField("hires_sampler", "Hires sampler", _hires_sampler, (TXT2IMG,)),
    PasteField("hires_prompt", "Hires prompt", _str, (TXT2IMG,)),
    PasteField("hires_negative_prompt", "Hires negative prompt", _str, (TXT2IMG,)),
    # img2img and inpainting
    PasteField("denoising_strength", "Denoising strength", _float, (IMG2IMG,)),
    PasteField("mask_blur", "Mask blur", _int, (IMG2IMG,)),
    PasteField("mask_mode", "Mask mode", _choice(MASK_MODES), (IMG2IMG,)),
    PasteField("inpainting_fill", "Masked content", lambda v: _choice(_masked_content())(v), (IMG2IMG,)),
    PasteField("inpaint_full_res", "Inpaint area", _choice(INPAINT_AREAS), (IMG2IMG,)),
    PasteField("inpaint_full_res_padding", "Masked area padding", _int, (IMG2IMG,)),
)


def _masked_content() -> tuple[str, ...]:
    from modules.core.pipeline import MASKED_CONTENT

    return MASKED_CONTENT


# What the infotext leaves out when a value is at its default (A1111's parser adds the same).
_DEFAULTS: dict[str, Any] = {
    "Clip skip": 1,
    "Variation seed strength": 0,
    "Seed resize from-1": 0,
    "Seed resize from-2": 0,
    "Hires resize-1": 0,
    "Hires resize-2": 0,
    "Hires sampler": "Use same sampler",
    "Hires prompt": "",
    "Hires negative prompt": "",
    "Tiling": False,
}
_INPAINT_DEFAULTS: dict[str, Any] = {
    "Mask mode": "Inpaint masked",
    "Masked content": "original",
    "Inpaint area": "Whole picture",
    "Masked area padding": 32,
}


def apply_defaults(parsed: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(parsed)
    for key, value in _DEFAULTS.items():
        out.setdefault(key, value)
    if "Mask blur" in out:  # only an inpaint infotext says anything about the mask
        for key, value in _INPAINT_DEFAULTS.items():
            out.setdefault(key, value)
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
    for f in TABLE:
        if tab not in f.tabs:
            continue
        raw = f.key(parsed) if callable(f.key) else parsed.get(f.key)
        if raw is None:
            continue
        try:
            out[f.target] = f.convert(raw)
        except (TypeError, ValueError, LookupError):
            continue  # a value this UI cannot show (unknown sampler...): leave the field alone
    if "sampler_name" in out and "Schedule type" not in parsed:
        # Old infotexts name the schedule in the sampler ("DPM++ 2M Karras").
        try:
            out["scheduler"] = samplers.resolve_sampler(str(parsed["Sampler"]), None).schedule
        except (ValueError, LookupError):
            pass
    if "Size-1" not in parsed and "Size" in parsed:  # a parser that kept "WxH" whole
        m = re.fullmatch(r"\s*(\d+)\s*x\s*(\d+)\s*", str(parsed["Size"]))
        if m:
            out.setdefault("width", int(m.group(1)))
            out.setdefault("height", int(m.group(2)))
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
                out[key] = _bool(raw)
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
    names = [f.target for f in TABLE if tab in f.tabs and f.target in targets]
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

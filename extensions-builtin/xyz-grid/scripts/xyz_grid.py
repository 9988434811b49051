"""A1111's "X/Y/Z plot" script on the Script API: render one image per combination of up to three
axes of values (steps, CFG, sampler, checkpoint, prompt S/R...) and lay them out as a labelled grid.

script_args (A1111's order):
    [x_type, x_values, x_values_dropdown, y_type, y_values, y_values_dropdown,
     z_type, z_values, z_values_dropdown, draw_legend, include_lone_images, include_sub_grids,
     no_fixed_seeds, vary_seeds_x, vary_seeds_y, vary_seeds_z, margin_size, csv_mode]

* `*_type`: the index of the axis in this tab's list (what the UI sends), or its label ("Steps").
  txt2img indices match A1111's up to "Checkpoint name" (11); later ones and img2img's differ
  (A1111 has axes this app does not), so a label is the safer thing to send.
* `*_values`: comma-separated, CSV quoting; numeric axes take ranges "1-5", "1-10 (+2)",
  "10-1 [4]" (4 values evenly spaced), "0.5-1 (+0.25)".
* `*_values_dropdown`: for axes with choices (sampler, checkpoint...): the picked values; used
  unless empty or `csv_mode` ("Use text inputs instead of dropdowns") is on.
* `vary_seeds_*`: add the cell's index along that axis to the seed.

Every value is checked (numbers, sampler and checkpoint names, each cell's parameters) before the
first image renders, so a typo fails at once with a message instead of after half the grid.
"""
from __future__ import annotations

import copy
import csv
import io
import itertools
import logging
import math
import os
import re
from dataclasses import dataclass, field
from itertools import chain
from typing import Any, Callable

import gradio as gr
from PIL import Image

from modules import processing, scripts, shared
from modules.engine import sampler_catalog as samplers
from modules.processing import ProcessingError

log = logging.getLogger(__name__)

TITLE = "X/Y/Z plot"


# -- value lists --------------------------------------------------------------------------------
_INT = r"[+-]?\s*\d+"
_FLOAT = r"[+-]?\s*(?:\d+(?:\.\d*)?|\.\d+)"
# start-end, then an optional "(+step)" or "[count]"
_RANGE_TAIL = r"(?:\s*\(\s*(?P<step>{n})\s*\)|\s*\[\s*(?P<count>\d+)\s*(?:\.\.\.)?\s*\])?"
_INT_RANGE = re.compile(rf"\s*(?P<start>{_INT})\s*-\s*(?P<end>{_INT}){_RANGE_TAIL.format(n=_INT)}\s*")
_FLOAT_RANGE = re.compile(rf"\s*(?P<start>{_FLOAT})\s*-\s*(?P<end>{_FLOAT}){_RANGE_TAIL.format(n=_FLOAT)}\s*")


def split_values(text: Any) -> list[str]:
    """Comma-separated values with CSV quoting ("a, b" stays one value); blanks trimmed."""
    if text is None:
        return []
    if isinstance(text, (list, tuple)):
        return [str(v).strip() for v in text]
    rows = csv.reader(io.StringIO(str(text)), skipinitialspace=True)
    return [value.strip() for value in chain.from_iterable(rows)]


def _num(text: str) -> str:
    return re.sub(r"\s+", "", text)


def _room(out: list, adding: int, limit: int | None, value: str) -> None:
    """Refuse a range that would take the axis past `limit` values, before it is expanded."""
    if limit is not None and len(out) + adding > limit:
        raise ProcessingError(f"{value!r} gives {len(out) + adding} values; at most {limit} cells per plot "
                              f"(--max-xyz-cells)")


def expand_int_ranges(values: list[str], limit: int | None = None) -> list[int]:
    """"1-5" -> 1..5, "1-10 (+2)" -> 1,3,..9, "10-1 [4]" -> 10,7,4,1; other values as ints.
    With `limit`, more values than that are refused (counted before any range is expanded)."""
    out: list[int] = []
    for value in values:
        m = _INT_RANGE.fullmatch(value)
        if m is None:
            _room(out, 1, limit, value)
            out.append(_to_int(value))
            continue
        start, end = int(_num(m["start"])), int(_num(m["end"]))
        if m["count"] is not None:
            _room(out, int(m["count"]), limit, value)
            out += [int(round(start + (end - start) * i / max(1, int(m["count"]) - 1)))
                    for i in range(int(m["count"]))]
            continue
        # No step: count towards the end (A1111 needs "(-1)" for a falling range; this is kinder).
        step = int(_num(m["step"])) if m["step"] is not None else (1 if end >= start else -1)
        if step == 0:
            raise ProcessingError(f"range {value!r} has a step of 0")
        span = range(start, end + (1 if step > 0 else -1), step)
        _room(out, len(span), limit, value)  # len() of a range is O(1): nothing is built yet
        out += list(span)
    return out


def expand_float_ranges(values: list[str], limit: int | None = None) -> list[float]:
    """"0.5-1 (+0.25)" -> 0.5,0.75,1.0, "1-2 [3]" -> 1.0,1.5,2.0; other values as floats.
    With `limit`, more values than that are refused (counted before any range is expanded)."""
    out: list[float] = []
    for value in values:
        m = _FLOAT_RANGE.fullmatch(value)
        if m is None:
            _room(out, 1, limit, value)
            out.append(_to_float(value))
            continue
        start, end = float(_num(m["start"])), float(_num(m["end"]))
        if not (math.isfinite(start) and math.isfinite(end)):
            raise ProcessingError(f"range {value!r} is not finite")
        if m["count"] is not None:
            n = int(m["count"])
            _room(out, n, limit, value)
            out += [round(start + (end - start) * i / max(1, n - 1), 8) for i in range(n)]
            continue
        step = float(_num(m["step"])) if m["step"] is not None else (1.0 if end >= start else -1.0)
        if step == 0:
            raise ProcessingError(f"range {value!r} has a step of 0")
        # Count the steps up front so float error neither adds nor drops the end value.
        if not math.isfinite(step):
            raise ProcessingError(f"range {value!r} is not finite")
        n = math.floor((end - start) / step + 1e-9) + 1
        _room(out, max(0, n), limit, value)
        out += [round(start + step * i, 8) for i in range(max(0, n))]
    return out


def _to_int(value: str) -> int:
    try:
        return int(_num(value))
    except ValueError:
        try:
            as_float = float(_num(value))
        except ValueError:
            raise ProcessingError(f"{value!r} is not a whole number") from None
        if not as_float.is_integer():
            raise ProcessingError(f"{value!r} is not a whole number") from None
        return int(as_float)


def _to_float(value: str) -> float:
    try:
        return float(_num(value))
    except ValueError:
        raise ProcessingError(f"{value!r} is not a number") from None


# -- axes ---------------------------------------------------------------------------------------
def _services() -> Any:
    return shared.services


def _limits() -> Any:
    """The server's input limits (the defaults when no server is bound, as in unit tests)."""
    from modules.core.limits import Limits

    return getattr(_services(), "limits", None) or Limits()


def _format_label(axis: "Axis", value: Any) -> str:
    if isinstance(value, float):
        value = round(value, 8)
    return f"{axis.label}: {value}"


def _format_value(axis: "Axis", value: Any) -> str:
    return str(value)


def _format_checkpoint(axis: "Axis", value: Any) -> str:
    # "sub/model.safetensors [abcdef0123]" -> "model": the file is what tells cells apart.
    name = re.sub(r"\s*\[[0-9a-fA-F]+\]$", "", str(value))
    return os.path.splitext(os.path.basename(name.replace("\\", "/")))[0]


def _set(attr: str) -> Callable[[Any, Any, list], None]:
    def apply(p: Any, value: Any, values: list) -> None:
        setattr(p, attr, value)
    return apply


def _override(key: str, also: str | None = None) -> Callable[[Any, Any, list], None]:
    def apply(p: Any, value: Any, values: list) -> None:
        p.override_settings[key] = value
        if also:  # a per-job field that would otherwise win over the setting
            setattr(p, also, value)
    return apply


def _apply_prompt_sr(p: Any, value: str, values: list) -> None:
    search = values[0]
    p.prompt = p.prompt.replace(search, value)
    p.negative_prompt = p.negative_prompt.replace(search, value)
    for attr in ("hr_prompt", "hr_negative_prompt"):  # txt2img's own hires prompts, when set
        text = getattr(p, attr, None)
        if text:
            setattr(p, attr, text.replace(search, value))


def _apply_prompt_order(p: Any, order: tuple[str, ...], values: list) -> None:
    """Put the fragments into the places they hold in the prompt, in this permutation's order."""
    prompt = p.prompt
    spots = sorted((prompt.index(token), token) for token in order)
    pieces, last = [], 0
    for (pos, token), new in zip(spots, order):
        pieces += [prompt[last:pos], new]
        last = pos + len(token)
    p.prompt = "".join(pieces) + prompt[last:]


def _apply_size(p: Any, value: tuple[int, int], values: list) -> None:
    p.width, p.height = value


def _check_prompt_sr(values: list, p: Any) -> list:
    if not values or not values[0]:
        raise ProcessingError("Prompt S/R needs the text to search for as its first value")
    prompts = [p.prompt, p.negative_prompt]
    if not any(isinstance(text, str) and values[0] in text for text in prompts):
        raise ProcessingError(f"Prompt S/R did not find {values[0]!r} in the prompt or the negative prompt")
    return values


def _check_prompt_order(values: list, p: Any) -> list:
    missing = [v for v in values if not isinstance(p.prompt, str) or v not in p.prompt]
    if missing:
        raise ProcessingError(f"Prompt order did not find {missing[0]!r} in the prompt")
    return list(itertools.permutations(values))


def _check_sampler(values: list, p: Any) -> list:
    out = []
    for value in values:
        if value == "Use same sampler":  # the Hires sampler axis may go back to the first pass's
            out.append(value)
            continue
        try:
            samplers.resolve_sampler(value)
        except samplers.SamplerError as err:
            raise ProcessingError(f"unknown sampler {value!r}: {err}") from None
        out.append(value)
    return out


def _check_schedule(values: list, p: Any) -> list:
    out = []
    for value in values:
        try:
            out.append(samplers.get_schedule(value).label)
        except samplers.SamplerError:
            raise ProcessingError(f"unknown schedule type {value!r}; choose one of "
                                  f"{', '.join(samplers.schedule_labels())}") from None
    return out


def _models(p: Any) -> Any:
    """The ModelService: the running job's, else the app's (shared.services)."""
    service = getattr(getattr(p, "runner", None), "service", None)
    models = getattr(service, "models", None)
    return models if models is not None else getattr(_services(), "models", None)


def _check_checkpoint(values: list, p: Any) -> list:
    models = _models(p)
    if models is None:
        raise ProcessingError("the Checkpoint name axis needs the app's model list")
    out = []
    for value in values:
        info = models.registry.get_closest(value)
        if info is None:
            known = ", ".join(models.titles()) or "none"
            raise ProcessingError(f"unknown checkpoint {value!r}; known checkpoints: {known}")
        out.append(info.title)
    return out


def _check_refiner_checkpoint(values: list, p: Any) -> list:
    """Checkpoint titles, with "None" (no refiner) kept as the empty name."""
    named = [v for v in values if v not in ("", "None")]
    titles = iter(_check_checkpoint(named, p)) if named else iter(())
    return ["" if v in ("", "None") else next(titles) for v in values]


def _check_choice(choices: Callable[[Any], list[str]], what: str) -> Callable[[list, Any], list]:
    def check(values: list, p: Any) -> list:
        known = choices(p)
        by_lower = {c.lower(): c for c in known}
        out = []
        for value in values:
            if value.lower() not in by_lower:
                raise ProcessingError(f"unknown {what} {value!r}; choose one of {', '.join(known)}")
            out.append(by_lower[value.lower()])
        return out
    return check


def _check_size(values: list, p: Any) -> list:
    out = []
    for value in values:
        m = re.fullmatch(r"\s*(\d+)\s*[xX×]\s*(\d+)\s*", value)
        if m is None:
            raise ProcessingError(f"size {value!r} is not WIDTHxHEIGHT (like 512x768)")
        out.append((int(m[1]), int(m[2])))
    return out


def _check_clip_skip(values: list, p: Any) -> list:
    for value in values:
        if not 1 <= value <= 12:
            raise ProcessingError(f"clip skip must be 1-12, got {value}")
    return values


def _sampler_choices() -> list[str]:
    return samplers.sampler_names()


def _schedule_choices() -> list[str]:
    return samplers.schedule_labels()


def _checkpoint_choices() -> list[str]:
    services = _services()
    return sorted(services.models.titles(), key=str.casefold) if services is not None else []


def _networks(p: Any) -> Any:
    """The extra-networks service (LoRA registry): the running job's, else the app's."""
    service = getattr(getattr(p, "runner", None), "service", None)
    networks = getattr(service, "networks", None)
    return networks if networks is not None else getattr(_services(), "networks", None)


def _lora_choices() -> list[str]:
    networks = getattr(_services(), "networks", None)
    return ["None"] + sorted((e.name for e in networks.loras.list()), key=str.casefold) if networks else ["None"]


def _check_lora(values: list, p: Any) -> list:
    """Each value is a LoRA name (file stem or alias), optionally ``name:weight``; "None" adds nothing."""
    networks = _networks(p)
    out = []
    for value in values:
        name, _, weight = value.partition(":")
        if name.strip().lower() == "none":
            out.append("None")
            continue
        try:
            weight_value = float(weight) if weight.strip() else 1.0
        except ValueError:
            raise ProcessingError(f"Lora {value!r}: the weight after ':' must be a number") from None
        if networks is None or networks.loras.find(name.strip()) is None:
            raise ProcessingError(f"unknown Lora {name.strip()!r}; known: {', '.join(_lora_choices()[1:]) or 'none'}")
        out.append(f"{name.strip()}:{weight_value:g}")
    return out


def _apply_lora(p: Any, value: str, values: list) -> None:
    """A1111 users add a LoRA by its prompt tag; the axis appends ``<lora:name:weight>`` to the prompt."""
    if value != "None":
        p.prompt = f"{p.prompt} <lora:{value}>"


def _vae_choices() -> list[str]:
    services = _services()
    return services.models.vae_choices() if services is not None else ["Automatic", "None"]


def _vae_check_choices(p: Any) -> list[str]:
    models = _models(p)
    return models.vae_choices() if models is not None else ["Automatic", "None"]


def _hires_upscaler_choices() -> list[str]:
    return [*processing.LATENT_UPSCALE_MODES, *processing.image_upscaler_names()]


def _rng_choices() -> list[str]:
    return ["GPU", "CPU"]


@dataclass(frozen=True)
class Axis:
    label: str
    kind: str                                   # "int", "float" or "str": how values are parsed
    apply: Callable[[Any, Any, list], None]     # (p, value, all values of the axis)
    format: Callable[["Axis", Any], str] = _format_label
    check: Callable[[list, Any], list] | None = None   # validate/normalise the parsed values
    choices: Callable[[], list[str]] | None = None
    cost: float = 0.0                           # slow to change (a model load): rendered outermost
    tabs: tuple[str, ...] = ("txt2img", "img2img")
    keep_blank: bool = False                    # Prompt S/R may replace with ""

    def values(self, text: Any, dropdown: Any, csv_mode: bool, p: Any, limit: int | None = None) -> list[Any]:
        if self.label == "Nothing":
            return [None]
        picked = [str(v) for v in dropdown] if isinstance(dropdown, (list, tuple)) else []
        raw = picked if self.choices is not None and picked and not csv_mode else split_values(text)
        if not self.keep_blank:
            raw = [v for v in raw if v != ""]
        if not raw:
            raise ProcessingError("no values given")
        if limit is not None and len(raw) > limit:
            raise ProcessingError(f"{len(raw)} values; at most {limit} cells per plot (--max-xyz-cells)")
        if self.kind == "int":
            parsed: list[Any] = expand_int_ranges(raw, limit)
        elif self.kind == "float":
            parsed = expand_float_ranges(raw, limit)
        else:
            parsed = raw
        if not parsed:
            raise ProcessingError(f"{', '.join(raw)!r} gives no values")
        return self.check(parsed, p) if self.check is not None else parsed


def _nothing(p: Any, value: Any, values: list) -> None:
    pass


# In A1111's order: an API caller's txt2img index is the same here up to "Checkpoint name" (11).
AXES: list[Axis] = [
    Axis("Nothing", "str", _nothing, format=lambda axis, value: ""),
    Axis("Seed", "int", _set("seed")),
    Axis("Var. seed", "int", _set("subseed")),
    Axis("Var. strength", "float", _set("subseed_strength")),
    Axis("Steps", "int", _set("steps")),
    Axis("Hires steps", "int", _set("hr_second_pass_steps"), tabs=("txt2img",)),
    Axis("CFG Scale", "float", _set("cfg_scale")),
    Axis("Prompt S/R", "str", _apply_prompt_sr, format=_format_value, check=_check_prompt_sr, keep_blank=True),
    Axis("Prompt order", "str", _apply_prompt_order, format=lambda axis, value: ", ".join(value),
         check=_check_prompt_order),
    Axis("Sampler", "str", _set("sampler_name"), format=_format_value, check=_check_sampler,
         choices=_sampler_choices),
    Axis("Hires sampler", "str", _set("hr_sampler_name"), format=_format_value, check=_check_sampler,
         choices=_sampler_choices, tabs=("txt2img",)),
    Axis("Checkpoint name", "str", _override("sd_model_checkpoint"), format=_format_checkpoint,
         check=_check_checkpoint, choices=_checkpoint_choices, cost=1.0),
    Axis("Schedule type", "str", _set("scheduler"), check=_check_schedule, choices=_schedule_choices),
    Axis("Clip skip", "int", _override("CLIP_stop_at_last_layers", also="clip_skip"), check=_check_clip_skip),
    Axis("Denoising", "float", _set("denoising_strength")),
    Axis("Hires upscaler", "str", _set("hr_upscaler"),
         check=_check_choice(lambda p: _hires_upscaler_choices(), "hires upscaler"),
         choices=_hires_upscaler_choices, tabs=("txt2img",)),
    Axis("VAE", "str", _override("sd_vae"), check=_check_choice(_vae_check_choices, "VAE"), choices=_vae_choices,
         cost=0.7),
    Axis("RNG source", "str", _override("randn_source"),
         check=_check_choice(lambda p: _rng_choices(), "RNG source"), choices=_rng_choices),
    Axis("Size", "str", _apply_size, check=_check_size),
    Axis("Refiner checkpoint", "str", _set("refiner_checkpoint"), format=_format_checkpoint,
         check=_check_refiner_checkpoint, choices=lambda: ["None", *_checkpoint_choices()], cost=1.0),
    Axis("Refiner switch at", "float", _set("refiner_switch_at")),
    Axis("Lora", "str", _apply_lora, format=_format_value, check=_check_lora, choices=_lora_choices),
]


def _controlnet(field: str) -> Callable[[Any, Any, list], None]:
    """sd-webui-controlnet's "[ControlNet] ..." axes: the value goes to every enabled unit of the cell."""
    import dataclasses

    def apply(p: Any, value: Any, values: list) -> None:
        params = p.params   # a cell's own copy: a new list leaves the other cells' units alone
        params.controlnet_units = [dataclasses.replace(u, **{field: value}) if u.enabled else u
                                   for u in params.controlnet_units]
    return apply


def _controlnet_models() -> list[str]:
    services = _services()
    registry = getattr(services, "controlnets", None) if services is not None else None
    return registry.titles() if registry is not None else []


def _controlnet_modules() -> list[str]:
    from modules.engine.control.preprocessors import preprocessor_names

    return preprocessor_names()


# After A1111's own axes, so the API's axis indices stay A1111's.
AXES += [
    Axis("[ControlNet] Weight", "float", _controlnet("weight")),
    Axis("[ControlNet] Guidance Start", "float", _controlnet("guidance_start")),
    Axis("[ControlNet] Guidance End", "float", _controlnet("guidance_end")),
    Axis("[ControlNet] Model", "str", _controlnet("model"), format=_format_value, choices=_controlnet_models),
    Axis("[ControlNet] Preprocessor", "str", _controlnet("module"), format=_format_value,
         choices=_controlnet_modules),
]


def axes_for(is_img2img: bool) -> list[Axis]:
    tab = "img2img" if is_img2img else "txt2img"
    return [axis for axis in AXES if tab in axis.tabs]


def find_axis(axes: list[Axis], selected: Any, name: str) -> Axis:
    """The UI sends an index into this tab's list; API callers may send it or the label."""
    if selected is None or selected == "":
        return axes[0]
    if isinstance(selected, bool):
        raise ProcessingError(f"{name} type: {selected!r} is not an axis")
    if isinstance(selected, int) or (isinstance(selected, str) and selected.strip().isdigit()):
        index = int(selected)
        if 0 <= index < len(axes):
            return axes[index]
        raise ProcessingError(f"{name} type: index {index} is out of range (0-{len(axes) - 1})")
    wanted = str(selected).strip().lower()
    for axis in axes:
        if axis.label.lower() == wanted:
            return axis
    raise ProcessingError(f"{name} type: unknown axis {selected!r}; choose one of "
                          f"{', '.join(a.label for a in axes)}")


# -- the plot -----------------------------------------------------------------------------------
@dataclass
class _AxisRun:
    name: str          # "X", "Y" or "Z"
    axis: Axis
    values: list[Any]
    source_text: str   # what the user typed or picked, for "X Values"

    @property
    def used(self) -> bool:
        return self.axis.label != "Nothing"

    def labels(self) -> list[str]:
        return [self.axis.format(self.axis, v) for v in self.values]


@dataclass
class _Cell:
    ix: int
    iy: int
    iz: int
    p: Any
    processed: Any = None
    images: list[Any] = field(default_factory=list)


def _source_text(axis: Axis, text: Any, dropdown: Any, csv_mode: bool) -> str:
    picked = [str(v) for v in dropdown] if isinstance(dropdown, (list, tuple)) else []
    if axis.choices is not None and picked and not csv_mode:
        return ", ".join(_csv_quote(v) for v in picked)
    return str(text or "")


def _csv_quote(value: str) -> str:
    return f'"{value}"' if any(c in value for c in ',"\n') else value


def _add_params(infotext: str, extra: dict[str, Any]) -> str:
    """The infotext with `extra` added to its parameters line (before "Version", where A1111 has it)."""
    from modules.core.infotext import format_generation_params

    addition = format_generation_params(extra)
    if not addition:
        return infotext
    head, sep, last = infotext.rpartition("\n")
    m = re.search(r"(?:^|, )Version: [^,]*$", last)
    if m is not None and m.start() > 0:
        last = f"{last[:m.start()]}, {addition}{last[m.start():]}"
    else:
        last = f"{last}, {addition}" if last else addition
    return f"{head}{sep}{last}"


def _state(p: Any) -> Any:
    state = getattr(getattr(getattr(p, "runner", None), "job", None), "state", None)
    return state if state is not None else shared.state


def _options(p: Any) -> Any:
    options = getattr(getattr(getattr(p, "runner", None), "service", None), "options", None)
    return options if options is not None else shared.opts


@dataclass(frozen=True)
class _Legend:
    """How grids are annotated: axis labels (draw_legend) and the margin between cells."""
    draw: Any
    margin: Any     # as given: a falsy margin and no legend leave the grid as it is

    def annotate(self, grid: Any, w: int, h: int, hor: list[str], ver: list[str], use_hor: bool,
                 use_ver: bool) -> Any:
        from modules.core.grid_labels import GridAnnotation, draw_grid_annotations

        if not self.draw and not self.margin:
            return grid
        hor_texts = [[GridAnnotation(t)] if self.draw and use_hor else [] for t in hor]
        ver_texts = [[GridAnnotation(t)] if self.draw and use_ver else [] for t in ver]
        return draw_grid_annotations(grid, w, h, hor_texts, ver_texts, int(self.margin or 0))


def _fix_seeds(p: Any, opts: Any, no_fixed_seeds: bool) -> None:
    if not no_fixed_seeds:  # one random seed for the whole plot, so cells differ only by the axes
        if not isinstance(p.seed, (list, tuple)):
            p.seed = processing.get_fixed_seed(p.seed)
        if not isinstance(p.subseed, (list, tuple)):
            p.subseed = processing.get_fixed_seed(p.subseed)
    if opts is not None and not opts.return_grid:
        p.batch_size = 1  # A1111: a cell shows one image when batch grids are not returned


def _axis_runs(axes: list[Axis], p: Any, selections: tuple[tuple[str, Any, Any, Any], ...], csv_mode: bool,
               no_fixed_seeds: bool) -> list[_AxisRun]:
    """X, Y and Z: the axis each selects and its parsed, checked values."""
    runs: list[_AxisRun] = []
    limit = _limits().max_xyz_cells
    cells = 1
    for name, selected, text, dropdown in selections:
        axis = find_axis(axes, selected, name)
        try:
            values = axis.values(text, dropdown, csv_mode, p, limit=max(1, limit // cells))
        except ProcessingError as err:
            raise ProcessingError(f"{TITLE}: {name} axis ({axis.label}): {err}") from None
        cells *= len(values)
        if cells > limit:  # counted from the axis values, before any cell is built
            raise ProcessingError(f"{TITLE}: {cells} cells; at most {limit} per plot (--max-xyz-cells)")
        if axis.label in ("Seed", "Var. seed") and not no_fixed_seeds:
            values = [processing.get_fixed_seed(v) for v in values]
        runs.append(_AxisRun(name, axis, values, _source_text(axis, text, dropdown, csv_mode)))
    return runs


def _build_cells(p: Any, runs: list[_AxisRun], opts: Any, vary: tuple[bool, bool, bool]) -> list[_Cell]:
    """Every cell's params, checked before any renders, so a bad value fails at once."""
    xr, yr, zr = runs
    limits = _limits()
    nx, ny = len(xr.values), len(yr.values)
    vary_x, vary_y, vary_z = vary
    cells: list[_Cell] = []
    for iz, z in enumerate(zr.values):
        for iy, y in enumerate(yr.values):
            for ix, x in enumerate(xr.values):
                pc = copy.copy(p)
                pc.do_not_save_grid = True
                if not isinstance(pc.seed, (list, tuple)) and (vary_x or vary_y or vary_z):
                    if pc.seed != -1:
                        pc.seed = int(pc.seed) + (ix if vary_x else 0) + \
                            (iy * nx if vary_y else 0) + (iz * nx * ny if vary_z else 0)
                try:
                    for run, value in ((xr, x), (yr, y), (zr, z)):
                        run.axis.apply(pc, value, run.values)
                    pc.params.validate(limits)
                    if opts is not None and pc.override_settings:
                        opts.validate_values(pc.override_settings)
                except ValueError as err:
                    where = ", ".join(f"{r.name}={r.axis.format(r.axis, v) or v}"
                                      for r, v in ((xr, x), (yr, y), (zr, z)) if r.used)
                    raise ProcessingError(f"{TITLE}: cell {where}: {err}") from None
                cells.append(_Cell(ix, iy, iz, pc))
    return cells


def _render(cells: list[_Cell], runs: list[_AxisRun], p: Any, state: Any) -> bool:
    """Render the cells (until interrupted); True when interrupted."""
    xr, yr, zr = runs
    # Slow-to-change axes (checkpoints) outermost, so each model loads once per value.
    order = sorted(((zr, "iz"), (yr, "iy"), (xr, "ix")), key=lambda item: -item[0].axis.cost)
    render_order = sorted(cells, key=lambda c: tuple(getattr(c, attr) for _, attr in order))

    n_iter = max(1, int(p.n_iter or 1))
    nz = len(zr.values)
    log.info("%s will create %d images on %d %dx%d grid%s.", TITLE, len(cells) * n_iter * p.batch_size,
             nz, len(xr.values), len(yr.values), "s" if nz > 1 else "")
    if state is not None:
        state.job_count = len(cells) * n_iter  # the core leaves it alone now

    for number, cell in enumerate(render_order, start=1):
        if state is not None and state.interrupted:
            break
        if state is not None:
            state.job = f"{number} out of {len(cells)}"
        cell.processed = processing.process_images(cell.p)
        proc = cell.processed   # images past the infotexts are ControlNet's detected maps: not cell pictures
        cell.images = list(proc.images[proc.index_of_first_image:len(proc.infotexts) or len(proc.images)])
        if cell.processed.interrupted:
            break
    return bool(state is not None and state.interrupted)


def _script_params(runs: list[_AxisRun], no_fixed_seeds: bool) -> dict[str, Any]:
    """What the grids' infotexts add: the script and each used axis's type and values."""
    script_params: dict[str, Any] = {"Script": TITLE}
    for r in runs:
        if not r.used:
            continue
        script_params[f"{r.name} Type"] = r.axis.label
        script_params[f"{r.name} Values"] = r.source_text
        if r.axis.label in ("Seed", "Var. seed") and not no_fixed_seeds:
            script_params[f"Fixed {r.name} Values"] = ", ".join(str(v) for v in r.values)
    return script_params


def _cell_infotext(cell: _Cell) -> str:
    proc = cell.processed
    return proc.infotexts[proc.index_of_first_image] if proc.infotexts else proc.info


def _layer_grids(cells: list[_Cell], runs: list[_AxisRun], opts: Any, legend: _Legend,
                 script_params: dict[str, Any]) -> tuple[list[Any], list[str]]:
    """One annotated X/Y grid per Z value, and its infotext; an unrendered cell is left white."""
    from modules.images import image_grid

    xr, yr, zr = runs

    def cell_image(cell: _Cell) -> Any:
        if len(cell.images) == 1:
            return cell.images[0]
        return image_grid(cell.images, rows=opts.n_rows if opts is not None else None,
                          batch_size=cell.p.batch_size)
    shown = {id(c): cell_image(c) for c in cells if c.images}
    cell_w = max(im.width for im in shown.values())
    cell_h = max(im.height for im in shown.values())
    first = next(c for c in cells if c.images)

    sub_grids, sub_infotexts = [], []
    for iz in range(len(zr.values)):
        layer = [c for c in cells if c.iz == iz]
        blank = None
        pictures = []
        for c in layer:
            if c.images:
                pictures.append(shown[id(c)])
            else:  # not rendered (interrupted): an empty cell keeps the layout
                blank = blank or Image.new("RGB", (cell_w, cell_h), "white")
                pictures.append(blank)
        grid = image_grid(pictures, rows=len(yr.values))
        grid = legend.annotate(grid, cell_w, cell_h, xr.labels(), yr.labels(), xr.used, yr.used)
        layer_first = next((c for c in layer if c.images), first)
        text = _add_params(_cell_infotext(layer_first), script_params)
        grid.info["parameters"] = text
        sub_grids.append(grid)
        sub_infotexts.append(text)
    return sub_grids, sub_infotexts


def _main_grid(sub_grids: list[Any], sub_infotexts: list[str], zr: _AxisRun, legend: _Legend) -> tuple[Any, str]:
    """The Z layers side by side (one layer: that layer's grid), and its infotext."""
    from modules.images import image_grid

    if len(sub_grids) <= 1:
        return sub_grids[0], sub_infotexts[0]
    sub_w = max(g.width for g in sub_grids)
    sub_h = max(g.height for g in sub_grids)
    main = image_grid(sub_grids, rows=1)
    main = legend.annotate(main, sub_w, sub_h, zr.labels(), [""], zr.used, False)
    main.info["parameters"] = sub_infotexts[0]
    return main, sub_infotexts[0]


def _processed(p: Any, done: list[_Cell], grids: list[Any], grid_texts: list[str], grid_paths: list[str | None],
               include_lone_images: bool, interrupted: bool, script_params: dict[str, Any]) -> Any:
    """The script's result: the grids (and, asked for, every cell's images) with the cells' run lists."""
    images, infotexts, paths = list(grids), list(grid_texts), list(grid_paths)
    all_prompts, all_negative, all_seeds, all_subseeds = [], [], [], []
    for c in done:
        proc = c.processed
        texts = proc.infotexts[proc.index_of_first_image:]
        all_prompts += proc.all_prompts
        all_negative += proc.all_negative_prompts
        all_seeds += proc.all_seeds
        all_subseeds += proc.all_subseeds
        if include_lone_images:
            images += c.images
            infotexts += texts
            cell_paths = list(proc.saved_paths) if len(proc.saved_paths) == len(c.images) else []
            paths += cell_paths or [None] * len(c.images)

    first_proc = done[0].processed
    return processing.Processed(
        p, images, first_proc.seed, grid_texts[0], first_proc.subseed, all_prompts=all_prompts,
        all_negative_prompts=all_negative, all_seeds=all_seeds, all_subseeds=all_subseeds,
        index_of_first_image=0, infotexts=infotexts,
        # Files (with their PNG info) for the gallery when every image was saved.
        saved_paths=paths if paths and all(paths) else None,
        interrupted=interrupted, sd_model_name=first_proc.sd_model_name, sd_model_hash=first_proc.sd_model_hash,
        sd_vae_name=first_proc.sd_vae_name, clip_skip=first_proc.clip_skip,
        job_timestamp=first_proc.job_timestamp,
        extra_generation_params={**first_proc.extra_generation_params, **script_params})


# -- the UI -------------------------------------------------------------------------------------
def _connect_axis_rows(axes: list[Axis], rows: list[tuple[Any, Any, Any, Any]], csv_mode: Any) -> None:
    """An axis with choices shows a dropdown (or, in CSV mode, its text box) and a 📒 fill button."""
    def axis_changed(index, text, picked, csv_on):
        axis = axes[index] if isinstance(index, int) and 0 <= index < len(axes) else axes[0]
        choices = axis.choices() if axis.choices is not None else []
        use_dropdown = bool(choices) and not csv_on
        picked = [v for v in (picked or []) if v in choices]
        return (gr.update(visible=bool(choices)), gr.update(visible=not use_dropdown),
                gr.update(choices=choices, value=picked, visible=use_dropdown))

    def fill_values(index, csv_on):
        axis = axes[index] if isinstance(index, int) and 0 <= index < len(axes) else axes[0]
        choices = axis.choices() if axis.choices is not None else []
        if csv_on:
            return gr.update(value=", ".join(_csv_quote(c) for c in choices)), gr.update()
        return gr.update(), gr.update(value=choices)

    for axis_type, values, values_dropdown, fill in rows:
        axis_type.change(axis_changed, inputs=[axis_type, values, values_dropdown, csv_mode],
                         outputs=[fill, values, values_dropdown], show_progress="hidden")
        csv_mode.change(axis_changed, inputs=[axis_type, values, values_dropdown, csv_mode],
                        outputs=[fill, values, values_dropdown], show_progress="hidden")
        fill.click(fill_values, inputs=[axis_type, csv_mode], outputs=[values, values_dropdown],
                   show_progress="hidden")


def _connect_swaps(swaps: list[tuple[Any, int, int]], rows: list[tuple[Any, Any, Any, Any]],
                   labels: list[str]) -> None:
    for button, i, j in swaps:
        first, second = rows[i][:3], rows[j][:3]
        # Index dropdowns return indices but take labels as values.
        button.click(lambda t1, v1, d1, t2, v2, d2: (labels[t2], v2, d2, labels[t1], v1, d1),
                     inputs=[*first, *second], outputs=[*second, *first], show_progress="hidden")


class Script(scripts.Script):
    def title(self):
        return TITLE

    def ui(self, is_img2img):
        axes = axes_for(is_img2img)
        labels = [a.label for a in axes]
        rows = self._axis_rows(labels)
        options = self._options_row()
        with gr.Row(variant="compact"):
            swaps = [(gr.Button(f"Swap {a.upper()}/{b.upper()} axes", size="sm"), i, j)
                     for a, b, i, j in (("x", "y", 0, 1), ("y", "z", 1, 2), ("x", "z", 0, 2))]
        _connect_axis_rows(axes, rows, options["csv_mode"])
        _connect_swaps(swaps, rows, labels)

        (x_type, x_values, x_values_dropdown, _), (y_type, y_values, y_values_dropdown, _), \
            (z_type, z_values, z_values_dropdown, _) = rows
        self.infotext_fields = [
            (x_type, "X Type"), (x_values, "X Values"),
            (y_type, "Y Type"), (y_values, "Y Values"),
            (z_type, "Z Type"), (z_values, "Z Values"),
        ]
        return [x_type, x_values, x_values_dropdown, y_type, y_values, y_values_dropdown,
                z_type, z_values, z_values_dropdown, options["draw_legend"], options["include_lone_images"],
                options["include_sub_grids"], options["no_fixed_seeds"], *options["vary"], options["margin_size"],
                options["csv_mode"]]

    def _axis_rows(self, labels: list[str]) -> list[tuple[Any, Any, Any, Any]]:
        """X, Y and Z: (type, values text, values dropdown, 📒 fill button) each."""
        rows = []
        with gr.Row():
            with gr.Column(scale=19):
                for name, default in (("x", "Seed"), ("y", "Nothing"), ("z", "Nothing")):
                    with gr.Row():
                        axis_type = gr.Dropdown(labels, value=default, type="index", label=f"{name.upper()} type",
                                                elem_id=self.elem_id(f"{name}_type"))
                        values = gr.Textbox(label=f"{name.upper()} values", lines=1,
                                            elem_id=self.elem_id(f"{name}_values"))
                        values_dropdown = gr.Dropdown(label=f"{name.upper()} values", visible=False,
                                                      multiselect=True, interactive=True, choices=[], value=[],
                                                      elem_id=self.elem_id(f"{name}_values_dropdown"))
                        fill = gr.Button("📒", visible=False, size="sm", min_width=40,
                                         elem_id=self.elem_id(f"fill_{name}"))
                    rows.append((axis_type, values, values_dropdown, fill))
        return rows

    def _options_row(self) -> dict[str, Any]:
        with gr.Row(variant="compact"):
            with gr.Column():
                draw_legend = gr.Checkbox(label="Draw legend", value=True, elem_id=self.elem_id("draw_legend"))
                no_fixed_seeds = gr.Checkbox(label="Keep -1 for seeds", value=False,
                                             elem_id=self.elem_id("no_fixed_seeds"))
                with gr.Row():
                    vary = [gr.Checkbox(label=f"Vary seeds for {n}", value=False, min_width=80,
                                        elem_id=self.elem_id(f"vary_seeds_{n.lower()}"),
                                        info=f"Use different seeds for images along the {n} axis.")
                            for n in ("X", "Y", "Z")]
            with gr.Column():
                include_lone_images = gr.Checkbox(label="Include Sub Images", value=False,
                                                  elem_id=self.elem_id("include_lone_images"))
                include_sub_grids = gr.Checkbox(label="Include Sub Grids", value=False,
                                                elem_id=self.elem_id("include_sub_grids"))
                csv_mode = gr.Checkbox(label="Use text inputs instead of dropdowns", value=False,
                                       elem_id=self.elem_id("csv_mode"))
            with gr.Column():
                margin_size = gr.Slider(label="Grid margins (px)", minimum=0, maximum=500, value=0, step=2,
                                        elem_id=self.elem_id("margin_size"))
        return {"draw_legend": draw_legend, "no_fixed_seeds": no_fixed_seeds, "vary": vary,
                "include_lone_images": include_lone_images, "include_sub_grids": include_sub_grids,
                "csv_mode": csv_mode, "margin_size": margin_size}

    def run(self, p, x_type=1, x_values="", x_values_dropdown=None, y_type=0, y_values="", y_values_dropdown=None,
            z_type=0, z_values="", z_values_dropdown=None, draw_legend=True, include_lone_images=False,
            include_sub_grids=False, no_fixed_seeds=False, vary_seeds_x=False, vary_seeds_y=False,
            vary_seeds_z=False, margin_size=0, csv_mode=False):
        opts = _options(p)
        state = _state(p)
        _fix_seeds(p, opts, no_fixed_seeds)
        runs = _axis_runs(axes_for(self.is_img2img), p, (("X", x_type, x_values, x_values_dropdown),
                                                          ("Y", y_type, y_values, y_values_dropdown),
                                                          ("Z", z_type, z_values, z_values_dropdown)),
                          bool(csv_mode), no_fixed_seeds)
        cells = _build_cells(p, runs, opts, (vary_seeds_x, vary_seeds_y, vary_seeds_z))
        interrupted = _render(cells, runs, p, state)

        done = [c for c in cells if c.images]
        if not done:
            return processing.Processed(p, [], p.seed if isinstance(p.seed, int) else -1, "",
                                        interrupted=interrupted)
        legend = _Legend(draw_legend, margin_size)
        script_params = _script_params(runs, no_fixed_seeds)
        sub_grids, sub_infotexts = _layer_grids(cells, runs, opts, legend, script_params)
        main, main_text = _main_grid(sub_grids, sub_infotexts, runs[2], legend)
        with_subs = include_sub_grids and len(sub_grids) > 1
        grids = [main] + (sub_grids if with_subs else [])
        grid_texts = [main_text] + (sub_infotexts if with_subs else [])
        first = done[0].processed
        save_grids = opts is not None and opts.grid_save and not p.do_not_save_grid
        grid_paths = [p.save_image(grid, info=text, grid=True, seed=first.seed,
                                   prompt=first.all_prompts[0] if first.all_prompts else None) if save_grids else None
                      for grid, text in zip(grids, grid_texts)]
        return _processed(p, done, grids, grid_texts, grid_paths, include_lone_images, interrupted, script_params)

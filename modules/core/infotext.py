"""A1111's "parameters" text (infotext): build it, parse it, find it in images.

Format, as written by A1111 v1.10 and read by every tool in the ecosystem::

    <prompt, may span lines>
    Negative prompt: <negative prompt, may span lines>      (omitted when empty)
    Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, ..., Version: v1.10.1

Values containing ``,`` ``:`` ``"`` or a newline are written as JSON strings.

Parsed values are strings, as in A1111 (``"Steps": "20"``); the UI and API
cast them where they use them. The exceptions are A1111's filled-in defaults,
which keep its types (``"Hires resize-1": 0``, ``"Masked area padding": 32``).

``INFOTEXT_FIELDS`` is the one table of infotext keys: how each is written from the typed
params, and which param, API request field and UI control a pasted value sets.

Pure Python; only ``read_info_from_image`` and ``make_pnginfo`` touch PIL.
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Callable, Iterator, NamedTuple

__all__ = [
    "INFOTEXT_FIELDS",
    "INFOTEXT_KEY_ORDER",
    "InfotextField",
    "InfotextSource",
    "Target",
    "written_params",
    "extra_generation_params",
    "read_fields",
    "hires_enabled",
    "quote",
    "unquote",
    "format_generation_params",
    "build_infotext",
    "parse_infotext",
    "parse_generation_parameters",
    "split_legacy_sampler_name",
    "read_info_from_image",
    "encode_user_comment",
    "decode_user_comment",
    "exif_user_comment_bytes",
    "make_pnginfo",
]

_NEEDS_QUOTES = re.compile(r'[,:\n"]')


# ---------------------------------------------------------------------------
# The field table: one record per infotext key, read by every layer
# ---------------------------------------------------------------------------

TXT2IMG, IMG2IMG = "txt2img", "img2img"
BOTH = (TXT2IMG, IMG2IMG)
LEAD, EXTRA = "lead", "extra"   # where a written key goes on the parameters line (InfotextField.line)
MASK_MODES = ("Inpaint masked", "Inpaint not masked")
INPAINT_AREAS = ("Whole picture", "Only masked")


def format_number(value: float) -> str:
    """``7.0`` -> ``"7"``, ``0.75`` -> ``"0.75"``: how A1111 writes a float parameter."""
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def to_int(value: Any) -> int:
    return int(float(value))  # "20" and "20.0" alike


def to_float(value: Any) -> float:
    return float(value)


def to_bool(value: Any) -> bool:
    return value is True or str(value).strip().lower() in ("true", "1", "yes")


def to_str(value: Any) -> str:
    return "" if value is None else str(value)


def one_of(labels: tuple[str, ...]) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        if str(value) not in labels:
            raise ValueError(f"{value!r} is not one of {labels}")
        return str(value)
    return parse


def _masked_content() -> tuple[str, ...]:
    from modules.core.masking import MASKED_CONTENT  # lazy: masking needs numpy, this module does not

    return MASKED_CONTENT


def _masked_content_label(value: Any) -> str:
    return one_of(_masked_content())(value)


@dataclass(frozen=True)
class InfotextSource:
    """What one image's parameters are written from: its params and what the run resolved for it."""
    p: Any                              # GenerationParams (Txt2ImgParams, Img2ImgParams)
    seed: int | None = None
    subseed: int | None = None
    sampler: str | None = None          # the resolved sampler's name
    schedule: str | None = None         # the schedule it really uses ("Karras" for "Automatic")
    clip_skip: int = 1
    model_hash: str | None = None
    model_name: str | None = None
    vae_name: str | None = None
    vae_hash: str | None = None
    refiner: str | None = None          # "name [hash]" of the refiner, when it ran
    eta_noise_seed_delta: Any = 0
    randn_source: str = "GPU"


class Target(NamedTuple):
    """One value a reader sets from a parsed infotext."""
    key: str            # key in the parsed dict ("Size-1": the first half of a WxH key)
    param: str | None   # GenerationParams attribute; dotted into HiresParams ("hires.scale")
    api: str | None     # /sdapi/v1 txt2img/img2img request field
    ui: str | None      # Txt2ImgControls / Img2ImgControls field


@dataclass(frozen=True)
class InfotextField:
    """One infotext key: how create_infotext writes it, and what a pasted value sets in the params,
    the API request and the UI. A ``WxH`` key ("Size") names a pair of each, which readers get as
    ``Key-1`` and ``Key-2`` (as parse_infotext splits them)."""
    key: str
    param: str | tuple[str, str] | None = None
    api: str | tuple[str, str] | None = None
    ui: str | tuple[str, str] | None = None
    parse: Callable[[Any], Any] = to_str                     # parsed value -> the value set
    write: Callable[[InfotextSource], Any] | None = None     # the value written; None: left out
    kinds: tuple[str, ...] = BOTH
    # LEAD: written in this table's order (INFOTEXT_KEY_ORDER); EXTRA: A1111's extra_generation_params,
    # after the lead keys in insertion order; None: not on the parameters line.
    line: str | None = LEAD
    omitted: Any = None     # what a missing key means to the UI paste (the writer leaves it out at this value)

    @property
    def targets(self) -> tuple[Target, ...]:
        names = (self.param, self.api, self.ui)
        if not any(isinstance(n, tuple) for n in names):
            return (Target(self.key, *names),)
        return tuple(Target(f"{self.key}-{i + 1}", *(n[i] if n else None for n in names)) for i in (0, 1))


def _denoising(s: InfotextSource) -> str | None:
    value = s.p.denoising_strength_for_info
    return None if value is None else format_number(value)


def _variation(value: Callable[[InfotextSource], Any]) -> Callable[[InfotextSource], Any]:
    return lambda s: value(s) if s.p.subseed_strength > 0 else None


def _seed_resize_from(s: InfotextSource) -> str | None:
    w, h = s.p.seed_resize_from_w, s.p.seed_resize_from_h
    return f"{w}x{h}" if w > 0 and h > 0 else None


def _hires(value: Callable[[Any, Any], Any]) -> Callable[[InfotextSource], Any]:
    """A writer that has a value only when hires fix ran: value(hires, p)."""
    def write(s: InfotextSource) -> Any:
        h = getattr(s.p, "hires", None)
        return value(h, s.p) if h is not None and h.enabled else None
    return write


def _hires_unless_same(attr: str, same: str) -> Callable[[InfotextSource], Any]:
    """The hires pass's own value of `attr`, when it differs from the first pass's."""
    return _hires(lambda h, p: getattr(h, attr) if getattr(h, attr) not in ("", same, getattr(p, attr)) else None)


def _inpaint(value: Callable[[Any], Any]) -> Callable[[InfotextSource], Any]:
    """A writer that has a value only when a mask was used: value(p)."""
    return lambda s: value(s.p) if getattr(s.p, "mask", None) is not None else None


def _controlnet_unit(index: int) -> Callable[[InfotextSource], Any]:
    """sd-webui-controlnet's ``ControlNet N`` entry for unit N, when it took part."""
    def write(s: InfotextSource) -> Any:
        units = getattr(s.p, "controlnet_units", None) or []
        unit = units[index].normalized(index) if index < len(units) else None
        return unit.infotext() if unit is not None and unit.active else None
    return write


_HIRES = {"kinds": (TXT2IMG,), "line": EXTRA}
TI_HASHES = "TI hashes"
_INPAINT = {"kinds": (IMG2IMG,), "line": EXTRA}

INFOTEXT_FIELDS: tuple[InfotextField, ...] = (
    # The prompts are the lines above the parameters line (build_infotext).
    InfotextField("Prompt", "prompt", "prompt", "prompt", line=None),
    InfotextField("Negative prompt", "negative_prompt", "negative_prompt", "negative_prompt", line=None),
    InfotextField("Steps", "steps", "steps", "steps", to_int, lambda s: s.p.steps),
    InfotextField("Sampler", "sampler_name", "sampler_name", "sampler_name", write=lambda s: s.sampler),
    InfotextField("Schedule type", "scheduler", "scheduler", "scheduler", write=lambda s: s.schedule),
    InfotextField("CFG scale", "cfg_scale", "cfg_scale", "cfg_scale", to_float, lambda s: format_number(s.p.cfg_scale)),
    InfotextField("Image CFG scale"),   # keys without a writer: A1111 writes them, here extensions may
    InfotextField("Seed", "seed", "seed", "seed", to_int, lambda s: s.seed),
    InfotextField("Face restoration"),
    InfotextField("Size", ("width", "height"), ("width", "height"), ("width", "height"), to_int,
                  lambda s: f"{s.p.width}x{s.p.height}"),
    InfotextField("Batch size", "batch_size", "batch_size", "batch_size", to_int, line=None),  # pasted, not written
    InfotextField("Model hash", write=lambda s: s.model_hash),   # readers pick the checkpoint by these two
    InfotextField("Model", write=lambda s: s.model_name),
    InfotextField("VAE hash", write=lambda s: s.vae_hash),
    InfotextField("VAE", write=lambda s: s.vae_name),
    InfotextField("Variation seed", "subseed", "subseed", "subseed", to_int, _variation(lambda s: s.subseed)),
    InfotextField("Variation seed strength", "subseed_strength", "subseed_strength", "subseed_strength", to_float,
                  _variation(lambda s: format_number(s.p.subseed_strength)), omitted=0),
    InfotextField("Seed resize from", ("seed_resize_from_w", "seed_resize_from_h"),
                  ("seed_resize_from_w", "seed_resize_from_h"), ("seed_resize_from_w", "seed_resize_from_h"),
                  to_int, _seed_resize_from, omitted=0),
    # txt2img: the hires pass's strength; img2img: the init image's.
    InfotextField("Denoising strength", "hires.denoising_strength", "denoising_strength", "hires_denoising",
                  to_float, _denoising, kinds=(TXT2IMG,)),
    InfotextField("Denoising strength", "denoising_strength", "denoising_strength", "denoising_strength",
                  to_float, _denoising, kinds=(IMG2IMG,)),
    InfotextField("Conditional mask weight"),
    # Clip skip, ENSD and RNG are settings: readers take them through the options' infotext labels.
    InfotextField("Clip skip", write=lambda s: s.clip_skip if s.clip_skip > 1 else None, omitted=1),
    InfotextField("ENSD", write=lambda s: s.eta_noise_seed_delta or None),
    InfotextField("Init image hash"),
    InfotextField("RNG", write=lambda s: s.randn_source if s.randn_source != "GPU" else None),
    InfotextField("Tiling", "tiling", "tiling", "tiling", to_bool, lambda s: True if s.p.tiling else None,
                  omitted=False),
    # Hires fix (A1111 writes an upscale factor or a target size, never both).
    InfotextField("Hires upscale", "hires.scale", "hr_scale", "hires_scale", to_float,
                  _hires(lambda h, p: None if h.resize_x or h.resize_y else format_number(h.scale)), **_HIRES),
    InfotextField("Hires resize", ("hires.resize_x", "hires.resize_y"), ("hr_resize_x", "hr_resize_y"),
                  ("hires_resize_x", "hires_resize_y"), to_int,
                  _hires(lambda h, p: f"{h.resize_x}x{h.resize_y}" if h.resize_x or h.resize_y else None),
                  omitted=0, **_HIRES),
    InfotextField("Hires steps", "hires.steps", "hr_second_pass_steps", "hires_steps", to_int,
                  _hires(lambda h, p: h.steps or None), **_HIRES),
    InfotextField("Hires upscaler", "hires.upscaler", "hr_upscaler", "hires_upscaler",
                  write=_hires(lambda h, p: h.upscaler), **_HIRES),
    InfotextField("Hires sampler", "hires.sampler_name", "hr_sampler_name", "hires_sampler",
                  write=_hires_unless_same("sampler_name", "Use same sampler"), omitted="Use same sampler", **_HIRES),
    InfotextField("Hires schedule type", "hires.scheduler", "hr_scheduler", None,
                  write=_hires_unless_same("scheduler", "Use same scheduler"), **_HIRES),
    InfotextField("Hires prompt", "hires.prompt", "hr_prompt", "hires_prompt",
                  write=_hires(lambda h, p: h.prompt if h.prompt and h.prompt != p.prompt else None),
                  omitted="", **_HIRES),
    InfotextField("Hires negative prompt", "hires.negative_prompt", "hr_negative_prompt", "hires_negative_prompt",
                  write=_hires(lambda h, p: h.negative_prompt
                               if h.negative_prompt and h.negative_prompt != p.negative_prompt else None),
                  omitted="", **_HIRES),
    # The refiner (A1111 1.6+), written when it ran; the UI paste goes to the Refiner script's controls.
    InfotextField("Refiner", "refiner_checkpoint", "refiner_checkpoint", write=lambda s: s.refiner, line=EXTRA),
    InfotextField("Refiner switch at", "refiner_switch_at", "refiner_switch_at", parse=to_float,
                  write=lambda s: format_number(s.p.refiner_switch_at) if s.refiner else None, line=EXTRA),
    # Inpainting. The UI's radios hold these labels; the params hold a flag or an index.
    InfotextField("Mask blur", "mask_blur", "mask_blur", "mask_blur", to_int, _inpaint(lambda p: p.mask_blur),
                  **_INPAINT),
    InfotextField("Mask mode", ui="mask_mode", parse=one_of(MASK_MODES),
                  write=_inpaint(lambda p: MASK_MODES[1] if p.inpainting_mask_invert else MASK_MODES[0]),
                  omitted=MASK_MODES[0], **_INPAINT),
    InfotextField("Masked content", ui="inpainting_fill", parse=_masked_content_label,
                  write=_inpaint(lambda p: _masked_content()[p.inpainting_fill]), omitted="original", **_INPAINT),
    InfotextField("Inpaint area", ui="inpaint_full_res", parse=one_of(INPAINT_AREAS),
                  write=_inpaint(lambda p: INPAINT_AREAS[1] if p.inpaint_full_res else INPAINT_AREAS[0]),
                  omitted=INPAINT_AREAS[0], **_INPAINT),
    InfotextField("Masked area padding", "inpaint_full_res_padding", None, "inpaint_full_res_padding", to_int,
                  _inpaint(lambda p: p.inpaint_full_res_padding if p.inpaint_full_res else None), omitted=32, **_INPAINT),
    # Textual inversion: "name: shorthash, ..." of the embeddings the prompts used. The pipeline writes it
    # (it needs the loaded embeddings: pipeline._embedding_params); pasting sets nothing, as in A1111.
    InfotextField(TI_HASHES, line=EXTRA),
    # Extra networks: written by the run (engine/networks/activation.py) for the LoRAs it applied, as
    # A1111 does; a paste sets nothing from it (the <lora:...> tags in the prompt carry the networks).
    InfotextField("Lora hashes", line=EXTRA),
    # ControlNet units (sd-webui-controlnet's keys); a paste restores them through core.controlnet_units.
    *(InfotextField(f"ControlNet {i}", write=_controlnet_unit(i), line=EXTRA) for i in range(10)),
)
"""In A1111's order. ``Version`` is not here: create_infotext adds it and it is always written last."""

INFOTEXT_KEY_ORDER: tuple[str, ...] = tuple(dict.fromkeys(f.key for f in INFOTEXT_FIELDS if f.line == LEAD))
"""Keys that lead the parameters line, in this order; others follow in insertion order, and
``Version`` is always last."""


def written_params(source: InfotextSource, line: str) -> dict[str, Any]:
    """``{key: value}`` of the fields on `line` (LEAD or EXTRA) that have a value for `source`."""
    kind = getattr(source.p, "kind", TXT2IMG)
    out: dict[str, Any] = {}
    for f in INFOTEXT_FIELDS:
        if f.line == line and f.write is not None and kind in f.kinds:
            value = f.write(source)
            if value is not None:
                out[f.key] = value
    return out


def extra_generation_params(p: Any) -> dict[str, Any]:
    """A1111's ``p.extra_generation_params`` entries of the params themselves (hires fix, inpainting)."""
    return written_params(InfotextSource(p), EXTRA)


_re_loose_size = re.compile(r"\s*(\d+)\s*x\s*(\d+)\s*")


def read_fields(parsed: Mapping[str, Any], kind: str, column: str) -> Iterator[tuple[InfotextField, Target, Any]]:
    """``(field, target, raw value)`` for each target of `kind` with a name in `column` ("param", "api"
    or "ui") whose key `parsed` holds. A ``WxH`` value some parser kept whole is split here."""
    for f in INFOTEXT_FIELDS:
        if kind not in f.kinds:
            continue
        for half, target in enumerate(f.targets):
            if getattr(target, column) is None:
                continue
            raw = parsed.get(target.key)
            if raw is None and target.key != f.key and f"{f.key}-1" not in parsed and f.key in parsed:
                m = _re_loose_size.fullmatch(str(parsed[f.key]))
                raw = m.group(half + 1) if m else None
            if raw is not None:
                yield f, target, raw


def hires_enabled(parsed: Mapping[str, Any]) -> bool:
    """A1111's rule: hires fix was on when there is a denoising strength and a hires key (txt2img)."""
    return "Denoising strength" in parsed and any(k in parsed for k in ("Hires upscale", "Hires upscaler",
                                                                         "Hires resize-1"))


# ---------------------------------------------------------------------------
# Building
# ---------------------------------------------------------------------------


def quote(value: Any) -> str:
    """Text for one value: as is, or JSON-quoted when it would break the line."""
    if isinstance(value, (dict, list, tuple)):
        value = json.dumps(value, ensure_ascii=False)
    text = str(value)
    if _NEEDS_QUOTES.search(text):
        return json.dumps(text, ensure_ascii=False)
    return text


def unquote(text: str) -> str:
    """Inverse of ``quote`` for one value; text that is not a JSON string is kept."""
    if len(text) >= 2 and text[0] == '"' and text[-1] == '"':
        try:
            value = json.loads(text)
        except ValueError:
            return text
        if isinstance(value, str):
            return value
    return text


def format_generation_params(params: Mapping[str, Any]) -> str:
    """The ``Key: value, Key: value`` line. ``None`` values are left out."""
    present = {k: v for k, v in params.items() if v is not None}
    ordered = [k for k in INFOTEXT_KEY_ORDER if k in present]
    ordered += [k for k in present if k not in INFOTEXT_KEY_ORDER and k != "Version"]
    if "Version" in present:
        ordered.append("Version")
    parts = []
    for key in ordered:
        value = present[key]
        # A1111 writes a flag whose value is its own name as the bare key
        parts.append(key if value == key else f"{key}: {quote(value)}")
    return ", ".join(parts)


def build_infotext(prompt: str, negative_prompt: str, params: Mapping[str, Any]) -> str:
    """Full infotext: prompt, optional ``Negative prompt:`` line, parameters line.

    ``params`` is A1111's dict shape (``p.extra_generation_params`` merged in);
    the caller decides what to include (e.g. ``Clip skip`` only when > 1).
    """
    negative = f"\nNegative prompt: {negative_prompt}" if negative_prompt else ""
    return f"{prompt}{negative}\n{format_generation_params(params)}".strip()


# ---------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------

# One `Key: value` pair of the parameters line. A key starts with a word
# character and has at least two characters; a value is a JSON string or runs
# to the next comma.
_re_pair = re.compile(
    r"""\s*
    (?P<key>\w[\w \-/]+)
    :\s*
    (?P<value>"(?:\\.|[^\\"])+"|[^,]*)
    (?:,|$)""",
    re.X,
)
_re_size = re.compile(r"^(\d+)x(\d+)$")
_NEGATIVE_PREFIX = "Negative prompt:"

# A1111 schedule labels, plus internal names and aliases, that old infotexts
# glued onto the sampler name ("DPM++ 2M Karras").
_SCHEDULE_SUFFIXES: dict[str, str] = {}
for _label, *_other in (
    ("Uniform", "uniform"),
    ("Karras", "karras"),
    ("Exponential", "exponential"),
    ("Polyexponential", "polyexponential"),
    ("SGM Uniform", "sgm_uniform", "SGMUniform"),
    ("KL Optimal", "kl_optimal"),
    ("Align Your Steps", "align_your_steps"),
    ("Simple", "simple"),
    ("Normal", "normal"),
    ("DDIM", "ddim"),
    ("Beta", "beta"),
):
    for _name in (_label, *_other):
        _SCHEDULE_SUFFIXES[_name] = _label


def split_legacy_sampler_name(name: str) -> tuple[str, str | None]:
    """``"DPM++ 2M Karras"`` -> ``("DPM++ 2M", "Karras")``; other names -> ``(name, None)``."""
    for suffix in sorted(_SCHEDULE_SUFFIXES, key=len, reverse=True):
        if name.endswith(" " + suffix) and len(name) > len(suffix) + 1:
            return name[: -len(suffix) - 1], _SCHEDULE_SUFFIXES[suffix]
    return name, None


def _old_hires_first_pass_size(width: int, height: int) -> tuple[int, int]:
    # pre-1.0 hires fix: first pass at about 512x512 pixels, rounded up to 64
    scale = math.sqrt(512 * 512 / (width * height))
    return math.ceil(scale * width / 64) * 64, math.ceil(scale * height / 64) * 64


def _parse_version(text: str | None):
    if not text:
        return None
    try:
        from packaging import version
    except ImportError:  # pragma: no cover - packaging ships with pip/transformers
        return None
    m = re.match(r"([^-]+-[^-]+)-.*", text)  # "v1.7.0-225-gabcdef" -> "v1.7.0-225"
    try:
        return version.parse(m.group(1) if m else text)
    except version.InvalidVersion:
        return None


def _apply_backcompat(res: dict[str, Any]) -> None:
    """Flags A1111 sets so images made by older versions reproduce."""
    ver = _parse_version(res.get("Version"))
    if ver is None:
        return
    from packaging.version import Version

    if ver < Version("1.6.0"):
        if "[" in res.get("Prompt", ""):
            res["Old prompt editing timelines"] = True
        if res.get("Sampler", "") in ("DDIM", "PLMS"):
            res["Pad conds v0"] = True
    if ver < Version("1.7.0.post225"):
        res["Downcast alphas_cumprod"] = True
    if ver < Version("1.8.0") and res.get("Refiner"):
        res["Refiner switch by sampling steps"] = True


def parse_infotext(
    text: str, *, backcompat: bool = True, skip: Iterable[str] = ()
) -> dict[str, Any]:
    """A1111's ``parse_generation_parameters``: infotext -> dict.

    ``Prompt`` and ``Negative prompt`` are always present. The last line is the
    parameters line only if it holds at least three ``Key: value`` pairs;
    otherwise it belongs to the prompt. ``WxH`` values also give ``Key-1`` and
    ``Key-2``. Missing keys get A1111's defaults for old infotexts, old sampler
    names are split into sampler + schedule type, and with ``backcompat`` the
    compatibility flags implied by ``Version`` are added. ``skip`` removes keys
    (A1111's "infotext_skip_pasting" setting).
    """
    prompt_lines, params_line = _split_parameters_line(text)
    res = _parse_prompts(prompt_lines)
    res.update(_parse_pairs(params_line))
    _split_legacy_samplers(res)
    _fill_defaults(res)
    if backcompat:
        _apply_backcompat(res)
    skipped = set(skip)
    return {k: v for k, v in res.items() if k not in skipped}


def _split_parameters_line(text: str) -> tuple[list[str], str]:
    """(prompt lines, parameters line or "")."""
    *lines, last = text.strip().split("\n")
    if len(_re_pair.findall(last)) < 3:
        lines.append(last)
        last = ""
    return lines, last


def _parse_prompts(lines: list[str]) -> dict[str, Any]:
    prompt_lines: list[str] = []
    negative_lines: list[str] = []
    in_negative = False
    for line in lines:
        line = line.strip()
        if line.startswith(_NEGATIVE_PREFIX):
            in_negative = True
            line = line[len(_NEGATIVE_PREFIX):].strip()
        (negative_lines if in_negative else prompt_lines).append(line)
    return {"Prompt": "\n".join(prompt_lines), "Negative prompt": "\n".join(negative_lines)}


def _parse_pairs(line: str) -> dict[str, Any]:
    res: dict[str, Any] = {}
    for m in _re_pair.finditer(line):
        key, value = m.group("key"), m.group("value")
        value = unquote(value) if value.startswith('"') else value
        size = _re_size.match(value)
        if size:
            res[f"{key}-1"], res[f"{key}-2"] = size.group(1), size.group(2)
        res[key] = value
    return res


def _split_legacy_samplers(res: dict[str, Any]) -> None:
    for field in ("Sampler", "Hires sampler"):
        sampler = res.get(field)
        if isinstance(sampler, str):
            name, schedule = split_legacy_sampler_name(sampler)
            if schedule is not None:
                res[field] = name
                # the glued-on name is what the image was made with, so it wins
                res["Schedule type" if field == "Sampler" else "Hires schedule type"] = schedule


def _fill_defaults(res: dict[str, Any]) -> None:
    """Defaults for keys older versions did not write; values (and types) as A1111 fills them."""
    res.setdefault("Clip skip", "1")
    hypernet = res.get("Hypernet")
    if hypernet is not None:
        res["Prompt"] += f"<hypernet:{hypernet}:{res.get('Hypernet strength', '1.0')}>"
    if "Hires resize-1" not in res:
        res["Hires resize-1"] = 0
        res["Hires resize-2"] = 0
    res.setdefault("Hires sampler", "Use same sampler")
    res.setdefault("Hires checkpoint", "Use same checkpoint")
    res.setdefault("Hires prompt", "")
    res.setdefault("Hires negative prompt", "")
    res.setdefault("Mask mode", "Inpaint masked")
    res.setdefault("Masked content", "original")
    res.setdefault("Inpaint area", "Whole picture")
    res.setdefault("Masked area padding", 32)
    _restore_old_hires_fix(res)
    res.setdefault("RNG", "GPU")
    res.setdefault("Schedule type", "Automatic")
    res.setdefault("Schedule max sigma", 0)
    res.setdefault("Schedule min sigma", 0)
    res.setdefault("Schedule rho", 0)
    res.setdefault("VAE Encoder", "Full")
    res.setdefault("VAE Decoder", "Full")
    res.setdefault("FP8 weight", "Disable")
    if res["FP8 weight"] != "Disable":
        res.setdefault("Cache FP16 weight for LoRA", False)


parse_generation_parameters = parse_infotext  # A1111's name


def _restore_old_hires_fix(res: dict[str, Any]) -> None:
    """Pre-1.0 infotexts gave the first pass size; turn that into size + hires size."""
    first_w, first_h = res.get("First pass size-1"), res.get("First pass size-2")
    if first_w is None or first_h is None:
        return
    try:
        first_w, first_h = int(first_w), int(first_h)
        width, height = int(res.get("Size-1", 512)), int(res.get("Size-2", 512))
    except (TypeError, ValueError):
        return
    if first_w == 0 or first_h == 0:
        first_w, first_h = _old_hires_first_pass_size(width, height)
    res["Size-1"], res["Size-2"] = first_w, first_h
    res["Hires resize-1"], res["Hires resize-2"] = width, height


# ---------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------

# Info keys that are encoder details, not metadata a user wrote.
_IGNORED_INFO_KEYS = frozenset({
    "jfif", "jfif_version", "jfif_unit", "jfif_density", "dpi", "exif",
    "loop", "background", "timestamp", "duration", "progressive",
    "progression", "icc_profile", "chromaticity", "photoshop",
})

_EXIF_IFD = 0x8769
_USER_COMMENT = 0x9286
_UC_UNICODE = b"UNICODE\0"
_UC_ASCII = b"ASCII\0\0\0"
_UC_JIS = b"JIS\0\0\0\0\0"
_UC_UNDEFINED = b"\0" * 8


def encode_user_comment(text: str) -> bytes:
    """EXIF UserComment payload the way A1111 (via piexif) writes it:
    ``b"UNICODE\\0"`` followed by UTF-16 big-endian text."""
    return _UC_UNICODE + text.encode("utf-16-be")


def decode_user_comment(raw: bytes) -> str:
    """Text of an EXIF UserComment, whatever character-code prefix it has."""
    head, body = raw[:8], raw[8:]
    if head == _UC_UNICODE:
        if body[:2] in (b"\xfe\xff", b"\xff\xfe"):
            text = body.decode("utf-16", errors="replace")
        else:
            # The standard says big-endian, but some writers use little-endian.
            # ASCII-heavy text shows which: its zero bytes sit at even offsets in BE.
            zeros_even = body[0::2].count(0)
            zeros_odd = body[1::2].count(0)
            text = body.decode("utf-16-le" if zeros_odd > zeros_even else "utf-16-be", errors="replace")
    elif head == _UC_ASCII:
        text = body.decode("utf-8", errors="replace")  # many tools put UTF-8 here
    elif head == _UC_JIS:
        text = body.decode("shift_jis", errors="replace")
    elif head == _UC_UNDEFINED:
        text = body.decode("utf-8", errors="ignore")
    else:
        text = raw.decode("utf-8", errors="ignore")
    return text.rstrip("\0")


def exif_user_comment_bytes(text: str) -> bytes:
    """A complete EXIF block (``b"Exif\\0\\0"`` + big-endian TIFF) holding only
    ``text`` as UserComment; pass it as ``image.save(..., exif=...)`` for JPEG
    and WEBP.

    Written by hand so the tag has type UNDEFINED, as piexif writes it (PIL
    would pick BYTE, which A1111's piexif-based reader cannot decode).
    """
    payload = encode_user_comment(text)
    # header(8) | IFD0: count(2) entry(12) next(4) | Exif IFD: same | payload
    exif_ifd_at = 8 + 2 + 12 + 4
    payload_at = exif_ifd_at + 2 + 12 + 4
    tiff = b"MM\x00\x2a" + struct.pack(">I", 8)
    tiff += struct.pack(">H", 1) + struct.pack(">HHII", _EXIF_IFD, 4, 1, exif_ifd_at) + struct.pack(">I", 0)
    if len(payload) <= 4:
        tiff += struct.pack(">H", 1) + struct.pack(">HHI", _USER_COMMENT, 7, len(payload))
        tiff += payload.ljust(4, b"\0") + struct.pack(">I", 0)
    else:
        tiff += struct.pack(">H", 1) + struct.pack(">HHII", _USER_COMMENT, 7, len(payload), payload_at)
        tiff += struct.pack(">I", 0) + payload
    return b"Exif\x00\x00" + tiff


def _exif_user_comment(image) -> str | None:
    try:
        raw = image.getexif().get_ifd(_EXIF_IFD).get(_USER_COMMENT)
    except Exception:  # malformed EXIF must not break reading the rest
        return None
    if raw is None:
        return None
    if isinstance(raw, str):
        return raw
    if isinstance(raw, tuple):  # BYTE-typed tags can come back as ints
        raw = bytes(raw)
    return decode_user_comment(bytes(raw))


# NovelAI's sampler ids -> A1111 names (unknown ids fall back to Euler a, as A1111).
_NOVELAI_SAMPLERS = {
    "k_euler_ancestral": "Euler a",
    "k_euler": "Euler",
    "k_lms": "LMS",
    "k_heun": "Heun",
    "k_dpm_2": "DPM2",
    "k_dpm_2_ancestral": "DPM2 a",
    "k_dpmpp_2m": "DPM++ 2M",
    "k_dpmpp_2s_ancestral": "DPM++ 2S a",
    "k_dpmpp_sde": "DPM++ SDE",
    "ddim": "DDIM",
    "plms": "PLMS",
}


def read_info_from_image(image) -> tuple[str | None, dict[str, Any]]:
    """``(infotext or None, other info items)`` for a PIL image.

    Looks in the PNG ``parameters`` text chunk (tEXt, zTXt or iTXt), then the
    EXIF UserComment (JPEG/WEBP, and PNG eXIf), then a GIF comment; converts
    NovelAI's PNG metadata to an infotext. Encoder details such as ``dpi``,
    ``icc_profile`` and raw ``exif`` bytes are dropped from the items.
    """
    items: dict[str, Any] = dict(image.info or {})
    geninfo = items.pop("parameters", None)
    if geninfo is not None:
        geninfo = str(geninfo)

    if "exif" in items:
        comment = _exif_user_comment(image)
        if comment:
            items["exif comment"] = comment
            geninfo = comment
    elif "comment" in items:  # GIF
        comment = items["comment"]
        geninfo = comment.decode("utf-8", errors="ignore") if isinstance(comment, bytes) else str(comment)

    for key in _IGNORED_INFO_KEYS:
        items.pop(key, None)

    if items.get("Software") == "NovelAI":
        try:
            meta = json.loads(items["Comment"])
            sampler = _NOVELAI_SAMPLERS.get(meta.get("sampler"), "Euler a")
            geninfo = (
                f"{items['Description']}\n"
                f"Negative prompt: {meta['uc']}\n"
                f"Steps: {meta['steps']}, Sampler: {sampler}, CFG scale: {meta['scale']}, "
                f"Seed: {meta['seed']}, Size: {image.width}x{image.height}, Clip skip: 2, ENSD: 31337"
            )
        except (KeyError, TypeError, ValueError):
            pass  # not the NovelAI layout we know; leave the items as they are

    return geninfo, items


def make_pnginfo(parameters: str | None, extra: Mapping[str, str] | None = None):
    """``PngInfo`` with the ``parameters`` chunk (tEXt if latin-1, else iTXt)
    plus any ``extra`` text chunks, for ``image.save(..., pnginfo=...)``."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    if parameters is not None:
        info.add_text("parameters", parameters)  # PIL switches to iTXt when needed
    for key, value in (extra or {}).items():
        info.add_text(key, str(value))
    return info

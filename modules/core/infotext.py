"""A1111's "parameters" text (infotext): build it, parse it, find it in images.

Format, as written by A1111 v1.10 and read by every tool in the ecosystem::

    <prompt, may span lines>
    Negative prompt: <negative prompt, may span lines>      (omitted when empty)
    Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, ..., Version: v1.10.1

Values containing ``,`` ``:`` ``"`` or a newline are written as JSON strings.

Parsed values are strings, as in A1111 (``"Steps": "20"``); the UI and API
cast them where they use them. The exceptions are A1111's filled-in defaults,
which keep its types (``"Hires resize-1": 0``, ``"Masked area padding": 32``).

Pure Python; only ``read_info_from_image`` and ``make_pnginfo`` touch PIL.
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = [
    "INFOTEXT_KEY_ORDER",
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

INFOTEXT_KEY_ORDER: tuple[str, ...] = (
    "Steps",
    "Sampler",
    "Schedule type",
    "CFG scale",
    "Image CFG scale",
    "Seed",
    "Face restoration",
    "Size",
    "Model hash",
    "Model",
    "VAE hash",
    "VAE",
    "Variation seed",
    "Variation seed strength",
    "Seed resize from",
    "Denoising strength",
    "Conditional mask weight",
    "Clip skip",
    "ENSD",
    "Init image hash",
    "RNG",
    "Tiling",
)
"""Keys that lead the parameters line, in this order; others follow in insertion
order, and ``Version`` is always last."""

_NEEDS_QUOTES = re.compile(r'[,:\n"]')


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
    res: dict[str, Any] = {}
    *lines, last = text.strip().split("\n")
    if len(_re_pair.findall(last)) < 3:
        lines.append(last)
        last = ""

    prompt_lines: list[str] = []
    negative_lines: list[str] = []
    in_negative = False
    for line in lines:
        line = line.strip()
        if line.startswith(_NEGATIVE_PREFIX):
            in_negative = True
            line = line[len(_NEGATIVE_PREFIX):].strip()
        (negative_lines if in_negative else prompt_lines).append(line)
    res["Prompt"] = "\n".join(prompt_lines)
    res["Negative prompt"] = "\n".join(negative_lines)

    for m in _re_pair.finditer(last):
        key, value = m.group("key"), m.group("value")
        value = unquote(value) if value.startswith('"') else value
        size = _re_size.match(value)
        if size:
            res[f"{key}-1"], res[f"{key}-2"] = size.group(1), size.group(2)
        res[key] = value

    for field in ("Sampler", "Hires sampler"):
        sampler = res.get(field)
        if isinstance(sampler, str):
            name, schedule = split_legacy_sampler_name(sampler)
            if schedule is not None:
                res[field] = name
                # the glued-on name is what the image was made with, so it wins
                res["Schedule type" if field == "Sampler" else "Hires schedule type"] = schedule

    # Defaults for keys older versions did not write; values as A1111 fills them.
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

    if backcompat:
        _apply_backcompat(res)

    skipped = set(skip)
    return {k: v for k, v in res.items() if k not in skipped}


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

"""Saving generated images the way A1111 users expect, and building grids.

Behaviour matched (A1111 v1.10): ``00000-SEED.png`` numbering that continues from the highest
leading number already in the folder (the sequence starts at 0), ``grid-0000.png`` grids, filename
pattern tags, the ``parameters`` PNG text chunk (iTXt when not latin-1), the EXIF UserComment for
JPEG/WEBP, optional ``.txt`` sidecar, and date sub-folders. Differences on purpose: files are
written atomically (temp file + rename), numbering is race-free between threads, and an existing
file is never overwritten.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import io
import math
import os
import re
import string
import threading
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal, Sequence

import numpy as np
from PIL import Image, ImageColor, PngImagePlugin

from modules.core.atomic import atomic_output, atomic_write_text, remove_stale_temp_files

if TYPE_CHECKING:
    from modules.core.options import Options
    from modules.core.paths import AppPaths

__all__ = [
    "OMIT",
    "atomic_write_folders",
    "ImageSaveParams",
    "SavedImage",
    "apply_filename_pattern",
    "date_dir",
    "image_grid",
    "next_sequence_number",
    "output_dirs",
    "remove_leftover_temp_files",
    "sanitize_filename_part",
    "save_image",
]

# The filesystem is one per process, so the lock guarding "pick a free number, then write" is
# process-wide too; two app objects in one process saving to one folder must share it.
_SAVE_LOCK = threading.RLock()

MAX_PART_LENGTH = 128  # one substituted tag, as in A1111
# NAME_MAX is 255 bytes on common filesystems; the atomic temp file adds ~30 bytes to the name.
MAX_NAME_BYTES = 220
MAX_PROMPT_WORDS = 8  # A1111's directories_max_prompt_words default
DEFAULT_DATETIME_FORMAT = "%Y%m%d%H%M%S"

# Characters that are invalid (or path separators) on at least one supported OS.
_INVALID_CHARS = '#<>:"/\\|?*'
_INVALID_TABLE = {ord(c): "_" for c in _INVALID_CHARS} | {c: "_" for c in range(32)} | {127: "_"}
_RE_NON_LETTERS = re.compile(r"[\s" + re.escape(string.punctuation) + r"]+")
_RE_TAG = re.compile(r"\[([^\[\]]+)\]")
_RE_TAG_ARG = re.compile(r"^(.*)<([^<>]*)>$")
_WINDOWS_RESERVED = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(1, 10)), *(f"LPT{i}" for i in range(1, 10))}

# JPEG and WEBP cannot hold images this large; A1111 falls back to PNG for them.
_MAX_SIDE = {"JPEG": 65535, "WEBP": 16383}


class _Omit:
    def __repr__(self) -> str:
        return "OMIT"


OMIT: Any = _Omit()
"""A ``pattern_values`` value that removes the tag and the literal text just before it.

A1111 uses this for ``[batch_number]`` with a batch of one: ``"[seed]-[batch_number]"`` gives
``"1234"``, not ``"1234-"``.
"""


@dataclass
class ImageSaveParams:
    """What ``before_save`` may change (A1111's ``ImageSaveParams``) and ``after_save`` sees.

    ``pnginfo`` maps text-chunk names to values; ``pnginfo["parameters"]`` is the infotext.
    """

    image: Image.Image
    filename: str
    pnginfo: dict[str, Any] = field(default_factory=dict)
    p: Any = None  # the job's parameters, when the caller has them (A1111's StableDiffusionProcessing)


@dataclass(frozen=True)
class SavedImage:
    path: Path
    txt_path: Path | None = None


# --------------------------------------------------------------------------- file names

def sanitize_filename_part(text: str | None, replace_spaces: bool = True) -> str | None:
    """Make one piece of a file name safe: invalid and control characters become ``_``,
    leading spaces and trailing spaces/dots go, and the piece is cut to 128 characters."""
    if text is None:
        return None
    text = unicodedata.normalize("NFC", str(text))
    if replace_spaces:
        text = text.replace(" ", "_")
    text = text.translate(_INVALID_TABLE)
    text = text.lstrip(" ")[:MAX_PART_LENGTH]
    return text.rstrip(" .")


def _prompt_words(prompt: str) -> str:
    words = [w for w in _RE_NON_LETTERS.split(prompt or "") if w]
    return " ".join(words[:MAX_PROMPT_WORDS]) if words else "empty"


def _format_datetime(now: _dt.datetime, fmt: str | None, tz_name: str | None) -> str:
    if tz_name:
        try:
            from zoneinfo import ZoneInfo

            now = now.astimezone(ZoneInfo(tz_name))
        except Exception:  # unknown zone: A1111 falls back to local time
            pass
    try:
        return now.strftime(fmt or DEFAULT_DATETIME_FORMAT)
    except (ValueError, TypeError):
        return now.strftime(DEFAULT_DATETIME_FORMAT)


def apply_filename_pattern(
    pattern: str,
    *,
    seed: int | None = None,
    prompt: str = "",
    image: Image.Image | None = None,
    values: dict[str, Any] | None = None,
    now: _dt.datetime | None = None,
) -> str:
    """Replace A1111 ``[tags]`` in ``pattern``; unknown tags and tags without a value stay as written.

    Built in: ``[seed]``, ``[prompt]`` (spaces → ``_``), ``[prompt_spaces]``, ``[prompt_words]``
    (first 8 words), ``[prompt_no_styles]`` (falls back to the prompt), ``[prompt_hash<N>]``,
    ``[width]``/``[height]`` (of the image), ``[date]``, ``[datetime<fmt><tz>]``, ``[none]``.
    Everything else comes from ``values`` by lower-case tag name (``steps``, ``cfg``,
    ``sampler``, ``scheduler``, ``model_name``, ``model_hash``, ``job_timestamp``,
    ``seed_first``, ``batch_number``, ``styles``, ``clip_skip``, ``denoising``, ...); a value of
    ``None`` leaves the tag, ``OMIT`` drops it together with the text before it.
    Every substituted value is sanitised, so no value can introduce a path separator.
    """
    values = {k.lower(): v for k, v in (values or {}).items()}
    now = now or _dt.datetime.now()
    out: list[str] = []
    pos = 0
    for m in _RE_TAG.finditer(pattern):
        literal = pattern[pos:m.start()]
        pos = m.end()
        tag, args = _tag_and_args(m.group(1))
        if tag in values:
            replacement = _given_value(tag, values[tag])
        else:
            replacement = _builtin_tag(tag, args, seed=seed, prompt=prompt, image=image, now=now)
        if replacement is OMIT:
            continue
        out.append(literal)
        out.append(m.group(0) if replacement is None else str(replacement))
    out.append(pattern[pos:])
    return "".join(out)


def _tag_and_args(body: str) -> tuple[str, list[str]]:
    """``"datetime<%Y><UTC>"`` -> ``("datetime", ["%Y", "UTC"])``; the name lower-cased."""
    args: list[str] = []
    while (am := _RE_TAG_ARG.match(body)) is not None:
        body, arg = am.groups()
        args.insert(0, arg)
    return body.lower(), args


def _given_value(tag: str, value: Any) -> Any:
    if value is OMIT or value is None:
        return value
    return sanitize_filename_part(str(value), replace_spaces=tag == "prompt")


def _builtin_tag(tag: str, args: list[str], *, seed: int | None, prompt: str, image: Image.Image | None,
                 now: _dt.datetime) -> str | None:
    """The value of a built-in tag; None for a tag that is not one (or has no value here)."""
    if tag == "seed":
        return "" if seed is None else str(seed)
    if tag == "prompt":
        return sanitize_filename_part(prompt)
    if tag in ("prompt_spaces", "prompt_no_styles"):
        return sanitize_filename_part(prompt, replace_spaces=False)
    if tag == "prompt_words":
        return sanitize_filename_part(_prompt_words(prompt), replace_spaces=False)
    if tag == "prompt_hash":
        length = int(args[0]) if args and args[0].isdigit() else 8
        return hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:length]
    if tag == "width" and image is not None:
        return str(image.width)
    if tag == "height" and image is not None:
        return str(image.height)
    if tag == "date":
        return now.strftime("%Y-%m-%d")
    if tag == "datetime":
        fmt = args[0] if args else None
        tz = args[1] if len(args) > 1 else None
        return sanitize_filename_part(_format_datetime(now, fmt, tz), replace_spaces=False)
    if tag == "none":
        return ""
    return None


def _clean_name(text: str) -> str:
    # The pattern's literal text is user input too: no separators or control characters.
    text = unicodedata.normalize("NFC", text).translate(_INVALID_TABLE)
    return text.strip(" ").rstrip(".")


def _fit_name(stem: str, ext: str) -> str:
    """Cut ``stem`` so ``stem.ext`` fits in MAX_NAME_BYTES (UTF-8), never splitting a character."""
    limit = MAX_NAME_BYTES - len(ext.encode("utf-8")) - 1
    encoded = stem.encode("utf-8")
    if len(encoded) > limit:
        stem = encoded[:limit].decode("utf-8", errors="ignore").rstrip(" .")
    if stem.split(".")[0].upper() in _WINDOWS_RESERVED:
        stem = f"_{stem}"
    return stem


def next_sequence_number(directory: str | os.PathLike[str], basename: str = "") -> int:
    """1 + the highest leading number of the names in ``directory`` (0 when there is none).

    As in A1111, a name counts when, after the ``basename-`` prefix and the extension are
    removed, the part before the first ``-`` is a whole number (``00012-1234.png`` → 12,
    ``grid-0003.png`` with basename ``grid`` → 3). Other names are ignored.
    """
    prefix = f"{basename}-" if basename else ""
    highest = -1
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return 0
    for name in names:
        if not name.startswith(prefix):
            continue
        head = os.path.splitext(name[len(prefix):])[0].split("-")[0]
        if head.isascii() and head.isdigit():
            highest = max(highest, int(head))
    return highest + 1


def _free_variant(path: Path) -> Path:
    """``path`` if it is free, else ``name-1.ext``, ``name-2.ext``, ...: we never overwrite."""
    if not os.path.lexists(path):
        return path
    for i in range(1, 100000):
        candidate = path.with_name(f"{path.stem}-{i}{path.suffix}")
        if not os.path.lexists(candidate):
            return candidate
    raise FileExistsError(f"no free file name near {path}")


# --------------------------------------------------------------------------- encoding

def _pil_format(extension: str) -> str:
    ext = extension.lower().lstrip(".")
    if ext in ("jpg", "jpeg"):
        return "JPEG"
    fmt = Image.registered_extensions().get(f".{ext}")
    if fmt is None:
        raise ValueError(f"unsupported image file extension: {extension!r}")
    return fmt


def _to_8bit(image: Image.Image, mode: str) -> Image.Image:
    # 16-bit greyscale: scale to 0..255 instead of clipping (A1111 does the same).
    arr = np.asarray(image, dtype=np.float64) * (255.0 / 65535.0)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "L").convert(mode)


def _prepare_for_format(image: Image.Image, fmt: str) -> Image.Image:
    if fmt == "JPEG":
        if image.mode in ("I;16", "I;16B", "I;16L", "I"):
            return _to_8bit(image, "L")
        if image.mode not in ("RGB", "L", "CMYK"):
            return image.convert("RGB")  # JPEG has no alpha
    elif fmt == "WEBP":
        if image.mode in ("I;16", "I;16B", "I;16L", "I"):
            return _to_8bit(image, "RGB")
        # A1111 drops alpha for WEBP as well, so the saved file looks the same as its JPEG.
        if image.mode not in ("RGB",):
            return image.convert("RGB")
    elif fmt == "PNG":
        if image.mode not in ("1", "L", "LA", "P", "RGB", "RGBA", "I", "I;16", "I;16B", "I;16L"):
            return image.convert("RGBA" if "A" in image.getbands() else "RGB")
    return image


def _png_info(pnginfo: dict[str, Any]) -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    for key, value in pnginfo.items():
        if value is None:
            continue
        text = str(value)
        try:
            text.encode("latin-1")
        except UnicodeEncodeError:
            info.add_itxt(key, text)  # tEXt is latin-1 only; iTXt carries UTF-8
        else:
            info.add_text(key, text)
    return info


def _exif_bytes(text: str) -> bytes:
    from modules.core.infotext import exif_user_comment_bytes  # lazy: keeps import order free

    return exif_user_comment_bytes(text)  # a whole EXIF block with UserComment typed as piexif writes it


def _encode(image: Image.Image, fmt: str, pnginfo: dict[str, Any], info: str | None,
            *, embed: bool, jpeg_quality: int, webp_lossless: bool) -> bytes:
    image = _prepare_for_format(image, fmt)
    buf = io.BytesIO()
    if fmt == "PNG":
        image.save(buf, format="PNG", pnginfo=_png_info(pnginfo) if embed and pnginfo else None)
    elif fmt in ("JPEG", "WEBP"):
        kwargs: dict[str, Any] = {"quality": int(jpeg_quality)}
        if fmt == "WEBP":
            kwargs["lossless"] = bool(webp_lossless)
        if embed and info is not None:
            kwargs["exif"] = _exif_bytes(info)
        image.save(buf, format=fmt, **kwargs)
    else:
        image.save(buf, format=fmt)
    return buf.getvalue()


# --------------------------------------------------------------------------- saving

def save_image(
    image: Image.Image,
    directory: str | os.PathLike[str],
    *,
    seed: int | None,
    prompt: str = "",
    info: str | None = None,
    extension: str = "png",
    basename: str = "",
    pattern: str = "",
    add_number: bool = True,
    grid: bool = False,
    jpeg_quality: int = 80,
    webp_lossless: bool = False,
    save_txt: bool = False,
    pattern_values: dict[str, Any] | None = None,
    before_save: Callable[[ImageSaveParams], None] | None = None,
    after_save: Callable[[ImageSaveParams], None] | None = None,
    embed_info: bool = True,
    existing_pnginfo: dict[str, Any] | None = None,
    pnginfo_section: str = "parameters",
    suffix: str = "",
    forced_filename: str | None = None,
    now: _dt.datetime | None = None,
    p: Any = None,
) -> SavedImage:
    """Save ``image`` into ``directory`` (created if missing) and return where it went.

    Naming, as A1111 with its default settings:
      * an image with a seed: ``NNNNN-<pattern or [seed]>.ext`` (``00007-1234.png``);
      * a grid (``grid=True``, basename defaults to ``grid``): ``grid-NNNN.ext``, or
        ``grid-NNNN-<pattern>`` when a pattern is given (A1111's "extended grid filename");
      * ``seed=None`` (extras): ``NNNNN.ext``;
      * ``add_number=False`` drops the number unless the name would be empty;
      * ``forced_filename`` uses that name as-is (sanitised).
    ``info`` is the infotext: a ``parameters`` PNG chunk, or the EXIF UserComment for JPEG and
    WEBP, unless ``embed_info`` is False (the ``enable_pnginfo`` setting); ``save_txt`` also
    writes it to ``<name>.txt``. ``existing_pnginfo`` adds other PNG chunks (extras keeps the
    source image's). ``before_save`` may replace the image, file name or pnginfo (A1111's
    ``on_before_image_saved``); ``after_save`` is told what was written (``on_image_saved``).
    """
    directory = Path(directory)
    fmt, ext = _file_format(image, extension)
    if grid and not basename:
        basename = "grid"
    basename = _clean_name(basename)
    decoration = "" if forced_filename is not None else _decoration(
        image, seed=seed, prompt=prompt, pattern=pattern, grid=grid, values=pattern_values, now=now)
    decoration = _clean_name(decoration + suffix)
    pnginfo = dict(existing_pnginfo or {})
    if info is not None:
        pnginfo[pnginfo_section] = info

    with _SAVE_LOCK:
        directory.mkdir(parents=True, exist_ok=True)
        path = _free_path(directory, ext, forced_filename=forced_filename, numbered=add_number or decoration == "",
                          basename=basename, decoration=decoration)
        params = ImageSaveParams(image=image, filename=str(path), pnginfo=pnginfo, p=p)
        if before_save is not None:
            path, fmt = _run_before_save(before_save, params, path, fmt)
        info = params.pnginfo.get(pnginfo_section)
        data = _encode(params.image, fmt, params.pnginfo, None if info is None else str(info),
                       embed=embed_info, jpeg_quality=jpeg_quality, webp_lossless=webp_lossless)
        with atomic_output(path, "wb") as fh:
            fh.write(data)
        txt_path = None
        if save_txt and info is not None:
            txt_path = path.with_suffix(".txt")
            atomic_write_text(txt_path, f"{info}\n")

    if after_save is not None:
        after_save(params)
    return SavedImage(path=path, txt_path=txt_path)


def _file_format(image: Image.Image, extension: str) -> tuple[str, str]:
    """(PIL format, file extension); PNG for sizes JPEG/WEBP cannot store, as A1111 does."""
    fmt = _pil_format(extension)
    if fmt in _MAX_SIDE and max(image.size) > _MAX_SIDE[fmt]:
        return "PNG", "png"
    return fmt, extension.lower().lstrip(".")


def _decoration(image: Image.Image, *, seed: int | None, prompt: str, pattern: str, grid: bool,
                values: dict[str, Any] | None, now: _dt.datetime | None) -> str:
    """The name part after the number: the pattern (a grid's only when given; ``[seed]`` by
    default for an image with a seed; nothing for one without)."""
    if grid:
        return pattern and apply_filename_pattern(pattern, seed=seed, prompt=prompt, image=image,
                                                  values=values, now=now)
    if seed is None:
        return ""
    return apply_filename_pattern(pattern or "[seed]", seed=seed, prompt=prompt, image=image, values=values, now=now)


def _free_path(directory: Path, ext: str, *, forced_filename: str | None, numbered: bool, basename: str,
               decoration: str) -> Path:
    if forced_filename is not None:
        return _free_variant(directory / f"{_fit_name(_clean_name(forced_filename) or 'image', ext)}.{ext}")
    if numbered:
        return _numbered_path(directory, basename, decoration, ext)
    return _free_variant(directory / f"{_fit_name(decoration, ext)}.{ext}")


def _numbered_path(directory: Path, basename: str, decoration: str, ext: str) -> Path:
    """The first free ``NNNNN[-decoration].ext`` (``basename-NNNN...`` with a basename) from the
    folder's next sequence number on."""
    start = next_sequence_number(directory, basename)
    tail = f"-{decoration}" if decoration else ""
    for n in range(start, start + 500):
        head = f"{n:05}" if not basename else f"{basename}-{n:04}"
        candidate = directory / f"{_fit_name(head + tail, ext)}.{ext}"
        if not os.path.lexists(candidate):
            return candidate
    raise FileExistsError(f"no free numbered file name in {directory}")


def _run_before_save(before_save: Callable[[ImageSaveParams], None], params: ImageSaveParams, path: Path,
                     fmt: str) -> tuple[Path, str]:
    """The callback may replace the image, file name or pnginfo; returns the (path, format) to write."""
    before_save(params)
    chosen = Path(params.filename)
    if chosen != path:
        # A callback may rename (and so change the format); still never overwrite.
        path = _free_variant(chosen)
        new_ext = path.suffix.lstrip(".").lower()
        if new_ext:
            fmt = _pil_format(new_ext)
        path.parent.mkdir(parents=True, exist_ok=True)
        params.filename = str(path)
    return path, fmt


# --------------------------------------------------------------------------- folders

Kind = Literal["txt2img", "img2img", "extras"]


def date_dir(root: str | os.PathLike[str], now: _dt.datetime | None = None) -> Path:
    """``root/YYYY-MM-DD`` in local time: A1111's default ``[date]`` sub-folder."""
    return Path(root) / (now or _dt.datetime.now()).strftime("%Y-%m-%d")


def output_dirs(paths: "AppPaths", options: "Options", kind: Kind, *, dated: bool = True,
                now: _dt.datetime | None = None) -> tuple[Path, Path | None]:
    """Where images and grids of ``kind`` are saved: ``(images_dir, grids_dir)``.

    ``outdir_samples`` overrides every images folder, ``outdir_<kind>_samples`` one of them,
    otherwise ``outputs/<kind>-images``; grids likewise with ``outdir_grids`` (when an extension
    or a newer settings file defines it) and ``outdir_<kind>_grids``. With ``dated``,
    txt2img/img2img folders get the ``YYYY-MM-DD`` sub-folder; extras never does (A1111 saves
    extras without one) and has no grids folder (``None``). Relative settings are taken from
    the data dir.
    """
    if kind not in ("txt2img", "img2img", "extras"):
        raise ValueError(f"unknown output kind {kind!r}")

    def setting(key: str) -> str:
        value = options.get(key, "")
        return str(value).strip() if value else ""

    def resolve(value: str, default: Path) -> Path:
        if not value:
            return default
        p = Path(value).expanduser()
        return p if p.is_absolute() else paths.data_dir / p

    out = paths.outputs_dir
    images = resolve(setting("outdir_samples") or setting(f"outdir_{kind}_samples"), out / f"{kind}-images")
    if kind == "extras":
        return images, None
    grids = resolve(setting("outdir_grids") or setting(f"outdir_{kind}_grids"), out / f"{kind}-grids")
    if dated:
        images, grids = date_dir(images, now), date_dir(grids, now)
    return images, grids


def atomic_write_folders(paths: "AppPaths", options: "Options", *, recent_subfolders: int = 2) -> list[Path]:
    """The folders atomic writes go to, for the startup clean-up of temp files a killed process left.

    config.json's, cache.json's and the styles files' folders; each output folder (images, grids,
    extras) and its ``recent_subfolders`` most recently modified sub-folders (the date folders a
    killed run was writing to: a temp file's creation is the folder's last change). Older date
    folders are never listed, so a huge output tree costs one listing of its top folder.
    """
    folders = [paths.config_file.parent, paths.cache_file.parent, *(p.parent for p in paths.styles_files)]
    for kind in ("txt2img", "img2img", "extras"):
        for root in output_dirs(paths, options, kind, dated=False):
            if root is None:
                continue
            folders.append(root)
            try:
                with os.scandir(root) as entries:
                    subs = [(e.stat().st_mtime, e.path) for e in entries if e.is_dir(follow_symlinks=False)]
            except OSError:
                continue
            folders += [Path(p) for _, p in sorted(subs, reverse=True)[:recent_subfolders]]
    unique: dict[str, Path] = {}
    for folder in folders:
        unique.setdefault(os.path.normcase(os.path.abspath(folder)), folder)
    return list(unique.values())


def remove_leftover_temp_files(paths: "AppPaths", options: "Options") -> list[Path]:
    """Remove stale atomic-write temp files (older than a minute) from ``atomic_write_folders``."""
    removed: list[Path] = []
    for folder in atomic_write_folders(paths, options):
        removed += remove_stale_temp_files(folder)
    return removed


# --------------------------------------------------------------------------- grids

def grid_rows(n: int, rows: int | None = None, batch_size: int | None = None,
              prevent_empty_spots: bool = False) -> int:
    """Rows for ``n`` images, as A1111's ``n_rows`` setting: ``None``/-1 automatic
    (``round(sqrt(n))``, or the largest divisor of n up to sqrt(n) with
    ``prevent_empty_spots``), 0 the batch size, >0 that many. Never more rows than images."""
    if n <= 0:
        return 0
    if rows is None or rows < 0:
        if prevent_empty_spots:
            rows = max(1, math.isqrt(n))
            while n % rows:
                rows -= 1
        else:
            rows = round(math.sqrt(n))
    elif rows == 0:
        rows = batch_size or 1
    return max(1, min(rows, n))


def image_grid(images: Sequence[Image.Image], rows: int | None = None, batch_size: int | None = None,
               *, prevent_empty_spots: bool = False, background: str = "#ffffff") -> Image.Image:
    """Paste ``images`` left-to-right, top-to-bottom into one image.

    ``rows`` follows A1111's ``n_rows`` (see :func:`grid_rows`); with the default (-1/None)
    ``batch_size`` is not used. Cells are as large as the largest image (the first image's size
    for a normal batch); smaller images are centred. Empty cells show ``background``
    (A1111's ``grid_background_color``, white by default).
    """
    if not images:
        raise ValueError("image_grid needs at least one image")
    n = len(images)
    r = grid_rows(n, rows, batch_size, prevent_empty_spots)
    cols = math.ceil(n / r)
    w = max(im.width for im in images)
    h = max(im.height for im in images)
    has_alpha = any("A" in im.getbands() for im in images)
    mode = "RGBA" if has_alpha else "RGB"
    grid = Image.new(mode, (cols * w, r * h), ImageColor.getcolor(background, mode))
    for i, im in enumerate(images):
        x = (i % cols) * w + (w - im.width) // 2
        y = (i // cols) * h + (h - im.height) // 2
        grid.paste(im if im.mode == mode else im.convert(mode), (x, y))
    return grid

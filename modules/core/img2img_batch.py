"""img2img over a folder (A1111's img2img "Batch" tab).

Every image file of the input folder, in name order, goes through the shared job queue
(`generation.img2img`) as its own job, so other users' jobs interleave and Interrupt works.
Behaviour matched from A1111 (v1.10):

* files that are not images are skipped and named in the summary;
* with a mask folder: a folder holding a single mask uses it for every image, otherwise the mask
  with the image's file stem (any extension); an image without a mask is skipped;
* with an output folder the results keep the source file name (``stem.<samples_format>``, or
  ``stem-N`` for several images per file; an existing file is never overwritten), with the
  infotext embedded; without one they go to the usual ``outputs/img2img-images/DATE``;
* "Use PNG info": the chosen fields of each file's own infotext (or of the file with the same
  name in `png_info_dir`) replace the UI's: prompt and negative prompt are *appended* to the
  UI's, seed/CFG/sampler/steps replace them, and a ``Model hash`` naming a known checkpoint
  selects that checkpoint for the file's job.

One bad file never stops the batch: its error is recorded and the next file runs. No gradio here.
"""
from __future__ import annotations

import copy
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from PIL import Image, ImageOps, UnidentifiedImageError

from modules.core.pipeline import Img2ImgParams, ProcessingError

log = logging.getLogger(__name__)

# The infotext fields "Use PNG info" can take, as A1111 names them in its checkbox group.
PNG_INFO_PROPS = ("Prompt", "Negative prompt", "Seed", "CFG scale", "Sampler", "Schedule type", "Steps",
                  "Model hash")
GALLERY_LIMIT = 32  # results kept for the gallery (A1111's img2img_batch_show_results_limit)

__all__ = ["BatchResult", "PNG_INFO_PROPS", "list_images", "run_batch"]


@dataclass
class BatchResult:
    input_dir: str
    output_dir: str
    processed: list[str] = field(default_factory=list)      # source file names that produced images
    outputs: list[str] = field(default_factory=list)        # paths of the saved results
    skipped: list[str] = field(default_factory=list)        # names that are not images
    missing_masks: list[str] = field(default_factory=list)  # images skipped for want of a mask
    errors: dict[str, str] = field(default_factory=dict)    # name -> message
    interrupted: bool = False
    images: list[Any] = field(default_factory=list)         # the last GALLERY_LIMIT results
    infotexts: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    def summary(self) -> str:
        total = len(self.processed) + len(self.errors) + len(self.missing_masks)
        where = self.output_dir or "outputs/img2img-images"
        lines = [f"Processed {len(self.processed)} of {total} image file(s) from {self.input_dir} into {where}"
                 + (" (interrupted)" if self.interrupted else "") + "."]
        if self.skipped:
            lines.append(f"Skipped {len(self.skipped)} file(s) that are not images: {', '.join(self.skipped)}.")
        if self.missing_masks:
            lines.append(f"Skipped {len(self.missing_masks)} image(s) with no mask: {', '.join(self.missing_masks)}.")
        for name, message in self.errors.items():
            lines.append(f"Error in {name}: {message}")
        return "\n".join(lines)


def _open_image(path: Path) -> Image.Image | None:
    try:
        with Image.open(path) as im:
            im.load()
            return ImageOps.exif_transpose(im) or im
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        return None


def list_images(directory: Path) -> tuple[list[tuple[Path, Image.Image]], list[str]]:
    """(images in name order, names of files that are not images); hidden files are ignored."""
    images, skipped = [], []
    for path in sorted(p for p in directory.iterdir() if p.is_file() and not p.name.startswith(".")):
        image = _open_image(path)
        if image is None:
            skipped.append(path.name)
        else:
            images.append((path, image))
    return images, skipped


def _find_mask(image_path: Path, masks: list[tuple[Path, Image.Image]]) -> Image.Image | None:
    if len(masks) == 1:
        return masks[0][1]
    return next((m for p, m in masks if p.stem == image_path.stem), None)


def _png_info_fields(image: Image.Image, path: Path, png_info_dir: str | None,
                     props: Iterable[str]) -> dict[str, Any]:
    from modules.core.infotext import parse_infotext, read_info_from_image

    source = image
    if png_info_dir:
        other = _open_image(Path(png_info_dir) / path.name)
        if other is None:
            return {}
        source = other
    text, _ = read_info_from_image(source)
    if not text:
        return {}
    parsed = parse_infotext(text)
    wanted = set(props)
    return {k: v for k, v in parsed.items() if k in wanted}


def _apply_png_info(p: Img2ImgParams, info: dict[str, Any]) -> None:
    """The prompts are appended to the UI's; the other PNG_INFO_PROPS replace theirs (the `param`
    column of infotext.INFOTEXT_FIELDS). A value that does not convert is skipped."""
    from modules.core import infotext

    wanted = {k: v for k, v in info.items() if k in PNG_INFO_PROPS}
    for field, target, raw in infotext.read_fields(wanted, infotext.IMG2IMG, "param"):
        try:
            value = field.parse(raw)
        except (TypeError, ValueError):
            log.warning("img2img batch: ignoring PNG info %s=%r", target.key, raw)
            continue
        if value == "":
            continue
        if target.key in ("Prompt", "Negative prompt"):
            value = f"{getattr(p, target.param)} {value}".strip()
        setattr(p, target.param, value)


def _size_for(image: Image.Image, scale_by: float) -> tuple[int, int]:
    return (max(64, int(round(image.width * scale_by / 8)) * 8),
            max(64, int(round(image.height * scale_by / 8)) * 8))


def run_batch(generation: Any, base: Img2ImgParams, input_dir: str | Path, output_dir: str | Path | None = None,
              mask_dir: str | Path | None = None, *, use_png_info: bool = False,
              png_info_props: Iterable[str] = PNG_INFO_PROPS, png_info_dir: str | None = None,
              scale_by: float | None = None, should_stop: Callable[[], bool] | None = None,
              on_file: Callable[[int, int, str], None] | None = None,
              submit_kwargs: dict[str, Any] | None = None, root: str | Path | None = None) -> BatchResult:
    """Run `base` (its init image and mask ignored) on every image of `input_dir`.

    With `root` (the data dir, unless --allow-dir-config), every folder (input, output, mask, PNG
    info) must lie inside it once resolved, symlinks included; a ProcessingError names the one that
    does not."""
    if root is not None:
        input_dir = check_inside("input directory", input_dir, Path(root))
        output_dir = check_inside("output directory", output_dir, Path(root))
        mask_dir = check_inside("mask directory", mask_dir, Path(root))
        png_info_dir = check_inside("PNG info directory", png_info_dir, Path(root)) or None
    in_dir, out_dir, masks = _batch_dirs(input_dir, output_dir, mask_dir)
    files, skipped = list_images(in_dir)
    result = BatchResult(input_dir=str(in_dir), output_dir=str(out_dir) if out_dir else "", skipped=skipped)
    state = getattr(generation, "state", None)
    registry = getattr(getattr(generation, "models", None), "registry", None)

    for index, (path, image) in enumerate(files):
        if should_stop is not None and should_stop():
            result.interrupted = True
            break
        if on_file is not None:
            on_file(index, len(files), path.name)
        p = _file_params(base, image, path, masks, scale_by)
        if p is None:
            result.missing_masks.append(path.name)
            continue
        kwargs = dict(submit_kwargs or {})
        if use_png_info:
            _use_png_info(p, kwargs, image, path, png_info_dir, png_info_props, registry)
        if out_dir is not None:
            p.save_images = False   # saved below under the source name
        p.do_not_save_grid = True
        processed = _run_file(generation, p, kwargs, path, out_dir, result)
        if processed is not None and (processed.interrupted or (state is not None and state.interrupted)):
            result.interrupted = True
            break
    return result


def check_inside(name: str, folder: str | Path | None, root: Path) -> str:
    """`folder` as an absolute path (a relative one is taken from `root`; empty stays ""), or a
    ProcessingError unless it resolves to `root` or below it."""
    text = str(folder or "").strip()
    if not text:
        return ""
    real_root = os.path.realpath(root)
    path = Path(text).expanduser()
    real = os.path.realpath(path if path.is_absolute() else Path(root) / path)
    if os.path.commonpath([real_root, real]) != real_root:
        raise ProcessingError(f"{name}: {text} is outside the data folder {root}; batch folders must lie "
                              f"inside it on this server (--allow-dir-config lifts this)")
    return real


def _batch_dirs(input_dir: str | Path, output_dir: str | Path | None,
                mask_dir: str | Path | None) -> tuple[Path, Path | None, list[tuple[Path, Image.Image]] | None]:
    """(input folder, output folder or None, masks or None), or a ProcessingError saying what is wrong."""
    in_dir = Path(str(input_dir or "").strip()).expanduser()
    out_text = str(output_dir or "").strip()
    out_dir = Path(out_text).expanduser() if out_text else None
    if not str(input_dir or "").strip() or not in_dir.is_dir():
        raise ProcessingError(f"input directory not found: {input_dir or '(empty)'}")
    if out_dir is not None and out_dir.resolve() == in_dir.resolve():
        raise ProcessingError("the output directory must differ from the input directory")
    mask_text = str(mask_dir or "").strip()
    if not mask_text:
        return in_dir, out_dir, None
    mdir = Path(mask_text).expanduser()
    if not mdir.is_dir():
        raise ProcessingError(f"mask directory not found: {mask_dir}")
    masks, _ = list_images(mdir)
    if not masks:
        raise ProcessingError(f"no mask images in {mask_dir}")
    return in_dir, out_dir, masks


def _file_params(base: Img2ImgParams, image: Image.Image, path: Path, masks: list[tuple[Path, Image.Image]] | None,
                 scale_by: float | None) -> Img2ImgParams | None:
    """`base` for one file: its image, its mask (None when the mask folder has none for it), its size."""
    p = copy.deepcopy(base)
    p.init_images = [image]
    p.mask = None
    if masks is not None:
        p.mask = _find_mask(path, masks)
        if p.mask is None:
            return None
    if scale_by:
        p.width, p.height = _size_for(image, float(scale_by))
    return p


def _use_png_info(p: Img2ImgParams, kwargs: dict[str, Any], image: Image.Image, path: Path,
                  png_info_dir: str | None, props: Iterable[str], registry: Any) -> None:
    """The file's infotext fields into `p`; a ``Model hash`` naming a known checkpoint selects it."""
    try:
        info = _png_info_fields(image, path, png_info_dir, props)
    except Exception as err:  # noqa: BLE001 - a bad chunk means "no info", as in A1111
        log.warning("Could not read PNG info of %s: %s", path.name, err)
        info = {}
    _apply_png_info(p, info)
    found = registry.get_closest(str(info["Model hash"])) if registry and info.get("Model hash") else None
    if found is not None:
        kwargs["override_settings"] = {**kwargs.get("override_settings", {}), "sd_model_checkpoint": found.title}


def _run_file(generation: Any, p: Img2ImgParams, kwargs: dict[str, Any], path: Path, out_dir: Path | None,
              result: BatchResult) -> Any:
    """One file's job, its outputs added to `result`; None when it failed (recorded in result.errors)."""
    try:
        processed = generation.img2img(p, **kwargs)
        if out_dir is not None:
            result.outputs += _save_named(processed, out_dir, path.stem, getattr(generation, "options", None),
                                          getattr(generation, "save_hooks", (None, None)))
        else:
            result.outputs += processed.saved_paths
    except Exception as err:  # noqa: BLE001 - reported per file, the batch goes on
        log.warning("img2img batch: %s failed: %s", path.name, err)
        result.errors[path.name] = str(err)
        return None
    result.processed.append(path.name)
    first = processed.index_of_first_image
    result.images += processed.images[first:len(processed.infotexts)]   # not ControlNet's detected maps
    result.infotexts += processed.infotexts[first:]
    del result.images[:-GALLERY_LIMIT], result.infotexts[:-GALLERY_LIMIT]
    return processed


def _save_named(processed: Any, out_dir: Path, stem: str, options: Any,
                save_hooks: tuple[Any, Any] = (None, None)) -> list[str]:
    """`save_hooks`: the generation service's (before_save, after_save), so on_before_image_saved and
    on_image_saved fire for these files as for every other saved image."""
    from modules.core import saving

    first = processed.index_of_first_image
    results = list(zip(processed.images[first:], processed.infotexts[first:]))
    get = (lambda key, default: options.get(key, default)) if options is not None else (lambda key, default: default)
    saved = []
    for n, (image, text) in enumerate(results):
        name = stem if len(results) == 1 else f"{stem}-{n + 1}"
        out = saving.save_image(
            image, out_dir, seed=None, info=text, extension=get("samples_format", "png"), forced_filename=name,
            jpeg_quality=get("jpeg_quality", 80), webp_lossless=get("webp_lossless", False),
            save_txt=get("save_txt", False), embed_info=get("enable_pnginfo", True),
            before_save=save_hooks[0], after_save=save_hooks[1],
        )
        saved.append(str(out.path))
    return saved

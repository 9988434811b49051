"""A1111's "SD upscale" img2img script: upscale the image, cut it into overlapping tiles of the
job's size, img2img every tile, and blend the tiles back together.

API clients call it as `script_name: "SD upscale"` with A1111's `script_args`
`[info, overlap, upscaler_index, scale_factor]`. It runs inside one queued job.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Callable

import numpy as np
from PIL import Image

from modules.processing import Img2ImgParams, Processed, ProcessingError, image_upscaler_names

TITLE = "SD upscale"
UPSCALERS = ("None", "Lanczos", "Nearest")  # A1111's order of the built-in upscalers (script_args index)


def upscaler_names() -> list[str]:
    """The script_args index space: the built-ins, then the model files (A1111's shared.sd_upscalers)."""
    return image_upscaler_names()


@dataclass(frozen=True)
class SdUpscaleArgs:
    overlap: int = 64
    upscaler: str = "Lanczos"
    scale_factor: float = 2.0

    @classmethod
    def from_script_args(cls, args: list[Any] | None) -> "SdUpscaleArgs":
        """A1111's positional args: [info (ignored), overlap, upscaler_index, scale_factor]."""
        args = list(args or [])
        defaults = cls()
        try:
            overlap = int(args[1]) if len(args) > 1 and args[1] is not None else defaults.overlap
            names = upscaler_names()
            index = args[2] if len(args) > 2 and args[2] is not None else names.index(defaults.upscaler)
            upscaler = names[int(index)] if not isinstance(index, str) else index
            scale = float(args[3]) if len(args) > 3 and args[3] is not None else defaults.scale_factor
        except (ValueError, TypeError, IndexError) as err:
            raise ProcessingError(f"SD upscale: bad script_args {args!r}: expected [info, overlap, upscaler_index "
                                  f"(0-{len(upscaler_names()) - 1}), scale_factor]") from err
        result = cls(overlap=overlap, upscaler=upscaler, scale_factor=scale)
        result.validate()
        return result

    def validate(self) -> None:
        if self.upscaler not in upscaler_names():
            raise ProcessingError(f"SD upscale: unknown upscaler {self.upscaler!r}; choose one of "
                                  f"{', '.join(upscaler_names())}")
        if not 0 <= self.overlap <= 512:
            raise ProcessingError(f"SD upscale: overlap must be 0-512, got {self.overlap}")
        if not 1 <= self.scale_factor <= 8:
            raise ProcessingError(f"SD upscale: scale factor must be 1-8, got {self.scale_factor}")


@dataclass
class Tile:
    x: int
    y: int
    image: Image.Image


def tile_positions(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets covering `length` with tiles of `tile` overlapping by at least `overlap`,
    spread evenly and ending flush with the edge (A1111's layout)."""
    if length <= tile:
        return [0]
    step = max(1, tile - overlap)
    count = math.ceil((length - overlap) / step)
    count = max(count, 2)
    spacing = (length - tile) / (count - 1)
    return sorted({min(int(i * spacing), length - tile) for i in range(count)})


def split_tiles(image: Image.Image, tile_w: int, tile_h: int, overlap: int) -> list[Tile]:
    if image.width < tile_w or image.height < tile_h:
        raise ProcessingError(f"SD upscale: the upscaled image ({image.width}x{image.height}) is smaller than a tile "
                              f"({tile_w}x{tile_h}); raise the scale factor or lower width/height")
    return [Tile(x, y, image.crop((x, y, x + tile_w, y + tile_h)))
            for y in tile_positions(image.height, tile_h, overlap)
            for x in tile_positions(image.width, tile_w, overlap)]


def _ramp(length: int, overlap: int, fade_start: bool, fade_end: bool) -> np.ndarray:
    """1 in the middle, rising/falling linearly across the overlap at edges shared with a neighbour."""
    weights = np.ones(length, dtype=np.float32)
    n = min(overlap, length // 2)
    if n > 0:
        ramp = (np.arange(n, dtype=np.float32) + 1) / (n + 1)
        if fade_start:
            weights[:n] = ramp
        if fade_end:
            weights[-n:] = ramp[::-1]
    return weights


def combine_tiles(tiles: list[Tile], size: tuple[int, int], overlap: int) -> Image.Image:
    """Blend tiles by weighted average, so seams fade across the overlaps."""
    width, height = size
    total = np.zeros((height, width, 3), dtype=np.float32)
    weight = np.zeros((height, width, 1), dtype=np.float32)
    for tile in tiles:
        w, h = tile.image.size
        wx = _ramp(w, overlap, tile.x > 0, tile.x + w < width)
        wy = _ramp(h, overlap, tile.y > 0, tile.y + h < height)
        tile_weight = (wy[:, None] * wx[None, :])[..., None]
        total[tile.y:tile.y + h, tile.x:tile.x + w] += np.asarray(tile.image.convert("RGB"), dtype=np.float32) * tile_weight
        weight[tile.y:tile.y + h, tile.x:tile.x + w] += tile_weight
    return Image.fromarray((total / np.maximum(weight, 1e-6)).round().clip(0, 255).astype(np.uint8))


def upscale(image: Image.Image, args: SdUpscaleArgs, options: Any = None) -> Image.Image:
    """The first step: the chosen upscaler (PIL, or a model run tiled: engine/model_upscale.py)."""
    from modules.engine.upscaling import upscale_image

    if args.upscaler == "None":  # A1111's "None" upscaler leaves the image as it is
        return image.convert("RGB")
    size = (int(image.width * args.scale_factor), int(image.height * args.scale_factor))
    return upscale_image(image.convert("RGB"), size, args.upscaler, options=options)


def run_sd_upscale(params: Img2ImgParams, args: SdUpscaleArgs, run: Callable[[Img2ImgParams], Processed],
                   save: Callable[..., Any] | None, seed: int) -> Processed:
    """n_iter upscaled images of the first init image; each pass's tiles use consecutive seeds from
    seed + n, as A1111 does. `run` renders one img2img job inside the current queued job."""
    upscaled = upscale(params.init_images[0], args)
    tiles = split_tiles(upscaled, params.width, params.height, args.overlap)
    results: list[Image.Image] = []
    infotexts: list[str] = []
    saved: list[str] = []
    first: Processed | None = None
    seeds: list[int] = []
    for n in range(params.n_iter):
        tile_seed = seed + n
        seeds.append(tile_seed)
        done: list[Tile] = []
        for tile in tiles:
            tile_params = replace(params, init_images=[tile.image], mask=None, n_iter=1, batch_size=1,
                                  seed=tile_seed, save_images=False, do_not_save_grid=True)
            processed = run(tile_params)
            if processed.interrupted or not processed.images:
                break
            first = first or processed
            done.append(Tile(tile.x, tile.y, processed.images[processed.index_of_first_image]))
            tile_seed += 1
        if len(done) != len(tiles):
            break  # interrupted: return the passes that finished
        combined = combine_tiles(done, upscaled.size, args.overlap)
        info = first.infotexts[0] if first and first.infotexts else ""
        combined.info["parameters"] = info
        if params.save_images and save is not None:
            path = save(combined, seed=seeds[-1], prompt=params.prompt, info=info, grid=False)
            if path:
                saved.append(str(path))
        results.append(combined)
        infotexts.append(info)
    if first is None:
        raise ProcessingError("SD upscale was interrupted before the first tile finished")
    return first.copy_with(images=results, infotexts=infotexts, info=infotexts[0] if infotexts else "", params=params, all_seeds=seeds[:len(results)],
                   seed=seed, saved_paths=saved, index_of_first_image=0,
                   interrupted=len(results) < params.n_iter)

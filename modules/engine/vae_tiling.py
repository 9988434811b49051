"""Tiled VAE: decode and encode large images in overlapping tiles, so memory stays bounded.

The tiling itself is diffusers' (``AutoencoderKL.tiled_decode``/``_tiled_encode``: overlapping
tiles, linearly blended across the overlap so no seam shows); here we decide when to use it and how
big the tiles are, per call. Untiled, an SD VAE decode at 2048x2048 needs ~16 GB of activations in
fp32; with 512 px tiles its peak is that of one 512 px decode.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch

TILE_PX = 512         # tile side in pixels (at most the VAE's own sample size)
SMALL_TILE_PX = 256   # when memory is short
OVERLAP = 0.25        # fraction of a tile shared with its neighbour, blended


@dataclass(frozen=True)
class TilingPolicy:
    mode: str = "Automatic"          # "Automatic", "Always", "Never"
    budget_pixels: int = 1024 * 1024  # Automatic: tile above this many output pixels
    short_memory: bool = False       # --lowvram / low-RAM mode: smaller budget and tiles
    tile: int | None = None          # tile side in pixels (None: by the VAE and memory)

    def tile_px(self, width: int, height: int, vae_sample_size: int) -> int | None:
        """The tile side for an image of width x height pixels, or None for one untiled pass."""
        if self.mode == "Never":
            return None
        small = self.short_memory
        budget = self.budget_pixels // 4 if small else self.budget_pixels
        if self.mode != "Always" and width * height <= budget:
            return None
        tile = self.tile or min(vae_sample_size, SMALL_TILE_PX if small else TILE_PX)
        return tile if max(width, height) > tile else None


def _sample_size(vae) -> int:
    size = vae.config.sample_size
    return int(size[0] if isinstance(size, (list, tuple)) else size)


def _downscale(vae) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


@contextlib.contextmanager
def tiles(vae, tile_px: int | None) -> Iterator[None]:
    """diffusers' tiling switched on with ``tile_px`` tiles for the duration (off when None)."""
    saved = (vae.use_tiling, vae.tile_sample_min_size, vae.tile_latent_min_size, vae.tile_overlap_factor)
    if tile_px is not None:
        vae.use_tiling = True
        vae.tile_sample_min_size = tile_px
        vae.tile_latent_min_size = tile_px // _downscale(vae)
        vae.tile_overlap_factor = OVERLAP
    else:
        vae.use_tiling = False
    try:
        yield
    finally:
        vae.use_tiling, vae.tile_sample_min_size, vae.tile_latent_min_size, vae.tile_overlap_factor = saved


def _wraps_around(vae) -> bool:
    """A1111's Tiling option (circular padding) is on: tiles would break the wrap-around, so never tile."""
    conv = getattr(getattr(vae, "decoder", None), "conv_in", None)
    return getattr(conv, "padding_mode", "zeros") == "circular"


def decode(vae, latents: torch.Tensor, policy: TilingPolicy | None) -> torch.Tensor:
    """latents (already unscaled, in the VAE's dtype) -> pixels in [-1, 1]."""
    f = _downscale(vae)
    tile = None
    if policy is not None and not _wraps_around(vae):
        tile = policy.tile_px(latents.shape[-1] * f, latents.shape[-2] * f, _sample_size(vae))
    with tiles(vae, tile):
        return vae.decode(latents, return_dict=False)[0]


def encode(vae, pixels: torch.Tensor, policy: TilingPolicy | None):
    """pixels in [-1, 1] -> the latent distribution (``.mode()`` / ``.sample()``)."""
    tile = None
    if policy is not None and not _wraps_around(vae):
        tile = policy.tile_px(pixels.shape[-1], pixels.shape[-2], _sample_size(vae))
    with tiles(vae, tile):
        return vae.encode(pixels, return_dict=False)[0]

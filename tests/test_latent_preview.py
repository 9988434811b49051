"""Cheap latent → RGB previews."""
from __future__ import annotations

import pytest
import torch

from modules.engine.latent_preview import approx_rgb, latent_format_of
from modules.models.families import SD_LATENT, SDXL_LATENT, get_family


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_batch_gives_one_image_per_item_at_latent_size(family):
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(3, 4, 12, 20, generator=g)
    out = approx_rgb(latents, family)
    assert len(out) == 3
    for im in out:
        assert im.mode == "RGB" and im.size == (20, 12)


def test_single_latent_and_upscale():
    latents = torch.randn(4, 8, 6)
    (im,) = approx_rgb(latents, "sd")
    assert im.size == (6, 8)
    (big,) = approx_rgb(latents, "sd", scale=8)
    assert big.size == (48, 64)
    assert big.getpixel((0, 0)) == im.getpixel((0, 0))  # nearest neighbour


def test_half_precision_and_nan_are_handled():
    latents = torch.randn(1, 4, 4, 4).half()
    latents[0, 0, 0, 0] = float("nan")
    (im,) = approx_rgb(latents, "sdxl")
    assert im.size == (4, 4)


def test_known_colours():
    # Zero latents: SD gives mid grey, SDXL gives grey shifted by its bias.
    zero = torch.zeros(1, 4, 2, 2)
    assert approx_rgb(zero, "sd")[0].getpixel((0, 0)) == (128, 128, 128)
    r, g, b = approx_rgb(zero, get_family("sdxl-inpaint").latent)[0].getpixel((0, 0))
    assert (r, g, b) == (round((0.1084 + 1) * 127.5), round((-0.0175 + 1) * 127.5), round((-0.0011 + 1) * 127.5))
    # Channel 0 alone pushes every colour up with SD's factors.
    one = torch.zeros(1, 4, 1, 1)
    one[0, 0] = 1.0
    assert approx_rgb(one, "sd")[0].getpixel((0, 0)) == (
        round((0.298 + 1) * 127.5), round((0.207 + 1) * 127.5), round((0.208 + 1) * 127.5))


def test_family_names_and_bad_shapes():
    assert latent_format_of("sd1") is SD_LATENT and latent_format_of("SD2-v") is SD_LATENT
    assert latent_format_of("sdxl") is SDXL_LATENT and latent_format_of("sdxl-refiner") is SDXL_LATENT
    assert latent_format_of("sd") is SD_LATENT
    with pytest.raises(ValueError):
        latent_format_of("flux")
    with pytest.raises(ValueError):
        approx_rgb(torch.zeros(1, 16, 4, 4), "sd")

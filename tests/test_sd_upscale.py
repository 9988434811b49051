import numpy as np
import pytest
from PIL import Image

from modules.core.pipeline import ProcessingError
from sd_upscale_lib import SdUpscaleArgs, combine_tiles, split_tiles, tile_positions, upscale


def test_tile_positions_cover_the_length_with_the_overlap():
    assert tile_positions(64, 64, 16) == [0]
    positions = tile_positions(200, 64, 16)
    assert positions[0] == 0 and positions[-1] == 200 - 64
    assert all(b - a <= 64 - 16 for a, b in zip(positions, positions[1:]))  # neighbours overlap >= 16


def test_split_then_combine_reproduces_the_image_exactly():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (150, 200, 3), dtype=np.uint8))
    tiles = split_tiles(image, 64, 64, 16)
    assert len(tiles) > 4 and all(t.image.size == (64, 64) for t in tiles)
    assert np.array_equal(np.asarray(combine_tiles(tiles, image.size, 16)), np.asarray(image))


def test_overlaps_blend_instead_of_cutting():
    left = Image.new("RGB", (64, 64), (0, 0, 0))
    right = Image.new("RGB", (64, 64), (200, 200, 200))
    from sd_upscale_lib import Tile

    out = np.asarray(combine_tiles([Tile(0, 0, left), Tile(32, 0, right)], (96, 64), 32))[0, :, 0]
    assert out[0] == 0 and out[-1] == 200
    seam = out[32:64]
    assert (np.diff(seam.astype(int)) >= 0).all() and 0 < seam[16] < 200  # a ramp, not a cut


def test_script_args_follow_a1111_positions_and_are_validated():
    assert SdUpscaleArgs.from_script_args(["", 32, 2, 3.0]) == SdUpscaleArgs(overlap=32, upscaler="Nearest", scale_factor=3.0)
    assert SdUpscaleArgs.from_script_args([]) == SdUpscaleArgs()
    with pytest.raises(ProcessingError, match="upscaler"):
        SdUpscaleArgs.from_script_args(["", 32, 7, 2.0])
    with pytest.raises(ProcessingError, match="scale factor"):
        SdUpscaleArgs.from_script_args(["", 32, 1, 20])


def test_none_upscaler_keeps_the_size_and_small_images_are_refused():
    image = Image.new("RGB", (64, 48))
    assert upscale(image, SdUpscaleArgs(upscaler="None", scale_factor=4)).size == (64, 48)
    assert upscale(image, SdUpscaleArgs(upscaler="Lanczos", scale_factor=2)).size == (128, 96)
    with pytest.raises(ProcessingError, match="smaller than a tile"):
        split_tiles(image, 64, 64, 8)

"""img2img / inpainting preparation and paste-back (modules/masking.py): pure PIL + numpy."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from modules.core import masking
from modules.core.masking import (
    InpaintPlan, crop_region, expand_canvas, expand_crop_region, fill_masked, paste_back, plan_inpaint,
    prepare_mask, resize_image,
)


def _arr(im: Image.Image) -> np.ndarray:
    return np.asarray(im).astype(np.int32)


def _random_rgb(w: int, h: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


def _gradient(w: int, h: int) -> Image.Image:
    y, x = np.mgrid[0:h, 0:w]
    a = np.dstack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), (x + y) % 256]).astype(np.uint8)
    return Image.fromarray(a, "RGB")


def _rect_mask(w: int, h: int, box: tuple[int, int, int, int], value: int = 255) -> Image.Image:
    a = np.zeros((h, w), dtype=np.uint8)
    x1, y1, x2, y2 = box
    a[y1:y2, x1:x2] = value
    return Image.fromarray(a, "L")


# --------------------------------------------------------------------------- resize modes


def test_mode_names():
    assert masking.RESIZE_MODES == ("Just resize", "Crop and resize", "Resize and fill",
                                    "Just resize (latent upscale)")
    assert masking.MASKED_CONTENT == ("fill", "original", "latent noise", "latent nothing")


@pytest.mark.parametrize("mode", [0, 1, 2, 3, "Crop and resize"])
@pytest.mark.parametrize("upscaler", ["Lanczos", "Nearest", "None", None])
@pytest.mark.parametrize("src,dst", [((40, 20), (64, 48)), ((30, 60), (48, 32)), ((50, 50), (32, 32)),
                                     ((64, 48), (64, 48))])
def test_every_mode_gives_target_size(mode, upscaler, src, dst):
    out = resize_image(_gradient(*src), dst[0], dst[1], mode, upscaler)
    assert out.size == dst and out.mode == "RGB"


def test_just_resize_stretches_and_latent_mode_matches():
    im = _gradient(40, 20)
    a = resize_image(im, 64, 64, 0)
    assert _arr(a).tolist() == _arr(im.resize((64, 64), Image.Resampling.LANCZOS)).tolist()
    assert _arr(resize_image(im, 64, 64, 3)).tolist() == _arr(a).tolist()


def test_same_size_is_a_copy():
    im = _random_rgb(32, 24, 0)
    for mode in range(4):
        out = resize_image(im, 32, 24, mode)
        assert out is not im and np.array_equal(_arr(out), _arr(im))


def test_crop_mode_keeps_the_centre():
    # Wide picture: left third red, middle green, right third blue -> square crop is all green.
    a = np.zeros((30, 90, 3), dtype=np.uint8)
    a[:, :30] = (255, 0, 0)
    a[:, 30:60] = (0, 255, 0)
    a[:, 60:] = (0, 0, 255)
    out = _arr(resize_image(Image.fromarray(a), 30, 30, 1, "Nearest"))
    assert (out == (0, 255, 0)).all()
    # Tall picture, same idea vertically, with scaling (30x90 -> 60x60 covers with 60x180).
    out = _arr(resize_image(Image.fromarray(a.transpose(1, 0, 2).copy()), 60, 60, 1))
    assert np.abs(out[4:-4] - (0, 255, 0)).max() <= 2


def test_fill_mode_bands_are_edge_colours():
    # 40x20 into 40x40: scaled 40x20 at y=10, bands of 10 rows above and below.
    a = np.zeros((20, 40, 3), dtype=np.uint8)
    a[:] = (50, 60, 70)
    a[0] = np.stack([np.arange(40) * 6, np.full(40, 10), np.full(40, 200)], axis=1)  # top row pattern
    a[-1] = (255, 128, 0)
    out = _arr(resize_image(Image.fromarray(a), 40, 40, 2))
    assert np.array_equal(out[10:30], _arr(Image.fromarray(a)))
    assert (out[:10] == out[10]).all()          # top band repeats the first picture row
    assert (out[30:] == (255, 128, 0)).all()    # bottom band repeats the last row

    # Tall: 10x40 into 40x40 -> 10 wide at x=15, side bands.
    b = np.zeros((40, 10, 3), dtype=np.uint8)
    b[:, 0] = (0, 0, 255)
    b[:, -1] = (255, 255, 0)
    out = _arr(resize_image(Image.fromarray(b), 40, 40, 2))
    assert np.array_equal(out[:, 15:25], _arr(Image.fromarray(b)))
    assert (out[:, :15] == (0, 0, 255)).all() and (out[:, 25:] == (255, 255, 0)).all()


def test_fill_mode_odd_sizes_leave_no_black_gap():
    im = Image.new("RGB", (20, 10), (200, 100, 50))
    out = _arr(resize_image(im, 21, 21, 2))
    assert out.shape == (21, 21, 3) and (np.abs(out - (200, 100, 50)) <= 1).all()


def test_resize_mask_mode_and_bad_arguments():
    m = _rect_mask(40, 20, (10, 5, 30, 15))
    assert resize_image(m, 64, 64, 2).mode == "L"
    with pytest.raises(ValueError):
        resize_image(m, 8, 8, 4)
    with pytest.raises(ValueError):
        resize_image(m, 8, 8, "Crop")
    with pytest.raises(ValueError):
        resize_image(_gradient(8, 8), 16, 16, 0, "ESRGAN_4x")


# --------------------------------------------------------------------------- masks


def test_prepare_mask_invert_and_blur():
    m = _rect_mask(64, 64, (16, 16, 48, 48))
    plain = prepare_mask(m, invert=False, blur=0)
    assert plain.mode == "L" and np.array_equal(_arr(plain), _arr(m))
    inv = prepare_mask(m, invert=True, blur=0)
    assert np.array_equal(_arr(inv), 255 - _arr(m))

    blurred = _arr(prepare_mask(m, invert=False, blur=4))
    assert blurred[32, 32] == 255 and blurred[0, 0] == 0  # centre / far corner untouched
    assert 100 < blurred[32, 16] < 155                     # the edge is half-way
    assert 0 < blurred[32, 13] < blurred[32, 16] < blurred[32, 19] < 255  # monotone ramp
    assert np.array_equal(blurred, blurred[:, ::-1]) and np.array_equal(blurred, blurred.T)  # symmetric
    # Separate x / y strengths: blur_y=0 leaves rows above/below the box at 0.
    only_x = _arr(prepare_mask(m, invert=False, blur=4, blur_y=0))
    assert (only_x[:16] == 0).all() and 0 < only_x[32, 14] < 255


def test_prepare_mask_reads_rgba_alpha_and_rgb_luminance():
    a = np.zeros((16, 16, 4), dtype=np.uint8)
    a[4:8, 4:8] = (0, 0, 0, 255)     # black stroke, opaque: still masked (alpha)
    a[10:12, 10:12] = (255, 255, 255, 100)  # faint (alpha <= 128): not masked
    a[0, 0] = (255, 255, 255, 0)     # fully transparent: never masked
    m = _arr(prepare_mask(Image.fromarray(a, "RGBA"), invert=False, blur=0))
    assert (m[4:8, 4:8] == 255).all() and m.sum() == 16 * 255

    opaque = np.zeros((16, 16, 4), dtype=np.uint8)
    opaque[..., 3] = 255
    opaque[2:5, 2:5, :3] = 255
    m = _arr(prepare_mask(Image.fromarray(opaque, "RGBA"), invert=False, blur=0))
    assert (m[2:5, 2:5] == 255).all() and m.sum() == 9 * 255

    rgb = Image.new("RGB", (8, 8))
    rgb.putpixel((3, 3), (255, 255, 255))
    m = _arr(prepare_mask(rgb, invert=False, blur=0))
    assert m[3, 3] == 255 and m.sum() == 255


def test_latent_mask_array_rounds():
    m = _rect_mask(64, 64, (0, 0, 32, 64))
    arr = masking.latent_mask_array(m, 8, 8)
    assert arr.dtype == np.float32 and set(np.unique(arr)) == {0.0, 1.0}
    assert (arr[:, :4] == 1).all() and (arr[:, 4:] == 0).all()


# --------------------------------------------------------------------------- crop regions


def test_crop_region_padding_and_clipping():
    m = _rect_mask(100, 80, (20, 30, 40, 50))
    assert crop_region(m, 0) == (20, 30, 40, 50)
    assert crop_region(m, 8) == (12, 22, 48, 58)
    assert crop_region(m, 32) == (0, 0, 72, 80)       # clipped at the borders
    corner = _rect_mask(100, 80, (95, 75, 100, 80))
    assert crop_region(corner, 10) == (85, 65, 100, 80)
    with pytest.raises(ValueError, match="the mask is empty"):
        crop_region(Image.new("L", (10, 10)), 4)


def test_expand_crop_region_to_aspect():
    # 20x20 box, target 2:1 -> 40 wide, 10 added on each side.
    assert expand_crop_region((40, 30, 60, 50), 512, 256, 200, 100) == (30, 30, 70, 50)
    # 40x10 box, square target -> 30 extra rows: 15 above, 15 below.
    assert expand_crop_region((10, 40, 50, 50), 64, 64, 200, 100) == (10, 25, 50, 65)
    # Odd growth: 20x10 to square: 10 extra rows, 5 / 5; 20x11 -> 9 extra: 4 above, 5 below.
    assert expand_crop_region((0, 40, 20, 51), 8, 8, 100, 100) == (0, 36, 20, 56)
    # Truncation of the wanted size: 10x10 to 3:2 wants 15 wide -> 5 extra, 2 left / 3 right.
    assert expand_crop_region((50, 50, 60, 60), 768, 512, 100, 100) == (48, 50, 63, 60)
    # Already the right aspect: unchanged.
    assert expand_crop_region((5, 5, 37, 21), 512, 256, 100, 100) == (5, 5, 37, 21)


def test_expand_crop_region_slides_inside_the_image():
    # Near the bottom edge: wants y 15..65 but the image is 60 high -> slid up to 10..60.
    assert expand_crop_region((10, 30, 60, 50), 64, 64, 100, 60) == (10, 10, 60, 60)
    # Near the top edge: slid down.
    assert expand_crop_region((10, 0, 60, 20), 64, 64, 100, 60) == (10, 0, 60, 50)
    # Near the left edge horizontally.
    assert expand_crop_region((2, 10, 12, 50), 64, 64, 100, 60) == (0, 10, 40, 50)
    # Bigger than the image: clipped to it (aspect cannot be kept).
    assert expand_crop_region((0, 10, 100, 30), 64, 64, 100, 60) == (0, 0, 100, 60)


# --------------------------------------------------------------------------- fill


def test_fill_masked_changes_only_the_hole_and_removes_its_colour():
    a = np.zeros((64, 64, 3), dtype=np.uint8)
    a[:] = (40, 160, 60)                     # green field
    a[:, :8] = (60, 60, 200)                 # a blue strip far away
    a[24:40, 24:40] = (255, 0, 0)            # strong red object to remove
    image = Image.fromarray(a)
    mask = _rect_mask(64, 64, (20, 20, 44, 44))
    out = _arr(fill_masked(image, mask))
    hole = _arr(mask) > 0
    assert np.array_equal(out[~hole], a[~hole].astype(np.int32))
    inside = out[hole]
    assert inside[:, 0].max() < 120                           # no red left
    assert np.abs(out[32, 32] - (40, 160, 60)).max() < 40     # filled with the surrounding green


def test_fill_masked_soft_mask_keeps_zero_pixels():
    image = _random_rgb(48, 48, 1)
    mask = prepare_mask(_rect_mask(48, 48, (16, 16, 32, 32)), invert=False, blur=3)
    out = _arr(fill_masked(image, mask))
    zero = _arr(mask) == 0
    assert np.array_equal(out[zero], _arr(image)[zero]) and not np.array_equal(out, _arr(image))


# --------------------------------------------------------------------------- plan + paste-back


def _plan(image, mask, **kw) -> InpaintPlan:
    args = dict(width=64, height=64, resize_mode=0, mask_blur=0, invert=False, inpainting_fill=1,
                full_res=False, padding=8)
    args.update(kw)
    return plan_inpaint(image, mask, **args)


@pytest.mark.parametrize("fill", [0, 1, 2, 3])
def test_whole_picture_paste_back_is_exact_outside_mask(fill):
    image = _random_rgb(64, 64, 2)
    mask = _rect_mask(64, 64, (10, 20, 40, 50))
    plan = _plan(image, mask, inpainting_fill=fill)
    assert plan.crop is None and plan.original.size == plan.init_image.size == (64, 64)
    assert plan.mask_for_latents.size == plan.mask_for_overlay.size == (64, 64)
    generated = _random_rgb(64, 64, 3)
    out = _arr(paste_back(generated, plan))
    m = _arr(mask) > 0
    assert np.array_equal(out[~m], _arr(image)[~m])
    assert np.array_equal(out[m], _arr(generated)[m])
    # "original" encodes the picture itself; the others fill the hole first.
    init = _arr(plan.init_image)
    assert np.array_equal(init[~m], _arr(image)[~m])
    assert np.array_equal(init, _arr(image)) == (fill == 1)


@pytest.mark.parametrize("mode", [0, 1, 2, 3])
@pytest.mark.parametrize("blur", [0, 3])
def test_whole_picture_with_resize_is_exact_where_overlay_is_zero(mode, blur):
    image = _random_rgb(120, 80, 4)
    mask = _rect_mask(120, 80, (50, 30, 70, 50))
    plan = _plan(image, mask, resize_mode=mode, mask_blur=blur, width=96, height=96)
    assert plan.original.size == (96, 96)
    assert np.array_equal(_arr(plan.original), _arr(resize_image(image, 96, 96, mode)))
    out = _arr(paste_back(_random_rgb(96, 96, 5), plan))
    zero = _arr(plan.mask_for_overlay) == 0
    assert zero.sum() > 96 * 96 // 2 and np.array_equal(out[zero], _arr(plan.original)[zero])
    if blur == 0 and mode in (0, 3):
        # The mask maps to x 40..56, y 36..60; a bilinear resize spreads it by <= 2 pixels.
        assert not zero[36:60, 40:56].any()
        outside = np.ones((96, 96), dtype=bool)
        outside[34:62, 38:58] = False
        assert zero[outside].all()


def test_resize_mask_has_no_ringing_halo():
    mask = _rect_mask(50, 50, (20, 20, 30, 30))
    for mode in range(4):
        big = _arr(masking.resize_mask(mask, 130, 90, mode))
        nonzero = np.argwhere(big > 0)
        (y1, x1), (y2, x2) = nonzero.min(0), nonzero.max(0)
        assert (x2 - x1) < 40 and (y2 - y1) < 40
    big = _arr(masking.resize_mask(mask, 100, 100, 0))
    assert (big[:36] == 0).all() and (big[64:] == 0).all() and (big[:, :36] == 0).all()
    assert (big[42:58, 42:58] == 255).all()


def test_whole_picture_overlay_is_doubled_blur():
    image = _random_rgb(64, 64, 6)
    mask = _rect_mask(64, 64, (16, 16, 48, 48))
    plan = _plan(image, mask, mask_blur=4)
    lat, ov = _arr(plan.mask_for_latents), _arr(plan.mask_for_overlay)
    assert np.array_equal(ov, np.clip(lat * 2, 0, 255))
    assert ov[32, 16] == 255  # the mask edge itself is fully repainted; the feather is outside
    out = _arr(paste_back(_random_rgb(64, 64, 7), plan))
    assert np.array_equal(out[:4], _arr(image)[:4])  # far from the mask: exact


def test_inverted_mask_is_the_mirror_image():
    image = _random_rgb(64, 64, 8)
    mask = _rect_mask(64, 64, (8, 12, 30, 50))
    generated = _random_rgb(64, 64, 9)
    a = _arr(paste_back(generated, _plan(image, mask)))
    b = _arr(paste_back(generated, _plan(image, mask, invert=True)))
    orig = _arr(image)
    changed_a = (a != orig).any(axis=2)
    changed_b = (b != orig).any(axis=2)
    assert changed_a.sum() > 500 and changed_b.sum() > 2000
    assert np.array_equal(b[changed_a], orig[changed_a])
    assert np.array_equal(a[changed_b], orig[changed_b])
    assert not (changed_a & changed_b).any()


@pytest.mark.parametrize("invert", [False, True])
def test_only_masked_paste_back_is_exact_outside_mask(invert):
    image = _random_rgb(160, 100, 10)
    mask = _rect_mask(160, 100, (100, 30, 130, 50))
    plan = _plan(image, mask, width=64, height=32, full_res=True, padding=6, invert=invert,
                 inpainting_fill=0)
    # Original is kept at its own size; the crop box has the job's 2:1 aspect where it fits.
    assert plan.original.size == (160, 100)
    assert plan.init_image.size == plan.mask_for_latents.size == (64, 32)
    assert plan.mask_for_overlay.size == (160, 100)
    if not invert:
        # bbox (100,30,130,50) + 6 -> (94,24,136,56): 42x32, grown by 22 columns to 64x32.
        assert plan.crop == (83, 24, 147, 56)
    generated = _random_rgb(64, 32, 11)
    out = _arr(paste_back(generated, plan))
    repaint = _arr(mask) > 0
    if invert:
        repaint = ~repaint
    orig = _arr(image)
    assert np.array_equal(out[~repaint], orig[~repaint])
    x1, y1, x2, y2 = plan.crop
    patch = _arr(resize_image(generated, x2 - x1, y2 - y1, 1))
    sub = repaint[y1:y2, x1:x2]
    assert np.array_equal(out[y1:y2, x1:x2][sub], patch[sub])
    assert (out[repaint] != orig[repaint]).any()


def test_only_masked_crop_matches_expand_crop_region():
    image = _random_rgb(160, 100, 12)
    mask = _rect_mask(160, 100, (100, 30, 130, 50))
    plan = _plan(image, mask, width=64, height=32, full_res=True, padding=6, mask_blur=2)
    blurred = prepare_mask(mask, invert=False, blur=2)
    want = expand_crop_region(crop_region(blurred, 6), 64, 32, 160, 100)
    assert plan.crop == want
    x1, y1, x2, y2 = want
    assert abs((x2 - x1) / (y2 - y1) - 2) < 0.05
    out = _arr(paste_back(_random_rgb(64, 32, 13), plan))
    zero = _arr(plan.mask_for_overlay) == 0
    assert np.array_equal(out[zero], _arr(image)[zero])


def test_only_masked_empty_mask_raises():
    with pytest.raises(ValueError, match="the mask is empty"):
        _plan(_random_rgb(32, 32, 0), Image.new("L", (32, 32)), full_res=True)


def test_plan_accepts_rgba_image_and_mismatched_mask():
    rgba = Image.new("RGBA", (40, 40), (10, 20, 30, 0))  # fully transparent -> white background
    mask = _rect_mask(20, 20, (5, 5, 10, 10))             # half size: aligned to the picture first
    plan = _plan(rgba, mask, width=40, height=40)
    assert (_arr(plan.original) == 255).all()
    x1, y1, x2, y2 = crop_region(plan.mask_for_overlay, 0)
    assert 8 <= x1 <= 10 and 8 <= y1 <= 10 and 20 <= x2 <= 22 and 20 <= y2 <= 22


# --------------------------------------------------------------------------- outpainting


@pytest.mark.parametrize("fill_mode", ["edge", "noise", "blur"])
def test_expand_canvas_sizes_and_mask(fill_mode):
    image = _random_rgb(40, 30, 14)
    out, mask = expand_canvas(image, left=16, right=0, up=8, down=24, fill_mode=fill_mode, overlap=4, seed=1)
    assert out.size == mask.size == (56, 62) and out.mode == "RGB" and mask.mode == "L"
    o, m = _arr(out), _arr(mask)
    assert np.array_equal(o[8:38, 16:56], _arr(image))   # the original is kept in place
    assert set(np.unique(m)) == {0, 255}
    assert (m[:8] == 255).all() and (m[38:] == 255).all() and (m[:, :16] == 255).all()
    # Overlap into the original on grown sides only (left, up, down); not on the right.
    assert (m[8:12, 16:] == 255).all() and (m[34:38, 16:] == 255).all() and (m[:, 16:20] == 255).all()
    assert (m[12:34, 20:56] == 0).all()
    if fill_mode == "edge":
        assert (o[:8, 16:] == o[8, 16:]).all() and (o[8:38, :16] == o[8:38, 16:17]).all()
        assert (o[:8, :16] == o[8, 16]).all()  # corner takes the corner pixel


def test_expand_canvas_without_overlap_and_bad_mode():
    image = Image.new("RGB", (10, 10), (1, 2, 3))
    out, mask = expand_canvas(image, right=6, overlap=0)
    assert out.size == (16, 10)
    m = _arr(mask)
    assert (m[:, :10] == 0).all() and (m[:, 10:] == 255).all()
    assert (_arr(out) == (1, 2, 3)).all()
    with pytest.raises(ValueError):
        expand_canvas(image, right=6, fill_mode="smear")

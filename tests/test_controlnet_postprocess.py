"""sd-webui-controlnet's in-loop post-processing, on the tiny SD1 checkpoint and ControlNet:
tile_colorfix(+sharp) re-imposes the input's low frequencies on each predicted x0, inpaint_only keeps
the input outside the mask (in the loop, and pasted back after decoding)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from modules.core.controlnet_units import ControlNetUnit
from modules.core.pipeline import HiresParams, Img2ImgParams, Txt2ImgParams
from modules.engine.control.postprocess import LatentFix, NoiseSchedule, PredictionFix, blur
from modules.engine.sampling import SamplingHooks
from test_controlnet import SMALL, _services

MODEL = "control_tiny_sd1"


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    services = _services(tmp_path_factory.mktemp("cn-post"), "sd1")
    yield services
    services.generation.queue.shutdown()


@pytest.fixture()
def last_step(sd1):
    """The last UNet step's input, timestep and CFG-combined prediction, through the sampling hooks."""
    seen: dict = {}

    def before(params):
        seen["x"], seen["t"] = params.x.detach().clone().float(), params.sigma

    def after(result, step, total, **kw):
        seen["out"] = result.detach().clone().float()
    sd1.generation.sampling_hooks = lambda: SamplingHooks(on_cfg_denoiser=[before], on_cfg_denoised=[after])
    yield seen
    sd1.generation.sampling_hooks = None


def _picture(seed=0, tint=(0, 0, 0)) -> Image.Image:
    noise = np.random.default_rng(seed).integers(0, 80, (64, 64, 3))
    return Image.fromarray((noise + np.array(tint)).clip(0, 255).astype(np.uint8))


def _right_half() -> Image.Image:
    mask = Image.new("L", (64, 64))
    mask.paste(255, (32, 0, 64, 64))
    return mask


def _run(sd1, units=(), **kw):
    return sd1.generation.txt2img(Txt2ImgParams(**{**SMALL, **kw}, controlnet_units=list(units)))


def _pixels(result) -> np.ndarray:
    return np.asarray(result.images[0].convert("RGB"), dtype=np.int16)


def _x0(sd1, seen) -> torch.Tensor:
    schedule = NoiseSchedule.from_config(sd1.models.current().pipe.scheduler.config)
    a, b = schedule.coefficients(seen["t"], seen["x"].shape[0], "cpu")
    return schedule.to_x0(seen["x"], seen["out"], a, b)


def _latent(sd1, image: Image.Image) -> torch.Tensor:
    from modules.engine.diffusion import encode

    with torch.inference_mode():
        return encode(sd1.models.current(), [image]).float()


# ---------------------------------------------------------------- inpaint_only


def test_inpaint_only_keeps_the_unmasked_picture(sd1):
    picture = _picture()
    original = np.asarray(picture, dtype=np.int16)
    only = _pixels(_run(sd1, [ControlNetUnit(model=MODEL, image=picture, mask=_right_half(), module="inpaint_only")]))
    # left of the mask, beyond the blurred seam (7 px dilation + 7 px blur), the picture is back exactly
    assert np.abs(only[:, :24] - original[:, :24]).max() <= 1
    assert np.abs(only[:, 40:] - original[:, 40:]).mean() > 10    # the masked half was generated
    harmonious = _pixels(_run(sd1, [ControlNetUnit(model=MODEL, image=picture, mask=_right_half(), module="inpaint")]))
    assert np.abs(harmonious[:, :24] - original[:, :24]).mean() > 10   # without the post-processing it is not


def test_inpaint_only_blends_the_latent_each_step(sd1, last_step):
    picture = _picture(1)
    _run(sd1, [ControlNetUnit(model=MODEL, image=picture, mask=_right_half(), module="inpaint_only")])
    x0, latent = _x0(sd1, last_step), _latent(sd1, picture)
    # latent columns 0-2 lie outside the mask even after its one-cell dilation: the prediction is the picture
    assert torch.allclose(x0[..., :3], latent.expand_as(x0)[..., :3], atol=1e-3)
    assert (x0[..., 5:] - latent[..., 5:]).abs().mean() > 0.1


def test_inpaint_only_under_a1111_inpainting_runs_as_harmonious(sd1):
    """As the extension does: img2img inpainting already keeps the unmasked area."""
    picture = _picture(2)
    kw = dict(**SMALL, init_images=[picture], mask=_right_half(), denoising_strength=0.8)
    only = sd1.generation.img2img(Img2ImgParams(**kw, controlnet_units=[ControlNetUnit(model=MODEL, module="inpaint_only")]))
    harmonious = sd1.generation.img2img(Img2ImgParams(**kw, controlnet_units=[ControlNetUnit(model=MODEL, module="inpaint")]))
    assert np.array_equal(_pixels(only), _pixels(harmonious))
    assert "Module: inpaint_only" in only.infotexts[0]


# ---------------------------------------------------------------- tile_colorfix


@pytest.mark.parametrize("module", ["tile_colorfix", "tile_colorfix+sharp"])
def test_colorfix_pulls_the_prediction_to_the_input_colours(sd1, last_step, module):
    picture = _picture(3, tint=(160, 20, 20))
    latent = _latent(sd1, picture)

    def low_frequency_distance(mod: str) -> tuple[float, np.ndarray]:
        result = _run(sd1, [ControlNetUnit(model=MODEL, image=picture, module=mod)])
        x0 = _x0(sd1, last_step)
        return float((blur(x0, 8) - blur(latent, 8)).abs().mean()), _pixels(result)
    plain, plain_pixels = low_frequency_distance("tile_resample")
    fixed, fixed_pixels = low_frequency_distance(module)
    assert fixed < plain / 5
    assert not np.array_equal(plain_pixels, fixed_pixels)


def test_colorfix_variation_and_hires_run(sd1):
    picture = _picture(4, tint=(20, 20, 160))
    narrow = _pixels(_run(sd1, [ControlNetUnit(model=MODEL, image=picture, module="tile_colorfix", threshold_a=3)]))
    wide = _pixels(_run(sd1, [ControlNetUnit(model=MODEL, image=picture, module="tile_colorfix", threshold_a=20)]))
    assert not np.array_equal(narrow, wide)
    hires = _run(sd1, [ControlNetUnit(model=MODEL, image=picture, module="tile_colorfix+sharp")],
                 hires=HiresParams(enabled=True, scale=1.5, steps=2))
    assert hires.images[0].size == (96, 96)


@pytest.mark.parametrize("module", ["tile_colorfix", "tile_colorfix+sharp", "inpaint_only"])
def test_weight_zero_is_bit_identical_to_no_unit(sd1, module):
    base = _pixels(_run(sd1))
    unit = ControlNetUnit(model=MODEL, image=_picture(5), mask=_right_half(), module=module, weight=0)
    assert np.array_equal(base, _pixels(_run(sd1, [unit])))


# ---------------------------------------------------------------- the arithmetic


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_prediction_fix_sets_x0_outside_the_mask_and_mixes_by_weight(prediction_type):
    from diffusers import DDPMScheduler

    schedule = NoiseSchedule(DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
                             .alphas_cumprod, prediction_type)
    gen = torch.Generator().manual_seed(0)
    x, out, latent = (torch.randn(2, 4, 8, 8, generator=gen) for _ in range(3))
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 4:] = 1
    t = torch.tensor(420.5)
    a, b = schedule.coefficients(t, 2, "cpu")
    before = schedule.to_x0(x, out, a, b)
    full = PredictionFix([LatentFix("inpaint_only", 1.0, latent[:1], mask=mask)], schedule)(x, t, out, 1)
    after = schedule.to_x0(x, full, a, b)
    assert torch.allclose(after[..., :4], latent[:1].expand(2, -1, -1, -1)[..., :4], atol=1e-4)
    assert torch.allclose(after[..., 4:], before[..., 4:], atol=1e-4)
    half = PredictionFix([LatentFix("inpaint_only", 0.5, latent[:1], mask=mask)], schedule)(x, t, out, 1)
    assert torch.allclose(half, (full + out) / 2, atol=1e-5)


def test_inpaint_only_lama_is_listed_and_refused_with_the_reason():
    from modules.engine.control.preprocessors import PreprocessorUnavailableError, get_preprocessor, preprocessor_names

    assert "inpaint_only+lama" in preprocessor_names()
    with pytest.raises(PreprocessorUnavailableError, match="LaMa"):
        get_preprocessor("inpaint_only+lama")


@pytest.mark.parametrize("family", ["sd2", "sdxl"])
def test_post_processing_on_sd2_and_sdxl(tmp_path, family):
    """SD2 (v-prediction when its config says so) and SDXL: inpaint_only keeps the picture, colorfix runs."""
    services = _services(tmp_path, family)
    try:
        model = f"control_tiny_{family}"
        picture = _picture(6)
        only = _pixels(_run(services, [ControlNetUnit(model=model, image=picture, mask=_right_half(),
                                                      module="inpaint_only")]))
        assert np.abs(only[:, :24] - np.asarray(picture, dtype=np.int16)[:, :24]).max() <= 1
        plain = _pixels(_run(services, [ControlNetUnit(model=model, image=picture, module="tile_resample")]))
        fixed = _pixels(_run(services, [ControlNetUnit(model=model, image=picture, module="tile_colorfix")]))
        assert not np.array_equal(plain, fixed)
    finally:
        services.generation.queue.shutdown()

"""The infotext field table (modules/core/infotext.INFOTEXT_FIELDS) against the layers that read it:
every name it gives exists there, and what create_infotext writes reads back into the same params."""
from __future__ import annotations

import types

import pytest
from PIL import Image

from modules.api import models as api_models
from modules.core import infotext, pipeline
from modules.engine import sampler_catalog as samplers

PARAMS = {infotext.TXT2IMG: pipeline.Txt2ImgParams, infotext.IMG2IMG: pipeline.Img2ImgParams}
REQUESTS = {infotext.TXT2IMG: api_models.StableDiffusionProcessingTxt2Img,
            infotext.IMG2IMG: api_models.StableDiffusionProcessingImg2Img}


def _targets(kind):
    return [t for f in infotext.INFOTEXT_FIELDS if kind in f.kinds for t in f.targets]


def _get(obj, path):
    for name in path.split("."):
        obj = getattr(obj, name)
    return obj


@pytest.mark.parametrize("kind", [infotext.TXT2IMG, infotext.IMG2IMG])
def test_every_name_in_the_table_exists_in_its_layer(kind):
    from modules.ui.img2img_tab import Img2ImgControls
    from modules.ui.txt2img_tab import Txt2ImgControls

    controls = {infotext.TXT2IMG: Txt2ImgControls, infotext.IMG2IMG: Img2ImgControls}[kind].names()
    params = PARAMS[kind]()
    for t in _targets(kind):
        assert t.ui is None or t.ui in controls, t
        assert t.api is None or t.api in REQUESTS[kind].model_fields, t
        if t.param is not None:
            _get(params, t.param)  # raises if the attribute path is wrong


def test_key_order_is_the_lead_rows_in_table_order():
    assert infotext.INFOTEXT_KEY_ORDER[:4] == ("Steps", "Sampler", "Schedule type", "CFG scale")
    assert infotext.INFOTEXT_KEY_ORDER[-1] == "Tiling" and "Hires upscale" not in infotext.INFOTEXT_KEY_ORDER


def _written(p):
    choice = samplers.resolve_sampler(p.sampler_name, p.scheduler)
    ctx = types.SimpleNamespace(model=types.SimpleNamespace(info=None, vae_file=None, path=None),
                                options=types.SimpleNamespace(eta_noise_seed_delta=0, randn_source="GPU"))
    return pipeline.create_infotext(p, ctx, prompt=p.prompt, negative_prompt=p.negative_prompt, seed=p.seed,
                                    subseed=p.subseed, choice=choice, clip_skip=1, extra=pipeline._extra_params(p))


@pytest.mark.parametrize("p", [
    pipeline.Txt2ImgParams(prompt="a fox", negative_prompt="blur", steps=12, sampler_name="Euler a", scheduler="Karras", cfg_scale=6.5,
                           seed=42, subseed=7, subseed_strength=0.25, width=640, height=448, seed_resize_from_w=512,
                           seed_resize_from_h=384, tiling=True,
                           hires=pipeline.HiresParams(enabled=True, scale=1.5, steps=4, denoising_strength=0.45,
                                                      upscaler="Lanczos", sampler_name="Euler",
                                                      prompt="a sharp fox")),
    pipeline.Img2ImgParams(prompt="a cat", steps=9, scheduler="Exponential", cfg_scale=5, seed=3, denoising_strength=0.6,
                           mask=Image.new("L", (8, 8)), mask_blur=2, inpaint_full_res=True,
                           inpaint_full_res_padding=16),
], ids=["txt2img", "img2img"])
def test_what_is_written_reads_back_into_the_same_params(p):
    parsed = infotext.parse_infotext(_written(p))
    read = 0
    for field, target, raw in infotext.read_fields(parsed, p.kind, "param"):
        assert field.parse(raw) == _get(p, target.param), target
        read += 1
    assert read >= 12

"""depth2img: a tiny SD2 depth checkpoint (5-channel UNet, A1111 single-file layout, with its
v2-midas-inference.yaml sidecar) generates in img2img through the real pipeline, from a supplied
depth map or from the depth estimator, and through the API; the depth channel is the one diffusers'
StableDiffusionDepth2ImgPipeline.prepare_depth_map makes."""
from __future__ import annotations

import base64
import io
import shutil
import types

import numpy as np
import pytest
import requests
import torch
from PIL import Image, ImageDraw

from conftest import start_server
from modules.core.flags import parse_args
from modules.core.options import Options, default_templates
from modules.core.paths import AppPaths
from modules.core.pipeline import Img2ImgParams, ProcessingError, Txt2ImgParams
from modules.engine import depth2img
from modules.engine.diffusion import InitImages
from modules.models import depth as depth_models
from modules.services import build_services
from tiny_depth import make_tiny_dpt
from tiny_models import make_checkpoint

SMALL = dict(prompt="a room", width=64, height=64, steps=2, seed=11, denoising_strength=0.8)


def init_image() -> Image.Image:
    image = Image.new("RGB", (64, 64), (120, 130, 140))
    ImageDraw.Draw(image).ellipse((10, 10, 50, 50), fill=(220, 40, 40))
    return image


def depth_map(flip: bool = False) -> Image.Image:
    grad = Image.linear_gradient("L").resize((64, 64))
    return grad.transpose(Image.Transpose.FLIP_TOP_BOTTOM) if flip else grad


@pytest.fixture(scope="module")
def services(tmp_path_factory):
    root = tmp_path_factory.mktemp("depth2img")
    opts = parse_args(["--data-dir", str(root), "--use-cpu", "all"], env={}).opts
    paths = AppPaths.from_opts(opts)
    paths.ensure_user_dirs()
    ckpt = make_checkpoint(paths.ckpt_dir / "tiny-512-depth-ema.safetensors", "sd2-depth", yaml=True)
    assert ckpt.yaml_path.name == "tiny-512-depth-ema.yaml"
    assert "LatentDepth2ImageDiffusion" in ckpt.yaml_path.read_text()  # the v2-midas-inference.yaml sidecar
    options = Options(paths.config_file, default_templates())
    options.load()
    before = depth_models.default_estimators()
    built = build_services(opts, paths, options)
    yield built
    built.generation.queue.shutdown()
    depth_models.default_estimators().unload()
    depth_models.set_default_estimators(before)


def test_without_a_map_or_estimator_the_message_names_the_files_and_folders(services):
    with pytest.raises(ProcessingError) as err:
        services.generation.img2img(Img2ImgParams(init_images=[init_image()], **SMALL))
    message = str(err.value)
    assert "SD2 depth model" in message and "depth_image" in message
    assert "config.json" in message and "model.safetensors" in message
    assert str(services.paths.models_dir / "depth" / "dpt-hybrid-midas") in message
    model = services.models.loaded_model
    assert model.spec.family == "sd2-depth" and model.pipe.unet.config.in_channels == 5


def test_txt2img_on_a_depth_model_says_to_use_img2img(services):
    with pytest.raises(ProcessingError, match="img2img"):
        services.generation.txt2img(Txt2ImgParams(prompt="x", width=64, height=64, steps=2))


def test_img2img_with_a_supplied_depth_map(services):
    def run(depth):
        result = services.generation.img2img(Img2ImgParams(init_images=[init_image()], depth_image=depth, **SMALL))
        assert result.images[0].size == (64, 64)
        return np.asarray(result.images[0], dtype=np.int16)

    first, again, flipped = run(depth_map()), run(depth_map()), run(depth_map(flip=True))
    assert np.array_equal(first, again)                 # the same map and seed: the same image
    assert np.abs(first - flipped).max() > 0            # the depth channel reaches the UNet
    sixteen_bit = Image.fromarray(np.asarray(depth_map(), dtype=np.uint16) * 257).convert("I;16")
    assert np.array_equal(run(sixteen_bit), first)      # a 16-bit map of the same depths: the same image


def test_a_supplied_map_is_cropped_and_resized_like_the_init_image():
    from modules.core.depth_maps import as_float_image, prepare_depth_image

    ramp = Image.fromarray(np.tile(np.arange(256, dtype=np.uint16) * 256, (128, 1))).convert("I;16")  # 256x128
    assert as_float_image(ramp).mode == "F" and as_float_image(ramp).getextrema() == (0.0, 255.0 * 256)
    cropped = np.asarray(prepare_depth_image(ramp, width=64, height=64, resize_mode=1))  # "Crop and resize"
    stretched = np.asarray(prepare_depth_image(ramp, width=64, height=64, resize_mode=0))
    assert cropped.shape == stretched.shape == (64, 64)
    # the centre half of the ramp survives the crop; stretching keeps all of it
    assert 60 * 256 < cropped.min() < 68 * 256 and 188 * 256 < cropped.max() < 196 * 256
    assert stretched.min() < 4 * 256 and stretched.max() > 251 * 256


def test_an_oversized_depth_map_is_refused(services):
    from modules.core.limits import Limits

    params = Img2ImgParams(init_images=[init_image()], depth_image=Image.new("L", (300, 300)), **SMALL)
    with pytest.raises(ValueError, match="depth_image"):
        params.validate(Limits(max_input_pixels=256 * 256))


def test_a_supplied_map_follows_only_masked_inpainting(services):
    mask = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(mask).rectangle((16, 16, 40, 40), fill=255)
    result = services.generation.img2img(Img2ImgParams(init_images=[init_image()], mask=mask, inpaint_full_res=True,
                                                       depth_image=depth_map(), **SMALL))
    out = np.asarray(result.images[0])
    assert out.shape == (64, 64, 3)
    assert np.array_equal(out[:8, :8], np.asarray(init_image())[:8, :8])  # unmasked pixels kept


def test_the_depth_channel_is_what_diffusers_prepare_depth_map_makes(services):
    from diffusers import StableDiffusionDepth2ImgPipeline

    model = services.models.loaded_model
    raw = np.random.RandomState(0).rand(40, 50).astype(np.float32) * 7 + 3
    init = InitImages(images=[init_image()], masks=None, denoising_strength=0.5, inpainting_fill=1,
                      depth_maps=[Image.fromarray(raw, "F")])
    ours = depth2img.depth_image_cond(model, init, 64, 64, torch.device("cpu"), torch.float32)
    reference = StableDiffusionDepth2ImgPipeline.prepare_depth_map(
        types.SimpleNamespace(vae_scale_factor=8), init_image(), torch.from_numpy(raw)[None], 1, False,
        torch.float32, torch.device("cpu"))
    assert ours.shape == (1, 1, 8, 8)
    assert torch.allclose(ours, reference, atol=1e-5)
    flat = InitImages(images=[init_image()], masks=None, denoising_strength=0.5, inpainting_fill=1,
                      depth_maps=[Image.new("F", (64, 64), 2.0)])
    assert torch.equal(depth2img.depth_image_cond(model, flat, 64, 64, "cpu", torch.float32),
                       torch.zeros(1, 1, 8, 8))  # diffusers divides by zero here


def test_img2img_with_the_estimator_matches_diffusers_and_generates(services):
    from diffusers import StableDiffusionDepth2ImgPipeline
    from transformers import AutoModelForDepthEstimation, DPTImageProcessorPil

    folder = make_tiny_dpt(services.paths.models_dir / "depth" / "tiny-dpt-hybrid-midas")
    try:
        model = services.models.loaded_model
        init = InitImages(images=[init_image()], masks=None, denoising_strength=0.5, inpainting_fill=1)
        ours = depth2img.depth_image_cond(model, init, 64, 64, torch.device("cpu"), torch.float32)
        fake_pipe = types.SimpleNamespace(
            vae_scale_factor=8, depth_estimator=AutoModelForDepthEstimation.from_pretrained(folder),
            feature_extractor=DPTImageProcessorPil.from_pretrained(folder))
        reference = StableDiffusionDepth2ImgPipeline.prepare_depth_map(
            fake_pipe, init_image(), None, 1, False, torch.float32, torch.device("cpu"))
        assert torch.allclose(ours, reference, atol=1e-4)

        result = services.generation.img2img(Img2ImgParams(init_images=[init_image()], **SMALL))
        assert result.images[0].size == (64, 64)
        assert "Denoising strength: 0.8" in result.info
    finally:
        depth_models.default_estimators().unload()
        shutil.rmtree(folder)


# ---------------------------------------------------------------- the API


def b64(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_api_img2img_with_a_supplied_depth_image(tmp_path):
    make_checkpoint(tmp_path / "models" / "Stable-diffusion" / "tiny-depth.safetensors", "sd2-depth", yaml=True)
    srv = start_server(tmp_path, "--nowebui", ready_path="/sdapi/v1/samplers")  # the API alone: no UI to build
    try:
        body = {"prompt": "a room", "width": 64, "height": 64, "steps": 2, "seed": 3, "denoising_strength": 0.8,
                "init_images": [b64(init_image())]}
        refused = requests.post(f"{srv.url}/sdapi/v1/img2img", json=body, timeout=300)
        assert refused.status_code >= 400 and "depth_image" in refused.text and "config.json" in refused.text
        images = []
        for depth in (depth_map(), depth_map(flip=True)):
            response = requests.post(f"{srv.url}/sdapi/v1/img2img", json={**body, "depth_image": b64(depth)},
                                     timeout=300)
            assert response.status_code == 200, response.text
            data = response.json()
            assert data["parameters"]["depth_image"] is None  # not echoed back, like init_images
            images.append(np.asarray(Image.open(io.BytesIO(base64.b64decode(data["images"][0]))), dtype=np.int16))
        assert images[0].shape == (64, 64, 3) and np.abs(images[0] - images[1]).max() > 0
        bad = requests.post(f"{srv.url}/sdapi/v1/img2img", json={**body, "depth_image": "###"}, timeout=60)
        assert bad.status_code == 422 and "depth_image" in bad.text
    finally:
        srv.stop()

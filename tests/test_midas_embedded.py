"""depth2img with the MiDaS estimator stored inside an SD2 depth checkpoint (depth_model.*, as in
Stability's 512-depth-ema.ckpt): the timm/MiDaS -> transformers DPT-Hybrid mapping, checked against the
real checkpoint's key list and shapes; the estimator built from a checkpoint's keys computes what the
transformers model they came from computes; depth2img runs with no estimator folder and no map;
without (complete) depth_model weights the refusal still says which file goes where."""
from __future__ import annotations

import types

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from modules.core.flags import parse_args
from modules.core.options import Options, default_templates
from modules.core.paths import AppPaths
from modules.core.pipeline import Img2ImgParams, ProcessingError
from modules.engine import depth2img
from modules.engine.diffusion import InitImages
from modules.models import depth as depth_models
from modules.models import midas_embedded
from modules.services import build_services
from tiny_midas import (IMAGE_SIZE, make_depth_checkpoint, make_tiny_dpt_hybrid, real_layout, tiny_config,
                        to_midas_layout)

SMALL = dict(prompt="a room", width=64, height=64, steps=2, seed=11, denoising_strength=0.8)


def init_image(size=(64, 64)) -> Image.Image:
    image = Image.new("RGB", size, (120, 130, 140))
    ImageDraw.Draw(image).ellipse((10, 10, 50, 50), fill=(220, 40, 40))
    ImageDraw.Draw(image).rectangle((40, 30, 60, 60), fill=(20, 200, 40))
    return image


def meta_tensors(layout: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    return {k: torch.empty(shape, device="meta") for k, shape in layout.items()}


@pytest.fixture(scope="module")
def tiny_model():
    return make_tiny_dpt_hybrid(seed=3)


@pytest.fixture(scope="module")
def tiny_midas(tiny_model):
    return to_midas_layout(tiny_model)


# ---------------------------------------------------------------- the mapping


def test_the_real_checkpoint_layout_maps_exactly_onto_the_shipped_dpt_hybrid():
    layout = real_layout()
    assert len(layout) == 368 and all(k.startswith("depth_model.model.") for k in layout)
    embedded = midas_embedded.EmbeddedMidas(meta_tensors(layout), "512-depth-ema.ckpt")
    assert embedded.problem is None  # every parameter of the shipped model, each shape equal, nothing left over
    assert embedded._config == midas_embedded.shipped_config()  # the sizes read from the tensors are Intel's

    expected = {k: tuple(v.shape) for k, v in midas_embedded.build_empty(midas_embedded.shipped_config())
                .state_dict().items()}
    converted, unknown = midas_embedded.convert(
        {k.removeprefix("depth_model.model."): v for k, v in meta_tensors(layout).items()})
    assert not unknown
    assert {k: tuple(v.shape) for k, v in converted.items()} == expected
    assert len(expected) == 368 - 2 + 12 * 2 * 2  # timm's classifier dropped; each qkv weight and bias in three
    q = converted["dpt.encoder.layer.0.attention.attention.query.weight"]
    assert tuple(q.shape) == (768, 768)


def test_the_fusion_order_and_qkv_split_follow_the_transformers_conversion():
    names = midas_embedded.transformers_names
    assert names("scratch.refinenet4.out_conv.weight") == ["neck.fusion_stage.layers.0.projection.weight"]
    assert names("scratch.refinenet1.resConfUnit2.conv1.bias") == [
        "neck.fusion_stage.layers.3.residual_layer2.convolution1.bias"]
    assert names("pretrained.model.blocks.7.attn.qkv.bias") == [
        f"dpt.encoder.layer.7.attention.attention.{p}.bias" for p in ("query", "key", "value")]
    assert names("pretrained.model.patch_embed.backbone.stages.2.blocks.8.downsample.norm.weight") == [
        "dpt.embeddings.backbone.bit.encoder.stages.2.layers.8.downsample.norm.weight"]
    assert names("pretrained.act_postprocess4.4.weight") == ["neck.reassemble_stage.layers.3.resize.weight"]
    assert names("pretrained.model.head.weight") == []
    assert names("pretrained.model.blocks.0.attn.qkv.lora_up.weight") is None


def test_the_fixture_has_the_real_key_set_and_round_trips(tiny_model, tiny_midas):
    assert set(tiny_midas) == set(real_layout())  # the names of a real 512-depth-ema.ckpt, at tiny widths
    converted, unknown = midas_embedded.convert({k.removeprefix("depth_model.model."): v for k, v in tiny_midas.items()})
    assert not unknown
    source = tiny_model.state_dict()
    assert set(converted) == set(source)
    assert all(torch.equal(converted[k], source[k]) for k in source)
    assert midas_embedded.config_for({k: tuple(v.shape) for k, v in converted.items()}) == tiny_config()


def test_the_embedded_estimator_computes_what_its_transformers_model_computes(tiny_model, tiny_midas):
    from transformers import DPTImageProcessorPil

    embedded = midas_embedded.EmbeddedMidas(tiny_midas, "tiny")
    assert embedded.usable
    # diffusers' depth2img preprocessing: DPTImageProcessor at the model's square size, bicubic, [-1, 1]
    processor = DPTImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, keep_aspect_ratio=False,
                                     resample=Image.Resampling.BICUBIC, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    for image in (init_image(), init_image((96, 48))):
        ours = embedded.estimate_raw(image)
        with torch.no_grad():
            reference = tiny_model(pixel_values=processor(images=image, return_tensors="pt")["pixel_values"])
        reference = reference.predicted_depth[0].numpy()
        assert ours.shape == (IMAGE_SIZE, IMAGE_SIZE)
        assert np.allclose(ours, reference, atol=1e-5) and reference.std() > 1e-3


@pytest.mark.parametrize("damage", ["drop", "reshape", "scalar", "extra", "huge-input"])
def test_incomplete_or_damaged_weights_are_not_used(tiny_midas, damage):
    weights = dict(tiny_midas)
    key = "depth_model.model.pretrained.model.blocks.5.attn.qkv.weight"
    if damage == "drop":
        del weights[key]
    elif damage == "reshape":
        weights[key] = weights[key][:-3]
    elif damage == "scalar":
        weights[key] = torch.tensor(1.0)
    elif damage == "extra":
        weights["depth_model.model.pretrained.model.blocks.5.attn.evil.weight"] = torch.zeros(2)
    else:  # a position table for a 1600x1600 input: the image would be resized to that
        weights["depth_model.model.pretrained.model.pos_embed"] = torch.zeros(1, 100 * 100 + 1, 24)
    embedded = midas_embedded.EmbeddedMidas(weights, "x.ckpt")
    assert not embedded.usable and "x.ckpt" in embedded.describe_problem()
    with pytest.raises(RuntimeError, match="not used"):
        embedded.estimate_raw(init_image())


# ---------------------------------------------------------------- depth2img end to end


@pytest.fixture(scope="module")
def services(tmp_path_factory, tiny_midas):
    root = tmp_path_factory.mktemp("midas-embedded")
    opts = parse_args(["--data-dir", str(root), "--use-cpu", "all"], env={}).opts
    paths = AppPaths.from_opts(opts)
    paths.ensure_user_dirs()
    make_depth_checkpoint(paths.ckpt_dir / "depth-with-midas.ckpt", midas=tiny_midas, fmt="ckpt")
    make_depth_checkpoint(paths.ckpt_dir / "depth-without-midas.safetensors", midas=None, seed=1)
    partial = {k: v for k, v in tiny_midas.items() if "refinenet2" not in k}
    make_depth_checkpoint(paths.ckpt_dir / "depth-partial-midas.safetensors", midas=partial, seed=2)
    options = Options(paths.config_file, default_templates())
    options.load()
    before = depth_models.default_estimators()
    built = build_services(opts, paths, options)
    assert not any((paths.models_dir / sub).is_dir() and any((paths.models_dir / sub).iterdir())
                   for sub in depth_models.SEARCH_SUBDIRS)  # no estimator folder anywhere
    yield built
    built.generation.queue.shutdown()
    depth_models.set_default_estimators(before)


def run(services, checkpoint: str, **extra):
    return services.generation.img2img(Img2ImgParams(init_images=[init_image()], **SMALL, **extra),
                                       override_settings={"sd_model_checkpoint": checkpoint})


def test_depth2img_runs_on_the_checkpoints_own_midas(services, tiny_model):
    from diffusers import StableDiffusionDepth2ImgPipeline
    from transformers import DPTImageProcessorPil

    first = run(services, "depth-with-midas")
    model = services.models.loaded_model
    assert model.path.name == "depth-with-midas.ckpt" and midas_embedded.of(model) is not None
    assert "inside the checkpoint" in model.status
    assert first.images[0].size == (64, 64)
    assert np.array_equal(np.asarray(run(services, "depth-with-midas").images[0]), np.asarray(first.images[0]))

    # the UNet's depth channel is what diffusers' depth2img makes with the transformers model
    init = InitImages(images=[init_image()], masks=None, denoising_strength=0.5, inpainting_fill=1)
    ours = depth2img.depth_image_cond(model, init, 64, 64, torch.device("cpu"), torch.float32)
    fake_pipe = types.SimpleNamespace(
        vae_scale_factor=8, depth_estimator=tiny_model,
        feature_extractor=DPTImageProcessorPil.from_pretrained(str(midas_embedded.CONFIG_DIR),
                                                               size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}))
    reference = StableDiffusionDepth2ImgPipeline.prepare_depth_map(
        fake_pipe, init_image(), None, 1, False, torch.float32, torch.device("cpu"))
    assert ours.shape == (1, 1, 8, 8) and ours.std() > 0.1
    assert torch.allclose(ours, reference, atol=1e-4)

    # a supplied map still wins over the estimator
    flat = Image.linear_gradient("L").resize((64, 64))
    supplied = run(services, "depth-with-midas", depth_image=flat)
    assert np.abs(np.asarray(supplied.images[0], dtype=np.int16) - np.asarray(first.images[0], dtype=np.int16)).max() > 0


def test_without_depth_model_keys_the_message_names_the_files_and_folders(services):
    with pytest.raises(ProcessingError) as err:
        run(services, "depth-without-midas")
    message = str(err.value)
    assert "SD2 depth model" in message and "depth_image" in message
    assert "config.json" in message and "model.safetensors" in message
    assert str(services.paths.models_dir / "depth" / "dpt-hybrid-midas") in message
    assert "no MiDaS weights of its own" in message
    assert services.models.loaded_model.embedded_depth is None


def test_partial_depth_model_keys_fall_back_with_the_reason(services):
    with pytest.raises(ProcessingError) as err:
        run(services, "depth-partial-midas")
    message = str(err.value)
    assert str(services.paths.models_dir / "depth" / "dpt-hybrid-midas") in message
    assert "depth-partial-midas.safetensors" in message and "incomplete" in message and "missing" in message
    model = services.models.loaded_model
    assert midas_embedded.of(model) is None and "not used" in model.status


def test_an_installed_estimator_folder_is_used_before_the_checkpoints_own(services):
    import shutil

    from tiny_depth import make_tiny_dpt

    run(services, "depth-with-midas")
    model = services.models.loaded_model
    init = InitImages(images=[init_image()], masks=None, denoising_strength=0.5, inpainting_fill=1)
    own = depth2img.depth_image_cond(model, init, 64, 64, torch.device("cpu"), torch.float32)
    folder = make_tiny_dpt(services.paths.models_dir / "depth" / "tiny-dpt-hybrid-midas")
    try:
        estimators = depth_models.default_estimators()
        from_folder = torch.from_numpy(estimators.estimate_raw(init_image(), estimators.find()))
        used = depth2img.depth_image_cond(model, init, 64, 64, torch.device("cpu"), torch.float32)
        assert torch.equal(used, depth2img._latent_depth(from_folder, (8, 8)))
        assert not torch.allclose(used, own, atol=1e-3)
    finally:
        depth_models.default_estimators().unload()
        shutil.rmtree(folder)

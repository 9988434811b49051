"""reference_only / reference_adain / reference_adain+attn: sd-webui-controlnet's model-free attention
injection, inside our own sampling loop, on the tiny SD1 and SDXL checkpoints."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from modules.core.controlnet_units import ControlNetUnit, units_from_infotext
from modules.core.flags import parse_args
from modules.core.infotext import parse_infotext
from modules.core.options import Options, default_templates
from modules.core.paths import AppPaths
from modules.core.pipeline import HiresParams, Img2ImgParams, Txt2ImgParams
from modules.services import build_services
from tiny_controlnets import make_controlnet
from tiny_models import make_checkpoint

SMALL = dict(width=64, height=64, steps=3, cfg_scale=7.0, seed=1234, prompt="a cat")


def _services(data_dir: Path, family: str, controlnet: bool = True):
    opts = parse_args(["--data-dir", str(data_dir)], env={}).opts
    paths = AppPaths.from_opts(opts)
    paths.ensure_user_dirs()
    make_checkpoint(paths.ckpt_dir / f"tiny-{family}.safetensors", family)
    if controlnet:
        make_controlnet(paths.models_dir / "ControlNet" / f"control_tiny_{family}.safetensors", family, layout="ldm")
    options = Options(paths.config_file, default_templates())
    options.load()
    return build_services(opts, paths, options)


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    services = _services(tmp_path_factory.mktemp("ref-sd1"), "sd1")
    yield services
    services.generation.queue.shutdown()


def _picture(seed=0, size=64) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))


def _pixels(result) -> np.ndarray:
    return np.asarray(result.images[0].convert("RGB"), dtype=np.int16)


def _run(services, units=(), **kw):
    return services.generation.txt2img(Txt2ImgParams(**{**SMALL, **kw}, controlnet_units=list(units)))


REF = ControlNetUnit(module="reference_only", image=_picture())   # model "None", as the extension sends it


def _unet_state(unet):
    """What the injection touches: each attention's processor object and every module's forward hooks."""
    processors = {name: id(proc) for name, proc in unet.attn_processors.items()}
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in unet.modules())
    return processors, hooks


# ---------------------------------------------------------------- through the generation core


def test_reference_only_changes_the_image_and_the_unet_is_restored_exactly(sd1):
    base = _pixels(_run(sd1))
    unet = sd1.models.current().pipe.unet
    before = _unet_state(unet)
    referenced = _pixels(_run(sd1, [REF]))
    assert not np.array_equal(base, referenced)
    assert _unet_state(unet) == before
    assert np.array_equal(base, _pixels(_run(sd1)))     # a job after a reference job: bit-identical
    # the reference image is what matters: another picture, another result; the same one repeats
    assert not np.array_equal(referenced, _pixels(_run(sd1, [replace(REF, image=_picture(7))])))
    assert np.array_equal(referenced, _pixels(_run(sd1, [REF])))


def test_weight_zero_empty_window_and_disabled_are_bit_identical_to_no_unit(sd1):
    base = _pixels(_run(sd1))
    for unit in (replace(REF, weight=0.0), replace(REF, guidance_start=0.5, guidance_end=0.5),
                 replace(REF, enabled=False), replace(REF, module="reference_adain", weight=0.0)):
        assert np.array_equal(base, _pixels(_run(sd1, [unit]))), unit


def test_adain_variants_fidelity_modes_and_window_each_change_the_result(sd1):
    results = {
        "only": _pixels(_run(sd1, [REF])),
        "adain": _pixels(_run(sd1, [replace(REF, module="reference_adain")])),
        "adain+attn": _pixels(_run(sd1, [replace(REF, module="reference_adain+attn")])),
        "fidelity 0": _pixels(_run(sd1, [replace(REF, threshold_a=0.0)])),
        "prompt more": _pixels(_run(sd1, [replace(REF, control_mode="My prompt is more important")])),
        "control more": _pixels(_run(sd1, [replace(REF, control_mode="ControlNet is more important")])),
        "late": _pixels(_run(sd1, [replace(REF, guidance_start=0.4)])),
        "half weight": _pixels(_run(sd1, [replace(REF, weight=0.5)])),
    }
    names = list(results)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            if {a, b} == {"fidelity 0", "prompt more"}:   # "My prompt is more important" is fidelity 0
                assert np.array_equal(results[a], results[b])
            else:
                assert not np.array_equal(results[a], results[b]), (a, b)
    # threshold_a outside 0..1 (the API's -1 default) is the slider default, 0.5
    assert np.array_equal(results["only"], _pixels(_run(sd1, [replace(REF, threshold_a=0.5)])))
    assert np.array_equal(results["only"], _pixels(_run(sd1, [replace(REF, threshold_a=64)])))


def test_with_a_normal_controlnet_unit_and_a_second_reference(sd1):
    cn = ControlNetUnit(model="control_tiny_sd1", image=_picture(3))
    controlled = _pixels(_run(sd1, [cn]))
    referenced = _pixels(_run(sd1, [REF]))
    both = _pixels(_run(sd1, [REF, cn]))
    assert not np.array_equal(both, controlled) and not np.array_equal(both, referenced)
    two_refs = _pixels(_run(sd1, [REF, replace(REF, module="reference_adain", image=_picture(9))]))
    assert not np.array_equal(two_refs, referenced)
    assert np.array_equal(controlled, _pixels(_run(sd1, [cn])))


def test_infotext_carries_the_unit_and_pastes_back(sd1):
    result = _run(sd1, [replace(REF, weight=0.8, threshold_a=0.3)])
    parsed = parse_infotext(result.infotexts[0])
    assert parsed["ControlNet 0"].startswith("Module: reference_only, Model: None, Weight: 0.8")
    assert "Threshold A: 0.3" in parsed["ControlNet 0"]
    back = units_from_infotext(parsed)[0]
    assert back.active and (back.module, back.model, back.weight, back.threshold_a) == ("reference_only", "None",
                                                                                          0.8, 0.3)


def test_img2img_inpaint_hires_and_batch_run_with_a_reference(sd1):
    init = _picture(5)
    kw = dict(**SMALL, init_images=[init], denoising_strength=0.6)
    # no image of its own: the img2img picture is the reference
    plain = _pixels(sd1.generation.img2img(Img2ImgParams(**kw)))
    assert not np.array_equal(plain, _pixels(sd1.generation.img2img(
        Img2ImgParams(**kw, controlnet_units=[ControlNetUnit(module="reference_only")]))))
    mask = Image.new("L", (64, 64))
    mask.paste(255, (16, 16, 48, 48))
    inpainted = sd1.generation.img2img(Img2ImgParams(**kw, mask=mask, controlnet_units=[REF]))
    assert inpainted.images[0].size == (64, 64)
    hires = _run(sd1, [REF], hires=HiresParams(enabled=True, scale=1.5, steps=2))
    assert hires.images[0].size == (96, 96)
    low_only = _run(sd1, [replace(REF, hr_option="Low res only")], hires=HiresParams(enabled=True, scale=1.5, steps=2))
    assert not np.array_equal(_pixels(hires), _pixels(low_only))
    batch = _run(sd1, [REF], batch_size=2)
    assert len(batch.images) >= 2


def test_the_registry_lists_them_model_free_with_the_fidelity_slider():
    from modules.engine.control.preprocessors import get_preprocessor

    for name in ("reference_only", "reference_adain", "reference_adain+attn"):
        detail = get_preprocessor(name).detail
        assert detail["model_free"] is True
        assert [s["name"] for s in detail["sliders"]] == ["Style Fidelity (only for Balanced mode)"]
    picture = _picture()
    from modules.engine.control.units import run_preprocessor
    from modules.engine.control.preprocessors import PreprocessorArgs

    assert np.array_equal(np.asarray(run_preprocessor("reference_only", picture, PreprocessorArgs())),
                          np.asarray(picture))


# ---------------------------------------------------------------- the injector on the UNet itself


def _injector(services, control_mode: str, module: str = "reference_only", weight: float = 1.0):
    from modules.engine.control.reference import ReferenceHost, ReferenceInjector
    from modules.engine.control.units import ControlInput
    from modules.engine.diffusion import encode

    model = services.models.current()
    host = ReferenceHost.for_model(model, lambda images: encode(model, images), seed=3)
    unit = ControlInput(name=module, model=None, detected_map=_picture(), resize_mode="Just Resize", weight=weight,
                        guidance_start=0.0, guidance_end=1.0, control_mode=control_mode, module=module)
    return model.pipe.unet, ReferenceInjector([unit], [_picture()], host)


def _call_args(unet):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    embeds = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
    return x, torch.tensor(500), embeds


def test_fidelity_one_keeps_the_unconditional_rows_free_of_the_reference(sd1):
    """"ControlNet is more important" (style fidelity 1): the cond row attends to the reference, the
    uncond row (after n_cond) computes exactly what it would without it."""
    with torch.inference_mode():
        unet, injector = _injector(sd1, "ControlNet is more important")
        x, t, embeds = _call_args(unet)
        plain = unet(x, t, encoder_hidden_states=embeds).sample
        with injector.scope(x, t, embeds, None, n_cond=1, step=0, total=1):
            injected = unet(x, t, encoder_hidden_states=embeds).sample
        assert not torch.allclose(injected[0], plain[0], atol=1e-4)
        assert torch.allclose(injected[1], plain[1], atol=1e-5)
        unet, injector = _injector(sd1, "My prompt is more important")   # fidelity 0: every row
        with injector.scope(x, t, embeds, None, n_cond=1, step=0, total=1):
            injected = unet(x, t, encoder_hidden_states=embeds).sample
        assert not torch.allclose(injected[1], plain[1], atol=1e-4)


def test_adain_gives_the_blocks_the_reference_statistics(sd1):
    """reference_adain at fidelity 0: the middle block's output, as the first up block receives it, has the
    per-channel mean and variance the reference's write pass had there."""
    with torch.inference_mode():
        unet, injector = _injector(sd1, "My prompt is more important", module="reference_adain")
        x, t, embeds = _call_args(unet)
        seen = []
        probe = unet.up_blocks[0].register_forward_pre_hook(
            lambda m, args, kwargs: seen.append(kwargs["hidden_states"].clone()), with_kwargs=True)
        try:
            with injector.scope(x, t, embeds, None, n_cond=1, step=0, total=1):
                unet(x, t, encoder_hidden_states=embeds)
        finally:
            probe.remove()
        written, read = seen   # the write pass (the reference), then the main call
        var_w, mean_w = torch.var_mean(written, dim=(2, 3), correction=0)
        var_r, mean_r = torch.var_mean(read, dim=(2, 3), correction=0)
        assert torch.allclose(mean_r, mean_w, atol=1e-4) and torch.allclose(var_r, var_w, rtol=1e-3, atol=1e-5)
        assert not torch.allclose(read, written, atol=1e-3)


def test_weight_picks_the_widest_attention_blocks_first(sd1):
    from modules.engine.control.reference import attention_blocks

    with torch.inference_mode():
        unet, injector = _injector(sd1, "Balanced", weight=0.5)
        blocks = attention_blocks(unet)
        widths = [b.attn1.query_dim for b in blocks]
        assert widths == sorted(widths, reverse=True) and len(set(widths)) > 1
        x, t, embeds = _call_args(unet)
        with injector.scope(x, t, embeds, None, n_cond=1, step=0, total=1):
            stored = [len(slot.bank) for _, slot in injector.attn]
        assert stored == [1 if i / len(blocks) < 0.5 else 0 for i in range(len(blocks))]
        assert all(not slot.bank for _, slot in injector.attn)   # cleared with the scope


def test_fused_qkv_processors_read_the_reference_too(sd1):
    """A UNet whose self-attentions were fused (diffusers' fuse_qkv_projections) gives the same injection."""
    import copy

    with torch.inference_mode():
        unet, injector = _injector(sd1, "Balanced")
        x, t, embeds = _call_args(unet)
        with injector.scope(x, t, embeds, None, n_cond=1, step=0, total=1):
            expected = unet(x, t, encoder_hidden_states=embeds).sample
        fused = copy.deepcopy(unet)
        fused.fuse_qkv_projections()
        assert any(type(p).__name__.startswith("Fused") for p in fused.attn_processors.values())
        injector.host.unet = fused
        fused_injector = type(injector)(injector.units, [_picture()], injector.host)
        with fused_injector.scope(x, t, embeds, None, n_cond=1, step=0, total=1):
            got = fused(x, t, encoder_hidden_states=embeds).sample
        assert torch.allclose(got, expected, atol=1e-4)


def test_an_error_inside_the_call_still_restores_the_unet(sd1):
    with torch.inference_mode():
        unet, injector = _injector(sd1, "Balanced", module="reference_adain+attn")
        before = _unet_state(unet)
        x, t, embeds = _call_args(unet)
        with pytest.raises(RuntimeError, match="interrupted"):
            with injector.scope(x, t, embeds, None, n_cond=1, step=0, total=1):
                assert _unet_state(unet) != before
                raise RuntimeError("interrupted")
        assert _unet_state(unet) == before


def test_depth_models_are_refused_clearly():
    from types import SimpleNamespace

    from modules.engine.control.reference import ReferenceHost, ReferenceInjector

    unet = SimpleNamespace(config=SimpleNamespace(in_channels=5))
    host = ReferenceHost(unet=unet, encode=lambda images: None, scheduler_config={}, is_sdxl=False)
    with pytest.raises(ValueError, match="4- or 9-channel"):
        ReferenceInjector([], [], host)


# ---------------------------------------------------------------- SDXL


def test_sdxl_reference(tmp_path):
    services = _services(tmp_path, "sdxl")
    try:
        base = _pixels(_run(services))
        unet = services.models.current().pipe.unet
        before = _unet_state(unet)
        assert not np.array_equal(base, _pixels(_run(services, [REF])))
        assert not np.array_equal(base, _pixels(_run(services, [replace(REF, module="reference_adain+attn")])))
        assert np.array_equal(base, _pixels(_run(services, [replace(REF, weight=0)])))
        assert _unet_state(unet) == before
        assert np.array_equal(base, _pixels(_run(services)))
    finally:
        services.generation.queue.shutdown()


def test_inpainting_checkpoint_takes_the_reference_as_an_unmasked_image(tmp_path):
    """9-channel UNets: the write pass gets an empty mask and the reference's latents as the masked image."""
    services = _services(tmp_path, "sd1-inpaint", controlnet=False)
    try:
        mask = Image.new("L", (64, 64))
        mask.paste(255, (16, 16, 48, 48))
        kw = dict(**SMALL, init_images=[_picture(5)], mask=mask, denoising_strength=0.8)
        plain = _pixels(services.generation.img2img(Img2ImgParams(**kw)))
        referenced = _pixels(services.generation.img2img(Img2ImgParams(**kw, controlnet_units=[REF])))
        assert not np.array_equal(plain, referenced)
        assert np.array_equal(plain, _pixels(services.generation.img2img(Img2ImgParams(**kw))))
    finally:
        services.generation.queue.shutdown()


def test_the_ui_turns_threshold_a_into_the_style_fidelity_slider():
    from modules.ui.controlnet_ui import threshold_a_slider

    fidelity = threshold_a_slider("reference_only")
    assert (fidelity["minimum"], fidelity["maximum"], fidelity["step"], fidelity["value"]) == (0, 1, 0.01, 0.5)
    assert fidelity["label"].startswith("Style Fidelity")
    plain = threshold_a_slider("canny")
    assert (plain["maximum"], plain["value"], plain["label"]) == (256, -1, "Threshold A")


def test_style_fidelity_follows_the_extension():
    from modules.engine.control.reference import style_fidelity

    assert style_fidelity(0.3, "Balanced", False, False) == 0.3
    assert style_fidelity(-1, "Balanced", False, False) == 0.5          # out of 0..1: the slider default
    assert style_fidelity(0.5, "Balanced", True, False) == 0.125        # SDXL: cubed
    assert style_fidelity(0.3, "ControlNet is more important", True, True) == 1.0
    assert style_fidelity(0.3, "My prompt is more important", False, False) == 0.0
    assert style_fidelity(0.3, "Balanced", False, True) == 0.0          # the hires pass


@pytest.mark.parametrize("family,n_attn", [("sd1", 16), ("sdxl", 70)])
def test_full_size_unets_map_to_the_ldm_blocks_the_extension_hooks(family, n_attn):
    """On the real SD1.5 / SDXL UNet shapes (meta tensors, no weights): as many self-attention blocks as
    the LDM UNet has transformer blocks, and the LDM input/output block numbering the AdaIN indices use."""
    from diffusers import UNet2DConditionModel

    from modules.engine.control.reference import adain_blocks, attention_blocks, ldm_blocks

    config = UNet2DConditionModel.load_config(str(Path(__file__).resolve().parent.parent / "configs" / "diffusers"
                                                  / family / "unet"))
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    blocks = attention_blocks(unet)
    assert len(blocks) == n_attn and blocks[0].attn1.query_dim == max(b.attn1.query_dim for b in blocks)
    inputs, outputs = ldm_blocks(unet)
    assert (len(inputs), len(outputs)) == ((12, 12) if family == "sd1" else (9, 9))
    assert inputs[4] is unet.down_blocks[1].attentions[0] and inputs[3] is unet.down_blocks[0].downsamplers[0]
    assert outputs[2] is unet.up_blocks[0].upsamplers[0] and outputs[5] is unet.up_blocks[1].upsamplers[0]
    picked = adain_blocks(unet, family == "sdxl")
    assert len(picked) == (1 + 6 + 8 if family == "sd1" else 1 + 4 + 6)
    assert picked[0] == (unet.mid_block, 0.0)

"""ControlNet built in: tiny real-layout ControlNets (lllyasviel single file, diffusers) on the tiny
SD1/SDXL checkpoints, run inside our own sampling loop."""
from __future__ import annotations

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
from modules.core.pipeline import HiresParams, Img2ImgParams, ProcessingError, Txt2ImgParams
from modules.models.controlnet import detect_controlnet, load_controlnet
from modules.models.detection import read_shapes
from modules.services import build_services
from tiny_controlnets import make_controlnet, make_t2i_adapter
from tiny_models import make_checkpoint

SMALL = dict(width=64, height=64, steps=3, cfg_scale=7.0, seed=1234, prompt="a cat")


def _services(data_dir: Path, family: str):
    opts = parse_args(["--data-dir", str(data_dir)], env={}).opts
    paths = AppPaths.from_opts(opts)
    paths.ensure_user_dirs()
    make_checkpoint(paths.ckpt_dir / f"tiny-{family}.safetensors", family)
    cn_dir = paths.models_dir / "ControlNet"
    make_controlnet(cn_dir / f"control_tiny_{family}.safetensors", family, layout="ldm", seed=1)
    make_controlnet(cn_dir / f"control_tiny_{family}_b.safetensors", family, layout="diffusers", seed=2)
    other = "sdxl" if family == "sd1" else "sd1"
    make_controlnet(cn_dir / f"control_tiny_{other}.safetensors", other, layout="ldm", seed=3)
    if family == "sd1":
        make_t2i_adapter(cn_dir / "t2iadapter_tiny_sd14v1.pth", "sd1")
    options = Options(paths.config_file, default_templates())
    options.load()
    return build_services(opts, paths, options)


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    services = _services(tmp_path_factory.mktemp("cn-sd1"), "sd1")
    yield services
    services.generation.queue.shutdown()


def _hint(size=64) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))


def _pixels(result) -> np.ndarray:
    return np.asarray(result.images[0].convert("RGB"), dtype=np.int16)


def _run(services, units=(), **kw):
    return services.generation.txt2img(Txt2ImgParams(**{**SMALL, **kw}, controlnet_units=list(units)))


def unit(model="control_tiny_sd1", **kw) -> ControlNetUnit:
    return ControlNetUnit(model=model, image=_hint(), **kw)


# ---------------------------------------------------------------- files


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
@pytest.mark.parametrize("layout,prefixed", [("ldm", False), ("ldm", True), ("diffusers", False)])
def test_every_layout_loads_the_weights_it_holds(tmp_path, family, layout, prefixed):
    fmt = "pth" if prefixed else "safetensors"
    tiny = make_controlnet(tmp_path / f"cn.{fmt}", family, layout=layout, prefixed=prefixed, fmt=fmt)
    spec = detect_controlnet(read_shapes(tiny.path))
    assert (spec.family, spec.layout) == (family, layout)
    model, _ = load_controlnet(tiny.path)
    got = model.state_dict()
    assert set(got) == set(tiny.diffusers_state_dict)
    assert all(torch.equal(got[k], tiny.diffusers_state_dict[k]) for k in got)


@pytest.mark.parametrize("family,layout", [("sd1", "ldm"), ("sd1", "diffusers"), ("sdxl", "diffusers")])
def test_diffusers_itself_reads_the_fixture_the_same(tmp_path, family, layout):
    """The fixture is a real file: diffusers' from_single_file (local config, no hub) reads the same weights.
    (diffusers' LDM converter leaves SDXL's label_emb out, so SDXL is checked in its diffusers layout.)"""
    from diffusers import ControlNetModel

    tiny = make_controlnet(tmp_path / "cn.safetensors", family, layout=layout)
    ref = ControlNetModel.from_single_file(str(tiny.path), config=str(tiny.config_dir), local_files_only=True)
    ours, _ = load_controlnet(tiny.path)
    ref_sd, our_sd = ref.state_dict(), ours.state_dict()
    assert set(ref_sd) == set(our_sd)
    assert all(torch.equal(ref_sd[k], our_sd[k]) for k in ref_sd)


def test_not_a_controlnet_is_refused_with_what_it_is(tmp_path):
    from safetensors.torch import save_file

    from modules.models.weights_io import CheckpointLoadError

    path = tmp_path / "junk.safetensors"
    save_file({"foo.weight": torch.zeros(2)}, str(path))
    with pytest.raises(CheckpointLoadError, match="not a ControlNet"):
        load_controlnet(path)


# ---------------------------------------------------------------- generation


def test_models_are_listed_with_the_extension_hash(sd1):
    annotator = sd1.paths.models_dir / "ControlNet" / "annotators" / "dpt" / "model.safetensors"
    annotator.parent.mkdir(parents=True, exist_ok=True)
    annotator.write_bytes(b"not a controlnet")
    folder = sd1.paths.models_dir / "ControlNet" / "controlnet-tiny-diffusers"
    make_controlnet(folder / "diffusion_pytorch_model.safetensors", "sd1", layout="diffusers", seed=4)
    sd1.controlnets.refresh()
    assert not any(t.startswith("model [") for t in sd1.controlnets.titles())
    assert sd1.controlnets.find("controlnet-tiny-diffusers").path.parent == folder
    titles = sd1.controlnets.titles()
    assert any(t.startswith("control_tiny_sd1 [") and t.endswith("]") for t in titles)
    title = next(t for t in titles if t.startswith("control_tiny_sd1 ["))
    assert sd1.controlnets.find(title).name == "control_tiny_sd1"


def test_weight_zero_and_empty_guidance_window_are_bit_identical_to_no_unit(sd1):
    base = _pixels(_run(sd1))
    assert np.array_equal(base, _pixels(_run(sd1, [unit(weight=0.0)])))
    assert np.array_equal(base, _pixels(_run(sd1, [unit(guidance_start=0.5, guidance_end=0.5)])))
    assert np.array_equal(base, _pixels(_run(sd1, [unit(enabled=False)])))


def test_a_unit_changes_the_image_and_two_units_differ_from_one(sd1):
    base = _pixels(_run(sd1))
    one = _pixels(_run(sd1, [unit()]))
    assert not np.array_equal(base, one)
    two = _pixels(_run(sd1, [unit(), unit(model="control_tiny_sd1_b", module="invert")]))
    assert not np.array_equal(one, two) and not np.array_equal(base, two)
    # by title with the hash, as the API's model list names it
    title = next(t for t in sd1.controlnets.titles() if t.startswith("control_tiny_sd1 ["))
    assert np.array_equal(one, _pixels(_run(sd1, [unit(model=title)])))


def test_control_modes_and_guidance_window_change_the_result(sd1):
    balanced = _pixels(_run(sd1, [unit()]))
    prompt = _pixels(_run(sd1, [unit(control_mode="My prompt is more important")]))
    control = _pixels(_run(sd1, [unit(control_mode=2)]))
    late = _pixels(_run(sd1, [unit(guidance_start=0.5)]))
    for other in (prompt, control, late):
        assert not np.array_equal(balanced, other)
    assert not np.array_equal(prompt, control)


def test_infotext_carries_the_units_and_parses_back(sd1):
    result = _run(sd1, [unit(weight=0.8, control_mode=1), ControlNetUnit(enabled=False)])
    parsed = parse_infotext(result.infotexts[0])
    assert parsed["ControlNet 0"].startswith("Module: none, Model: control_tiny_sd1, Weight: 0.8, "
                                            "Resize Mode: Crop and Resize")
    assert "ControlNet 1" not in parsed
    back = units_from_infotext(parsed)[0]
    assert (back.model, back.weight, back.control_mode) == ("control_tiny_sd1", 0.8, "My prompt is more important")


def test_img2img_hires_and_batch_run_with_a_unit(sd1):
    init = Image.new("RGB", (64, 64), (200, 40, 40))
    params = Img2ImgParams(**SMALL, init_images=[init], denoising_strength=0.6,
                           controlnet_units=[ControlNetUnit(model="control_tiny_sd1")])  # uses the init image
    plain = Img2ImgParams(**SMALL, init_images=[init], denoising_strength=0.6)
    assert not np.array_equal(_pixels(sd1.generation.img2img(params)), _pixels(sd1.generation.img2img(plain)))
    hires = _run(sd1, [unit(resize_mode="Resize and Fill")], hires=HiresParams(enabled=True, scale=1.5, steps=2))
    assert hires.images[0].size == (96, 96)
    batch = _run(sd1, [unit()], batch_size=2)
    assert len(batch.images) >= 2


def test_wrong_family_and_unknown_model_are_clear_errors(sd1):
    with pytest.raises(ProcessingError, match=r"control_tiny_sdxl.*SDXL ControlNet.*tiny-sd1.*SD1\.5"):
        _run(sd1, [unit(model="control_tiny_sdxl")])
    with pytest.raises(ProcessingError, match="not found"):
        _run(sd1, [unit(model="nope")])
    with pytest.raises(ProcessingError, match="weight"):
        _run(sd1, [unit(weight=3)])


@pytest.mark.parametrize("family", ["sdxl", "sd2"])
def test_sdxl_and_sd2_controlnets_on_their_checkpoints(tmp_path, family):
    services = _services(tmp_path, family)
    try:
        base = _pixels(_run(services))
        assert not np.array_equal(base, _pixels(_run(services, [unit(model=f"control_tiny_{family}")])))
        assert np.array_equal(base, _pixels(_run(services, [unit(model=f"control_tiny_{family}_b", weight=0)])))
        with pytest.raises(ProcessingError, match=r"SD1\.5 ControlNet"):
            _run(services, [unit(model="control_tiny_sd1")])
    finally:
        services.generation.queue.shutdown()


def test_external_code_is_importable_the_ways_extensions_import_it_and_drives_units(sd1):
    import importlib

    from modules.extensions import processing_adapter
    from modules.extensions.controlnet_external_code import install_aliases

    install_aliases()
    external_code = importlib.import_module("extensions.sd-webui-controlnet.scripts.external_code", "external_code")
    assert importlib.import_module("extensions-builtin.sd-webui-controlnet.scripts.external_code") is external_code
    from lib_controlnet import external_code as forge_style

    assert forge_style is external_code
    p = processing_adapter.wrap(Txt2ImgParams(**SMALL))
    assert external_code.get_all_units_in_processing(p) == []
    hint = np.asarray(_hint())   # extensions hand numpy images and Enums
    external_code.update_cn_script_in_processing(p, [
        external_code.ControlNetUnit(model="control_tiny_sd1", image=hint, control_mode=external_code.ControlMode.CONTROL,
                                     resize_mode=external_code.ResizeMode.RESIZE),
        {"model": "control_tiny_sd1_b", "input_image": hint, "enabled": False}])
    units = external_code.get_all_units_in_processing(p)
    assert [u.enabled for u in units] == [True, False]
    assert units[0].control_mode == "ControlNet is more important" and units[0].resize_mode == "Just Resize"
    result = sd1.generation.txt2img(p.params)
    assert 'Control Mode: ControlNet is more important' in result.infotexts[0]
    assert not np.array_equal(_pixels(result), _pixels(_run(sd1)))


@pytest.mark.parametrize("layout,suffix,in_channels", [("original", "pth", 3), ("diffusers", "safetensors", 1)])
def test_t2i_adapter_files_load(tmp_path, layout, suffix, in_channels):
    tiny = make_t2i_adapter(tmp_path / f"adapter.{suffix}", "sd1", layout=layout, in_channels=in_channels)
    spec = detect_controlnet(read_shapes(tiny.path))
    assert (spec.kind, spec.family, spec.config["in_channels"]) == ("t2i_adapter", "sd1", in_channels)
    model, _ = load_controlnet(tiny.path)
    got = model.state_dict()
    assert set(got) == set(tiny.diffusers_state_dict)
    assert all(torch.equal(got[k], tiny.diffusers_state_dict[k]) for k in got)


def test_t2i_adapter_unit_changes_the_image_and_weight_zero_does_not(sd1):
    base = _pixels(_run(sd1))
    adapted = _pixels(_run(sd1, [unit(model="t2iadapter_tiny_sd14v1")]))
    assert not np.array_equal(base, adapted)
    assert np.array_equal(base, _pixels(_run(sd1, [unit(model="t2iadapter_tiny_sd14v1", weight=0)])))
    both = _pixels(_run(sd1, [unit(model="t2iadapter_tiny_sd14v1"), unit()]))
    assert not np.array_equal(both, adapted)
    soft = _pixels(_run(sd1, [unit(model="t2iadapter_tiny_sd14v1", control_mode=2)]))
    assert not np.array_equal(soft, adapted)


def test_xyz_plot_controlnet_weight_axis(sd1):
    import importlib.util
    import sys

    from modules.extensions import scripts

    path = Path(__file__).resolve().parent.parent / "extensions-builtin" / "xyz-grid" / "scripts" / "xyz_grid.py"
    spec = importlib.util.spec_from_file_location("xyz_grid_cn_test", path)
    xyz = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = xyz
    spec.loader.exec_module(xyz)
    sd1.scripts = scripts.ScriptRegistry.from_modules({xyz.__name__: xyz})
    runner = sd1.script_runner(False)
    runner.ensure_defaults()
    args = ["[ControlNet] Weight", "0, 1", None, "Nothing", "", None, "Nothing", "", None, True, True, False, False,
            False, False, False, 0, False]
    full = runner.args_from_api("X/Y/Z plot", args, None)
    processed = sd1.generation.submit(Txt2ImgParams(**SMALL, controlnet_units=[unit()]),
                                      script=runner.job_script(full)).result()
    cells = processed.images[-2:]
    base = _pixels(_run(sd1))
    assert np.array_equal(np.asarray(cells[0].convert("RGB"), dtype=np.int16), base)
    assert not np.array_equal(np.asarray(cells[1].convert("RGB"), dtype=np.int16), base)
    assert "Weight: 0.0" in processed.infotexts[-2] and "Weight: 1.0" in processed.infotexts[-1]


def test_inpaint_only_masked_crops_the_control_map_like_the_picture(sd1):
    from modules.core.controlnet_run import _masked_area_crop

    init = Image.fromarray(np.random.default_rng(3).integers(0, 255, (128, 128, 3), dtype=np.uint8))
    mask = Image.new("L", (128, 128))
    mask.paste(255, (80, 80, 112, 112))
    kw = dict(**SMALL, init_images=[init], mask=mask, inpaint_full_res=True, inpaint_full_res_padding=8,
              denoising_strength=0.8)
    x1, y1, x2, y2 = _masked_area_crop(Img2ImgParams(**kw), init)
    assert x1 <= 80 and y1 <= 80 and x2 >= 112 and y2 >= 112 and (x2 - x1) < 128
    plain = sd1.generation.img2img(Img2ImgParams(**kw))
    controlled = sd1.generation.img2img(Img2ImgParams(**kw, controlnet_units=[ControlNetUnit(model="control_tiny_sd1")]))
    assert not np.array_equal(_pixels(plain), _pixels(controlled))


def test_inpaint_units_read_the_mask_and_feed_minus_one_where_masked():
    from modules.engine.control.units import detect_map, fit_map, map_to_tensor

    picture = Image.new("RGB", (64, 64), (255, 0, 0))
    mask = Image.new("L", (64, 64))
    mask.paste(255, (0, 0, 32, 64))
    inpaint_map = detect_map(ControlNetUnit(module="inpaint_only", model="x"), picture, 64, 64, mask)
    assert inpaint_map.mode == "RGBA"
    hint = map_to_tensor(fit_map(inpaint_map, 64, 64, "Just Resize"), "cpu", torch.float32)[0]
    assert torch.all(hint[:, :, :28] == -1) and torch.allclose(hint[0, :, 36:], torch.ones(64, 28))
    # other preprocessors never see the mask (the extension composites alpha onto white for them)
    plain = detect_map(ControlNetUnit(module="none", model="x"), picture, 64, 64, mask)
    assert plain.mode == "RGB" and plain.getpixel((5, 5)) == (255, 0, 0)


def test_control_lora_builds_on_the_checkpoint_unet(sd1, tmp_path):
    """Stability's control-LoRA layout: diffusers' own loader (peft) applies it to a copy of the checkpoint's
    UNet; a LoRA layer ends as base + up @ down, full tensors as given."""
    from tiny_controlnets import make_control_lora

    model = sd1.models.current()
    unet_sd = {k: v.detach().clone() for k, v in model.pipe.unet.state_dict().items()}
    path = sd1.paths.models_dir / "ControlNet" / "control-lora-tiny-rank4.safetensors"
    lora = make_control_lora(path, "sd1", base_unet_sd=unet_sd)
    spec = detect_controlnet(read_shapes(path))
    assert (spec.kind, spec.family) == ("control_lora", "sd1")
    cn, _ = load_controlnet(path, base_unet=model.pipe.unet)
    got = cn.state_dict()
    k = "input_blocks.1.1.transformer_blocks.0.attn1.to_q"
    expected = unet_sd["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"] + lora[k + ".up"] @ lora[k + ".down"]
    assert torch.allclose(got["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"], expected, atol=1e-6)
    assert torch.equal(got["controlnet_down_blocks.0.weight"], lora["zero_convs.0.0.weight"])
    assert not any("lora" in name for name in got)   # fused: runs as a plain ControlNet
    sd1.controlnets.refresh()
    base = _pixels(_run(sd1))
    assert not np.array_equal(base, _pixels(_run(sd1, [unit(model="control-lora-tiny-rank4")])))


def test_random_preprocessors_follow_the_seed(sd1):
    """shuffle draws from the job's seed (the extension's seed + subseed): the same seed repeats the image."""
    a = _pixels(_run(sd1, [unit(module="shuffle")], seed=5, subseed=7))
    b = _pixels(_run(sd1, [unit(module="shuffle")], seed=5, subseed=7))
    assert np.array_equal(a, b)


def test_units_survive_the_persistent_queue_round_trip(tmp_path):
    import json

    from modules.core.queue_service import params_from_body, params_to_body

    params = Txt2ImgParams(**SMALL, controlnet_units=[unit(weight=0.7, mask=Image.new("L", (64, 64), 255))])
    body = json.loads(json.dumps(params_to_body(params, tmp_path)))
    back = params_from_body("txt2img", body, tmp_path)
    got = back.controlnet_units[0]
    assert (got.model, got.weight) == ("control_tiny_sd1", 0.7)
    assert np.array_equal(np.asarray(got.image), np.asarray(params.controlnet_units[0].image))
    assert got.mask.getpixel((3, 3)) == 255

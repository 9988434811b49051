"""SDXL T2I-Adapters (diffusers' full_adapter_xl, the layout TencentARC published them in) on the tiny
SDXL checkpoint, inside our own sampling loop."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from modules.core.pipeline import ProcessingError
from modules.models.controlnet import detect_controlnet, load_controlnet
from modules.models.detection import read_shapes
from test_controlnet import _pixels, _run, _services, unit
from tiny_controlnets import make_t2i_adapter

FOLDER = "t2i-adapter-tiny-sdxl"


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    services = _services(tmp_path_factory.mktemp("cn-sdxl-adapter"), "sdxl")
    cn_dir = services.paths.models_dir / "ControlNet"
    make_t2i_adapter(cn_dir / FOLDER / "diffusion_pytorch_model.safetensors", "sdxl", layout="diffusers")
    make_t2i_adapter(cn_dir / "t2iadapter_tiny_sd14v1.pth", "sd1")
    services.controlnets.refresh()
    yield services
    services.generation.queue.shutdown()


def test_the_fixture_is_what_diffusers_loads_and_we_read_it_the_same(tmp_path):
    from diffusers import T2IAdapter

    tiny = make_t2i_adapter(tmp_path / FOLDER / "diffusion_pytorch_model.safetensors", "sdxl", layout="diffusers")
    reference = T2IAdapter.from_pretrained(str(tmp_path / FOLDER), local_files_only=True)
    assert reference.config.adapter_type == "full_adapter_xl"
    spec = detect_controlnet(read_shapes(tiny.path))
    assert (spec.kind, spec.family, spec.config["adapter_type"]) == ("t2i_adapter", "sdxl", "full_adapter_xl")
    ours, _ = load_controlnet(tiny.path)
    ref_sd, our_sd = reference.state_dict(), ours.state_dict()
    assert set(ref_sd) == set(our_sd) and all(torch.equal(ref_sd[k], our_sd[k]) for k in ref_sd)
    hint = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(reference(hint), ours(hint)))


def test_sdxl_adapter_changes_the_image_and_weight_zero_does_not(sdxl):
    base = _pixels(_run(sdxl))
    adapted = _pixels(_run(sdxl, [unit(model=FOLDER)]))
    assert not np.array_equal(base, adapted)
    assert np.array_equal(base, _pixels(_run(sdxl, [unit(model=FOLDER, weight=0)])))
    assert np.array_equal(base, _pixels(_run(sdxl, [unit(model=FOLDER, guidance_start=0.5, guidance_end=0.5)])))
    soft = _pixels(_run(sdxl, [unit(model=FOLDER, control_mode="ControlNet is more important")]))
    assert not np.array_equal(soft, adapted)
    with_cn = _pixels(_run(sdxl, [unit(model=FOLDER), unit(model="control_tiny_sdxl")]))
    assert not np.array_equal(with_cn, adapted)


def test_an_sd1_adapter_on_the_sdxl_checkpoint_is_a_clear_error(sdxl):
    with pytest.raises(ProcessingError, match=r"t2iadapter_tiny_sd14v1.*SD1\.5.*tiny-sdxl"):
        _run(sdxl, [unit(model="t2iadapter_tiny_sd14v1")])

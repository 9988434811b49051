"""LoRA on the other families (SDXL's LDM names and two text encoders, SD2) against diffusers' fused
weights, and the /sdapi/v1 LoRA and hypernetwork routes on a real server."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from lora_fixtures import hypernetwork, kohya_lora, kohya_targets, save
from modules.core.pipeline import Txt2ImgParams
from test_lora import SMALL, pixels, same_state, state
from test_processing import make_services


# --------------------------------------------------------------------------- SDXL


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    services = make_services(tmp_path_factory.mktemp("lora-sdxl"), "sdxl")
    yield services
    services.generation.queue.shutdown()


def test_sdxl_kohya_ldm_names_and_both_text_encoders_equal_diffusers(sdxl):
    model = sdxl.models.current()
    pipe = model.pipe
    reference = copy.deepcopy(pipe)
    fresh = {c: state(getattr(pipe, c)) for c in ("unet", "text_encoder", "text_encoder_2")}
    path = sdxl.paths.lora_dir / "xl.safetensors"
    kohya_lora(path, pipe, sdxl=True, metadata={"ss_base_model_version": "sdxl_base_v1-0"})
    assert any(k.startswith("lora_unet_input_blocks_") for k in kohya_targets(pipe, sdxl=True))
    base = pixels(sdxl.generation.txt2img(Txt2ImgParams(prompt="a cat", **SMALL)))
    result = sdxl.generation.txt2img(Txt2ImgParams(prompt="a cat <lora:xl:1>", **SMALL))
    assert not result.comments and not np.array_equal(base, pixels(result))
    reference.load_lora_weights(str(path))
    reference.fuse_lora()
    reference.unload_lora_weights()
    for component in fresh:
        ours, theirs = getattr(pipe, component).state_dict(), getattr(reference, component).state_dict()
        assert any(not torch.equal(ours[k], fresh[component][k]) for k in ours), component
        for key in ours:
            torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=1e-6, msg=key)
    sd1_lora = sdxl.generation.txt2img(Txt2ImgParams(prompt="a cat <lora:sd1ish:1>", **SMALL))
    assert "LoRA not found: sd1ish" in sd1_lora.comments
    assert np.array_equal(base, pixels(sd1_lora))
    for component in fresh:
        assert same_state(getattr(pipe, component), fresh[component])



def test_sd2_kohya_lora_equals_diffusers_and_restores(tmp_path):
    services = make_services(tmp_path, "sd2")
    try:
        model = services.models.current()
        pipe = model.pipe
        fresh = {c: state(getattr(pipe, c)) for c in ("unet", "text_encoder")}
        reference = copy.deepcopy(pipe)
        path = services.paths.lora_dir / "two.safetensors"
        kohya_lora(path, pipe, metadata={"ss_v2": "True"})
        result = services.generation.txt2img(Txt2ImgParams(prompt="a cat <lora:two:1>", **SMALL))
        assert not result.comments
        reference.load_lora_weights(str(path))
        reference.fuse_lora()
        reference.unload_lora_weights()
        for component in fresh:
            ours, theirs = getattr(pipe, component).state_dict(), getattr(reference, component).state_dict()
            assert any(not torch.equal(ours[k], fresh[component][k]) for k in ours), component
            for key in ours:
                torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=1e-6, msg=key)
        services.generation.txt2img(Txt2ImgParams(prompt="a cat", **SMALL))
        assert all(same_state(getattr(pipe, c), fresh[c]) for c in fresh)
    finally:
        services.generation.queue.shutdown()


def test_api_lists_and_refreshes_loras_and_hypernetworks_and_reports_warnings(tmp_path):
    import requests

    from conftest import start_server
    from tiny_models import make_checkpoint

    make_checkpoint(tmp_path / "models" / "Stable-diffusion" / "tiny-sd1.safetensors", "sd1")
    save(tmp_path / "models" / "Lora" / "a" / "one.safetensors",
         {"lora_unet_x.lora_down.weight": torch.zeros(1, 2), "lora_unet_x.lora_up.weight": torch.zeros(2, 1)},
         {"ss_output_name": "uno", "ss_network_dim": "1"})
    hypernetwork(tmp_path / "models" / "hypernetworks" / "hn.pt", (32,))
    srv = start_server(tmp_path, "--api")
    try:
        api = srv.url + "/sdapi/v1"
        loras = requests.get(api + "/loras", timeout=30).json()
        assert loras == [{"name": "one", "alias": "uno", "metadata": {"ss_output_name": "uno", "ss_network_dim": "1"},
                          "path": str(tmp_path / "models" / "Lora" / "a" / "one.safetensors")}]
        save(tmp_path / "models" / "LyCORIS" / "two.safetensors", {"lora_unet_y.hada_w1_a": torch.zeros(1, 1)})
        assert len(requests.get(api + "/loras", timeout=30).json()) == 1
        assert requests.post(api + "/refresh-loras", timeout=30).json() == {}
        assert sorted(x["name"] for x in requests.get(api + "/loras", timeout=30).json()) == ["one", "two"]
        assert requests.get(api + "/hypernetworks", timeout=30).json() == [
            {"name": "hn", "path": str(tmp_path / "models" / "hypernetworks" / "hn.pt")}]
        body = {"prompt": "a cat <lora:missing:1>", "width": 64, "height": 64, "steps": 2}
        reply = requests.post(api + "/txt2img", json=body, timeout=120)
        assert reply.status_code == 200 and reply.json()["images"]
        assert "LoRA not found: missing" in json_loads(reply.json()["info"])["comments"]
    finally:
        srv.stop()


def json_loads(text: str):
    import json

    return json.loads(text)

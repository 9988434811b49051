"""The checkpoint merger on tiny real-layout checkpoints: the formulas tensor by tensor, A1111's rules
(inpainting channels, skipped keys, metadata), refusals before any write, interrupt, never overwriting,
and the merged model loading and generating without a restart; plus the API route."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from modules.core.merge_service import MergeParams, MergeService, legacy_hash
from modules.core.pipeline import Txt2ImgParams
from modules.models.hashes import file_sha256
from modules.models.merge_names import MergeError, MergeInterrupted
from modules.models.weights_io import load_state_dict_file
from tiny_models import make_checkpoint, make_vae_file

POS_IDS = "cond_stage_model.transformer.text_model.embeddings.position_ids"
IN_CONV = "model.diffusion_model.input_blocks.0.0.weight"


@pytest.fixture(scope="module")
def services(tmp_path_factory):
    from conftest import make_services

    services = make_services(tmp_path_factory.mktemp("merge"), {
        "a.safetensors": ("sd1", 1), "b.safetensors": ("sd1", 2), "xl.safetensors": ("sdxl", 5),
        "inpaint.safetensors": ("sd1-inpaint", 6)})
    ckpt_dir = services.paths.ckpt_dir
    make_checkpoint(ckpt_dir / "c.ckpt", "sd1", seed=3, fmt="ckpt")
    make_vae_file(services.paths.vae_dir / "other.vae.safetensors", "sd1", seed=9)
    services.models.refresh()
    yield services
    services.generation.queue.shutdown()


def merge(services, **kw):
    service = MergeService(services.models, services.generation.queue)
    return service.submit(MergeParams(**kw)).result()


def tensors(services, name):
    return load_state_dict_file(services.paths.ckpt_dir / name)


def _is_merged(key):
    return "model" in key and key != POS_IDS


def test_weighted_sum_is_the_formula_for_every_tensor(services):
    result = merge(services, primary_model_name="a.safetensors", secondary_model_name="b.safetensors",
                   multiplier=0.3, custom_name="ws")
    assert result.filename.endswith("ws.safetensors")
    a, b, out = tensors(services, "a.safetensors"), tensors(services, "b.safetensors"), load_file(result.filename)
    assert list(out) == list(a) or set(out) == set(a)
    merged = 0
    for key, ta in a.items():
        if _is_merged(key) and ta.is_floating_point():
            expected = (ta.float() * 0.7 + b[key].float() * 0.3).to(ta.dtype)
            merged += 1
        else:
            expected = ta
        assert out[key].dtype == ta.dtype and torch.equal(out[key], expected), key
    assert merged > 100
    assert torch.equal(out[POS_IDS], a[POS_IDS])
    # safetensors' own reader accepts the hand-written file, metadata included
    with safe_open(result.filename, "pt") as f:
        assert f.metadata()["format"] == "pt"


def test_add_difference_with_a_ckpt_source_and_half_precision(services):
    result = merge(services, primary_model_name="a.safetensors", secondary_model_name="b.safetensors",
                   tertiary_model_name="c.ckpt", interp_method="Add difference", multiplier=0.5, save_as_half=True,
                   custom_name="ad")
    a, b, c = (tensors(services, n) for n in ("a.safetensors", "b.safetensors", "c.ckpt"))
    out = load_file(result.filename)
    for key, ta in a.items():
        if _is_merged(key) and ta.is_floating_point():
            expected = (ta.float() + (b[key].float() - c[key].float()) * 0.5).half()
        else:
            expected = ta.half() if ta.dtype == torch.float32 else ta
        assert torch.equal(out[key], expected), key


def test_no_interpolation_bakes_the_vae_discards_by_regex_and_writes_a_ckpt(services):
    result = merge(services, primary_model_name="a.safetensors", interp_method="No interpolation",
                   bake_in_vae="other.vae.safetensors", discard_weights=r"^model_ema\.|alphas_cumprod$",
                   checkpoint_format="ckpt", custom_name="baked")
    assert result.filename.endswith("baked.ckpt")
    a, out = tensors(services, "a.safetensors"), load_state_dict_file(result.filename)
    vae = load_file(services.paths.vae_dir / "other.vae.safetensors")
    assert "alphas_cumprod" in a and "alphas_cumprod" not in out
    for key, value in vae.items():
        assert torch.equal(out["first_stage_model." + key], value), key
    assert torch.equal(out[IN_CONV], a[IN_CONV])


def test_metadata_has_a1111s_recipe_and_source_hashes(services):
    result = merge(services, primary_model_name="a.safetensors", secondary_model_name="b.safetensors",
                   multiplier=0.25, custom_name="meta", metadata_json='{"note": "hello"}')
    with safe_open(result.filename, "pt") as f:
        meta = f.metadata()
    recipe = json.loads(meta["sd_merge_recipe"])
    a, b = (services.paths.ckpt_dir / n for n in ("a.safetensors", "b.safetensors"))
    assert recipe["type"] == "webui" and recipe["interp_method"] == "Weighted sum" and recipe["multiplier"] == 0.25
    assert recipe["primary_model_hash"] == file_sha256(a) and recipe["secondary_model_hash"] == file_sha256(b)
    assert recipe["tertiary_model_hash"] is None and recipe["is_inpainting"] is False
    models = json.loads(meta["sd_merge_models"])
    assert models[file_sha256(a)] == {"name": "a.safetensors", "legacy_hash": legacy_hash(str(a)),
                                      "sd_merge_recipe": None}
    assert meta["note"] == "hello" and meta["format"] == "pt"
    # merging the merge carries its recipe along
    again = merge(services, primary_model_name="meta.safetensors", secondary_model_name="a.safetensors",
                  custom_name="meta2")
    with safe_open(again.filename, "pt") as f:
        models2 = json.loads(f.metadata()["sd_merge_models"])
    sha_meta = file_sha256(result.filename)
    assert models2[sha_meta]["sd_merge_recipe"] == recipe and file_sha256(a) in models2


def test_an_existing_name_is_never_overwritten(services):
    first = merge(services, primary_model_name="a.safetensors", interp_method="No interpolation", custom_name="keep")
    before = open(first.filename, "rb").read()
    with pytest.raises(MergeError, match="already exists"):
        merge(services, primary_model_name="b.safetensors", interp_method="No interpolation", custom_name="keep")
    assert open(first.filename, "rb").read() == before


@pytest.mark.parametrize("kw, message", [
    (dict(primary_model_name="a.safetensors", secondary_model_name="xl.safetensors"), "different architectures"),
    (dict(primary_model_name="a.safetensors", secondary_model_name="inpaint.safetensors"),
     "A must be the inpainting model"),
    (dict(primary_model_name="a.safetensors", secondary_model_name="nope"), "not found"),
    (dict(primary_model_name="a.safetensors", secondary_model_name="b.safetensors", discard_weights="("),
     "regular expression"),
    (dict(primary_model_name="a.safetensors", secondary_model_name="b.safetensors", custom_name="../escape"),
     "plain file name"),
    (dict(primary_model_name="a.safetensors", interp_method="Add difference", secondary_model_name="b.safetensors"),
     "tertiary"),
    (dict(primary_model_name="a.safetensors", interp_method="No interpolation", bake_in_vae="missing"), "not found"),
])
def test_bad_merges_are_refused_and_write_nothing(services, kw, message):
    before = sorted(os.listdir(services.paths.ckpt_dir))
    with pytest.raises(MergeError, match=message):
        merge(services, **kw)
    assert sorted(os.listdir(services.paths.ckpt_dir)) == before


def test_an_inpainting_a_with_a_normal_b_merges_the_first_four_channels(services):
    result = merge(services, primary_model_name="inpaint.safetensors", secondary_model_name="a.safetensors",
                   multiplier=0.5)
    assert result.filename.endswith(".inpainting.safetensors") and result.is_inpainting
    a, b = tensors(services, "inpaint.safetensors"), tensors(services, "a.safetensors")
    out = load_file(result.filename)
    assert out[IN_CONV].shape[1] == 9
    assert torch.equal(out[IN_CONV][:, :4], (a[IN_CONV][:, :4].float() * 0.5 + b[IN_CONV].float() * 0.5))
    assert torch.equal(out[IN_CONV][:, 4:], a[IN_CONV][:, 4:])
    with safe_open(result.filename, "pt") as f:
        assert json.loads(f.metadata()["sd_merge_recipe"])["is_inpainting"] is True


def test_interrupt_stops_the_merge_and_leaves_nothing(services):
    queue = services.generation.queue
    service = MergeService(services.models, queue)
    before = sorted(os.listdir(services.paths.ckpt_dir))
    state = queue.state
    original = state.set_step

    def interrupt_midway(step, total):
        original(step, total)
        if step == 10:
            queue.interrupt()
    state.set_step = interrupt_midway
    try:
        with pytest.raises(MergeInterrupted):
            service.submit(MergeParams(primary_model_name="a.safetensors", secondary_model_name="b.safetensors",
                                       custom_name="stopped")).result()
    finally:
        del state.set_step
    assert sorted(os.listdir(services.paths.ckpt_dir)) == before


def test_the_merged_model_is_listed_at_once_loads_and_generates(services):
    result = merge(services, primary_model_name="a.safetensors", secondary_model_name="b.safetensors",
                   multiplier=0.5, custom_name="fresh")
    assert result.title in services.models.titles()
    out = services.generation.txt2img(Txt2ImgParams(prompt="a cat", seed=3, width=64, height=64, steps=2),
                                      override_settings={"sd_model_checkpoint": result.title})
    assert np.asarray(out.images[0]).std() > 0
    assert services.models.loaded_model.path.name == "fresh.safetensors"


def test_the_api_merges_and_refuses_with_4xx(services):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from modules.api.routes import Api, install_error_handlers

    app = FastAPI()
    install_error_handlers(app)
    Api(app, services)
    client = TestClient(app)
    ok = client.post("/sdapi/v1/merge-checkpoints", json={
        "primary_model_name": "a.safetensors", "secondary_model_name": "b.safetensors", "multiplier": 0.4,
        "custom_name": "via-api", "save_as_half": True})
    assert ok.status_code == 200, ok.text
    assert ok.json()["filename"].endswith("via-api.safetensors")
    listed = [m["title"] for m in client.get("/sdapi/v1/sd-models").json()]
    assert ok.json()["title"] in listed
    again = client.post("/sdapi/v1/merge-checkpoints", json={"primary_model_name": "a.safetensors",
                                                             "interp_method": "No interpolation",
                                                             "custom_name": "via-api"})
    assert again.status_code == 409 and "already exists" in again.json()["detail"]
    bad = client.post("/sdapi/v1/merge-checkpoints", json={"primary_model_name": "a.safetensors",
                                                           "secondary_model_name": "xl.safetensors"})
    assert bad.status_code == 422 and "architectures" in bad.json()["detail"]


def test_the_sidecar_config_is_copied_from_a_b_or_c_and_never_over_a_file(services):
    ckpt_dir = services.paths.ckpt_dir
    made = make_checkpoint(ckpt_dir / "with-yaml.safetensors", "sd1", seed=4, yaml=True)
    services.models.refresh()
    result = merge(services, primary_model_name="a.safetensors", secondary_model_name="with-yaml.safetensors",
                   custom_name="cfg", config_source="A, B or C")
    assert (ckpt_dir / "cfg.yaml").read_bytes() == made.yaml_path.read_bytes()
    assert "config copied" in result.message
    none = merge(services, primary_model_name="a.safetensors", secondary_model_name="with-yaml.safetensors",
                 custom_name="no-cfg", config_source=3)
    assert not (ckpt_dir / "no-cfg.yaml").exists() and none.filename.endswith("no-cfg.safetensors")
    (ckpt_dir / "kept.yaml").write_text("mine")
    kept = merge(services, primary_model_name="with-yaml.safetensors", interp_method="No interpolation",
                 custom_name="kept", config_source="A, B or C")
    assert (ckpt_dir / "kept.yaml").read_text() == "mine" and "was kept" in kept.message

"""Loading tiny A1111-layout checkpoints into diffusers pipelines, offline; device policy; ModelManager."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from modules.models import devices, detection as md, loader as ml
from modules.models.devices import DevicePolicy, cpu_policy, select_device_policy
from modules.models.families import get_family
from modules.models.loader import LoadedModel, ModelManager, UnsupportedCheckpointError
from modules.models.weights_io import CheckpointLoadError
from tests import tiny_models as tm
from tests.test_model_detection import no_network, tiny_checkpoint  # noqa: F401  (autouse fixture)

PX = 64


def _render(lm: LoadedModel, steps: int = 2) -> np.ndarray:
    g = torch.Generator().manual_seed(1)
    img = Image.new("RGB", (PX, PX), (120, 90, 60))
    # no CFG: halves the UNet work; guidance is processing's business, loading is tested here
    kw: dict = dict(prompt="a photo of a cat", num_inference_steps=steps, generator=g, output_type="np",
                    guidance_scale=1.0)
    spec = lm.spec
    if spec.family == "sdxl-refiner":  # an img2img pipeline
        kw.update(image=img, strength=1.0)
    elif spec.is_depth:
        kw.update(image=img, strength=1.0, depth_map=torch.rand(1, PX, PX, generator=g))
    else:
        kw.update(height=PX, width=PX)
        if spec.is_inpaint:
            kw.update(image=img, mask_image=Image.new("L", (PX, PX), 255))
    lm.pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        out = lm.pipe(**kw).images
    return np.asarray(out)


def _assert_weights_equal(lm: LoadedModel, ck: tm.TinyCheckpoint,
                          components=("unet", "vae", "text_encoder", "text_encoder_2")):
    checked = 0
    for name in components:
        want = ck.diffusers_state_dicts.get(name)
        if want is None:
            assert lm.components.get(name) is None or name == "text_encoder"
            continue
        got = lm.components[name].state_dict()
        assert set(got) == set(want), (name, sorted(set(got) ^ set(want))[:5])
        for key, tensor in want.items():
            assert torch.equal(got[key], tensor), (name, key)
            checked += 1
    assert checked > 50


# ---------------------------------------------------------------- every family loads and renders


@pytest.mark.parametrize("family", list(tm.FAMILY_IDS))
def test_family_loads_and_renders(tmp_path_factory, family):
    ck = tiny_checkpoint(tmp_path_factory, family)
    # v-prediction cannot be seen in the weights and the probe is meaningless on random ones: use the yaml
    spec = md.identify(ck.path, ck.yaml_path if family == "sd2-v" else None)
    lm = ml.load_model(ck.path, spec, cpu_policy())
    assert lm.family == family if family != "sd2-v" else lm.family == "sd2-v"
    pipe = lm.pipe
    assert type(pipe).__name__ == get_family(family).pipeline_class
    if hasattr(pipe, "safety_checker"):
        assert pipe.safety_checker is None
    if family == "sd2":
        assert lm.spec.prediction_source == "probe"  # value arbitrary for random weights
    elif family == "sd2-v":
        assert pipe.scheduler.config.prediction_type == "v_prediction"
        assert pipe.unet.config.upcast_attention is True
    else:
        assert pipe.scheduler.config.prediction_type == "epsilon"
    if family == "sd2-depth":
        assert lm.needs_depth_map and "depth map" in lm.status
    _assert_weights_equal(lm, ck)
    image = _render(lm)
    assert image.shape == (1, PX, PX, 3) and np.isfinite(image).all()
    lm.unload()
    assert lm.pipe is None and not lm.components


def test_sdxl_with_a_non_standard_time_embedding_loads_and_renders(tmp_path_factory):
    ck = tiny_checkpoint(tmp_path_factory, "sdxl", addition_time_embed_dim=8)
    lm = ml.load_model(ck.path, md.identify(ck.path, None), cpu_policy())
    assert lm.pipe.unet.config.addition_time_embed_dim == 8
    _assert_weights_equal(lm, ck)
    image = _render(lm)
    assert image.shape == (1, PX, PX, 3) and np.isfinite(image).all()


def test_ckpt_loads_through_the_safe_reader(tmp_path_factory, monkeypatch):
    ck = tiny_checkpoint(tmp_path_factory, "sd1", fmt="ckpt")
    real_load = torch.load

    def checked_load(*args, **kwargs):
        assert kwargs.get("weights_only") is True, "full unpickling attempted"
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", checked_load)
    lm = ml.load_checkpoint(ck.path, cpu_policy())
    assert lm.family == "sd1"
    _assert_weights_equal(lm, ck)


def test_load_checkpoint_uses_the_sidecar_yaml(tmp_path_factory, tmp_path):
    ck = tiny_checkpoint(tmp_path_factory, "sd2-v")
    copy = tm.copy_checkpoint(ck, tmp_path / "m.safetensors")
    assert copy.yaml_path is not None and copy.yaml_path.is_file()
    lm = ml.load_checkpoint(copy.path, cpu_policy())
    assert lm.spec.detected_by == "yaml" and lm.prediction_type == "v_prediction"


def test_v_probe_result_is_applied(tmp_path_factory, monkeypatch):
    """Wiring of the probe (its decision is faked: random weights make the real one meaningless)."""
    ck = tiny_checkpoint(tmp_path_factory, "sd2")
    calls = []
    monkeypatch.setattr(md, "probe_v_prediction", lambda unet: calls.append(unet) or (True, -3.0))
    spec = md.identify(ck.path, None)
    lm = ml.load_model(ck.path, spec, cpu_policy())
    assert calls and lm.family == "sd2-v" and lm.spec.prediction_source == "probe"
    assert lm.pipe.scheduler.config.prediction_type == "v_prediction"
    assert lm.pipe.unet.config.upcast_attention is True
    _assert_weights_equal(lm, ck, ("unet",))

    monkeypatch.setattr(md, "probe_v_prediction", lambda unet: (False, 0.01))
    lm = ml.load_model(ck.path, spec, cpu_policy())
    assert lm.family == "sd2" and lm.pipe.scheduler.config.prediction_type == "epsilon"


# ---------------------------------------------------------------- non-standard shapes, no yaml


def test_non_standard_sd1_loads_without_yaml(tmp_path_factory):
    kw = dict(unet_block_out_channels=[32, 64, 96], te_width=128, te_layers=3)
    ck = tiny_checkpoint(tmp_path_factory, "sd1", **kw)
    spec = md.identify(ck.path, None)  # the sidecar yaml is not passed: shapes only
    assert spec.detected_by == "keys"
    lm = ml.load_model(ck.path, spec, cpu_policy())
    assert list(lm.pipe.unet.config.block_out_channels) == [32, 64, 96]
    assert lm.pipe.text_encoder.config.hidden_size == 128 and lm.pipe.text_encoder.config.num_hidden_layers == 3
    _assert_weights_equal(lm, ck)
    assert _render(lm).shape == (1, PX, PX, 3)


def _custom_checkpoint(path: Path, family: str, tiny_kw: dict | None = None, **unet_overrides) -> tm.TinyCheckpoint:
    cfgs = tm.tiny_configs(family, **(tiny_kw or {}))
    cfgs["unet"].update(unet_overrides)
    models = tm.build_components(cfgs, seed=3)
    sd = tm.components_to_ldm(family, models, cfgs, seed=3)
    save_file(sd, str(path))
    return tm.TinyCheckpoint(path=path, family=family, config_dir=path.parent, ldm_state_dict=sd,
                             diffusers_state_dicts={c: m.state_dict() for c, m in models.items()})


def test_pruned_unet_bk_sdm_style(tmp_path):
    """One resnet per down level, no mid block: A1111 cannot load this without a yaml."""
    ck = _custom_checkpoint(tmp_path / "bk.safetensors", "sd1", layers_per_block=1, mid_block_type=None)
    spec = md.identify(ck.path, None)
    assert spec.unet_config["layers_per_block"] == 1 and spec.unet_config["mid_block_type"] is None
    lm = ml.load_model(ck.path, spec, cpu_policy())
    assert lm.pipe.unet.mid_block is None
    _assert_weights_equal(lm, ck)
    assert _render(lm).shape == (1, PX, PX, 3)


def test_uneven_transformer_depth_ssd_style(tmp_path):
    """SSD-1B/Vega-style pruning: transformer depth differs between layers of a level and between up/down;
    also non-standard widths for both SDXL text encoders, and a third UNet level."""
    tiny_kw = dict(te_width=(64, 192), te_layers=(2, 11), unet_block_out_channels=[64, 128, 128])
    ck = _custom_checkpoint(tmp_path / "ssd.safetensors", "sdxl", tiny_kw,
                            transformer_layers_per_block=[[1, 1], [2, 1], [1, 2]],
                            reverse_transformer_layers_per_block=[[1, 1, 2], [2, 1, 1], [1, 1, 1]])
    spec = md.identify(ck.path, None)
    assert spec.unet_config["transformer_layers_per_block"] == [[1, 1], [2, 1], [1, 2]]
    assert spec.unet_config["reverse_transformer_layers_per_block"] == [[1, 1, 2], [2, 1, 1], [1, 1, 1]]
    assert spec.unet_config["cross_attention_dim"] == 64 + 192
    assert spec.unet_config["attention_head_dim"] == [1, 2, 2]
    te1, te2 = spec.text_encoder_config, spec.text_encoder_2_config
    assert (te1["hidden_size"], te1["num_hidden_layers"], te1["num_attention_heads"]) == (64, 2, 1)
    assert (te2["hidden_size"], te2["num_hidden_layers"], te2["num_attention_heads"]) == (192, 11, 3)
    assert te2["projection_dim"] == 192
    lm = ml.load_model(ck.path, spec, cpu_policy())
    _assert_weights_equal(lm, ck)
    assert _render(lm).shape == (1, PX, PX, 3)


# ---------------------------------------------------------------- separate VAE files


def test_separate_vae_replaces_the_baked_one(tmp_path_factory, tmp_path):
    ck = tiny_checkpoint(tmp_path_factory, "sd1")
    spec = md.identify(ck.path, None)
    unprefixed = tm.make_vae_file(tmp_path / "a.safetensors", prefixed=False, seed=5)
    prefixed = tm.make_vae_file(tmp_path / "b.safetensors", prefixed=True, seed=6)
    diffusers_layout = tmp_path / "c.safetensors"
    save_file({k: v.contiguous() for k, v in prefixed.diffusers_state_dicts["vae"].items()}, str(diffusers_layout))

    lm = ml.load_model(ck.path, spec, cpu_policy(), vae_file=unprefixed.path)
    assert lm.vae_file == unprefixed.path
    _assert_weights_equal(lm, unprefixed, ("vae",))
    _assert_weights_equal(lm, ck, ("unet", "text_encoder"))
    assert lm.pipe.vae is lm.components["vae"]
    assert lm.pipe.vae.config.scaling_factor == spec.vae_config["scaling_factor"]

    ml.replace_vae(lm, prefixed.path)
    _assert_weights_equal(lm, prefixed, ("vae",))
    ml.replace_vae(lm, diffusers_layout)
    _assert_weights_equal(lm, prefixed, ("vae",))
    ml.replace_vae(lm, None)  # back to the checkpoint's own
    _assert_weights_equal(lm, ck, ("vae",))
    assert lm.vae_file is None and lm.pipe.vae is lm.components["vae"]
    assert _render(lm).shape == (1, PX, PX, 3)


def test_checkpoint_without_vae_needs_one(tmp_path_factory, tmp_path):
    ck = tiny_checkpoint(tmp_path_factory, "sd1")
    path = tmp_path / "novae.safetensors"
    save_file({k: v for k, v in ck.ldm_state_dict.items() if not k.startswith("first_stage_model.")}, str(path))
    spec = md.identify(path, None)
    with pytest.raises(CheckpointLoadError, match="no VAE weights"):
        ml.load_model(path, spec, cpu_policy())
    vae = tm.make_vae_file(tmp_path / "v.safetensors")
    lm = ml.load_model(path, spec, cpu_policy(), vae_file=vae.path)
    _assert_weights_equal(lm, vae, ("vae",))


# ---------------------------------------------------------------- refusals and errors


@pytest.mark.parametrize("kind", ["flux", "sd3", "lora", "random"])
def test_unsupported_never_builds_a_pipeline(tmp_path, monkeypatch, kind):
    def forbidden(*a, **k):
        raise AssertionError("a component was built for an unsupported file")

    monkeypatch.setattr(ml, "_load_unet", forbidden)
    monkeypatch.setattr(ml, "_assemble", forbidden)
    path = tmp_path / f"{kind}.safetensors"
    tm.make_unsupported_file(path, kind)
    with pytest.raises(UnsupportedCheckpointError) as err:
        ml.load_checkpoint(path, cpu_policy())
    assert str(path) in str(err.value) and err.value.spec.reason in str(err.value)
    vae = tm.make_vae_file(tmp_path / "vae.safetensors")
    with pytest.raises(UnsupportedCheckpointError, match="a VAE: put it in models/VAE"):
        ml.load_checkpoint(vae.path, cpu_policy())


def test_missing_unexpected_and_misshapen_keys_are_named(tmp_path_factory, tmp_path):
    ck = tiny_checkpoint(tmp_path_factory, "sd1")
    base = dict(ck.ldm_state_dict)

    missing = dict(base)
    del missing["model.diffusion_model.input_blocks.1.0.in_layers.2.weight"]
    extra = dict(base)
    extra["model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.bogus.weight"] = torch.zeros(2)
    shaped = dict(base)
    key = "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight"
    shaped[key] = torch.zeros(shaped[key].shape[0], shaped[key].shape[1] + 1)

    for name, sd, needle in (("missing", missing, "down_blocks.0.resnets.0.conv1.weight"),
                             ("extra", extra, "attn1.bogus.weight"),
                             ("shaped", shaped, "fc1.weight")):
        path = tmp_path / f"{name}.safetensors"
        save_file(sd, str(path))
        with pytest.raises(CheckpointLoadError) as err:
            ml.load_checkpoint(path, cpu_policy())
        assert str(path) in str(err.value) and needle in str(err.value), str(err.value)


def test_truncated_file_error_names_it(tmp_path_factory, tmp_path):
    ck = tiny_checkpoint(tmp_path_factory, "sd1")
    cut = tmp_path / "cut.safetensors"
    data = ck.path.read_bytes()
    cut.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointLoadError, match="cut.safetensors"):
        ml.load_checkpoint(cut, cpu_policy())


# ---------------------------------------------------------------- device policy


def test_cpu_policy_is_always_fp32(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(devices, "_mps_available", lambda: False)
    p = select_device_policy(use_cpu=[], device_id=None, no_half=False, no_half_vae=False)
    assert p == DevicePolicy(torch.device("cpu"), torch.float32, torch.float32, torch.float32)


def test_cuda_and_mps_policies(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    sel = lambda **kw: select_device_policy(**{"use_cpu": [], "device_id": None, "no_half": False,  # noqa: E731
                                               "no_half_vae": False, **kw})
    p = sel()
    assert p.device == torch.device("cuda", 0) and p.dtype == torch.float16 and p.vae_dtype == torch.float16
    assert sel(no_half_vae=True).vae_dtype == torch.float32 and sel(no_half_vae=True).dtype == torch.float16
    assert sel(no_half=True).dtype == torch.float32 and sel(no_half=True).vae_dtype == torch.float32
    assert sel(precision="full").dtype == torch.float32
    assert sel(device_id="1").device == torch.device("cuda", 1)
    with pytest.raises(ValueError, match="device-id 5"):
        sel(device_id="5")
    assert sel(use_cpu=["all"]).device.type == "cpu" and sel(use_cpu=True).dtype == torch.float32
    assert sel(use_cpu=["interrogate"]).device.type == "cuda"

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(devices, "_mps_available", lambda: True)
    p = sel()
    assert p.device.type == "mps" and p.dtype == torch.float16 and p.vae_dtype == torch.float32


# ---------------------------------------------------------------- ModelManager


@dataclass
class _TrackedModel(LoadedModel):
    on_unload: Callable[[str], None] | None = None

    def unload(self) -> None:
        if self.on_unload:
            self.on_unload(self.path.name)
        self.pipe = None


class _FakeLoads:
    """A load_fn that records calls and can be told to fail; models are cheap LoadedModel shells."""

    def __init__(self):
        self.calls: list[tuple[str, Path | None]] = []
        self.fail: set[str] = set()
        self.unloaded: list[str] = []

    def __call__(self, info, vae_file):
        name = Path(info).name
        self.calls.append((name, vae_file))
        if name in self.fail:
            raise CheckpointLoadError(info, "simulated failure")
        return _TrackedModel(info=None, path=Path(info), spec=md.ModelSpec(True, "fake", family="sd1"),
                             policy=cpu_policy(), pipe=object(), components={}, vae_file=vae_file,
                             on_unload=self.unloaded.append)


def test_manager_lru_and_listeners(tmp_path):
    loads = _FakeLoads()
    seen: list[str] = []
    mgr = ModelManager(loads, limit=2)
    mgr.add_loaded_listener(lambda m: seen.append(m.path.name))
    mgr.add_loaded_listener(lambda m: 1 / 0)  # a broken listener does not undo the load
    a, b, c = (tmp_path / n for n in ("a.safetensors", "b.safetensors", "c.safetensors"))
    mgr.get(a)
    mgr.get(b)
    assert mgr.get(a) is mgr.current and [x for x, _ in loads.calls] == ["a.safetensors", "b.safetensors"]
    mgr.get(c)  # evicts b: a was used more recently
    assert loads.unloaded == ["b.safetensors"]
    assert [m.path.name for m in mgr.loaded] == ["a.safetensors", "c.safetensors"]
    assert seen == ["a.safetensors", "b.safetensors", "c.safetensors"]
    mgr.set_limit(1)
    assert [m.path.name for m in mgr.loaded] == ["c.safetensors"] and mgr.current.path.name == "c.safetensors"
    mgr.unload_all()
    assert mgr.current is None and not mgr.loaded


def test_manager_keeps_previous_model_when_switch_fails(tmp_path):
    loads = _FakeLoads()
    mgr = ModelManager(loads, limit=1)
    good, bad = tmp_path / "good.ckpt", tmp_path / "bad.ckpt"
    loads.fail.add("bad.ckpt")
    first = mgr.switch(good)
    with pytest.raises(CheckpointLoadError, match="simulated failure"):
        mgr.switch(bad)
    assert mgr.current is first and first.is_loaded and loads.unloaded == []

    # low-memory mode frees first, then reloads the previous model after the failure
    seen = []
    mgr = ModelManager(loads, limit=1, free_before_load=True)
    mgr.add_loaded_listener(lambda m: seen.append(m.path.name))
    mgr.switch(good)
    with pytest.raises(CheckpointLoadError):
        mgr.switch(bad)
    assert mgr.current is not None and mgr.current.path.name == "good.ckpt" and mgr.current.is_loaded
    assert seen == ["good.ckpt", "good.ckpt"]


def test_manager_vae_change_and_concurrency(tmp_path):
    loads = _FakeLoads()
    swaps = []

    def vae_fn(model, vae):
        swaps.append(vae)
        model.vae_file = vae
        return model

    mgr = ModelManager(loads, limit=1, vae_fn=vae_fn)
    a = tmp_path / "a.safetensors"
    results = []
    threads = [threading.Thread(target=lambda: results.append(mgr.get(a))) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(loads.calls) == 1 and all(r is results[0] for r in results)
    v = tmp_path / "v.safetensors"
    assert mgr.get(a, v).vae_file == v and swaps == [v] and len(loads.calls) == 1


def test_manager_with_real_loader(tmp_path_factory, tmp_path):
    ck = tiny_checkpoint(tmp_path_factory, "sd1")
    cut = tmp_path / "broken.safetensors"
    cut.write_bytes(ck.path.read_bytes()[:5000])
    mgr = ModelManager(ml.make_load_fn(cpu_policy()), limit=1)
    loaded = []
    mgr.add_loaded_listener(loaded.append)
    t = time.perf_counter()
    first = mgr.switch(ck.path)
    assert time.perf_counter() - t < 30 and first.load_seconds > 0
    with pytest.raises(CheckpointLoadError, match="broken.safetensors"):
        mgr.switch(cut)
    assert mgr.current is first and first.is_loaded and loaded == [first]
    assert _render(first).shape == (1, PX, PX, 3)
    mgr.unload_all()
    assert first.pipe is None


def test_manager_readers_do_not_wait_for_a_load(tmp_path):
    loads = _FakeLoads()
    gate, started = threading.Event(), threading.Event()

    def slow(info, vae):
        if Path(info).name == "slow.safetensors":
            started.set()
            assert gate.wait(10)
        return loads(info, vae)

    mgr = ModelManager(slow, limit=1)
    first = mgr.get(tmp_path / "fast.safetensors")
    worker = threading.Thread(target=lambda: mgr.get(tmp_path / "slow.safetensors"))
    worker.start()
    assert started.wait(10)
    t = time.perf_counter()
    assert mgr.current is first and mgr.loaded == [first]  # answered while the load is in flight
    assert time.perf_counter() - t < 1
    gate.set()
    worker.join(10)
    assert mgr.current.path.name == "slow.safetensors" and loads.unloaded == ["fast.safetensors"]


def test_the_no_network_guard_is_active_here():
    import socket

    import huggingface_hub

    with pytest.raises(AssertionError, match="outbound connection"):
        socket.create_connection(("203.0.113.1", 443), timeout=1)
    with pytest.raises(AssertionError, match="network access"):
        huggingface_hub.hf_hub_download("some/repo", "config.json")

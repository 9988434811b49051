"""Switching LoRA sets fast: the in-place merge gives the same bits as the general float32 path, only
layers whose change differs are rewritten, a parsed file is kept while its network is merged, and
the restore stays exact. Tiny SD1 components, kohya files in the real on-disk layout."""
from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from lora_fixtures import components, network_weights as network, snapshot, two_kohya_loras
from modules.engine.networks import deltas
from modules.engine.networks.activation import ExtraNetworks
from modules.engine.networks.keys import group_layers
from modules.engine.networks.merge import NetworkMerger, NetworkUse, NetworkWeights
from modules.models import weights_io
from modules.models.lora_registry import LoraRegistry


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return two_kohya_loras(tmp_path_factory.mktemp("lora-switch"))



def test_in_place_merge_equals_the_general_path_bit_for_bit(tiny):
    fast_pipe, general_pipe = copy.deepcopy(tiny.pipe), copy.deepcopy(tiny.pipe)
    fast = NetworkMerger(components(fast_pipe), fast_pipe.unet.config)
    general = NetworkMerger(components(general_pipe), general_pipe.unet.config)
    for uses in ([("a", 1.0, 1.0)], [("b", 0.7, -0.5)], [("a", 1.0, 0.5), ("b", 0.5, 1.0)]):
        fast.apply([NetworkUse(network(tiny.root, n), te=te, unet=u) for n, te, u in uses])
        general.apply([NetworkUse(network(tiny.root, n, general=True), te=te, unet=u) for n, te, u in uses])
        ours, theirs = snapshot(fast_pipe), snapshot(general_pipe)
        assert any(not torch.equal(v, snapshot(tiny.pipe)[k]) for k, v in ours.items())
        assert all(torch.equal(v, theirs[k]) for k, v in ours.items()), uses


def test_merged_layer_is_the_original_plus_scaled_product(tiny):
    pipe = copy.deepcopy(tiny.pipe)
    before = snapshot(pipe)
    merger = NetworkMerger(components(pipe), pipe.unet.config)
    weights = network(tiny.root, "a")
    merger.apply([NetworkUse(weights, te=0.5, unet=1.0)])
    for ref, module in merger.index.modules.items():
        prefix = next((p for p, g in weights.groups.items() if merger.index.resolve(p) == ref), None)
        if prefix is None:
            continue
        parts = weights.groups[prefix].parts
        w0 = before[f"{ref.component}.{ref.name}.weight"]
        delta, _ = deltas.layer_delta(parts, w0)
        mult = 1.0 if ref.component == "unet" else 0.5
        torch.testing.assert_close(module.weight.detach(), w0 + mult * delta, rtol=1e-5, atol=1e-6)


def test_switch_rewrites_only_changed_layers_and_restores_exactly(tiny, monkeypatch):
    pipe = copy.deepcopy(tiny.pipe)
    before = snapshot(pipe)
    merger = NetworkMerger(components(pipe), pipe.unet.config)
    rewritten = []
    original = NetworkMerger._merge_layer
    monkeypatch.setattr(NetworkMerger, "_merge_layer",
                        lambda self, ref, *args: (rewritten.append(ref), original(self, ref, *args))[1])
    a = network(tiny.root, "a")
    assert merger.apply([NetworkUse(a, te=1.0, unet=1.0)]).text_encoders_changed
    assert {r.component for r in rewritten} == {"unet", "text_encoder"}
    rewritten.clear()
    report = merger.apply([NetworkUse(a, te=1.0, unet=0.5)])   # only the UNet's multiplier changed
    assert rewritten and {r.component for r in rewritten} == {"unet"}
    assert not report.text_encoders_changed   # prompt encodings made before stay valid

    b = network(tiny.root, "b")
    merger.apply([NetworkUse(b)])
    after_switch = snapshot(pipe)
    fresh_pipe = copy.deepcopy(tiny.pipe)
    NetworkMerger(components(fresh_pipe), fresh_pipe.unet.config).apply([NetworkUse(network(tiny.root, "b"))])
    assert all(torch.equal(v, snapshot(fresh_pipe)[k]) for k, v in after_switch.items())   # no trace of A

    merger.apply([])
    assert not merger.backups and not merger.merged
    assert all(torch.equal(v, before[k]) for k, v in snapshot(pipe).items())


def test_a_layer_with_nan_fails_only_its_network(tiny):
    pipe = copy.deepcopy(tiny.pipe)
    before = snapshot(pipe)
    merger = NetworkMerger(components(pipe), pipe.unet.config)
    state = load_file(str(tiny.root / "a.safetensors"))
    key = next(k for k in state if k.startswith("lora_unet_") and k.endswith("lora_up.weight"))
    state[key] = state[key].clone()
    state[key][0, 0] = float("nan")
    bad = NetworkWeights(key="bad", name="bad", groups=group_layers(state)[0])
    report = merger.apply([NetworkUse(bad), NetworkUse(network(tiny.root, "b"))])
    assert "NaN" in report.outcomes[0].error and report.outcomes[0].layers == 0
    assert report.outcomes[1].error is None and report.outcomes[1].layers > 0
    only_b = copy.deepcopy(tiny.pipe)
    NetworkMerger(components(only_b), only_b.unet.config).apply([NetworkUse(network(tiny.root, "b"))])
    assert all(torch.equal(v, snapshot(only_b)[k]) for k, v in snapshot(pipe).items())
    merger.restore()
    assert all(torch.equal(v, before[k]) for k, v in snapshot(pipe).items())


def test_prepared_factors_of_mixed_dtype_files_are_float32_at_merge_time():
    up16, down32 = torch.randn(6, 2).half(), torch.randn(2, 5)
    prepared = deltas.prepare_plain({"x": {"lora_up.weight": up16, "lora_down.weight": down32,
                                           "alpha": torch.tensor(1.0)}})["x"]
    assert prepared.up is not None and prepared.scale == 0.5
    buffer = torch.empty(64)
    up = deltas.float32_into(buffer, prepared.up)
    assert up.dtype == torch.float32 and torch.equal(up, up16.float()) and up.data_ptr() == buffer.data_ptr()
    assert deltas.float32_into(buffer, prepared.down) is prepared.down   # float32 already: no copy
    up, down = prepared.factors(dyn=1)
    assert up.shape == (6, 1) and down.shape == (1, 5)


def test_a_merged_file_is_not_read_again_for_a_new_multiplier(tiny, monkeypatch):
    pipe = copy.deepcopy(tiny.pipe)
    model = SimpleNamespace(pipe=pipe, spec=SimpleNamespace(family_info=SimpleNamespace(
        is_sdxl=False, is_sd2=False, is_sd1=True, label="SD1")))
    engine = ExtraNetworks(LoraRegistry([tiny.root]))
    reads = []
    real_load = weights_io.load_state_dict_file
    monkeypatch.setattr(weights_io, "load_state_dict_file", lambda path, **kw: (reads.append(path.stem),
                                                                                 real_load(path, **kw))[1])

    def run(tags: str, limit: int = 0):
        out = engine.activate(model, None, [f"a cat {tags}"], options=SimpleNamespace(lora_in_memory_limit=limit))
        assert not out.warnings, out.warnings
    run("<lora:a:1>")
    run("<lora:a:0.5>")
    run("<lora:a:0.5:1>")
    assert reads == ["a"]
    run("<lora:b:1>")
    run("<lora:a:1>")            # A1111's default limit 0: a file no longer merged is not kept
    assert reads == ["a", "b", "a"]
    run("<lora:b:1>", limit=1)
    run("<lora:a:1>", limit=1)   # kept as one of the `limit` others
    assert reads == ["a", "b", "a", "b"]

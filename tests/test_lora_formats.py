"""Network types and key spellings, without a job: each LyCORIS type's weight change against its
formula or its defining property, and every key layout resolving to the layer it names."""
from __future__ import annotations

import pytest
import torch

from modules.engine.networks import deltas
from modules.engine.networks.keys import LayerIndex, LayerRef, group_layers
from modules.engine.networks.merge import NetworkMerger, NetworkUse, NetworkWeights

gen = torch.Generator().manual_seed(0)


def rand(*shape, scale=0.1):
    return torch.randn(*shape, generator=gen) * scale


W = rand(8, 6, scale=1.0)


def test_ia3_scales_rows_or_input_columns():
    w = rand(8)
    delta = deltas.layer_delta({"weight": w, "on_input": torch.tensor(False)}, W)[0]
    torch.testing.assert_close(W + delta, W * (1 + w[:, None]))
    v = rand(6)
    delta = deltas.layer_delta({"weight": v, "on_input": torch.tensor(True)}, W)[0]
    torch.testing.assert_close(W + delta, W * (1 + v[None, :]))


def _cayley(q):
    skew = q - q.transpose(-1, -2)
    eye = torch.eye(q.shape[-1])
    return (eye + skew) @ torch.linalg.inv(eye - skew)


def test_oft_rotates_blocks_of_output_rows():
    blocks = rand(2, 4, 4)
    merged = W + deltas.layer_delta({"oft_blocks": blocks}, W)[0]
    expected = torch.cat([_cayley(blocks[i]).t() @ W[4 * i: 4 * i + 4] for i in range(2)])
    torch.testing.assert_close(merged, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(merged.norm(dim=0), W.norm(dim=0), rtol=1e-5, atol=1e-6)  # orthogonal


def test_oft_constraint_bounds_the_rotation():
    blocks = rand(2, 4, 4, scale=5.0)
    free = deltas.layer_delta({"oft_blocks": blocks}, W)[0]
    bounded = deltas.layer_delta({"oft_blocks": blocks, "alpha": torch.tensor(0.001)}, W)[0]
    assert bounded.norm() < free.norm() * 0.1


def test_boft_butterfly_is_orthogonal_and_mixes_blocks():
    rotations = rand(2, 4, 2, 2)            # 2 butterfly stages of 4 blocks of 2 on 8 outputs
    merged = W + deltas.layer_delta({"oft_blocks": rotations}, W)[0]
    torch.testing.assert_close(merged.norm(dim=0), W.norm(dim=0), rtol=1e-5, atol=1e-6)
    one_stage = W + deltas.layer_delta({"oft_blocks": rotations[:1]}, W)[0]
    assert not torch.allclose(merged, one_stage)


def test_glora_full_diff_and_bias():
    a1, a2, b1, b2 = rand(3, 6), rand(6, 3), rand(3, 6), rand(8, 3)
    parts = {"a1.weight": a1, "a2.weight": a2, "b1.weight": b1, "b2.weight": b2, "alpha": torch.tensor(1.5)}
    torch.testing.assert_close(deltas.layer_delta(parts, W)[0], (b2 @ b1 + W @ a2 @ a1) * 0.5)
    diff, diff_b = rand(8, 6), rand(8)
    delta, bias = deltas.layer_delta({"diff": diff, "diff_b": diff_b}, W)
    assert torch.equal(delta, diff) and torch.equal(bias, diff_b)


def test_locon_tucker_and_dylora_dim():
    conv = rand(8, 6, 3, 3, scale=1.0)
    down, mid, up = rand(4, 6, 1, 1), rand(4, 4, 3, 3), rand(8, 4, 1, 1)
    delta = deltas.layer_delta({"lora_down.weight": down, "lora_mid.weight": mid, "lora_up.weight": up}, conv)[0]
    expected = torch.einsum("or,rskl,si->oikl", up.flatten(1), mid, down.flatten(1))
    torch.testing.assert_close(delta, expected, rtol=1e-5, atol=1e-6)
    down, up = rand(4, 6), rand(8, 4)
    parts = {"lora_down.weight": down, "lora_up.weight": up, "alpha": torch.tensor(4.0)}
    torch.testing.assert_close(deltas.layer_delta(parts, W, dyn=2)[0], up[:, :2] @ down[:2])


def test_bad_shapes_and_nan_are_format_errors():
    with pytest.raises(deltas.NetworkFormatError):
        deltas.layer_delta({"lora_down.weight": rand(4, 7), "lora_up.weight": rand(8, 4)}, W)
    with pytest.raises(deltas.NetworkFormatError):
        deltas.layer_delta({"lora_down.weight": torch.full((4, 6), float("nan")), "lora_up.weight": rand(8, 4)}, W)


# --------------------------------------------------------------------------- key spellings


@pytest.fixture(scope="module")
def tiny_sd1():
    from tiny_models import build_components, tiny_configs

    return build_components(tiny_configs("sd1"))


LAYER = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
TE_LAYER = "encoder.layers.1.self_attn.v_proj"


@pytest.mark.parametrize("down, up", [
    (f"lora_unet_{LAYER.replace('.', '_')}.lora_down.weight", f"lora_unet_{LAYER.replace('.', '_')}.lora_up.weight"),
    (f"unet.{LAYER}.lora_A.weight", f"unet.{LAYER}.lora_B.weight"),                     # diffusers / PEFT
    (f"base_model.model.{LAYER}.lora_A.weight", f"base_model.model.{LAYER}.lora_B.weight"),   # PEFT raw save
    (f"unet.{LAYER}.lora.down.weight", f"unet.{LAYER}.lora.up.weight"),                 # diffusers, older
    (f"unet.{LAYER.replace('attn2.to_k', 'attn2.processor.to_k_lora')}.down.weight",
     f"unet.{LAYER.replace('attn2.to_k', 'attn2.processor.to_k_lora')}.up.weight"),      # attn-processor era
    (f"unet.{LAYER}.lora_down.weight", f"unet.{LAYER}.lora_up.weight"),                 # dotted kohya parts
    ("lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_k.lora_down.weight",
     "lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_k.lora_up.weight"),       # LDM names
])
def test_unet_key_spellings_name_the_same_layer(tiny_sd1, down, up):
    unet = tiny_sd1["unet"]
    index = LayerIndex({"unet": unet, "text_encoder": tiny_sd1["text_encoder"]}, unet.config)
    target = dict(unet.named_modules())[LAYER]
    groups, unknown = group_layers({down: rand(2, target.weight.shape[1]), up: rand(target.weight.shape[0], 2)})
    assert not unknown and len(groups) == 1
    assert index.resolve(next(iter(groups))) == LayerRef("unet", LAYER)


@pytest.mark.parametrize("key", [
    f"lora_te_text_model_{TE_LAYER.replace('.', '_')}.lora_down.weight",
    f"lora_te1_text_model_{TE_LAYER.replace('.', '_')}.lora_down.weight",
    f"text_encoder.text_model.{TE_LAYER}.lora_A.weight",
    f"text_encoder.text_model.{TE_LAYER.replace('v_proj', 'to_v_lora')}.down.weight",
    f"text_encoder.text_model.{TE_LAYER}.lora_linear_layer.down.weight",
])
def test_text_encoder_key_spellings(tiny_sd1, key):
    index = LayerIndex({"unet": tiny_sd1["unet"], "text_encoder": tiny_sd1["text_encoder"]})
    groups, unknown = group_layers({key: rand(2, 64)})
    assert not unknown
    assert index.resolve(next(iter(groups))) == LayerRef("text_encoder", TE_LAYER)


def test_merger_undoes_a_failed_network_and_keeps_the_good_one(tiny_sd1):
    unet = tiny_sd1["unet"]
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    merger = NetworkMerger({"unet": unet}, unet.config)
    flat = "lora_unet_" + LAYER.replace(".", "_")
    target = dict(unet.named_modules())[LAYER]
    out_dim, in_dim = target.weight.shape
    good = group_layers({f"{flat}.lora_down.weight": rand(2, in_dim), f"{flat}.lora_up.weight": rand(out_dim, 2)})[0]
    other = "lora_unet_" + LAYER.replace("to_k", "to_q").replace(".", "_")
    bad = group_layers({f"{other}.lora_down.weight": rand(2, in_dim + 1), f"{other}.lora_up.weight": rand(out_dim, 2),
                        f"{flat}.diff": rand(out_dim, in_dim)})[0]
    report = merger.apply([NetworkUse(NetworkWeights("bad", "bad", bad)), NetworkUse(NetworkWeights("good", "good", good))])
    assert report.outcomes[0].error and report.outcomes[0].layers == 0 and report.outcomes[1].layers == 1
    changed = [k for k, v in unet.state_dict().items() if not torch.equal(v, before[k])]
    assert changed == [LAYER + ".weight"]
    merger.restore()
    assert all(torch.equal(v, before[k]) for k, v in unet.state_dict().items())


# --------------------------------------------------------------------------- hypernetworks


def test_hypernetwork_file_loads_as_a1111_builds_it(tmp_path):
    import torch.nn.functional as F

    from lora_fixtures import hypernetwork
    from modules.engine.networks.hypernetwork import load_hypernetwork

    data = hypernetwork(tmp_path / "hn.pt", (8,))
    network = load_hypernetwork(tmp_path / "hn.pt")
    network.set_multiplier(0.5)
    x = rand(3, 8, scale=1.0)
    for which in (0, 1):
        sd = data[8][which]
        h = F.relu(F.linear(x, sd["linear.0.weight"], sd["linear.0.bias"]))
        h = F.layer_norm(h, (16,), sd["linear.2.weight"], sd["linear.2.bias"])   # dropout (3): off
        h = F.linear(h, sd["linear.4.weight"], sd["linear.4.bias"])
        h = F.layer_norm(h, (8,), sd["linear.5.weight"], sd["linear.5.bias"])
        torch.testing.assert_close(network.layers[8][which](x), x + h * 0.5)


def test_hostile_hypernetwork_is_refused(tmp_path):
    import os
    import pickle

    from modules.engine.networks.hypernetwork import load_hypernetwork
    from modules.models.weights_io import UnsafeCheckpointError

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    with open(tmp_path / "evil.pt", "wb") as fh:
        pickle.dump({768: [Evil(), {}]}, fh, protocol=2)
    with pytest.raises(UnsafeCheckpointError):
        load_hypernetwork(tmp_path / "evil.pt")
    assert not (tmp_path / "pwned").exists()

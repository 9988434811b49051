"""LyCORIS/kohya norm-layer parts under LDM (A1111/SGM) names: ``w_norm``/``b_norm`` and ``diff``/``diff_b`` on
GroupNorm and LayerNorm layers (``lora_unet_input_blocks_1_0_in_layers_0.w_norm``, ``..._norm1.w_norm``,
``lora_unet_out_0.diff``). No library loads these parts, so the files follow LyCORIS' part names and kohya's LDM
prefixes (the LDM names come from the test suite's own diffusers -> LDM converter, tiny_models.unet_to_ldm).
Checked: every key lands on its diffusers layer, weight/bias += multiplier * stored change, the restore is
exact, and keys that name nothing are warned about."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lora_fixtures import ldm_unet_names, save
from modules.core.pipeline import Txt2ImgParams
from test_processing import make_services

SMALL = dict(width=64, height=64, steps=3, cfg_scale=7.0, seed=11)
NORMS = (torch.nn.GroupNorm, torch.nn.LayerNorm)


def norm_file(unet: torch.nn.Module, text_encoder: torch.nn.Module | None, *, seed: int = 0):
    """{key: tensor} of a LyCORIS file that changes every UNet norm (LDM names; ``out_0`` and one resnet norm as
    ``diff``/``diff_b``, the rest ``w_norm``/``b_norm``) and a text-encoder LayerNorm; {key: diffusers module}."""
    gen = torch.Generator().manual_seed(seed)
    sd, targets = {}, {}
    ldm = ldm_unet_names(unet)
    modules = dict(unet.named_modules())
    as_diff = {"out.0", "input_blocks.1.0.out_layers.0"}
    for name, ldm_name in ldm.items():
        module = modules.get(name)
        if not isinstance(module, NORMS):
            continue
        prefix = "lora_unet_" + ldm_name.replace(".", "_")
        w_part, b_part = ("diff", "diff_b") if ldm_name in as_diff else ("w_norm", "b_norm")
        sd[f"{prefix}.{w_part}"] = torch.randn(module.weight.shape, generator=gen) * 0.2
        sd[f"{prefix}.{b_part}"] = torch.randn(module.bias.shape, generator=gen) * 0.2
        targets[prefix] = module
    if text_encoder is not None:
        layer = dict(text_encoder.named_modules())
        name = next(n for n in layer if n.endswith("layers.0.layer_norm1"))
        prefix = "lora_te_text_model_encoder_layers_0_layer_norm1"
        sd[f"{prefix}.w_norm"] = torch.randn(layer[name].weight.shape, generator=gen) * 0.2
        sd[f"{prefix}.b_norm"] = torch.randn(layer[name].bias.shape, generator=gen) * 0.2
        targets[prefix] = layer[name]
    return sd, targets


def check_merge(components: dict, unet_config, sd: dict, targets: dict) -> None:
    """Merged at 0.5: each norm's weight/bias moved by exactly half its stored change; restored bit for bit."""
    from modules.engine.networks.keys import group_layers
    from modules.engine.networks.merge import NetworkMerger, NetworkUse, NetworkWeights

    assert all(isinstance(m, NORMS) for m in targets.values())
    assert {m for m in targets.values() if isinstance(m, torch.nn.GroupNorm)} >= {
        m for m in components["unet"].modules() if isinstance(m, torch.nn.GroupNorm)}   # every GroupNorm
    before = {p: (m.weight.detach().clone(), m.bias.detach().clone()) for p, m in targets.items()}
    groups, unknown = group_layers(sd)
    assert unknown == []
    merger = NetworkMerger(components, unet_config)
    report = merger.apply([NetworkUse(NetworkWeights(key="norms", name="norms", groups=groups), te=0.5, unet=0.5)])
    outcome = report.outcomes[0]
    assert outcome.unmatched == [] and outcome.error is None and outcome.layers == len(targets)
    for prefix, module in targets.items():
        w_part = "diff" if f"{prefix}.diff" in sd else "w_norm"
        b_part = "diff_b" if w_part == "diff" else "b_norm"
        w0, b0 = before[prefix]
        torch.testing.assert_close(module.weight.detach(), w0 + 0.5 * sd[f"{prefix}.{w_part}"], rtol=0, atol=1e-6)
        torch.testing.assert_close(module.bias.detach(), b0 + 0.5 * sd[f"{prefix}.{b_part}"], rtol=0, atol=1e-6)
    merger.apply([])
    for prefix, module in targets.items():
        assert torch.equal(module.weight, before[prefix][0]) and torch.equal(module.bias, before[prefix][1])


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_ldm_named_norm_parts_land_on_their_diffusers_layers(family):
    from tiny_models import build_components, tiny_configs

    components = build_components(tiny_configs(family))
    pipe_parts = {k: components[k] for k in ("unet", "text_encoder") if k in components}
    te = components["text_encoder"] if family == "sd1" else None
    sd, targets = norm_file(components["unet"], te)
    assert "lora_unet_input_blocks_1_0_in_layers_0.w_norm" in sd and "lora_unet_out_0.diff" in sd
    assert any(k.endswith("_transformer_blocks_0_norm1.w_norm") for k in sd)   # LayerNorms too
    check_merge(pipe_parts, components["unet"].config, sd, targets)


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    services = make_services(tmp_path_factory.mktemp("lora-norms"), "sd1")
    pipe = services.models.current().pipe
    sd, _ = norm_file(pipe.unet, pipe.text_encoder, seed=1)
    lora_dir = services.paths.lora_dir
    save(lora_dir / "norms.safetensors", sd, {"ss_network_module": "lycoris.kohya", "ss_base_model_version": "sd_v1"})
    save(lora_dir / "partly.safetensors", {
        **{k: v for k, v in sd.items() if "input_blocks_1_0" in k},
        "lora_unet_input_blocks_99_0_in_layers_0.w_norm": torch.ones(32),      # names no layer
        "lora_unet_input_blocks_1_0_in_layers_0.w_weird": torch.ones(32),      # no part this program knows
    })
    yield services
    services.generation.queue.shutdown()


def pixels(result) -> np.ndarray:
    return np.asarray(result.images[0].convert("RGB"), dtype=np.int16)


def run(services, prompt: str):
    return services.generation.txt2img(Txt2ImgParams(prompt=prompt, **SMALL))


def test_a_norm_network_changes_the_image_and_the_restore_is_exact(sd1):
    unet = sd1.models.current().pipe.unet
    fresh = {k: v.clone() for k, v in unet.state_dict().items()}
    base = run(sd1, "a cat")
    changed = run(sd1, "a cat <lora:norms:1>")
    assert not changed.comments, changed.comments
    assert not np.array_equal(pixels(base), pixels(changed))
    assert np.array_equal(pixels(base), pixels(run(sd1, "a cat <lora:norms:0>")))
    assert np.array_equal(pixels(base), pixels(run(sd1, "a cat")))
    assert all(torch.equal(v, fresh[k]) for k, v in unet.state_dict().items())


def test_keys_that_name_no_layer_or_no_known_part_are_warned_about(sd1):
    result = run(sd1, "a cat <lora:partly:1>")
    assert "1 of 3 layers did not match" in result.comments and "input_blocks_99_0_in_layers_0" in result.comments
    assert "tensors of a kind this program does not know" in result.comments and "w_weird" in result.comments
    again = run(sd1, "a cat <lora:partly:1>")   # the same set again: still reported
    assert "w_weird" in again.comments

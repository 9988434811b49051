"""A tiny SD2 depth checkpoint that carries its own MiDaS DPT-Hybrid, in the real layout.

Stability's 512-depth-ema.ckpt stores the MiDaS estimator under ``depth_model.model.*`` with timm's
names (tests/midas_dpt_hybrid_keys.txt lists them, as ldm's code makes them). timm is not installed
here, so the tiny estimator is a transformers DPTForDepthEstimation (is_hybrid, BiT backbone) written
back into that layout by inverting modules/models/midas_embedded.py's mapping. It keeps the real
key set (12 ViT blocks, BiT stages of 3/4/9 blocks) at tiny widths, so its names equal the real file's.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from modules.models import midas_embedded

KEY_LIST = Path(__file__).with_name("midas_dpt_hybrid_keys.txt")
IMAGE_SIZE = 64


def real_layout() -> dict[str, tuple[int, ...]]:
    """{name: shape} of a real 512-depth-ema.ckpt's depth_model.* tensors."""
    rows = [line.split("\t") for line in KEY_LIST.read_text(encoding="utf-8").splitlines()
            if line and not line.startswith("#")]
    return {name: tuple(json.loads(shape)) for name, shape in rows}


def tiny_config() -> dict:
    """The shipped DPT-Hybrid config at tiny widths (12 heads of width 2; BiT channels multiples of its
    32 norm groups)."""
    cfg = midas_embedded.shipped_config()
    bit = cfg["backbone_config"]
    bit = dict(bit, embedding_size=32, hidden_sizes=[128, 128, 128] + bit["hidden_sizes"][3:])  # 3 stages run
    grid = IMAGE_SIZE // cfg["patch_size"]
    cfg.update(hidden_size=24, intermediate_size=48, image_size=IMAGE_SIZE, backbone_config=bit,
               backbone_featmap_shape=[1, 128, grid, grid], neck_hidden_sizes=[128, 128, 24, 24],
               fusion_hidden_size=16)
    return cfg


def make_tiny_dpt_hybrid(seed: int = 0):
    """A random tiny DPTForDepthEstimation (hybrid) whose depth varies with the image."""
    from transformers import DPTConfig, DPTForDepthEstimation

    torch.manual_seed(seed)
    model = DPTForDepthEstimation(DPTConfig.from_dict(tiny_config())).eval()
    with torch.no_grad():  # random heads end in a ReLU that zeroes almost everything; make the depth vary
        model.head.head[4].bias.fill_(1.0)
        model.head.head[4].weight.normal_(0.0, 1.0)
    return model


def to_midas_layout(model) -> dict[str, torch.Tensor]:
    """The model's weights under the real checkpoint's depth_model.model.* names (the inverse of
    midas_embedded.transformers_names over the real key list; qkv re-fused from query/key/value)."""
    hf = {k: v.detach().clone() for k, v in model.state_dict().items()}
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for name in real_layout():
        short = name.removeprefix(midas_embedded.MODEL_PREFIX)
        targets = midas_embedded.transformers_names(short)
        assert targets is not None, name
        if not targets:  # timm's ImageNet classifier, unused by MiDaS: the real file has it, so keep it
            width = hf["dpt.layernorm.weight"].shape[0]
            out[name] = torch.randn((1000, width) if name.endswith("weight") else (1000,)) * 0.02
            continue
        out[name] = torch.cat([hf[t] for t in targets]) if len(targets) == 3 else hf[targets[0]]
        used.update(targets)
    assert used == set(hf), f"not written: {sorted(set(hf) - used)[:5]}"
    return {k: v.contiguous() for k, v in out.items()}


def make_depth_checkpoint(path: Path, *, midas: dict[str, torch.Tensor] | None, seed: int = 0,
                          fmt: str = "safetensors") -> Path:
    """A tiny SD2 depth checkpoint (+ v2-midas yaml sidecar) whose depth_model.* is `midas` (None: no
    depth_model keys at all)."""
    from tiny_models import _save, make_checkpoint

    ckpt = make_checkpoint(Path(path), "sd2-depth", yaml=True, seed=seed, fmt=fmt)
    sd = {k: v for k, v in ckpt.ldm_state_dict.items() if not k.startswith(midas_embedded.PREFIX)}
    sd.update(midas or {})
    _save(sd, Path(path), fmt)
    return Path(path)

"""Tiny LoRA / LyCORIS / hypernetwork files in the real on-disk layouts, for the tiny checkpoints.

Layer names come from the loaded tiny model itself: kohya files name UNet layers by diffusers' name
(SD1/SD2, as sd-scripts trains them) or by the LDM name (SDXL: ``input_blocks_4_1_...``, the inverse of
diffusers' own LDM conversion, tests/tiny_models.unet_to_ldm), text encoders by transformers' CLIP
names (``lora_te_text_model_encoder_layers_0_self_attn_q_proj``); PEFT files use diffusers' dotted
names with ``lora_A``/``lora_B``.
"""
from __future__ import annotations

import re
from pathlib import Path

import safetensors.torch
import torch

from tiny_models import unet_to_ldm

ATTN_UNET = re.compile(r"(attn[12]\.to_(q|k|v|out\.0)|ff\.net\.(0\.proj|2)|proj_(in|out))$")
ATTN_TE = re.compile(r"(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])$")
CONV_UNET = re.compile(r"resnets\.\d+\.conv[12]$")


def layers(module: torch.nn.Module, pattern: re.Pattern, kind=torch.nn.Linear) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in module.named_modules() if isinstance(m, kind) and pattern.search(n)}


def te_name(name: str) -> str:
    """transformers >= 5.6 flattened CLIPTextModel; kohya/PEFT files keep ``text_model.``."""
    return name if name.startswith("text_model.") else "text_model." + name


def ldm_unet_names(unet: torch.nn.Module) -> dict[str, str]:
    """diffusers module name -> LDM module name, through the test suite's diffusers -> LDM converter."""
    sd = {k: v for k, v in unet.state_dict().items() if k.endswith(".weight")}
    inverse = {id(v): k for k, v in sd.items()}
    return {inverse[id(v)][:-7]: k[:-7] for k, v in unet_to_ldm(sd, dict(unet.config)).items()}


def _pair(module: torch.nn.Module, rank: int, gen: torch.Generator, scale: float = 0.05):
    w = module.weight
    if w.dim() == 4:
        down = torch.randn(rank, w.shape[1], *w.shape[2:], generator=gen) * scale
        up = torch.randn(w.shape[0], rank, 1, 1, generator=gen) * scale
    else:
        down = torch.randn(rank, w.shape[1], generator=gen) * scale
        up = torch.randn(w.shape[0], rank, generator=gen) * scale
    return down, up


def kohya_targets(pipe, *, sdxl: bool, conv: bool = False, te: bool = True) -> dict[str, torch.nn.Module]:
    """{kohya prefix: module} for the attention/ff layers (and resnet convs for LoCon) of `pipe`."""
    out = {}
    unet_names = ldm_unet_names(pipe.unet) if sdxl else None
    unet_layers = layers(pipe.unet, ATTN_UNET)
    if conv:
        unet_layers.update(layers(pipe.unet, CONV_UNET, torch.nn.Conv2d))
    for name, module in unet_layers.items():
        flat = (unet_names[name] if sdxl else name).replace(".", "_")
        out[f"lora_unet_{flat}"] = module
    if te:
        encoders = [("lora_te1_", pipe.text_encoder), ("lora_te2_", pipe.text_encoder_2)] if sdxl else \
            [("lora_te_", pipe.text_encoder)]
        for prefix, encoder in encoders:
            for name, module in layers(encoder, ATTN_TE).items():
                out[prefix + te_name(name).replace(".", "_")] = module
    return out


def kohya_lora(path: Path, pipe, *, sdxl: bool = False, rank: int = 4, alpha: float = 2.0, conv: bool = False,
               te: bool = True, dora: bool = False, seed: int = 0, metadata: dict | None = None,
               dtype: torch.dtype = torch.float32) -> dict:
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for prefix, module in kohya_targets(pipe, sdxl=sdxl, conv=conv, te=te).items():
        down, up = _pair(module, rank, gen)
        sd[f"{prefix}.lora_down.weight"], sd[f"{prefix}.lora_up.weight"] = down, up
        sd[f"{prefix}.alpha"] = torch.tensor(float(alpha))
        if dora:   # kohya/LyCORIS DoRA: magnitude per output row, shape [out, 1]
            w = module.weight.detach().float()
            sd[f"{prefix}.dora_scale"] = w.reshape(w.shape[0], -1).norm(dim=1, keepdim=True) * (
                1 + 0.1 * torch.rand(w.shape[0], 1, generator=gen))
    sd = {k: v.to(dtype) for k, v in sd.items()}
    save(path, sd, metadata)
    return sd


def peft_lora(path: Path, pipe, *, rank: int = 4, seed: int = 0, te: bool = True) -> dict:
    """diffusers' own save layout: ``unet.<name>.lora_A.weight`` / ``text_encoder.<name>.lora_B.weight``."""
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for name, module in layers(pipe.unet, ATTN_UNET).items():
        down, up = _pair(module, rank, gen)
        sd[f"unet.{name}.lora_A.weight"], sd[f"unet.{name}.lora_B.weight"] = down, up
    if te:
        for name, module in layers(pipe.text_encoder, ATTN_TE).items():
            down, up = _pair(module, rank, gen)
            sd[f"text_encoder.{te_name(name)}.lora_A.weight"] = down
            sd[f"text_encoder.{te_name(name)}.lora_B.weight"] = up
    save(path, sd)
    return sd


def lycoris(path: Path, pipe, kind: str, *, rank: int = 4, alpha: float = 2.0, seed: int = 0) -> dict:
    """LoHa (``hada_*``) or LoKr (``lokr_*``) on the SD1 UNet's attention layers, kohya names."""
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for prefix, module in kohya_targets(pipe, sdxl=False, te=False).items():
        out_dim, in_dim = module.weight.shape[:2]
        if kind == "loha":
            for i in (1, 2):
                sd[f"{prefix}.hada_w{i}_a"] = torch.randn(out_dim, rank, generator=gen) * 0.2
                sd[f"{prefix}.hada_w{i}_b"] = torch.randn(rank, in_dim, generator=gen) * 0.2
        elif kind == "lokr":
            f = 2 if out_dim % 2 == 0 and in_dim % 2 == 0 else 1
            sd[f"{prefix}.lokr_w1"] = torch.randn(f, f, generator=gen) * 0.3
            sd[f"{prefix}.lokr_w2_a"] = torch.randn(out_dim // f, rank, generator=gen) * 0.1
            sd[f"{prefix}.lokr_w2_b"] = torch.randn(rank, in_dim // f, generator=gen) * 0.1
        else:
            raise ValueError(kind)
        sd[f"{prefix}.alpha"] = torch.tensor(float(alpha))
    save(path, sd)
    return sd


def save(path: Path, sd: dict, metadata: dict | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        safetensors.torch.save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata=metadata)
    else:
        torch.save(sd, path)


def hypernetwork(path: Path, widths: tuple[int, ...], *, seed: int = 0, layer_norm: bool = True,
                 activation: str = "relu", dropout: bool = True) -> dict:
    """An A1111 hypernetwork ``.pt``: int width -> [key MLP state dict, value MLP state dict]."""
    gen = torch.Generator().manual_seed(seed)
    data: dict = {"layer_structure": [1, 2, 1], "activation_func": activation, "is_layer_norm": layer_norm,
                  "weight_initialization": "Normal", "use_dropout": dropout, "last_layer_dropout": False,
                  "activate_output": False, "dropout_structure": [0, 0.3, 0] if dropout else [0, 0, 0],
                  "name": path.stem, "step": 10, "sd_checkpoint": "0123456789", "sd_checkpoint_name": "tiny"}
    for width in widths:
        pair = []
        for _ in range(2):
            sd = {}
            index = 0
            for a, b in ((width, 2 * width), (2 * width, width)):
                sd[f"linear.{index}.weight"] = torch.randn(b, a, generator=gen) * 0.2
                sd[f"linear.{index}.bias"] = torch.randn(b, generator=gen) * 0.2
                index += 1
                if index == 1:                     # relu after the first layer only (activate_output False)
                    index += 1
                if layer_norm:
                    sd[f"linear.{index}.weight"] = 1 + torch.randn(b, generator=gen) * 0.1
                    sd[f"linear.{index}.bias"] = torch.randn(b, generator=gen) * 0.1
                    index += 1
                if dropout and b == 2 * width:
                    index += 1                     # the dropout module's slot
            pair.append(sd)
        data[width] = pair
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(data, path)
    return data


def peft_dora(path: Path, pipe, *, rank: int = 4, seed: int = 0) -> dict:
    """PEFT DoRA on the UNet: ``lora_A``/``lora_B`` plus ``lora_magnitude_vector`` (one magnitude per output)."""
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for name, module in layers(pipe.unet, ATTN_UNET).items():
        down, up = _pair(module, rank, gen)
        w = module.weight.detach().float()
        sd[f"unet.{name}.lora_A.weight"], sd[f"unet.{name}.lora_B.weight"] = down, up
        sd[f"unet.{name}.lora_magnitude_vector"] = w.reshape(w.shape[0], -1).norm(dim=1) * (
            1 + 0.1 * torch.rand(w.shape[0], generator=gen))
    save(path, sd)
    return sd


def two_kohya_loras(root: Path):
    """Tiny SD1 UNet + text encoder and two kohya files beside them (a: fp16; b: with LoCon conv layers)."""
    from types import SimpleNamespace

    from tiny_models import build_components, tiny_configs

    parts = build_components(tiny_configs("sd1"))
    pipe = SimpleNamespace(unet=parts["unet"], text_encoder=parts["text_encoder"])
    kohya_lora(root / "a.safetensors", pipe, rank=4, alpha=2.0, seed=1, dtype=torch.float16)
    kohya_lora(root / "b.safetensors", pipe, rank=4, alpha=3.0, seed=2, conv=True)
    return SimpleNamespace(pipe=pipe, root=root)


def components(pipe) -> dict[str, torch.nn.Module]:
    return {"unet": pipe.unet, "text_encoder": pipe.text_encoder}


def snapshot(pipe) -> dict[str, torch.Tensor]:
    return {f"{c}.{k}": v.detach().clone() for c, m in components(pipe).items() for k, v in m.state_dict().items()}


def network_weights(root: Path, name: str, *, general: bool = False):
    """``root/name.safetensors`` parsed as the merger takes it; ``general``: no prepared layers, so every
    layer takes the general float32 path."""
    from modules.engine.networks.keys import group_layers
    from modules.engine.networks.merge import NetworkWeights

    weights = NetworkWeights(key=name, name=name, groups=group_layers(safetensors.torch.load_file(str(root / f"{name}.safetensors")))[0])
    if general:
        weights._plain = {}
    return weights

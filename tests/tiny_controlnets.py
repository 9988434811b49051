"""Tiny seeded-random ControlNets in the real on-disk layouts, for the tiny checkpoints of tiny_models.

* ``layout="ldm"``: lllyasviel's single file (``input_blocks``, ``zero_convs``, ``input_hint_block``,
  ``middle_block_out``), written by inverting diffusers' own LDM -> diffusers ControlNet conversion;
  ``prefixed=True`` puts it under ``control_model.`` as ControlNet v1.0 files do.
* ``layout="diffusers"``: ``ControlNetModel.state_dict()`` as diffusers saves it.

The zero convolutions are jittered like every other tensor, so a unit visibly changes the image.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from tiny_models import tiny_configs, unet_to_ldm

TINY_COND_CHANNELS = (16, 32, 96, 256)   # controlnet_cond_embedding widths: the real ones (LDM files fix conv_out at input_hint_block.14)


@dataclass
class TinyControlNet:
    path: Path
    family: str
    config_dir: Path                 # a diffusers config dir (config.json) for from_single_file
    diffusers_state_dict: dict
    config: dict


def build_controlnet(family: str, seed: int = 0):
    from diffusers import ControlNetModel, UNet2DConditionModel

    unet_cfg = {k: v for k, v in tiny_configs(family)["unet"].items() if not k.startswith("_")}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 500)
        unet = UNet2DConditionModel.from_config(unet_cfg)
        cn = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=TINY_COND_CHANNELS)
        with torch.no_grad():
            for p in cn.parameters():
                p.add_(torch.randn_like(p) * 0.05)
    return cn.eval()


def controlnet_to_ldm(sd: dict, config: dict) -> dict:
    """diffusers ControlNetModel names -> lllyasviel's, the inverse of convert_controlnet_checkpoint."""
    out, unet_part = {}, {}
    n_blocks = len(config["conditioning_embedding_out_channels"]) * 2 - 2
    for k, v in sd.items():
        if m := re.match(r"controlnet_down_blocks\.(\d+)\.(weight|bias)$", k):
            out[f"zero_convs.{m[1]}.0.{m[2]}"] = v
        elif m := re.match(r"controlnet_mid_block\.(weight|bias)$", k):
            out[f"middle_block_out.0.{m[1]}"] = v
        elif m := re.match(r"controlnet_cond_embedding\.conv_in\.(weight|bias)$", k):
            out[f"input_hint_block.0.{m[1]}"] = v
        elif m := re.match(r"controlnet_cond_embedding\.blocks\.(\d+)\.(weight|bias)$", k):
            out[f"input_hint_block.{2 * (int(m[1]) + 1)}.{m[2]}"] = v
        elif m := re.match(r"controlnet_cond_embedding\.conv_out\.(weight|bias)$", k):
            out[f"input_hint_block.{2 * (n_blocks + 1)}.{m[1]}"] = v
        else:
            unet_part[k] = v
    out.update(unet_to_ldm(unet_part, {**config, "up_block_types": []}))
    return out


def make_controlnet(path, family: str = "sd1", *, layout: str = "ldm", prefixed: bool = False, seed: int = 0,
                    fmt: str | None = None) -> TinyControlNet:
    """Write it at `path`: safetensors, or torch.save for .pth/.pt (fmt: from the suffix when not given)."""
    path = Path(path)
    fmt = fmt or ("safetensors" if path.suffix == ".safetensors" else "pth")
    path.parent.mkdir(parents=True, exist_ok=True)
    cn = build_controlnet(family, seed)
    dsd = {k: v.detach().clone().contiguous() for k, v in cn.state_dict().items()}
    config = dict(cn.config)
    if layout == "ldm":
        sd = controlnet_to_ldm(dsd, config)
        if prefixed:
            sd = {"control_model." + k: v for k, v in sd.items()}
    else:
        sd = dict(dsd)
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(sd, str(path))
    else:
        torch.save(sd, str(path))
    config_dir = path.parent / f"{path.stem}.tiny-config"
    config_dir.mkdir(exist_ok=True)
    clean = {k: (list(v) if isinstance(v, tuple) else v) for k, v in config.items() if not k.startswith("_")}
    (config_dir / "config.json").write_text(json.dumps({"_class_name": "ControlNetModel", **clean}, indent=2))
    return TinyControlNet(path=path, family=family, config_dir=config_dir, diffusers_state_dict=dsd, config=config)


def adapter_to_original(sd: dict, num_res_blocks: int) -> dict:
    """diffusers T2IAdapter names -> TencentARC's full adapter names (the inverse of our loader's mapping)."""
    out = {}
    for k, v in sd.items():
        k = k.removeprefix("adapter.")
        if m := re.match(r"body\.(\d+)\.resnets\.(\d+)\.(.+)$", k):
            k = f"body.{int(m[1]) * num_res_blocks + int(m[2])}.{m[3]}"
        elif m := re.match(r"body\.(\d+)\.in_conv\.(.+)$", k):
            k = f"body.{int(m[1]) * num_res_blocks}.in_conv.{m[2]}"
        out[k] = v
    return out


def make_t2i_adapter(path, family: str = "sd1", *, layout: str = "original", in_channels: int = 3,
                     seed: int = 0) -> TinyControlNet:
    """A tiny full T2I-Adapter matching the tiny UNet's block widths (original TencentARC names, or diffusers').
    SDXL: diffusers' ``full_adapter_xl`` (16x pixel unshuffle), in the diffusers layout TencentARC published
    the SDXL adapters in; a path named ``diffusion_pytorch_model.safetensors`` gets its ``config.json`` beside it
    (the folder as on the hub)."""
    from diffusers import T2IAdapter

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    channels = tiny_configs(family)["unet"]["block_out_channels"]
    xl = family == "sdxl"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 700)
        adapter = T2IAdapter(in_channels=in_channels, channels=list(channels), num_res_blocks=2,
                             downscale_factor=16 if xl else 8, adapter_type="full_adapter_xl" if xl else "full_adapter")
        with torch.no_grad():
            for p in adapter.parameters():
                p.add_(torch.randn_like(p) * 0.05)
    dsd = {k: v.detach().clone().contiguous() for k, v in adapter.state_dict().items()}
    if xl and layout != "diffusers":
        raise ValueError("SDXL T2I-Adapters exist in the diffusers layout only")
    sd = dsd if layout == "diffusers" else adapter_to_original(dsd, 2)
    if path.name == "diffusion_pytorch_model.safetensors":
        adapter.save_config(str(path.parent))
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(sd, str(path))
    else:
        torch.save(sd, str(path))
    return TinyControlNet(path=path, family=family, config_dir=path.parent, diffusers_state_dict=dsd,
                          config=dict(adapter.config))


CONTROL_LORA_LAYERS = re.compile(r"(input_blocks|middle_block)\..*\.(to_q|to_k|to_v|to_out\.0|ff\.net\.0\.proj|ff\.net\.2|"
                                 r"proj_in|proj_out|in_layers\.2|out_layers\.3)\.weight$")


def make_control_lora(path, family: str = "sd1", *, base_unet_sd: dict, rank: int = 4, seed: int = 0) -> dict:
    """A tiny control-LoRA in Stability's layout: LDM names, ``<layer>.up`` / ``<layer>.down`` factors for the
    UNet copy's attention, feed-forward and resnet-conv weights (conv ``up`` factors are 1x1), every other tensor
    (norms, biases, time embedding, hint block, zero convs) in full, and the ``lora_controlnet`` marker.
    `base_unet_sd`: the diffusers state dict of the checkpoint's UNet it is made for. Returns the file's dict."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cfg = {k: v for k, v in tiny_configs(family)["unet"].items() if not k.startswith("_")}
    unet = UNet2DConditionModel.from_config(cfg)
    unet.load_state_dict(base_unet_sd)
    gen = torch.Generator().manual_seed(seed + 900)
    cn = ControlNetModel.from_unet(unet)
    with torch.no_grad():
        for p in cn.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    sd = {"lora_controlnet": torch.tensor([])}
    for k, v in controlnet_to_ldm(cn.state_dict(), dict(cn.config)).items():
        if CONTROL_LORA_LAYERS.match(k):
            base = k[:-len(".weight")]
            sd[base + ".up"] = torch.randn(v.shape[0], rank, *((1, 1) if v.ndim == 4 else ()), generator=gen) * 0.1
            sd[base + ".down"] = torch.randn(rank, *v.shape[1:], generator=gen) * 0.1
        else:
            sd[k] = v.detach().clone().contiguous()
    from safetensors.torch import save_file

    save_file(sd, str(path))
    return sd

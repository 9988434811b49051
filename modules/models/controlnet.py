"""ControlNet files -> diffusers ``ControlNetModel``, offline, by assignment (as ``loader`` does for UNets).

Layouts read (all through ``weights_io``, so ``.pth`` files are never fully unpickled):

* lllyasviel's single file (ControlNet v1.0 / v1.1): ``input_blocks.*``, ``zero_convs.*``,
  ``input_hint_block.*``, ``middle_block_out.*``, with or without the ``control_model.`` prefix
  (v1.0 files also carry a whole SD model beside it: only ``control_model.*`` is read);
* the diffusers layout (``controlnet_cond_embedding.*``, ``controlnet_down_blocks.*``);
* Stability's control-LoRAs (``lora_controlnet``): diffusers builds the ControlNet from the
  checkpoint's own UNet (``ControlNetModel.from_unet``) and applies the file with
  ``load_lora_adapter`` (peft); the LoRA is then fused, so it runs as a plain ControlNet;
* T2I-Adapters (diffusers ``T2IAdapter``): TencentARC's original full adapters (``conv_in``,
  ``body.N.block1``...) and the diffusers layout (``adapter.body.N.resnets.M``...), SD1 (8x pixel
  unshuffle) and SDXL (16x, ``full_adapter_xl``).

The family (SD1 / SD2 / SDXL) and every width come from the tensor names and shapes; the rest of
the config from the shipped ``configs/controlnet/<family>/config.json``. Nothing reaches a hub.
"""
from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from modules.models.weights_io import CheckpointLoadError

Shapes = Mapping[str, tuple[int, ...]]

CONFIG_ROOT = Path(__file__).resolve().parents[2] / "configs" / "controlnet"
LDM_PREFIX = "control_model."
FAMILY_LABELS = {"sd1": "SD1.5", "sd2": "SD2.x", "sdxl": "SDXL"}

__all__ = ["ControlNetSpec", "ControlNetFamilyMismatch", "detect_controlnet", "load_controlnet",
           "controlnet_config", "ldm_to_diffusers_keys", "check_compatible"]


class ControlNetFamilyMismatch(ValueError):
    """A ControlNet for one family used with a checkpoint of another."""


@dataclass(frozen=True)
class ControlNetSpec:
    kind: str                 # "controlnet" | "t2i_adapter" | "control_lora"
    layout: str               # "ldm" | "diffusers" | "original" (TencentARC's adapter names)
    family: str               # "sd1" | "sd2" | "sdxl"
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def family_label(self) -> str:
        return FAMILY_LABELS.get(self.family, self.family)


def _has(shapes: Shapes, *prefixes: str) -> bool:
    return any(k.startswith(prefixes) for k in shapes)


def _strip_ldm_prefix(shapes: Mapping[str, Any]) -> dict[str, Any]:
    """v1.0 files: the ControlNet under ``control_model.``, the SD model beside it (dropped)."""
    if not _has(shapes, LDM_PREFIX):
        return dict(shapes)
    return {k[len(LDM_PREFIX):]: v for k, v in shapes.items() if k.startswith(LDM_PREFIX)}


def _layout(shapes: Shapes) -> str:
    if "lora_controlnet" in shapes:
        return "control-lora"
    if "controlnet_cond_embedding.conv_in.weight" in shapes:
        return "diffusers"
    if "input_hint_block.0.weight" in shapes and "zero_convs.0.0.weight" in shapes:
        return "ldm"
    if "adapter.conv_in.weight" in shapes:
        return "adapter-diffusers"
    if "conv_in.weight" in shapes and "body.0.block1.weight" in shapes:
        if _has(shapes, "body.0.skep."):
            raise CheckpointLoadError("", "a T2I-Adapter with skip convolutions (sk=False): diffusers' T2IAdapter "
                                          "has no class for it, so it is not supported")
        return "adapter-original"
    if "conv_in.weight" in shapes and _has(shapes, "body."):
        raise CheckpointLoadError("", "a T2I-Adapter of a kind diffusers has no class for (style/light adapter): "
                                      "not supported")
    if any(k.endswith(".up") for k in shapes):
        raise CheckpointLoadError("", "a LoRA-style ControlNet without the 'lora_controlnet' marker: not supported")
    raise CheckpointLoadError("", "not a ControlNet model (no input_hint_block / controlnet_cond_embedding)")


# ---------------------------------------------------------------- LDM -> diffusers names


def _ldm_layers_per_block(shapes: Shapes) -> int:
    """The first downsampler sits at input block layers_per_block + 1."""
    ops = sorted(int(m[1]) for k in shapes if (m := re.match(r"input_blocks\.(\d+)\.0\.op\.weight$", k)))
    if ops:
        return ops[0] - 1
    return max(int(m[1]) for k in shapes if (m := re.match(r"input_blocks\.(\d+)\.", k)))


def ldm_to_diffusers_keys(sd: dict[str, Any]) -> dict[str, Any]:
    """lllyasviel layout (no prefix) -> diffusers ControlNetModel names, with diffusers' own converter;
    SDXL's ``label_emb`` (which that converter leaves out) is mapped here."""
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

    out = convert_controlnet_checkpoint(sd, {"layers_per_block": _ldm_layers_per_block(sd)})
    for src, dst in (("label_emb.0.0", "add_embedding.linear_1"), ("label_emb.0.2", "add_embedding.linear_2")):
        for p in ("weight", "bias"):
            if f"{src}.{p}" in sd:
                out[f"{dst}.{p}"] = sd[f"{src}.{p}"]
    return {k: v for k, v in out.items() if v is not None}


# ---------------------------------------------------------------- config from shapes


def _count(shapes: Shapes, pattern: str) -> int:
    found = {m[1] for k in shapes if (m := re.match(pattern, k))}
    return len(found)


def _family_of(shapes: Shapes) -> str:
    if "add_embedding.linear_1.weight" in shapes:
        return "sdxl"
    proj = next((s for k, s in shapes.items() if k.endswith("attentions.0.proj_in.weight")), None)
    return "sd2" if proj is not None and len(proj) == 2 else "sd1"


def controlnet_config(shapes: Shapes) -> tuple[str, dict[str, Any]]:
    """(family, diffusers config) for a state dict in diffusers names."""
    family = _family_of(shapes)
    cfg = json.loads((CONFIG_ROOT / family / "config.json").read_text(encoding="utf-8"))
    levels = _count(shapes, r"down_blocks\.(\d+)\.")
    boc = [shapes[f"down_blocks.{b}.resnets.0.conv1.weight"][0] for b in range(levels)]
    cfg["block_out_channels"] = boc
    cfg["layers_per_block"] = _count(shapes, r"down_blocks\.0\.resnets\.(\d+)\.")
    has_attn = [f"down_blocks.{b}.attentions.0.proj_in.weight" in shapes for b in range(levels)]
    cfg["down_block_types"] = ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in has_attn]
    first = has_attn.index(True) if any(has_attn) else None
    if first is not None:
        cfg["cross_attention_dim"] = shapes[f"down_blocks.{first}.attentions.0.transformer_blocks.0.attn2.to_k.weight"][1]
    cfg["in_channels"] = shapes["conv_in.weight"][1]
    cfg["conditioning_channels"] = shapes["controlnet_cond_embedding.conv_in.weight"][1]
    n_blocks = _count(shapes, r"controlnet_cond_embedding\.blocks\.(\d+)\.")
    cfg["conditioning_embedding_out_channels"] = [shapes["controlnet_cond_embedding.conv_in.weight"][0]] + [
        shapes[f"controlnet_cond_embedding.blocks.{2 * i + 1}.weight"][0] for i in range(n_blocks // 2)]
    if family != "sd1":  # head width 64, as SD2/SDXL UNets use
        cfg["attention_head_dim"] = [max(1, c // 64) for c in boc]
        cfg["transformer_layers_per_block"] = [
            max(1, _count(shapes, rf"down_blocks\.{b}\.attentions\.0\.transformer_blocks\.(\d+)\.")) for b in range(levels)]
    if family == "sdxl":
        cfg["projection_class_embeddings_input_dim"] = shapes["add_embedding.linear_1.weight"][1]
    return family, cfg


def adapter_to_diffusers_keys(sd: dict[str, Any], num_res_blocks: int) -> dict[str, Any]:
    """TencentARC's full adapter names -> diffusers T2IAdapter's (``body.{i*n+j}`` -> ``body.i.resnets.j``)."""
    out = {}
    for key, value in sd.items():
        if m := re.match(r"body\.(\d+)\.(block1|block2|in_conv)\.(weight|bias)$", key):
            k = int(m[1])
            i, j = divmod(k, num_res_blocks)
            new = f"adapter.body.{i}.in_conv.{m[3]}" if m[2] == "in_conv" else f"adapter.body.{i}.resnets.{j}.{m[2]}.{m[3]}"
        else:
            new = "adapter." + key
        out[new] = value
    return out


def _original_adapter_res_blocks(shapes: Shapes) -> int:
    """Blocks per level: the first ``in_conv`` (the second level's entry) sits at index num_res_blocks."""
    firsts = sorted(int(m[1]) for k in shapes if (m := re.match(r"body\.(\d+)\.in_conv\.weight$", k)))
    return firsts[0] if firsts else _count(shapes, r"body\.(\d+)\.")


def adapter_config(shapes: Shapes) -> tuple[str, dict[str, Any]]:
    """(family, T2IAdapter config) for a state dict in diffusers names."""
    levels = _count(shapes, r"adapter\.body\.(\d+)\.")
    channels = [shapes[f"adapter.body.{i}.resnets.0.block1.weight"][0] for i in range(levels)]
    unshuffled = shapes["adapter.conv_in.weight"][1]
    for factor, family, kind in ((8, "sd1", "full_adapter"), (16, "sdxl", "full_adapter_xl")):
        if unshuffled % (factor * factor) == 0 and unshuffled // (factor * factor) in (1, 3):
            return family, {"in_channels": unshuffled // (factor * factor), "channels": channels,
                            "num_res_blocks": _count(shapes, r"adapter\.body\.0\.resnets\.(\d+)\."),
                            "downscale_factor": factor, "adapter_type": kind}
    raise CheckpointLoadError("", f"a T2I-Adapter whose input ({unshuffled} unshuffled channels) is neither SD1's "
                                  "nor SDXL's")


def detect_controlnet(shapes: Shapes) -> ControlNetSpec:
    """What a ControlNet file holds, from its tensor names and shapes only. Raises CheckpointLoadError."""
    shapes = _strip_ldm_prefix(shapes)
    layout = _layout(shapes)
    if layout == "control-lora":
        return ControlNetSpec(kind="control_lora", layout="control-lora", family=_control_lora_family(shapes),
                              config={"conditioning_channels": shapes["input_hint_block.0.weight"][1]})
    if layout.startswith("adapter-"):
        names = dict(shapes) if layout == "adapter-diffusers" else adapter_to_diffusers_keys(
            dict(shapes), _original_adapter_res_blocks(shapes))
        family, cfg = adapter_config(names)
        return ControlNetSpec(kind="t2i_adapter", layout=layout.removeprefix("adapter-"), family=family, config=cfg)
    names = shapes if layout == "diffusers" else _ldm_shapes_as_diffusers(shapes)
    family, cfg = controlnet_config(names)
    return ControlNetSpec(kind="controlnet", layout=layout, family=family, config=cfg)


def _control_lora_family(shapes: Shapes) -> str:
    """SDXL has label_emb; SD2 projects attention with linears (2-D LoRA factors), SD1 with 1x1 convs."""
    if "label_emb.0.0.weight" in shapes:
        return "sdxl"
    proj = next((s for k, s in shapes.items() if k.endswith(".proj_in.down")), None)
    return "sd2" if proj is not None and len(proj) == 2 else "sd1"


def _load_control_lora(sd: dict[str, Any], spec: ControlNetSpec, base_unet: Any, path: Path) -> Any:
    """diffusers' SAI control-LoRA path on a copy of the checkpoint's UNet, fused into plain weights."""
    from diffusers import ControlNetModel

    if base_unet is None:
        raise CheckpointLoadError(path, "a control-LoRA needs the checkpoint's UNet to build on")
    model = ControlNetModel.from_unet(base_unet, conditioning_channels=spec.config["conditioning_channels"])
    try:
        model.load_lora_adapter(dict(sd), prefix=None, adapter_name="control_lora")
        model.fuse_lora()
        model.unload_lora()
    except (ValueError, RuntimeError, KeyError) as exc:
        raise CheckpointLoadError(path, f"control-LoRA does not fit the checkpoint's UNet: {exc}") from exc
    return model


def _ldm_shapes_as_diffusers(shapes: Shapes) -> dict[str, tuple[int, ...]]:
    """Rename shapes without tensors: the converter only moves values, so shapes ride along."""
    class _Shape(tuple):
        pass
    renamed = ldm_to_diffusers_keys({k: _Shape(v) for k, v in shapes.items()})
    return {k: tuple(v) for k, v in renamed.items()}


# ---------------------------------------------------------------- loading


def load_controlnet(path: Path, device: Any = None, dtype: Any = None, base_unet: Any = None) -> tuple[Any, ControlNetSpec]:
    """(ControlNetModel or T2IAdapter on `device`/`dtype`, its spec). Raises CheckpointLoadError naming the file.
    `base_unet`: the checkpoint's UNet, which a control-LoRA builds on."""
    from diffusers import ControlNetModel

    from modules.models.loader import _assign, _build_empty, _finish
    from modules.models.weights_io import load_state_dict_file

    path = Path(path)
    sd = _strip_ldm_prefix(load_state_dict_file(path))
    try:
        spec = detect_controlnet({k: tuple(v.shape) for k, v in sd.items()})
    except CheckpointLoadError as exc:
        raise CheckpointLoadError(path, exc.cause) from None
    except (KeyError, ValueError, IndexError) as exc:
        raise CheckpointLoadError(path, f"not a ControlNet model this loader understands ({exc})") from exc
    cfg = copy.deepcopy(spec.config)
    import torch

    target = (device or torch.device("cpu"), dtype or torch.float32)
    if spec.kind == "control_lora":
        return _finish(_load_control_lora(sd, spec, base_unet, path), *target), spec
    if spec.kind == "t2i_adapter":
        from diffusers import T2IAdapter

        weights = dict(sd) if spec.layout == "diffusers" else adapter_to_diffusers_keys(sd, cfg["num_res_blocks"])
        model = _build_empty(lambda: T2IAdapter(**cfg))
    else:
        weights = dict(sd) if spec.layout == "diffusers" else ldm_to_diffusers_keys(sd)
        model = _build_empty(lambda: ControlNetModel.from_config(cfg))
    _assign(model, weights, path, "T2I-Adapter" if spec.kind == "t2i_adapter" else "ControlNet", sd, target)
    return _finish(model, *target), spec


def check_compatible(spec: ControlNetSpec, name: str, model_family_info: Any, model_title: str) -> None:
    """An SDXL ControlNet on an SD1.5 checkpoint (and the like) is refused, naming both."""
    fam = model_family_info
    base = "sdxl" if fam.is_sdxl else "sd2" if fam.is_sd2 else "sd1"
    if base != spec.family:
        raise ControlNetFamilyMismatch(
            f"ControlNet {name} is a {spec.family_label} ControlNet, but the checkpoint {model_title} is "
            f"{FAMILY_LABELS[base]}: pick a {FAMILY_LABELS[base]} ControlNet model or a {spec.family_label} checkpoint")

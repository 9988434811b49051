"""What is in a checkpoint file, and the diffusers configs that load it.

``detect(shapes)`` looks only at tensor names and shapes (from the safetensors header, or from a
loaded ``.ckpt`` state dict) and returns a ``ModelSpec``:

* the family (a ``families.FamilyId``), found with A1111's key rules; what that family *is*
  (its text encoders, time ids, head width...) is read from its ``families`` record;
* per-component diffusers configs: the family's shipped config, overridden by everything the
  shapes tell (widths, depths, attention placement, text-encoder size...). That is what lets
  pruned or distilled checkpoints (BK-SDM, SSD-1B, Vega, tiny test models) load with no yaml;
* or, for anything that is not a Stable Diffusion checkpoint, ``supported=False`` with a reason
  a user can act on ("a LoRA: put it in models/Lora").

``identify(path, sidecar_yaml)`` reads the shapes and applies A1111's sidecar rule: a yaml next to
the checkpoint decides the family and its values win for the configs, but a yaml that contradicts
the weights is refused with an error naming the yaml and the mismatch.

v-prediction for SD 2.x: the weights do not say. A yaml says (``parameterization: "v"``); without
one, the spec is marked ``needs_v_probe`` and the loader runs ``probe_v_prediction`` on the
loaded UNet (one UNet call at t=999, as A1111 does). The probe only means something for trained
weights: on a random-weight test UNet it returns noise, so tests of v-prediction use a yaml.

No torch import at module level: detection runs from the header alone.
"""
from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

from modules.models import families
from modules.models.families import TE_REFINER, TE_SD1, TE_SD2, TE_XL2, FamilyId, FamilyInfo

Shapes = Mapping[str, tuple[int, ...]]

__all__ = [
    "FAMILY_IDS", "ModelSpec", "ModelConfigMismatchError", "detect", "identify", "read_shapes",
    "shapes_of", "normalize_checkpoint_keys", "probe_v_prediction", "family_config_dir",
]

FAMILY_IDS = tuple(FamilyId)

# LDM single-file prefixes (the text encoders' are on the family records' slots).
UNET = "model.diffusion_model."
VAE = "first_stage_model."

_V_PROBE_THRESHOLD = -1.0


class ModelConfigMismatchError(ValueError):
    """A sidecar yaml that cannot describe the weights next to it."""

    def __init__(self, yaml_path: Path, problems: list[str], checkpoint: Path | None = None):
        self.yaml_path = Path(yaml_path)
        self.problems = list(problems)
        where = f" for {checkpoint}" if checkpoint else ""
        super().__init__(f"config {yaml_path}{where} does not match the weights: " + "; ".join(problems))


@dataclass(frozen=True)
class ModelSpec:
    supported: bool
    reason: str  # why unsupported, or a one-line summary of what was found
    kind: str = "checkpoint"  # checkpoint | lora | vae | embedding | flux | sd3 | controlnet | unknown | ...
    family: FamilyId | None = None
    prediction_type: str = "epsilon"  # diffusers names: "epsilon" | "v_prediction"
    prediction_source: str = "default"  # "yaml" | "key" | "probe" | "family" | "default"
    needs_v_probe: bool = False
    zero_terminal_snr: bool = False
    detected_by: str = "keys"  # "keys" | "yaml"
    yaml_path: Path | None = None
    has_vae: bool = True
    unet_config: dict[str, Any] = field(default_factory=dict)
    vae_config: dict[str, Any] = field(default_factory=dict)
    text_encoder_config: dict[str, Any] | None = None
    text_encoder_2_config: dict[str, Any] | None = None
    scheduler_overrides: dict[str, Any] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    tensor_count: int = 0

    @property
    def family_info(self) -> FamilyInfo | None:
        """The family's registry record (None for files that are not supported checkpoints)."""
        return families.get_family(self.family) if self.family else None

    @property
    def is_inpaint(self) -> bool:
        return bool(self.family and self.family_info.is_inpaint)

    @property
    def is_depth(self) -> bool:
        return bool(self.family and self.family_info.is_depth)

    @property
    def is_v(self) -> bool:
        return self.prediction_type == "v_prediction"

    @property
    def config_dir(self) -> Path | None:
        return family_config_dir(self.family) if self.family else None

    def text_encoder_config_for(self, component: str) -> dict[str, Any] | None:
        """The inferred config of a text-encoder slot ("text_encoder" or "text_encoder_2")."""
        return {"text_encoder": self.text_encoder_config, "text_encoder_2": self.text_encoder_2_config}[component]

    def with_prediction(self, prediction_type: str, source: str) -> "ModelSpec":
        """After the v probe: a probed family found v becomes its v family (SD2 -> sd2-v: its configs differ)."""
        family = self.family
        unet = dict(self.unet_config)
        v_family = self.family_info.probe_v_as if self.family else None
        if v_family is not None and prediction_type == "v_prediction":
            family = v_family
            stock = _family_json(v_family, "unet")
            # sd2-v's stock config upcasts attention (fp16 overflow in 768-v models).
            unet["upcast_attention"] = stock.get("upcast_attention", unet.get("upcast_attention"))
            unet["sample_size"] = stock.get("sample_size", unet.get("sample_size"))
        return replace(self, family=family, prediction_type=prediction_type, prediction_source=source,
                       needs_v_probe=False, unet_config=unet)


def _unsupported(kind: str, reason: str, shapes: Shapes) -> ModelSpec:
    return ModelSpec(supported=False, reason=reason, kind=kind, tensor_count=len(shapes))


class _Unsupported(Exception):
    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind = kind
        self.reason = reason


# ---------------------------------------------------------------- family configs


def family_config_dir(family: str) -> Path:
    """The shipped diffusers config dir for a family (``configs/diffusers/<family>``)."""
    return families.get_family(family).diffusers_dir


def _family_json(family: str, sub: str) -> dict[str, Any]:
    name = "scheduler_config.json" if sub == "scheduler" else "config.json"
    path = family_config_dir(family) / sub / name
    if not path.is_file():
        return {}
    return json.loads(path.read_text(encoding="utf-8"))


# ---------------------------------------------------------------- reading shapes


def shapes_of(state_dict: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(int(d) for d in getattr(v, "shape", ())) for k, v in state_dict.items()}


def read_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor shapes of a checkpoint: the header for safetensors, a safe load for pickles."""
    from modules.models import weights_io

    path = Path(path)
    if path.suffix.lower() == ".safetensors":
        header = weights_io.read_safetensors_header(path)
        return {k: tuple(int(d) for d in _shape_from_header(v)) for k, v in header.items() if k != "__metadata__"}
    return shapes_of(weights_io.load_state_dict_file(path))


def _shape_from_header(value: Any) -> tuple[int, ...]:
    if isinstance(value, Mapping):  # raw safetensors header entry
        return tuple(value["shape"])
    if hasattr(value, "shape"):
        return tuple(value.shape)
    _dtype, shape = value  # (dtype, shape)
    return tuple(shape)


def normalize_checkpoint_keys(state: Mapping[str, Any]) -> dict[str, Any]:
    """Undo old layouts that differ only in names, so one rule set reads every file.

    * A ``{"state_dict": {...}}`` wrapper is unwrapped by weights_io; this handles naming:
    * very old SD1 files store CLIP as ``cond_stage_model.transformer.embeddings...`` (no
      ``text_model.``), from before transformers nested it.
    """
    old = "cond_stage_model.transformer."
    if any(k.startswith(TE_SD1) for k in state) or not any(k.startswith(old) for k in state):
        return state if isinstance(state, dict) else dict(state)
    out: dict[str, Any] = {}
    for k, v in state.items():
        if k.startswith(old):
            k = TE_SD1 + k[len(old):]
        out[k] = v
    return out


# ---------------------------------------------------------------- classification


def _has_prefix(shapes: Shapes, *prefixes: str) -> bool:
    return any(k.startswith(prefixes) for k in shapes)


def _first_keys(shapes: Shapes, n: int = 5) -> str:
    keys = list(shapes)[:n]
    return ", ".join(keys) + (" …" if len(shapes) > n else "")


_LORA_MARKERS = (".lora_down.", ".lora_up.", ".lora_A.", ".lora_B.", ".hada_w1_a", ".hada_w2_a", ".lokr_w1",
                 ".lokr_w2", ".oft_blocks", ".oft_diag", "lora_mid.", ".diff_b", ".dora_scale")


def _classify_non_sd(shapes: Shapes) -> ModelSpec | None:
    """Files we recognise as something other than an SD1/SD2/SDXL checkpoint."""
    if not shapes:
        return _unsupported("unknown", "empty file: no tensors", shapes)
    if _has_prefix(shapes, "double_blocks.", UNET + "double_blocks.", "single_blocks.", UNET + "single_blocks."):
        return _unsupported("flux", "a Flux checkpoint: not supported yet", shapes)
    if _has_prefix(shapes, "joint_blocks.", UNET + "joint_blocks."):
        return _unsupported("sd3", "a Stable Diffusion 3 checkpoint: not supported yet", shapes)
    if UNET + "input_blocks.0.0.weight" in shapes:
        # an LDM UNet (SD1/SD2/SDXL or a relative); checked before the LoRA markers so a merge
        # that carries a few stray LoRA tensors still loads as the checkpoint it is
        return None
    if _has_prefix(shapes, "lora_unet_", "lora_te_", "lora_te1_", "lora_te2_", "lora_transformer_") or any(
        m in k for k in shapes for m in _LORA_MARKERS
    ):
        return _unsupported("lora", "a LoRA: put it in models/Lora", shapes)
    if "emb_params" in shapes or _has_prefix(shapes, "string_to_param.") or (
        set(shapes) <= {"clip_l", "clip_g"}
    ):
        return _unsupported("embedding", "a textual inversion embedding: put it in embeddings/", shapes)
    if _has_prefix(shapes, "control_model.", "controlnet_cond_embedding.", "input_hint_block."):
        return _unsupported("controlnet", "a ControlNet model: not supported yet", shapes)
    if _vae_prefix(shapes) is not None or "encoder.down_blocks.0.resnets.0.conv1.weight" in shapes:
        return _unsupported("vae", "a VAE: put it in models/VAE", shapes)
    if "conv_in.weight" in shapes and _has_prefix(shapes, "down_blocks.", "time_embedding."):
        return _unsupported("diffusers-unet", "a diffusers-format UNet: use a single-file checkpoint", shapes)
    if _has_prefix(shapes, UNET):
        return _unsupported("unknown", "a diffusion model of an architecture that is not Stable Diffusion 1/2/XL: "
                            f"not supported ({len(shapes)} tensors, first keys {_first_keys(shapes)})", shapes)
    return _unsupported("unknown", f"not a Stable Diffusion checkpoint ({len(shapes)} tensors, "
                        f"first keys {_first_keys(shapes)})", shapes)


def _vae_prefix(shapes: Shapes) -> str | None:
    """Prefix of LDM-layout VAE keys, '' for a bare VAE file, None when there is no LDM VAE."""
    for prefix in (VAE, "vae.", ""):
        if prefix + "encoder.conv_in.weight" in shapes and prefix + "decoder.conv_in.weight" in shapes:
            return prefix
    return None


def _text_side(shapes: Shapes) -> families.TextEncoders | None:
    """A1111's key rules: which text encoders the file holds (SDXL's bigG before the refiner's)."""
    if TE_XL2 + "ln_final.weight" in shapes or TE_XL2 + "token_embedding.weight" in shapes:
        return families.SDXL_TEXT
    if TE_REFINER + "ln_final.weight" in shapes or TE_REFINER + "token_embedding.weight" in shapes:
        return families.SDXL_REFINER_TEXT
    if TE_SD2 + "ln_final.weight" in shapes or _has_prefix(shapes, TE_SD2 + "transformer.resblocks."):
        return families.SD2_TEXT
    if TE_SD1 + "embeddings.token_embedding.weight" in shapes:
        return families.SD1_TEXT
    return None


# Relatives of the supported families, told apart by UNet input channels, refused by name.
_UNSUPPORTED_BY_CHANNELS = {
    (families.SD2_TEXT, 7): ("sd2-upscaler", "the SD 2.x x4 upscaler: not supported yet"),
    (families.SD1_TEXT, 8): ("instruct-pix2pix", "an InstructPix2Pix checkpoint: not supported yet"),
}


def _family_for(text: families.TextEncoders, in_channels: int, shapes: Shapes) -> FamilyId:
    """The registry family with these text encoders and UNet input channels."""
    if text == families.SD2_TEXT and (
            UNET + "label_emb.0.0.weight" in shapes or _has_prefix(shapes, "embedder.", "noise_augmentor.")):
        raise _Unsupported("sd2-unclip", "an SD 2.x unCLIP checkpoint: not supported yet")
    fam = families.family_for(text, in_channels)
    if fam is not None:
        return fam.id
    if (text, in_channels) in _UNSUPPORTED_BY_CHANNELS:
        raise _Unsupported(*_UNSUPPORTED_BY_CHANNELS[text, in_channels])
    raise _Unsupported("unknown", f"a {text.name} checkpoint whose UNet takes {in_channels} input channels: "
                       "no known model type has that")


# ---------------------------------------------------------------- shape inference


def _count(shapes: Shapes, prefix: str) -> int:
    """Number of consecutive numbered children ``prefix{0,1,...}.`` present."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    found = {int(m.group(1)) for k in shapes if (m := pattern.match(k))}
    n = 0
    while n in found:
        n += 1
    return n


@dataclass
class _Layer:
    width: int
    attn: bool
    depth: int  # transformer blocks (0 without attention)


def _unet_layer(shapes: Shapes, block: str) -> _Layer | None:
    res = f"{UNET}{block}.0.out_layers.3.weight"
    if res not in shapes:
        return None
    attn = f"{UNET}{block}.1.proj_in.weight" in shapes
    depth = _count(shapes, f"{UNET}{block}.1.transformer_blocks.") if attn else 0
    return _Layer(shapes[res][0], attn, depth)


def _transformer_depths(levels: list[list[_Layer]], up_levels: list[list[_Layer]], mid_depth: int,
                        has_mid: bool) -> tuple[Any, list[list[int]] | None]:
    """``transformer_layers_per_block`` (and ``reverse_...`` when up and down differ) for diffusers.

    SD1/SD2 use 1 everywhere, SDXL [1, 2, 10], the refiner 4; SSD-1B/Vega-style pruning makes depths
    differ between the layers of a level and between the down and up paths. Levels without attention
    do not care, except that diffusers builds the mid block with the deepest level's (first) depth,
    so a plain deepest level carries the mid block's depth.
    """
    n = len(levels)
    attn_depths = {layer.depth for lv in levels + up_levels for layer in lv if layer.attn}
    if len(attn_depths) <= 1 and (not has_mid or attn_depths <= {mid_depth}):
        return (attn_depths.pop() if attn_depths else max(mid_depth, 1)), None

    def filler(down_level: int) -> int:
        return mid_depth if (down_level == n - 1 and has_mid) else 1

    down = [[layer.depth if layer.attn else filler(i) for layer in lv] for i, lv in enumerate(levels)]
    up = [[layer.depth if layer.attn else filler(n - 1 - i) for layer in lv] for i, lv in enumerate(up_levels)]
    if has_mid and down[-1][0] != mid_depth:
        raise _Unsupported("unknown", f"UNet mid block has {mid_depth} transformer layers but its deepest level "
                           f"{down[-1][0]}: diffusers cannot build that")
    uniform = all(len(set(d)) == 1 for d in down)
    mirrored = all(set(up[i]) == {down[n - 1 - i][0]} for i in range(n))
    if uniform and mirrored:
        return [d[0] for d in down], None
    return down, up


def _infer_unet(shapes: Shapes, fam: FamilyInfo, notes: list[str], pooled_width: int | None) -> dict[str, Any]:
    """The UNet config from shapes, starting from the family's stock config. ``pooled_width``: the
    pooled text embedding's width, which the SDXL add-embedding takes before the time ids."""
    stock = _family_json(fam.id, "unet")
    cfg = copy.deepcopy(stock)
    _unet_conv_io(shapes, cfg)
    levels, layers_per_block, widths = _unet_down_levels(shapes)
    up_levels = _unet_up_levels(shapes, len(levels), layers_per_block)
    cfg["block_out_channels"] = widths
    cfg["layers_per_block"] = layers_per_block
    cfg["down_block_types"] = ["CrossAttnDownBlock2D" if lv[0].attn else "DownBlock2D" for lv in levels]
    cfg["up_block_types"] = ["CrossAttnUpBlock2D" if lv[0].attn else "UpBlock2D" for lv in up_levels]

    mid_depth = _unet_mid_block(shapes, cfg, notes)
    cfg["transformer_layers_per_block"], reverse = _transformer_depths(levels, up_levels, mid_depth,
                                                                        bool(cfg["mid_block_type"]))
    if reverse is None:
        cfg.pop("reverse_transformer_layers_per_block", None)
    else:
        cfg["reverse_transformer_layers_per_block"] = reverse

    _unet_attention(shapes, cfg, fam, stock, widths)
    _unet_added_embeddings(shapes, cfg, fam, widths, pooled_width)
    _note_diff(notes, "UNet", stock, cfg, ("block_out_channels", "layers_per_block", "down_block_types",
                                           "transformer_layers_per_block", "cross_attention_dim", "mid_block_type"))
    return cfg


def _unet_conv_io(shapes: Shapes, cfg: dict[str, Any]) -> None:
    conv_in = shapes[UNET + "input_blocks.0.0.weight"]
    cfg["in_channels"] = conv_in[1]
    cfg["conv_in_kernel"] = conv_in[-1] if len(conv_in) == 4 else 3
    out_key = UNET + "out.2.weight"
    if out_key not in shapes:
        raise _Unsupported("unknown", "UNet without an output conv (out.2): an incomplete or unknown model")
    cfg["out_channels"] = shapes[out_key][0]
    cfg["conv_out_kernel"] = shapes[out_key][-1] if len(shapes[out_key]) == 4 else 3


def _unet_down_levels(shapes: Shapes) -> tuple[list[list[_Layer]], int, list[int]]:
    """Down path: input_blocks 1..N are resnet(+attention) layers, split into levels by downsamplers.
    Returns (levels, layers per level, width per level)."""
    levels: list[list[_Layer]] = [[]]
    i = 1
    while True:
        if f"{UNET}input_blocks.{i}.0.op.weight" in shapes:
            levels.append([])
        else:
            layer = _unet_layer(shapes, f"input_blocks.{i}")
            if layer is None:
                break
            levels[-1].append(layer)
        i += 1
    if not levels[-1]:  # a trailing downsampler with nothing after it
        levels.pop()
    counts = {len(level) for level in levels}
    if not levels or 0 in counts or len(counts) != 1:
        raise _Unsupported("unknown", f"UNet with uneven resnets per level ({[len(lv) for lv in levels]}): "
                           "not a layout diffusers can build")
    widths = []
    for n, level in enumerate(levels):
        if len({layer.width for layer in level}) != 1 or len({layer.attn for layer in level}) != 1:
            raise _Unsupported("unknown", f"UNet level {n} mixes widths or attention: not a layout diffusers can build")
        widths.append(level[0].width)
    return levels, counts.pop(), widths


def _unet_up_levels(shapes: Shapes, n_levels: int, layers_per_block: int) -> list[list[_Layer]]:
    """Up path: output_blocks in reverse level order, layers_per_block + 1 each."""
    n_out = _count(shapes, UNET + "output_blocks.")
    if n_out != n_levels * (layers_per_block + 1):
        raise _Unsupported("unknown", f"UNet with {n_out} output blocks for {n_levels} levels of "
                           f"{layers_per_block} resnets: not a layout diffusers can build")
    up_levels: list[list[_Layer]] = []
    for lv in range(n_levels):
        up = []
        for j in range(layers_per_block + 1):
            layer = _unet_layer(shapes, f"output_blocks.{lv * (layers_per_block + 1) + j}")
            if layer is None:
                raise _Unsupported("unknown", "UNet output block without a resnet: unknown layout")
            up.append(layer)
        if len({layer.attn for layer in up}) != 1:
            raise _Unsupported("unknown", f"UNet up level {lv} mixes attention and plain layers")
        up_levels.append(up)
    return up_levels


def _unet_mid_block(shapes: Shapes, cfg: dict[str, Any], notes: list[str]) -> int:
    """Mid block: resnet, attention, resnet; pruned models (BK-SDM small/tiny) drop it. Returns its depth."""
    if UNET + "middle_block.0.out_layers.3.weight" not in shapes:
        cfg["mid_block_type"] = None
        notes.append("UNet has no mid block")
        return 0
    if UNET + "middle_block.1.proj_in.weight" not in shapes:
        raise _Unsupported("unknown", "UNet mid block without attention: not a layout the LDM converter reads")
    cfg["mid_block_type"] = "UNetMidBlock2DCrossAttn"
    return _count(shapes, UNET + "middle_block.1.transformer_blocks.")


def _unet_attention(shapes: Shapes, cfg: dict[str, Any], fam: FamilyInfo, stock: dict, widths: list[int]) -> None:
    attn_key = next((k for k in shapes if k.startswith(UNET) and k.endswith("attn2.to_k.weight")), None)
    if attn_key is None:
        raise _Unsupported("unknown", "UNet without cross-attention: not a text-to-image model")
    cfg["cross_attention_dim"] = shapes[attn_key][1]
    proj_key = next(k for k in shapes if k.startswith(UNET) and k.endswith(".proj_in.weight"))
    cfg["use_linear_projection"] = len(shapes[proj_key]) == 2
    # Heads are invisible in weights: the record says (SD1: 8 heads everywhere, SD2/SDXL: 64 channels each).
    if fam.unet_head_width is None:
        cfg["attention_head_dim"] = stock.get("attention_head_dim", 8)
    else:
        cfg["attention_head_dim"] = [max(1, w // fam.unet_head_width) for w in widths]
    cfg.pop("num_attention_heads", None)


def _unet_added_embeddings(shapes: Shapes, cfg: dict[str, Any], fam: FamilyInfo, widths: list[int],
                           pooled_width: int | None) -> None:
    """Time embedding width, and SDXL's add-embedding: the pooled text embedding followed by one
    sinusoidal embedding per time id, all into label_emb.0.0. Its input width gives the per-id width."""
    time_in = shapes.get(UNET + "time_embed.0.weight")
    if time_in is not None and time_in[0] != 4 * widths[0]:
        cfg["time_embedding_dim"] = time_in[0]
    n_ids = fam.time_ids.n_ids
    if not n_ids:
        return
    label = shapes.get(UNET + "label_emb.0.0.weight")
    if label is None:
        raise _Unsupported("unknown", f"{fam.label}-like checkpoint without the size/crop embedding (label_emb)")
    extra = label[1] - (pooled_width or 0)
    if not pooled_width or extra <= 0 or extra % n_ids:
        raise _Unsupported("unknown", f"the size/crop embedding takes {label[1]} inputs: not the pooled text "
                           f"width {pooled_width} plus {n_ids} time ids of equal width")
    cfg["addition_embed_type"] = "text_time"
    cfg["addition_time_embed_dim"] = extra // n_ids
    cfg["projection_class_embeddings_input_dim"] = label[1]


def _infer_vae(shapes: Shapes, prefix: str, family: str, notes: list[str]) -> dict[str, Any]:
    stock = _family_json(family, "vae")
    cfg = copy.deepcopy(stock)
    p = prefix + "encoder."
    levels = _count(shapes, p + "down.")
    if levels == 0:
        raise _Unsupported("unknown", "VAE without encoder levels")
    widths = [shapes[f"{p}down.{n}.block.0.conv2.weight"][0] for n in range(levels)]
    cfg["block_out_channels"] = widths
    cfg["down_block_types"] = ["DownEncoderBlock2D"] * levels
    cfg["up_block_types"] = ["UpDecoderBlock2D"] * levels
    cfg["layers_per_block"] = _count(shapes, p + "down.0.block.")
    cfg["in_channels"] = shapes[p + "conv_in.weight"][1]
    cfg["out_channels"] = shapes[prefix + "decoder.conv_out.weight"][0]
    cfg["latent_channels"] = shapes[prefix + "decoder.conv_in.weight"][1]
    cfg["mid_block_add_attention"] = (p + "mid.attn_1.q.weight") in shapes
    cfg["use_quant_conv"] = (prefix + "quant_conv.weight") in shapes
    cfg["use_post_quant_conv"] = (prefix + "post_quant_conv.weight") in shapes
    _note_diff(notes, "VAE", stock, cfg, ("block_out_channels", "layers_per_block", "latent_channels"))
    return cfg


def infer_vae_config(shapes: Shapes, family: str) -> dict[str, Any]:
    """Config for a separate VAE file in LDM layout (any prefix), starting from ``family``'s."""
    prefix = _vae_prefix(shapes)
    if prefix is None:
        raise ValueError("not an LDM-layout VAE")
    return _infer_vae(shapes, prefix, family, [])


def _infer_clip(shapes: Shapes, prefix: str, family: str, sub: str, notes: list[str]) -> dict[str, Any]:
    """transformers-layout CLIP-L (SD1, SDXL encoder 1)."""
    stock = _family_json(family, sub)
    cfg = copy.deepcopy(stock)
    vocab, width = shapes[prefix + "embeddings.token_embedding.weight"]
    cfg.update(
        vocab_size=vocab,
        hidden_size=width,
        max_position_embeddings=shapes[prefix + "embeddings.position_embedding.weight"][0],
        num_hidden_layers=_count(shapes, prefix + "encoder.layers."),
        intermediate_size=shapes[prefix + "encoder.layers.0.mlp.fc1.weight"][0],
        num_attention_heads=max(1, width // 64),
    )
    _note_diff(notes, sub, stock, cfg, ("hidden_size", "num_hidden_layers", "intermediate_size"))
    return cfg


def _infer_open_clip(shapes: Shapes, slot: families.TextEncoderSlot, family: str, notes: list[str]) -> dict[str, Any]:
    """OpenCLIP layout (SD2, SDXL encoder 2, refiner)."""
    prefix, sub = slot.ldm_prefix, slot.component
    stock = _family_json(family, sub)
    cfg = copy.deepcopy(stock)
    vocab, width = shapes[prefix + "token_embedding.weight"]
    layers = _count(shapes, prefix + "transformer.resblocks.")
    if slot.dropped_block is not None and layers == slot.dropped_block + 1:
        layers -= 1  # the file keeps a block the model never runs; diffusers' converter drops it
    cfg.update(
        vocab_size=vocab,
        hidden_size=width,
        max_position_embeddings=shapes[prefix + "positional_embedding"][0],
        num_hidden_layers=layers,
        intermediate_size=shapes[prefix + "transformer.resblocks.0.mlp.c_fc.weight"][0],
        num_attention_heads=max(1, width // 64),
    )
    proj = shapes.get(prefix + "text_projection")
    if proj is not None and slot.pooled:  # without a pooled output (SD2) the projection is unused and dropped
        cfg["projection_dim"] = proj[1] if len(proj) == 2 else proj[0]
    _note_diff(notes, sub, stock, cfg, ("hidden_size", "num_hidden_layers", "intermediate_size"))
    return cfg


def _infer_text_encoder(shapes: Shapes, slot: families.TextEncoderSlot, family: str,
                        notes: list[str]) -> dict[str, Any]:
    if slot.tokenizer == "clip-l":
        return _infer_clip(shapes, slot.ldm_prefix, family, slot.component, notes)
    return _infer_open_clip(shapes, slot, family, notes)


def _note_diff(notes: list[str], what: str, stock: dict, cfg: dict, keys: tuple[str, ...]) -> None:
    diffs = [f"{k}={cfg.get(k)!r} (stock {stock.get(k)!r})" for k in keys if k in stock and stock[k] != cfg.get(k)]
    if diffs:
        notes.append(f"non-standard {what}: " + ", ".join(diffs))


_ORDINALS = ("first", "second", "third")


def _build(shapes: Shapes, family: str) -> ModelSpec:
    fam = families.get_family(family)
    te_notes: list[str] = []
    te_cfgs: dict[str, dict[str, Any]] = {}
    for n, slot in enumerate(fam.text.slots):
        if slot.token_embedding_key not in shapes:
            raise _Unsupported("unknown", f"{fam.label} checkpoint without its {_ORDINALS[n]} ({slot.tokenizer}) "
                               "text encoder")
        te_cfgs[slot.component] = _infer_text_encoder(shapes, slot, fam.id, te_notes)
    pooled = fam.text.pooled_slot
    notes: list[str] = []
    unet = _infer_unet(shapes, fam, notes, te_cfgs[pooled.component].get("projection_dim") if pooled else None)
    vae_prefix = VAE if (VAE + "encoder.conv_in.weight") in shapes else None
    vae = _infer_vae(shapes, VAE, fam.id, notes) if vae_prefix else copy.deepcopy(_family_json(fam.id, "vae"))
    if not vae_prefix:
        notes.append("no VAE weights in the file: a separate VAE is required")
    notes += te_notes
    _check_cross_attention(unet, [te_cfgs[s.component]["hidden_size"] for s in fam.text.slots])

    prediction, source, probe = fam.prediction_type, "family", False
    if fam.v_pred_key is not None and fam.v_pred_key in shapes:
        prediction, source = "v_prediction", "key"
    elif fam.probe_v_as is not None:
        source, probe = "default", True  # decided by yaml or by the UNet probe at load

    summary = f"{fam.id} ({'v-prediction' if prediction == 'v_prediction' else prediction}"
    summary += ", prediction to be probed at load)" if probe else ")"
    return ModelSpec(
        supported=True, reason=summary, kind="checkpoint", family=fam.id, prediction_type=prediction,
        prediction_source=source, needs_v_probe=probe, zero_terminal_snr="ztsnr" in shapes,
        has_vae=vae_prefix is not None, unet_config=unet, vae_config=vae,
        text_encoder_config=te_cfgs.get("text_encoder"), text_encoder_2_config=te_cfgs.get("text_encoder_2"),
        notes=tuple(notes), tensor_count=len(shapes),
    )


def _check_cross_attention(unet: dict[str, Any], te_widths: list[int]) -> None:
    """The UNet attends to the text encoders' outputs concatenated on the feature axis."""
    if unet["cross_attention_dim"] == sum(te_widths):
        return
    if len(te_widths) > 1:
        raise _Unsupported("unknown", f"UNet cross-attention width {unet['cross_attention_dim']} is not the sum "
                           f"of the text encoder widths {'+'.join(map(str, te_widths))}")
    raise _Unsupported("unknown", f"UNet cross-attention width {unet['cross_attention_dim']} does not match the "
                       f"text encoder width {te_widths[0]}")


def detect(shapes: Shapes) -> ModelSpec:
    """Family, prediction type and per-component configs from tensor names and shapes alone."""
    shapes = normalize_checkpoint_keys(shapes)
    other = _classify_non_sd(shapes)
    if other is not None:
        return other
    if "edm_mean" in shapes or "edm_vpred.sigma_max" in shapes:
        return _unsupported("playground", "an EDM model (Playground v2.5 style): not supported yet", shapes)
    text = _text_side(shapes)
    if text is None:
        return _unsupported("unknown", f"a diffusion UNet without text encoder weights ({len(shapes)} tensors): "
                            "a UNet-only file cannot be loaded as a checkpoint", shapes)
    try:
        family = _family_for(text, shapes[UNET + "input_blocks.0.0.weight"][1], shapes)
        return _build(shapes, family)
    except _Unsupported as exc:
        return _unsupported(exc.kind, exc.reason, shapes)
    except (KeyError, IndexError, ValueError) as exc:  # a key the rules rely on is missing or malformed
        return _unsupported("unknown", f"a {text.name}-like checkpoint with an unexpected layout ({exc!r}): "
                            "cannot infer its configuration", shapes)


# ---------------------------------------------------------------- sidecar yaml


def _read_yaml(path: Path) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ModelConfigMismatchError(path, [f"cannot read it ({exc})"]) from exc
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise ModelConfigMismatchError(path, ["not an LDM/SGM model config (no 'model' section)"])
    return data


def _get(d: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(d, dict):
            return None
        d = d.get(key)
    return d


def _yaml_unet_params(cfg: dict) -> dict[str, Any]:
    params = _get(cfg, "model", "params") or {}
    return _get(params, "unet_config", "params") or _get(params, "network_config", "params") or {}


def family_from_yaml(cfg: dict, yaml_path: Path) -> tuple[FamilyId, str]:
    """(family, prediction_type) described by an LDM/SGM yaml: its text encoders and UNet input
    channels name a registry family, as the keys do for the weights."""
    model = cfg["model"]
    params = model.get("params") or {}
    target = str(model.get("target", ""))
    unet = _yaml_unet_params(cfg)
    in_ch = unet.get("in_channels")
    context = unet.get("context_dim")
    context = context[0] if isinstance(context, list) else context

    conditioner = _get(params, "conditioner_config", "params", "emb_models")
    if conditioner is not None or target.startswith("sgm."):
        targets = [str(e.get("target", "")) for e in (conditioner or []) if isinstance(e, dict)]
        has_clip = any(t.endswith("FrozenCLIPEmbedder") for t in targets)
        has_open = any("FrozenOpenCLIPEmbedder" in t for t in targets)
        refiner = (has_open and not has_clip) or (not targets and context == 1280)
        text = families.SDXL_REFINER_TEXT if refiner else families.SDXL_TEXT
        scaling = str(_get(params, "denoiser_config", "params", "scaling_config", "target") or "")
        v = "VScaling" in scaling or params.get("parameterization") == "v"
    else:
        cond = str(_get(params, "cond_stage_config", "target") or "")
        if "OpenCLIP" in cond or (not cond and context == 1024):
            text = families.SD2_TEXT
        elif "CLIPEmbedder" in cond or (not cond and context == 768):
            text = families.SD1_TEXT
        else:
            raise ModelConfigMismatchError(yaml_path, [f"cannot tell the model type from it "
                                                       f"(cond_stage {cond or 'missing'}, "
                                                       f"context_dim {context})"])
        v = params.get("parameterization") == "v"
        if "depth_stage_config" in params or "Depth2Image" in target:
            in_ch = 5
    # Other widths get the plain family, so the in_channels check against the weights names the mismatch.
    fam = families.family_for(text, in_ch) or families.family_for(text, 4)
    assert fam is not None
    if v and fam.probe_v_as is not None:
        fam = families.get_family(fam.probe_v_as)
    return fam.id, ("v_prediction" if v else "epsilon")


def _meta_checkpoint(shapes: Shapes) -> dict[str, Any]:
    """Shape-only tensors, so diffusers' config helpers (which peek at a few keys) run without weights."""
    import torch

    return {k: torch.empty(s, device="meta") for k, s in shapes.items()}


def apply_sidecar_yaml(spec: ModelSpec, yaml_path: Path, shapes: Shapes, checkpoint: Path | None = None) -> ModelSpec:
    """A1111's rule: the yaml names the model type and its values win, as long as the weights agree."""
    if not spec.supported:
        return spec  # a LoRA with a yaml is still a LoRA
    shapes = normalize_checkpoint_keys(shapes)
    cfg = _read_yaml(yaml_path)
    family, prediction = family_from_yaml(cfg, yaml_path)
    fam, found = families.get_family(family), spec.family_info
    assert found is not None
    if fam.text != found.text:
        raise ModelConfigMismatchError(yaml_path, [f"the yaml describes {family}, the weights are {found.text.name}"],
                                       checkpoint)
    try:
        built = _build(shapes, family)
    except _Unsupported as exc:
        raise ModelConfigMismatchError(yaml_path, [exc.reason], checkpoint) from exc

    problems: list[str] = []
    unet = _yaml_unet_config(cfg, shapes, built.unet_config, problems, yaml_path, checkpoint)
    vae = _yaml_vae_config(cfg, built, problems)
    got_in = built.unet_config["in_channels"]
    if fam.unet_in_channels != got_in and not any("in_channels" in p for p in problems):
        problems.append(f"the yaml describes {family} (UNet in_channels {fam.unet_in_channels}), "
                        f"the weights have in_channels {got_in}")
    if problems:
        raise ModelConfigMismatchError(yaml_path, problems, checkpoint)

    return replace(
        built, detected_by="yaml", yaml_path=Path(yaml_path), prediction_type=prediction, prediction_source="yaml",
        needs_v_probe=False, unet_config=unet, vae_config=vae, scheduler_overrides=_yaml_scheduler(cfg),
        zero_terminal_snr=spec.zero_terminal_snr,
        reason=f"{family} ({'v-prediction' if prediction == 'v_prediction' else 'epsilon'}, "
               f"from {Path(yaml_path).name})",
    )


def _yaml_unet_config(cfg: dict, shapes: Shapes, inferred: dict[str, Any], problems: list[str], yaml_path: Path,
                      checkpoint: Path | None) -> dict[str, Any]:
    """The inferred UNet config checked against the yaml's, plus what only the yaml can tell."""
    unet = dict(inferred)
    if not _yaml_unet_params(cfg):
        return unet
    from diffusers.loaders.single_file_utils import create_unet_diffusers_config_from_ldm

    try:
        ycfg = create_unet_diffusers_config_from_ldm(cfg, _meta_checkpoint(shapes))
    except (KeyError, TypeError, AssertionError) as exc:
        raise ModelConfigMismatchError(yaml_path, [f"incomplete unet config ({exc!r})"], checkpoint) from exc
    for key in ("in_channels", "out_channels", "block_out_channels", "layers_per_block", "cross_attention_dim",
                "use_linear_projection", "down_block_types", "projection_class_embeddings_input_dim"):
        if ycfg.get(key) is None or key not in unet:
            continue
        a, b = _plain(ycfg[key]), _plain(unet[key])
        if a != b:
            problems.append(f"unet {key} {a} in the yaml, {b} in the weights")
    if ycfg.get("transformer_layers_per_block") is not None and not problems:
        _compare_transformer_depths(ycfg["transformer_layers_per_block"], unet, problems)
    # What the weights cannot show comes from the yaml.
    if ycfg.get("attention_head_dim") is not None:
        unet["attention_head_dim"] = ycfg["attention_head_dim"]
    if "upcast_attention" in ycfg:
        unet["upcast_attention"] = ycfg["upcast_attention"]
    return unet


def _compare_transformer_depths(ydepth: Any, unet: dict[str, Any], problems: list[str]) -> None:
    levels = len(unet["block_out_channels"])
    ylist = ydepth if isinstance(ydepth, list) else [ydepth] * levels
    wdepth = unet["transformer_layers_per_block"]
    wdepths = wdepth if isinstance(wdepth, list) else [wdepth] * levels
    wlist = [d if isinstance(d, int) else d[0] for d in wdepths]
    for n, kind in enumerate(unet["down_block_types"]):
        if kind.startswith("CrossAttn") and n < len(ylist) and ylist[n] != wlist[n]:
            problems.append(f"unet transformer depth at level {n}: {ylist[n]} in the yaml, {wlist[n]} in the weights")


def _yaml_vae_config(cfg: dict, built: ModelSpec, problems: list[str]) -> dict[str, Any]:
    vae = dict(built.vae_config)
    ddconfig = _get(cfg, "model", "params", "first_stage_config", "params", "ddconfig")
    if isinstance(ddconfig, dict) and built.has_vae and "ch" in ddconfig and "ch_mult" in ddconfig:
        ywidths = [ddconfig["ch"] * m for m in ddconfig["ch_mult"]]
        if ywidths != vae["block_out_channels"]:
            problems.append(f"vae widths {ywidths} in the yaml, {vae['block_out_channels']} in the weights")
        if "z_channels" in ddconfig and ddconfig["z_channels"] != vae["latent_channels"]:
            problems.append(f"vae latent channels {ddconfig['z_channels']} in the yaml, "
                            f"{vae['latent_channels']} in the weights")
    scale = _get(cfg, "model", "params", "scale_factor")
    if scale is not None:
        vae["scaling_factor"] = float(scale)
    return vae


def _yaml_scheduler(cfg: dict) -> dict[str, Any]:
    sched: dict[str, Any] = {}
    params = _get(cfg, "model", "params") or {}
    if "linear_start" in params:
        sched["beta_start"] = float(params["linear_start"])
    if "linear_end" in params:
        sched["beta_end"] = float(params["linear_end"])
    if "timesteps" in params:
        sched["num_train_timesteps"] = int(params["timesteps"])
    return sched


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


# ---------------------------------------------------------------- entry points


def identify(path: Path, sidecar_yaml: Path | None = None, *, state_dict: Mapping[str, Any] | None = None) -> ModelSpec:
    """Detect a checkpoint file; a sidecar yaml (A1111: ``<name>.yaml`` beside it) takes precedence.

    ``state_dict`` avoids reading a ``.ckpt`` twice when the caller already loaded it.
    Raises ``weights_io.CheckpointLoadError`` for unreadable files and ``ModelConfigMismatchError``
    for a yaml that contradicts the weights.
    """
    shapes = shapes_of(state_dict) if state_dict is not None else read_shapes(Path(path))
    spec = detect(shapes)
    if sidecar_yaml is not None and spec.supported:
        spec = apply_sidecar_yaml(spec, Path(sidecar_yaml), shapes, checkpoint=Path(path))
    return spec


def probe_v_prediction(unet: Any) -> tuple[bool, float]:
    """Is this SD2 UNet v-prediction? (A1111's test, our implementation.)

    At t=999 the noisy latent is almost pure noise. An epsilon model predicts that noise, so its
    output stays close to its input; a v model predicts roughly minus the clean image, which for a
    constant 0.5 input lands far below it. Returns (is_v, mean(output - input)); v when that mean is
    below -1. Only meaningful for trained weights.
    """
    import torch

    param = next(unet.parameters())
    device, dtype = param.device, param.dtype
    cfg = unet.config
    cross = cfg.cross_attention_dim if isinstance(cfg.cross_attention_dim, int) else cfg.cross_attention_dim[0]
    x = torch.full((1, cfg.in_channels, 8, 8), 0.5, device=device, dtype=dtype)
    cond = torch.full((1, 2, cross), 0.5, device=device, dtype=dtype)
    with torch.no_grad():
        out = unet(x, torch.tensor([999], device=device), encoder_hidden_states=cond).sample
    score = float((out.float() - x.float()).mean())
    return score < _V_PROBE_THRESHOLD, score

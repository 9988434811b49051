"""A LoRA file's tensor names -> the layer of the loaded diffusers model each one changes.

Real files name layers in several ways:

* kohya / LyCORIS: ``lora_unet_<flat name>.<part>``, ``lora_te_``, and ``lora_te1_``/``lora_te2_`` for
  SDXL's two encoders. The flat name is the layer's dotted name with ``_`` for ``.``; for the UNet it
  is diffusers' name (SD1/SD2, as sd-scripts trains them) or the LDM/SGM name (SDXL, A1111/LDM files:
  ``input_blocks_4_1_...``). OneTrainer writes the same kohya names.
* diffusers / PEFT (SimpleTuner, diffusers' trainers): ``unet.<dotted>.lora_A.weight``,
  ``text_encoder.``/``text_encoder_2.``, ``transformer.``, PEFT's raw ``base_model.model.``, and the
  older ``...processor.to_q_lora.down.weight`` / ``lora_linear_layer`` spellings.

Name conversion uses diffusers' own converters (``_maybe_map_sgm_blocks_to_diffusers``,
``_convert_unet_lora_key``, ``convert_unet_state_dict_to_peft``, ``convert_state_dict_to_peft``).
What no library offers is written here: splitting a key into layer prefix and network part (the
LyCORIS part names below), the lookup of a flat name in the model's own layer list (A1111 does
the same lookup against its LDM model), and the LDM names diffusers' converters drop: resnet norms
(``in_layers_0``/``out_layers_0``, for LyCORIS ``w_norm``/``b_norm`` and ``diff``), ``out_0``, and SD1's
first upsampler.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import torch

log = logging.getLogger(__name__)

# The network part of a key, longest first (LoRA/LoCon, LoHa, LoKr, IA3, OFT/BOFT, GLoRA, full/diff,
# DoRA, and the diffusers/PEFT spellings). Written by hand: no library lists the LyCORIS names.
PARTS = (
    "lora_linear_layer.down.weight", "lora_linear_layer.up.weight",
    "lora_magnitude_vector.weight", "lora_magnitude_vector",
    "lora_down.weight", "lora_up.weight", "lora_mid.weight", "lora_A.weight", "lora_B.weight",
    "lora.down.weight", "lora.up.weight",
    "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2",
    "lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b", "lokr_w1", "lokr_w2", "lokr_t2",
    "a1.weight", "a2.weight", "b1.weight", "b2.weight",
    "oft_blocks", "oft_diag", "rescale", "on_input", "dora_scale", "diff_b", "diff", "w_norm", "b_norm",
    "alpha", "scale", "weight",
)
# PEFT/diffusers spellings -> the kohya part names the deltas read.
_CANONICAL = {
    "lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight",
    "lora.down.weight": "lora_down.weight", "lora.up.weight": "lora_up.weight",
    "lora_linear_layer.down.weight": "lora_down.weight", "lora_linear_layer.up.weight": "lora_up.weight",
    "lora_magnitude_vector.weight": "dora_scale", "lora_magnitude_vector": "dora_scale",
}
# kohya prefix -> pipeline component
KOHYA_PREFIXES = (("lora_unet_", "unet"), ("lora_te1_", "text_encoder"), ("lora_te2_", "text_encoder_2"),
                  ("lora_te_", "text_encoder"))
# dotted prefix -> pipeline component (``transformer.``: DiT LoRAs; on a UNet they simply match nothing)
DOTTED_PREFIXES = (("unet.", "unet"), ("transformer.", "unet"), ("text_encoder_2.", "text_encoder_2"),
                   ("text_encoder.", "text_encoder"), ("base_model.model.", "unet"))
# LDM names diffusers' converters drop (see LayerIndex._ldm_by_hand): resnet norm leaf -> (a conv sibling
# diffusers maps, that sibling's diffusers leaf, the norm's diffusers leaf); top-level names.
_LDM_RESNET_NORMS = {"in_layers_0": ("in_layers_2", "conv1", "norm1"),
                     "out_layers_0": ("out_layers_3", "conv2", "norm2")}
_LDM_TOP = {"out_0": "conv_norm_out"}
_LDM_UPSAMPLER = re.compile(r"output_blocks_(\d+)_1_conv")
_MEMO_LIMIT = 200_000   # resolved prefixes remembered per model (a few files' worth; then start over)
PATCHABLE = (torch.nn.Linear, torch.nn.Conv2d, torch.nn.LayerNorm, torch.nn.GroupNorm)


@dataclass
class LayerGroup:
    """The tensors one network stores for one layer: ``{part: tensor}`` (kohya part names)."""
    key: str                      # the prefix as written in the file
    parts: dict[str, torch.Tensor] = field(default_factory=dict)


def split_key(key: str) -> tuple[str, str] | None:
    """``"lora_unet_x.lora_down.weight"`` -> ``("lora_unet_x", "lora_down.weight")``; None if no part matches."""
    for part in PARTS:
        if key.endswith("." + part):
            return key[: -len(part) - 1], _CANONICAL.get(part, part)
    return None


def _normalize_dotted(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Old diffusers spellings (``processor.to_q_lora.down``, ``lora_linear_layer``) -> PEFT names,
    through diffusers' own converters; kohya keys pass untouched."""
    from diffusers.utils.state_dict_utils import (StateDictType, convert_state_dict_to_peft,
                                                  convert_unet_state_dict_to_peft)

    old = {k: v for k, v in state_dict.items() if "_lora." in k or "lora_linear_layer" in k or ".processor." in k}
    if not old:
        return dict(state_dict)
    rest = {k: v for k, v in state_dict.items() if k not in old}
    unet = {k: v for k, v in old.items() if not k.startswith("text_encoder")}
    text = {k: v for k, v in old.items() if k.startswith("text_encoder")}
    rest.update(convert_unet_state_dict_to_peft(unet))
    if text:
        kind = StateDictType.DIFFUSERS_OLD if any("_lora." in k for k in text) else StateDictType.DIFFUSERS
        rest.update(convert_state_dict_to_peft(text, original_type=kind))
    return rest


def group_layers(state_dict: Mapping[str, torch.Tensor]) -> tuple[dict[str, LayerGroup], list[str]]:
    """``{prefix: LayerGroup}`` and the keys that are no network part (reported, not applied)."""
    groups: dict[str, LayerGroup] = {}
    unknown: list[str] = []
    for key, tensor in _normalize_dotted(state_dict).items():
        split = split_key(key)
        if split is None:
            unknown.append(key)
            continue
        prefix, part = split
        groups.setdefault(prefix, LayerGroup(prefix)).parts[part] = tensor
    # a bare ".weight" is a network part only for IA3 (with on_input); elsewhere it is a stray key
    for prefix, group in list(groups.items()):
        if set(group.parts) == {"weight"}:
            unknown.append(f"{prefix}.weight")
            del groups[prefix]
    return groups, unknown


@dataclass(frozen=True)
class LayerRef:
    component: str               # "unet", "text_encoder", "text_encoder_2"
    name: str                    # dotted module name inside that component


class LayerIndex:
    """Every layer of a loaded pipeline a network may change, by dotted and by kohya flat name."""

    def __init__(self, components: Mapping[str, torch.nn.Module], unet_config: Any = None):
        self.modules: dict[LayerRef, torch.nn.Module] = {}
        self._flat: dict[tuple[str, str], LayerRef] = {}
        self._dotted: dict[tuple[str, str], LayerRef] = {}
        self.unet_config = unet_config
        self._memo: dict[str, LayerRef | None] = {}
        for component, root in components.items():
            for name, module in root.named_modules():
                if isinstance(module, PATCHABLE):
                    self._add(component, name, module)

    def _add(self, component: str, name: str, module: torch.nn.Module) -> None:
        ref = LayerRef(component, name)
        self.modules[ref] = module
        # transformers >= 5.6 flattened CLIPTextModel (no ``text_model.``); files still name it
        aliases = [name]
        if component.startswith("text_encoder") and not name.startswith("text_model."):
            aliases.append("text_model." + name)
        for alias in aliases:
            self._dotted[(component, alias)] = ref
            self._flat[(component, alias.replace(".", "_"))] = ref

    def resolve(self, prefix: str) -> LayerRef | None:
        """The layer a file's key prefix names, or None (remembered: LDM names go through diffusers'
        converters, which is slow per key, and switching back to a file resolves the same names)."""
        try:
            return self._memo[prefix]
        except KeyError:
            pass
        if len(self._memo) >= _MEMO_LIMIT:
            self._memo.clear()
        found = self._memo[prefix] = self._resolve(prefix)
        return found

    def _resolve(self, prefix: str) -> LayerRef | None:
        for start, component in KOHYA_PREFIXES:
            if prefix.startswith(start):
                flat = prefix[len(start):]
                found = self._flat.get((component, flat))
                if found is None and component == "unet":
                    found = self._resolve_ldm_unet(prefix)
                return found
        for start, component in DOTTED_PREFIXES:
            if prefix.startswith(start):
                return self._dotted.get((component, prefix[len(start):]))
        return self._dotted.get(("unet", prefix))

    def _resolve_ldm_unet(self, prefix: str) -> LayerRef | None:
        """``lora_unet_input_blocks_4_1_...`` (SGM/LDM names): diffusers' kohya converters, then our own
        mapping of the names they drop (norm layers, the upsampler of a block without attention)."""
        return self._ldm_via_diffusers(prefix) or self._ldm_by_hand(prefix)

    def _ldm_by_hand(self, prefix: str) -> LayerRef | None:
        """Hand-written (no library maps these LDM names): a resnet's ``in_layers_0``/``out_layers_0``
        norm is found through its conv sibling, which diffusers maps (that fixes the block numbering);
        ``out_0`` is ``conv_norm_out``; ``output_blocks_N_1_conv`` the upsampler of an up block whose
        index 1 is no attention (SD1/SD2's first up block)."""
        flat = prefix.removeprefix("lora_unet_")
        if flat in _LDM_TOP:
            return self._dotted.get(("unet", _LDM_TOP[flat]))
        for leaf, (sibling, sibling_leaf, wanted) in _LDM_RESNET_NORMS.items():
            if flat.endswith("_" + leaf):
                ref = self._ldm_via_diffusers(prefix[: -len(leaf)] + sibling)
                if ref is not None and ref.name.endswith("." + sibling_leaf):
                    return self._dotted.get(("unet", ref.name[: -len(sibling_leaf)] + wanted))
                return None
        match = _LDM_UPSAMPLER.fullmatch(flat)
        if match:
            ref = self._ldm_via_diffusers(f"lora_unet_output_blocks_{match.group(1)}_0_in_layers_2")
            block, _, rest = ref.name.partition(".resnets.") if ref is not None else ("", "", "")
            last = rest.split(".")[0]
            if rest and self._dotted.get(("unet", f"{block}.resnets.{int(last) + 1}.conv1")) is None:
                return self._dotted.get(("unet", f"{block}.upsamplers.0.conv"))
        return None

    def _ldm_via_diffusers(self, prefix: str) -> LayerRef | None:
        """``lora_unet_input_blocks_4_1_...`` (SGM/LDM names) through diffusers' kohya converters."""
        from diffusers.loaders.lora_conversion_utils import (_convert_unet_lora_key,
                                                             _maybe_map_sgm_blocks_to_diffusers)
        from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft

        key = prefix + ".lora_down.weight"
        if self.unet_config is not None:
            try:
                key = next(iter(_maybe_map_sgm_blocks_to_diffusers({key: None}, self.unet_config)))
            except (ValueError, IndexError, KeyError):
                return None
        flat = key.split(".", 1)[0].removeprefix("lora_unet_")
        found = self._flat.get(("unet", flat))
        if found is not None:
            return found
        try:
            dotted = next(iter(convert_unet_state_dict_to_peft({_convert_unet_lora_key(key): None})))
        except (ValueError, IndexError, KeyError):
            return None
        return self._dotted.get(("unet", dotted.removesuffix(".lora_A.weight")))


def resolve_all(groups: Iterable[str], index: LayerIndex) -> tuple[dict[str, LayerRef], list[str]]:
    """``{prefix: layer}`` for the prefixes that name a layer, and those that name none."""
    found: dict[str, LayerRef] = {}
    missing: list[str] = []
    for prefix in groups:
        ref = index.resolve(prefix)
        if ref is None:
            missing.append(prefix)
        else:
            found[prefix] = ref
    return found, missing

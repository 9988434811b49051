"""sd-webui-controlnet's reference preprocessors (reference_only, reference_adain, reference_adain+attn):
attention injection inside our own sampling loop, with no ControlNet model.

Before each UNet call in a unit's guidance window, the reference image's latents, noised to that
call's timestep, run through the same UNet in a "write" pass (same timestep, prompts and rows):

* reference_only: each self-attention stores its input (the normed hidden states);
* reference_adain: chosen down/mid/up blocks store the per-channel mean and variance of their output.

The main call then reads them: self-attention attends to [its own tokens + the stored reference
tokens]; AdaIN renormalises those blocks' outputs to the stored statistics. Which blocks take part
follows the unit's weight as in the extension (attention blocks sorted widest first, block i of n
takes part when weight > i / n; AdaIN blocks have the extension's fixed per-block thresholds).
"Style fidelity" (threshold_a, or 1 for "ControlNet is more important", 0 for "My prompt is more
important" and in the hires pass; cubed on SDXL as the extension does) keeps the unconditional rows
free of the reference by that fraction, so CFG pushes towards it.

Re-implemented from the extension's documented behaviour (hook.py); the mechanism is ours: the
self-attentions get a wrapping diffusers attention processor, the AdaIN blocks a forward hook, both
installed only for the duration of one UNet call (write pass + main call) and then removed, so the
UNet is exactly what it was before. The one difference: the extension leaves the attention blocks in
"read" mode during an AdaIN-only unit's write pass (a second reference unit can then consume the
first one's bank); here a write pass only writes.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from PIL import Image

from modules.core.controlnet_units import CONTROL_MODES, REFERENCE_MODULES

ATTN_MODULES = ("reference_only", "reference_adain+attn")
ADAIN_MODULES = ("reference_adain", "reference_adain+attn")
DEFAULT_STYLE_FIDELITY = 0.5   # the extension's slider default (threshold_a out of 0..1 falls back to it)
_EPS = 1e-6
# The extension's AdaIN blocks, as LDM input/output block indices (diffusers layers mapped below).
_ADAIN_BLOCKS = {False: ((4, 5, 7, 8, 10, 11), tuple(range(8))), True: ((4, 5, 7, 8), tuple(range(6)))}

OFF, WRITE, READ = "off", "write", "read"


def is_reference(module: str) -> bool:
    return module in REFERENCE_MODULES


@dataclass
class ReferenceHost:
    """What the injector needs from the checkpoint: its UNet, a VAE encoder (PIL -> scaled latents),
    the noise schedule, whether it is SDXL, and a seed for the reference's noise."""
    unet: Any
    encode: Callable[[list[Image.Image]], torch.Tensor]
    scheduler_config: Any
    is_sdxl: bool
    seed: int = 0

    @classmethod
    def for_model(cls, model: Any, encode: Callable[[list[Image.Image]], torch.Tensor], seed: int) -> "ReferenceHost":
        return cls(unet=model.pipe.unet, encode=encode, scheduler_config=model.pipe.scheduler.config,
                   is_sdxl=bool(model.spec.family_info.is_sdxl), seed=int(seed) & 0xFFFFFFFFFFFFFFFF)

    def alphas_cumprod(self) -> torch.Tensor:
        """The training schedule (what the extension's q_sample uses), from the checkpoint's scheduler config."""
        from diffusers import DDPMScheduler

        return DDPMScheduler.from_config(self.scheduler_config).alphas_cumprod.float()


@dataclass
class _State:
    """Shared by every installed processor and hook during one UNet call."""
    attn: str = OFF
    gn: str = OFF
    weight: float = 0.0
    fidelity: float = 0.0
    uncond: slice = field(default_factory=lambda: slice(0, 0))   # the main call's unconditional rows


@dataclass
class _Slot:
    """One block's threshold and what the write passes stored for it."""
    threshold: float
    bank: list = field(default_factory=list)      # attention: [rows, tokens, C]; AdaIN: (mean, var) pairs
    fidelities: list = field(default_factory=list)

    def clear(self) -> None:
        self.bank.clear()
        self.fidelities.clear()

    def fidelity(self) -> float:
        return sum(self.fidelities) / len(self.fidelities)


class ReferenceAttnProcessor:
    """Wraps a self-attention's processor: stores its input (write) or adds the stored tokens to its
    keys and values (read); otherwise the wrapped processor runs unchanged."""

    def __init__(self, inner: Any, slot: _Slot, state: _State):
        self.inner, self.slot, self.state = inner, slot, state
        # Fused-QKV processors project keys from the query input only; with separate reference tokens the
        # read uses the plain SDPA processor (the unfused to_q/to_k/to_v stay on the module).
        self.with_context = inner
        if type(inner).__name__.startswith("Fused"):
            from diffusers.models.attention_processor import AttnProcessor2_0

            self.with_context = AttnProcessor2_0()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        state, slot = self.state, self.slot
        if state.attn == WRITE and state.weight > slot.threshold:
            slot.bank.append(hidden_states.detach().clone())
            slot.fidelities.append(state.fidelity)
        elif state.attn == READ and slot.bank and encoder_hidden_states is None:
            return self._read(attn, hidden_states, attention_mask, **kwargs)
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, **kwargs)

    def _read(self, attn, hidden_states, attention_mask, **kwargs):
        fidelity = self.slot.fidelity()
        context = torch.cat([hidden_states, *(b.to(hidden_states.dtype) for b in self.slot.bank)], dim=1)
        self.slot.clear()
        with_ref = self.with_context(attn, hidden_states, context, attention_mask, **kwargs)
        uncond = self.state.uncond
        if uncond.stop <= uncond.start or fidelity <= 1e-5:
            return with_ref
        # Unconditional rows without the reference, blended in by the style fidelity.
        plain = self.inner(attn, hidden_states[uncond], None, attention_mask, **kwargs)
        cond_only = with_ref.clone()
        cond_only[uncond] = plain.to(cond_only.dtype)
        return fidelity * cond_only + (1.0 - fidelity) * with_ref


def _adain_hook(slot: _Slot, state: _State):
    def hook(module, args, output):
        tensor = output[0] if isinstance(output, tuple) else output
        if state.gn == WRITE and state.weight > slot.threshold:
            var, mean = torch.var_mean(tensor, dim=(2, 3), keepdim=True, correction=0)
            slot.bank.append((mean, var))
            slot.fidelities.append(state.fidelity)
        elif state.gn == READ and slot.bank:
            tensor = _adain(tensor, slot, state.uncond)
            slot.clear()
            return (tensor, *output[1:]) if isinstance(output, tuple) else tensor
        return None
    return hook


def _adain(x: torch.Tensor, slot: _Slot, uncond: slice) -> torch.Tensor:
    """x renormalised to the stored per-channel statistics (averaged over the write passes)."""
    fidelity = slot.fidelity()
    var, mean = torch.var_mean(x, dim=(2, 3), keepdim=True, correction=0)
    std = var.clamp_min(_EPS) ** 0.5
    ref_mean = sum(m for m, _ in slot.bank) / len(slot.bank)
    ref_std = (sum(v for _, v in slot.bank) / len(slot.bank)).clamp_min(_EPS) ** 0.5
    styled = (x - mean) / std * ref_std + ref_mean
    if uncond.stop > uncond.start and fidelity > 1e-5:
        cond_only = styled.clone()
        cond_only[uncond] = x[uncond].to(cond_only.dtype)
        styled = fidelity * cond_only + (1.0 - fidelity) * styled
    return styled.to(x.dtype)


# ---------------------------------------------------------------- which blocks


def attention_blocks(unet) -> list[Any]:
    """The self-attention transformer blocks in LDM order (down, mid, up), widest first (stable)."""
    from diffusers.models.attention import BasicTransformerBlock

    found = []
    for part in (unet.down_blocks, unet.mid_block, unet.up_blocks):
        if part is not None:
            found += [m for m in part.modules() if isinstance(m, BasicTransformerBlock) and not m.only_cross_attention]
    return sorted(found, key=lambda b: -b.attn1.query_dim)


def _layer_output(block, j: int):
    attentions = getattr(block, "attentions", None)
    return attentions[j] if attentions is not None and j < len(attentions) else block.resnets[j]


def ldm_blocks(unet) -> tuple[list[Any], list[Any]]:
    """The modules whose outputs are the LDM UNet's input_blocks[i] / output_blocks[i] outputs
    (conv_in and the downsamplers are input blocks of their own; an upsampler ends its up block's last one)."""
    inputs: list[Any] = [unet.conv_in]
    for block in unet.down_blocks:
        inputs += [_layer_output(block, j) for j in range(len(block.resnets))]
        if block.downsamplers:
            inputs.append(block.downsamplers[0])
    outputs: list[Any] = []
    for block in unet.up_blocks:
        layers = [_layer_output(block, j) for j in range(len(block.resnets))]
        if block.upsamplers:
            layers[-1] = block.upsamplers[0]
        outputs += layers
    return inputs, outputs


def adain_blocks(unet, is_sdxl: bool) -> list[tuple[Any, float]]:
    """(module, threshold): the extension's middle block (0), input blocks (falling 2 -> 0) and output
    blocks (rising 0 -> 2); indices past a small UNet's end are skipped."""
    inputs, outputs = ldm_blocks(unet)
    in_idx, out_idx = _ADAIN_BLOCKS[is_sdxl]
    picked: list[tuple[Any, float]] = [(unet.mid_block, 0.0)] if unet.mid_block is not None else []
    picked += [(inputs[i], 2.0 * (1.0 - w / len(in_idx))) for w, i in enumerate(in_idx) if i < len(inputs)]
    picked += [(outputs[i], 2.0 * w / len(out_idx)) for w, i in enumerate(out_idx) if i < len(outputs)]
    return picked


# ---------------------------------------------------------------- the injector


def style_fidelity(threshold_a: float, control_mode: str, is_sdxl: bool, hires: bool) -> float:
    _, prompt_more, control_more = CONTROL_MODES
    if control_mode == control_more:
        return 1.0
    if control_mode == prompt_more or hires:
        return 0.0
    value = threshold_a if 0.0 <= threshold_a <= 1.0 else DEFAULT_STYLE_FIDELITY
    return value ** 3.0 if is_sdxl else value


class ReferenceInjector:
    """The reference units of one pass (first pass or hires): their latents at that pass's size."""

    def __init__(self, units: list[Any], images: list[Image.Image], host: ReferenceHost, *, hires: bool = False):
        self.units, self.host, self.hires = units, host, hires
        unet = host.unet
        if unet.config.in_channels not in (4, 9):
            raise ValueError(f"the reference preprocessors need a 4- or 9-channel UNet; this checkpoint's has "
                             f"{unet.config.in_channels} (depth or instruct models)")
        self.latents = [host.encode([image]) for image in images]
        self.state = _State()
        blocks = attention_blocks(unet)
        self.attn = [(b.attn1, _Slot(i / len(blocks))) for i, b in enumerate(blocks)]
        self.adain = [(m, _Slot(t)) for m, t in adain_blocks(unet, host.is_sdxl)]
        self.generator = torch.Generator("cpu").manual_seed(host.seed)
        self.alphas_cumprod = host.alphas_cumprod()

    def fidelity(self, unit) -> float:
        return style_fidelity(unit.threshold_a, unit.control_mode, self.host.is_sdxl, self.hires)

    @contextmanager
    def scope(self, x, t, embeds, added, n_cond: int, step: int, total: int) -> Iterator[None]:
        """Around one UNet call: the write passes of the units in their window, then the processors
        and hooks read during the call; everything is removed afterwards, whatever happens."""
        fraction = step / max(total, 1)
        active = [(u, lat) for u, lat in zip(self.units, self.latents)
                  if u.guidance_start <= fraction < u.guidance_end]
        if not active:
            yield
            return
        handles: tuple[list, list] = ([], [])
        try:
            self._install(*handles)
            for unit, latents in active:
                self._write(unit, latents, x, t, embeds, added)
            self.state.attn = self.state.gn = READ
            self.state.uncond = slice(n_cond, x.shape[0])
            yield
        finally:
            self._remove(handles)

    def _install(self, originals: list, hooks: list) -> None:
        """Filled as it goes, so that _remove undoes exactly what was done even after an error."""
        for attn, slot in self.attn:
            originals.append((attn, attn.processor))
            attn.set_processor(ReferenceAttnProcessor(attn.processor, slot, self.state))
        for module, slot in self.adain:
            hooks.append(module.register_forward_hook(_adain_hook(slot, self.state)))

    def _remove(self, handles: tuple[list, list]) -> None:
        originals, hooks = handles
        for attn, processor in originals:
            attn.set_processor(processor)
        for hook in hooks:
            hook.remove()
        for _, slot in (*self.attn, *self.adain):
            slot.clear()
        self.state.attn = self.state.gn = OFF

    def _write(self, unit, latents: torch.Tensor, x, t, embeds, added) -> None:
        """One UNet pass of the reference noised to `t`, storing what the unit's kind reads."""
        unet = self.host.unet
        rows = x.shape[0]
        clean = latents.to(device=x.device, dtype=torch.float32).expand(rows, -1, -1, -1)
        noisy = self._q_sample(clean, t)
        if unet.config.in_channels == 9:   # inpainting UNets: nothing masked, the reference as the image
            noisy = torch.cat([noisy, torch.zeros_like(noisy[:, :1]), clean], dim=1)
        self.state.attn = WRITE if unit.module in ATTN_MODULES else OFF
        self.state.gn = WRITE if unit.module in ADAIN_MODULES else OFF
        self.state.weight, self.state.fidelity = float(unit.weight), self.fidelity(unit)
        try:
            unet(noisy.to(unet.dtype), t, encoder_hidden_states=embeds.to(unet.dtype), added_cond_kwargs=added,
                 return_dict=False)
        finally:
            self.state.attn = self.state.gn = OFF

    def _q_sample(self, clean: torch.Tensor, t) -> torch.Tensor:
        """The reference at the call's timestep in the UNet's input space: sqrt(a) x0 + sqrt(1 - a) noise."""
        table = self.alphas_cumprod
        index = int(torch.as_tensor(t).float().round().clamp(0, len(table) - 1).reshape(-1)[0])
        alpha = float(table[index])
        noise = torch.randn(clean.shape, generator=self.generator, dtype=torch.float32).to(clean.device)
        return alpha ** 0.5 * clean + (1.0 - alpha) ** 0.5 * noise

"""The denoising loop: diffusers' UNet and schedulers, A1111's guidance.

We own the loop (rather than calling a pipeline's __call__) because A1111's
features live inside it: conditioning that changes per step (prompt editing,
alternation), AND-weighted sub-prompts, per-image generators for ancestral
noise, latent-mask inpainting, live previews, interrupt and skip, and the
cfg_denoiser callbacks extensions hook into. Each step does exactly what a
diffusers pipeline step does: scale_model_input -> UNet -> CFG -> step.
"""
from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch


@dataclass
class StepConds:
    """The conditioning for one step, for the whole batch.

    `cond` rows are grouped per image: image i owns `cond_counts[i]` rows, with
    `cond_weights` their AND weights (1.0 each without AND).
    """
    cond: torch.Tensor                 # [sum(cond_counts), L, D]
    uncond: torch.Tensor               # [B, L, D]
    cond_counts: list[int]
    cond_weights: list[float]
    cond_pooled: torch.Tensor | None = None    # SDXL: [sum(cond_counts), P]
    uncond_pooled: torch.Tensor | None = None  # SDXL: [B, P]


@dataclass
class DenoiserParams:
    """What an on_cfg_denoiser callback may read and change (A1111's CFGDenoiserParams)."""
    x: torch.Tensor
    image_cond: torch.Tensor | None
    sigma: torch.Tensor
    sampling_step: int
    total_sampling_steps: int
    text_cond: torch.Tensor
    text_uncond: torch.Tensor


@dataclass
class SamplingHooks:
    on_cfg_denoiser: list[Callable[[DenoiserParams], None]] = field(default_factory=list)
    on_cfg_denoised: list[Callable[..., None]] = field(default_factory=list)


@dataclass
class InpaintBlend:
    """Latent masking for ordinary (4-channel) models: outside the mask the
    latents are reset each step to the original image noised to that step."""
    init_latents: torch.Tensor   # [B, 4, h, w], clean
    mask: torch.Tensor           # [B, 1, h, w], 1 = repaint
    noise: torch.Tensor          # [B, 4, h, w]


class GuidedDenoiser:
    """Classifier-free guidance with A1111's composable (AND) weighting."""

    def __init__(self, unet, *, time_ids: torch.Tensor | None = None, uncond_time_ids: torch.Tensor | None = None,
                 image_cond: torch.Tensor | None = None, hooks: SamplingHooks | None = None,
                 control: Any = None):
        self.unet = unet
        self.dtype = unet.dtype  # diffusers' ModelMixin.dtype walks every submodule: read it once, not per step
        self.time_ids = time_ids                # SDXL: [B, n] for cond rows (expanded per image)
        self.uncond_time_ids = uncond_time_ids  # SDXL refiner differs (aesthetic score)
        self.image_cond = image_cond            # 9-channel inpainting: [B, 5, h, w] mask + masked-image latents
        self.hooks = hooks or SamplingHooks()
        self.control = control if control else None   # engine.control.units.ControlApplier: ControlNet residuals
        self._step = (0, 1)
        self._index_cache: dict[tuple[int, ...], torch.Tensor] = {}

    def __call__(self, x: torch.Tensor, t, conds: StepConds, cfg_scale: float, step: int, total: int) -> torch.Tensor:
        batch = x.shape[0]
        self._step = (step, total)
        index = self._row_index(tuple(conds.cond_counts), x.device)
        simple = index.shape[0] == batch and all(w == 1.0 for w in conds.cond_weights)  # no AND: one row per image
        x_cond = x if simple else x[index]
        params = DenoiserParams(x=x, image_cond=self.image_cond, sigma=torch.as_tensor(t), sampling_step=step,
                                total_sampling_steps=total, text_cond=conds.cond, text_uncond=conds.uncond)
        for hook in self.hooks.on_cfg_denoiser:
            hook(params)
        cond, uncond = params.text_cond, params.text_uncond

        use_cfg = cfg_scale != 1.0
        all_images = torch.arange(batch, device=x.device)
        n_cond = index.shape[0]
        if use_cfg and cond.shape[1] == uncond.shape[1]:
            # One batched call, as diffusers does; A1111 also batches when the lengths agree.
            pooled = None if conds.cond_pooled is None else torch.cat([conds.cond_pooled, conds.uncond_pooled])
            ids = None if self.time_ids is None else torch.cat([self.time_ids[index], self.uncond_time_ids])
            both = self._unet(torch.cat([x_cond, x]), t, torch.cat([cond, uncond]), torch.cat([index, all_images]),
                              pooled, ids, ids_per_row=True, n_cond=n_cond)
            out_cond, out_uncond = both[:n_cond], both[n_cond:]
        else:
            out_cond = self._unet(x_cond, t, cond, index, conds.cond_pooled, self.time_ids, n_cond=n_cond)
            # Different token lengths: a separate call, A1111's default (cond and uncond are not padded).
            out_uncond = self._unet(x, t, uncond, all_images, conds.uncond_pooled, self.uncond_time_ids) if use_cfg else None
        if simple:
            # The plain CFG formula, exactly as diffusers' pipelines compute it.
            result = out_uncond + cfg_scale * (out_cond - out_uncond) if use_cfg else out_cond
        else:
            # AND: each sub-prompt pulls away from its image's uncond by its own weight.
            weights = torch.tensor(conds.cond_weights, device=out_cond.device, dtype=out_cond.dtype).view(-1, 1, 1, 1)
            if use_cfg:
                result = out_uncond.clone()
                result.index_add_(0, index, (out_cond - out_uncond[index]) * weights * cfg_scale)
            else:
                result = torch.zeros_like(x, dtype=out_cond.dtype)
                result.index_add_(0, index, out_cond * weights)
        for hook in self.hooks.on_cfg_denoised:
            hook(result, step, total, inner_model=self.unet)
        return result

    def _row_index(self, counts: tuple[int, ...], device) -> torch.Tensor:
        """Which image each cond row belongs to; the same every step, so built once."""
        cached = self._index_cache.get(counts)
        if cached is None:
            cached = torch.tensor([i for i, c in enumerate(counts) for _ in range(c)], device=device)
            self._index_cache[counts] = cached
        return cached

    def _unet(self, x, t, embeds, rows, pooled, time_ids, *, ids_per_row: bool = False, n_cond: int = 0):
        """One UNet call; `rows` maps each row to its image (for image_cond and SDXL time ids); the
        first `n_cond` rows are conditional (ControlNet's "ControlNet is more important" reads it)."""
        added = None
        if pooled is not None:
            added = {"text_embeds": pooled, "time_ids": time_ids if ids_per_row else time_ids[rows]}
        residuals = {}
        reference = contextlib.nullcontext()
        if self.control is not None:  # from the 4 latent channels, before inpainting models' extra ones
            found = self.control.residuals(x, t, embeds, added, n_cond, *self._step) or {}
            residuals = {k: [r.to(self.dtype) for r in v] if isinstance(v, list) else v.to(self.dtype)
                         for k, v in found.items()}
            reference = self.control.reference_scope(x, t, embeds, added, n_cond, *self._step)
        x_latent = x
        if self.image_cond is not None:
            x = torch.cat([x, self.image_cond[rows]], dim=1)
        with reference:   # reference_* units: their write pass, then attention injection in this call
            out = self.unet(x, t, encoder_hidden_states=embeds.to(self.dtype),
                            added_cond_kwargs=added, return_dict=False, **residuals)[0]
        if self.control is not None:  # tile_colorfix / inpaint_only change the prediction (control/postprocess.py)
            out = self.control.adjust_prediction(x_latent, t, out, n_cond)
        return out


def _step_accepts_generator(scheduler) -> bool:
    return "generator" in inspect.signature(scheduler.step).parameters


def sample(
    *,
    scheduler,
    denoiser: GuidedDenoiser,
    latents: torch.Tensor,
    timesteps: Sequence,
    conds_at: Callable[[int], StepConds],
    cfg_scale: float,
    generators: list[torch.Generator] | None = None,
    inpaint: InpaintBlend | None = None,
    on_step: Callable[[int, int, torch.Tensor], None] | None = None,
    should_stop: Callable[[], bool] = lambda: False,
    step_offset: int = 0,
    total_steps: int | None = None,
) -> torch.Tensor:
    """Run the scheduler over `timesteps`; returns the final latents.

    `step_offset`/`total_steps` place a partial run (img2img, hires) on the
    prompt-editing timeline, as A1111 counts steps.
    """
    total = total_steps or len(timesteps)
    step_kwargs = {"generator": generators} if generators and _step_accepts_generator(scheduler) else {}
    for i, t in enumerate(timesteps):
        if should_stop():
            break
        step = step_offset + i
        x_in = scheduler.scale_model_input(latents, t)
        model_out = denoiser(x_in, t, conds_at(step), cfg_scale, step, total)
        latents = scheduler.step(model_out, t, latents, return_dict=False, **step_kwargs)[0]
        if inpaint is not None:
            if i + 1 < len(timesteps):
                known = scheduler.add_noise(inpaint.init_latents, inpaint.noise, timesteps[i + 1:i + 2])
            else:
                known = inpaint.init_latents
            latents = (known * (1 - inpaint.mask) + latents * inpaint.mask).to(latents.dtype)
        if on_step is not None:
            on_step(step + 1, total, latents)
    return latents

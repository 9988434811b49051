"""The refiner (A1111 1.6+): part way through sampling, a second checkpoint of the same latent space
takes over, on the same latents and with the same scheduler (its state, noise and sigmas continue).

The core hands the job's refiner to the engine as ``ctx.refiner`` (``core.refiner.JobRefiner``):
``switch_at``, ``hires_pass`` (A1111's "Refiner in hires fix" setting), ``aesthetic_scores``,
``load_refiner()``/``load_base()`` -> (model, prompt encoder), and per-batch state. ``diffusion``
asks this module at four points of a batch: make sure the base is loaded (with
``sd_checkpoints_limit`` 1 the previous batch swapped it out), wrap a pass's denoiser and
conditioning so they switch at the right call, which model the hires pass runs on, and which model
decodes. It never imports ``diffusion`` (the refiner's denoiser is built by a callable it is given).
"""
from __future__ import annotations

import copy
import math
from typing import Any, Callable

FIRST_PASS, SECOND_PASS, BOTH_PASSES = "first pass", "second pass", "both passes"

# (model, encoder) -> (denoiser, conds_at) for the refiner, built by diffusion for one pass.
Builder = Callable[[Any, Any], tuple[Any, Callable[[int], Any]]]


def switch_call(switch_at: float, n_calls: int) -> int:
    """How many denoiser calls the base makes: A1111 switches at the first call i with i / n >= switch_at
    (counting calls, as its CFG denoiser does), so 1.0 never switches."""
    return min(n_calls, math.ceil(round(switch_at * n_calls, 9)))


def begin_batch(ctx) -> None:
    """Before a batch: forget the last batch's switch, and reload the base if the refiner evicted it."""
    refiner = getattr(ctx, "refiner", None)
    if refiner is None:
        return
    refiner.active = None
    if not ctx.model.is_loaded:
        ctx.model, ctx.encoder = refiner.load_base()


def _applies(refiner, *, hires: bool, hires_enabled: bool) -> bool:
    if refiner.active is not None:
        return False  # already switched in this batch: the rest runs on the refiner
    if not hires_enabled:
        return not hires
    if hires:
        return refiner.hires_pass in (SECOND_PASS, BOTH_PASSES)
    return refiner.hires_pass in (FIRST_PASS, BOTH_PASSES)


def wrap(ctx, denoiser, conds_at: Callable[[int], Any], n_calls: int, *, hires: bool, hires_enabled: bool,
         build: Builder) -> tuple[Any, Callable[[int], Any]]:
    """The pass's (denoiser, conds_at), switching to the refiner at the right call when it applies."""
    refiner = getattr(ctx, "refiner", None)
    if refiner is None or not _applies(refiner, hires=hires, hires_enabled=hires_enabled):
        return denoiser, conds_at
    at = switch_call(refiner.switch_at, n_calls)
    if at >= n_calls:
        return denoiser, conds_at
    switching = _Switching(refiner, denoiser, conds_at, at, build)
    return switching, switching.conds_at


class _Switching:
    """A denoiser that is the base's for calls < `at` and the refiner's from then on. The refiner is
    loaded at its first call, so an interrupted job never loads it."""

    def __init__(self, refiner, base, base_conds: Callable[[int], Any], at: int, build: Builder):
        self.refiner, self.base, self.base_conds, self.at, self.build = refiner, base, base_conds, at, build
        self.late = None
        self.late_conds: Callable[[int], Any] | None = None

    def conds_at(self, step: int):
        if step < self.at:
            return self.base_conds(step)
        if self.late is None:
            model, encoder = self.refiner.load_refiner()
            self.late, self.late_conds = self.build(model, encoder)
            self.refiner.active = (model, encoder)
            self.refiner.used = True
            self.base = None  # let the base's UNet go once nothing else holds it
        return self.late_conds(step)

    def __call__(self, x, t, conds, cfg_scale: float, step: int, total: int):
        denoiser = self.base if step < self.at else self.late
        return denoiser(x, t, conds, cfg_scale, step, total)


def current_model(ctx, model):
    """The model the rest of the batch runs on: the refiner once it has taken over, else `model`."""
    refiner = getattr(ctx, "refiner", None)
    active = getattr(refiner, "active", None)
    return model if active is None else active[0]


def context_for(ctx, model):
    """`ctx` for a pass on `model` (the hires pass after the refiner took over): its encoder with it."""
    refiner = getattr(ctx, "refiner", None)
    active = getattr(refiner, "active", None)
    if active is None or model is not active[0]:
        return ctx
    out = copy.copy(ctx)
    out.model, out.encoder = active
    return out

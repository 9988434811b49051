"""The diffusers side of the sampler catalog: scheduler classes, and a fresh scheduler per job.

Kept apart from ``sampler_catalog`` so that the name-level half (dropdowns,
request validation, ``/sdapi/v1/samplers``) can be imported at web UI startup
without torch/numpy/diffusers; this module pulls them in and is only imported
when a job actually builds a scheduler.
"""
from __future__ import annotations

import inspect
import math
from typing import Any, Mapping

import diffusers
import numpy as np
import torch
from diffusers import EulerAncestralDiscreteScheduler
from diffusers.configuration_utils import register_to_config
from diffusers.schedulers.scheduling_lms_discrete import LMSDiscreteScheduler as _DiffusersLMS
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from modules.engine.sampler_catalog import (
    HAVE_SCIPY,
    SamplerChoice,
    UnsupportedScheduleError,
    _check_supported,
    get_schedule,
)

__all__ = [
    "EulerAncestralKScheduler",
    "LMSExactScheduler",
    "scheduler_class",
    "build_scheduler",
    "total_steps",
]


# ---------------------------------------------------------------------------
# Sigma helpers
# ---------------------------------------------------------------------------


def _karras(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    # Karras et al. 2022, eq. 5: equal steps in sigma^(1/rho).
    ramp = np.linspace(0.0, 1.0, n)
    lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def _exponential(sigma_min: float, sigma_max: float, n: int) -> np.ndarray:
    return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), n))


def _beta(sigma_min: float, sigma_max: float, n: int, alpha: float = 0.6, beta: float = 0.6) -> np.ndarray:
    import scipy.stats  # only reachable when HAVE_SCIPY

    ppf = scipy.stats.beta.ppf(1.0 - np.linspace(0.0, 1.0, n), alpha, beta)
    return sigma_min + ppf * (sigma_max - sigma_min)


def _sigmas_to_timesteps(sigmas: np.ndarray, train_sigmas: np.ndarray) -> np.ndarray:
    # Fractional training timestep for each sigma, interpolating in log-sigma
    # (train_sigmas increase with t).
    log_train = np.log(train_sigmas)
    return np.interp(np.log(np.maximum(sigmas, 1e-10)), log_train, np.arange(len(train_sigmas)))


# ---------------------------------------------------------------------------
# Scheduler subclasses that fill diffusers gaps
# ---------------------------------------------------------------------------


class EulerAncestralKScheduler(EulerAncestralDiscreteScheduler):
    """EulerAncestralDiscreteScheduler plus Karras/Exponential/Beta sigmas.

    diffusers' Euler a only spaces timesteps; A1111 lets "Euler a" use any
    schedule type, and "Euler a + Karras" is common, so the three sigma options
    of EulerDiscreteScheduler are added here with the same config names.
    """

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: np.ndarray | list[float] | None = None,
        prediction_type: str = "epsilon",
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
    ) -> None:
        if sum((use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas)) > 1:
            raise ValueError("Only one of use_karras_sigmas/use_exponential_sigmas/use_beta_sigmas may be set")
        if use_beta_sigmas and not HAVE_SCIPY:
            raise ImportError("Beta sigmas need scipy")
        super().__init__(
            num_train_timesteps=num_train_timesteps,
            beta_start=beta_start,
            beta_end=beta_end,
            beta_schedule=beta_schedule,
            trained_betas=trained_betas,
            prediction_type=prediction_type,
            timestep_spacing=timestep_spacing,
            steps_offset=steps_offset,
            rescale_betas_zero_snr=rescale_betas_zero_snr,
        )

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        super().set_timesteps(num_inference_steps, device=device)
        cfg = self.config
        if not (cfg.use_karras_sigmas or cfg.use_exponential_sigmas or cfg.use_beta_sigmas):
            return
        train = ((1 - self.alphas_cumprod) / self.alphas_cumprod).numpy() ** 0.5
        lo, hi = float(train[0]), float(train[-1])
        if cfg.use_karras_sigmas:
            sigmas = _karras(lo, hi, num_inference_steps)
        elif cfg.use_exponential_sigmas:
            sigmas = _exponential(lo, hi, num_inference_steps)
        else:
            sigmas = _beta(lo, hi, num_inference_steps)
        timesteps = _sigmas_to_timesteps(sigmas, train).astype(np.float32)
        self.timesteps = torch.from_numpy(timesteps).to(device=device)
        # the parent keeps sigmas on CPU to avoid device syncs in step()
        self.sigmas = torch.from_numpy(np.concatenate([sigmas, [0.0]]).astype(np.float32))
        self._step_index = None
        self._begin_index = None


class LMSExactScheduler(_DiffusersLMS):
    """LMSDiscreteScheduler whose coefficients need no scipy.

    diffusers integrates the Lagrange basis polynomial with scipy's quadrature;
    that polynomial (degree < 4) integrates exactly with numpy, so the results
    are the same and LMS works whether or not scipy is installed.
    """

    def get_lms_coefficient(self, order: int, t: int, current_order: int) -> float:
        sig = [float(self.sigmas[t - k]) for k in range(order)]
        poly = np.polynomial.Polynomial([1.0])
        for k in range(order):
            if k == current_order:
                continue
            poly = poly * np.polynomial.Polynomial([-sig[k], 1.0]) / (sig[current_order] - sig[k])
        anti = poly.integ()
        return float(anti(float(self.sigmas[t + 1])) - anti(float(self.sigmas[t])))


# Subclasses defined here win over diffusers' classes of the same name.
_LOCAL_CLASSES: dict[str, type[SchedulerMixin]] = {
    cls.__name__: cls for cls in (EulerAncestralKScheduler, LMSExactScheduler)
}


def scheduler_class(name: str) -> type[SchedulerMixin]:
    """The scheduler class a ``SamplerInfo`` names (one of ours, else diffusers')."""
    cls = _LOCAL_CLASSES.get(name)
    if cls is None:
        cls = getattr(diffusers, name, None)
    if not (isinstance(cls, type) and issubclass(cls, SchedulerMixin)):
        raise LookupError(f"No scheduler class named {name!r}")
    return cls


# ---------------------------------------------------------------------------
# Building
# ---------------------------------------------------------------------------

# Keys of a model's scheduler config that describe the *model* (its training
# noise schedule and parameterisation).  Everything else in the config is a
# solver/schedule option and is reset to the class default for each job.
_MODEL_KEYS = (
    "num_train_timesteps",
    "beta_start",
    "beta_end",
    "beta_schedule",
    "trained_betas",
    "prediction_type",
    "steps_offset",
    "rescale_betas_zero_snr",
    "timestep_spacing",  # kept only for samplers whose Automatic is the model's own spacing
)


def _init_params(cls: type) -> set[str]:
    return {p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "args", "kwargs")}


def build_scheduler(choice: SamplerChoice, base_config: Mapping[str, Any]) -> SchedulerMixin:
    """A fresh scheduler for one job.

    ``base_config`` is the model's scheduler config (``pipe.scheduler.config`` or
    the ``scheduler_config.json`` dict).  Only the model-describing keys are
    taken from it; solver options left by any previous job (e.g.
    ``use_karras_sigmas``, ``algorithm_type``) never leak into this one.
    """
    info = choice.sampler
    _check_supported(info, choice.schedule)
    cls = scheduler_class(info.impl_class_name)
    params = _init_params(cls)

    config: dict[str, Any] = {k: base_config[k] for k in _MODEL_KEYS if k in base_config}
    if info.honours_schedule:
        # k-diffusion style samplers: A1111 computes their grid itself, never from
        # the model config's spacing.
        config.pop("timestep_spacing", None)
        sched = get_schedule(info.default_schedule if choice.schedule == "Automatic" else choice.schedule)
        schedule_kwargs = dict(sched.kwargs)
    else:
        schedule_kwargs = {}
    config.update(info.kwargs)
    for key, value in schedule_kwargs.items():
        if key in params:
            config[key] = value
        elif key == "timestep_spacing":
            # DPMSolverSinglestep has a fixed grid; supports_schedules only admits
            # schedules that match it, so the spacing request can be dropped.
            continue
        else:  # pragma: no cover - guarded by supports_schedules
            raise UnsupportedScheduleError(
                f"{info.scheduler_class_name} has no {key!r} option (sampler {info.name!r}, "
                f"schedule {choice.schedule!r})"
            )
    config = {k: v for k, v in config.items() if k in params}
    scheduler = cls.from_config(config)
    # from_config silently drops unknown keys; make sure the schedule really took.
    for key, value in schedule_kwargs.items():
        if key in params and scheduler.config.get(key) != value:  # pragma: no cover
            raise UnsupportedScheduleError(f"{cls.__name__} ignored {key}={value!r}")
    return scheduler


def total_steps(scheduler: SchedulerMixin) -> int:
    """Number of model calls (= step callbacks) for the timesteps last set.

    Differs from the requested steps for second-order samplers (Heun, DPM2: 2n-1)
    and PLMS (n+1), so progress bars must use this, after ``set_timesteps``.
    """
    timesteps = getattr(scheduler, "timesteps", None)
    if timesteps is None or getattr(scheduler, "num_inference_steps", None) is None:
        raise ValueError("total_steps() needs set_timesteps() to have been called first")
    return len(timesteps)

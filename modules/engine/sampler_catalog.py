"""A1111 sampler and schedule names <-> diffusers schedulers.

A1111 (v1.10) picks a *sampler* (the ODE/SDE solver) and, separately, a *schedule
type* (how the sigma/timestep grid is spaced).  diffusers folds both into one
scheduler class plus config flags.  This module owns that translation:

* ``resolve_sampler(name, scheduler)`` parses what a user, an API client or a
  pasted infotext sends (names, ``k_*`` aliases, legacy merged names such as
  ``"DPM++ 2M Karras"``) into a typed :class:`SamplerChoice`.
* ``modules.engine.scheduler_build`` (heavy, imported when a job runs) turns a
  choice into a *fresh* diffusers scheduler; this catalog never builds one.

Fidelity notes (where diffusers cannot express A1111 exactly) are kept next to
each entry in ``SamplerInfo.note`` so the UI/API can surface them.

This module is imported at web UI startup (dropdowns, request validation), so
it must not import torch, numpy or diffusers: the table names scheduler classes
by string.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Any, Mapping

__all__ = [
    "SamplerInfo",
    "ScheduleInfo",
    "SamplerChoice",
    "SamplerError",
    "UnknownSamplerError",
    "UnknownScheduleError",
    "UnsupportedScheduleError",
    "SAMPLERS",
    "SCHEDULES",
    "resolve_sampler",
    "get_sampler",
    "get_schedule",
    "list_samplers",
    "list_schedulers",
    "sampler_names",
    "schedule_labels",
    "HAVE_SCIPY",
    "HAVE_TORCHSDE",
]


def _have(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


# Beta sigmas use scipy.stats.beta.ppf inside diffusers (and in A1111); without
# scipy the option cannot work, so it is refused up front with a clear message.
HAVE_SCIPY = _have("scipy")
# diffusers' DPMSolverSDEScheduler (the k-diffusion "DPM++ SDE" algorithm with a
# Brownian tree) needs torchsde; it is not a dependency of this project, see the
# "DPM++ SDE" entry below for the mapping used instead.
HAVE_TORCHSDE = _have("torchsde")


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------


class SamplerError(ValueError):
    """Base class: every sampler/schedule problem is a ValueError for callers."""


class UnknownSamplerError(SamplerError):
    def __init__(self, name: str, message: str | None = None) -> None:
        self.name = name
        valid = ", ".join(sampler_names())
        super().__init__(message or f"Unknown sampler {name!r}. Valid samplers: {valid}")


class UnknownScheduleError(SamplerError):
    def __init__(self, name: str, message: str | None = None) -> None:
        self.name = name
        valid = ", ".join(schedule_labels())
        super().__init__(message or f"Unknown schedule type {name!r}. Valid schedule types: {valid}")


class UnsupportedScheduleError(SamplerError):
    """A known sampler + known schedule that the diffusers backend cannot run."""


# ---------------------------------------------------------------------------
# Schedule types
# ---------------------------------------------------------------------------


# eq=False: entries are singletons (identity equality, hashable despite dict fields).
@dataclass(frozen=True, eq=False)
class ScheduleInfo:
    name: str  # A1111 internal name, e.g. "sgm_uniform"
    label: str  # what the UI shows and infotext stores, e.g. "SGM Uniform"
    aliases: tuple[str, ...] = ()
    default_rho: float = -1.0
    need_inner_model: bool = False
    # diffusers config flags that express this schedule for the k-diffusion
    # style schedulers (Euler, Heun, DPM-Solver, ...).
    kwargs: Mapping[str, Any] = field(default_factory=dict)


# In A1111's list order (subset it can express).  "Uniform" in A1111 is
# k-diffusion's get_sigmas(n): t = linspace(T-1, 0, n), i.e. diffusers'
# "linspace" spacing.  "Simple" picks every (T/n)-th sigma from the top and
# "SGM Uniform" is linspace(T-1, 0, n+1)[:-1] in continuous t; diffusers'
# "trailing" is that grid rounded to integer timesteps (within 1 of either).
# "DDIM" takes t = 1, 1+T//n, ... which is "leading" with steps_offset=1 (when
# n does not divide T, A1111's loop yields a few extra steps; diffusers keeps n).
# Karras/Exponential/Beta also force "linspace" so that sigma_min/sigma_max are
# the model's full range (0.0292..14.61 for SD), as in A1111; with the "leading"
# spacing of SD configs diffusers would take sigma_max from t=951 instead.
SCHEDULES: tuple[ScheduleInfo, ...] = (
    ScheduleInfo("automatic", "Automatic"),
    ScheduleInfo("uniform", "Uniform", need_inner_model=True, kwargs={"timestep_spacing": "linspace"}),
    ScheduleInfo(
        "karras", "Karras", default_rho=7.0,
        kwargs={"use_karras_sigmas": True, "timestep_spacing": "linspace"},
    ),
    ScheduleInfo(
        "exponential", "Exponential",
        kwargs={"use_exponential_sigmas": True, "timestep_spacing": "linspace"},
    ),
    ScheduleInfo(
        "sgm_uniform", "SGM Uniform", aliases=("SGMUniform",), need_inner_model=True,
        kwargs={"timestep_spacing": "trailing"},
    ),
    ScheduleInfo("simple", "Simple", need_inner_model=True, kwargs={"timestep_spacing": "trailing"}),
    ScheduleInfo("normal", "Normal", need_inner_model=True, kwargs={"timestep_spacing": "linspace"}),
    ScheduleInfo(
        "ddim", "DDIM", need_inner_model=True,
        kwargs={"timestep_spacing": "leading", "steps_offset": 1},
    ),
    ScheduleInfo(
        "beta", "Beta", need_inner_model=True,
        kwargs={"use_beta_sigmas": True, "timestep_spacing": "linspace"},
    ),
)

# A1111 schedule types with no diffusers config equivalent.  Recognised so that
# a pasted infotext gets "not supported" rather than "unknown".
_UNSUPPORTED_SCHEDULES: dict[str, str] = {
    "polyexponential": "Polyexponential",
    "kl_optimal": "KL Optimal",
    "align_your_steps": "Align Your Steps",
}

_SCHEDULE_LOOKUP: dict[str, ScheduleInfo] = {}
for _s in SCHEDULES:
    for _key in (_s.name, _s.label, *_s.aliases):
        _SCHEDULE_LOOKUP[_key.lower()] = _s

_AUTOMATIC = SCHEDULES[0]
_ALL_SCHEDULE_LABELS = tuple(s.label for s in SCHEDULES)
_SIGMA_SCHEDULE_LABELS = tuple(s.label for s in SCHEDULES if s.name != "automatic")


def get_schedule(name: str | None) -> ScheduleInfo:
    """Look a schedule up by label, internal name or alias (case-insensitive).

    ``None``/"" mean Automatic, as in A1111.
    """
    if name is None or not str(name).strip():
        return _AUTOMATIC
    key = str(name).strip().lower()
    found = _SCHEDULE_LOOKUP.get(key)
    if found is not None:
        return found
    for internal, label in _UNSUPPORTED_SCHEDULES.items():
        if key in (internal, label.lower()):
            raise UnsupportedScheduleError(
                f"Schedule type {label!r} exists in A1111 but has no diffusers equivalent; "
                f"use one of: {', '.join(_ALL_SCHEDULE_LABELS)}"
            )
    raise UnknownScheduleError(str(name))


def schedule_labels() -> list[str]:
    return list(_ALL_SCHEDULE_LABELS)


# ---------------------------------------------------------------------------
# Samplers
# ---------------------------------------------------------------------------

_K_SCHEDULES = _ALL_SCHEDULE_LABELS  # every label this module can express


@dataclass(frozen=True, eq=False)  # singletons, see ScheduleInfo
class SamplerInfo:
    name: str
    aliases: tuple[str, ...]
    scheduler_class_name: str  # the diffusers scheduler it is built on
    kwargs: Mapping[str, Any]  # solver options passed over the model config
    default_schedule: str  # label used for "Automatic"
    # Class actually instantiated, when it is a modules.schedulers subclass of
    # scheduler_class_name; "" means scheduler_class_name itself.
    impl_name: str = ""
    is_ancestral: bool = False
    uses_noise: bool = False  # stochastic: pass the job's generators to the pipeline
    supports_schedules: tuple[str, ...] = ("Automatic",)
    # False for DDIM/PLMS/UniPC: A1111 ignores the schedule type for its
    # timestep samplers, so we ignore it too (with a note) instead of failing.
    honours_schedule: bool = True
    # k-diffusion style flags as A1111 reports them on /sdapi/v1/samplers
    options: Mapping[str, Any] = field(default_factory=dict)
    note: str = ""

    @property
    def impl_class_name(self) -> str:
        return self.impl_name or self.scheduler_class_name


def _s(
    name: str,
    aliases: tuple[str, ...],
    cls: str,
    kwargs: Mapping[str, Any],
    default_schedule: str,
    *,
    base_name: str | None = None,
    is_ancestral: bool = False,
    uses_noise: bool = False,
    supports: tuple[str, ...] = _K_SCHEDULES,
    honours_schedule: bool = True,
    options: Mapping[str, Any] | None = None,
    note: str = "",
) -> SamplerInfo:
    return SamplerInfo(
        name=name,
        aliases=aliases,
        scheduler_class_name=base_name or cls,
        impl_name=cls if base_name else "",
        kwargs=dict(kwargs),
        default_schedule=default_schedule,
        is_ancestral=is_ancestral,
        uses_noise=uses_noise,
        supports_schedules=supports,
        honours_schedule=honours_schedule,
        options=dict(options or {}),
        note=note,
    )


# diffusers' DPM-Solver "linspace"/"leading" grids divide [0, T) into n+1 parts,
# so Uniform/Normal/DDIM there land within one grid step of A1111's points
# (A1111's Uniform ends at t=0; diffusers' at t~T/n) -- close, not identical.
_DPM_GRID_NOTE = ("Uniform/Normal/DDIM use diffusers' DPM-Solver timestep grid, within one step "
                  "of A1111's.")

_DPM_SDE_SUPPORTS = ("Automatic", "Karras", "Exponential", "SGM Uniform", "Simple", "Beta")

# A1111 v1.10 order: k-diffusion samplers, then timestep samplers, then LCM.
SAMPLERS: tuple[SamplerInfo, ...] = (
    _s("DPM++ 2M", ("k_dpmpp_2m",), "DPMSolverMultistepScheduler",
       {"algorithm_type": "dpmsolver++", "solver_order": 2, "solver_type": "midpoint"}, "Karras",
       options={"scheduler": "karras"}, note=_DPM_GRID_NOTE),
    _s("DPM++ SDE", ("k_dpmpp_sde",), "DPMSolverSinglestepScheduler",
       # lower_order_final=True: the class default (False) is incompatible with a
       # final sigma of zero and would be flipped with a warning on every job.
       {"algorithm_type": "sde-dpmsolver++", "solver_order": 2, "lower_order_final": True}, "Karras",
       uses_noise=True, supports=_DPM_SDE_SUPPORTS,
       options={"scheduler": "karras", "second_order": True, "brownian_noise": True},
       note=("A1111 runs k-diffusion's singlestep 2nd-order SDE solver with Brownian-tree noise "
             "(diffusers' DPMSolverSDEScheduler, which needs torchsde, not a dependency here). "
             "We use DPMSolverSinglestepScheduler(algorithm_type='sde-dpmsolver++', solver_order=2): "
             "the same singlestep 2nd-order SDE family with Gaussian noise from the job's generators; "
             "one model call per step instead of two, so images differ from A1111. Its timestep "
             "grid is fixed (≈ SGM Uniform/Simple), so Uniform/Normal/DDIM are refused.")),
    _s("DPM++ 2M SDE", ("k_dpmpp_2m_sde",), "DPMSolverMultistepScheduler",
       {"algorithm_type": "sde-dpmsolver++", "solver_order": 2, "solver_type": "midpoint"}, "Exponential",
       uses_noise=True, options={"scheduler": "exponential", "brownian_noise": True},
       note=("Gaussian step noise from the job's generators instead of A1111's Brownian tree. "
             + _DPM_GRID_NOTE)),
    _s("DPM++ 2M SDE Heun", ("k_dpmpp_2m_sde_heun",), "DPMSolverMultistepScheduler",
       {"algorithm_type": "sde-dpmsolver++", "solver_order": 2, "solver_type": "heun"}, "Exponential",
       uses_noise=True, options={"scheduler": "exponential", "brownian_noise": True, "solver_type": "heun"},
       note=("Gaussian step noise from the job's generators instead of A1111's Brownian tree. "
             + _DPM_GRID_NOTE)),
    _s("DPM++ 3M SDE", ("k_dpmpp_3m_sde",), "DPMSolverMultistepScheduler",
       {"algorithm_type": "sde-dpmsolver++", "solver_order": 3, "solver_type": "midpoint"}, "Exponential",
       uses_noise=True,
       options={"scheduler": "exponential", "discard_next_to_last_sigma": True, "brownian_noise": True},
       note=("Gaussian step noise instead of a Brownian tree; A1111's discard-next-to-last-sigma "
             "is not applied. " + _DPM_GRID_NOTE)),
    _s("Euler a", ("k_euler_a", "k_euler_ancestral"), "EulerAncestralKScheduler", {}, "Uniform",
       base_name="EulerAncestralDiscreteScheduler", is_ancestral=True, uses_noise=True,
       options={"uses_ensd": True},
       note="Karras/Exponential/Beta via a small EulerAncestralDiscreteScheduler subclass."),
    _s("Euler", ("k_euler",), "EulerDiscreteScheduler", {}, "Uniform"),
    _s("LMS", ("k_lms",), "LMSExactScheduler", {}, "Uniform", base_name="LMSDiscreteScheduler",
       note="LMS coefficients integrated exactly with numpy (diffusers uses scipy quadrature)."),
    _s("Heun", ("k_heun",), "HeunDiscreteScheduler", {}, "Uniform", options={"second_order": True}),
    _s("DPM2", ("k_dpm_2",), "KDPM2DiscreteScheduler", {}, "Karras",
       options={"scheduler": "karras", "discard_next_to_last_sigma": True, "second_order": True},
       note="A1111's discard-next-to-last-sigma is not applied."),
    _s("DPM2 a", ("k_dpm_2_a",), "KDPM2AncestralDiscreteScheduler", {}, "Karras",
       is_ancestral=True, uses_noise=True,
       options={"scheduler": "karras", "discard_next_to_last_sigma": True, "uses_ensd": True,
                "second_order": True},
       note="A1111's discard-next-to-last-sigma is not applied."),
    _s("DDIM", ("ddim",), "DDIMScheduler",
       # A1111's DDIM neither clips x0 nor forces the final alpha to 1.
       {"clip_sample": False, "set_alpha_to_one": False}, "Automatic",
       honours_schedule=False, supports=("Automatic",)),
    _s("PLMS", ("plms",), "PNDMScheduler", {"skip_prk_steps": True, "set_alpha_to_one": False}, "Automatic",
       honours_schedule=False, supports=("Automatic",),
       note="PNDM runs steps+1 model calls; use total_steps(scheduler) for progress."),
    _s("UniPC", ("unipc",), "UniPCMultistepScheduler",
       # A1111 defaults: order 3, variant bh1, ending at t=1/N (sigma_min) rather
       # than sigma 0 -- and bh1 with a zero final sigma yields NaN in diffusers.
       {"solver_order": 3, "solver_type": "bh1", "predict_x0": True, "final_sigmas_type": "sigma_min"},
       "Automatic",
       honours_schedule=False, supports=("Automatic",)),
    _s("LCM", ("k_lcm",), "LCMScheduler", {}, "Automatic", uses_noise=True, supports=("Automatic",),
       note="diffusers' LCMScheduler picks its own timesteps; other schedule types are refused."),
)

# Merged names and aliases from before A1111 1.9 split the schedule type out.
_LEGACY_ALIASES: dict[str, tuple[str, str]] = {
    "k_lms_ka": ("LMS", "Karras"),
    "k_dpm_2_ka": ("DPM2", "Karras"),
    "k_dpm_2_a_ka": ("DPM2 a", "Karras"),
    "k_dpmpp_2m_ka": ("DPM++ 2M", "Karras"),
    "k_dpmpp_sde_ka": ("DPM++ SDE", "Karras"),
    "k_dpmpp_2m_sde_ka": ("DPM++ 2M SDE", "Karras"),
    "k_dpmpp_2m_sde_exp": ("DPM++ 2M SDE", "Exponential"),
    "k_dpmpp_2m_sde_heun_ka": ("DPM++ 2M SDE Heun", "Karras"),
    "k_dpmpp_2m_sde_heun_exp": ("DPM++ 2M SDE Heun", "Exponential"),
    "k_dpmpp_3m_sde_ka": ("DPM++ 3M SDE", "Karras"),
    "k_dpmpp_3m_sde_exp": ("DPM++ 3M SDE", "Exponential"),
}

# A1111 samplers with no diffusers counterpart.
_UNSUPPORTED_SAMPLERS: dict[str, str] = {
    "dpm++ 2s a": "DPM++ 2S a", "k_dpmpp_2s_a": "DPM++ 2S a", "k_dpmpp_2s_a_ka": "DPM++ 2S a",
    "dpm fast": "DPM fast", "k_dpm_fast": "DPM fast",
    "dpm adaptive": "DPM adaptive", "k_dpm_ad": "DPM adaptive",
    "restart": "Restart",
    "ddim cfg++": "DDIM CFG++", "ddim_cfgpp": "DDIM CFG++",
}

_SAMPLER_LOOKUP: dict[str, SamplerInfo] = {}
for _info in SAMPLERS:
    for _key in (_info.name, *_info.aliases):
        _SAMPLER_LOOKUP[_key.lower()] = _info


def sampler_names() -> list[str]:
    return [s.name for s in SAMPLERS]


def get_sampler(name: str) -> SamplerInfo:
    """Sampler by name or alias, case-insensitive (no schedule suffix parsing)."""
    found = _SAMPLER_LOOKUP.get(str(name).strip().lower())
    if found is None:
        raise UnknownSamplerError(str(name))
    return found


# ---------------------------------------------------------------------------
# Resolution
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SamplerChoice:
    sampler: SamplerInfo
    schedule: str = "Automatic"  # label actually used; goes into "Schedule type"
    note: str | None = None  # set when a requested schedule was ignored

    @property
    def name(self) -> str:
        return self.sampler.name

    @property
    def schedule_info(self) -> ScheduleInfo:
        return get_schedule(self.schedule)

    @property
    def effective_schedule(self) -> str:
        """Schedule label after resolving Automatic to the sampler's default."""
        return self.sampler.default_schedule if self.schedule == "Automatic" else self.schedule


def _strip_schedule_suffix(name: str) -> tuple[str, ScheduleInfo] | None:
    low = name.lower()
    # Longest suffix first so "SGM Uniform" wins over "Uniform".
    candidates = sorted(
        ((key, s) for s in SCHEDULES for key in (s.label, s.name, *s.aliases) if s.name != "automatic"),
        key=lambda kv: -len(kv[0]),
    )
    for key, sched in candidates:
        suffix = " " + key.lower()
        if low.endswith(suffix):
            return name[: -len(suffix)].strip(), sched
    return None


def _unsupported_sampler(name: str) -> UnknownSamplerError | None:
    label = _UNSUPPORTED_SAMPLERS.get(name.lower())
    if label is None:
        return None
    return UnknownSamplerError(
        name,
        f"Sampler {label!r} exists in A1111 but has no diffusers equivalent. "
        f"Valid samplers: {', '.join(sampler_names())}",
    )


def resolve_sampler(
    name: str | None,
    scheduler: str | None = None,
    *,
    convert_automatic: bool = False,
) -> SamplerChoice:
    """Parse an A1111 sampler name (+ optional schedule type) into a SamplerChoice.

    * ``name`` may be a sampler name, an alias (``k_euler_a``) or a legacy merged
      name (``"DPM++ 2M Karras"``); a schedule suffix in the name wins over
      ``scheduler``, as in A1111.  Lookup is case-insensitive.  ``None``/"" mean
      A1111's default sampler (the first in the list, DPM++ 2M).
    * ``scheduler`` is a schedule label, internal name or alias; None/"" mean
      Automatic.
    * ``convert_automatic``: report a schedule equal to the sampler's default as
      "Automatic" (what A1111 shows after pasting an infotext).

    Raises UnknownSamplerError / UnknownScheduleError (unknown names) or
    UnsupportedScheduleError (a combination the diffusers backend cannot run).
    Timestep samplers (DDIM, PLMS, UniPC) ignore the schedule type, as A1111
    does; the choice then says "Automatic" and carries a note.
    """
    raw = (name or "").strip() or SAMPLERS[0].name
    schedule = get_schedule(scheduler)

    info = _SAMPLER_LOOKUP.get(raw.lower())
    if info is None and raw.lower() in _LEGACY_ALIASES:
        base, label = _LEGACY_ALIASES[raw.lower()]
        info, schedule = get_sampler(base), get_schedule(label)
    if info is None:
        stripped = _strip_schedule_suffix(raw)
        if stripped is not None:
            base, schedule = stripped
            info = _SAMPLER_LOOKUP.get(base.lower())
            if info is None:
                err = _unsupported_sampler(base)
                if err is not None:
                    raise err
    if info is None:
        raise _unsupported_sampler(raw) or UnknownSamplerError(raw)

    label = schedule.label
    note = None
    if label != "Automatic" and not info.honours_schedule:
        note = (f"{info.name} ignores schedule type {label!r} (as in A1111); "
                f"using its own timestep spacing")
        label = "Automatic"
    _check_supported(info, label)
    if convert_automatic and label == info.default_schedule:
        label = "Automatic"
    return SamplerChoice(sampler=info, schedule=label, note=note)


def _check_supported(info: SamplerInfo, label: str) -> None:
    effective = info.default_schedule if label == "Automatic" else label
    if label not in info.supports_schedules:
        raise UnsupportedScheduleError(
            f"Sampler {info.name!r} cannot use schedule type {label!r} with diffusers' "
            f"{info.scheduler_class_name}. Supported for {info.name}: "
            f"{', '.join(info.supports_schedules)}"
        )
    if effective == "Beta" and not HAVE_SCIPY:
        raise UnsupportedScheduleError(
            f"Sampler {info.name!r} with schedule type 'Beta' needs scipy, which is not installed"
        )


# ---------------------------------------------------------------------------
# Listings for the UI and /sdapi/v1
# ---------------------------------------------------------------------------


def list_samplers() -> list[dict[str, Any]]:
    """``/sdapi/v1/samplers`` shape: ``[{"name", "aliases", "options"}]``.

    A1111's API model types options as ``dict[str, str]``, so values are strings.
    """
    return [
        {
            "name": s.name,
            "aliases": list(s.aliases),
            "options": {k: str(v) for k, v in s.options.items()},
        }
        for s in SAMPLERS
    ]


def list_schedulers() -> list[dict[str, Any]]:
    """``/sdapi/v1/schedulers`` shape, in A1111's order."""
    return [
        {
            "name": s.name,
            "label": s.label,
            "aliases": list(s.aliases) or None,
            "default_rho": s.default_rho,
            "need_inner_model": s.need_inner_model,
        }
        for s in SCHEDULES
    ]

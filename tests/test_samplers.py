"""A1111 sampler/schedule names -> diffusers schedulers (no model needed)."""
from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from modules.engine import sampler_catalog as S
from modules.engine import scheduler_build as SC

# diffusers' KDPM2 schedulers trip numpy-2 deprecation warnings by the thousand.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

# The public SD1.5 scheduler config (PNDM, DDIM-style scaled_linear betas).
SD15 = {
    "_class_name": "PNDMScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
    "prediction_type": "epsilon",
}
SD_V = {**SD15, "prediction_type": "v_prediction"}

A1111_ORDER = [
    "DPM++ 2M", "DPM++ SDE", "DPM++ 2M SDE", "DPM++ 2M SDE Heun", "DPM++ 3M SDE",
    "Euler a", "Euler", "LMS", "Heun", "DPM2", "DPM2 a", "DDIM", "PLMS", "UniPC", "LCM",
]

COMBOS = [
    (info.name, label)
    for info in S.SAMPLERS
    for label in info.supports_schedules
    if not (label == "Beta" and not S.HAVE_SCIPY)
]


def _run(scheduler, steps: int = 4, seed: int = 0) -> torch.Tensor:
    """A short denoising loop with a fake model (randn output)."""
    gen = torch.Generator().manual_seed(seed)
    model_gen = torch.Generator().manual_seed(1234)
    scheduler.set_timesteps(steps)
    x = torch.randn(1, 4, 8, 8, generator=model_gen) * scheduler.init_noise_sigma
    takes_gen = "generator" in inspect.signature(scheduler.step).parameters
    for t in scheduler.timesteps:
        scheduler.scale_model_input(x, t)
        out = torch.randn(1, 4, 8, 8, generator=model_gen)
        kwargs = {"generator": gen} if takes_gen else {}
        x = scheduler.step(out, t, x, **kwargs).prev_sample
    return x


def _sigmas(name: str, schedule: str, steps: int = 10) -> np.ndarray:
    sch = SC.build_scheduler(S.resolve_sampler(name, schedule), SD15)
    sch.set_timesteps(steps)
    return sch.sigmas.numpy().copy()


def test_names_in_a1111_order():
    assert S.sampler_names() == A1111_ORDER
    assert [s["name"] for s in S.list_samplers()] == A1111_ORDER


@pytest.mark.parametrize("name,schedule", COMBOS)
@pytest.mark.parametrize("config", [SD15, SD_V], ids=["eps", "v"])
def test_every_combination_steps_to_finite_output(name, schedule, config):
    choice = S.resolve_sampler(name, schedule)
    sch = SC.build_scheduler(choice, config)
    assert sch.config.prediction_type == config["prediction_type"]
    assert sch.config.beta_schedule == "scaled_linear"
    assert sch.config.num_train_timesteps == 1000
    x = _run(sch)
    assert torch.isfinite(x).all()


@pytest.mark.parametrize("name", A1111_ORDER)
def test_model_config_kept(name):
    sch = SC.build_scheduler(S.resolve_sampler(name), SD_V)
    cfg = sch.config
    assert cfg.prediction_type == "v_prediction"
    assert (cfg.beta_start, cfg.beta_end) == (0.00085, 0.012)
    assert cfg.num_train_timesteps == 1000
    if "steps_offset" in cfg:
        assert cfg.steps_offset == 1


def test_sampler_options_do_not_leak_from_model_config():
    # A config left behind by a previous job / shipped with a fine-tune.
    dirty = {
        **SD15,
        "_class_name": "DPMSolverMultistepScheduler",
        "use_karras_sigmas": True,
        "algorithm_type": "sde-dpmsolver++",
        "solver_order": 3,
        "timestep_spacing": "trailing",
        "thresholding": True,
    }
    euler = SC.build_scheduler(S.resolve_sampler("Euler", "Uniform"), dirty)
    assert euler.config.use_karras_sigmas is False
    assert euler.config.timestep_spacing == "linspace"
    dpm = SC.build_scheduler(S.resolve_sampler("DPM++ 2M", "Uniform"), dirty)
    assert dpm.config.use_karras_sigmas is False
    assert dpm.config.algorithm_type == "dpmsolver++"
    assert dpm.config.solver_order == 2
    assert dpm.config.thresholding is False


def test_fresh_scheduler_per_call():
    choice = S.resolve_sampler("Euler a")
    a = SC.build_scheduler(choice, SD15)
    b = SC.build_scheduler(choice, SD15)
    assert a is not b
    _run(a)
    assert a.step_index is not None
    assert b.num_inference_steps is None and b.step_index is None
    # and the same inputs give the same result from a fresh one
    assert torch.equal(_run(SC.build_scheduler(choice, SD15)), _run(b))


def test_schedules_give_different_sigmas():
    uniform = _sigmas("Euler", "Uniform")
    for other in ("Karras", "Exponential", "SGM Uniform", "DDIM") + (("Beta",) if S.HAVE_SCIPY else ()):
        assert not np.allclose(uniform, _sigmas("Euler", other)), other
    assert not np.allclose(_sigmas("Euler", "Karras"), _sigmas("Euler", "Exponential"))


def test_karras_matches_a1111_formula():
    # A1111: k-diffusion get_sigmas_karras(n, sigma_min, sigma_max, rho=7) with the
    # model's full sigma range, then a trailing 0.
    sig = _sigmas("DPM++ 2M", "Karras", steps=20)
    ac = torch.cumprod(1 - torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2, 0)
    train = ((1 - ac) / ac).sqrt().numpy()
    lo, hi = train[0] ** (1 / 7), train[-1] ** (1 / 7)
    expected = (hi + np.linspace(0, 1, 20) * (lo - hi)) ** 7
    np.testing.assert_allclose(sig[:-1], expected, rtol=1e-4)
    assert sig[-1] == 0


def test_exponential_matches_a1111_formula():
    sig = _sigmas("Euler", "Exponential", steps=8)
    expected = np.exp(np.linspace(np.log(sig[0]), np.log(sig[-2]), 8))
    np.testing.assert_allclose(sig[:-1], expected, rtol=1e-5)
    np.testing.assert_allclose([sig[0], sig[-2]], [14.6146, 0.0292], atol=1e-4)


def test_uniform_simple_and_ddim_grids_match_a1111():
    def ts(schedule, n=6):
        sch = SC.build_scheduler(S.resolve_sampler("Euler", schedule), SD15)
        sch.set_timesteps(n)
        return sch.timesteps.numpy()

    # Uniform: k-diffusion get_sigmas(n) -> t = linspace(999, 0, n)
    np.testing.assert_allclose(ts("Uniform"), np.linspace(999, 0, 6), atol=1e-3)
    # Simple: every (1000/n)-th sigma counted from the top ("trailing", rounded
    # differently: within one timestep)
    np.testing.assert_allclose(ts("Simple"), [999 - int(x * 1000 / 6) for x in range(6)], atol=1)
    np.testing.assert_allclose(ts("Simple", 5), [999, 799, 599, 399, 199])
    # DDIM schedule: t = 1, 1 + 1000//n, ... (reversed); A1111 gets extra steps
    # when n does not divide 1000, diffusers keeps n, so compare where it does
    for n in (5, 20):
        np.testing.assert_allclose(ts("DDIM", n), list(range(1, 1000, 1000 // n))[::-1])


@pytest.mark.parametrize(
    "name,default",
    [("DPM++ 2M", "Karras"), ("DPM++ SDE", "Karras"), ("DPM2", "Karras"), ("DPM2 a", "Karras"),
     ("DPM++ 2M SDE", "Exponential"), ("DPM++ 2M SDE Heun", "Exponential"),
     ("DPM++ 3M SDE", "Exponential"), ("Euler a", "Uniform"), ("Euler", "Uniform"),
     ("LMS", "Uniform"), ("Heun", "Uniform")],
)
def test_automatic_uses_a1111_default(name, default):
    choice = S.resolve_sampler(name)
    assert choice.schedule == "Automatic"
    assert choice.effective_schedule == default
    np.testing.assert_array_equal(_sigmas(name, "Automatic"), _sigmas(name, default))


def test_euler_a_karras_matches_euler_karras_grid():
    np.testing.assert_allclose(_sigmas("Euler a", "Karras"), _sigmas("Euler", "Karras"), rtol=1e-5)
    sch = SC.build_scheduler(S.resolve_sampler("Euler a", "Karras"), SD15)
    assert sch.config.use_karras_sigmas is True
    ref = SC.build_scheduler(S.resolve_sampler("Euler", "Karras"), SD15)
    sch.set_timesteps(10)
    ref.set_timesteps(10)
    np.testing.assert_allclose(sch.timesteps.numpy(), ref.timesteps.numpy(), atol=1e-2)


@pytest.mark.parametrize(
    "text,sampler,schedule",
    [
        ("DPM++ 2M Karras", "DPM++ 2M", "Karras"),
        ("DPM++ SDE Karras", "DPM++ SDE", "Karras"),
        ("DPM2 a Karras", "DPM2 a", "Karras"),
        ("DPM2 Karras", "DPM2", "Karras"),
        ("LMS Karras", "LMS", "Karras"),
        ("DPM++ 2M SDE Exponential", "DPM++ 2M SDE", "Exponential"),
        ("DPM++ 2M SDE Heun Karras", "DPM++ 2M SDE Heun", "Karras"),
        ("DPM++ 3M SDE Exponential", "DPM++ 3M SDE", "Exponential"),
        ("Euler a SGM Uniform", "Euler a", "SGM Uniform"),
        ("dpm++ 2m karras", "DPM++ 2M", "Karras"),
        ("k_dpmpp_2m_ka", "DPM++ 2M", "Karras"),
        ("DPM++ 2M SDE Heun", "DPM++ 2M SDE Heun", "Automatic"),
        ("Euler a", "Euler a", "Automatic"),
    ],
)
def test_legacy_merged_names(text, sampler, schedule):
    choice = S.resolve_sampler(text)
    assert (choice.sampler.name, choice.schedule) == (sampler, schedule)


def test_suffix_wins_over_scheduler_argument_and_convert_automatic():
    assert S.resolve_sampler("DPM++ 2M Karras", "Exponential").schedule == "Karras"
    assert S.resolve_sampler("DPM++ 2M Karras", convert_automatic=True).schedule == "Automatic"
    assert S.resolve_sampler("Euler", "karras").schedule == "Karras"  # internal name
    assert S.resolve_sampler("Euler", "SGMUniform").schedule == "SGM Uniform"  # alias
    assert S.resolve_sampler("Euler", None).schedule == "Automatic"
    assert S.resolve_sampler(None).sampler.name == "DPM++ 2M"  # A1111's default sampler


@pytest.mark.parametrize(
    "alias,name",
    [("k_euler_a", "Euler a"), ("k_euler_ancestral", "Euler a"), ("k_euler", "Euler"),
     ("K_LMS", "LMS"), ("k_heun", "Heun"), ("k_dpm_2", "DPM2"), ("k_dpm_2_a", "DPM2 a"),
     ("k_dpmpp_2m", "DPM++ 2M"), ("k_dpmpp_sde", "DPM++ SDE"), ("k_dpmpp_2m_sde", "DPM++ 2M SDE"),
     ("k_dpmpp_2m_sde_heun", "DPM++ 2M SDE Heun"), ("k_dpmpp_3m_sde", "DPM++ 3M SDE"),
     ("ddim", "DDIM"), ("PLMS", "PLMS"), ("unipc", "UniPC"), ("k_lcm", "LCM"), ("euler A", "Euler a")],
)
def test_aliases_case_insensitive(alias, name):
    assert S.resolve_sampler(alias).sampler.name == name


def test_unknown_sampler_lists_valid_names():
    with pytest.raises(S.UnknownSamplerError) as err:
        S.resolve_sampler("Euler z")
    assert isinstance(err.value, ValueError)
    for name in A1111_ORDER:
        assert name in str(err.value)


@pytest.mark.parametrize("name", ["DPM fast", "DPM adaptive", "DPM++ 2S a", "Restart", "DDIM CFG++"])
def test_a1111_samplers_without_diffusers_equivalent(name):
    with pytest.raises(S.UnknownSamplerError, match="no diffusers equivalent"):
        S.resolve_sampler(name)


def test_unknown_and_unsupported_schedules():
    with pytest.raises(S.UnknownScheduleError, match="Karras"):
        S.resolve_sampler("Euler", "Wobbly")
    with pytest.raises(S.UnsupportedScheduleError, match="Polyexponential"):
        S.resolve_sampler("Euler", "Polyexponential")
    with pytest.raises(ValueError, match="Align Your Steps"):
        S.resolve_sampler("Euler", "align_your_steps")


@pytest.mark.parametrize("name,schedule", [("LCM", "Karras"), ("DPM++ SDE", "Uniform"), ("LCM", "Uniform")])
def test_inexpressible_combinations_raise_naming_both(name, schedule):
    with pytest.raises(S.UnsupportedScheduleError) as err:
        S.resolve_sampler(name, schedule)
    assert name in str(err.value) and schedule in str(err.value)


@pytest.mark.parametrize("name", ["DDIM", "PLMS", "UniPC"])
def test_timestep_samplers_ignore_schedule_like_a1111(name):
    choice = S.resolve_sampler(name, "Karras")
    assert choice.schedule == "Automatic"
    assert choice.note and "Karras" in choice.note
    plain = SC.build_scheduler(S.resolve_sampler(name), SD15)
    ignored = SC.build_scheduler(choice, SD15)
    assert dict(plain.config) == dict(ignored.config)


def test_beta_needs_scipy():
    if S.HAVE_SCIPY:
        sch = SC.build_scheduler(S.resolve_sampler("Euler", "Beta"), SD15)
        assert sch.config.use_beta_sigmas is True
    else:
        with pytest.raises(S.UnsupportedScheduleError, match="scipy"):
            S.resolve_sampler("Euler", "Beta")


def test_sampler_specific_kwargs():
    def cfg(name):
        return SC.build_scheduler(S.resolve_sampler(name), SD15).config

    assert cfg("DPM++ 2M SDE").algorithm_type == "sde-dpmsolver++"
    assert cfg("DPM++ 2M SDE").solver_type == "midpoint"
    assert cfg("DPM++ 2M SDE Heun").solver_type == "heun"
    assert cfg("DPM++ 3M SDE").solver_order == 3
    assert cfg("DPM++ SDE").algorithm_type == "sde-dpmsolver++"
    assert cfg("PLMS").skip_prk_steps is True
    assert cfg("DDIM").clip_sample is False and cfg("DDIM").set_alpha_to_one is False
    built = SC.build_scheduler(S.resolve_sampler("DPM++ SDE"), SD15)
    assert type(built).__name__ == S.get_sampler("DPM++ SDE").scheduler_class_name


def _run_with_generator_seed(name, seed):
    sch = SC.build_scheduler(S.resolve_sampler(name), SD15)
    return _run(sch, steps=4, seed=seed)


@pytest.mark.parametrize("name", A1111_ORDER)
def test_uses_noise_flag_matches_behaviour(name):
    info = S.get_sampler(name)
    a = _run_with_generator_seed(name, 1)
    b = _run_with_generator_seed(name, 1)
    c = _run_with_generator_seed(name, 2)
    assert torch.equal(a, b)
    assert (not torch.equal(a, c)) == info.uses_noise
    if info.is_ancestral:
        assert info.uses_noise


def test_total_steps():
    def n(name, steps=4):
        sch = SC.build_scheduler(S.resolve_sampler(name), SD15)
        sch.set_timesteps(steps)
        return SC.total_steps(sch)

    assert n("Euler") == 4
    assert n("Heun") == 7  # second order: 2n - 1 model calls
    assert n("DPM2") == 7
    assert n("PLMS") == 5  # PNDM: steps + 1
    with pytest.raises(ValueError):
        SC.total_steps(SC.build_scheduler(S.resolve_sampler("Euler"), SD15))


def test_lms_coefficients_are_exact_integrals():
    sch = SC.build_scheduler(S.resolve_sampler("LMS"), SD15)
    sch.set_timesteps(10)
    sig = sch.sigmas.numpy().astype(np.float64)
    t, order = 5, 4
    nodes, weights = np.polynomial.legendre.leggauss(8)
    a, b = sig[t], sig[t + 1]
    xs = (b - a) / 2 * nodes + (a + b) / 2
    for j in range(order):
        basis = np.ones_like(xs)
        for k in range(order):
            if k != j:
                basis *= (xs - sig[t - k]) / (sig[t - j] - sig[t - k])
        expected = (b - a) / 2 * np.sum(weights * basis)
        assert sch.get_lms_coefficient(order, t, j) == pytest.approx(expected, rel=1e-6, abs=1e-9)


def test_listings_have_a1111_api_shape():
    samplers = S.list_samplers()
    assert set(samplers[0]) == {"name", "aliases", "options"}
    dpm = next(s for s in samplers if s["name"] == "DPM++ 2M")
    assert dpm["aliases"] == ["k_dpmpp_2m"] and dpm["options"] == {"scheduler": "karras"}
    scheds = S.list_schedulers()
    assert [s["label"] for s in scheds][:5] == ["Automatic", "Uniform", "Karras", "Exponential", "SGM Uniform"]
    assert "Beta" in [s["label"] for s in scheds]
    for s in scheds:
        assert set(s) == {"name", "label", "aliases", "default_rho", "need_inner_model"}
    karras = next(s for s in scheds if s["name"] == "karras")
    assert karras["default_rho"] == 7.0 and karras["need_inner_model"] is False
    sgm = next(s for s in scheds if s["name"] == "sgm_uniform")
    assert sgm["aliases"] == ["SGMUniform"] and sgm["need_inner_model"] is True


def test_name_level_api_imports_nothing_heavy():
    # The web UI imports modules.samplers at startup; torch/diffusers would add
    # seconds before the first response.  A fresh interpreter, since this one
    # already has them loaded.
    code = (
        "import sys\n"
        "from modules.engine import sampler_catalog as S\n"
        "c = S.resolve_sampler('DPM++ 2M Karras')\n"
        "assert (c.sampler.name, c.schedule) == ('DPM++ 2M', 'Karras')\n"
        "assert S.sampler_names() and S.list_samplers() and S.list_schedulers()\n"
        "heavy = sorted(m for m in ('torch', 'diffusers', 'numpy') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("info", S.SAMPLERS, ids=lambda i: i.name)
def test_table_class_names_resolve(info):
    cls = SC.scheduler_class(info.impl_class_name)
    # the named diffusers class, or one of our subclasses of it (by name: without
    # scipy, diffusers.LMSDiscreteScheduler is a placeholder, not the real class)
    assert info.scheduler_class_name in [c.__name__ for c in cls.__mro__]
    assert issubclass(cls, SchedulerMixin)
    assert cls is SC.scheduler_class(info.impl_class_name)
    assert type(SC.build_scheduler(S.resolve_sampler(info.name), SD15)) is cls


def test_subclasses_live_in_schedulers():
    assert SC.scheduler_class(S.get_sampler("Euler a").impl_class_name) is SC.EulerAncestralKScheduler
    assert SC.scheduler_class(S.get_sampler("LMS").impl_class_name) is SC.LMSExactScheduler
    with pytest.raises(LookupError):
        SC.scheduler_class("NoSuchScheduler")

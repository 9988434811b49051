"""The refiner of one job (A1111 1.6+'s Refiner): which checkpoint, whether it fits, and loading it.

`check_refiner` runs before a job is queued and again when it starts (a script may have set the
refiner): an unknown checkpoint, or one of another latent space, is a `ProcessingError` (a 4xx)
before any work. Compatibility is what the family records say: the same `LatentFormat` (SD1.x and
SD2.x share one, SDXL base and refiner another), never a name match.

`JobRefiner` is what the engine gets as `ctx.refiner` (see engine/refiner.py for when it switches).
With `sd_checkpoints_limit` >= 2 base and refiner both stay loaded (the model manager's LRU);
with 1, loading one evicts the other: that swap is logged and its time shown in the progress text.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from modules.core.pipeline import GenerationParams, ProcessingError

log = logging.getLogger(__name__)

NO_REFINER = ("", "None")

_latent_cache: dict[tuple[str, float, int], str] = {}   # (file, mtime, size) -> latent space name
_cache_lock = threading.Lock()


def wants_refiner(params: GenerationParams) -> bool:
    return (params.refiner_checkpoint or "") not in NO_REFINER


def latent_space_of(models: Any, info: Any) -> str:
    """The latent space of a checkpoint, from its family record: a loaded model's, else detected from
    the file (the header only, for .safetensors), cached per file version."""
    for model in _loaded(models):
        if getattr(model, "info", None) is not None and model.info.filename == info.filename:
            return model.spec.family_info.latent.name
    stat = os.stat(info.filename)
    key = (info.filename, stat.st_mtime, stat.st_size)
    with _cache_lock:
        if key in _latent_cache:
            return _latent_cache[key]
    from modules.models import detection
    from modules.models.weights_io import CheckpointLoadError

    try:
        spec = detection.identify(info.filename)
    except (CheckpointLoadError, OSError, ValueError) as err:
        raise ProcessingError(f"cannot read checkpoint {info.name}: {err}") from None
    if not spec.supported or spec.family_info is None:
        raise ProcessingError(f"{info.name} is not a Stable Diffusion checkpoint this app can load: {spec.reason}")
    with _cache_lock:
        _latent_cache[key] = spec.family_info.latent.name
    return spec.family_info.latent.name


def _loaded(models: Any) -> list[Any]:
    manager = getattr(models, "_manager", None)
    return list(manager.loaded) if manager is not None else []


def check_refiner(params: GenerationParams, models: Any, options: Any) -> Any:
    """The refiner's CheckpointInfo, or None without one; ProcessingError when it cannot refine the
    checkpoint the job's settings select."""
    if not wants_refiner(params):
        return None
    info = models.registry.get_closest(params.refiner_checkpoint)
    if info is None:
        raise ProcessingError(f"refiner checkpoint {params.refiner_checkpoint!r} not found; known: "
                              f"{', '.join(models.titles()) or 'none'}")
    base = models.selected_info(options)
    base_space, refiner_space = latent_space_of(models, base), latent_space_of(models, info)
    if base_space != refiner_space:
        raise ProcessingError(
            f"refiner {info.name} works in the {refiner_space!r} latent space but the checkpoint {base.name} in "
            f"the {base_space!r} one: a refiner must share the base model's latent space (SD1.x and SD2.x "
            "refine each other, SDXL base and SDXL refiner do)")
    return info


def short_title(info: Any) -> str:
    """A1111's checkpoint short title, as the infotext's `Refiner:` names it: `name [hash]`."""
    return f"{info.name_for_extra} [{info.shorthash}]" if info.shorthash else info.name_for_extra


@dataclass
class JobRefiner:
    """The refiner of one running job, as the engine uses it (`ctx.refiner`)."""
    info: Any                                # the refiner's CheckpointInfo
    base_info: Any                           # the job's checkpoint
    switch_at: float
    hires_pass: str                          # A1111's "Refiner in hires fix" setting
    aesthetic_scores: tuple[float, float]    # (positive, negative) time ids of the SDXL refiner
    load: Callable[[Any], Any]               # CheckpointInfo -> LoadedModel (the model manager, job's VAE)
    encoder_for: Callable[[Any], Any]        # LoadedModel -> its PromptEncoder
    limit: Callable[[], int]                 # sd_checkpoints_limit now
    job: Any = None                          # jobs.JobContext, for the progress text
    used: bool = False                       # the refiner ran (the infotext names it)
    active: Any = None                       # (model, encoder) once it took over in the current batch
    swaps: list[float] = field(default_factory=list)

    @property
    def infotext_title(self) -> str:
        return short_title(self.info)

    def load_refiner(self) -> tuple[Any, Any]:
        return self._load(self.info, f"refiner {self.info.name_for_extra}")

    def load_base(self) -> tuple[Any, Any]:
        return self._load(self.base_info, f"checkpoint {self.base_info.name_for_extra}")

    def _load(self, info: Any, what: str) -> tuple[Any, Any]:
        swapping = self.limit() < 2
        if self.job is not None and swapping:
            self.job.state.set_textinfo(f"Loading {what} (sd_checkpoints_limit is 1: swapping models)…")
        started = time.perf_counter()
        model = self.load(info)
        took = time.perf_counter() - started
        if swapping:
            self.swaps.append(took)
            log.info("Refiner: sd_checkpoints_limit is %d, so the %s replaced the other model in memory (%.1fs); "
                     "set it to 2 or more to keep both loaded.", self.limit(), what, took)
            if self.job is not None:
                self.job.state.set_textinfo(f"Swapped to the {what} in {took:.1f}s")
        return model, self.encoder_for(model)


def job_refiner(params: GenerationParams, *, models: Any, options: Any, job: Any,
                encoder_for: Callable[[Any], Any]) -> JobRefiner | None:
    """The job's JobRefiner (checked as `check_refiner` does), or None without a refiner."""
    info = check_refiner(params, models, options)
    if info is None:
        return None
    return JobRefiner(
        info=info, base_info=models.selected_info(options), switch_at=float(params.refiner_switch_at),
        hires_pass=str(getattr(options, "hires_fix_refiner_pass", "second pass")),
        aesthetic_scores=(float(getattr(options, "sdxl_refiner_high_aesthetic_score", 6.0)),
                          float(getattr(options, "sdxl_refiner_low_aesthetic_score", 2.5))),
        load=lambda checkpoint: models.load(checkpoint, options), encoder_for=encoder_for,
        limit=lambda: models.manager.limit, job=job,
    )

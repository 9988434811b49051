"""The objects the app is made of, built once by webui.py and handed to the UI and API.

Nothing here is a module-level global: tests build as many as they like.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modules.core.callers import CallerPolicy
from modules.core.networks_service import ExtraNetworksService
from modules.models.checkpoints import CheckpointRegistry
from modules.core.generation import GenerationService
from modules.models.hashes import HashCache
from modules.core.jobs import JobQueue, JobState
from modules.core.limits import Limits
from modules.core.model_service import ModelService
from modules.core.options import Options
from modules.core.paths import AppPaths
from modules.models.vae import VaeRegistry
from modules.models.embeddings import EmbeddingDatabase
from modules.models.controlnet_registry import ControlNetRegistry
from modules.core import controlnet_extension
from modules.models.depth import DepthEstimators, set_default_estimators
from modules.core.styles import StyleDatabase
from modules.extensions.processing_adapter import wrap as wrap_params


@dataclass
class Services:
    cmd_opts: argparse.Namespace
    paths: AppPaths
    options: Options
    models: ModelService
    generation: GenerationService
    styles: StyleDatabase
    callbacks: Any = None  # script_callbacks.CallbackRegistry, set by webui.py when extensions are loaded
    scripts: Any = None    # scripts.ScriptRegistry of the loaded extensions (None: no scripts)
    extensions: list[Any] = field(default_factory=list)   # extensions.Extension, in load order
    limits: Limits = field(default_factory=Limits)        # input limits and folder rules, from the flags
    callers: CallerPolicy | None = None  # request -> Caller (who owns and may stop which job)
    upscalers: Any = None  # models.upscaler_models.UpscalerRegistry (models/ESRGAN & co)
    extras: Any = None     # core.extras_service.ExtrasService (the Extras tab and /extra-* API)
    networks: ExtraNetworksService | None = None   # LoRA/hypernetwork registries and their merging
    queue: Any = None      # core/queue_service.QueueService: the persistent queue and history
    controlnets: Any = None  # models.controlnet_registry.ControlNetRegistry

    def script_runner(self, is_img2img: bool):
        """The tab's scripts.ScriptRunner; an empty one when no extensions were loaded."""
        from modules.extensions.scripts import ScriptRegistry

        if self.scripts is None:
            self.scripts = ScriptRegistry()
        return self.scripts.runner(is_img2img)


def _manager_factory(opts: argparse.Namespace, options: Options):
    def build():
        from modules.models.devices import select_device_policy, vram_mode
        from modules.models.loader import ModelManager, make_load_fn

        policy = select_device_policy(use_cpu=opts.use_cpu, device_id=opts.device_id, no_half=opts.no_half,
                                      no_half_vae=opts.no_half_vae, precision=opts.precision,
                                      vram=vram_mode(medvram=opts.medvram, lowvram=opts.lowvram,
                                                     medvram_sdxl=getattr(opts, "medvram_sdxl", False)),
                                      lowram=getattr(opts, "lowram", None), compile=getattr(opts, "opt_compile", False))
        manager = ModelManager(make_load_fn(policy), limit=options.sd_checkpoints_limit)
        options.onchange("sd_checkpoints_limit", lambda: manager.set_limit(options.sd_checkpoints_limit), call=False)
        return manager
    return build


def build_services(opts: argparse.Namespace, paths: AppPaths, options: Options) -> Services:
    hash_cache = HashCache(paths.cache_file)  # one object: both registries write the same cache.json
    extra = [Path(opts.ckpt).expanduser().resolve()] if opts.ckpt else []
    registry = CheckpointRegistry(paths.ckpt_dir, extra_files=extra, hash_cache=hash_cache, hashing=not opts.no_hashing)
    registry.refresh()
    vaes = VaeRegistry(paths.vae_dir, paths.ckpt_dir, hash_cache=hash_cache)
    vaes.refresh()
    models = ModelService(registry=registry, vaes=vaes, options=options,
                          manager_factory=_manager_factory(opts, options),
                          preferred=extra[0] if extra else None,
                          vae_override=Path(opts.vae_path).expanduser().resolve() if opts.vae_path else None)
    options.templates["sd_model_checkpoint"].choices = models.titles
    options.templates["sd_vae"].choices = models.vae_choices
    limits = Limits.from_opts(opts)
    callers = CallerPolicy(opts)
    # The one user of a local server has nobody to share with: only the total bound applies to it.
    per_client = None if callers.single_user else _bound(getattr(opts, "queue_max_per_client", None))
    generation = GenerationService(models=models, options=options, paths=paths, queue=JobQueue(
        state=JobState(), max_per_owner=per_client, max_total=_bound(getattr(opts, "queue_max_total", None))),
        limits=limits)
    generation.make_script_p = wrap_params
    generation.embeddings = EmbeddingDatabase([paths.embeddings_dir], hash_cache, hashing=not opts.no_hashing)
    models.add_loaded_listener(lambda _model: generation.embeddings.invalidate())
    generation.networks = ExtraNetworksService.from_paths(paths)
    generation.networks.bind_settings(options)   # sd_hypernetwork, sd_lora: dropdowns of the network files
    queue_service = _queue_service(paths, generation, callers)
    generation.controlnets = controlnet_registry(opts, paths)
    styles = StyleDatabase(paths.styles_files)
    options.lock_dir_config(limits.dir_config_locked)
    set_default_estimators(DepthEstimators.for_models_dir(paths.models_dir, device=_depth_device(opts)))
    upscalers, extras = _build_extras(opts, paths, generation)
    return Services(cmd_opts=opts, paths=paths, options=options, models=models, generation=generation,
                    styles=styles, callers=callers, limits=limits, networks=generation.networks,
                    queue=queue_service, upscalers=upscalers, extras=extras,
                    controlnets=generation.controlnets)


def _queue_service(paths: AppPaths, generation: GenerationService, callers: CallerPolicy):
    """The job store under the data dir (queue/jobs.sqlite3); webui.main calls its restore() once the app is built."""
    from modules.core.job_store import JobStore
    from modules.core.queue_service import QueueService

    store = JobStore(paths.data_dir / "queue" / "jobs.sqlite3")
    return QueueService(store, generation, data_dir=paths.data_dir, outputs_dir=paths.outputs_dir,
                        single_user=callers.single_user)


def _build_extras(opts: argparse.Namespace, paths: AppPaths, generation: GenerationService) -> tuple[Any, Any]:
    """The upscaler registry (bound for hires fix, SD upscale and X/Y/Z) and the extras service."""
    from modules.core.extras_service import ExtrasService
    from modules.core.face_restoration import FaceRestoration
    from modules.engine.upscaling import bind_model_upscalers
    from modules.models.upscaler_models import UpscalerRegistry, upscaler_folders

    upscalers = UpscalerRegistry(upscaler_folders(paths.models_dir, opts))
    bind_model_upscalers(upscalers)
    faces = FaceRestoration.from_opts(paths.models_dir, opts)
    generation.restore_faces = faces.for_generation
    return upscalers, ExtrasService(generation=generation, upscalers=upscalers, faces=faces)


def controlnet_registry(opts: argparse.Namespace, paths: AppPaths) -> ControlNetRegistry:
    """models/ControlNet, the models folder of a user-installed sd-webui-controlnet (any folder name), and
    --controlnet-dir."""
    roots = [paths.models_dir / "ControlNet", *controlnet_extension.model_dirs(paths.extensions_dir)]
    if getattr(opts, "controlnet_dir", None):
        roots.insert(0, Path(opts.controlnet_dir).expanduser().resolve())
    registry = ControlNetRegistry(roots)
    registry.refresh()
    return registry


def _depth_device(opts: argparse.Namespace) -> str | None:
    """The depth estimator's device: the CPU with --use-cpu all/controlnet, else CUDA when present."""
    names = {str(n).lower() for n in (getattr(opts, "use_cpu", None) or [])}
    return "cpu" if names & {"all", "controlnet"} else None


def _bound(value: int | None) -> int | None:
    """A queue bound flag: None or 0 or less means no bound."""
    return value if value is not None and value > 0 else None

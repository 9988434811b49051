"""Generation as a service: the one entry point the UI and the API call.

Every job goes through the one FIFO JobQueue (diffusers pipelines are not
re-entrant); this class picks the model, builds the run context and saves.
"""
from __future__ import annotations

import contextlib
import logging
import threading
from pathlib import Path
from typing import Any, Callable, Iterator

from modules.core import saving
from modules.core.refiner import check_refiner, job_refiner, wants_refiner
from modules.core.jobs import Job, JobContext, JobQueue, JobState
from modules.core.limits import Limits
from modules.core.model_service import ModelService
from modules.core.options import Options, OptionsSnapshot
from modules.core.paths import AppPaths
from modules.core.pipeline import (GenerationParams, Img2ImgParams, Processed, ProcessingHooks, RunContext, Txt2ImgParams,
                                process_images)

log = logging.getLogger(__name__)


class JobRunner:
    """What a `script` given to GenerationService.submit renders with, inside its one queued job."""

    def __init__(self, service: "GenerationService", job: JobContext, options: OptionsSnapshot):
        self.service, self.job, self.options = service, job, options

    def __call__(self, params: GenerationParams, hooks: ProcessingHooks | None = None,
                 override_settings: dict[str, Any] | None = None) -> Processed:
        """process_images for `params`, with scripts' hooks and per-call settings (X/Y/Z's checkpoint axis)
        applied over the job's own snapshot."""
        options = self.options.with_overrides(override_settings)
        with self.service._job_options(options):
            # A script that set the job count itself (X/Y/Z: cells x batches) keeps it.
            return self.service._run(params, self.job, options, hooks=hooks,
                                     sets_job_count=self.job.state.job_count == -1)

    def saver(self, kind: str):
        """save(image, *, seed, prompt, info, grid) into the outputs folders of `kind`, with the job's settings."""
        return self.service.saver(kind, self.options)


class GenerationService:
    def __init__(self, *, models: ModelService, options: Options, paths: AppPaths, queue: JobQueue,
                 limits: Limits | None = None):
        self.models = models
        self.limits = limits or Limits()   # the server's input limits (docs/security.md)
        self.options = options
        self.paths = paths
        self.queue = queue
        self._encoders: dict[int, tuple[Any, Any]] = {}   # id(LoadedModel) -> (model, PromptEncoder)
        self.embeddings: Any = None   # models.embeddings.EmbeddingDatabase, set by build_services
        self._running = threading.local()   # .options: the settings snapshot of the job on this thread
        self._counting_tokenizer = None
        # (before_save, after_save) given to saving.save_image: webui.py points them at the
        # on_before_image_saved / on_image_saved callbacks.
        self.save_hooks: tuple[Any, Any] = (None, None)
        # () -> sampling.SamplingHooks or None, per job: the on_cfg_denoiser/on_cfg_denoised callbacks.
        self.sampling_hooks: Any = None
        # params -> A1111's `p` (what save callbacks get as params.p): set by build_services.
        self.make_script_p: Callable[[Any], Any] | None = None
        # (image, options) -> image: "Restore faces" (core/face_restoration.py), set by build_services.
        self.restore_faces: Callable[[Any, Any], Any] | None = None
        # core.networks_service.ExtraNetworksService: set by build_services (None: tags are only stripped).
        self.networks: Any = None
        # core/queue_service.QueueService: records every job in the job store (None: nothing is recorded).
        self.queue_service: Any = None
        self.controlnets: Any = None   # models.controlnet_registry.ControlNetRegistry: set by build_services

    @property
    def state(self) -> JobState:
        return self.queue.state

    # -- entry points ------------------------------------------------------------------------
    def submit(self, params: GenerationParams, *, override_settings: dict[str, Any] | None = None,
               restore_settings: bool = True, job_id: str | None = None, owner: str | None = None,
               script: Callable[[GenerationParams, "JobRunner", JobContext], Processed] | None = None,
               source: str = "ui", meta: dict[str, Any] | None = None, bounded: bool = True) -> Job[Processed]:
        """Queue a txt2img or img2img job. The job reads a snapshot of the settings taken when it starts,
        with `override_settings` applied to that snapshot only: no other client ever sees them. With
        `restore_settings=False` (A1111's override_settings_restore_afterwards) they are saved as the
        settings once the job is done. A `script` (extension scripts, SD upscale) replaces the plain
        run and may render several images through the `JobRunner` it is given, all in this one job."""
        params.validate(self.limits)  # bad input fails here, before it waits in the queue
        self.options.validate_values(override_settings or {})
        if wants_refiner(params):  # an unknown or incompatible refiner is a 4xx before queueing
            check_refiner(params, self.models, self.options.snapshot(override_settings))

        def run(job: JobContext) -> Processed:
            options = self.options.snapshot(override_settings)
            with self._job_options(options):
                if script is None:
                    result = self._run(params, job, options)
                else:
                    result = script(params, JobRunner(self, job, options), job)
            if not restore_settings:
                self._keep_overrides(override_settings or {})
            return result
        meta = {"source": source, **(meta or {})}
        recorded = None
        if self.queue_service is not None and "rid" not in meta:
            recorded = meta["rid"] = self.queue_service.record_generation(
                params, owner=owner, source=source, override_settings=override_settings,
                restore_settings=restore_settings, scripted=script is not None)
        try:
            return self.queue.submit(run, name=params.kind, job_count=params.n_iter, job_id=job_id or meta.get("rid"),
                                     owner=owner, meta=meta, bounded=bounded)
        except BaseException:
            if recorded is not None:
                self.queue_service.discard(recorded)   # refused (queue full): leave no queued row behind
            raise

    def in_job_thread(self) -> bool:
        return self.queue.in_worker()

    def submit_txt2img(self, params: Txt2ImgParams, **kwargs: Any) -> Job[Processed]:
        return self.submit(params, **kwargs)

    def submit_img2img(self, params: Img2ImgParams, **kwargs: Any) -> Job[Processed]:
        return self.submit(params, **kwargs)

    def txt2img(self, params: Txt2ImgParams, **kwargs: Any) -> Processed:
        return self.submit(params, **kwargs).result()

    def img2img(self, params: Img2ImgParams, **kwargs: Any) -> Processed:
        return self.submit(params, **kwargs).result()

    def current_options(self) -> Options | OptionsSnapshot:
        """The settings as the calling thread should see them: its job's snapshot inside a job (so an
        extension reading shared.opts sees that job's overrides), else the live settings."""
        return getattr(self._running, "options", None) or self.options

    @contextlib.contextmanager
    def _job_options(self, options: OptionsSnapshot) -> Iterator[None]:
        outer = getattr(self._running, "options", None)
        self._running.options = options
        try:
            yield
        finally:
            self._running.options = outer

    def _keep_overrides(self, overrides: dict[str, Any]) -> None:
        """A1111's override_settings_restore_afterwards=False: the overrides become the settings."""
        if not overrides:
            return
        if self.options.frozen:
            log.info("Settings are frozen (--freeze-settings): overrides were used for the job but not saved.")
            return
        for key, value in overrides.items():
            self.options.set(key, value)
        self.options.save()

    def submit_model_switch(self, title: str, *, owner: str | None = None) -> Job[Any]:
        """Load a checkpoint as a queued job, so it never races a running generation."""
        def switch(job: JobContext):
            job.state.set_textinfo(f"Loading {title}…")
            return self.models.select(title)
        return self.queue.submit(switch, name="load checkpoint", owner=owner)

    def preload(self) -> Job[Any] | None:
        """Load the selected checkpoint in the queue after startup, so the first Generate is quick.
        Without checkpoints there is nothing to do; a failure is logged by the queue and shown later."""
        if not self.models.titles():
            return None
        return self.queue.submit(lambda job: self.models.current(), name="load checkpoint")

    # -- internals -----------------------------------------------------------------------------
    def _run(self, params: GenerationParams, job: JobContext, options: OptionsSnapshot, *,
             hooks: ProcessingHooks | None = None, sets_job_count: bool = True) -> Processed:
        refiner = job_refiner(params, models=self.models, options=options, job=job, encoder_for=self._encoder_for)
        job.state.set_textinfo("Loading model…")
        model = self.models.current(options)
        job.state.set_textinfo(None)
        job.set_preview(self._preview_fn(model), options.show_progress_every_n_steps
                        if options.live_previews_enable else 0)
        ctx = RunContext(model=model, encoder=self._encoder_for(model), options=options,
                         save=self.saver(params.kind, options), job=job,
                         hooks=self.sampling_hooks() if self.sampling_hooks is not None else None,
                         processing_hooks=hooks, sets_job_count=sets_job_count, make_script_p=self.make_script_p,
                         refiner=refiner, vae_hash=self._vae_hash(model),
                         restore_faces=self.restore_faces, networks=self.networks,
                         controlnets=self.controlnets)
        if hooks is not None:
            hooks.bind_model(model)
        return process_images(params, ctx)

    def _vae_hash(self, model) -> str | None:
        """The infotext's `VAE hash` of the model's separate VAE (None: its own, or hashing is off)."""
        vae_file = getattr(model, "vae_file", None)
        if vae_file is None or not self.models.registry.hashing:
            return None
        from modules.models.vae import VaeInfo

        try:
            known = next((i for i in self.models.vaes.list() if i.filename == str(vae_file)), None)
            return self.models.vaes.shorthash(known or VaeInfo(filename=str(vae_file), name=Path(vae_file).name))
        except OSError:
            return None

    def _encoder_for(self, model):
        from modules.engine.diffusion import prompt_encoder_for

        loaded = {id(m) for m in self.models.manager.loaded}
        for key in [k for k in self._encoders if k not in loaded]:
            del self._encoders[key]   # drop encoders of unloaded models
        entry = self._encoders.get(id(model))
        if entry is None or entry[0] is not model:
            entry = (model, prompt_encoder_for(model))
            self._encoders[id(model)] = entry
        encoder = entry[1]
        if self.embeddings is not None:  # rescans embeddings/ if a file changed; a new set also re-keys the cache
            encoder.embeddings = self.embeddings.for_layout(encoder.embedding_layout)
        return encoder

    def embeddings_report(self, *, refresh: bool = False):
        """Textual-inversion embeddings loaded and skipped for the loaded model (else the last one used);
        ``refresh`` rereads every file. Never loads a checkpoint."""
        from modules.models.embeddings import EmbeddingReport

        if self.embeddings is None:
            return EmbeddingReport()
        model = self.models.loaded_model
        layout = None
        if model is not None:
            from modules.engine.diffusion import prompt_encoder_for

            entry = self._encoders.get(id(model))
            encoder = entry[1] if entry is not None and entry[0] is model else prompt_encoder_for(model)
            layout = encoder.embedding_layout
        return self.embeddings.refresh(layout) if refresh else self.embeddings.report(layout)

    def embeddings_lookup(self) -> dict[int, list[tuple[tuple[int, ...], Any]]]:
        """A1111's ``ids_lookup`` for the loaded model's first tokenizer (all CLIP tokenizers share one
        vocabulary): first token id -> [(the name's token ids, embedding)], longest first; {} when no
        model is loaded. Never loads a checkpoint, never touches a running job's encoder."""
        model = self.models.loaded_model
        if self.embeddings is None or model is None:
            return {}
        from modules.engine.diffusion import prompt_encoder_for

        entry = self._encoders.get(id(model))
        encoder = entry[1] if entry is not None and entry[0] is model else prompt_encoder_for(model)
        return self.embeddings.for_layout(encoder.embedding_layout).lookup(encoder.encoders[0].tokenizer)

    @staticmethod
    def _preview_fn(model):
        from modules.engine.latent_preview import approx_rgb

        latent = model.spec.family_info.latent
        return lambda latents: approx_rgb(latents, latent)

    def saver(self, kind: str, options: Options | OptionsSnapshot | None = None):
        options, paths = options or self.current_options(), self.paths

        def save(image, *, seed: int, prompt: str, info: str | None, grid: bool, p: Any = None):
            images_dir, grids_dir = saving.output_dirs(paths, options, kind)
            directory = grids_dir if grid and grids_dir is not None else images_dir
            saved = saving.save_image(
                image, directory, seed=seed, prompt=prompt, info=info,
                extension=options.grid_format if grid else options.samples_format,
                pattern="" if grid else options.samples_filename_pattern,
                add_number=options.save_images_add_number, grid=grid, jpeg_quality=options.jpeg_quality,
                webp_lossless=options.webp_lossless, save_txt=options.save_txt and not grid,
                embed_info=options.enable_pnginfo,
                before_save=self.save_hooks[0], after_save=self.save_hooks[1], p=p,
            )
            if self.queue_service is not None and saved.path:
                self.queue_service.on_saved(str(saved.path), info, grid)   # the file first, then the row naming it
            return saved.path
        return save

    def count_tokens(self, text: str) -> tuple[int, int]:
        """Tokens used and the limit of the chunks they fill (A1111's "12/75"), without a model."""
        from modules.engine import conditioning
        from modules.models import families

        text = (text or "")[:self.limits.max_prompt_length]  # a hostile length never stalls the counter
        if self._counting_tokenizer is None:  # CLIP-L and OpenCLIP share one vocab, so one tokenizer counts for all
            self._counting_tokenizer = families.load_tokenizer("clip-l")
        counted = conditioning.count_prompt_tokens(text, self._counting_tokenizer, embeddings=self._loaded_embeddings())
        return counted.count, counted.max_length

    def _loaded_embeddings(self):
        """The embedding set of the loaded model's encoder (an embedding counts as its vectors), if any."""
        model = self.models.loaded_model
        entry = self._encoders.get(id(model)) if model is not None else None
        return entry[1].embeddings if entry is not None and entry[0] is model else None

"""Extras as a service: one queued job per request (single image, batch, or a folder), for UI and API.

The job runs on the generation queue (so it waits behind, and never races, a generation), reports
per-tile progress (UI, terminal bar, /progress) and stops between tiles when interrupted.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from PIL import Image

from modules.core import saving
from modules.core.extras import (ExtrasParams, ExtrasResult, check_limits, info_text, list_directory_images,
                                 postprocess, source_pnginfo)
from modules.core.img2img_batch import check_inside
from modules.core.jobs import Job, JobContext
from modules.core.pipeline import ProcessingError

log = logging.getLogger(__name__)


class ExtrasService:
    def __init__(self, *, generation: Any, upscalers: Any, faces: Any = None):
        self.generation = generation          # GenerationService: its queue, options, paths, limits, save hooks
        self.upscalers = upscalers            # models.upscaler_models.UpscalerRegistry
        self.faces = faces                    # engine face restoration (None: not available)

    @property
    def limits(self) -> Any:
        return self.generation.limits

    def submit(self, images: list[Image.Image], params: ExtrasParams, *, save: bool = True,
               output_dir: Path | None = None, names: list[str] | None = None,
               owner: str | None = None) -> Job[ExtrasResult]:
        """Queue one extras job over `images`; bad parameters fail here, before queueing."""
        params.validate()
        if len(images) > self.limits.max_input_images:
            raise ProcessingError(f"{len(images)} images; at most {self.limits.max_input_images} per request "
                                  f"(--max-input-images)")
        check_limits(params, images, self.limits)

        def run(job: JobContext) -> ExtrasResult:
            return self._run(job, images, params, save=save, output_dir=output_dir)
        return self.generation.queue.submit(run, name="extras", job_count=max(1, len(images)), owner=owner)

    def directory_images(self, input_dir: str, output_dir: str) -> tuple[list[Image.Image], Path | None]:
        """Batch from Directory: the images of `input_dir` and where to save, both inside the allowed
        roots (the data folder, unless --allow-dir-config), as img2img Batch checks them."""
        root = None if self.limits.allow_dir_config else self.generation.paths.data_dir
        if not str(input_dir or "").strip():
            raise ProcessingError("input directory: enter a folder")
        if root is not None:
            input_dir = check_inside("input directory", input_dir, Path(root))
            output_dir = check_inside("output directory", output_dir, Path(root))
        images = []
        for path in list_directory_images(Path(input_dir).expanduser(), self.limits):
            try:
                with Image.open(path) as img:
                    self.limits.check_input_pixels(f"{path.name}", *img.size)
                    img.load()
                    images.append(img.copy())
            except (OSError, ValueError) as err:
                log.warning("extras batch: skipped %s: %s", path, err)
        return images, (Path(output_dir).expanduser() if str(output_dir or "").strip() else None)

    # -- the job ------------------------------------------------------------------------------------------
    def _run(self, job: JobContext, images: list[Image.Image], params: ExtrasParams, *, save: bool,
             output_dir: Path | None) -> ExtrasResult:
        from modules.engine.model_upscale import UpscaleInterrupted

        options = self.generation.options.snapshot()
        result = ExtrasResult(images=[], info={}, paths=[])
        job.set_job_count(len(images))
        for index, source in enumerate(images):
            job.state.set_textinfo(f"Extras: image {index + 1}/{len(images)}")
            try:
                out, info = postprocess(source, params, self._upscale_fn(job, options), self._restore_fn())
            except UpscaleInterrupted:
                result.interrupted = True
                break
            result.images.append(out)
            result.info = info
            out.info = {**source_pnginfo(source), **({"postprocessing": info_text(info)} if info else {})}
            if save:
                result.paths.append(self._save(out, source, info, options, output_dir))
            job.nextjob()
            if job.should_stop():
                result.interrupted = index + 1 < len(images)
                break
        job.state.set_textinfo(None)
        return result

    def _upscale_fn(self, job: JobContext, options: Any):
        from modules.engine.upscaling import upscale_image

        def upscale(image: Image.Image, size: tuple[int, int], name: str) -> Image.Image:
            return upscale_image(image, size, name, options=options, registry=self.upscalers,
                                 on_tile=job.step_callback, should_stop=job.should_stop)
        return upscale

    def _restore_fn(self):
        return None if self.faces is None else self.faces.restore

    def _save(self, image: Image.Image, source: Image.Image, info: dict[str, Any], options: Any,
              output_dir: Path | None) -> Path:
        directory = output_dir or saving.output_dirs(self.generation.paths, options, "extras")[0]
        before, after = self.generation.save_hooks
        saved = saving.save_image(
            image, directory, seed=None, info=info_text(info) if info else None,
            extension=options.samples_format, jpeg_quality=options.jpeg_quality,
            webp_lossless=options.webp_lossless, embed_info=options.enable_pnginfo,
            existing_pnginfo=source_pnginfo(source), pnginfo_section="extras",
            before_save=before, after_save=after)
        return saved.path

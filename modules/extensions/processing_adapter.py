"""A1111's `p`: StableDiffusionProcessingTxt2Img / Img2Img, as a facade over our typed params.

Extension scripts read and write `p.prompt`, `p.seed`, `p.all_prompts`, `p.extra_generation_params`,
`p.enable_hr`, `p.init_images`... Each such name is a property that reads or writes the typed
`p.params` (a Txt2ImgParams / Img2ImgParams), or, for the per-run lists, the running
`processing.ProcessingRun`. Names we do not model are plain attributes, so extensions may stash
their own state on `p` as they do in A1111.

`process_images()` renders `p.params` inside the current job through the runner the job bound
(with the scripts' hooks and `p.override_settings`); outside a job it queues one.
No gradio here.
"""
from __future__ import annotations

import copy
from typing import Any, Callable

from modules.core import pipeline as processing
from modules.extensions import context
from modules.core.pipeline import GenerationParams, Img2ImgParams, Processed, ProcessingRun, Txt2ImgParams

# Runs one params object in the current job: (params, hooks, override_settings) -> Processed.
Runner = Callable[[GenerationParams, Any, dict], Processed]

def _param(attr: str) -> property:
    return property(lambda self: getattr(self.params, attr),
                    lambda self, value: setattr(self.params, attr, value),
                    doc=f"params.{attr}")


def _hires(attr: str) -> property:
    return property(lambda self: getattr(self.params.hires, attr),
                    lambda self, value: setattr(self.params.hires, attr, value),
                    doc=f"params.hires.{attr}")


def _hires_or_same(attr: str, same: str) -> property:
    """Hires sampler/scheduler: "" in the typed params is A1111's "Use same ..." label."""
    def get(self):
        return getattr(self.params.hires, attr) or same

    def set_(self, value):
        setattr(self.params.hires, attr, "" if value in (None, same) else value)
    return property(get, set_, doc=f"params.hires.{attr}, or {same!r}")


def _run_list(name: str) -> property:
    def get(self):
        run = self.__dict__.get("_run")
        return getattr(run, name) if run is not None else self.__dict__.get(f"_{name}")

    def set_(self, value):
        run = self.__dict__.get("_run")
        if run is not None:
            setattr(run, name, value)
        else:
            self.__dict__[f"_{name}"] = value
    return property(get, set_, doc=f"the running ProcessingRun's {name}")


class StableDiffusionProcessing:
    """The fields every A1111 `p` has. Construct with A1111's keyword names, or wrap typed params."""

    params_class: type[GenerationParams] = GenerationParams

    prompt = _param("prompt")
    negative_prompt = _param("negative_prompt")
    styles = _param("styles")
    steps = _param("steps")
    sampler_name = _param("sampler_name")
    scheduler = _param("scheduler")
    cfg_scale = _param("cfg_scale")
    width = _param("width")
    height = _param("height")
    batch_size = _param("batch_size")
    n_iter = _param("n_iter")
    seed = _param("seed")
    subseed = _param("subseed")
    subseed_strength = _param("subseed_strength")
    seed_resize_from_w = _param("seed_resize_from_w")
    seed_resize_from_h = _param("seed_resize_from_h")
    tiling = _param("tiling")
    restore_faces = _param("restore_faces")
    do_not_save_grid = _param("do_not_save_grid")
    extra_generation_params = _param("extra_generation_params")
    clip_skip = _param("clip_skip")
    disable_extra_networks = _param("disable_extra_networks")

    all_prompts = _run_list("all_prompts")
    all_negative_prompts = _run_list("all_negative_prompts")
    all_seeds = _run_list("all_seeds")
    all_subseeds = _run_list("all_subseeds")
    prompts = _run_list("prompts")
    negative_prompts = _run_list("negative_prompts")
    seeds = _run_list("seeds")
    subseeds = _run_list("subseeds")
    iteration = _run_list("iteration")
    batch_index = _run_list("batch_index")

    def __init__(self, params: GenerationParams | None = None, **kwargs: Any):
        self.__dict__["params"] = params if params is not None else self.params_class()
        self.__dict__["_run"] = None
        self.__dict__["_sd_model"] = kwargs.pop("sd_model", None)
        self.override_settings: dict[str, Any] = dict(kwargs.pop("override_settings", None) or {})
        self.override_settings_restore_afterwards = kwargs.pop("override_settings_restore_afterwards", True)
        self.scripts: Any = None          # the ScriptRunner of this tab, when scripts run
        self.script_args: list[Any] = []
        self.outpath_samples = kwargs.pop("outpath_samples", None)
        self.outpath_grids = kwargs.pop("outpath_grids", None)
        self.is_api = False
        self.user = None
        self.comments: dict[str, Any] = {}
        self.sampler_index = None
        self.eta = None
        self.main_prompt = None
        self.main_negative_prompt = None
        self.refiner_checkpoint = None
        self.runner: Runner | None = None  # bound by the job that runs scripts
        for key, value in kwargs.items():
            setattr(self, key, value)

    # -- A1111 names with other shapes here ------------------------------------------------
    @property
    def sd_model(self) -> Any:
        """The loaded model (model_loader.LoadedModel) this p renders with, or None before one is loaded."""
        for key in ("_sd_model", "_job_model"):
            if self.__dict__.get(key) is not None:
                return self.__dict__[key]
        services = context.services()
        return None if services is None else services.models.loaded_model

    @sd_model.setter
    def sd_model(self, value: Any) -> None:
        self.__dict__["_sd_model"] = value

    @property
    def do_not_save_samples(self) -> bool:
        return not self.params.save_images

    @do_not_save_samples.setter
    def do_not_save_samples(self, value: bool) -> None:
        self.params.save_images = not value

    @property
    def kind(self) -> str:
        return self.params.kind

    def __copy__(self) -> "StableDiffusionProcessing":
        """A1111 scripts do `copy.copy(p)` and change the copy: the typed params must not be shared."""
        out = object.__new__(type(self))
        out.__dict__.update(self.__dict__)
        params = copy.copy(self.params)
        params.extra_generation_params = dict(self.params.extra_generation_params)
        params.styles = list(self.params.styles)
        if isinstance(params, Txt2ImgParams):
            params.hires = copy.copy(self.params.hires)
        out.__dict__["params"] = params
        out.__dict__["_run"] = None
        out.override_settings = dict(self.override_settings)
        return out

    # -- running -------------------------------------------------------------------------------
    def process_images(self) -> Processed:
        """A1111's processing.process_images(p): render this p's params with the scripts' hooks."""
        if self.scripts is not None:
            self.scripts.before_process(self)
        hooks = self.scripts.hooks_for(self) if self.scripts is not None else None
        runner = self.runner or _queue_runner(self)
        return runner(self.params, hooks, dict(self.override_settings))

    def save_image(self, image: Any, *, info: str | None = None, grid: bool = False, seed: int | None = None,
                   prompt: str | None = None) -> str | None:
        """Save an image a script made (a grid, a combined upscale) where this p's outputs go, with the
        user's format/naming settings. Returns the path, or None when not saved."""
        if self.runner is None or not hasattr(self.runner, "saver"):
            if context.services() is None:
                return None
            save = context.services().generation.saver(self.kind)
        else:
            save = self.runner.saver(self.kind)
        first_seed = seed if seed is not None else (self.all_seeds[0] if self.all_seeds else self.seed)
        first_prompt = prompt if prompt is not None else (self.all_prompts[0] if self.all_prompts else self.prompt)
        path = save(image, seed=first_seed, prompt=first_prompt if isinstance(first_prompt, str) else "",
                    info=info, grid=grid, p=self)
        return str(path) if path else None

    def with_params(self, params: GenerationParams) -> "StableDiffusionProcessing":
        """A copy of this p that renders `params` (same scripts, runner and overrides)."""
        out = copy.copy(self)
        out.__dict__["params"] = params
        return out

    def close(self) -> None:
        """A1111 frees cached conditioning here; nothing is cached on p in this app."""

    def bind_run(self, run: ProcessingRun | None) -> None:
        """Point the all_prompts/seeds/... properties at the running ProcessingRun (processing's hooks do)."""
        self.__dict__["_run"] = run

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.params!r})"


class StableDiffusionProcessingTxt2Img(StableDiffusionProcessing):
    params_class = Txt2ImgParams

    enable_hr = _hires("enabled")
    hr_scale = _hires("scale")
    hr_upscaler = _hires("upscaler")
    hr_second_pass_steps = _hires("steps")
    hr_resize_x = _hires("resize_x")
    hr_resize_y = _hires("resize_y")
    denoising_strength = _hires("denoising_strength")
    hr_prompt = _hires("prompt")
    hr_negative_prompt = _hires("negative_prompt")

    hr_sampler_name = _hires_or_same("sampler_name", "Use same sampler")
    hr_scheduler = _hires_or_same("scheduler", "Use same scheduler")

    @property
    def hr_upscale_to_x(self) -> int:
        return processing.hires_target_size(self.params)[0] if self.params.hires.enabled else self.width

    @property
    def hr_upscale_to_y(self) -> int:
        return processing.hires_target_size(self.params)[1] if self.params.hires.enabled else self.height


class StableDiffusionProcessingImg2Img(StableDiffusionProcessing):
    params_class = Img2ImgParams

    init_images = _param("init_images")
    resize_mode = _param("resize_mode")
    denoising_strength = _param("denoising_strength")
    image_mask = _param("mask")
    mask = _param("mask")
    mask_blur = _param("mask_blur")
    inpainting_fill = _param("inpainting_fill")
    inpaint_full_res = _param("inpaint_full_res")
    inpaint_full_res_padding = _param("inpaint_full_res_padding")
    inpainting_mask_invert = _param("inpainting_mask_invert")

    @property
    def mask_blur_x(self) -> int:
        return self.params.mask_blur

    @mask_blur_x.setter
    def mask_blur_x(self, value: int) -> None:
        self.params.mask_blur = int(value)

    mask_blur_y = mask_blur_x


def wrap(params: GenerationParams, **kwargs: Any) -> StableDiffusionProcessing:
    """The `p` for typed params: the Img2Img class for img2img, else Txt2Img."""
    cls = StableDiffusionProcessingImg2Img if isinstance(params, Img2ImgParams) else StableDiffusionProcessingTxt2Img
    return cls(params, **kwargs)


def _queue_runner(p: StableDiffusionProcessing) -> Runner:
    """For a `p` an extension built itself (say in an API route): queue a job and wait for it."""
    services = context.services()
    if services is None:
        raise RuntimeError("process_images(p): the app is not running, so there is no job queue to run p in")
    generation = services.generation
    if generation.in_job_thread():
        raise RuntimeError("process_images(p) was called inside a running job with a p that job did not make; "
                           "copy the p your script was given (copy.copy(p)) instead of building a new one")

    def run(params: GenerationParams, hooks: Any, overrides: dict) -> Processed:
        def script(params, job_run, job):
            return job_run(params, hooks=hooks)
        job = generation.submit(params, override_settings=overrides or None, script=script)
        return job.result()
    return run


__all__ = ["StableDiffusionProcessing", "StableDiffusionProcessingTxt2Img", "StableDiffusionProcessingImg2Img",
           "wrap"]

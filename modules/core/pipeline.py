"""Typed generation parameters -> images + infotexts. The one place a job runs.

The UI and the API both build a `Txt2ImgParams`/`Img2ImgParams` and call `process_images`
through the job queue; they never touch models or samplers themselves.
"""
from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from PIL import Image

from modules.core import infotext as infotext_mod
from modules.engine import sampler_catalog as samplers
from modules.core.limits import LimitError, Limits, check_finite
from modules.core.version import VERSION
from modules.engine.upscaling import IMAGE_UPSCALERS, LATENT_UPSCALE_MODES, resize_image
from modules.engine.upscaling import image_upscaler_names, is_image_upscaler



def get_fixed_seed(seed: int | str | None) -> int:
    """A1111's name: -1 (random) becomes a concrete seed; others are kept."""
    from modules.core.seeds import resolve_seed

    return resolve_seed(seed)


def fix_seed(p: Any) -> None:
    """A1111's fix_seed(p): pick the random seed and subseed now, so several renders share them."""
    p.seed = get_fixed_seed(p.seed)
    p.subseed = get_fixed_seed(p.subseed)


class ProcessingError(ValueError):
    """Bad parameters; the message is shown to the user as-is."""


@dataclass
class HiresParams:
    enabled: bool = False
    upscaler: str = "Latent"
    scale: float = 2.0
    resize_x: int = 0           # "resize width to" (0: use scale)
    resize_y: int = 0
    steps: int = 0              # 0: the same number as the first pass
    denoising_strength: float = 0.7
    sampler_name: str = ""      # "": the first pass's sampler
    scheduler: str = ""
    prompt: str = ""            # "": the first pass's prompt
    negative_prompt: str = ""


@dataclass
class GenerationParams:
    """Fields shared by txt2img and img2img (A1111's StableDiffusionProcessing)."""
    prompt: str = ""
    negative_prompt: str = ""
    styles: list[str] = field(default_factory=list)
    steps: int = 20
    sampler_name: str = "DPM++ 2M"
    scheduler: str = "Automatic"
    cfg_scale: float = 7.0
    width: int = 512
    height: int = 512
    batch_size: int = 1
    n_iter: int = 1
    seed: int = -1
    subseed: int = -1
    subseed_strength: float = 0.0
    seed_resize_from_w: int = 0
    seed_resize_from_h: int = 0
    clip_skip: int | None = None        # None: the "Clip skip" setting
    tiling: bool = False
    restore_faces: bool = False         # A1111's "Restore faces": the face_restoration_model setting's restorer
    save_images: bool = True
    do_not_save_grid: bool = False
    extra_generation_params: dict[str, Any] = field(default_factory=dict)
    refiner_checkpoint: str = ""        # "": no refiner (A1111 1.6+'s Refiner; see core/refiner.py)
    refiner_switch_at: float = 0.8      # the fraction of the steps after which the refiner samples
    disable_extra_networks: bool = False    # A1111's: <lora:...> tags are stripped but not applied
    controlnet_units: list[Any] = field(default_factory=list)   # core.controlnet_units.ControlNetUnit

    kind = "txt2img"  # outputs/<kind>-images; a class attribute, not a field

    def validate(self, limits: Limits | None = None) -> None:
        """Refuse bad or oversized input (ProcessingError naming the field); `limits`: the server's
        (docs/security.md), the defaults when not given."""
        limits = limits or Limits()
        try:
            self._check_limits(limits)
        except LimitError as err:
            raise ProcessingError(str(err)) from None
        if not 1 <= self.steps <= limits.max_steps:
            raise ProcessingError(f"steps must be between 1 and {limits.max_steps}, got {self.steps}")
        for name in ("width", "height"):
            value = getattr(self, name)
            if not 64 <= value <= limits.max_side or value % 8:
                raise ProcessingError(f"{name} must be a multiple of 8 between 64 and {limits.max_side}, got {value}")
        if not 1 <= self.batch_size <= 64 or not 1 <= self.n_iter <= 1000:
            raise ProcessingError(f"batch size must be 1-64 and batch count 1-1000 (batch_size={self.batch_size}, "
                                  f"n_iter={self.n_iter})")
        if self.batch_size * self.n_iter > limits.max_images:
            raise ProcessingError(f"batch_size x n_iter: {self.batch_size * self.n_iter} images; at most "
                                  f"{limits.max_images} per request (--max-images)")
        if not 0 <= self.subseed_strength <= 1:
            raise ProcessingError(f"variation strength must be between 0 and 1, got {self.subseed_strength}")
        if self.cfg_scale < 0 or self.cfg_scale > 100:
            raise ProcessingError(f"CFG scale must be between 0 and 100, got {self.cfg_scale}")
        samplers.resolve_sampler(self.sampler_name, self.scheduler)  # raises with the valid names
        if self.refiner_checkpoint and not 0.01 <= self.refiner_switch_at <= 1.0:
            raise ProcessingError(f"refiner_switch_at must be between 0.01 and 1.0, got {self.refiner_switch_at}")
        _validate_controlnet_units(self, limits)

    def _check_limits(self, limits: Limits) -> None:
        """Non-finite numbers, prompt lengths, output and seed-resize pixels."""
        for name, value in vars(self).items():
            check_finite(name, value)
        for name, value in (getattr(self, "hires", None).__dict__.items() if getattr(self, "hires", None) else ()):
            check_finite(f"hires.{name}", value)
        for name in ("prompt", "negative_prompt"):
            limits.check_prompt(name, getattr(self, name))
        limits.check_pixels("width x height", self.width, self.height)
        if self.seed_resize_from_w < 0 or self.seed_resize_from_h < 0:
            raise LimitError("seed_resize_from_w/h: must not be negative")
        if self.seed_resize_from_w > 0 and self.seed_resize_from_h > 0:
            limits.check_pixels("seed_resize_from_w x seed_resize_from_h", self.seed_resize_from_w,
                                self.seed_resize_from_h)
        elif max(self.seed_resize_from_w, self.seed_resize_from_h) > limits.max_side:
            raise LimitError(f"seed_resize_from_w/h: at most {limits.max_side}")

    @property
    def denoising_strength_for_info(self) -> float | None:
        return None


@dataclass
class Txt2ImgParams(GenerationParams):
    hires: HiresParams = field(default_factory=HiresParams)

    @property
    def denoising_strength_for_info(self) -> float | None:
        return self.hires.denoising_strength if self.hires.enabled else None

    def validate(self, limits: Limits | None = None) -> None:
        limits = limits or Limits()
        super().validate(limits)
        if self.hires.enabled:
            h = self.hires
            try:
                for name in ("prompt", "negative_prompt"):
                    limits.check_prompt(f"hr_{name}", getattr(h, name))
                if not 0 < h.scale <= 8 and not (h.resize_x or h.resize_y):
                    raise LimitError(f"hr_scale: must be more than 0 and at most 8, got {h.scale}")
                if h.resize_x < 0 or h.resize_y < 0 or h.steps < 0:
                    raise LimitError("hr_resize_x/hr_resize_y/hr_second_pass_steps: must not be negative")
                if h.steps > limits.max_steps:
                    raise LimitError(f"hr_second_pass_steps: {h.steps}; at most {limits.max_steps} (--max-steps)")
                limits.check_pixels("hires target (hr_scale, hr_resize_x, hr_resize_y)", *hires_target_size(self))
            except LimitError as err:
                raise ProcessingError(str(err)) from None
            if h.upscaler not in LATENT_UPSCALE_MODES and not is_image_upscaler(h.upscaler):
                raise ProcessingError(f"unknown hires upscaler {h.upscaler!r}; choose one of "
                                      f"{', '.join([*LATENT_UPSCALE_MODES, *image_upscaler_names()])}")
            if not 0 <= h.denoising_strength <= 1:
                raise ProcessingError("hires denoising strength must be between 0 and 1")
            if h.sampler_name and h.sampler_name != "Use same sampler":
                samplers.resolve_sampler(h.sampler_name, h.scheduler or None)


RESIZE_MODES = ("Just resize", "Crop and resize", "Resize and fill", "Just resize (latent upscale)")
MASKED_CONTENT = ("fill", "original", "latent noise", "latent nothing")


@dataclass
class Img2ImgParams(GenerationParams):
    """img2img and inpainting. Defaults are the UI's; the API sets its own (A1111 differs there)."""
    init_images: list[Any] = field(default_factory=list)   # PIL images; cycled over the batch
    resize_mode: int = 0                # index into RESIZE_MODES
    denoising_strength: float = 0.75
    mask: Any = None                    # PIL image; white = repaint
    mask_blur: int = 4
    inpainting_mask_invert: bool = False    # "Inpaint not masked"
    inpainting_fill: int = 1            # index into MASKED_CONTENT
    inpaint_full_res: bool = False      # "Only masked"
    inpaint_full_res_padding: int = 32
    depth_image: Any = None             # PIL image: depth map for SD2 depth models (white = near); None: estimate

    kind = "img2img"

    @property
    def denoising_strength_for_info(self) -> float | None:
        return self.denoising_strength

    def validate(self, limits: Limits | None = None) -> None:
        limits = limits or Limits()
        super().validate(limits)
        if not self.init_images:
            raise ProcessingError("img2img needs an init image")
        if len(self.init_images) > limits.max_input_images:
            raise ProcessingError(f"init_images: {len(self.init_images)} images; at most {limits.max_input_images} "
                                  f"(--max-input-images)")
        if not 0 <= self.denoising_strength <= 1:
            raise ProcessingError(f"denoising strength must be between 0 and 1, got {self.denoising_strength}")
        if self.resize_mode not in range(len(RESIZE_MODES)):
            raise ProcessingError(f"resize mode must be 0-{len(RESIZE_MODES) - 1}, got {self.resize_mode}")
        if self.inpainting_fill not in range(len(MASKED_CONTENT)):
            raise ProcessingError(f"masked content must be 0-{len(MASKED_CONTENT) - 1}, got {self.inpainting_fill}")
        if not 0 <= self.mask_blur <= 64 or not 0 <= self.inpaint_full_res_padding <= 256:
            raise ProcessingError("mask blur must be 0-64 and masked area padding 0-256")
        if self.depth_image is not None:
            limits.check_input_pixels("depth_image", *self.depth_image.size)


class Processed:
    """What a job returns; `js()` has the fields of A1111's Processed.js().

    The constructor takes A1111's positional form too, `Processed(p, images, seed, info, ...)`, so
    scripts written for A1111 can build one; `p` is typed params or a script's `p` object.
    """

    def __init__(self, p: Any = None, images_list: list[Any] | None = None, seed: int = -1, info: str = "",
                 subseed: int | None = None, all_prompts: list[str] | None = None,
                 all_negative_prompts: list[str] | None = None, all_seeds: list[int] | None = None,
                 all_subseeds: list[int] | None = None, index_of_first_image: int = 0,
                 infotexts: list[str] | None = None, comments: str = "", extra_images_list: Any = (), *,
                 images: list[Any] | None = None, params: Any = None, sd_model_name: str | None = None,
                 sd_model_hash: str | None = None, sd_vae_name: str | None = None, sd_vae_hash: str | None = None,
                 clip_skip: int = 1, saved_paths: list[str] | None = None, job_timestamp: str = "",
                 interrupted: bool = False, extra_generation_params: dict[str, Any] | None = None,
                 is_using_inpainting_conditioning: bool = False):
        source = params if params is not None else p
        typed = getattr(source, "params", source)  # a script's `p` wraps typed params
        self.images = list(images if images is not None else images_list or [])
        if extra_images_list:
            self.images += list(extra_images_list)
        self.params: GenerationParams = typed
        self.infotexts = list(infotexts) if infotexts is not None else [info] * len(self.images)
        self.info = info or (self.infotexts[index_of_first_image] if len(self.infotexts) > index_of_first_image
                             else (self.infotexts[0] if self.infotexts else ""))

        def run_list(name: str, default: list[Any]) -> list[Any]:
            value = getattr(source, name, None) if source is not None else None
            return list(value) if isinstance(value, list) and value else default
        self.seed = seed
        self.subseed = subseed if subseed is not None else getattr(typed, "subseed", -1)
        self.all_prompts = list(all_prompts) if all_prompts is not None else run_list(
            "all_prompts", [getattr(typed, "prompt", "")])
        self.all_negative_prompts = list(all_negative_prompts) if all_negative_prompts is not None else run_list(
            "all_negative_prompts", [getattr(typed, "negative_prompt", "")])
        self.all_seeds = list(all_seeds) if all_seeds is not None else run_list("all_seeds", [seed])
        self.all_subseeds = list(all_subseeds) if all_subseeds is not None else run_list(
            "all_subseeds", [self.subseed])
        model_info = getattr(getattr(source, "sd_model", None), "info", None)
        self.sd_model_name = sd_model_name or getattr(model_info, "name_for_extra", None)
        self.sd_model_hash = sd_model_hash or getattr(model_info, "shorthash", None)
        self.sd_vae_name = sd_vae_name
        self.sd_vae_hash = sd_vae_hash
        self.clip_skip = clip_skip
        self.index_of_first_image = index_of_first_image
        self.saved_paths = list(saved_paths or [])
        self.job_timestamp = job_timestamp
        self.interrupted = interrupted
        self.extra_generation_params = dict(extra_generation_params if extra_generation_params is not None
                                            else getattr(typed, "extra_generation_params", None) or {})
        self.comments = comments
        self.is_using_inpainting_conditioning = is_using_inpainting_conditioning

    def __repr__(self) -> str:
        return (f"Processed({len(self.images)} image(s), seed={self.seed}, "
                f"index_of_first_image={self.index_of_first_image}, interrupted={self.interrupted})")

    def copy_with(self, **changes: Any) -> "Processed":
        out = copy.copy(self)
        for key, value in changes.items():
            if not hasattr(out, key):
                raise AttributeError(f"Processed has no field {key!r}")
            setattr(out, key, value)
        return out

    def saved_images_for_gallery(self) -> list[Any]:
        """Saved files where there are some (their PNG chunk survives the browser), else the images."""
        if self.saved_paths and len(self.saved_paths) == len(self.images) - self.index_of_first_image:
            return self.images[:self.index_of_first_image] + list(self.saved_paths)
        return list(self.images)

    def js(self) -> dict[str, Any]:
        p = self.params
        return {
            "prompt": self.all_prompts[0] if self.all_prompts else p.prompt,
            "all_prompts": self.all_prompts,
            "negative_prompt": self.all_negative_prompts[0] if self.all_negative_prompts else p.negative_prompt,
            "all_negative_prompts": self.all_negative_prompts,
            "seed": self.seed,
            "all_seeds": self.all_seeds,
            "subseed": self.subseed,
            "all_subseeds": self.all_subseeds,
            "subseed_strength": p.subseed_strength,
            "width": p.width,
            "height": p.height,
            "sampler_name": p.sampler_name,
            "cfg_scale": p.cfg_scale,
            "steps": p.steps,
            "batch_size": p.batch_size,
            "restore_faces": bool(getattr(p, "restore_faces", False)),
            "face_restoration_model": p.extra_generation_params.get("Face restoration"),
            "sd_model_name": self.sd_model_name,
            "sd_model_hash": self.sd_model_hash,
            "sd_vae_name": self.sd_vae_name,
            "sd_vae_hash": self.sd_vae_hash,
            "seed_resize_from_w": p.seed_resize_from_w,
            "seed_resize_from_h": p.seed_resize_from_h,
            "denoising_strength": p.denoising_strength_for_info,
            "extra_generation_params": self.extra_generation_params,
            "index_of_first_image": self.index_of_first_image,
            "infotexts": self.infotexts,
            "styles": p.styles,
            "job_timestamp": self.job_timestamp,
            "clip_skip": self.clip_skip,
            "is_using_inpainting_conditioning": self.is_using_inpainting_conditioning,
            "comments": self.comments,
            "version": VERSION,
        }


@dataclass
class RunContext:
    """What a job may use: the loaded model and its encoder, settings, saving, progress.

    Built by the generation service for each job; processing holds no state of its own.
    """
    model: Any                      # model_loader.LoadedModel
    encoder: Any                    # conditioning.PromptEncoder for that model
    options: Any                    # options.Options
    save: Callable[..., Any] | None     # (image, seed, prompt, info, grid) -> saved path or None
    job: Any = None                 # jobs.JobContext (progress, interrupt, skip)
    preview: Callable[[Any], Any] | None = None  # latents -> list of PIL images
    hooks: Any = None               # sampling.SamplingHooks
    processing_hooks: "ProcessingHooks | None" = None   # scripts' per-run/batch/image hooks
    # False when a script renders several runs in one job and has set the job count itself.
    sets_job_count: bool = True
    # params -> A1111's `p` over them, for the save callbacks (the extension host's adapter).
    make_script_p: Callable[[Any], Any] | None = None
    refiner: Any = None             # core.refiner.JobRefiner when the params name a refiner
    vae_hash: str | None = None     # the separate VAE's short sha256 (infotext "VAE hash")
    # (image, options) -> image with faces restored (core/face_restoration.py); None: not set up
    restore_faces: Callable[[Any, Any], Any] | None = None
    # core.networks_service.ExtraNetworksService: merges each batch's <lora:...> networks into the model.
    networks: Any = None
    controlnets: Any = None         # models.controlnet_registry.ControlNetRegistry (ControlNet units)


@dataclass
class ProcessingRun:
    """The per-run lists A1111 keeps on `p` (all_prompts, all_seeds, ... and the current batch's slices).

    Hooks may edit them: `process` the all_* lists, `before_process_batch` the batch's lists.
    """
    all_prompts: list[str]
    all_negative_prompts: list[str]
    all_seeds: list[int]
    all_subseeds: list[int]
    prompts: list[str] = field(default_factory=list)
    negative_prompts: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    subseeds: list[int] = field(default_factory=list)
    iteration: int = 0
    batch_index: int = 0


class ProcessingHooks:
    """Called by process_images at A1111's points; the no-op base. modules/scripts.py implements it
    for extension scripts. `postprocess_batch` may return replacement images for the batch."""

    def bind_model(self, model: Any) -> None:
        """The loaded model the run uses, before `process`."""

    def process(self, run: ProcessingRun) -> None: ...

    def before_process_batch(self, run: ProcessingRun, batch_number: int) -> None: ...

    def process_batch(self, run: ProcessingRun, batch_number: int) -> None: ...

    def postprocess_batch(self, run: ProcessingRun, images: list[Any], batch_number: int) -> list[Any]:
        return images

    def postprocess_image(self, run: ProcessingRun, image: Any) -> Any:
        return image

    def postprocess(self, run: ProcessingRun, processed: "Processed") -> None: ...


def create_infotext(p: GenerationParams, ctx: RunContext, *, prompt: str, negative_prompt: str, seed: int,
                    subseed: int, choice: samplers.SamplerChoice, clip_skip: int,
                    extra: dict[str, Any]) -> str:
    """One image's infotext: the table's lead keys (infotext.INFOTEXT_FIELDS), then `extra` (the
    params' own extra keys, `_extra_params`), then the scripts' extra_generation_params, then Version."""
    model = ctx.model
    info = getattr(model, "info", None)
    vae_file = getattr(model, "vae_file", None)
    source = infotext_mod.InfotextSource(
        p, seed=seed, subseed=subseed, sampler=choice.name, schedule=choice.effective_schedule,
        clip_skip=clip_skip, model_hash=getattr(info, "shorthash", None),
        model_name=getattr(info, "name_for_extra", None) or (model.path.stem if getattr(model, "path", None) else None),
        vae_name=vae_file.stem if vae_file else None, vae_hash=getattr(ctx, "vae_hash", None),
        refiner=_refiner_title(getattr(ctx, "refiner", None)),
        eta_noise_seed_delta=ctx.options.eta_noise_seed_delta, randn_source=ctx.options.randn_source)
    params = infotext_mod.written_params(source, infotext_mod.LEAD)
    params.update(extra)
    params.update(infotext_mod.written_params(source, infotext_mod.EXTRA))  # keys only the run knows (Refiner)
    params.update(p.extra_generation_params)
    params["Version"] = VERSION
    return infotext_mod.build_infotext(prompt, negative_prompt, params)


def _refiner_title(refiner: Any) -> str | None:
    """The infotext's `Refiner: name [hash]`, once the refiner has run in this job."""
    return refiner.infotext_title if getattr(refiner, "used", False) else None


def _extra_params(p: GenerationParams) -> dict[str, Any]:
    """A1111's hires-fix and inpainting keys, present when those ran."""
    return infotext_mod.extra_generation_params(p)


def _embedding_params(p: GenerationParams, ctx: RunContext, run: ProcessingRun) -> dict[str, Any]:
    """A1111's ``TI hashes``: "name: shorthash" of each textual-inversion embedding the prompts use."""
    used = getattr(ctx.encoder, "used_embeddings", None)
    if used is None or not ctx.options.textual_inversion_add_hashes_to_infotext:
        return {}
    hires = getattr(p, "hires", None)
    extra = [hires.prompt, hires.negative_prompt] if hires is not None and hires.enabled else []
    found = used(run.all_prompts + run.all_negative_prompts + [t for t in extra if t], p.steps)
    hashes = [f"{name.replace(':', '').replace(',', '')}: {emb.shorthash}" for name, emb in found.items()
              if emb.shorthash]
    return {infotext_mod.TI_HASHES: ", ".join(hashes)} if hashes else {}


def _embeddings_key(ctx: RunContext) -> Any:
    return getattr(getattr(ctx.encoder, "embeddings", None), "key", None)


def _embedding_params_after_networks(p: GenerationParams, ctx: RunContext, plan: _JobPlan,
                                     run: ProcessingRun) -> None:
    """The batch's LoRAs may bring bundled embeddings (engine/networks/bundled.py): the TI hashes are
    listed again whenever the encoder's embedding set changed."""
    key = _embeddings_key(ctx)
    if key != plan.embeddings_key:
        plan.embeddings_key = key
        plan.extra.pop(infotext_mod.TI_HASHES, None)
        plan.extra.update(_embedding_params(p, ctx, run))


def hires_target_size(p: Txt2ImgParams) -> tuple[int, int]:
    """A1111's rules: resize-to wins; one side 0 keeps the aspect; multiples of 8."""
    h = p.hires
    if h.resize_x == 0 and h.resize_y == 0:
        w, ht = int(p.width * h.scale), int(p.height * h.scale)
    elif h.resize_y == 0:
        w, ht = h.resize_x, int(h.resize_x * p.height / p.width)
    elif h.resize_x == 0:
        w, ht = int(h.resize_y * p.width / p.height), h.resize_y
    else:
        w, ht = h.resize_x, h.resize_y
    return max(64, w // 8 * 8), max(64, ht // 8 * 8)


def _hires_pass(p: Txt2ImgParams):
    """The engine's request for the second pass of hires fix."""
    from modules.engine.diffusion import HiresPass

    h = p.hires
    width, height = hires_target_size(p)
    return HiresPass(upscaler=h.upscaler, width=width, height=height, steps=h.steps or p.steps,
                     denoising_strength=h.denoising_strength, sampler_name=h.sampler_name, scheduler=h.scheduler,
                     prompt=h.prompt, negative_prompt=h.negative_prompt)


def _prepare_init(p: Img2ImgParams, index: int):
    """The init image (and inpaint plan) for image `index` of the job."""
    from modules.core import masking

    image = p.init_images[index % len(p.init_images)].convert("RGB")
    if p.mask is None:
        if p.resize_mode == 3:  # latent upscale: encode at the image's own size (multiple of 8)
            w, h = max(64, image.width // 8 * 8), max(64, image.height // 8 * 8)
            return resize_image(image, (w, h)), None
        return masking.resize_image(image, p.width, p.height, p.resize_mode), None
    plan = masking.plan_inpaint(image, p.mask, width=p.width, height=p.height, resize_mode=p.resize_mode,
                                mask_blur=p.mask_blur, invert=p.inpainting_mask_invert,
                                inpainting_fill=p.inpainting_fill, full_res=p.inpaint_full_res,
                                padding=p.inpaint_full_res_padding)
    return plan.init_image, plan


def _per_image(value: Any, n_images: int, what: str) -> list[Any]:
    """A1111 lets scripts set p.prompt / p.seed to a list (one per image); otherwise one value for all."""
    if isinstance(value, (list, tuple)):
        if not value:
            raise ProcessingError(f"{what} is an empty list")
        return [value[i % len(value)] for i in range(n_images)]
    return [value] * n_images


def process_images(p: Any, ctx: RunContext | None = None) -> Processed:
    """Run a job: n_iter batches of batch_size images, plus the grid.

    Called with a script's `p` and no context (A1111's `processing.process_images(p)`), it runs
    through that object instead: inside the current job, with the scripts' hooks.
    """
    if ctx is None:
        run_for_script = getattr(p, "process_images", None)
        if run_for_script is None:
            raise TypeError("process_images(p) needs a RunContext unless p is a script's processing object")
        return run_for_script()
    return _process(p, ctx)


def _save_owner(p: GenerationParams, ctx: RunContext) -> Any:
    """What on_before_image_saved / on_image_saved get as `params.p`: the scripts' `p` when scripts
    run, else A1111's `p` over these params."""
    owner = getattr(ctx.processing_hooks, "p", None)
    if owner is not None:
        return owner
    return ctx.make_script_p(p) if ctx.make_script_p is not None else None


@dataclass
class _JobPlan:
    """What every batch of one run shares: the resolved sampler, clip skip, extra infotext keys."""
    choice: Any                  # sampler_catalog.SamplerChoice
    clip_skip: int
    extra: dict[str, Any]
    save_p: Any                  # what the save callbacks get as params.p
    comments: list[str] = field(default_factory=list)   # warnings for the user (missing LoRA...)
    control: Any = None          # the engine's ControlNet inputs (core.controlnet_run), once per job
    embeddings_key: Any = None   # the embedding set the TI hashes were listed with


@dataclass
class _Rendered:
    images: list[Any] = field(default_factory=list)
    infotexts: list[str] = field(default_factory=list)
    saved: list[str] = field(default_factory=list)
    interrupted: bool = False


def _process(p: GenerationParams, ctx: RunContext) -> Processed:
    """1. check the model can run it, 2. plan prompts and seeds, 3. render batch by batch,
    4. add the grid, 5. hand the result to the scripts' postprocess."""
    _check_model(p, ctx)
    hooks = ctx.processing_hooks or ProcessingHooks()
    clip_skip = int(p.clip_skip if p.clip_skip is not None else ctx.options.CLIP_stop_at_last_layers)
    plan = _JobPlan(choice=samplers.resolve_sampler(p.sampler_name, p.scheduler), clip_skip=clip_skip,
                    extra=_extra_params(p), save_p=_save_owner(p, ctx))
    run = _plan_run(p)
    hooks.process(run)
    if ctx.networks is not None and not p.disable_extra_networks:   # A1111's sd_hypernetwork, sd_lora settings
        plan.comments.extend(ctx.networks.add_setting_networks(run.all_prompts, ctx.options))
    if ctx.processing_hooks is None and hasattr(plan.save_p, "bind_run"):   # p.prompts & co for extension
        plan.save_p.bind_run(run)                                           # networks and save callbacks
    plan.extra.update(_embedding_params(p, ctx, run))
    plan.embeddings_key = _embeddings_key(ctx)
    plan.control = _control_inputs(p, ctx, seed=(run.all_seeds[0] + run.all_subseeds[0]) & 0xFFFFFFFF)
    if ctx.job is not None and ctx.sets_job_count:
        ctx.job.set_job_count(p.n_iter)
    started = time.time()
    rendered = _Rendered()
    for n in range(p.n_iter):
        if ctx.job is not None and ctx.job.should_stop():
            rendered.interrupted = True
            break
        if not _render_batch(p, ctx, plan, run, hooks, n, rendered):
            break
        if ctx.job is not None:
            if ctx.job.should_stop():
                rendered.interrupted = True
                break
            ctx.job.nextjob()
    if ctx.networks is not None and not p.disable_extra_networks:
        ctx.networks.deactivate_extensions(plan.save_p, run.prompts or run.all_prompts[:1])
    index_of_first_image = _add_grid(p, ctx, run, plan, rendered)
    processed = _processed(p, ctx, run, plan, rendered, index_of_first_image, started)
    hooks.postprocess(run, processed)
    from modules.core.controlnet_run import output_maps   # sd-webui-controlnet appends each unit's detected map
    hires_size = hires_target_size(p) if isinstance(p, Txt2ImgParams) and p.hires.enabled else None
    processed.images += output_maps(ctx.options, plan.control, processed, (p.width, p.height), hires_size)
    return processed


def _validate_controlnet_units(p: GenerationParams, limits: Limits) -> None:
    from modules.core.controlnet_units import MAX_UNITS, ControlNetUnitError

    if len(p.controlnet_units) > MAX_UNITS:
        raise ProcessingError(f"at most {MAX_UNITS} ControlNet units, got {len(p.controlnet_units)}")
    try:
        for i, unit in enumerate(p.controlnet_units):
            unit.normalized(i).validate(i, limits.max_side)
    except ControlNetUnitError as err:
        raise ProcessingError(str(err)) from None


def _control_inputs(p: GenerationParams, ctx: RunContext, seed: int) -> Any:
    from modules.core.controlnet_run import control_inputs
    from modules.core.controlnet_units import ControlNetUnitError

    try:
        return control_inputs(p, ctx, seed)
    except ControlNetUnitError as err:
        raise ProcessingError(str(err)) from None


def _check_model(p: GenerationParams, ctx: RunContext) -> None:
    p.validate()
    if getattr(ctx.model, "needs_depth_map", False):
        from modules.core import depth_maps

        reason = depth_maps.refusal(ctx.model.title, is_img2img=isinstance(p, Img2ImgParams),
                                    has_depth_image=getattr(p, "depth_image", None) is not None,
                                    model=ctx.model)
        if reason:
            raise ProcessingError(reason)


def _plan_run(p: GenerationParams) -> ProcessingRun:
    """Every image's prompt and seeds. A prompt list (A1111's prompt matrix, prompts from file) sets
    the image count, as in A1111: the last batch may be short. Otherwise it is batch_size * n_iter."""
    from modules.engine import rng  # torch-heavy; imported when a job runs, not at startup

    if isinstance(p.prompt, (list, tuple)):
        if not p.prompt:
            raise ProcessingError("prompt is an empty list")
        all_prompts = [str(x) for x in p.prompt]
    else:
        all_prompts = [p.prompt] * (p.batch_size * p.n_iter)
    n_images = len(all_prompts)
    n_batches = -(-n_images // p.batch_size)
    if isinstance(p.seed, (list, tuple)):
        all_seeds = [rng.resolve_seed(int(s)) for s in _per_image(p.seed, n_images, "seed")]
    else:
        all_seeds = rng.batch_seeds(rng.resolve_seed(p.seed), n_batches, p.batch_size,
                                    subseed_strength=p.subseed_strength)[:n_images]
    if isinstance(p.subseed, (list, tuple)):
        all_subseeds = [rng.resolve_seed(int(s)) for s in _per_image(p.subseed, n_images, "subseed")]
    else:
        all_subseeds = rng.batch_subseeds(rng.resolve_seed(p.subseed), n_batches, p.batch_size)[:n_images]
    return ProcessingRun(all_prompts=all_prompts,
                         all_negative_prompts=_per_image(p.negative_prompt, n_images, "negative prompt"),
                         all_seeds=all_seeds, all_subseeds=all_subseeds)


def _render_batch(p: GenerationParams, ctx: RunContext, plan: _JobPlan, run: ProcessingRun,
                  hooks: ProcessingHooks, n: int, rendered: _Rendered) -> bool:
    """Batch `n`: the engine renders it, then each image gets its infotext and is saved.
    False when the scripts left this batch no prompts (the run ends)."""
    from modules.engine import diffusion  # torch-heavy; imported when a job runs, not at startup

    run.iteration = n
    sl = slice(n * p.batch_size, (n + 1) * p.batch_size)
    run.prompts, run.negative_prompts = run.all_prompts[sl], run.all_negative_prompts[sl]
    run.seeds, run.subseeds = run.all_seeds[sl], run.all_subseeds[sl]
    hooks.before_process_batch(run, n)
    if not run.prompts:
        return False
    init, plans = _init_images(p, sl.start, len(run.prompts)) if isinstance(p, Img2ImgParams) else (None, [])
    hooks.process_batch(run, n)
    _activate_networks(p, ctx, plan, run.prompts)
    _embedding_params_after_networks(p, ctx, plan, run)
    options = ctx.options
    batch = diffusion.BatchRequest(
        prompts=list(run.prompts), negative_prompts=list(run.negative_prompts),
        seeds=list(run.seeds), subseeds=list(run.subseeds), subseed_strength=p.subseed_strength,
        seed_resize_from=(p.seed_resize_from_w, p.seed_resize_from_h),
        width=p.width, height=p.height, steps=p.steps, cfg_scale=p.cfg_scale,
        sampler=plan.choice, clip_skip=plan.clip_skip, tiling=p.tiling,
        rng_source=options.randn_source, eta_noise_seed_delta=int(options.eta_noise_seed_delta),
        hires=_hires_pass(p) if isinstance(p, Txt2ImgParams) and p.hires.enabled else None, init=init,
        activate_networks=lambda prompts: _activate_networks(p, ctx, plan, prompts, hires=True),
        control=plan.control,
    )
    batch_images = diffusion.generate_batch(batch, ctx)
    if p.restore_faces or ctx.options.get("face_restoration", False):   # the param, or A1111 1.6+'s setting
        batch_images = _restore_faces(p, ctx, batch_images)
    if plans:
        from modules.core.masking import paste_back

        batch_images = [paste_back(image, plan_) for image, plan_ in zip(batch_images, plans)]
    for i, image in enumerate(hooks.postprocess_batch(run, batch_images, n)):
        run.batch_index = i
        _finish_image(p, ctx, plan, run, hooks.postprocess_image(run, image),
                      min(n * p.batch_size + i, len(run.all_prompts) - 1), rendered)
    return True


def _restore_faces(p: GenerationParams, ctx: RunContext, images: list[Any]) -> list[Any]:
    """A1111's "Restore faces" on each image of the batch, named in the infotext."""
    if ctx.restore_faces is None:
        raise ProcessingError("Restore faces: face restoration is not set up on this server")
    p.extra_generation_params["Face restoration"] = ctx.options.face_restoration_model
    return [ctx.restore_faces(image, ctx.options) for image in images]


def _activate_networks(p: GenerationParams, ctx: RunContext, plan: _JobPlan, prompts: list[str], *,
                       hires: bool = False) -> None:
    """The extra networks of `prompts` (the first one's tags, as in A1111) merged into the model; their
    Lora hashes go to the infotext (a hires prompt's are added to the first pass's), warnings to the job."""
    if ctx.networks is None:
        return
    if not p.disable_extra_networks:   # networks extensions registered (A1111's register_extra_network)
        ctx.networks.activate_extensions(plan.save_p, list(prompts), hires=hires)
    result = ctx.networks.activate(ctx.model, ctx.encoder, list(prompts), options=ctx.options,
                                   disabled=bool(p.disable_extra_networks))
    first_pass = plan.extra.pop("Lora hashes", None) if not hires else plan.extra.get("Lora hashes")
    if hires and first_pass and "Lora hashes" in result.infotext:
        merged = dict.fromkeys(first_pass.split(", ") + result.infotext["Lora hashes"].split(", "))
        result.infotext["Lora hashes"] = ", ".join(merged)
    plan.extra.update(result.infotext)
    plan.comments.extend(w for w in result.warnings if w not in plan.comments)


def _init_images(p: Img2ImgParams, start: int, count: int):
    """The engine's img2img input for images start..start+count, and their inpaint plans (for paste-back)."""
    from modules.engine import diffusion

    prepared = [_prepare_init(p, i) for i in range(start, start + count)]
    plans = [plan for _, plan in prepared] if p.mask is not None else []
    init = diffusion.InitImages(
        images=[image for image, _ in prepared],
        masks=[plan.mask_for_latents for plan in plans] if p.mask is not None else None,
        denoising_strength=p.denoising_strength, inpainting_fill=p.inpainting_fill,
        latent_upscale=p.resize_mode == 3 and p.mask is None,
        depth_maps=_depth_maps(p, start, prepared) if p.depth_image is not None else None,
    )
    return init, plans


def _depth_maps(p: Img2ImgParams, start: int, prepared: list) -> list:
    """The supplied depth map, cropped/resized like each init image (see core/depth_maps.py)."""
    from modules.core.depth_maps import prepare_depth_image

    return [prepare_depth_image(p.depth_image, width=p.width, height=p.height, resize_mode=p.resize_mode, plan=plan,
                                source_size=p.init_images[(start + i) % len(p.init_images)].size)
            for i, (_, plan) in enumerate(prepared)]


def _finish_image(p: GenerationParams, ctx: RunContext, plan: _JobPlan, run: ProcessingRun, image: Any,
                  index: int, rendered: _Rendered) -> None:
    """Image `index` of the run: its infotext in the PNG, saved when the job saves."""
    text = create_infotext(p, ctx, prompt=run.all_prompts[index], negative_prompt=run.all_negative_prompts[index],
                           seed=run.all_seeds[index], subseed=run.all_subseeds[index], choice=plan.choice,
                           clip_skip=plan.clip_skip, extra=plan.extra)
    image.info["parameters"] = text
    if p.save_images and ctx.options.samples_save and ctx.save is not None:
        path = ctx.save(image, seed=run.all_seeds[index], prompt=run.all_prompts[index], info=text,
                        grid=False, p=plan.save_p)
        if path:
            rendered.saved.append(str(path))
    rendered.images.append(image)
    rendered.infotexts.append(text)


def _add_grid(p: GenerationParams, ctx: RunContext, run: ProcessingRun, plan: _JobPlan, rendered: _Rendered) -> int:
    """The grid of several images, saved and/or shown first as the settings say; the index of the
    first real image in the gallery (1 when the grid is shown)."""
    options = ctx.options
    if len(rendered.images) <= 1 or not (options.return_grid or options.grid_save) or p.do_not_save_grid:
        return 0
    from modules.core.saving import image_grid

    grid = image_grid(rendered.images, rows=options.n_rows, batch_size=p.batch_size,
                      prevent_empty_spots=options.grid_prevent_empty_spots, background=options.grid_background_color)
    grid_text = rendered.infotexts[0]
    grid.info["parameters"] = grid_text
    if options.grid_save and p.save_images and ctx.save is not None:
        ctx.save(grid, seed=run.all_seeds[0], prompt=run.all_prompts[0], info=grid_text, grid=True, p=plan.save_p)
    if not options.return_grid:
        return 0
    rendered.images.insert(0, grid)
    rendered.infotexts.insert(0, grid_text)
    return 1


def _processed(p: GenerationParams, ctx: RunContext, run: ProcessingRun, plan: _JobPlan, rendered: _Rendered,
               index_of_first_image: int, started: float) -> Processed:
    info = getattr(ctx.model, "info", None)
    return Processed(
        images=rendered.images, infotexts=rendered.infotexts, params=p, all_prompts=run.all_prompts,
        all_negative_prompts=run.all_negative_prompts, all_seeds=run.all_seeds, all_subseeds=run.all_subseeds,
        seed=run.all_seeds[0], subseed=run.all_subseeds[0],
        sd_model_name=getattr(info, "name_for_extra", None), sd_model_hash=getattr(info, "shorthash", None),
        sd_vae_name=ctx.model.vae_file.stem if getattr(ctx.model, "vae_file", None) else None,
        clip_skip=plan.clip_skip, index_of_first_image=index_of_first_image, saved_paths=rendered.saved,
        job_timestamp=time.strftime("%Y%m%d%H%M%S", time.localtime(started)), interrupted=rendered.interrupted,
        extra_generation_params={**plan.extra, **p.extra_generation_params},
        is_using_inpainting_conditioning=bool(getattr(ctx.model.spec, "is_inpaint", False))
        and isinstance(p, Img2ImgParams),
        comments="".join(f"{c}\n" for c in plan.comments),
    )


def params_to_dict(p: GenerationParams) -> dict[str, Any]:
    return asdict(p)

"""One batch from prompts and seeds to PIL images, on a loaded model.

Torch lives here, imported only when a job runs. The steps read top to bottom:
conditioning -> initial noise -> sampling -> (hires pass) -> VAE decode.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from modules.engine import conditioning, depth2img, memory, refiner, rng, scheduler_build
from modules.engine import sampler_catalog as samplers
from modules.engine.sampling import GuidedDenoiser, InpaintBlend, StepConds, sample
from modules.engine.upscaling import LATENT_UPSCALE_MODES, resize_image
from modules.models.families import LatentFormat, TimeIds


@dataclass
class InitImages:
    """img2img input for one batch, already resized/cropped/filled to the job size (see masking.py)."""
    images: list[Image.Image]
    masks: list[Image.Image] | None      # L, white = repaint; None for plain img2img
    denoising_strength: float
    inpainting_fill: int                 # 0 fill, 1 original, 2 latent noise, 3 latent nothing
    latent_upscale: bool = False         # "Just resize (latent upscale)": resize in latent space
    depth_maps: list[Image.Image] | None = None  # SD2 depth models: the user's maps ("F"); None: estimate


@dataclass(frozen=True)
class HiresPass:
    """Hires fix's second pass: upscale the first pass to width x height, then img2img it."""
    upscaler: str                      # a LATENT_UPSCALE_MODES key, or a PIL upscaler name
    width: int
    height: int
    steps: int
    denoising_strength: float
    sampler_name: str = ""             # "": the first pass's sampler
    scheduler: str = ""
    prompt: str = ""                   # "": the first pass's prompts
    negative_prompt: str = ""


@dataclass
class BatchRequest:
    prompts: list[str]
    negative_prompts: list[str]
    seeds: list[int]
    subseeds: list[int]
    subseed_strength: float
    seed_resize_from: tuple[int, int]
    width: int
    height: int
    steps: int
    cfg_scale: float
    sampler: samplers.SamplerChoice
    clip_skip: int
    tiling: bool
    rng_source: str
    eta_noise_seed_delta: int
    hires: HiresPass | None = None     # hires fix's second pass, when enabled
    init: InitImages | None = None     # img2img / inpainting
    # prompts -> None: merges those prompts' <lora:...> networks (a hires prompt's own set, as in A1111)
    activate_networks: Any = None
    control: list[Any] | None = None   # ControlNet units: engine.control.units.ControlInput


def prompt_encoder_for(model) -> conditioning.PromptEncoder:
    return conditioning.PromptEncoder.from_pipeline(model.pipe, family=model.spec.family_info)


def latent_format(model) -> LatentFormat:
    return model.spec.family_info.latent


class ConditioningPlan:
    """Per-step conditioning for a batch: prompt editing, alternation and AND."""

    def __init__(self, encoder, prompts: list[str], negative_prompts: list[str], steps: int, clip_skip: int,
                 device, dtype, hires_steps: int | None = None):
        self.device, self.dtype = device, dtype
        self.multiconds = encoder.encode_multicond(prompts, steps, clip_skip=clip_skip, hires_steps=hires_steps)
        self.unconds = encoder.encode_schedules(negative_prompts, steps, clip_skip=clip_skip, hires_steps=hires_steps,
                                                is_negative=True)
        self._cache: dict[tuple, StepConds] = {}

    def at(self, step: int) -> StepConds:
        cond_parts = [conditioning.cond_at(schedule, step) for mc in self.multiconds for schedule, _ in mc]
        uncond_parts = [conditioning.cond_at(schedule, step) for schedule in self.unconds]
        key = tuple(id(c) for c in cond_parts + uncond_parts)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        to = dict(device=self.device, dtype=self.dtype)
        pooled = cond_parts[0].pooled is not None
        out = StepConds(
            # Prompts of different lengths in one batch: A1111 repeats the last token vector.
            cond=conditioning.stack_conds([c.embeds for c in cond_parts]).to(**to),
            uncond=conditioning.stack_conds([c.embeds for c in uncond_parts]).to(**to),
            cond_counts=[len(mc) for mc in self.multiconds],
            cond_weights=[weight for mc in self.multiconds for _, weight in mc],
            cond_pooled=torch.cat([c.pooled for c in cond_parts]).to(**to) if pooled else None,
            uncond_pooled=torch.cat([c.pooled for c in uncond_parts]).to(**to) if pooled else None,
        )
        self._cache[key] = out
        return out


def added_time_ids(model, batch: int, width: int, height: int, *, aesthetic: float, device,
                   dtype) -> torch.Tensor | None:
    """SDXL's size/crop micro-conditioning, as the family record says: original size, crop top-left,
    then the target size (base) or an aesthetic score (refiner). None for families without it."""
    kind = model.spec.family_info.time_ids
    if kind == TimeIds.NONE:
        return None
    ids = [height, width, 0, 0, aesthetic] if kind == TimeIds.REFINER else [height, width, 0, 0, height, width]
    return torch.tensor([ids] * batch, device=device, dtype=dtype)


@contextlib.contextmanager
def circular_padding(modules: list[torch.nn.Module], enabled: bool) -> Iterator[None]:
    """A1111's Tiling: convolutions wrap around, so the image tiles seamlessly."""
    convs = [m for mod in modules for m in mod.modules() if isinstance(m, torch.nn.Conv2d)] if enabled else []
    saved = [c.padding_mode for c in convs]
    for c in convs:
        c.padding_mode = "circular"
    try:
        yield
    finally:
        for c, mode in zip(convs, saved):
            c.padding_mode = mode


def decode(model, latents: torch.Tensor) -> list[Image.Image]:
    vae = model.pipe.vae
    scaled = latents / vae.config.scaling_factor
    if getattr(vae.config, "shift_factor", None):
        scaled = scaled + vae.config.shift_factor
    pixels = memory.vae_decode(vae, scaled.to(vae.dtype))  # tiled when large; fp32 retry on NaN
    pixels = (pixels.float() / 2 + 0.5).clamp(0, 1)
    arrays = (pixels.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
    return [Image.fromarray(a) for a in arrays]


def encode(model, images: list[Image.Image]) -> torch.Tensor:
    vae = model.pipe.vae
    arrays = np.stack([np.asarray(img.convert("RGB"), dtype=np.float32) / 127.5 - 1.0 for img in images])
    pixels = torch.from_numpy(arrays).permute(0, 3, 1, 2).to(device=vae.device, dtype=vae.dtype)
    latents = memory.vae_encode(vae, pixels).mode()
    if getattr(vae.config, "shift_factor", None):
        latents = latents - vae.config.shift_factor
    return latents * vae.config.scaling_factor


def inpainting_txt2img_cond(model, batch: int, width: int, height: int, device, dtype) -> torch.Tensor | None:
    """9-channel models in txt2img: mask everything, masked image = mid-grey (as A1111 does)."""
    if model.pipe.unet.config.in_channels != 9:
        return None
    grey = Image.new("RGB", (width, height), (127, 127, 127))
    masked = encode(model, [grey]).to(device=device, dtype=dtype).repeat(batch, 1, 1, 1)
    f = latent_format(model).downscale
    mask = torch.ones(batch, 1, height // f, width // f, device=device, dtype=dtype)
    return torch.cat([mask, masked], dim=1)


def latent_masks(masks: list[Image.Image], width: int, height: int, downscale: int, device, dtype) -> torch.Tensor:
    """[B, 1, h/downscale, w/downscale], 1 = repaint, rounded to 0/1 as A1111 does for latent masking."""
    from modules.core.masking import latent_mask_array

    arrays = [latent_mask_array(m, width // downscale, height // downscale, round_mask=True) for m in masks]
    return torch.from_numpy(np.stack(arrays))[:, None].to(device=device, dtype=dtype)


def inpainting_image_cond(model, images: list[Image.Image], masks: list[Image.Image] | None,
                          device, dtype) -> torch.Tensor | None:
    """9-channel models: the mask plus the latents of the image with the masked part blanked (grey)."""
    if model.pipe.unet.config.in_channels != 9:
        return None
    width, height = images[0].size
    if masks is None:  # plain img2img on an inpainting model: everything may change
        return inpainting_txt2img_cond(model, len(images), width, height, device, dtype)
    blanked = []
    for image, mask in zip(images, masks):
        keep = (np.asarray(mask.convert("L").resize(image.size), dtype=np.float32) < 127.5)[..., None]
        pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
        blanked.append(Image.fromarray((pixels * keep + 127.5 * (1 - keep)).round().astype(np.uint8)))
    masked_latents = encode(model, blanked).to(device=device, dtype=dtype)
    mask = (latent_masks(masks, width, height, latent_format(model).downscale, device, dtype) > 0.5).to(dtype)
    return torch.cat([mask, masked_latents], dim=1)


def _upscale_latents(latents: torch.Tensor, size: tuple[int, int], downscale: int, mode: dict) -> torch.Tensor:
    w, h = size
    return F.interpolate(latents, size=(h // downscale, w // downscale), mode=mode["mode"], antialias=mode["antialias"])


def generate_batch(req: BatchRequest, ctx) -> list[Image.Image]:
    refiner.begin_batch(ctx)
    model = ctx.model
    unet = model.pipe.unet
    device = model.policy.device
    dtype = unet.dtype
    job = ctx.job
    batch = len(req.seeds)
    init = req.init

    fmt = latent_format(model)
    image_rng = rng.ImageRNG(
        shape=(fmt.channels, req.height // fmt.downscale, req.width // fmt.downscale), seeds=req.seeds,
        subseeds=req.subseeds,
        subseed_strength=req.subseed_strength, seed_resize_from=req.seed_resize_from, source=req.rng_source,
        device=device, eta_noise_seed_delta=req.eta_noise_seed_delta,
    )
    hires_steps = req.hires.steps if req.hires else None

    def on_step(step: int, total: int, latents: torch.Tensor) -> None:
        if job is not None:
            job.step_callback(step, total, latents)

    def should_stop() -> bool:
        return job is not None and (job.should_stop() or job.should_skip())

    with torch.inference_mode(), circular_padding([unet, model.pipe.vae], req.tiling), \
            memory.batch_scope(model, getattr(ctx, "options", None)):
        plan = ConditioningPlan(ctx.encoder, req.prompts, req.negative_prompts, req.steps, req.clip_skip,
                                device, dtype, hires_steps=hires_steps)
        scheduler = scheduler_build.build_scheduler(req.sampler, model.pipe.scheduler.config)
        scheduler.set_timesteps(req.steps, device=device)
        noise = image_rng.first(dtype=torch.float32).to(device)
        blend = None
        if init is None:
            timesteps = scheduler.timesteps
            latents = noise * scheduler.init_noise_sigma
            image_cond = inpainting_txt2img_cond(model, batch, req.width, req.height, device, dtype)
        else:
            timesteps, latents, blend, image_cond = _img2img_start(req, model, scheduler, noise, device, dtype)
        size = (batch, req.width, req.height)
        denoiser = GuidedDenoiser(
            unet,
            time_ids=added_time_ids(model, *size, aesthetic=6.0, device=device, dtype=dtype),
            uncond_time_ids=added_time_ids(model, *size, aesthetic=2.5, device=device, dtype=dtype),
            image_cond=image_cond, hooks=ctx.hooks, control=_control(req, req.width, req.height, device, model=model),
        )
        denoiser, conds_at = refiner.wrap(ctx, denoiser, plan.at, len(timesteps), hires=False,
                                          hires_enabled=req.hires is not None,
                                          build=_refiner_builder(req, ctx, req.prompts, req.negative_prompts,
                                                                 req.steps, (req.width, req.height), hires_steps))
        if len(timesteps):
            latents = sample(
                scheduler=scheduler, denoiser=denoiser, latents=latents.to(dtype), timesteps=timesteps,
                conds_at=conds_at, cfg_scale=req.cfg_scale, generators=image_rng.generators, inpaint=blend,
                on_step=on_step, should_stop=should_stop, total_steps=len(timesteps),
            )
        model = refiner.current_model(ctx, model)
        if req.hires is not None and not should_stop():
            latents = _hires_pass(req, refiner.context_for(ctx, model), model, latents, image_rng, on_step, should_stop)
        images = decode(refiner.current_model(ctx, model), latents)
        return _control_restore(req, ctx, images)


def _control(req: BatchRequest, width: int, height: int, device, *, hires: bool = False, model=None):
    """The ControlNet units of one pass, their maps fitted to its size; None without units."""
    if not req.control:
        return None
    from modules.engine.control.postprocess import prediction_fix
    from modules.engine.control.units import ControlApplier

    def host():   # reference_* units run on the checkpoint itself (built only when there are some)
        from modules.engine.control.reference import ReferenceHost

        return ReferenceHost.for_model(model, lambda images: encode(model, images), seed=req.seeds[0])
    applier = ControlApplier(req.control, width, height, torch.device(device), hires=hires,
                             host=host if model is not None else None)
    if applier and model is not None:  # tile_colorfix / inpaint_only also change each prediction
        applier.prediction_fix = prediction_fix(applier.units, width, height, hires=hires, device=device,
                                                encode=lambda images: encode(model, images),
                                                scheduler_config=model.pipe.scheduler.config)
    return applier or None


def _control_restore(req: BatchRequest, ctx, images: list[Image.Image]) -> list[Image.Image]:
    """inpaint_only units paste their input picture back outside the mask after decoding."""
    if not req.control:
        return images
    from modules.engine.control.postprocess import restore_pixels

    options = getattr(ctx, "options", None)
    sigma = options.get("control_net_inpaint_blur_sigma", None) if options is not None else None
    return restore_pixels(req.control, images, sigma)


def _img2img_start(req: BatchRequest, model, scheduler, noise: torch.Tensor, device, dtype):
    """Encode the init images and noise them to where the denoising strength starts, as diffusers'
    img2img does: the last `strength` fraction of the schedule is run."""
    init = req.init
    f = latent_format(model).downscale
    init_latents = encode(model, init.images).float()
    if init.latent_upscale:
        init_latents = F.interpolate(init_latents, size=(req.height // f, req.width // f), mode="bilinear")
    steps = req.steps
    start = steps - min(int(steps * init.denoising_strength), steps)
    timesteps = scheduler.timesteps[start * scheduler.order:]
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start * scheduler.order)

    blend = None
    image_cond = inpainting_image_cond(model, init.images, init.masks, device, dtype)
    if init.masks is not None:
        mask = latent_masks(init.masks, req.width, req.height, f, device, torch.float32)
        if init.inpainting_fill == 2:    # latent noise: the masked area starts from fresh noise
            init_latents = init_latents * (1 - mask) + noise * mask
        elif init.inpainting_fill == 3:  # latent nothing: the masked area starts empty
            init_latents = init_latents * (1 - mask)
        if image_cond is None:  # ordinary models inpaint by resetting the unmasked latents each step
            blend = InpaintBlend(init_latents=init_latents, mask=mask, noise=noise)
    if image_cond is None:  # SD2 depth models: the init image's depth as an extra UNet channel
        image_cond = depth2img.depth_image_cond(model, init, req.width, req.height, device, dtype)
    if len(timesteps) == 0:
        return timesteps, init_latents, blend, image_cond
    latents = scheduler.add_noise(init_latents, noise, timesteps[:1].repeat(init_latents.shape[0]))
    return timesteps, latents, blend, image_cond


def _hires_upscale(image: Image.Image, size: tuple[int, int], upscaler: str, ctx) -> Image.Image:
    """Hires fix's image-space upscale: a PIL resize or an upscaler model (tiled, see model_upscale.py)."""
    from modules.engine.upscaling import upscale_image
    from modules.engine.model_upscale import UpscaleInterrupted

    job = getattr(ctx, "job", None)
    on_tile = (lambda done, total: job.state.set_textinfo(f"Hires upscale ({upscaler}): tile {done}/{total}")) \
        if job is not None else None
    try:
        return upscale_image(image, size, upscaler, options=getattr(ctx, "options", None), on_tile=on_tile,
                             should_stop=job.should_stop if job is not None else None)
    except UpscaleInterrupted:  # the pass stops at its first step anyway; finish cheaply
        return resize_image(image, size, "Lanczos")


def _hires_pass(req: BatchRequest, ctx, model, latents, image_rng, on_step, should_stop) -> torch.Tensor:
    """A1111's hires fix: upscale the first pass, then img2img at the target size."""
    h = req.hires
    unet = model.pipe.unet
    device, dtype = model.policy.device, unet.dtype
    width, height = h.width, h.height
    batch = latents.shape[0]
    if h.upscaler in LATENT_UPSCALE_MODES:
        latents = _upscale_latents(latents.float(), (width, height), latent_format(model).downscale,
                                   LATENT_UPSCALE_MODES[h.upscaler])
    else:
        images = [_hires_upscale(img, (width, height), h.upscaler, ctx) for img in decode(model, latents)]
        latents = encode(model, images).float()

    choice = req.sampler
    if h.sampler_name and h.sampler_name != "Use same sampler":
        choice = samplers.resolve_sampler(h.sampler_name, h.scheduler or None)
    steps = h.steps
    prompts = [h.prompt] * batch if h.prompt else req.prompts
    negatives = [h.negative_prompt] * batch if h.negative_prompt else req.negative_prompts
    if h.prompt and req.activate_networks is not None:
        req.activate_networks(prompts)
    plan = ConditioningPlan(ctx.encoder, prompts, negatives, steps, req.clip_skip, device, dtype)
    scheduler = scheduler_build.build_scheduler(choice, model.pipe.scheduler.config)
    # A1111 runs exactly the hires step count: the schedule is stretched to steps/strength and
    # its last `steps` entries are used.
    strength = min(h.denoising_strength, 0.999)
    if strength <= 0:
        return latents.to(dtype)
    stretched = max(steps, int(steps / strength))
    scheduler.set_timesteps(stretched, device=device)
    start = (stretched - steps) * scheduler.order
    timesteps = scheduler.timesteps[start:]
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start)
    noise = torch.stack([torch.randn(latents.shape[1:], generator=g, device=g.device) for g in image_rng.generators])
    latents = scheduler.add_noise(latents, noise.to(latents), timesteps[:1].repeat(batch))
    denoiser = GuidedDenoiser(
        unet,
        time_ids=added_time_ids(model, batch, width, height, aesthetic=6.0, device=device, dtype=dtype),
        uncond_time_ids=added_time_ids(model, batch, width, height, aesthetic=2.5, device=device, dtype=dtype),
        image_cond=inpainting_txt2img_cond(model, batch, width, height, device, dtype),
        hooks=ctx.hooks, control=_control(req, width, height, device, hires=True, model=model),
    )
    denoiser, conds_at = refiner.wrap(ctx, denoiser, plan.at, len(timesteps), hires=True, hires_enabled=True,
                                      build=_refiner_builder(req, ctx, prompts, negatives, steps, (width, height)))
    return sample(
        scheduler=scheduler, denoiser=denoiser, latents=latents.to(dtype), timesteps=timesteps,
        conds_at=conds_at, cfg_scale=req.cfg_scale, generators=image_rng.generators,
        on_step=on_step, should_stop=should_stop, total_steps=len(timesteps),
    )


def _refiner_builder(req: BatchRequest, ctx, prompts: list[str], negatives: list[str], steps: int,
                     size: tuple[int, int], hires_steps: int | None = None) -> refiner.Builder:
    """(refiner model, its encoder) -> (denoiser, conds_at) for the rest of a pass: the refiner's own
    conditioning (the SDXL refiner: bigG alone) and time ids (aesthetic scores from the settings)."""
    def build(model, encoder):
        device, dtype = model.policy.device, model.pipe.unet.dtype
        plan = ConditioningPlan(encoder, prompts, negatives, steps, req.clip_skip, device, dtype,
                                hires_steps=hires_steps)
        shape = (len(prompts), *size)
        high, low = ctx.refiner.aesthetic_scores
        denoiser = GuidedDenoiser(
            model.pipe.unet,
            time_ids=added_time_ids(model, *shape, aesthetic=high, device=device, dtype=dtype),
            uncond_time_ids=added_time_ids(model, *shape, aesthetic=low, device=device, dtype=dtype),
            image_cond=inpainting_txt2img_cond(model, *shape, device, dtype), hooks=ctx.hooks,
        )
        return denoiser, plan.at
    return build

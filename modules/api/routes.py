"""/sdapi/v1: A1111's API over the services. Converts requests to typed params and back; no model code.

Every job (generation, model switches, extras) goes through the one job queue the UI uses, so
API and UI requests are served in submission order. Handlers that wait for a job are async
and poll the job instead of parking a worker thread per waiting request.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import html
import io
import json
import logging
import os
import sys
from concurrent.futures import CancelledError
from typing import Any, Callable

from fastapi import APIRouter, Body, FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from PIL import Image
from starlette.exceptions import HTTPException as StarletteHTTPException

from modules.core import flags as cmd_args
from modules.core import saving
from modules.engine import sampler_catalog as samplers
from modules.api import models as m
from modules.core.callers import CallerPolicy
from modules.core.jobs import Caller, QueueFullError
from modules.core.model_service import ModelLoadError, NoCheckpointError, UnknownCheckpointError
from modules.core.limits import LimitError, Limits, is_dir_config_key
from modules.core.options import OptionError
from modules.api import controlnet_routes
from modules.core.pipeline import (IMAGE_UPSCALERS, LATENT_UPSCALE_MODES, HiresParams, Img2ImgParams, ProcessingError,
                                Txt2ImgParams)
from modules.models.vae import UnknownVaeError
from modules.api.merge_routes import add_merge_routes
from modules.models.upscaler_models import UpscalerLoadError
from modules.core.styles import apply_styles_to_params

log = logging.getLogger(__name__)

API_PREFIX = "/sdapi/v1"
USE_SAME = ("", "Use same sampler", "Use same scheduler", "Use same checkpoint", "None")

# --------------------------------------------------------------------------- errors

def error_body(kind: str, detail: Any, body: Any = "", errors: Any = "") -> dict[str, Any]:
    return {"error": kind, "detail": detail, "body": body, "errors": errors}


def _short(value: Any, limit: int = 1000) -> str:
    """Request bodies can hold megabytes of base64; echo only the start."""
    if value is None:
        return ""
    text = value if isinstance(value, str) else (
        value.decode("utf-8", "replace") if isinstance(value, bytes) else json.dumps(jsonable_encoder(value), default=str))
    return text if len(text) <= limit else text[:limit] + "…"


# Bad input raised by the layers below, and the status A1111 answers it with.
ERROR_STATUS: list[tuple[type[BaseException], int]] = [
    (samplers.UnknownSamplerError, 404),   # A1111: "Sampler not found" is a 404
    (UnknownCheckpointError, 404),
    (samplers.SamplerError, 422),
    (ProcessingError, 422),
    (OptionError, 422),
    (LimitError, 422),
    (UnknownVaeError, 422),
    (ModelLoadError, 422),                 # the user's file is bad, not the server
    (UpscalerLoadError, 422),              # an upscaler file that cannot be used
    (NoCheckpointError, 503),              # nothing to load: the server is not ready to generate
    (CancelledError, 409),
]


def install_error_handlers(app: FastAPI) -> None:
    """A1111's error shape for every error of the app: {"error", "detail", "body", "errors"}."""

    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(error_body(type(exc).__name__, exc.detail, "", str(exc)),
                            status_code=exc.status_code, headers=getattr(exc, "headers", None))

    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
                    for e in exc.errors()]
        detail = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in problems) or "invalid request"
        return JSONResponse(error_body("RequestValidationError", detail, _short(getattr(exc, "body", None)),
                                       json.dumps(problems, default=str)), status_code=422)

    def domain_error(status: int) -> Callable[..., Any]:
        async def handler(request: Request, exc: Exception) -> JSONResponse:
            text = str(exc)
            return JSONResponse(error_body(type(exc).__name__, text, "", text), status_code=status)
        return handler

    async def queue_full(request: Request, exc: QueueFullError) -> JSONResponse:
        # One client over its share: 429 (retry later); the whole queue full: 503.
        status = 429 if exc.limit == "per client" else 503
        return JSONResponse(error_body(type(exc).__name__, str(exc), "", str(exc)), status_code=status,
                            headers={"Retry-After": "5"})

    async def server_error(request: Request, exc: Exception) -> JSONResponse:
        log.error("API error on %s %s", request.method, request.url.path, exc_info=exc)
        return JSONResponse(error_body(type(exc).__name__, str(exc) or type(exc).__name__, "", str(exc)),
                            status_code=500)

    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(QueueFullError, queue_full)
    for cls, status in ERROR_STATUS:
        app.add_exception_handler(cls, domain_error(status))
    app.add_exception_handler(Exception, server_error)


def bad_request(detail: str, status: int = 422) -> HTTPException:
    return HTTPException(status_code=status, detail=detail)


# --------------------------------------------------------------------------- images

def decode_base64_to_image(encoding: str, *, field: str = "image", limits: Limits | None = None) -> Image.Image:
    """Base64 (optionally a data: URI) -> a loaded PIL image; 422 naming the field otherwise.

    The image's size is read from its header and checked against ``limits.max_input_pixels``
    before a single pixel is decoded."""
    limits = limits or Limits()
    text = (encoding or "").strip()
    if text.startswith(("http://", "https://")):
        # A1111 can fetch URLs; a server that fetches what clients name is an SSRF risk, and ours is offline.
        raise bad_request(f"{field}: image URLs are not fetched; send the image as base64")
    if text.startswith("data:"):
        text = text.partition(",")[2]
    if not text:
        raise bad_request(f"{field}: no image data")
    try:
        data = base64.b64decode(text)
        image = Image.open(io.BytesIO(data))
        width, height = image.size
        if width * height > limits.max_input_pixels:
            raise bad_request(f"{field}: the image is {width}x{height} = {width * height} pixels; at most "
                              f"{limits.max_input_pixels} (--max-input-pixels)", 413)
        image.load()
    except (binascii.Error, ValueError, OSError, Image.DecompressionBombError, SyntaxError) as err:
        raise bad_request(f"{field}: invalid encoded image ({err})") from None
    return image


def encode_pil_to_base64(image: Image.Image, options: Any) -> str:
    """A1111's rule: the `samples_format` setting, with the infotext in the PNG chunks / EXIF."""
    fmt_name = (options.samples_format or "png").lower()
    fmt = saving._pil_format(fmt_name)  # noqa: SLF001 - the one encoder the saver uses too
    info = image.info or {}
    if fmt == "PNG":
        chunks = {k: v for k, v in info.items() if isinstance(k, str) and isinstance(v, str)}
        data = saving._encode(image, "PNG", chunks, None, embed=True,  # noqa: SLF001
                                  jpeg_quality=options.jpeg_quality, webp_lossless=options.webp_lossless)
    else:
        parameters = info.get("parameters")
        data = saving._encode(image, fmt, {}, parameters if isinstance(parameters, str) else None,  # noqa: SLF001
                                  embed=True, jpeg_quality=options.jpeg_quality, webp_lossless=options.webp_lossless)
    return base64.b64encode(data).decode("ascii")


def encode_png_base64(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _json_safe_items(info: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in (info or {}).items():
        if isinstance(value, (str, int, float, bool)) or value is None:
            out[str(key)] = value
        elif isinstance(value, tuple) and all(isinstance(v, (int, float, str)) for v in value):
            out[str(key)] = list(value)
    return out


# --------------------------------------------------------------------------- extras

def extras_params(req: m.ExtrasBaseRequest) -> Any:
    """The typed extras request the UI builds too (core/extras.py)."""
    from modules.core.extras import ExtrasParams

    return ExtrasParams(**{name: getattr(req, name) for name in ExtrasParams.__dataclass_fields__})


def _info_text(info: dict[str, Any]) -> str:
    return ", ".join(f"{k}: {v:g}" if isinstance(v, float) else f"{k}: {v}" for k, v in info.items())


def _html_info(info: dict[str, Any]) -> str:
    text = _info_text(info)
    return "<p>" + "<br>\n".join(html.escape(line) for line in text.split("\n")) + "</p>" if text else ""


# --------------------------------------------------------------------------- request -> params

def _convert(value: Any, kind: type) -> Any:
    if value is None:
        return None
    if kind is bool:
        return value if isinstance(value, bool) else str(value).strip().lower() == "true"
    if kind is int:
        return int(float(value))
    if kind is float:
        return float(value)
    return str(value)


def _or(value: Any, default: Any) -> Any:
    return default if value is None else value


def apply_infotext(req: m._ProcessingBase, options: Any) -> None:
    """A1111's `infotext` field: its values fill every field the request did not set (the `api`
    column of infotext.INFOTEXT_FIELDS); the settings it names become override_settings."""
    if not req.infotext:
        return
    from modules.core import infotext

    try:
        parsed = dict(infotext.parse_infotext(req.infotext) or {})
    except Exception as err:  # noqa: BLE001 - any parser failure is the client's text, not our fault
        raise bad_request(f"infotext could not be parsed: {err}") from None
    kind = infotext.IMG2IMG if isinstance(req, m.StableDiffusionProcessingImg2Img) else infotext.TXT2IMG
    explicit = set(req.model_fields_set)
    for field, target, raw in infotext.read_fields(parsed, kind, "api"):
        if target.api in explicit or target.api not in type(req).model_fields:
            continue
        try:
            value = field.parse(raw)
        except (TypeError, ValueError):
            log.warning("infotext: ignoring %s=%r (not a valid %s)", target.key, raw, target.api)
            continue
        if value is not None and value != "":
            setattr(req, target.api, value)
    if "enable_hr" not in explicit and hasattr(req, "enable_hr") and infotext.hires_enabled(parsed):
        req.enable_hr = True
    req.override_settings = _infotext_overrides(parsed, req.override_settings, options)


def _infotext_overrides(parsed: dict[str, Any], given: dict[str, Any] | None, options: Any) -> dict[str, Any]:
    """Settings recorded in the infotext (Clip skip, ENSD, RNG) that differ from the current ones,
    added to the request's own override_settings (which win)."""
    overrides = dict(given or {})
    for key, info in options.templates.items():
        label = info.infotext
        if not label or label not in parsed or key in overrides:
            continue
        try:
            value = _convert(parsed[label], type(info.default) if info.default is not None else str)
        except (TypeError, ValueError):
            continue
        if value != options.get(key):
            overrides[key] = value
    return overrides


def fill_null_defaults(req: Any) -> None:
    """A1111 makes every field Optional; an explicit null means the field's default here (and in the echo)."""
    for name, field in type(req).model_fields.items():
        if getattr(req, name) is None and not field.is_required():
            default = field.get_default(call_default_factory=True)
            if default is not None:
                setattr(req, name, default)


def _common_params(req: m._ProcessingBase) -> dict[str, Any]:
    """The fields txt2img and img2img share, with A1111's API defaults for null fields."""
    choice = samplers.resolve_sampler(req.sampler_name or req.sampler_index or "Euler", req.scheduler or None)
    save = bool(req.save_images)
    return dict(
        prompt=req.prompt or "",
        negative_prompt=req.negative_prompt or "",
        steps=_or(req.steps, 50),
        sampler_name=choice.name,
        scheduler=choice.schedule,
        cfg_scale=_or(req.cfg_scale, 7.0),
        width=_or(req.width, 512),
        height=_or(req.height, 512),
        batch_size=_or(req.batch_size, 1),
        n_iter=_or(req.n_iter, 1),
        seed=_or(req.seed, -1),
        subseed=_or(req.subseed, -1),
        subseed_strength=_or(req.subseed_strength, 0.0),
        seed_resize_from_w=max(0, _or(req.seed_resize_from_w, 0)),
        seed_resize_from_h=max(0, _or(req.seed_resize_from_h, 0)),
        tiling=bool(req.tiling),
        restore_faces=bool(req.restore_faces),
        disable_extra_networks=bool(req.disable_extra_networks),
        # A1111's API saves samples and grid only when asked (save_images), whatever do_not_save_* say.
        save_images=save,
        do_not_save_grid=not save,
        refiner_checkpoint=req.refiner_checkpoint if req.refiner_checkpoint not in (None, "None") else "",
        refiner_switch_at=_or(req.refiner_switch_at, 0.8),
    )


def txt2img_params(req: m.StableDiffusionProcessingTxt2Img) -> Txt2ImgParams:
    if req.hr_checkpoint_name not in (None, "", "Use same checkpoint"):
        raise ProcessingError("hr_checkpoint_name: a different hires checkpoint is not supported")
    hr_sampler = req.hr_sampler_name if req.hr_sampler_name not in (None, *USE_SAME) else ""
    hr_scheduler = req.hr_scheduler if req.hr_scheduler not in (None, *USE_SAME) else ""
    return Txt2ImgParams(
        **_common_params(req),
        hires=HiresParams(
            enabled=bool(req.enable_hr),
            upscaler=req.hr_upscaler or "Latent",
            scale=_or(req.hr_scale, 2.0),
            resize_x=_or(req.hr_resize_x, 0),
            resize_y=_or(req.hr_resize_y, 0),
            steps=_or(req.hr_second_pass_steps, 0),
            denoising_strength=_or(req.denoising_strength, 0.75),
            sampler_name=hr_sampler,
            scheduler=hr_scheduler,
            prompt=req.hr_prompt or "",
            negative_prompt=req.hr_negative_prompt or "",
        ),
    )


def img2img_params(req: m.StableDiffusionProcessingImg2Img, init_images: list[Image.Image],
                   mask: Image.Image | None, depth_image: Image.Image | None = None) -> Img2ImgParams:
    # A1111's API defaults differ from its UI's: fill 0 ("fill") and "only masked" on.
    blur = req.mask_blur if req.mask_blur is not None else _or(req.mask_blur_x, 4)
    return Img2ImgParams(
        **_common_params(req),
        init_images=init_images,
        mask=mask,
        resize_mode=_or(req.resize_mode, 0),
        denoising_strength=_or(req.denoising_strength, 0.75),
        mask_blur=blur,
        inpainting_mask_invert=bool(req.inpainting_mask_invert),
        inpainting_fill=_or(req.inpainting_fill, 0),
        inpaint_full_res=bool(_or(req.inpaint_full_res, True)),
        inpaint_full_res_padding=_or(req.inpaint_full_res_padding, 0),
        depth_image=depth_image,
    )


async def wait_for(job: Any, request: Request | None = None, queue: Any = None) -> Any:
    """The job's result, without holding a thread while it waits in the queue.

    Given the `request` and the `queue`, a client that goes away stops its job: cancelled while
    queued, interrupted while running (nobody would read the answer)."""
    delay = 0.01
    while not job.done():
        await asyncio.sleep(delay)
        delay = min(delay * 1.5, 0.1)
        if request is not None and queue is not None and await request.is_disconnected():
            stopped = queue.stop(job)
            log.info("client %s left: job %s %s", request.client.host if request.client else "?", job.id,
                     ("cancelled or interrupted" if stopped else "already finished"))
            raise CancelledError(f"job {job.id} stopped: the client disconnected")
    return job.result(timeout=0)


# --------------------------------------------------------------------------- routes

class Api:
    """The /sdapi/v1 routes over one Services object."""

    def __init__(self, app: FastAPI, services: Any):
        self.services = services
        self.options = services.options
        self.models = services.models
        self.generation = services.generation
        self.limits = getattr(services, "limits", None) or Limits()
        self.callers = getattr(services, "callers", None) or CallerPolicy(services.cmd_opts)
        self.router = APIRouter(prefix=API_PREFIX, tags=["sdapi"],
                                responses={422: {"model": m.ErrorResponse}, 500: {"model": m.ErrorResponse}})
        self.OptionsModel = m.make_options_model(self.options)
        self.FlagsModel = m.make_flags_model(services.cmd_opts)
        self._add_routes()
        app.include_router(self.router)
        controlnet_routes.register(app, services, decode_base64_to_image, encode_png_base64)

    # -- helpers -----------------------------------------------------------------------
    def _selected_title(self) -> str | None:
        try:
            return self.models.selected_info().title
        except NoCheckpointError:
            return None

    def _checked_vae(self, value: Any, key: str) -> None:
        name = str(value or "")
        if name in ("", "Automatic", "None") or self.models.vaes.find(name) is not None:
            return
        raise bad_request(f"{key}: VAE {name!r} not found; choices: {', '.join(self.models.vae_choices())}")

    def _check_count(self, field: str, count: int) -> None:
        if count > self.limits.max_input_images:
            raise bad_request(f"{field}: {count} images; at most {self.limits.max_input_images} per request "
                              f"(--max-input-images)", 413)

    async def _extras(self, images: list[Image.Image], req: m.ExtrasBaseRequest, request: Request) -> Any:
        """One extras job (core/extras_service.py) over `images`; A1111's API does not save the results."""
        params = extras_params(req)
        try:
            for image in images:
                params.check_target(image.size, self.limits)
        except LimitError as err:
            raise bad_request(str(err), 413) from None
        job = self.services.extras.submit(images, params, save=False, owner=self.caller(request).name)
        return await wait_for(job, request, self.generation.queue)

    def caller(self, request: Request) -> Caller:
        """Who sent `request`: its Basic-auth user when the API requires a login, else its address."""
        return self.callers.api_caller(request.headers.get("authorization"),
                                       request.client.host if request.client else None)

    def override_settings(self, raw: dict[str, Any] | None) -> dict[str, Any]:
        """Per-request settings: unknown and API-restricted keys are skipped (logged), values checked."""
        out: dict[str, Any] = {}
        for key, value in (raw or {}).items():
            info = self.options.templates.get(key)
            if info is None:
                log.warning("override_settings: unknown setting %r ignored", key)
                continue
            if is_dir_config_key(key):
                self.options.validate_values({key: value})  # a bad value is a 422 naming the key
                if value == self.options.get(key):
                    continue  # an echo of the current value (A1111 clients send the whole set back)
                raise bad_request(f"override_settings.{key}: folders, file names and formats are set only "
                                  f"in the server's own UI, not through the API", 403)
            if info.restrict_api:
                log.warning("override_settings: %r cannot be changed through the API; ignored", key)
                continue
            if key == "sd_model_checkpoint":
                found = self.models.registry.get_closest(str(value or ""))
                if found is None:
                    raise bad_request(f"override_settings: sd_model_checkpoint {value!r} not found; "
                                      f"known: {', '.join(self.models.titles()) or 'none'}")
                value = found.title
            elif key == "sd_vae":
                self._checked_vae(value, "override_settings.sd_vae")
            out[key] = value
        self.options.validate_values(out)
        return out

    def _prepare(self, request: Any) -> Any:
        """A working copy of the request: nulls -> defaults, `infotext` applied, scripts checked."""
        req = request.model_copy(deep=True)
        fill_null_defaults(req)
        apply_infotext(req, self.options)
        return req

    async def _generate(self, req: Any, params: Any, request: Request) -> tuple[list[str], str]:
        """Queue one generation job, wait for it; (base64 images or [], info JSON string)."""
        apply_styles_to_params(params, self.services.styles, req.styles)
        overrides = self.override_settings(req.override_settings)
        restore = True if req.override_settings_restore_afterwards is None else bool(req.override_settings_restore_afterwards)
        for name in ("eta", "s_churn", "s_tmax", "s_tmin", "s_noise", "s_min_uncond",
                     "firstpass_image", "image_cfg_scale", "initial_noise_multiplier"):
            if getattr(req, name, None) not in (None, False):
                log.info("%s: %s is not supported and was ignored", params.kind, name)
        controlnet_routes.take_units(req, params, self.limits, decode_base64_to_image)
        runner = self.services.script_runner(isinstance(req, m.StableDiffusionProcessingImg2Img))
        script_args = await run_in_threadpool(runner.args_from_api, req.script_name, req.script_args,
                                              req.alwayson_scripts)
        script = runner.job_script(script_args, is_api=True) if runner.has_work(script_args) else None
        job = self.generation.submit(params, override_settings=overrides, restore_settings=restore,
                                     job_id=req.force_task_id or None, script=script,
                                     owner=self.caller(request).name, source="api")
        processed = await wait_for(job, request, self.generation.queue)
        images: list[str] = []
        if _or(req.send_images, True):
            images = await run_in_threadpool(lambda: [encode_pil_to_base64(i, self.options) for i in processed.images])
        return images, json.dumps(processed.js(), default=str)

    # -- routes: one registration function per area, called in the order /docs lists them --
    def _add_routes(self) -> None:
        self._add_generation_routes()
        self._add_extras_routes()
        self._add_progress_routes()
        self._add_options_routes()
        self._add_list_routes()
        self._add_script_routes()
        self._add_model_routes()
        add_merge_routes(self, bad_request=bad_request, wait_for=wait_for)

    def _add_generation_routes(self) -> None:
        """txt2img and img2img: one generation job each, through the queue."""
        r = self.router

        @r.post("/txt2img", response_model=m.TextToImageResponse)
        async def text2imgapi(txt2imgreq: m.StableDiffusionProcessingTxt2Img, request: Request) -> m.TextToImageResponse:
            req = self._prepare(txt2imgreq)
            images, info = await self._generate(req, txt2img_params(req), request)
            return m.TextToImageResponse(images=images, parameters=req.model_dump(), info=info)

        @r.post("/img2img", response_model=m.ImageToImageResponse, responses={404: {"model": m.ErrorResponse}})
        async def img2imgapi(img2imgreq: m.StableDiffusionProcessingImg2Img, request: Request) -> m.ImageToImageResponse:
            if not img2imgreq.init_images:
                raise bad_request("Init image not found", 404)  # A1111's answer
            req = self._prepare(img2imgreq)
            self._check_count("init_images", len(req.init_images))
            limits = self.limits

            def decode_all() -> tuple[list[Image.Image], Image.Image | None]:
                inits = [decode_base64_to_image(data, field=f"init_images[{i}]", limits=limits)
                         for i, data in enumerate(req.init_images)]
                return inits, decode_base64_to_image(req.mask, field="mask", limits=limits) if req.mask else None
            init_images, mask = await run_in_threadpool(decode_all)
            depth = (await run_in_threadpool(decode_base64_to_image, req.depth_image, field="depth_image",
                                             limits=limits)) if req.depth_image else None
            images, info = await self._generate(req, img2img_params(req, init_images, mask, depth), request)
            parameters = req.model_dump()
            if not req.include_init_images:  # A1111 leaves the (large) inputs out of the echo
                parameters["init_images"] = None
                parameters["mask"] = None
                parameters["depth_image"] = None
            return m.ImageToImageResponse(images=images, parameters=parameters, info=info)

    def _add_extras_routes(self) -> None:
        """Extras (upscaling) and PNG info: image in, image or infotext out."""
        r = self.router
        options, gen = self.options, self.generation

        @r.post("/extra-single-image", response_model=m.ExtrasSingleImageResponse)
        async def extras_single_image_api(req: m.ExtrasSingleImageRequest,
                                          request: Request) -> m.ExtrasSingleImageResponse:
            image = await run_in_threadpool(lambda: decode_base64_to_image(req.image, limits=self.limits))
            result = await self._extras([image], req, request)
            encoded = encode_pil_to_base64(result.images[0], options) if result.images else None
            return m.ExtrasSingleImageResponse(image=encoded, html_info=_html_info(result.info))

        @r.post("/extra-batch-images", response_model=m.ExtrasBatchImagesResponse)
        async def extras_batch_images_api(req: m.ExtrasBatchImagesRequest,
                                          request: Request) -> m.ExtrasBatchImagesResponse:
            self._check_count("imageList", len(req.imageList))
            sources = await run_in_threadpool(
                lambda: [decode_base64_to_image(f.data, field=f"imageList[{i}].data", limits=self.limits)
                         for i, f in enumerate(req.imageList)])
            result = await self._extras(sources, req, request)
            images = [encode_pil_to_base64(i, options) for i in result.images] if req.show_extras_results else []
            return m.ExtrasBatchImagesResponse(images=images, html_info=_html_info(result.info))

        @r.post("/png-info", response_model=m.PNGInfoResponse)
        def pnginfoapi(req: m.PNGInfoRequest) -> m.PNGInfoResponse:
            if not req.image.strip():
                return m.PNGInfoResponse(info="", items={}, parameters={})
            from modules.core.infotext import parse_infotext, read_info_from_image

            image = decode_base64_to_image(req.image, limits=self.limits)
            text, items = read_info_from_image(image)
            text = text or ""
            return m.PNGInfoResponse(info=text, items=_json_safe_items(items or {}),
                                     parameters=jsonable_encoder(parse_infotext(text)) if text else {})

    def _add_progress_routes(self) -> None:
        """The running job: progress (the live preview and text only for its owner), interrupt, skip
        (only of the caller's own job, unless the caller is an admin or the only user)."""
        r = self.router
        gen = self.generation

        @r.get("/progress", response_model=m.ProgressResponse)
        def progressapi(request: Request, skip_current_image: bool = False) -> m.ProgressResponse:
            state = gen.state
            snap = state.snapshot()
            preview, _ = state.current_preview()
            task = snap.get("current_task")
            owns = task is not None and self.caller(request).owns(gen.queue.get(task))
            current = encode_png_base64(preview) if owns and preview is not None and not skip_current_image else None
            return m.ProgressResponse(progress=snap["progress"], eta_relative=snap["eta_relative"],
                                      state=snap["state"], current_image=current,
                                      textinfo=snap["textinfo"] if owns else None,
                                      current_task=task, queue_pending=gen.queue.pending())

        def control(request: Request, action: Any) -> Any:
            outcome = gen.queue.control(self.caller(request), action)
            if outcome == "not yours":
                # A1111 answers {} whatever runs; stopping another client's job is refused, and said so.
                return JSONResponse(error_body("Conflict", f"the running job belongs to another client; "
                                               f"only its owner or an admin may {action} it"), status_code=409)
            return {}

        @r.post("/interrupt")
        def interruptapi(request: Request) -> Any:
            return control(request, "interrupt")

        @r.post("/skip")
        def skip(request: Request) -> Any:
            return control(request, "skip")

    def _add_options_routes(self) -> None:
        """Settings and command-line flags."""
        r = self.router
        options = self.options

        @r.get("/options", response_model=self.OptionsModel)
        def get_config() -> JSONResponse:
            data = options.as_dict()
            data["sd_model_checkpoint"] = self._selected_title() or data.get("sd_model_checkpoint")
            # Served as-is (not through the model): values of extension settings must not be coerced.
            return JSONResponse(jsonable_encoder(data))

        @r.post("/options")
        async def set_config(req: dict[str, Any] = Body(...)) -> Any:
            return await self._set_options(req)

        @r.get("/cmd-flags", response_model=self.FlagsModel)
        def get_cmd_flags() -> JSONResponse:
            return JSONResponse(jsonable_encoder(cmd_args.public_flags(self.services.cmd_opts)))

    def _add_list_routes(self) -> None:
        """What can be picked: samplers, schedulers, upscalers, models, styles..."""
        r = self.router
        models = self.models

        @r.get("/samplers", response_model=list[m.SamplerItem])
        def get_samplers() -> list[dict]:
            return samplers.list_samplers()

        @r.get("/schedulers", response_model=list[m.SchedulerItem])
        def get_schedulers() -> list[dict]:
            return samplers.list_schedulers()

        @r.get("/upscalers", response_model=list[m.UpscalerItem])
        def get_upscalers() -> list[dict]:
            builtin = [{"name": name, "model_name": None, "model_path": None, "model_url": None, "scale": 4}
                       for name in IMAGE_UPSCALERS]
            return builtin + [{"name": u.name, "model_name": u.architecture, "model_path": str(u.path),
                               "model_url": None, "scale": u.scale}
                              for u in self.services.upscalers.infos() if u.usable]

        @r.get("/latent-upscale-modes", response_model=list[m.LatentUpscalerModeItem])
        def get_latent_upscale_modes() -> list[dict]:
            return [{"name": name} for name in LATENT_UPSCALE_MODES]

        @r.get("/sd-models", response_model=list[m.SDModelItem])
        def get_sd_models() -> list[dict]:
            return [info.api_dict() for info in models.registry.list()]

        @r.get("/sd-vae", response_model=list[m.SDVaeItem])
        def get_sd_vaes() -> list[dict]:
            return [{"model_name": v.name, "filename": v.filename} for v in models.vaes.list()]

        @r.get("/hypernetworks", response_model=list[m.HypernetworkItem])
        def get_hypernetworks() -> list:
            networks = self.services.networks
            return [] if networks is None else [{"name": f.name, "path": str(f.path)}
                                                for f in networks.hypernetwork_files.list()]   # no torch

        @r.get("/loras", response_model=list[m.LoraItem])
        def get_loras() -> list:
            networks = self.services.networks
            return [] if networks is None else [e.api_dict() for e in networks.loras.list()]

        @r.post("/refresh-loras")
        def refresh_loras() -> dict:
            if self.services.networks is not None:
                self.services.networks.loras.refresh()
            return {}

        @r.get("/face-restorers", response_model=list[m.FaceRestorerItem])
        def get_face_restorers() -> list:
            return self.services.extras.faces.restorers() if self.services.extras.faces is not None else []

        @r.get("/realesrgan-models", response_model=list[m.RealesrganItem])
        def get_realesrgan_models() -> list:
            return [{"name": u.name, "path": str(u.path), "scale": u.scale}
                    for u in self.services.upscalers.infos()
                    if u.usable and self.services.upscalers.get(u.name).folder == "RealESRGAN"]

        @r.get("/prompt-styles", response_model=list[m.PromptStyleItem])
        def get_prompt_styles() -> list[dict]:
            return self._read_styles()

        @r.get("/embeddings", response_model=m.EmbeddingsResponse)
        def get_embeddings() -> dict:
            from modules.models.embeddings import api_response
            return api_response(self.services.generation.embeddings_report())

    def _add_script_routes(self) -> None:
        """Scripts and extensions."""
        r = self.router

        @r.get("/scripts", response_model=m.ScriptsList)
        def get_scripts_list() -> dict:
            builtin = ["controlnet"]  # built in, not a Script: listed as sd-webui-controlnet's always-on script is
            return {"txt2img": [s.name for s in self.services.script_runner(False).scripts] + builtin,
                    "img2img": [s.name for s in self.services.script_runner(True).scripts] + builtin}

        @r.get("/script-info", response_model=list[m.ScriptInfo])
        def get_script_info() -> list:
            out = []
            for runner in (self.services.script_runner(False), self.services.script_runner(True)):
                runner.ensure_defaults()
                out += [s.api_info for s in runner.scripts if s.api_info is not None]
            return out

        @r.get("/extensions", response_model=list[m.ExtensionItem])
        def get_extensions_list() -> list:
            from modules.extensions.loader import git_info

            out = []
            for ext in self.services.extensions:
                info = git_info(ext.path)
                out.append({"name": ext.name, **info, "version": info["commit_hash"][:8], "enabled": ext.enabled})
            return out

    def _add_model_routes(self) -> None:
        """Memory use, and refreshing, loading and unloading checkpoints (loads go through the queue)."""
        r = self.router
        models, gen = self.models, self.generation

        @r.get("/memory", response_model=m.MemoryResponse)
        def get_memory() -> dict:
            return {"ram": _ram_stats(), "cuda": _cuda_stats()}

        @r.post("/refresh-checkpoints")
        def refresh_checkpoints() -> dict:
            models.registry.refresh()
            return {}

        @r.post("/refresh-embeddings")
        def refresh_embeddings() -> dict:
            self.services.generation.embeddings_report(refresh=True)
            return {}

        @r.post("/refresh-vae")
        def refresh_vae() -> dict:
            models.vaes.refresh()
            return {}

        @r.post("/unload-checkpoint")
        async def unloadapi() -> dict:
            await wait_for(gen.queue.submit(lambda job: models.unload(), name="unload checkpoint"))
            return {}

        @r.post("/reload-checkpoint")
        async def reloadapi() -> dict:
            def load(job: Any) -> None:
                job.state.set_textinfo("Loading model…")
                models.current()
            await wait_for(gen.queue.submit(load, name="load checkpoint"))
            return {}

    # -- options -----------------------------------------------------------------------
    async def _set_options(self, req: dict[str, Any]) -> None:
        """A1111's POST /options: the whole GET dict must round-trip.

        An unknown key is a 422 naming it (a key stored in config.json by an extension that is not
        loaded now round-trips when unchanged); API-restricted keys are skipped and logged;
        unchanged values are not touched (so a frozen or odd stored value still round-trips); a
        bad value is a 422 naming the key and nothing is applied; a new `sd_model_checkpoint` is
        loaded (through the job queue) before the answer.

        Checking and saving run on a worker thread (a setting's onchange callback may wait for the
        model manager while a checkpoint loads), and the switch is awaited without holding the event loop.
        """
        checkpoint = await run_in_threadpool(self._apply_options, req)
        if checkpoint is not None:
            await wait_for(self.generation.submit_model_switch(checkpoint.title))
        return None

    def _apply_options(self, req: dict[str, Any]) -> Any:
        """_set_options' checks and changes; returns the checkpoint to switch to, or None."""
        options, models = self.options, self.models
        unknown = [key for key in req if key not in options.templates
                   and not (key in options.data and options.data[key] == req[key])]
        if unknown:
            raise bad_request(f"unknown setting(s): {', '.join(map(repr, unknown))}")
        ignored: list[str] = []
        changes: dict[str, Any] = {}
        checkpoint = None
        for key, value in req.items():
            info = options.templates.get(key)
            if info is None:
                continue
            if key == "sd_model_checkpoint":
                if value in (None, "") or value == self._selected_title():
                    continue
                checkpoint = models.registry.get_closest(str(value))
                if checkpoint is None:
                    raise bad_request(f"sd_model_checkpoint: model {value!r} not found; "
                                      f"known: {', '.join(models.titles()) or 'none'}")
                if checkpoint.title == self._selected_title():
                    checkpoint = None
                continue
            if value == options.get(key):
                continue
            if info.restrict_api and not is_dir_config_key(key):
                ignored.append(key)
                continue
            options.validate_values({key: value})
            if is_dir_config_key(key):
                raise bad_request(f"setting {key!r}: folders, file names and formats are set only in the "
                                  f"server's own UI, not through the API", 403)
            if key == "sd_vae":
                self._checked_vae(value, key)
            else:
                choices = info.current_choices() if info.kind in ("dropdown", "multiselect") else None
                items = [value] if info.kind == "dropdown" else (value if isinstance(value, list) else [])
                if choices and any(item not in choices for item in items):
                    raise bad_request(f"setting {key!r}: {value!r} is not one of {', '.join(map(str, choices))}")
            changes[key] = value
        if ignored:
            log.warning("POST /options: ignored settings the API may not change: %s", ", ".join(ignored))
        if (changes or checkpoint is not None) and options.frozen:
            raise bad_request("settings are frozen (--freeze-settings)", 403)
        for key, value in changes.items():
            options.set(key, value, is_api=True)
        if changes:
            options.save()
        return checkpoint

    # -- styles --------------------------------------------------------------------------
    def _read_styles(self) -> list[dict[str, Any]]:
        db = self.services.styles
        return [style.api_dict() for style in db.list()]


def _ram_stats() -> dict[str, Any]:
    try:
        import psutil

        rss = psutil.Process(os.getpid()).memory_info().rss
        total = psutil.virtual_memory().total
        return {"free": total - rss, "used": rss, "total": total}
    except Exception as err:  # noqa: BLE001 - reported to the client as A1111 does
        return {"error": str(err)}


def _cuda_stats() -> dict[str, Any]:
    torch = sys.modules.get("torch")  # never import torch just to report on it
    if torch is None:
        return {"error": "unavailable: torch is not loaded yet (no model has been loaded)"}
    try:
        if not torch.cuda.is_available():
            return {"error": "unavailable"}
        free, total = torch.cuda.mem_get_info()
        s = dict(torch.cuda.memory_stats())

        def pair(name: str) -> dict[str, int]:
            return {"current": s.get(f"{name}.all.current", 0), "peak": s.get(f"{name}.all.peak", 0)}
        return {
            "system": {"free": free, "used": total - free, "total": total},
            "active": pair("active_bytes"), "allocated": pair("allocated_bytes"),
            "reserved": pair("reserved_bytes"), "inactive": pair("inactive_split_bytes"),
            "events": {"retries": s.get("num_alloc_retries", 0), "oom": s.get("num_ooms", 0)},
        }
    except Exception as err:  # noqa: BLE001
        return {"error": str(err)}

"""sd-webui-controlnet's HTTP API, on our ControlNet core.

* ``alwayson_scripts: {"controlnet": {"args": [unit, ...]}}`` in ``/sdapi/v1/txt2img`` and
  ``img2img``: ``take_units`` moves the units onto the typed params (the extension's field names,
  aliases and defaults: ``core.controlnet_units``);
* ``GET /controlnet/version``, ``/controlnet/model_list``, ``/controlnet/module_list`` (with
  ``module_detail``), ``/controlnet/settings``, ``/controlnet/control_types``;
  ``POST /controlnet/detect``.

Served with ``--api``, behind the same trust boundary as ``/sdapi/v1``.
"""
from __future__ import annotations

from typing import Any, Callable

from fastapi import APIRouter, Body, FastAPI, HTTPException
from starlette.concurrency import run_in_threadpool

from modules.core.controlnet_units import ControlNetUnitError, units_from_request
from modules.core.limits import Limits

API_VERSION = 2   # what sd-webui-controlnet's /controlnet/version reports


Decode = Callable[..., Any]   # routes.decode_base64_to_image(encoding, *, field, limits)


def _decoder(decode: Decode, limits: Limits):
    return lambda value, field: decode(value, field=field, limits=limits)


def take_units(req: Any, params: Any, limits: Limits, decode: Decode) -> None:
    """Move ``alwayson_scripts["controlnet"]`` (any case) out of the request onto ``params.controlnet_units``,
    so the script runner never sees it. Bad units are a 422 naming the unit and field."""
    scripts = getattr(req, "alwayson_scripts", None)
    if not isinstance(scripts, dict):
        return
    key = next((k for k in scripts if str(k).strip().lower() == "controlnet"), None)
    if key is None:
        return
    value = scripts.pop(key)
    try:
        params.controlnet_units = units_from_request(value, _decoder(decode, limits))
    except ControlNetUnitError as err:
        raise HTTPException(status_code=422, detail=str(err)) from None


def _module_details(alias_names: bool) -> dict[str, dict[str, Any]]:
    from modules.engine.control.preprocessors import PREPROCESSORS

    return {((p.label or p.name) if alias_names else p.name): dict(p.detail) for p in PREPROCESSORS.values()}


def register(app: FastAPI, services: Any, decode: Decode, encode_png: Callable[[Any], str]) -> None:
    """The /controlnet routes; `decode`/`encode_png` are routes.py's base64 image helpers."""
    router = APIRouter(prefix="/controlnet", tags=["controlnet"])
    registry = services.controlnets
    limits = getattr(services, "limits", None) or Limits()

    @router.get("/version")
    def version() -> dict:
        return {"version": API_VERSION}

    @router.get("/model_list")
    def model_list(update: bool = True) -> dict:
        if update:
            registry.refresh()
        return {"model_list": registry.titles()}

    @router.get("/module_list")
    def module_list(alias_names: bool = False) -> dict:
        from modules.engine.control.preprocessors import preprocessor_names

        return {"module_list": preprocessor_names(alias_names), "module_detail": _module_details(alias_names)}

    @router.get("/settings")
    def settings() -> dict:
        return {"control_net_unit_count": int(services.options.get("control_net_unit_count") or 3)}

    @router.get("/control_types")
    def control_types() -> dict:
        from modules.engine.control.preprocessors import preprocessor_names

        return {"control_types": {"All": {"module_list": preprocessor_names(), "model_list": ["None", *registry.titles()],
                                          "default_option": "none", "default_model": "None"}}}

    @router.post("/detect")
    async def detect(controlnet_module: str = Body("none"), controlnet_input_images: list[str] = Body([]),
                     controlnet_processor_res: int = Body(-1), controlnet_threshold_a: float = Body(-1),
                     controlnet_threshold_b: float = Body(-1), controlnet_masks: list[str] = Body([]),
                     low_vram: bool = Body(False)) -> dict:
        from modules.engine.control import preprocessors as pre

        try:
            preprocessor = pre.get_preprocessor(controlnet_module)
        except (pre.UnknownPreprocessorError, pre.PreprocessorUnavailableError) as err:
            raise HTTPException(status_code=422, detail=f"Module not available: {err}") from None
        if not controlnet_input_images:
            raise HTTPException(status_code=422, detail="No image selected")
        if len(controlnet_input_images) > limits.max_input_images:
            raise HTTPException(status_code=422, detail=f"controlnet_input_images: at most {limits.max_input_images}")
        if not -1 <= controlnet_processor_res <= limits.max_side:
            raise HTTPException(status_code=422, detail=f"controlnet_processor_res: -1 or up to {limits.max_side}")
        decode_image = _decoder(decode, limits)
        args = pre.PreprocessorArgs(resolution=controlnet_processor_res if controlnet_processor_res > 0 else 512,
                                    threshold_a=controlnet_threshold_a, threshold_b=controlnet_threshold_b)

        def run() -> list[str]:
            out = []
            for i, encoded in enumerate(controlnet_input_images):
                image = decode_image(encoded, f"controlnet_input_images[{i}]").convert("RGB")
                if i < len(controlnet_masks):
                    image.putalpha(decode_image(controlnet_masks[i], f"controlnet_masks[{i}]").convert("L").resize(image.size))
                out.append(encode_png(preprocessor.run(image, args)))
            return out
        return {"images": await run_in_threadpool(run), "info": "Success"}

    app.include_router(router)

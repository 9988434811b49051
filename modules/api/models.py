"""Request/response models of the /sdapi/v1 API, with A1111's names, fields and defaults.

Class names follow A1111's Python names; where A1111's OpenAPI schema is published under a
different name (its txt2img/img2img models are generated under the processing class names),
the class carries that name and the A1111 Python name is an alias, so both /docs and code
generated from A1111's openapi.json line up.

Generation requests accept ``null`` for every field (A1111 makes every generated field
Optional) and ignore fields they do not know (older/newer clients send extras).
"""
from __future__ import annotations

from typing import Any, Literal, Optional

import math

from pydantic import BaseModel, ConfigDict, Field, create_model, model_validator

# Generous static bounds on numbers (the server's own, adjustable limits are checked after parsing:
# modules/core/limits.py); a value outside them is a 422 naming the field.
_SIDE = dict(ge=0, le=65536)
_COUNT = dict(ge=1, le=100000)
_SEED = dict(ge=-1, le=2**64 - 1)
_UNIT = dict(ge=0, le=1)


def _non_finite(value: Any, path: str, depth: int = 0) -> str | None:
    """The path of the first NaN or infinity in a JSON value (Python's json reads them), or None."""
    if isinstance(value, float):
        return None if math.isfinite(value) else path
    if depth > 32:
        return None
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        found = _non_finite(item, f"{path}.{key}" if path else str(key), depth + 1)
        if found:
            return found
    return None


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", protected_namespaces=(), allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _finite_numbers(cls, data: Any) -> Any:
        where = _non_finite(data, "")
        if where:
            raise ValueError(f"{where}: NaN and infinite numbers are not allowed")
        return data


class _Response(BaseModel):
    model_config = ConfigDict(protected_namespaces=())


# --------------------------------------------------------------------------- generation

class _ProcessingBase(_Request):
    prompt: Optional[str] = ""
    negative_prompt: Optional[str] = ""
    styles: Optional[list[str]] = None
    seed: Optional[int] = Field(-1, **_SEED)
    subseed: Optional[int] = Field(-1, **_SEED)
    subseed_strength: Optional[float] = Field(0, **_UNIT)
    seed_resize_from_h: Optional[int] = Field(-1, ge=-1, le=65536)
    seed_resize_from_w: Optional[int] = Field(-1, ge=-1, le=65536)
    sampler_name: Optional[str] = None
    scheduler: Optional[str] = None
    batch_size: Optional[int] = Field(1, **_COUNT)
    n_iter: Optional[int] = Field(1, **_COUNT)
    steps: Optional[int] = Field(50, **_COUNT)
    cfg_scale: Optional[float] = Field(7.0, ge=0, le=100)
    width: Optional[int] = Field(512, **_SIDE)
    height: Optional[int] = Field(512, **_SIDE)
    restore_faces: Optional[bool] = None
    tiling: Optional[bool] = None
    do_not_save_samples: Optional[bool] = False
    do_not_save_grid: Optional[bool] = False
    eta: Optional[float] = None
    denoising_strength: Optional[float] = Field(None, **_UNIT)
    s_min_uncond: Optional[float] = None
    s_churn: Optional[float] = None
    s_tmax: Optional[float] = None
    s_tmin: Optional[float] = None
    s_noise: Optional[float] = None
    override_settings: Optional[dict[str, Any]] = None
    override_settings_restore_afterwards: Optional[bool] = True
    refiner_checkpoint: Optional[str] = None
    refiner_switch_at: Optional[float] = None
    disable_extra_networks: Optional[bool] = False
    firstpass_image: Optional[str] = None
    comments: Optional[dict[str, Any]] = None
    # API-only fields A1111 adds to the generated model
    sampler_index: Optional[str] = Field("Euler", description="Used when sampler_name is empty (A1111's API default)")
    script_name: Optional[str] = None
    script_args: Optional[list[Any]] = Field(default_factory=list)
    send_images: Optional[bool] = True
    save_images: Optional[bool] = False
    alwayson_scripts: Optional[dict[str, Any]] = Field(default_factory=dict)
    force_task_id: Optional[str] = None
    infotext: Optional[str] = Field(None, description="Generation parameters text; fills fields the request does not set")


class StableDiffusionProcessingTxt2Img(_ProcessingBase):
    denoising_strength: Optional[float] = Field(0.75, **_UNIT)
    enable_hr: Optional[bool] = False
    firstphase_width: Optional[int] = Field(0, **_SIDE)
    firstphase_height: Optional[int] = Field(0, **_SIDE)
    hr_scale: Optional[float] = Field(2.0, ge=0, le=16)
    hr_upscaler: Optional[str] = None
    hr_second_pass_steps: Optional[int] = Field(0, ge=0, le=100000)
    hr_resize_x: Optional[int] = Field(0, **_SIDE)
    hr_resize_y: Optional[int] = Field(0, **_SIDE)
    hr_checkpoint_name: Optional[str] = None
    hr_sampler_name: Optional[str] = None
    hr_scheduler: Optional[str] = None
    hr_prompt: Optional[str] = ""
    hr_negative_prompt: Optional[str] = ""


StableDiffusionTxt2ImgProcessingAPI = StableDiffusionProcessingTxt2Img


class StableDiffusionProcessingImg2Img(_ProcessingBase):
    init_images: Optional[list[str]] = Field(None, description="Base64 images (data: URIs accepted)")
    denoising_strength: Optional[float] = Field(0.75, **_UNIT)
    resize_mode: Optional[int] = Field(0, ge=0, le=3)
    image_cfg_scale: Optional[float] = None
    mask: Optional[str] = None
    mask_blur_x: Optional[int] = Field(4, ge=0, le=64)
    mask_blur_y: Optional[int] = Field(4, ge=0, le=64)
    mask_blur: Optional[int] = Field(None, ge=0, le=64)
    mask_round: Optional[bool] = True
    inpainting_fill: Optional[int] = Field(0, ge=0, le=3)
    inpaint_full_res: Optional[bool] = True
    inpaint_full_res_padding: Optional[int] = Field(0, ge=0, le=256)
    inpainting_mask_invert: Optional[int] = 0
    initial_noise_multiplier: Optional[float] = None
    latent_mask: Optional[str] = None
    include_init_images: Optional[bool] = False
    depth_image: Optional[str] = Field(None, description="SD2 depth models: a base64 depth map of the init image "
                                       "(greyscale, white = near, 8- or 16-bit); omitted: the depth estimator makes it")


StableDiffusionImg2ImgProcessingAPI = StableDiffusionProcessingImg2Img


class TextToImageResponse(_Response):
    images: Optional[list[str]] = Field(None, title="Image", description="The generated images in base64 format.")
    parameters: dict[str, Any]
    info: str = Field(description="Processed.js() as a JSON string")


class ImageToImageResponse(TextToImageResponse):
    pass


# --------------------------------------------------------------------------- extras / png info

class ExtrasBaseRequest(_Request):
    resize_mode: Literal[0, 1] = Field(0, description="0: scale by upscaling_resize; 1: scale to upscaling_resize_w x _h")
    show_extras_results: bool = True
    gfpgan_visibility: float = Field(0, ge=0, le=1)
    codeformer_visibility: float = Field(0, ge=0, le=1)
    codeformer_weight: float = Field(0, ge=0, le=1)
    upscaling_resize: float = Field(2, ge=1, le=8)
    upscaling_resize_w: int = Field(512, ge=1, le=65536)
    upscaling_resize_h: int = Field(512, ge=1, le=65536)
    upscaling_crop: bool = True
    upscaler_1: str = "None"
    upscaler_2: str = "None"
    extras_upscaler_2_visibility: float = Field(0, ge=0, le=1)
    upscale_first: bool = False


class ExtraBaseResponse(_Response):
    html_info: str = Field(description="A series of HTML tags containing the process info.")


class ExtrasSingleImageRequest(ExtrasBaseRequest):
    image: str = Field("", description="Image to work on, base64 (a data: URI prefix is accepted)")


class ExtrasSingleImageResponse(ExtraBaseResponse):
    image: Optional[str] = Field(None, description="The generated image in base64 format.")


class FileData(_Request):
    data: str = Field(description="Base64 representation of the file")
    name: str = Field("", title="File name")


class ExtrasBatchImagesRequest(ExtrasBaseRequest):
    imageList: list[FileData] = Field(title="Images", description="List of images to work on.")


class ExtrasBatchImagesResponse(ExtraBaseResponse):
    images: list[str] = Field(description="The generated images in base64 format.")


class PNGInfoRequest(_Request):
    image: str = Field(description="The base64 encoded image (a data: URI prefix is accepted)")


class PNGInfoResponse(_Response):
    info: str = Field(description="The generation parameters text")
    items: dict[str, Any] = Field(default_factory=dict, description="Other text chunks of the image")
    parameters: dict[str, Any] = Field(default_factory=dict, description="The info parsed into fields")


# --------------------------------------------------------------------------- progress

class ProgressResponse(_Response):
    progress: float = Field(title="Progress", description="Fraction done of the running job, 0..1")
    eta_relative: float = Field(title="ETA in secs")
    state: dict[str, Any] = Field(title="State", description="The job state (A1111's shared.state.dict())")
    current_image: Optional[str] = Field(None, description="The live preview, base64 PNG")
    textinfo: Optional[str] = Field(None, description="Info text used by the web UI")
    current_task: Optional[str] = Field(None, description="Id of the running job")
    queue_pending: int = Field(0, description="Jobs waiting behind the running one (not in A1111)")


# --------------------------------------------------------------------------- listings

class SamplerItem(_Response):
    name: str
    aliases: list[str]
    options: dict[str, str]


class SchedulerItem(_Response):
    name: str
    label: str
    aliases: Optional[list[str]] = None
    default_rho: Optional[float] = None
    need_inner_model: Optional[bool] = None


class UpscalerItem(_Response):
    name: str
    model_name: Optional[str] = None
    model_path: Optional[str] = None
    model_url: Optional[str] = None
    scale: Optional[float] = None


class LatentUpscalerModeItem(_Response):
    name: str


class SDModelItem(_Response):
    title: str
    model_name: str
    hash: Optional[str] = None
    sha256: Optional[str] = None
    filename: str
    config: Optional[str] = None


class SDVaeItem(_Response):
    model_name: str
    filename: str


class HypernetworkItem(_Response):
    name: str
    path: Optional[str] = None


class LoraItem(_Response):
    """``GET /sdapi/v1/loras``: A1111's fields (metadata: the file's safetensors training metadata)."""
    name: str
    alias: str
    path: str
    metadata: dict[str, Any] = {}


class FaceRestorerItem(_Response):
    name: str
    cmd_dir: Optional[str] = None


class RealesrganItem(_Response):
    name: str
    path: Optional[str] = None
    scale: Optional[int] = None


class PromptStyleItem(_Response):
    name: str
    prompt: Optional[str] = None
    negative_prompt: Optional[str] = None


class EmbeddingItem(_Response):
    step: Optional[int] = None
    sd_checkpoint: Optional[str] = None
    sd_checkpoint_name: Optional[str] = None
    shape: int
    vectors: int


class EmbeddingsResponse(_Response):
    loaded: dict[str, EmbeddingItem]
    skipped: dict[str, EmbeddingItem]


class MemoryResponse(_Response):
    ram: dict[str, Any] = Field(title="RAM", description="System memory stats")
    cuda: dict[str, Any] = Field(title="CUDA", description="nVidia CUDA memory stats")


class ScriptsList(_Response):
    txt2img: list[str] = Field(default_factory=list)
    img2img: list[str] = Field(default_factory=list)


class ScriptArg(_Response):
    label: Optional[str] = None
    value: Optional[Any] = None
    minimum: Optional[Any] = None
    maximum: Optional[Any] = None
    step: Optional[Any] = None
    choices: Optional[list[str]] = None


class ScriptInfo(_Response):
    name: Optional[str] = None
    is_alwayson: Optional[bool] = None
    is_img2img: Optional[bool] = None
    args: list[ScriptArg] = Field(default_factory=list)


class ExtensionItem(_Response):
    name: str
    remote: str
    branch: str
    commit_hash: str
    version: str
    commit_date: int
    enabled: bool


class ErrorResponse(_Response):
    """Every error answer (A1111's shape)."""
    error: str = Field(description="The exception type")
    detail: Any = Field("", description="What went wrong")
    body: Any = Field("", description="The request body, for validation errors")
    errors: Any = Field("", description="The exception text")


# --------------------------------------------------------------------------- generated from live objects

def _field_type(value: Any) -> Any:
    if value is None:
        return Any
    if isinstance(value, bool):
        return Optional[bool]
    if isinstance(value, (int, float)):
        return Optional[float] if isinstance(value, float) else Optional[int]
    if isinstance(value, str):
        return Optional[str]
    if isinstance(value, (list, tuple)):
        return Optional[list]
    if isinstance(value, dict):
        return Optional[dict]
    return Any


def make_options_model(options) -> type[BaseModel]:
    """``OptionsModel``: one optional field per setting, for /docs (values are served as-is)."""
    fields: dict[str, Any] = {}
    for key, info in options.templates.items():
        if not key.isidentifier() or key.startswith("_"):
            continue
        default = info.default if not callable(info.default) else None
        meta = dict(title=info.label or key, description=info.comment_after.strip(" ()") or None)
        if isinstance(default, (list, dict)):
            fields[key] = (_field_type(default), Field(default_factory=lambda d=default: type(d)(d), **meta))
        else:
            fields[key] = (_field_type(default), Field(default, **meta))
    return create_model("OptionsModel", __config__=ConfigDict(extra="allow", protected_namespaces=()), **fields)


def make_flags_model(cmd_opts) -> type[BaseModel]:
    """``FlagsModel``: the command-line flags as parsed, for /docs."""
    fields = {key: (_field_type(value), Field(None, title=key))
              for key, value in vars(cmd_opts).items() if key.isidentifier() and not key.startswith("_")}
    return create_model("FlagsModel", __config__=ConfigDict(extra="allow", protected_namespaces=()), **fields)

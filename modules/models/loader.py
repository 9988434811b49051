"""Checkpoint file -> diffusers pipeline, offline, one component at a time; plus the loaded-model cache.

Why per component rather than ``Pipeline.from_single_file``: we already know every config
(``detection`` inferred it from the shapes), ``.ckpt`` files must be read only by
``weights_io`` (torch's weights-only unpickler), and building each model on the meta device then
assigning the loaded tensors (``load_state_dict(assign=True)``) skips random initialisation
entirely: 0.1 s instead of ~9 s for an SD1.5 UNet on the 2-core CPU, with no second copy of the
weights.

Nothing here can reach the network: configs come from ``configs/diffusers/<family>/`` via
``ModelSpec``, tokenizers from ``families.load_tokenizer``, weights from the local file.

What to build comes from the family record (``spec.family_info``): the pipeline class and one
text encoder per slot, each built by the entry for its weight layout in ``_TEXT_ENCODER_LOADERS``.
"""
from __future__ import annotations

import inspect
import json
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from modules.models import detection, families, midas_embedded
from modules.models.devices import DevicePolicy, torch_gc
from modules.models.detection import ModelSpec
from modules.models.families import FamilyId, FamilyInfo, TextEncoderSlot
from modules.models import residency
from modules.models.materialise import CAN_MAP, Materialiser, file_span
from modules.models.weights_io import CheckpointLoadError, load_state_dict_file

__all__ = [
    "LoadedModel", "ModelManager", "UnsupportedCheckpointError", "load_model", "load_checkpoint",
    "load_vae", "replace_vae", "make_load_fn", "sidecar_yaml_for",
]

log = logging.getLogger(__name__)

Progress = Callable[[str], None]

# diffusers' LDM->diffusers converters keep these but the transformers models have no such
# parameter (position_ids became a non-persistent buffer).
_IGNORED_TE_KEYS = ("embeddings.position_ids", "text_model.embeddings.position_ids")


class UnsupportedCheckpointError(CheckpointLoadError):
    """The file was read but is not something we can load as a checkpoint (LoRA, VAE, Flux...)."""

    def __init__(self, path: Path, spec: ModelSpec):
        self.spec = spec
        super().__init__(path, spec.reason)


@dataclass
class LoadedModel:
    info: Any  # checkpoints.CheckpointInfo, or None when loaded from a bare path
    path: Path
    spec: ModelSpec
    policy: DevicePolicy
    pipe: Any
    components: dict[str, Any]
    vae_file: Path | None = None
    load_seconds: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)
    status: str = "ready"
    needs_depth_map: bool = False
    # the checkpoint's own VAE, kept while a separate one is active so switching back is instant
    baked_vae: Any = None
    # --medvram/--lowvram: the offload.OffloadPlan whose hooks move the components (None: all resident)
    offload: Any = None
    # SD2 depth: the MiDaS estimator stored in the checkpoint (midas_embedded.EmbeddedMidas), if any
    embedded_depth: Any = None
    # memory-mapped load: copies the weights off the file in the background (None: nothing to copy)
    materialiser: Materialiser | None = None
    # low-RAM: drops the idle components' mapped weights while another one runs (models/residency.py)
    residency: Any = None

    def wait_materialised(self) -> None:
        """Return once no weight is backed by the checkpoint file any more: call before reading or
        writing weights outside a forward (LoRA merging). Forwards need not wait (``materialise.py``).
        Low-RAM mode keeps its half-precision layers mapped; writes to them are kept (``residency.py``)."""
        if self.materialiser is not None:
            self.materialiser.wait()

    @property
    def family(self) -> str:
        return self.spec.family or ""

    @property
    def family_info(self) -> FamilyInfo:
        info = self.spec.family_info
        assert info is not None  # only supported checkpoints are loaded
        return info

    @property
    def prediction_type(self) -> str:
        return self.spec.prediction_type

    # A1111's model-type flags: extensions read them off shared.sd_model.
    @property
    def is_sdxl(self) -> bool:
        return self.family_info.is_sdxl

    @property
    def is_sd2(self) -> bool:
        return self.family_info.is_sd2

    @property
    def is_sd1(self) -> bool:
        return self.family_info.is_sd1

    @property
    def is_inpaint(self) -> bool:
        return self.spec.is_inpaint

    @property
    def title(self) -> str:
        return getattr(self.info, "title", None) or self.path.name

    @property
    def is_loaded(self) -> bool:
        return self.pipe is not None

    def unload(self) -> None:
        """Drop every reference we hold so the weights can be freed, then return the memory."""
        device = self.policy.device
        if self.materialiser is not None:
            self.materialiser.cancel()
            self.materialiser = None
        self.residency = None
        pipe = self.pipe
        self.pipe = None
        self.baked_vae = None
        if self.embedded_depth is not None:
            self.embedded_depth.release()
            self.embedded_depth = None
        if self.offload is not None:
            self.offload.remove()  # the hooks hold the modules: drop them too
            self.offload = None
        self.components.clear()
        if pipe is not None:
            for name in list(getattr(pipe, "components", {})):
                try:
                    setattr(pipe, name, None)
                except Exception:  # a component that refuses None: dropping the pipe is enough
                    pass
        del pipe
        torch_gc(device)


# ---------------------------------------------------------------- helpers


def _path_of(info_or_path: Any) -> tuple[Any, Path]:
    if isinstance(info_or_path, (str, Path)):
        return None, Path(info_or_path)
    return info_or_path, Path(info_or_path.filename)


def sidecar_yaml_for(info_or_path: Any) -> Path | None:
    """A1111's rule: ``<checkpoint without extension>.yaml`` beside the file is its config."""
    info, path = _path_of(info_or_path)
    if info is not None:
        return getattr(info, "sidecar_config", None)
    candidate = path.with_suffix(".yaml")
    return candidate if candidate.is_file() else None


def _few(keys: Any, n: int = 5) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f" … (+{len(keys) - n})" if len(keys) > n else "")


def _build_empty(factory: Callable[[], Any]) -> Any:
    """Construct a model with parameters on the meta device (no random init, no allocation).
    ``no_init_weights`` also skips the init calls themselves (``normal_``/``uniform_``, even on meta
    tensors, cost 0.2 s for SD1.5; transformers' own ``from_pretrained`` builds under it too)."""
    from accelerate import init_empty_weights
    from transformers.initialization import no_init_weights

    with init_empty_weights(), no_init_weights():
        return factory()


def _cast_weights(weights: dict[str, Any], source: dict[str, Any] | None, to: tuple[Any, Any] | None) -> None:
    """Move/cast tensor by tensor, dropping each source tensor from ``source`` as soon as it is copied:
    an fp16 file loaded as fp32 (or moved to the GPU) then never holds two full copies."""
    if to is None:
        return
    device, dtype = to  # dtype None: keep each tensor's own (the low-RAM mode)
    owner = {id(v): k for k, v in source.items()} if source is not None else {}
    for key in list(weights):
        old = weights[key]
        target = dtype if dtype is not None and old.is_floating_point() else old.dtype
        if old.dtype == target and old.device == device:
            continue
        weights[key] = old.to(device=device, dtype=target)
        src = owner.pop(id(old), None)
        if src is not None and source is not None:
            source.pop(src, None)
        del old


def _assign(model: Any, weights: Mapping[str, Any], path: Path, what: str,
            source: dict[str, Any] | None = None, to: tuple[Any, Any] | None = None) -> None:
    """Strict load by assignment: every parameter must come from the file, nothing may be left over.

    ``weights`` (a converter's output, owned by the caller) is cast in place, so no stale copy survives.
    """
    weights = weights if isinstance(weights, dict) else dict(weights)
    _cast_weights(weights, source, to)
    try:
        result = model.load_state_dict(weights, strict=False, assign=True)
    except RuntimeError as exc:  # size mismatches are raised even with strict=False
        lines = [ln.strip() for ln in str(exc).splitlines() if "size mismatch" in ln]
        detail = "; ".join(lines[:3]) or str(exc).splitlines()[0]
        raise CheckpointLoadError(path, f"{what} weights do not fit the inferred config: {detail}") from exc
    problems = []
    if result.missing_keys:
        problems.append(f"missing {len(result.missing_keys)} keys ({_few(result.missing_keys)})")
    if result.unexpected_keys:
        problems.append(f"unexpected {len(result.unexpected_keys)} keys ({_few(result.unexpected_keys)})")
    if problems:
        raise CheckpointLoadError(path, f"{what}: " + "; ".join(problems))
    leftover = [n for n, p in model.named_parameters() if p.is_meta]
    if leftover:
        raise CheckpointLoadError(path, f"{what}: no weights for {_few(leftover)}")


def _finish(model: Any, device: Any, dtype: Any) -> Any:
    import torch

    model.requires_grad_(False)
    model.eval()
    # Plain nn.Module.to: diffusers' override warns on every dtype cast, even with nothing to keep in fp32.
    if any(p.dtype != dtype for p in model.parameters() if p.is_floating_point()):
        return torch.nn.Module.to(model, device=device, dtype=dtype)
    return torch.nn.Module.to(model, device=device)


def _keeps_file_dtype(policy: DevicePolicy) -> bool:
    """The CPU never converts a half-precision file at load: low-RAM mode keeps it, fp32 converts lazily."""
    return policy.load_device.type == "cpu" and policy.device.type == "cpu"


def _to(policy: DevicePolicy, dtype: Any) -> tuple[Any, Any]:
    """Where a component's tensors go at assignment, and in which dtype (None: the file's)."""
    return policy.load_device, (None if _keeps_file_dtype(policy) else dtype)


def _ready(model: Any, policy: DevicePolicy, dtype: Any, mat: Materialiser | None = None) -> Any:
    """A built component in its final dtype and place. On the CPU, half-precision weights from the
    file are kept and upcast per layer for each call (low-RAM mode), or converted to fp32 layer by
    layer on first use (``precision.py``); either way the model is ready without a full fp32 copy.
    ``mat``: the weights are memory-mapped; what is still on the file is copied off by ``mat``
    (in the background, or by a layer's hook on first use: ``materialise.py``)."""
    if _keeps_file_dtype(policy):
        from modules.models import precision

        if precision.is_lowram(model):  # already done (the SD2 v-probe readies the UNet before probing it)
            return _adopt(model, mat, None)
        storage = precision.storage_dtype_of(dict(model.named_parameters()))
        if storage is not None:
            model.requires_grad_(False)
            model.eval()
            if policy.lowram:
                return _adopt(precision.apply_lowram_casting(model, storage, dtype), mat, None)
            file_backed = mat.file_backed if mat is not None else (lambda _t: False)
            return _adopt(precision.apply_lazy_upcast(model, dtype, file_backed), mat, dtype)
    return _adopt(_finish(model, policy.load_device, dtype), mat, dtype)


def _adopt(model: Any, mat: Materialiser | None, dtype: Any) -> Any:
    """Hand what is still on the mapped file to ``mat``: hooked layers wait for it, the rest is copied now."""
    if mat is not None:
        from modules.models import precision

        mat.adopt(model, dtype, precision.has_first_call_hook)
    return model


# ---------------------------------------------------------------- components


def _load_unet(sd: dict[str, Any], cfg: dict, path: Path, to: tuple[Any, Any] | None = None) -> Any:
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    weights = convert_ldm_unet_checkpoint(sd, cfg)
    unet = _build_empty(lambda: UNet2DConditionModel.from_config(cfg))
    _assign(unet, weights, path, "UNet", sd, to)
    return unet


def _is_diffusers_vae(shapes: Mapping[str, Any]) -> bool:
    return ("encoder.down_blocks.0.resnets.0.conv1.weight" in shapes
            or "decoder.up_blocks.0.resnets.0.conv1.weight" in shapes)


def _load_vae_weights(sd: dict[str, Any], cfg: dict, path: Path, to: tuple[Any, Any] | None = None) -> Any:
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    if _is_diffusers_vae(sd):
        weights = dict(sd)
    else:
        weights = convert_ldm_vae_checkpoint(sd, cfg)
    vae = _build_empty(lambda: AutoencoderKL.from_config(cfg))
    _assign(vae, weights, path, "VAE", sd, to)
    return vae


def _load_clip(sd: dict[str, Any], cfg: dict, slot: TextEncoderSlot, path: Path, what: str,
               to: tuple[Any, Any] | None = None) -> Any:
    """transformers-layout CLIP-L (SD1 / SDXL encoder 1) -> CLIPTextModel."""
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel

    # only this encoder's keys, renamed to the transformers layout (text_model.*)
    own = {k: v for k, v in sd.items() if k.startswith(slot.ldm_prefix)}
    weights = convert_ldm_clip_checkpoint(own, remove_prefix=slot.ldm_prefix.removesuffix("text_model."))
    model = _build_empty(lambda: CLIPTextModel(CLIPTextConfig.from_dict(cfg)))
    weights = _fit_text_model_prefix(model, weights)
    _assign(model, weights, path, what, sd, to)
    return model


def _load_open_clip(sd: dict[str, Any], cfg: dict, slot: TextEncoderSlot, path: Path, what: str,
                    to: tuple[Any, Any] | None = None) -> Any:
    """OpenCLIP layout -> CLIPTextModel (SD2) or CLIPTextModelWithProjection (SDXL's pooled encoder)."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cls = CLIPTextModelWithProjection if slot.pooled else CLIPTextModel
    model = _build_empty(lambda: cls(CLIPTextConfig.from_dict(cfg)))
    # only this encoder's keys: the converter scans every key it is given
    own = {k: v for k, v in sd.items() if k.startswith(slot.ldm_prefix)}
    weights = convert_open_clip_checkpoint(model, own, prefix=slot.ldm_prefix)
    if not slot.pooled:
        weights.pop("text_projection.weight", None)
    weights = _fit_text_model_prefix(model, weights)
    _assign(model, weights, path, what, sd, to)
    return model


# One entry per text-encoder weight layout (a slot's tokenizer kind); a family with a new kind of
# encoder (SD3's T5...) adds its builder here.
_TEXT_ENCODER_LOADERS: dict[str, Callable[..., Any]] = {"clip-l": _load_clip, "openclip": _load_open_clip}


def _fit_text_model_prefix(model: Any, weights: dict[str, Any]) -> dict[str, Any]:
    """transformers >= 5.6 flattened CLIPTextModel (no ``text_model.``); the projection model kept it."""
    weights = {k: v for k, v in weights.items() if k not in _IGNORED_TE_KEYS}
    if hasattr(model, "text_model"):
        return weights
    return {k.removeprefix("text_model."): v for k, v in weights.items()}


def _scheduler(spec: ModelSpec) -> Any:
    import diffusers

    cfg_dir = spec.config_dir
    assert cfg_dir is not None
    index = json.loads((cfg_dir / "model_index.json").read_text(encoding="utf-8"))
    cls_name = index.get("scheduler", [None, "EulerDiscreteScheduler"])[1]
    cfg = json.loads((cfg_dir / "scheduler" / "scheduler_config.json").read_text(encoding="utf-8"))
    cfg.update(spec.scheduler_overrides)
    cfg["prediction_type"] = spec.prediction_type
    if spec.zero_terminal_snr:
        cfg["rescale_betas_zero_snr"] = True
        cfg["timestep_spacing"] = "trailing"
    return getattr(diffusers, cls_name).from_config(cfg)


def _assemble(spec: ModelSpec, components: dict[str, Any]) -> Any:
    import diffusers

    assert spec.family_info is not None
    cls = getattr(diffusers, spec.family_info.pipeline_class)
    index = json.loads((spec.config_dir / "model_index.json").read_text(encoding="utf-8"))  # type: ignore[operator]
    accepted = inspect.signature(cls.__init__).parameters
    kwargs: dict[str, Any] = {k: v for k, v in components.items() if k in accepted}
    extras = {
        "safety_checker": None, "feature_extractor": None, "requires_safety_checker": False,
        "image_encoder": None, "depth_estimator": None, "add_watermarker": False,
        "text_encoder": None, "tokenizer": None,  # the refiner has no first encoder
    }
    for flag in ("force_zeros_for_empty_prompt", "requires_aesthetics_score"):
        if flag in index:
            extras[flag] = index[flag]
    for k, v in extras.items():
        if k in accepted and k not in kwargs:
            kwargs[k] = v
    return cls(**kwargs)


# ---------------------------------------------------------------- entry points


def load_vae(vae_file: Path, spec: ModelSpec, policy: DevicePolicy, progress: Progress | None = None) -> Any:
    """A separate VAE file (LDM layout with or without ``first_stage_model.``, or diffusers layout).

    Its widths are inferred from its own shapes; the scaling factor stays the checkpoint's, as in A1111.
    """
    vae_file = Path(vae_file)
    if progress:
        progress(f"Loading VAE {vae_file.name}")
    sd = load_state_dict_file(vae_file)
    shapes = detection.shapes_of(sd)
    cfg = dict(spec.vae_config)
    if not _is_diffusers_vae(shapes):
        try:
            inferred = detection.infer_vae_config(shapes, spec.family or FamilyId.SD1)
        except (ValueError, KeyError) as exc:
            raise CheckpointLoadError(vae_file, f"not a VAE file ({len(shapes)} tensors, first keys "
                                               f"{_few(list(shapes)[:5])})") from exc
        for key in ("scaling_factor", "force_upcast", "shift_factor", "latents_mean", "latents_std"):
            if key in cfg:
                inferred[key] = cfg[key]
            else:
                inferred.pop(key, None)
        cfg = inferred
    mat = _materialiser_for(sd, vae_file, policy)
    vae = _ready(_load_vae_weights(sd, cfg, vae_file, _to(policy, policy.vae_dtype)), policy, policy.vae_dtype, mat)
    if mat is not None:
        mat.run_now()  # a VAE is small: copied off its file before it is used
    return vae


def _materialiser_for(sd: Mapping[str, Any], path: Path, policy: DevicePolicy) -> Materialiser | None:
    """A Materialiser when ``sd`` is memory-mapped from ``path`` and the model is built on the CPU."""
    if not (_keeps_file_dtype(policy) and isinstance(sd, dict)):
        return None
    span = file_span(sd, path)
    if span is None:
        return None
    keep = next(t for t in sd.values() if span.holds(t))
    return Materialiser(span, keep_alive=keep)


def load_model(
    info_or_path: Any,
    spec: ModelSpec,
    policy: DevicePolicy,
    vae_file: Path | None = None,
    progress: Progress | None = None,
    *,
    state_dict: Mapping[str, Any] | None = None,
) -> LoadedModel:
    """Build the diffusers pipeline for a detected checkpoint. Raises ``CheckpointLoadError``.

    ``state_dict``: the already-read weights (so a ``.ckpt`` is unpickled once). It is consumed:
    entries are removed as components are built, so the source tensors can be freed early.
    """
    info, path = _path_of(info_or_path)
    if not spec.supported:
        raise UnsupportedCheckpointError(path, spec)
    say = progress or (lambda _msg: None)
    laps = _Laps()
    sd = _read_weights(path, spec, vae_file, state_dict, say, laps, in_memory=_keeps_file_dtype(policy) and not CAN_MAP)
    state_dict = None
    mat = _materialiser_for(sd, path, policy)
    if mat is not None and policy.lowram:
        mat.keep_mapped = residency.available(mat.span)
    if mat is not None and spec.is_depth:  # kept as raw tensors, not modules: copied off the file now
        mat.copy_entries(sd, midas_embedded.PREFIX)
    embedded = midas_embedded.take(sd, path.name) if spec.is_depth else None  # not a pipeline component

    components: dict[str, Any] = {}
    try:
        spec, baked, pipe = _build_pipeline(sd, spec, path, policy, vae_file, progress, components, laps, mat)
    except CheckpointLoadError:
        components.clear()
        raise
    except Exception as exc:  # anything else while building is still "this file did not load"
        components.clear()
        raise CheckpointLoadError(path, exc) from exc

    status, needs_depth = "ready", False
    if spec.is_depth:
        status = midas_embedded.load_status(embedded)
        needs_depth = True
    offload = _install_offload(components, spec, policy)
    kept = {**components, **({"baked_vae": baked} if baked is not None else {})}  # a separate VAE: ours idles
    resident = residency.install(kept, mat.span, path) if mat is not None and mat.keep_mapped else None
    if mat is not None:
        mat.start()  # the rest of the weights come off the mapped file in the background
    seconds = round(time.perf_counter() - laps.start, 3)
    say(f"Model loaded in {seconds:.1f}s")
    return LoadedModel(info=info, path=path, spec=spec, policy=policy, pipe=pipe, components=components,
                       vae_file=Path(vae_file) if vae_file else None, load_seconds=seconds, timings=laps.timings,
                       status=status, needs_depth_map=needs_depth, baked_vae=baked, offload=offload,
                       embedded_depth=embedded, materialiser=mat, residency=resident)


def _install_offload(components: dict[str, Any], spec: ModelSpec, policy: DevicePolicy) -> Any:
    """--medvram/--lowvram hooks (models/offload.py); otherwise the CUDA fast path's layout and compile."""
    from modules.models import offload

    assert spec.family_info is not None
    plan = offload.install_offload(components, policy.offload_for(spec.family_info.is_sdxl), policy.device)
    if plan is None and policy.is_cuda:
        from modules.models import fast_path

        fast_path.apply(components, policy)
    return plan


class _Laps:
    """Seconds per load stage (``LoadedModel.timings``)."""

    def __init__(self) -> None:
        self.start = self._last = time.perf_counter()
        self.timings: dict[str, float] = {}

    def __call__(self, name: str) -> None:
        now = time.perf_counter()
        self.timings[name] = round(now - self._last, 3)
        self._last = now


def _read_weights(path: Path, spec: ModelSpec, vae_file: Path | None, state_dict: Mapping[str, Any] | None,
                  say: Progress, laps: _Laps, in_memory: bool = False) -> dict[str, Any]:
    if state_dict is None:
        say(f"Reading {path.name}")
        state_dict = load_state_dict_file(path, in_memory=in_memory)
        laps("read")
    sd = detection.normalize_checkpoint_keys(state_dict)
    if sd is not state_dict and isinstance(state_dict, dict):
        state_dict.clear()  # the renamed copy holds the same tensors; keep one owner so they can be dropped
    if not spec.has_vae and vae_file is None:
        raise CheckpointLoadError(path, "the file has no VAE weights: choose a VAE in settings (SD VAE)")
    return sd


def _build_pipeline(sd: dict[str, Any], spec: ModelSpec, path: Path, policy: DevicePolicy, vae_file: Path | None,
                    progress: Progress | None, components: dict[str, Any], laps: _Laps,
                    mat: Materialiser | None = None) -> tuple[ModelSpec, Any, Any]:
    """Every component into ``components``, then the pipeline. Returns (spec after the v probe,
    the checkpoint's own VAE when a separate one is used, the pipeline)."""
    say = progress or (lambda _msg: None)
    say("Loading UNet")
    components["unet"], spec = _load_denoiser(sd, spec, path, policy, mat)
    _release(sd, (detection.UNET, "model_ema."))
    laps("unet")

    say("Loading text encoder")
    _load_text_encoders(sd, spec, path, policy, components, mat)
    laps("text_encoders")
    _release(sd, ("cond_stage_model.", "conditioner."))

    baked = None
    if spec.has_vae:
        say("Loading VAE")
        baked = _ready(_load_vae_weights(sd, spec.vae_config, path, _to(policy, policy.vae_dtype)),
                       policy, policy.vae_dtype, mat)
    sd.clear()  # everything we keep now lives in the modules
    if vae_file is not None:
        components["vae"] = load_vae(Path(vae_file), spec, policy, progress)
    else:
        components["vae"], baked = baked, None
    laps("vae")

    assert spec.family_info is not None
    for slot in spec.family_info.text.slots:
        components[slot.tokenizer_component] = families.load_tokenizer(slot.tokenizer)
    _check_vocab(components, path)
    components["scheduler"] = _scheduler(spec)
    laps("tokenizers_scheduler")

    say("Assembling pipeline")
    pipe = _assemble(spec, components)
    laps("pipeline")
    return spec, baked, pipe


def _load_denoiser(sd: dict[str, Any], spec: ModelSpec, path: Path, policy: DevicePolicy,
                   mat: Materialiser | None = None) -> tuple[Any, ModelSpec]:
    """The UNet; where the weights cannot tell eps from v (SD2), the probe decides and may change the spec."""
    unet = _load_unet(sd, spec.unet_config, path, _to(policy, policy.dtype))
    if spec.needs_v_probe:
        unet = _ready(unet, policy, policy.dtype)
        is_v, score = detection.probe_v_prediction(unet)
        new_spec = spec.with_prediction("v_prediction" if is_v else "epsilon", "probe")
        log.info("%s: v-prediction probe score %.3f -> %s", path.name, score, new_spec.prediction_type)
        if new_spec.unet_config != spec.unet_config:
            from diffusers import UNet2DConditionModel

            # same tensors, new config (sd2-v upcasts attention): rebuild around them, no copy
            weights = unet.state_dict()
            unet = _build_empty(lambda: UNet2DConditionModel.from_config(new_spec.unet_config))
            _assign(unet, weights, path, "UNet")
        spec = new_spec
    return _ready(unet, policy, policy.dtype, mat), spec


def _load_text_encoders(sd: dict[str, Any], spec: ModelSpec, path: Path, policy: DevicePolicy,
                        components: dict[str, Any], mat: Materialiser | None = None) -> None:
    """One model per text-encoder slot of the family record, built by the loader for its layout."""
    assert spec.family_info is not None
    te_dtype = policy.text_encoder_dtype
    for slot in spec.family_info.text.slots:
        cfg = spec.text_encoder_config_for(slot.component)
        what = slot.component.replace("_", " ")
        model = _TEXT_ENCODER_LOADERS[slot.tokenizer](sd, cfg, slot, path, what, _to(policy, te_dtype))
        components[slot.component] = _ready(model, policy, te_dtype, mat)


def _release(sd: dict[str, Any], prefixes: tuple[str, ...]) -> None:
    """Drop source tensors of a built component: with a dtype cast (fp16 file, fp32 CPU) this keeps the
    peak near one copy of the model instead of source + cast copy."""
    for key in [k for k in sd if k.startswith(prefixes)]:
        del sd[key]


def _check_vocab(components: dict[str, Any], path: Path) -> None:
    for te_name, tok_name in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")):
        te, tok = components.get(te_name), components.get(tok_name)
        if te is None or tok is None:
            continue
        rows = te.config.vocab_size
        if rows < len(tok):
            raise CheckpointLoadError(path, f"{te_name} has {rows} token embeddings but the CLIP tokenizer "
                                            f"needs {len(tok)}")


def load_checkpoint(
    info_or_path: Any, policy: DevicePolicy, vae_file: Path | None = None, progress: Progress | None = None,
) -> LoadedModel:
    """Read once, identify (sidecar yaml first), load. The usual way in."""
    info, path = _path_of(info_or_path)
    t0 = time.perf_counter()
    if path.suffix.lower() == ".safetensors":
        # header only: a LoRA or a Flux file is refused before gigabytes are read
        spec = detection.identify(path, sidecar_yaml_for(info_or_path))
        if not spec.supported:
            raise UnsupportedCheckpointError(path, spec)
        t1 = time.perf_counter()
        if progress:
            progress(f"Reading {path.name}")
        # memory-mapped where we can tell mapped tensors apart: copied off the file after "ready" (materialise.py)
        sd = load_state_dict_file(path, in_memory=_keeps_file_dtype(policy) and not CAN_MAP)
    else:
        if progress:
            progress(f"Reading {path.name}")
        sd = load_state_dict_file(path)
        t1 = time.perf_counter()
        spec = detection.identify(path, sidecar_yaml_for(info_or_path), state_dict=sd)
        if not spec.supported:
            raise UnsupportedCheckpointError(path, spec)
    t2 = time.perf_counter()
    model = load_model(info_or_path, spec, policy, vae_file, progress, state_dict=sd)
    read, detect = (t2 - t1, t1 - t0) if path.suffix.lower() == ".safetensors" else (t1 - t0, t2 - t1)
    model.timings = {"detect": round(detect, 3), "read": round(read, 3), **model.timings}
    model.load_seconds = round(time.perf_counter() - t0, 3)
    return model


def replace_vae(model: LoadedModel, vae_file: Path | None, progress: Progress | None = None) -> LoadedModel:
    """Swap the VAE of a loaded model in place (None: back to the checkpoint's own)."""
    if model.pipe is None:
        raise RuntimeError(f"{model.title} is unloaded")
    current = model.components["vae"]
    if vae_file is None:
        if model.vae_file is None:
            return model
        if model.baked_vae is None:
            raise CheckpointLoadError(model.path, "the checkpoint's own VAE is not in memory; reload the checkpoint")
        new, model.baked_vae = model.baked_vae, None
    else:
        new = load_vae(Path(vae_file), model.spec, model.policy, progress)
        if model.vae_file is None:
            model.baked_vae = current  # keep the checkpoint's VAE for switching back
    model.components["vae"] = new
    model.pipe.register_modules(vae=new)
    if model.offload is not None:
        model.offload.replace("vae", new)
    model.vae_file = Path(vae_file) if vae_file else None
    torch_gc(model.policy.device)
    return model


def make_load_fn(policy: DevicePolicy, progress: Progress | None = None) -> Callable[[Any, Path | None], LoadedModel]:
    """The ``load_fn`` for ``ModelManager``: identify + load with this device policy."""
    return lambda info, vae_file: load_checkpoint(info, policy, vae_file, progress)


# ---------------------------------------------------------------- manager


def _key(info_or_path: Any) -> str:
    _info, path = _path_of(info_or_path)
    return str(path.resolve())


class ModelManager:
    """The current model plus an LRU of up to ``limit`` loaded ones (A1111's sd_checkpoints_limit).

    Thread-safe; one load at a time. A failed load or switch leaves the previous model current.
    ``free_before_load``: when the cache is full, unload the least recently used model *before*
    loading (peak memory of one model rather than two); if the load then fails, the previous current
    model is loaded again so it stays current, and the original error propagates.
    """

    def __init__(
        self,
        load_fn: Callable[[Any, Path | None], LoadedModel],
        limit: int = 1,
        *,
        vae_fn: Callable[[LoadedModel, Path | None], LoadedModel] | None = replace_vae,
        free_before_load: bool = False,
    ):
        self._load_fn = load_fn
        self._vae_fn = vae_fn
        self._limit = max(1, int(limit))
        self.free_before_load = free_before_load
        self._models: OrderedDict[str, LoadedModel] = OrderedDict()  # LRU order, most recent last
        self._current: str | None = None
        self._lock = threading.RLock()
        self._listeners: list[Callable[[LoadedModel], None]] = []
        # Snapshots for readers: a load holds the lock for seconds, and the UI/API must not wait on it.
        self._snapshot: tuple[LoadedModel | None, tuple[LoadedModel, ...]] = (None, ())

    # -- state
    @property
    def current(self) -> LoadedModel | None:
        """The current model, without waiting for a load in progress."""
        return self._snapshot[0]

    @property
    def loaded(self) -> list[LoadedModel]:
        """Loaded models, least recently used first."""
        return list(self._snapshot[1])

    def _publish(self) -> None:
        current = self._models.get(self._current) if self._current else None
        self._snapshot = (current, tuple(self._models.values()))

    @property
    def limit(self) -> int:
        return self._limit

    def set_limit(self, limit: int) -> None:
        with self._lock:
            self._limit = max(1, int(limit))
            self._evict(keep=self._current)
            self._publish()

    def add_loaded_listener(self, fn: Callable[[LoadedModel], None]) -> None:
        with self._lock:
            self._listeners.append(fn)

    def remove_loaded_listener(self, fn: Callable[[LoadedModel], None]) -> None:
        with self._lock:
            if fn in self._listeners:
                self._listeners.remove(fn)

    # -- operations
    def get(self, info: Any, vae_file: Path | None = None) -> LoadedModel:
        """The model for ``info`` with ``vae_file``, loading it if needed; it becomes current."""
        return self.switch(info, vae_file)

    def switch(self, info: Any, vae_file: Path | None = None) -> LoadedModel:
        """Make ``info`` (with ``vae_file``) the current model. On failure the previous one stays current."""
        key = _key(info)
        vae = Path(vae_file) if vae_file else None
        with self._lock:
            try:
                model = self._models.get(key)
                if model is not None and model.is_loaded:
                    if model.vae_file != vae:
                        if self._vae_fn is None:
                            return self._load_new(key, info, vae, replacing=model)
                        model = self._vae_fn(model, vae)
                    self._models.move_to_end(key)
                    self._current = key
                    return model
                return self._load_new(key, info, vae)
            finally:
                self._publish()

    def _load_new(self, key: str, info: Any, vae: Path | None, replacing: LoadedModel | None = None) -> LoadedModel:
        previous_key = self._current
        previous = self._models.get(previous_key) if previous_key else None
        freed_previous = None
        if replacing is not None:
            self._models.pop(key, None)
            if replacing is previous:
                freed_previous = replacing
            replacing.unload()
        if self.free_before_load:
            while len(self._models) >= self._limit:
                old_key, old = self._models.popitem(last=False)
                if old_key == previous_key:
                    freed_previous = old
                old.unload()
        try:
            model = self._load_fn(info, vae)
        except BaseException as exc:
            if freed_previous is not None:
                self._restore(previous_key, freed_previous, exc)
            elif previous_key not in self._models:
                self._current = None
            raise
        self._models[key] = model
        self._models.move_to_end(key)
        self._current = key
        self._evict(keep=key)
        self._publish()
        self._fire(model)
        return model

    def _restore(self, key: str | None, old: LoadedModel, exc: BaseException) -> None:
        """After a failed load that had to free the previous model: load it back."""
        try:
            back = self._load_fn(old.info if old.info is not None else old.path, old.vae_file)
        except Exception as again:  # pragma: no cover - both failing is reported, not hidden
            log.error("could not reload %s after a failed switch: %s", old.title, again)
            self._current = None
            return
        assert key is not None
        self._models[key] = back
        self._current = key
        self._publish()
        log.warning("switch failed (%s); reloaded %s", exc, back.title)
        self._fire(back)

    def _evict(self, keep: str | None) -> None:
        while len(self._models) > self._limit:
            victim = next((k for k in self._models if k != keep), None)
            if victim is None:
                break
            self._models.pop(victim).unload()

    def _fire(self, model: LoadedModel) -> None:
        for fn in list(self._listeners):
            try:
                fn(model)
            except Exception:  # a broken extension callback must not undo a good load
                log.exception("model-loaded listener %r failed", fn)

    def unload(self, info: Any) -> None:
        with self._lock:
            key = _key(info)
            model = self._models.pop(key, None)
            if self._current == key:
                self._current = None
            self._publish()
            if model is not None:
                model.unload()

    def unload_all(self) -> None:
        with self._lock:
            models = list(self._models.values())
            self._models.clear()
            self._current = None
            self._publish()
            for model in models:
                model.unload()

"""Low-RAM CPU mode: weights stay in the file's fp16/bf16, each layer is upcast only while it runs.

An SD1.5 file holds fp16 weights (2.1 GB); converting them to fp32 for the CPU doubles that. Here the
Conv/Linear/Embedding layers keep their storage dtype and diffusers' layerwise casting hooks
(``diffusers.hooks.apply_layerwise_casting``) cast one layer to fp32 for its forward and back after.
What those hooks do not cover (norms, stray parameters; a few MB) is converted to fp32 once, since
mixing an fp16 GroupNorm weight with fp32 activations fails on the CPU.

Every ``module.weight`` stays a real parameter in the storage dtype, readable and writable between
forwards, so LoRA weights merged in place land in it (at fp16 precision, as on an fp16 GPU).
"""
from __future__ import annotations

import threading
from typing import Any, Callable

import torch

from modules.models import materialise
from modules.models.libc import glibc_call

__all__ = ["storage_dtype_of", "apply_lowram_casting", "is_lowram"]

_HALF = (torch.float16, torch.bfloat16)


def storage_dtype_of(weights: dict[str, Any]) -> torch.dtype | None:
    """The half dtype most of these weights are stored in, or None (fp32 files gain nothing)."""
    counts: dict[torch.dtype, int] = {}
    for tensor in weights.values():
        if tensor.is_floating_point():
            counts[tensor.dtype] = counts.get(tensor.dtype, 0) + tensor.numel()
    if not counts:
        return None
    dtype = max(counts, key=counts.__getitem__)
    return dtype if dtype in _HALF else None


def apply_lowram_casting(model: torch.nn.Module, storage: torch.dtype, compute: torch.dtype) -> torch.nn.Module:
    """Hooks on every Conv/Linear/Embedding (kept in ``storage``); everything else to ``compute``.

    All the model's hooks upcast into one shared ``compute`` workspace, as large as the largest layer
    (about 60 MB for SD1.5's UNet): no allocation, page fault or free per layer call, and the fp32
    copy of a layer never outlives its call. The workspace is freed after each call of the model (or of
    the VAE's encoder/decoder), so an idle model holds none. An Embedding is never upcast: its fp16 rows
    are looked up and the result converted (the same numbers; CLIP's 49408-token table would be 152 MB
    in fp32). In the VAE, SiLU and the residual adds run in place (``_inplace_vae_silu``).
    """
    from diffusers.hooks import HookRegistry

    _tune_malloc_for_low_ram()
    torch.nn.Module.to(model, dtype=storage)  # plain Module.to: diffusers' override warns on casts
    workspace = _Workspace(compute, capacity=_largest_layer(model))
    for module in model.modules():
        if isinstance(module, _LAZY_LAYERS):
            registry = HookRegistry.check_if_exists_or_initialize(module)
            registry.register_hook(_StorageCastingHook(storage, compute, workspace), "layerwise_casting")
        else:
            _cast_own(module, compute)
    for top in (model, getattr(model, "encoder", None), getattr(model, "decoder", None)):
        if isinstance(top, torch.nn.Module):
            top.register_forward_hook(lambda *_: workspace.free(), always_call=True)
    _inplace_vae_silu(model)
    model._lowram_storage_dtype = storage  # noqa: SLF001 - read by is_lowram
    return model


def _largest_layer(model: torch.nn.Module) -> int:
    """Elements of the largest hooked layer's own floating tensors (what one upcast needs at most).
    Sizing the workspace to it at its first use of a call costs one allocation and one set of page
    faults per call, instead of one per growth as the layers get wider (the peak is the same)."""
    return max((sum(t.numel() for t in (*m.parameters(recurse=False), *m.buffers(recurse=False))
                    if t.is_floating_point())
                for m in model.modules() if isinstance(m, _LAZY_LAYERS) and not isinstance(m, torch.nn.Embedding)),
               default=0)


class _Workspace:
    """One flat ``dtype`` buffer that a layer's upcast weights are views of while it runs. Layers are
    leaves (never nested), so one buffer serves a whole model; a second thread running the same model
    at the same time finds it busy and falls back to a fresh copy."""

    def __init__(self, dtype: torch.dtype, capacity: int = 0):
        self.dtype = dtype
        self.buffer = torch.empty(0, dtype=dtype)
        self.lock = threading.Lock()
        self.capacity = capacity  # the largest layer's numel: the buffer is made that size at once, not grown

    def views(self, tensors: list[torch.Tensor]) -> list[torch.Tensor] | None:
        """Upcast copies of ``tensors`` inside the buffer (grown when needed), or None when busy."""
        if not self.lock.acquire(blocking=False):
            return None
        need = sum(t.numel() for t in tensors)
        if self.buffer.numel() < need:
            self.buffer = torch.empty(0, dtype=self.dtype)  # free the old one before the new one exists
            self.buffer = torch.empty(max(need, self.capacity), dtype=self.dtype)
        out, offset = [], 0
        for t in tensors:
            view = self.buffer[offset:offset + t.numel()].view(t.shape)
            view.copy_(t)
            out.append(view)
            offset += t.numel()
        return out

    def release(self) -> None:
        self.lock.release()

    def free(self) -> None:
        """Give the buffer back (between calls of the model; never while a layer is using it)."""
        if self.lock.acquire(blocking=False):
            self.buffer = torch.empty(0, dtype=self.dtype)
            self.lock.release()


def _storage_casting_hook_type():
    from diffusers.hooks.layerwise_casting import LayerwiseCastingHook

    class StorageCastingHook(LayerwiseCastingHook):
        """diffusers' layerwise casting hook (under its registry name, so ``ModelMixin.dtype`` reports
        the compute dtype), but the layer's tensors are upcast into the shared workspace and, after the
        call, point back at their stored half-precision data: one copy per call, nothing allocated."""

        def __init__(self, storage, compute, workspace: _Workspace):
            super().__init__(storage, compute, non_blocking=False)
            self.workspace = workspace
            self.stored: list = []
            self.in_workspace = False

        def pre_forward(self, module, *args, **kwargs):
            materialise.ensure(module)  # still memory-mapped: copy it into memory first (materialise.py)
            if isinstance(module, torch.nn.Embedding):  # rows are converted after the lookup instead
                return args, kwargs
            self.stored = [(t, t.data) for t in (*module.parameters(recurse=False), *module.buffers(recurse=False))
                           if t.is_floating_point()]
            views = self.workspace.views([data for _, data in self.stored])
            self.in_workspace = views is not None
            for (tensor, data), view in zip(self.stored, views or [None] * len(self.stored)):
                tensor.data = view if view is not None else data.to(self.compute_dtype)
            return args, kwargs

        def post_forward(self, module, output):
            if isinstance(module, torch.nn.Embedding):
                return output.to(self.compute_dtype)
            for tensor, data in self.stored:
                tensor.data = data
            self.stored = []
            if self.in_workspace:
                self.in_workspace = False
                self.workspace.release()
            return output
    return StorageCastingHook


def _StorageCastingHook(storage: torch.dtype, compute: torch.dtype, workspace: _Workspace):  # noqa: N802
    global _HOOK_TYPE
    if _HOOK_TYPE is None:
        _HOOK_TYPE = _storage_casting_hook_type()
    return _HOOK_TYPE(storage, compute, workspace)


_HOOK_TYPE = None


def _inplace_vae_silu(model: torch.nn.Module) -> None:
    """The VAE's SiLUs act on a fresh GroupNorm output nobody else holds (its resnets have no time
    embedding, the one input a resnet's SiLU could share): computing them in place is the same math
    and saves one full-resolution activation at the decode's peak (256 channels at 512x512: 268 MB)."""
    if not hasattr(model, "decoder") or not hasattr(model, "encoder"):
        return
    modules = [m for coder in (model.decoder, model.encoder) for m in coder.modules()]
    if any(getattr(m, "time_emb_proj", None) is not None for m in modules):
        return  # a resnet with a time embedding: leave this model alone
    for module in modules:
        if isinstance(module, torch.nn.SiLU):
            module.inplace = True
        elif _is_plain_resnet(module):
            module.forward = _lean_resnet_forward.__get__(module)


def _is_plain_resnet(module: torch.nn.Module) -> bool:
    from diffusers.models.resnet import ResnetBlock2D

    return (type(module) is ResnetBlock2D and module.upsample is None and module.downsample is None
            and module.time_emb_proj is None and module.time_embedding_norm in ("default", "group"))


def _lean_resnet_forward(self, input_tensor: torch.Tensor, temb: torch.Tensor | None = None, *args, **kwargs):
    """diffusers' ``ResnetBlock2D.forward`` for a VAE resnet (no time embedding, no resampling), with the
    residual added in place into the fresh conv output: ``(x + h) / s`` there allocates two more
    full-size tensors, the decode's peak at 512x512 (diffusers has no option for this)."""
    if temb is not None or args or kwargs:  # not how a VAE calls it: the library's own forward
        return type(self).forward(self, input_tensor, temb, *args, **kwargs)
    hidden = self.nonlinearity(self.norm1(input_tensor))
    hidden = self.conv1(hidden)
    hidden = self.nonlinearity(self.norm2(hidden))
    hidden = self.conv2(self.dropout(hidden))
    shortcut = self.conv_shortcut(input_tensor.contiguous()) if self.conv_shortcut is not None else input_tensor
    hidden.add_(shortcut)  # x + h and h + x are the same IEEE sum
    if self.output_scale_factor != 1.0:
        hidden.div_(self.output_scale_factor)
    return hidden


def _tune_malloc_for_low_ram() -> None:
    """glibc only (elsewhere nothing to do). Allocations up to 32 MB (the UNet's activations) are
    recycled inside the heap instead of being mapped fresh, page-faulted and zeroed on every call, and
    free memory at the heap's top is returned to the system from 1 MB on. Measured idle on the full
    SD1.5 layout at 512² (bench/memory.py lowram): with the former 1 MB mmap threshold a step took
    15.9 s (1.88 M page faults); with glibc's defaults 12.7 s but a 3.02 GB peak; with these two
    settings 12.0 s and 2.92 GB."""
    glibc_call("mallopt", -3, 32 << 20)  # M_MMAP_THRESHOLD (fixed: glibc's dynamic threshold stops moving)
    glibc_call("mallopt", -1, 1 << 20)   # M_TRIM_THRESHOLD


def is_lowram(model: Any) -> bool:
    return getattr(model, "_lowram_storage_dtype", None) is not None


def _has_casting_hook(module: torch.nn.Module) -> bool:
    registry = getattr(module, "_diffusers_hook", None)
    return registry is not None and registry.get_hook("layerwise_casting") is not None


_LAZY_LAYERS = (torch.nn.Conv2d, torch.nn.Linear, torch.nn.Embedding)


def apply_lazy_upcast(model: torch.nn.Module, compute: torch.dtype,
                      file_backed: Callable[[torch.Tensor], bool] = lambda _t: False) -> torch.nn.Module:
    """fp32 on the CPU from a half-precision file, without converting everything at load: each
    Conv/Linear/Embedding is converted for good on its first call (a one-time hook), the rest now.

    The model is ready as soon as it is built; the conversion is paid by the first image, layer by
    layer, never holding a second copy of the whole model. The first floating parameter is converted
    now, so ``model.dtype`` (diffusers and transformers read the first parameter) says ``compute``.
    ``file_backed``: tensors still memory-mapped, which get the hook too (copied off the file on first use).
    """
    first = next((p for p in model.parameters() if p.is_floating_point()), None)
    for module in model.modules():
        own = [t for t in (*module.parameters(recurse=False), *module.buffers(recurse=False))
               if (t.is_floating_point() and t.dtype != compute) or file_backed(t)]
        if not own:
            continue
        if isinstance(module, _LAZY_LAYERS) and not any(t is first for t in own):
            _upcast_on_first_call(module, compute)
        else:
            _cast_own(module, compute)
    return model


def _cast_own(module: torch.nn.Module, dtype: torch.dtype) -> None:
    for tensor in (*module.parameters(recurse=False), *module.buffers(recurse=False)):
        if tensor.is_floating_point() and tensor.dtype != dtype:
            tensor.data = tensor.data.to(dtype)


def _upcast_on_first_call(module: torch.nn.Module, dtype: torch.dtype) -> None:
    handle = None

    def hook(mod, _args):
        materialise.ensure(mod)  # under the background copy's lock (materialise.py)
        _cast_own(mod, dtype)
        mod.__dict__.pop(_UPCAST_HOOKED, None)
        handle.remove()
    handle = module.register_forward_pre_hook(hook)
    object.__setattr__(module, _UPCAST_HOOKED, True)


_UPCAST_HOOKED = "_webui_upcast_hooked"


def has_first_call_hook(module: torch.nn.Module) -> bool:
    """The module converts (or copies off the file) its own tensors on its next forward."""
    return _UPCAST_HOOKED in module.__dict__ or _has_casting_hook(module)

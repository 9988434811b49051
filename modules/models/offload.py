"""--medvram / --lowvram: weights live on the CPU and move to the GPU only while they run.

- medvram: one component at a time (text encoders, UNet, VAE) is resident on the execution device,
  as diffusers' model CPU offload does; using a component moves the previous one out.
- lowvram: the same for the text encoders and the VAE, and the UNet is streamed: each of its blocks
  is copied in just before it runs and dropped right after, as diffusers' sequential offload does.

Why our own forward hooks instead of ``enable_model_cpu_offload``/``enable_sequential_cpu_offload``:
our sampling loop calls the components directly rather than through the pipeline's ``__call__``, and
in any order (hires fix runs the VAE between two UNet passes; extensions may call anything), so
residency is decided per call, on the component that is actually called. And accelerate's sequential
offload turns every parameter into a meta tensor between calls, which would break code that reads or
writes weights in place (LoRA merging); here every parameter stays a real CPU tensor between calls.

The hooks are installed at load and removed at unload; they also run on the CPU (execution device =
CPU), where moving is free, which is how the tests drive them.
"""
from __future__ import annotations

import logging
import threading
from typing import Any, Callable, Iterable

import torch

__all__ = ["OffloadPlan", "install_offload", "pins_host_copies", "stream_units"]

log = logging.getLogger(__name__)

# The VAE is called through encode()/decode(), not forward(): its children are what run.
_VAE_PARTS = ("encoder", "decoder", "quant_conv", "post_quant_conv")
# lowvram: a UNet unit larger than this many parameters is split into its children
_STREAM_UNIT_PARAMS = 40_000_000


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True) if value.device != device else value
    if isinstance(value, (list, tuple)):
        return type(value)(_to_device(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    return value


def pins_host_copies(execution_device: torch.device | str) -> bool:
    """Whether lowvram keeps the streamed blocks' CPU copies in pinned (page-locked) memory: each block
    is copied to the GPU for every call, and from pinned memory that copy is an asynchronous DMA,
    about twice as fast as from pageable memory. Pinning needs a CUDA device (and is pointless
    without one: on the CPU the "copy" is the tensor itself)."""
    return torch.device(execution_device).type == "cuda" and torch.cuda.is_available()


def _pinned(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.pin_memory()


def stream_units(module: torch.nn.Module, max_params: int = _STREAM_UNIT_PARAMS) -> list[torch.nn.Module]:
    """The modules lowvram moves one at a time: the largest called submodules under ``max_params``
    parameters (a resnet, a transformer block...). A ModuleList is never a unit (it is not called)."""
    own = sum(p.numel() for p in module.parameters(recurse=False))
    total = sum(p.numel() for p in module.parameters())
    children = [c for c in module.children() if any(True for _ in c.parameters())]
    if total == 0:
        return []
    if (total <= max_params and not isinstance(module, torch.nn.ModuleList)) or not children or own:
        return [module]
    return [unit for child in children for unit in stream_units(child, max_params)]


class OffloadPlan:
    """Where each component of one loaded model is, and the hooks that move them.

    ``components``: name -> module. ``streamed``: names of components moved block by block (lowvram's
    UNet). ``resident`` is the one whole component on the execution device (None: all on the CPU).
    ``on_move`` (tests, logging) is called as (name, device) after each whole-component move.
    """

    stream_unit_params = _STREAM_UNIT_PARAMS

    def __init__(self, components: dict[str, torch.nn.Module], *, execution_device: torch.device,
                 offload_device: torch.device | str = "cpu", streamed: Iterable[str] = (),
                 on_move: Callable[[str, torch.device], None] | None = None, pin_memory: bool | None = None):
        self.components = dict(components)
        self.execution_device = torch.device(execution_device)
        self.offload_device = torch.device(offload_device)
        self.streamed = frozenset(streamed)
        self.resident: str | None = None
        self.on_move = on_move
        # lowvram's streamed blocks live in pinned host memory when the GPU can use it (None: decide)
        self.pin_memory = pins_host_copies(self.execution_device) if pin_memory is None else bool(pin_memory)
        self._lock = threading.RLock()
        self._handles: dict[str, list[Any]] = {}
        self.units: dict[str, list[torch.nn.Module]] = {}  # streamed component -> its units, in order

    # -- moving (overridable: the tests park offloaded weights on the meta device to prove placement)
    def load(self, module: torch.nn.Module) -> None:
        torch.nn.Module.to(module, self.execution_device)

    def offload(self, module: torch.nn.Module) -> None:
        torch.nn.Module.to(module, self.offload_device)

    def load_unit(self, unit: torch.nn.Module) -> dict[torch.Tensor, torch.Tensor]:
        """Copy a streamed unit's tensors in; returns {tensor: its CPU data} to put back afterwards."""
        homes = {}
        for tensor in _tensors(unit):
            homes[tensor] = tensor.data
            tensor.data = tensor.data.to(self.execution_device, non_blocking=True)
        return homes

    def offload_unit(self, unit: torch.nn.Module, homes: dict[torch.Tensor, torch.Tensor]) -> None:
        # weights do not change during a forward: point back at the CPU copy, no copy out
        for tensor, home in homes.items():
            tensor.data = home

    # -- residency
    def activate(self, name: str) -> None:
        """Make ``name`` the resident component: the previous one goes back to the offload device."""
        with self._lock:
            if self.resident == name:
                return
            if self.resident is not None:
                self._move_out(self.resident)
            self.resident = name
            if name not in self.streamed:
                self.load(self.components[name])
                self._moved(name, self.execution_device)

    def release(self) -> None:
        """Everything back to the offload device (end of a job, unload, out-of-memory recovery)."""
        with self._lock:
            if self.resident is not None:
                self._move_out(self.resident)
                self.resident = None

    def _move_out(self, name: str) -> None:
        if name not in self.streamed:
            self.offload(self.components[name])
            self._moved(name, self.offload_device)

    def _moved(self, name: str, device: torch.device) -> None:
        if self.on_move is not None:
            self.on_move(name, device)

    # -- hooks
    def install(self) -> "OffloadPlan":
        for name in self.components:
            self._hook(name)
        return self

    def replace(self, name: str, module: torch.nn.Module) -> None:
        """A component swapped in place (another VAE): hooks off the old one, onto the new one."""
        with self._lock:
            if self.resident == name:
                self.release()
            self._unhook(name)
            self.components[name] = module
            self._hook(name)

    def remove(self) -> None:
        """Take the hooks off; the weights stay on the offload device."""
        with self._lock:
            self.release()
            for name in list(self._handles):
                self._unhook(name)
            self.components.clear()

    def _hook(self, name: str) -> None:
        module = self.components[name]
        handles = self._handles.setdefault(name, [])
        for part in _called_parts(name, module):
            handles.append(part.register_forward_pre_hook(self._activation_hook(name), with_kwargs=True))
        if name in self.streamed:
            handles.extend(self._install_streaming(name, module))
        else:
            self.offload(module)

    def _unhook(self, name: str) -> None:
        for handle in self._handles.pop(name, []):
            handle.remove()
        self.units.pop(name, None)

    def _activation_hook(self, name: str):
        def hook(_module, args, kwargs):
            self.activate(name)
            return _to_device(args, self.execution_device), _to_device(kwargs, self.execution_device)
        return hook

    def _install_streaming(self, name: str, module: torch.nn.Module) -> list[Any]:
        torch.nn.Module.to(module, self.offload_device)
        if self.pin_memory and self.offload_device.type == "cpu":
            for tensor in _tensors(module):
                if not tensor.is_pinned():
                    tensor.data = _pinned(tensor.data)  # in place of the pageable copy: no second copy kept
        handles = []
        self.units[name] = stream_units(module, self.stream_unit_params)
        for unit in self.units[name]:
            homes: dict[str, dict] = {}

            def pre(mod, args, kwargs, _homes=homes):
                _homes["in"] = self.load_unit(mod)
                return _to_device(args, self.execution_device), _to_device(kwargs, self.execution_device)

            def post(mod, _args, output, _homes=homes):
                self.offload_unit(mod, _homes.pop("in", {}))
                return output

            self.offload_unit(unit, {})  # every unit starts out of the execution device
            handles.append(unit.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(unit.register_forward_hook(post, always_call=True))  # also after an error
        return handles


def _tensors(module: torch.nn.Module) -> list[torch.Tensor]:
    return [*module.parameters(), *module.buffers()]


def _called_parts(name: str, module: torch.nn.Module) -> list[torch.nn.Module]:
    if name == "vae" or name.startswith("vae"):
        parts = [getattr(module, part, None) for part in _VAE_PARTS]
        return [p for p in parts if isinstance(p, torch.nn.Module)]
    return [module]


def install_offload(components: dict[str, Any], mode: str, execution_device: torch.device) -> OffloadPlan | None:
    """Hooks for ``mode`` ("medvram"/"lowvram") on a loaded model's text encoders, UNet and VAE."""
    if mode not in ("medvram", "lowvram"):
        return None
    names = [n for n in ("text_encoder", "text_encoder_2", "unet", "vae")
             if isinstance(components.get(n), torch.nn.Module)]
    plan = OffloadPlan({n: components[n] for n in names}, execution_device=execution_device,
                     streamed=("unet",) if mode == "lowvram" else ())
    log.info("%s: %s on %s, the rest on the CPU until used", mode, "one component at a time"
             if mode == "medvram" else "UNet streamed block by block", execution_device)
    return plan.install()

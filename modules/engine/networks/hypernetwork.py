"""A1111 hypernetworks (``models/hypernetworks/*.pt``, ``<hypernet:name:multiplier>``).

A1111's file: a pickled dict whose int keys are context widths (768, 320, 640, 1280...), each holding
two state dicts, the small MLPs that transform an attention layer's key and value input; beside them
``layer_structure`` (widths as multiples, e.g. [1, 2, 1]), ``activation_func``, ``is_layer_norm``,
``activate_output``, ``use_dropout``/``last_layer_dropout``/``dropout_structure``. The MLP is
``x + mlp(x) * multiplier``. Dropout layers are built only so the state dict's indices line up; at
inference they do nothing. No library reads this format, so the module layout is rebuilt here.

They are applied as A1111 applies them: to the key and value inputs of every UNet attention layer whose
context width has an MLP (cross-attention and, for widths such as 320, self-attention), through forward
pre-hooks on ``to_k``/``to_v``. Unlike LoRA this costs a little on every step, by its nature: the MLPs
run on the attention inputs.
"""
from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from modules.models import weights_io
from modules.models.hypernetwork_files import HypernetworkFiles
from modules.models.network_files import NetworkFile

log = logging.getLogger(__name__)

_HOOKS_ATTR = "_webui_hypernetwork_hooks"


def _activations() -> dict[str, type[torch.nn.Module]]:
    out: dict[str, type[torch.nn.Module]] = {"linear": torch.nn.Identity, "relu": torch.nn.ReLU,
                                              "leakyrelu": torch.nn.LeakyReLU, "elu": torch.nn.ELU,
                                              "swish": torch.nn.Hardswish, "tanh": torch.nn.Tanh,
                                              "sigmoid": torch.nn.Sigmoid}
    for name, cls in inspect.getmembers(torch.nn.modules.activation, inspect.isclass):
        if cls.__module__ == "torch.nn.modules.activation":
            out.setdefault(name.lower(), cls)
    return out


def dropout_structure(data: dict) -> list[float]:
    """A1111's rule for files saved before ``dropout_structure`` existed."""
    layers = list(data.get("layer_structure") or [1, 2, 1])
    if data.get("dropout_structure"):
        return list(data["dropout_structure"])
    if not data.get("use_dropout"):
        return [0.0] * len(layers)
    return [0.0] + [0.3] * (len(layers) - 3) + [0.3 if data.get("last_layer_dropout") else 0.0] + [0.0]


class HypernetworkModule(torch.nn.Module):
    def __init__(self, dim: int, data: dict, state_dict: dict[str, torch.Tensor]):
        super().__init__()
        layers = [float(x) for x in (data.get("layer_structure") or [1, 2, 1])]
        if len(layers) < 2 or layers[0] != 1 or layers[-1] != 1:
            raise ValueError(f"layer_structure {layers} must start and end with 1")
        activation = data.get("activation_func") or "linear"
        table = _activations()
        if activation not in table:
            raise ValueError(f"unknown activation function {activation!r}")
        dropouts = dropout_structure(data)
        modules: list[torch.nn.Module] = []
        for i in range(len(layers) - 1):
            modules.append(torch.nn.Linear(int(dim * layers[i]), int(dim * layers[i + 1])))
            last = i >= len(layers) - 2
            if activation != "linear" and not (last and not data.get("activate_output", True)):
                modules.append(table[activation]())
            if data.get("is_layer_norm"):
                modules.append(torch.nn.LayerNorm(int(dim * layers[i + 1])))
            if i + 1 < len(dropouts) and dropouts[i + 1] > 0:
                modules.append(torch.nn.Dropout(p=float(dropouts[i + 1])))
        self.linear = torch.nn.Sequential(*modules)
        self.load_state_dict(_fix_old_keys(state_dict))
        self.multiplier = 1.0
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.linear(x) * self.multiplier


def _fix_old_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    renames = {"linear1.": "linear.0.", "linear2.": "linear.1."}   # the oldest files' names
    out = {}
    for key, value in state_dict.items():
        for old, new in renames.items():
            if key.startswith(old):
                key = new + key[len(old):]
        out[key] = value
    return out


@dataclass
class Hypernetwork:
    name: str
    layers: dict[int, tuple[HypernetworkModule, HypernetworkModule]]

    def set_multiplier(self, value: float) -> None:
        for pair in self.layers.values():
            for module in pair:
                module.multiplier = value


def load_hypernetwork(path: Path) -> Hypernetwork:
    data = weights_io.load_pickled_object(path)
    if not isinstance(data, dict):
        raise weights_io.CheckpointLoadError(path, f"it holds a {type(data).__name__}, not a hypernetwork")
    layers = {}
    try:
        for size, pair in data.items():
            if isinstance(size, int):
                if not isinstance(pair, (list, tuple)) or len(pair) != 2:
                    raise ValueError(f"width {size}: expected two state dicts (key, value)")
                layers[size] = (HypernetworkModule(size, data, dict(pair[0])), HypernetworkModule(size, data, dict(pair[1])))
    except (ValueError, RuntimeError, TypeError) as exc:
        raise weights_io.CheckpointLoadError(path, f"not an A1111 hypernetwork: {exc}") from exc
    if not layers:
        raise weights_io.CheckpointLoadError(path, "no hypernetwork layers (int width keys) in the file")
    return Hypernetwork(path.stem, layers)


class Hypernetworks(HypernetworkFiles):
    """``models/hypernetworks``: listing (HypernetworkFiles), loading, and hooking into a model's attention."""

    def __init__(self, roots: list[Path]):
        super().__init__(roots)
        self._loaded: dict[tuple, Hypernetwork] = {}

    def _load(self, file: NetworkFile) -> Hypernetwork:
        st = file.path.stat()
        key = (str(file.path), st.st_mtime_ns, st.st_size)
        if key not in self._loaded:
            self._loaded = {key: load_hypernetwork(file.path), **{k: v for k, v in list(self._loaded.items())[-3:]}}
        return self._loaded[key]

    def activate(self, model: Any, calls: list, out: Any) -> None:
        """Hook the named hypernetworks (none: remove the hooks) into `model`'s UNet attention."""
        chosen: list[Hypernetwork] = []
        for call in calls:
            name = call.items[0] if call.items else ""
            try:
                multiplier = float(call.items[1]) if len(call.items) > 1 else 1.0
            except ValueError:
                _warn(out, f"<hypernet:{':'.join(call.items)}>: bad multiplier; ignored")
                continue
            file = self.find(name)
            if file is None:
                _warn(out, f"Hypernetwork not found: {name} (looked in {', '.join(map(str, self.roots))})")
                continue
            try:
                network = self._load(file)
            except (weights_io.CheckpointLoadError, OSError) as exc:
                _warn(out, f"Hypernetwork {name} could not be loaded: {exc}")
                continue
            network.set_multiplier(multiplier)
            chosen.append(network)
        install(model.pipe.unet, chosen, out)


def _warn(out: Any, message: str) -> None:
    log.warning("%s", message)
    if message not in out.warnings:
        out.warnings.append(message)


def install(unet: torch.nn.Module, networks: list[Hypernetwork], out: Any = None) -> int:
    """Replace the hooks on `unet`'s attention layers by ones for `networks`; the number of layers hooked."""
    for handle in getattr(unet, _HOOKS_ATTR, []):
        handle.remove()
    handles = []
    if networks:
        param = next(unet.parameters())
        for network in networks:
            for pair in network.layers.values():
                for module in pair:
                    module.to(device=param.device, dtype=param.dtype)
        for module in unet.modules():
            if hasattr(module, "to_k") and hasattr(module, "to_v") and isinstance(module.to_k, torch.nn.Linear):
                handles.append(module.to_k.register_forward_pre_hook(_hook(networks, 0)))
                handles.append(module.to_v.register_forward_pre_hook(_hook(networks, 1)))
    object.__setattr__(unet, _HOOKS_ATTR, handles)
    if networks and not handles and out is not None:
        _warn(out, "Hypernetworks: the model has no attention layers to apply them to")
    return len(handles) // 2


def _hook(networks: list[Hypernetwork], which: int):
    def pre_hook(module: torch.nn.Module, args: tuple) -> tuple:
        context = args[0]
        for network in networks:
            pair = network.layers.get(context.shape[-1])
            if pair is not None:
                context = pair[which](context)
        return (context, *args[1:])
    return pre_hook

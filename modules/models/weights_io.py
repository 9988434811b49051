"""Load checkpoint weights without ever running code from the file.

``.ckpt`` files are Python pickles, and a pickle can name any importable callable (``os.system``)
and call it while loading. We therefore:

1. try ``torch.load(weights_only=True)``, PyTorch's own restricted loader;
2. if that refuses the file (old Lightning checkpoints pickle callback objects, numpy scalars,
   argparse/omegaconf hyper-parameters), retry with our own restricted unpickler. It admits an
   explicit allowlist of tensor/storage rebuilders, plain containers and numpy scalar/array
   reconstruction, and swaps objects from a few known data-only libraries (Lightning, argparse,
   omegaconf, typing) for inert placeholders that are never imported. Anything else raises
   ``UnsafeCheckpointError`` at the moment the global is named, before it could be called.

``.safetensors`` files hold no code and go straight to the safetensors reader.
"""

from __future__ import annotations

import _compat_pickle
import functools
import io
import json
import logging
import os
import pickle
import types
from pathlib import Path
from typing import Any, Callable

import torch

__all__ = [
    "CheckpointLoadError", "UnsafeCheckpointError", "InertPickledObject", "load_ckpt_state_dict",
    "load_state_dict_file", "read_safetensors_header", "read_safetensors_metadata",
    "PICKLE_EXTENSIONS", "SAFETENSORS_EXTENSIONS",
]

log = logging.getLogger(__name__)

PICKLE_EXTENSIONS = (".ckpt", ".pt", ".pth", ".bin")
SAFETENSORS_EXTENSIONS = (".safetensors",)
# The safetensors format itself caps the header at 100 MB.
MAX_SAFETENSORS_HEADER = 100_000_000


class CheckpointLoadError(Exception):
    """A model file could not be read: missing, truncated, corrupt, or not a state dict."""

    def __init__(self, path: str | os.PathLike[str], cause: BaseException | str) -> None:
        self.path = Path(path)
        self.cause = cause
        detail = cause if isinstance(cause, str) else f"{type(cause).__name__}: {cause}"
        super().__init__(f"Cannot load {self.path}: {detail}")


class UnsafeCheckpointError(CheckpointLoadError):
    """The pickle references a Python global that could run code. Nothing was executed."""

    def __init__(self, path: str | os.PathLike[str], global_name: str) -> None:
        self.global_name = global_name
        super().__init__(path, (
            f"it references the Python global '{global_name}', which a checkpoint has no reason "
            "to contain and which could run code. Loading was refused before anything from the "
            "file was executed. Only use this file if you trust its source, and prefer a "
            ".safetensors version of the model."))


class InertPickledObject:
    """Stand-in for a pickled Lightning/argparse/omegaconf object: accepts and discards everything.

    Subclasses are created per referenced global so distinct classes stay distinct dict keys
    (Lightning stores callback state keyed by the callback class).
    """

    original: str = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> "InertPickledObject":
        return object.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass

    def __setitem__(self, key: Any, value: Any) -> None:
        pass

    def append(self, value: Any) -> None:
        pass

    def extend(self, values: Any) -> None:
        pass

    def __repr__(self) -> str:
        return f"<inert {self.original}>"


# Modules whose pickled objects are data-only containers in training checkpoints. Their real
# classes are never imported; each referenced name becomes an InertPickledObject subclass.
_INERT_MODULE_ROOTS = ("pytorch_lightning", "lightning", "lightning_fabric", "omegaconf", "typing")
_INERT_GLOBALS = {"argparse.Namespace"}

_TENSOR_REBUILDERS = (
    "_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_tensor_v3", "_rebuild_parameter",
    "_rebuild_parameter_with_state", "_rebuild_meta_tensor_no_storage",
    "_rebuild_device_tensor_from_numpy", "_rebuild_device_tensor_from_cpu_tensor",
)


def _is_inert(module: str, name: str) -> bool:
    root = module.split(".", 1)[0]
    return root in _INERT_MODULE_ROOTS or f"{module}.{name}" in _INERT_GLOBALS


@functools.lru_cache(maxsize=1)
def _static_allowlist() -> dict[str, Any]:
    """``module.name`` -> object for every global a weights checkpoint legitimately needs."""
    allowed: dict[str, Any] = {}
    for obj in (dict, list, tuple, set, frozenset, int, float, complex, bool, str, bytes,
                bytearray, slice, range, object):
        allowed[f"builtins.{obj.__name__}"] = obj
    import collections
    for obj in (collections.OrderedDict, collections.defaultdict, collections.Counter):
        allowed[f"collections.{obj.__name__}"] = obj

    for fname in _TENSOR_REBUILDERS:
        fn = getattr(torch._utils, fname, None)
        if fn is not None:
            allowed[f"torch._utils.{fname}"] = fn
    allowed["torch.Size"] = torch.Size
    allowed["torch.device"] = torch.device
    allowed["torch.Tensor"] = torch.Tensor
    allowed["torch._tensor.Tensor"] = torch.Tensor
    allowed["torch.nn.parameter.Parameter"] = torch.nn.Parameter
    allowed["torch.serialization._get_layout"] = torch.serialization._get_layout
    allowed["torch.storage.UntypedStorage"] = torch.storage.UntypedStorage
    allowed["torch.storage.TypedStorage"] = torch.storage.TypedStorage
    # dtypes, layouts and memory formats pickle as e.g. "torch.float16"; collect them by value
    # instead of getattr(torch, <name from the file>), which could trigger lazy submodule imports.
    for value in list(vars(torch).values()):
        if isinstance(value, (torch.dtype, torch.layout, torch.memory_format)):
            allowed[str(value)] = value

    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy ships with torch wheels
        return allowed
    core = getattr(np, "_core", None) or np.core
    multiarray = core.multiarray
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[f"{mod}.scalar"] = multiarray.scalar
        allowed[f"{mod}._reconstruct"] = multiarray._reconstruct
    allowed["numpy.ndarray"] = np.ndarray
    allowed["numpy.dtype"] = np.dtype
    return allowed


def _buildable_types() -> tuple[type, ...]:
    # BUILD (__setstate__ / attribute assignment) is allowed only on these instances. Without this
    # check a pickle could BUILD onto an allowlisted function or class, e.g. rewrite the defaults
    # of torch._utils._rebuild_tensor_v2 or patch torch.Tensor for the rest of the process.
    try:
        import numpy as np
        return (InertPickledObject, np.ndarray, np.dtype)
    except ImportError:  # pragma: no cover
        return (InertPickledObject,)


class _Policy:
    """Resolves pickle globals for one file; errors name that file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.allowed = _static_allowlist()
        self.inert: dict[str, type[InertPickledObject]] = {}
        self.buildable = _buildable_types()
        self.wrappers: dict[str, Callable[..., Any]] = {
            "_codecs.encode": self._latin1_encode,
            "copyreg._reconstructor": self._reconstructor,
            "torch._tensor._rebuild_from_type_v2": self._rebuild_from_type_v2,
        }

    def find_class(self, module: str, name: str) -> Any:
        if not isinstance(module, str) or not isinstance(name, str):
            raise UnsafeCheckpointError(self.path, f"{module!r}.{name!r}")
        # Python 2 era names (protocol < 3): pure table lookups, resolved through the same allowlist.
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        qualified = f"{module}.{name}"
        if qualified in self.wrappers:
            return self.wrappers[qualified]
        if qualified in self.allowed:
            return self.allowed[qualified]
        if _is_inert(module, name) and "." not in name:
            cls = self.inert.get(qualified)
            if cls is None:
                cls = type(name, (InertPickledObject,), {"original": qualified, "__module__": __name__})
                self.inert[qualified] = cls
            return cls
        raise UnsafeCheckpointError(self.path, qualified)

    def check_build(self, inst: Any) -> None:
        if not isinstance(inst, self.buildable) or isinstance(inst, type):
            raise UnsafeCheckpointError(self.path, f"BUILD on {type(inst).__module__}.{type(inst).__qualname__}")

    def _latin1_encode(self, text: Any, encoding: Any = "utf-8", errors: Any = "strict") -> bytes:
        # Protocol 2 stores bytes as _codecs.encode(str, "latin1"); no other codec is needed, and
        # arbitrary codec names would make the codec registry import modules.
        if (not isinstance(text, str) or not isinstance(encoding, str)
                or encoding.lower().replace("_", "-") not in ("latin1", "latin-1", "iso-8859-1")):
            raise UnsafeCheckpointError(self.path, f"_codecs.encode(..., {encoding!r})")
        return text.encode("latin-1")

    def _reconstructor(self, cls: Any, base: Any, state: Any) -> Any:
        # Protocol 0/1 object pickles; only ever meaningful here for placeholder objects.
        if isinstance(cls, type) and issubclass(cls, InertPickledObject):
            return cls()
        raise UnsafeCheckpointError(self.path, f"copyreg._reconstructor({getattr(cls, '__qualname__', cls)!r})")

    def _rebuild_from_type_v2(self, func: Any, new_type: Any, args: Any, state: Any) -> Any:
        rebuilders = {self.allowed.get(f"torch._utils.{n}") for n in _TENSOR_REBUILDERS} - {None}
        if func not in rebuilders or new_type not in (torch.Tensor, torch.nn.Parameter):
            raise UnsafeCheckpointError(self.path, f"torch._tensor._rebuild_from_type_v2({func!r}, {new_type!r})")
        return torch._tensor._rebuild_from_type_v2(func, new_type, args, state)


_BUILD = pickle.BUILD[0]


def _restricted_pickle_module(path: Path) -> types.ModuleType:
    """A module-like object for ``torch.load(pickle_module=...)`` bound to one file's policy.

    Built on the pure-Python unpickler because its opcode table can be overridden, which is how
    BUILD is restricted; checkpoint pickles are small (tensor bytes live outside the pickle).
    """
    policy = _Policy(path)

    class Unpickler(pickle._Unpickler):  # type: ignore[name-defined,misc]
        dispatch = dict(pickle._Unpickler.dispatch)  # type: ignore[attr-defined]

        def find_class(self, module: str, name: str) -> Any:
            return policy.find_class(module, name)

        def _restricted_build(self) -> None:
            policy.check_build(self.stack[-2])
            pickle._Unpickler.load_build(self)  # type: ignore[attr-defined]

        dispatch[_BUILD] = _restricted_build

    def load(file: Any, **kwargs: Any) -> Any:
        return Unpickler(file, **kwargs).load()

    def loads(data: bytes, **kwargs: Any) -> Any:
        return Unpickler(io.BytesIO(data), **kwargs).load()

    module = types.ModuleType("modules.safe_pickle.restricted")
    module.Unpickler = Unpickler  # type: ignore[attr-defined]
    module.load = load  # type: ignore[attr-defined]
    module.loads = loads  # type: ignore[attr-defined]
    module.UnpicklingError = pickle.UnpicklingError  # type: ignore[attr-defined]
    return module


def _is_torchscript_archive(path: Path) -> bool:
    # torch.load hands TorchScript zips to torch.jit.load when weights_only=False; never let it.
    with open(path, "rb") as fh:
        if fh.read(4) != b"PK\x03\x04":
            return False
    reader = torch._C.PyTorchFileReader(str(path))
    return "constants.pkl" in reader.get_all_records()


def _restricted_torch_load(path: Path) -> Any:
    try:
        if _is_torchscript_archive(path):
            raise UnsafeCheckpointError(path, "TorchScript archive (contains code)")
        return torch.load(path, map_location="cpu", weights_only=False,
                          pickle_module=_restricted_pickle_module(path))
    except CheckpointLoadError:
        raise
    except Exception as exc:  # truncation, bad zip, a refused call's TypeError, ...
        raise CheckpointLoadError(path, exc) from exc


def _extract_state_dict(path: Path, obj: Any) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointLoadError(path, f"it contains a {type(obj).__name__}, not a dict of tensors")
    tensors = {k: (v.detach() if isinstance(v, torch.nn.Parameter) else v)
               for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointLoadError(path, "it contains no tensors")
    dropped = len(obj) - len(tensors)
    if dropped:
        log.debug("%s: ignored %d non-tensor entries", path, dropped)
    return tensors


def load_ckpt_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Tensors of a pickled checkpoint (``state_dict`` unwrapped), loaded on the CPU.

    Raises UnsafeCheckpointError for a pickle that names anything outside the allowlist and
    CheckpointLoadError for a missing, truncated or corrupt file.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointLoadError(path, "no such file")
    try:
        scripted = _is_torchscript_archive(path)
    except Exception:
        scripted = False  # unreadable archive: torch.load below reports it properly
    if scripted:
        raise UnsafeCheckpointError(path, "TorchScript archive (contains code)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as first:
        # Typically "Unsupported global" for Lightning-era files; corrupt files fail both ways
        # and the restricted attempt reports the error.
        log.info("%s: torch weights_only load failed (%s); retrying with the restricted unpickler",
                 path, str(first).strip().splitlines()[0][:200] if str(first).strip() else type(first).__name__)
        obj = _restricted_torch_load(path)
    return _extract_state_dict(path, obj)


def _read_safetensors_header_json(path: Path) -> dict[str, Any]:
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            prefix = fh.read(8)
            if len(prefix) < 8:
                raise CheckpointLoadError(path, f"file is only {size} bytes; not a safetensors file")
            header_len = int.from_bytes(prefix, "little")
            if header_len > MAX_SAFETENSORS_HEADER:
                raise CheckpointLoadError(path, f"header length {header_len} is implausible; not a safetensors file")
            if header_len > size - 8:
                raise CheckpointLoadError(path, f"header says {header_len} bytes but only {size - 8} follow: "
                                                "the file is truncated (incomplete download?) or not safetensors")
            raw = fh.read(header_len)
    except OSError as exc:
        raise CheckpointLoadError(path, exc) from exc
    try:
        header = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointLoadError(path, f"header is not valid JSON ({exc}); not a safetensors file") from exc
    if not isinstance(header, dict):
        raise CheckpointLoadError(path, "header is not a JSON object; not a safetensors file")

    data_size = size - 8 - header_len
    needed = 0
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        try:
            needed = max(needed, int(entry["data_offsets"][1]))
        except (KeyError, TypeError, IndexError, ValueError) as exc:
            raise CheckpointLoadError(path, f"malformed header entry for {key!r}") from exc
    if needed > data_size:
        raise CheckpointLoadError(path, f"tensor data needs {needed} bytes but the file has {data_size}: "
                                        "the file is truncated (incomplete download?)")
    return header


def read_safetensors_header(path: str | os.PathLike[str]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``{tensor name: (dtype, shape)}`` from the JSON header alone; weights are not read."""
    header = _read_safetensors_header_json(Path(path))
    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        try:
            out[key] = (str(entry["dtype"]), tuple(int(d) for d in entry["shape"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointLoadError(path, f"malformed header entry for {key!r}") from exc
    return out


def read_safetensors_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The free-form ``__metadata__`` string map (training info, LoRA tags); empty if absent."""
    meta = _read_safetensors_header_json(Path(path)).get("__metadata__") or {}
    return {str(k): str(v) for k, v in meta.items()} if isinstance(meta, dict) else {}


def load_state_dict_file(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Load any supported weights file to a CPU state dict, dispatching on the extension."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_EXTENSIONS:
        if not path.is_file():
            raise CheckpointLoadError(path, "no such file")
        _read_safetensors_header_json(path)  # clear message for truncation before the real read
        import safetensors.torch
        try:
            return safetensors.torch.load_file(str(path), device="cpu")
        except Exception as exc:
            raise CheckpointLoadError(path, exc) from exc
    if suffix in PICKLE_EXTENSIONS:
        return load_ckpt_state_dict(path)
    raise CheckpointLoadError(path, f"unsupported file type {suffix or '(no extension)'}; "
                                    f"expected one of {', '.join(SAFETENSORS_EXTENSIONS + PICKLE_EXTENSIONS)}")

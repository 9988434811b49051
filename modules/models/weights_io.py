"""Load checkpoint weights without ever running code from the file.

``.safetensors`` files hold no code and go straight to the safetensors reader.

``.ckpt``/``.pt``/``.pth``/``.bin`` files are Python pickles, and a pickle can name any importable
callable (``os.system``) and call it while loading. They are read by one call only:
``torch.load(path, map_location="cpu", weights_only=True, mmap=False)``, PyTorch's own restricted
unpickler, which knows tensors, storages, dtypes and plain containers and refuses every other global,
opcode and object construction. There is no second attempt with another unpickler, ever, and the
weights-only restriction is never turned off.

For the duration of that call (``torch.serialization.safe_globals``, under a lock) a few more names
are allowed, because real A1111-era checkpoints carry them beside the weights. None of them is the
real class: each name maps to a stand-in defined here (the libraries are never imported):

* Lightning's ``ModelCheckpoint`` callback and ``AttributeDict`` hyper-parameters, ``argparse.Namespace``,
  omegaconf's containers, nodes and metadata, and ``typing.Any``: ``PickledPlaceholder`` subclasses,
  plain holders that store their pickled state untouched (``AttributeDict`` and
  ``collections.defaultdict`` become plain dicts, ``dict``/``list``/``int``/``float``/``str``/``bool``
  stay the builtin types omegaconf metadata names);
* ``numpy.dtype`` and ``numpy[._]core.multiarray.scalar``: a dtype *description* and a builder that
  makes a numpy scalar only for a plain numeric dtype whose pickled state is exactly numpy's default,
  from exactly ``itemsize`` bytes. numpy's own ``dtype.__setstate__`` accepts flags from the file
  (forged flags turn raw bytes into object pointers), so it is never called. numpy arrays
  (``_reconstruct``, ``ndarray``) are not accepted at all.

What torch refuses stays refused: unknown globals, protocol 3+ opcodes (``NEWOBJ_EX`` with keyword
arguments, ``STACK_GLOBAL``, ``FRAME``...), TorchScript archives, and the legacy ``.tar`` format
(refused before any member is extracted, so symlink members are never followed). Such a file raises
``UnsafeCheckpointError`` naming the file and what was refused, with the advice to convert it to
``.safetensors``.

``mmap=False``: the loader assigns the loaded tensors to the model without copying them; memory-mapped
tensors would keep the model backed by the file, and a file truncated in place while loaded would then
kill the process (SIGBUS) on the next access.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import pickletools
import re
import threading
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "CheckpointLoadError", "UnsafeCheckpointError", "PickledPlaceholder", "NumpyDtypeDescription",
    "load_ckpt_state_dict", "load_state_dict_file", "load_pickled_object", "read_safetensors_header", "read_safetensors_metadata",
    "extra_safe_globals", "PICKLE_EXTENSIONS", "SAFETENSORS_EXTENSIONS", "load_nested_weights",
]

log = logging.getLogger(__name__)

PICKLE_EXTENSIONS = (".ckpt", ".pt", ".pth", ".bin")
SAFETENSORS_EXTENSIONS = (".safetensors",)
# The safetensors format itself caps the header at 100 MB.
MAX_SAFETENSORS_HEADER = 100_000_000

CONVERT_ADVICE = ("If you trust the file's source, convert it to .safetensors on a machine where running its "
                  "code does no harm (or download a .safetensors version of the model) and use that; otherwise "
                  "delete it.")


class CheckpointLoadError(Exception):
    """A model file could not be read: missing, truncated, corrupt, or not a state dict."""

    def __init__(self, path: str | os.PathLike[str], cause: BaseException | str) -> None:
        self.path = Path(path)
        self.cause = cause
        detail = cause if isinstance(cause, str) else f"{type(cause).__name__}: {cause}"
        super().__init__(f"Cannot load {self.path}: {detail}")


class UnsafeCheckpointError(CheckpointLoadError):
    """The pickle asks for something a weights file does not need and that could run code or corrupt
    memory. It was refused before anything of it happened.

    ``global_name`` is the refused Python global (``posix.system``) when the refusal is about one,
    otherwise a short name of what was refused (an opcode, the legacy tar format, TorchScript).
    """

    def __init__(self, path: str | os.PathLike[str], global_name: str, detail: str | None = None) -> None:
        self.global_name = global_name
        reason = detail or (f"it references the Python global '{global_name}', which a weights file does not "
                            "need and which is not allowed (an arbitrary global can run code or corrupt memory)")
        super().__init__(path, f"refused: {reason}. Loading stopped before anything from the file was "
                               f"executed. {CONVERT_ADVICE}")


# --------------------------------------------------------------------------- stand-ins


class PickledPlaceholder:
    """What a pickled Lightning/argparse/omegaconf object becomes: a plain holder of its pickled state.

    It is created without looking at its arguments, and ``__setstate__`` only stores what the file
    gave (never interprets it, never sets attributes by names from the file). The real class is never
    imported. One subclass per pickled name, so distinct classes stay distinct (Lightning keys
    callback state by the callback class).
    """

    __slots__ = ("pickled_state",)
    original: str = "?"

    def __new__(cls, *args: Any) -> "PickledPlaceholder":
        obj = object.__new__(cls)
        obj.pickled_state = None
        return obj

    def __init__(self, *args: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        self.pickled_state = state

    def __repr__(self) -> str:
        return f"<placeholder for {self.original}>"


def _placeholder(qualified: str) -> type[PickledPlaceholder]:
    name = qualified.rsplit(".", 1)[1]
    return type(name, (PickledPlaceholder,), {"__slots__": (), "original": qualified, "__module__": __name__})


class _PlainDict:
    """``AttributeDict`` (a dict subclass) and ``collections.defaultdict`` unpickle as a plain dict:
    torch's unpickler fills only exact dicts, and a default factory from a file is never kept."""

    def __new__(cls, *args: Any) -> dict:  # type: ignore[misc]
        return {}


class NumpyDtypeDescription:
    """What ``numpy.dtype(...)`` in a pickle becomes: the type code and the pickled state, as data.

    ``numpy_scalar`` turns it into a real dtype only if both describe a plain numeric type.
    """

    __slots__ = ("code", "state")
    original = "numpy.dtype"

    def __new__(cls, *args: Any) -> "NumpyDtypeDescription":
        obj = object.__new__(cls)
        obj.code = args[0] if args and isinstance(args[0], str) else None
        obj.state = None
        return obj

    def __init__(self, *args: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<numpy dtype description {self.code!r}>"


class _StandInRefusal(Exception):
    """Raised by a stand-in inside torch's unpickler; becomes UnsafeCheckpointError."""

    def __init__(self, what: str, detail: str) -> None:
        self.what = what
        self.detail = detail
        super().__init__(detail)


# Plain numeric scalars (what training loops store: global_step, best scores). Anything else,
# structured, void, object, string or datetime dtypes, is refused.
_NUMPY_SCALAR_CODES = frozenset({"b1", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "f2", "f4", "f8", "c8", "c16"})


def numpy_scalar(dtype: Any, data: Any = None) -> Any:
    """Stand-in for ``numpy.core.multiarray.scalar(dtype, bytes)``: a numpy scalar of a plain numeric
    dtype, rebuilt from scratch (numpy's own dtype ``__setstate__`` never runs)."""
    import numpy as np

    if not isinstance(dtype, NumpyDtypeDescription) or dtype.code not in _NUMPY_SCALAR_CODES:
        code = dtype.code if isinstance(dtype, NumpyDtypeDescription) else type(dtype).__name__
        raise _StandInRefusal("numpy.core.multiarray.scalar",
                              f"it calls numpy.core.multiarray.scalar for a numpy dtype {code!r}; only plain numeric "
                              "scalars (bool, int, uint, float, complex) are accepted")
    state = dtype.state
    # numpy's pickled state of a plain dtype: (3, byteorder, None, None, None, -1, -1, 0). Any other
    # size, alignment or flags is a forged dtype (flags can make numpy treat raw bytes as pointers).
    if (not isinstance(state, tuple) or len(state) != 8 or state[0] != 3 or state[1] not in ("<", ">", "|", "=")
            or state[2:5] != (None, None, None) or state[5:] != (-1, -1, 0)):
        raise _StandInRefusal("numpy.dtype",
                              f"it calls numpy.dtype({dtype.code!r}) with the pickled state {str(state)[:120]}, "
                              "not the one numpy writes for that type (forged size, alignment or flags)")
    real = np.dtype(dtype.code).newbyteorder(state[1] if state[1] in "<>" else "=")
    if not isinstance(data, (bytes, bytearray)) or len(data) != real.itemsize:
        raise _StandInRefusal("numpy.core.multiarray.scalar",
                              f"it calls numpy.core.multiarray.scalar for a {real.name} from "
                              f"{len(data) if isinstance(data, (bytes, bytearray)) else type(data).__name__} "
                              f"instead of {real.itemsize} bytes")
    if real.kind == "b" and bytes(data) not in (b"\x00", b"\x01"):
        raise _StandInRefusal("numpy.core.multiarray.scalar",
                              "it calls numpy.core.multiarray.scalar for a bool from a byte other than 0 or 1")
    return np.frombuffer(bytes(data), dtype=real, count=1)[0]


_LIGHTNING = (
    "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint",
    "lightning.pytorch.callbacks.model_checkpoint.ModelCheckpoint",
)
_ATTRIBUTE_DICTS = (
    "pytorch_lightning.utilities.parsing.AttributeDict",
    "lightning_fabric.utilities.data.AttributeDict",
    "lightning.fabric.utilities.data.AttributeDict",
)
_OMEGACONF = (
    "omegaconf.dictconfig.DictConfig", "omegaconf.listconfig.ListConfig",
    "omegaconf.base.ContainerMetadata", "omegaconf.base.Metadata",
    *(f"omegaconf.nodes.{n}" for n in ("AnyNode", "StringNode", "IntegerNode", "FloatNode", "BooleanNode",
                                       "BytesNode", "PathNode", "InterpolationResultNode")),
    "typing.Any",
)
_OTHER_PLACEHOLDERS = ("argparse.Namespace",)
# The builtin types omegaconf metadata names (``object_type``, ``ref_type``): pure data constructors.
_BUILTIN_TYPES = (dict, list, int, float, str, bool)

_PLACEHOLDERS: dict[str, type[PickledPlaceholder]] = {
    name: _placeholder(name) for name in (*_LIGHTNING, *_OMEGACONF, *_OTHER_PLACEHOLDERS)
}


def extra_safe_globals() -> list[tuple[Any, str]]:
    """The ``(stand-in, "module.qualname")`` pairs added to torch's weights-only allowlist while a
    checkpoint is read (``torch.serialization.safe_globals`` accepts such pairs)."""
    pairs: list[tuple[Any, str]] = [(cls, name) for name, cls in _PLACEHOLDERS.items()]
    pairs += [(_PlainDict, name) for name in (*_ATTRIBUTE_DICTS, "collections.defaultdict")]
    pairs += [(t, f"builtins.{t.__name__}") for t in _BUILTIN_TYPES]
    pairs.append((NumpyDtypeDescription, "numpy.dtype"))
    pairs += [(numpy_scalar, f"{mod}.scalar") for mod in ("numpy.core.multiarray", "numpy._core.multiarray")]
    return pairs


# --------------------------------------------------------------------------- refusals


# torch's UnpicklingError texts (torch/_weights_only_unpickler.py), most specific first.
_GLOBAL_PATTERNS = (
    re.compile(r"GLOBAL (\S+) was not an allowed global by default"),
    re.compile(r"Trying to load unsupported GLOBAL (\S+) whose module \S+ is blocked"),
)
_OPERAND = re.compile(r"Unsupported operand (\d+)")
_OTHER_REFUSALS = (
    (re.compile(r"Can only create new object for nn\.Parameter or classes allowlisted via `add_safe_globals` "
                r"but got (.+)"), "NEWOBJ", "it constructs {0} (NEWOBJ), which is not an allowed class"),
    (re.compile(r"Trying to call reduce for unrecognized function (.+)"), "REDUCE",
     "it calls {0} (REDUCE), which is not an allowed function"),
    (re.compile(r"Can only build Tensor, Parameter, OrderedDict or types allowlisted via `add_safe_globals`, "
                r"but got (.+)"), "BUILD", "it sets the state of {0} (BUILD), which is not allowed"),
    (re.compile(r"(Can only (?:append to|extend) lists.*|Can only SETITEMS? for dict.*)"), "APPEND/SETITEM",
     "it fills a container that is not a list or dict ({0})"),
    (re.compile(r"((?:Only persistent_load|persistent_load id must be).*)"), "persistent_load",
     "it asks for a persistent object other than a tensor storage ({0})"),
    (re.compile(r"(\S+ and \S+ must be imported to load .*|\S+ must be imported to load .*)"), "tensor subclass",
     "it holds tensors of a kind this program does not load ({0})"),
)


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else ""


def _opcode_name(code: int) -> str:
    for op in pickletools.opcodes:
        if op.code == chr(code):
            return op.name
    return f"byte 0x{code:02x}"


def _refusal(path: Path, message: str) -> UnsafeCheckpointError | None:
    """The UnsafeCheckpointError for torch's refusal text, or None if the text is not a refusal."""
    for pattern in _GLOBAL_PATTERNS:
        m = pattern.search(message)
        if m:
            name = m.group(1)
            # torch prints builtins.exec as plain "exec"
            return UnsafeCheckpointError(path, name if "." in name else f"builtins.{name}")
    m = _OPERAND.search(message)
    if m:
        op = _opcode_name(int(m.group(1)))
        return UnsafeCheckpointError(path, f"opcode {op}", (
            f"the pickle uses the opcode {op}, which PyTorch's weights-only loader does not accept (it accepts "
            "what torch.save writes: pickle protocol 2 without keyword-argument construction)"))
    for pattern, what, template in _OTHER_REFUSALS:
        m = pattern.search(message)
        if m:
            return UnsafeCheckpointError(path, what, template.format(_first_line(m.group(1))[:200]))
    return None


_LOAD_LOCK = threading.Lock()


def _torch_load(path: Path) -> Any:
    # safe_globals adds to, then removes from, torch's one process-wide list: loads are serialised so
    # one load's exit cannot remove the names while another load still needs them.
    with _LOAD_LOCK, torch.serialization.safe_globals(extra_safe_globals()):
        return torch.load(path, map_location="cpu", weights_only=True, mmap=False)


def _read_pickle_checkpoint(path: Path) -> Any:
    try:
        return _torch_load(path)
    except _StandInRefusal as exc:
        raise UnsafeCheckpointError(path, exc.what, exc.detail) from None
    except pickle.UnpicklingError as exc:
        refusal = _refusal(path, str(exc))
        if refusal is not None:
            raise refusal from None
        raise CheckpointLoadError(path, _first_line(str(exc).split("WeightsUnpickler error:")[-1]) or exc) from exc
    except RuntimeError as exc:
        text = str(exc)
        if "legacy .tar format" in text:
            raise UnsafeCheckpointError(path, "legacy .tar format", (
                "it is in PyTorch's legacy .tar format, which cannot be read without running "
                "its pickles unrestricted (and extracting its members, symlinks included); it is never "
                "loaded")) from None
        if "TorchScript" in text:
            raise UnsafeCheckpointError(path, "TorchScript archive", (
                "it is a TorchScript archive, which contains code; it is never loaded")) from None
        raise CheckpointLoadError(path, _first_line(text) or exc) from exc
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

    Raises UnsafeCheckpointError for a pickle that torch's weights-only loader (with the stand-ins
    above) refuses, and CheckpointLoadError for a missing, truncated or corrupt file.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointLoadError(path, "no such file")
    return _extract_state_dict(path, _read_pickle_checkpoint(path))


def _nested_tensors(obj: Any, depth: int = 0) -> Any:
    """`obj` with everything but str-keyed dicts and tensors dropped (at most 3 levels deep)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach()
    if isinstance(obj, dict) and depth < 3:
        out = {k: _nested_tensors(v, depth + 1) for k, v in obj.items() if isinstance(k, str)}
        return {k: v for k, v in out.items() if isinstance(v, torch.Tensor) or (isinstance(v, dict) and v)}
    return None


def load_nested_weights(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A weights file's dicts of tensors as nested in the file (Real-ESRGAN's ``{"params_ema": {...}}``),
    read by the same safe loaders; for libraries that unwrap such layouts themselves (spandrel)."""
    path = Path(path)
    if path.suffix.lower() in SAFETENSORS_EXTENSIONS:
        return load_state_dict_file(path)
    if path.suffix.lower() not in PICKLE_EXTENSIONS:
        return load_state_dict_file(path)  # raises the "unsupported file type" error
    if not path.is_file():
        raise CheckpointLoadError(path, "no such file")
    nested = _nested_tensors(_read_pickle_checkpoint(path))
    if not nested:
        raise CheckpointLoadError(path, "it contains no tensors")
    return nested


def load_pickled_object(path: str | os.PathLike[str]) -> Any:
    """The whole object a ``.pt`` holds (nested dicts/lists, int keys and all), read by the same
    restricted loader: for formats that are not a flat state dict (A1111 hypernetworks)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointLoadError(path, "no such file")
    return _read_pickle_checkpoint(path)


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


def load_state_dict_file(path: str | os.PathLike[str], *, in_memory: bool = False) -> dict[str, torch.Tensor]:
    """Load any supported weights file to a CPU state dict, dispatching on the extension.

    safetensors' default reader maps the file: tensors are read lazily and are cheap when they are
    converted (fp16 file -> fp32 model) or moved to a GPU anyway; the CPU loader copies them off the
    file after the model is ready (``models/materialise.py``). ``in_memory``: read every tensor into
    process memory (safetensors' pread backend), where mapped tensors cannot be told apart (not Linux),
    so the model is never backed by a file that could be truncated under it."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_EXTENSIONS:
        if not path.is_file():
            raise CheckpointLoadError(path, "no such file")
        _read_safetensors_header_json(path)  # clear message for truncation before the real read
        import safetensors.torch
        try:
            if in_memory:
                return safetensors.torch.load_file(str(path), device="cpu", backend="pread")
            return safetensors.torch.load_file(str(path), device="cpu")
        except Exception as exc:
            raise CheckpointLoadError(path, exc) from exc
    if suffix in PICKLE_EXTENSIONS:
        return load_ckpt_state_dict(path)
    raise CheckpointLoadError(path, f"unsupported file type {suffix or '(no extension)'}; "
                                    f"expected one of {', '.join(SAFETENSORS_EXTENSIONS + PICKLE_EXTENSIONS)}")

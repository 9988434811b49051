"""Memory-mapped loading: the model is ready at once, its weights move off the file in the background.

A ``.safetensors`` checkpoint is memory-mapped (safetensors' default reader): building the modules
around the mapped tensors costs no copy, so a checkpoint is ready in well under a second instead of
after reading 2 GB into process memory. But a model left backed by the file would crash the server
(SIGBUS) if another program truncated or rewrote the file *in place* while it is loaded (our own
writers replace files atomically, which keeps an existing mapping valid; others may not). So every
file-backed tensor is copied into process memory, converted to its final dtype on the way (fp32 mode),
by a background thread that starts when the model is ready:

- a forward of a layer that is not copied yet copies it first (``ensure``, from the layer's hook in
  ``precision.py``), under the same lock as the thread, so a tensor is never swapped while it runs;
- code that reads or writes weights outside a forward (LoRA merging) calls ``wait`` first;
- each copied range of the mapping is dropped from this process (``madvise(MADV_DONTNEED)``), so the
  file's pages do not add to RSS, and the mapping itself is unmapped when the last tensor is copied.

The values are the same bytes either way: a copy, or the same fp16->fp32 conversion done earlier.
Hand-written: no library moves a live model off a mapping while it may run (accelerate's offload
keeps the mapping; diffusers' loaders copy before returning).
"""
from __future__ import annotations

import ctypes
import logging
import mmap
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from modules.models import file_origin, libc

__all__ = ["FileSpan", "Materialiser", "CAN_MAP", "file_span", "ensure"]

log = logging.getLogger(__name__)

# Mapping a file needs a way to tell mapped tensors apart (``/proc/self/maps``); elsewhere we read into memory.
CAN_MAP = Path("/proc/self/maps").is_file()
_ATTR = "_webui_file_backed"   # on a module whose tensors still wait to be copied: (materialiser, dtype)
_MADV_DONTNEED = 4
_PAGE = mmap.PAGESIZE


@dataclass(frozen=True)
class FileSpan:
    """The address range of one mapped file (tensors inside it are backed by the file)."""
    lo: int
    hi: int
    file: file_origin.FileIdentity | None = None   # the file as it was when mapped
    offset: int = 0                                 # the file offset mapped at ``lo``

    def holds(self, tensor: torch.Tensor) -> bool:
        return tensor.numel() > 0 and self.lo <= tensor.data_ptr() < self.hi

    def origin(self, tensor: torch.Tensor) -> file_origin.Origin | None:
        """Where a contiguous mapped tensor's bytes are in the file (for reading them back later)."""
        if self.file is None or not self.holds(tensor) or not tensor.is_contiguous():
            return None
        return file_origin.Origin(self.file, self.offset + tensor.data_ptr() - self.lo, tensor.dtype, tensor.numel())


def file_span(state_dict: dict[str, Any], path: Path) -> FileSpan | None:
    """The mapping of ``path`` that holds these tensors, or None when they are not memory-mapped
    (read into memory, unpickled). Checked against ``/proc/self/maps``, never guessed."""
    tensors = [t for t in state_dict.values() if isinstance(t, torch.Tensor) and t.numel() > 0]
    if not tensors or not CAN_MAP:
        return None
    lo = min(t.data_ptr() for t in tensors)
    hi = max(t.data_ptr() + t.numel() * t.element_size() for t in tensors)
    try:
        real = os.path.realpath(path)
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                fields = line.split(maxsplit=5)
                if len(fields) < 6 or os.path.realpath(fields[5].strip()) != real:
                    continue
                start, end = (int(x, 16) for x in fields[0].split("-"))
                if start <= lo and hi <= end:
                    return FileSpan(start, end, file_origin.FileIdentity.of(path), int(fields[2], 16))
    except OSError:
        return None
    return None


_LIBC = libc.LIBC   # also used by residency.py


def _drop_pages(span: FileSpan, tensor: torch.Tensor) -> None:
    """Unmap from this process the whole pages inside ``tensor``'s bytes (the page cache keeps them).
    Only ever called on a range of the file's private, never-written mapping: a later read of those
    addresses would fault the same bytes back in from the file."""
    if _LIBC is None:
        return
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    first = -(-start // _PAGE) * _PAGE
    last = end // _PAGE * _PAGE
    if span.lo <= first < last <= span.hi:
        _LIBC.madvise(ctypes.c_void_p(first), last - first, _MADV_DONTNEED)


class Materialiser:
    """Copies one model's file-backed tensors into process memory: in a thread, or layer by layer on demand."""

    def __init__(self, span: FileSpan | None, keep_alive: Any = None):
        self.span = span
        self._keep_alive = keep_alive   # one mapped tensor: the mapping (and span) stays valid until we finish
        self._lock = threading.Lock()
        self._pending: list[torch.nn.Module] = []
        self._done = threading.Event()
        self._stop = False
        self._thread: threading.Thread | None = None
        self.seconds: float | None = None   # how long the background copy took (None: not finished)
        self.keep_mapped = False   # low-RAM: hooked layers stay views of the mapping (models/residency.py)

    # -- setting up
    def file_backed(self, tensor: torch.Tensor) -> bool:
        return self.span is not None and self.span.holds(tensor)

    def adopt(self, model: torch.nn.Module, dtype: torch.dtype | None,
              hooked: Callable[[torch.nn.Module], bool]) -> None:
        """Every module of ``model`` with tensors still to copy or convert (to ``dtype``; None: keep each
        tensor's dtype): ``hooked`` modules (whose forward hook calls ``ensure``) are left for later,
        any other module is done now."""
        for module in model.modules():
            if not self._needs_work(module, dtype):
                continue
            if hooked(module) and self.keep_mapped:
                self._record_origins(module)   # the LoRA merger can read these originals back from the file
                continue
            if hooked(module):
                object.__setattr__(module, _ATTR, (self, dtype))
                self._pending.append(module)
            else:
                self._copy(module, dtype)

    def _record_origins(self, module: torch.nn.Module) -> None:
        for tensor in _own_tensors(module):
            origin = self.span.origin(tensor.data) if self.span is not None else None
            if origin is not None:
                file_origin.record(tensor, origin)

    def _needs_work(self, module: torch.nn.Module, dtype: torch.dtype | None) -> bool:
        return any(self.file_backed(t) or (dtype is not None and t.is_floating_point() and t.dtype != dtype)
                   for t in _own_tensors(module))

    def _copy(self, module: torch.nn.Module, dtype: torch.dtype | None) -> None:
        for tensor in _own_tensors(module):
            old = tensor.data
            new = old.to(dtype) if dtype is not None and old.is_floating_point() else old
            if new is old and self.file_backed(old):
                new = old.clone()
            if new is not old:
                origin = self.span.origin(old) if self.span is not None else None
                tensor.data = new
                if origin is not None:
                    file_origin.record(tensor, origin)   # the LoRA merger may read the original back
                if self.span is not None and self.file_backed(old):
                    _drop_pages(self.span, old)
            del old

    def copy_entries(self, state_dict: dict[str, Any], prefix: str) -> None:
        """Copy now the file-backed tensors under ``prefix`` that will not live in a module we adopt."""
        for key in [k for k in state_dict if k.startswith(prefix)]:
            tensor = state_dict[key]
            if isinstance(tensor, torch.Tensor) and self.file_backed(tensor):
                state_dict[key] = tensor.clone()

    # -- running
    def ensure(self, module: torch.nn.Module) -> None:
        """Copy ``module``'s own tensors now if they still wait (called before its forward)."""
        with self._lock:
            entry = module.__dict__.get(_ATTR)
            if entry is None:
                return
            self._copy(module, entry[1])
            del module.__dict__[_ATTR]

    def start(self) -> None:
        """Copy everything still pending in a daemon thread (nothing pending: done at once)."""
        if not self._pending:
            self._finish(0.0)
            return
        self._thread = threading.Thread(target=self._run, name="weights-off-the-file", daemon=True)
        self._thread.start()

    def run_now(self) -> None:
        self._run()

    def _run(self) -> None:
        t0 = time.perf_counter()
        try:
            for module in self._pending:
                if self._stop:
                    return
                self.ensure(module)
        except Exception:  # a failure here must not kill the process: layers still copy on first use
            log.exception("copying the weights off the checkpoint file failed; they are copied as used")
            return
        finally:
            if not self._stop:
                self._finish(time.perf_counter() - t0)
            else:
                self._done.set()

    def _finish(self, seconds: float) -> None:
        self._pending = []
        self._keep_alive = None
        self.seconds = round(seconds, 3)
        self._done.set()

    def wait(self) -> None:
        """Return when every tensor is in process memory (the background copy finished)."""
        if self._thread is not None and self._thread is not threading.current_thread():
            self._done.wait()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def cancel(self) -> None:
        """Stop the background copy (the model is being unloaded) and drop our references."""
        self._stop = True
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        self._pending = []
        self._keep_alive = None


def ensure(module: torch.nn.Module) -> None:
    """For forward hooks: copy this module off the file first if it still waits (no-op otherwise)."""
    entry = module.__dict__.get(_ATTR)
    if entry is not None:
        entry[0].ensure(module)


def _own_tensors(module: torch.nn.Module) -> Iterable[torch.Tensor]:
    return (*module.parameters(recurse=False), *module.buffers(recurse=False))

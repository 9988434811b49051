"""Low-RAM mode: only the running component's weights are in process memory.

In low-RAM mode the half-precision Conv/Linear/Embedding weights stay views of the checkpoint's
private, read-only-in-practice file mapping (``materialise.py`` copies them off in every other mode).
A page of it is in RSS only once touched, and a clean page can be dropped again with
``madvise(MADV_DONTNEED)``: the next read faults the same bytes back in from the page cache (or disk).
So when one component starts (text encoder, UNet, VAE), the others' pages are dropped: the UNet's
1.7 GB are not resident while the VAE decodes, nor the text encoder's and VAE's during sampling.

Written weights (a LoRA merged in place, an extension's edit) live in copy-on-write anonymous pages of
the mapping, which ``MADV_DONTNEED`` would silently throw away. Before dropping anything, every
tensor's pages are checked in ``/proc/self/pagemap`` (present-and-not-file, or swapped: written); such a
tensor is copied into memory it owns first, and is never dropped again. Only whole pages inside one
tensor's bytes are dropped, so a written neighbour sharing an edge page is never touched.

What the mapping risks, as any mmap: another program truncating the file *in place* while the model is
loaded makes the next fault a SIGBUS (our own writers replace files atomically, which is safe);
rewriting it in place changes the weights. Before a component's pages are faulted back in, the mapped
file is checked (size, mtime): a change fails the job with ``CheckpointChangedError`` instead; a
truncation *during* a component's run can still SIGBUS (``docs/performance.md`` says so). Where pagemap
cannot be read (``available``), the loader copies the weights off the file as in the other modes.
Hand-written: no library drops idle weights of a mapped model and re-faults them.
"""
from __future__ import annotations

import ctypes
import errno
import logging
import mmap
import os
import threading
import weakref
from pathlib import Path
from typing import Any, Iterable

import torch

from modules.models import materialise
from modules.models.file_origin import CheckpointChangedError

__all__ = ["CheckpointChangedError", "Residency", "available", "install", "resident_bytes"]

log = logging.getLogger(__name__)

_PAGE = mmap.PAGESIZE
_PRESENT, _SWAPPED, _FILE = 1 << 63, 1 << 62, 1 << 61
_MADV_POPULATE_READ = 22  # Linux 5.14+; elsewhere EINVAL, and the pages fault in one by one instead


def _page_flags(lo: int, hi: int) -> Any:
    """The pagemap entries (numpy uint64) of the pages covering [lo, hi), or None when unreadable."""
    import numpy as np

    first, last = lo // _PAGE, (hi - 1) // _PAGE
    try:
        with open("/proc/self/pagemap", "rb", buffering=0) as fh:
            fh.seek(first * 8)
            data = fh.read((last - first + 1) * 8)
    except OSError:
        return None
    if len(data) != (last - first + 1) * 8:
        return None
    return np.frombuffer(data, dtype=np.uint64)


def _byte_range(tensor: torch.Tensor) -> tuple[int, int]:
    start = tensor.data_ptr()
    return start, start + tensor.numel() * tensor.element_size()


def _own_tensors(module: torch.nn.Module) -> Iterable[torch.Tensor]:
    for m in module.modules():
        yield from (*m.parameters(recurse=False), *m.buffers(recurse=False))


class Residency:
    """The components of one model whose weights are views of one mapped file."""

    def __init__(self, span: materialise.FileSpan, path: Path):
        self.span = span
        self.path = path
        # the mapped file itself (not whatever the name points to later): a changed size or mtime means
        # someone rewrote it in place, and touching the mapping could SIGBUS or read other weights
        self._fd = os.open(path, os.O_RDONLY)
        weakref.finalize(self, os.close, self._fd)
        self._stamp = self._file_stamp()
        self.components: dict[str, weakref.ref] = {}
        self.active: str | None = None   # the component that ran last (its pages are the resident ones)
        self.lock = threading.Lock()
        self.owned: dict[str, int] = {}   # component -> tensors copied into memory because they were written
        self.released = 0              # how many times a component's pages were dropped (for tests, logs)

    def add(self, name: str, module: torch.nn.Module, entry_points: Iterable[torch.nn.Module]) -> None:
        self.components[name] = weakref.ref(module)
        for top in entry_points:
            top.register_forward_pre_hook(lambda *_a, _name=name: self.activate(_name))

    def activate(self, name: str) -> None:
        """``name`` is about to run: drop every other component's mapped pages (also pages that a read
        outside a forward faulted in), then fault ``name``'s in."""
        if name == self.active:
            return  # the common case inside sampling: nothing to do
        with self.lock:
            self.check_file()
            for other in self.components:
                if other != name:
                    self.release(other)
            self.active = name
        self._populate(name)

    def _file_stamp(self) -> tuple[int, int]:
        st = os.fstat(self._fd)
        return st.st_size, st.st_mtime_ns

    def check_file(self) -> None:
        """Refuse to fault weights back in from a file rewritten in place since the load (a clear error
        for the job instead of a SIGBUS that kills the server, or silently different weights)."""
        if self._file_stamp() != self._stamp:
            raise CheckpointChangedError(f"{self.path} was changed on disk in place while it was loaded in "
                                         "low-RAM mode; load the checkpoint again")

    def mapped_tensors(self, name: str) -> list[torch.Tensor]:
        module = self.components[name]()
        if module is None:
            return []
        seen, out = set(), []
        for t in _own_tensors(module):
            if id(t) not in seen and self.span.holds(t.data):
                seen.add(id(t))
                out.append(t)
        return out

    def release(self, name: str) -> None:
        """Drop ``name``'s mapped pages from this process; written tensors are made owned first."""
        tensors = self.mapped_tensors(name)
        if not tensors or materialise._LIBC is None:  # noqa: SLF001 - the same libc handle
            return
        lo = min(_byte_range(t.data)[0] for t in tensors)
        hi = max(_byte_range(t.data)[1] for t in tensors)
        flags = _page_flags(lo, hi)
        if flags is None:
            return  # cannot tell written pages apart: keep everything
        written = ((flags & _PRESENT != 0) & (flags & _FILE == 0)) | (flags & _SWAPPED != 0)
        base = lo // _PAGE
        made_owned = 0
        for t in tensors:
            start, end = _byte_range(t.data)
            if written[start // _PAGE - base:(end - 1) // _PAGE - base + 1].any():
                t.data = t.data.clone()   # a merged LoRA / edited weight: it keeps its values for good
                made_owned += 1
        if made_owned:
            self.owned[name] = self.owned.get(name, 0) + made_owned
            log.debug("low-RAM: %d written tensors of %s now own their memory", made_owned, name)
        for t in tensors:
            if self.span.holds(t.data):
                materialise._drop_pages(self.span, t.data)  # noqa: SLF001 - whole pages inside the tensor only
        self.released += 1

    def _populate(self, name: str) -> None:
        """Fault ``name``'s mapped pages in with one call (instead of one fault per 64 KB as layers run)."""
        tensors = self.mapped_tensors(name)
        if not tensors or materialise._LIBC is None:  # noqa: SLF001
            return
        for t in tensors:  # tensor by tensor: the file interleaves components (dtype order), never their span
            start, end = _byte_range(t.data)
            lo = start // _PAGE * _PAGE
            if materialise._LIBC.madvise(ctypes.c_void_p(lo), end - lo, _MADV_POPULATE_READ) == 0:  # noqa: SLF001
                continue
            if ctypes.get_errno() == errno.EFAULT:  # a page past the end of the file: it was truncated
                raise CheckpointChangedError(f"{self.path} was truncated while it was loaded in low-RAM mode; "
                                             "load the checkpoint again")
            return  # no MADV_POPULATE_READ here (before Linux 5.14): pages fault in as layers run


def _entry_points(name: str, module: torch.nn.Module) -> list[torch.nn.Module]:
    """Where a component starts running: the VAE is entered through its encoder/decoder and the convs
    around them (``AutoencoderKL.decode`` never calls the VAE's own forward)."""
    if name.startswith("vae") or hasattr(module, "decoder"):
        return [m for m in (getattr(module, a, None) for a in ("quant_conv", "post_quant_conv", "encoder", "decoder"))
                if isinstance(m, torch.nn.Module)]
    return [module]


def available(span: materialise.FileSpan | None) -> bool:
    """Pages of this mapping can be checked (pagemap) and dropped (madvise): weights may stay mapped."""
    return span is not None and materialise._LIBC is not None and _page_flags(span.lo, span.lo + 1) is not None  # noqa: SLF001


def install(components: dict[str, Any], span: materialise.FileSpan | None, path: Path) -> Residency | None:
    """Hooks that keep only the running component's mapped weights resident (None: nothing is mapped)."""
    if span is None or not available(span):
        return None
    residency = Residency(span, path)
    for name, module in components.items():
        if isinstance(module, torch.nn.Module) and any(span.holds(t.data) for t in _own_tensors(module)):
            residency.add(name, module, _entry_points(name, module))
    if not residency.components:
        return None
    # building the model touched some pages: drop them all, each component's fault in when it runs
    with residency.lock:
        for name in residency.components:
            residency.release(name)
    return residency


def resident_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of whole pages of these tensors that are present in this process (pagemap)."""
    total = 0
    for t in tensors:
        start, end = _byte_range(t.data)
        first, last = -(-start // _PAGE) * _PAGE, end // _PAGE * _PAGE
        if last <= first:
            continue
        flags = _page_flags(first, last)
        if flags is not None:
            total += int((flags & _PRESENT != 0).sum()) * _PAGE
    return total

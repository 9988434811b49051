"""Where a loaded weight's bytes came from in its checkpoint file, so that its original can be read back.

The CPU loader copies each tensor off the memory-mapped checkpoint (``materialise.py``) and records here
the file range and dtype each parameter was made from. The LoRA merger then keeps no copy of a layer it
changes while that layer still holds exactly those bytes (compared with the file before the first
change): putting the original back reads it from the file, i.e. from the page cache. That saves the
copies' memory (1.25 GB for the layers a usual SD1.5 LoRA touches in fp32) and the time to fault it in.

The file may change while the model is loaded. It is identified (device, inode, size, mtime) at load; an
open that finds another identity gives no origins (the merger copies instead). While originals are owed
the descriptor stays open, so a file replaced by rename (download tools, our own writers) keeps its old
bytes readable. A rewrite in place is seen (size, mtime) before reading back and fails the job with
``CheckpointChangedError`` ("load the checkpoint again"); reads never map the file, so no SIGBUS.
Hand-written: no library records where a converted tensor came from.
"""
from __future__ import annotations

import os
import threading
import weakref
from dataclasses import dataclass
from typing import Iterator

import torch

__all__ = ["FileIdentity", "Origin", "OpenCheckpoint", "record", "origin_of", "open_checkpoint", "CheckpointChangedError"]

class CheckpointChangedError(RuntimeError):
    """A checkpoint file was modified in place while loaded; weights read from it can no longer be trusted."""


_ATTR = "_webui_origin"   # on a Parameter/buffer: the Origin its current values were made from
CHUNK_ELEMENTS = 1 << 18  # read and compare 256K elements at a time: the buffer stays in the CPU's cache


@dataclass(frozen=True)
class FileIdentity:
    path: str
    device: int
    inode: int
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, path: str | os.PathLike[str]) -> "FileIdentity | None":
        try:
            st = os.stat(path)
        except OSError:
            return None
        return cls(os.path.realpath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)

    def matches(self, st: os.stat_result) -> bool:
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) == (self.device, self.inode, self.size,
                                                                      self.mtime_ns)


@dataclass(frozen=True)
class Origin:
    """``numel`` elements of ``dtype`` at byte ``offset`` of ``file``, converted to the tensor's dtype."""
    file: FileIdentity
    offset: int
    dtype: torch.dtype
    numel: int


def record(tensor: torch.Tensor, origin: Origin) -> None:
    """Note on a parameter/buffer object that its values were just made from ``origin``."""
    try:
        setattr(tensor, _ATTR, origin)
    except (AttributeError, TypeError):
        pass   # a plain tensor without a __dict__: no origin, the merger copies


def origin_of(tensor: torch.Tensor) -> Origin | None:
    return getattr(tensor, _ATTR, None)


class OpenCheckpoint:
    """An open descriptor of one checkpoint file, shared while originals are owed; closed with the last owner."""

    def __init__(self, identity: FileIdentity):
        self.identity = identity
        fd = os.open(identity.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        st = os.fstat(fd)
        if not identity.matches(st):
            os.close(fd)
            raise FileNotFoundError(f"{identity.path} is not the file the model was loaded from any more")
        self.fd = fd
        self._stamp = (st.st_size, st.st_mtime_ns)
        weakref.finalize(self, os.close, fd)

    def check(self) -> None:
        """Refuse to read originals from a file rewritten in place since it was opened."""
        st = os.fstat(self.fd)
        if (st.st_size, st.st_mtime_ns) != self._stamp:
            raise CheckpointChangedError(f"{self.identity.path} was changed on disk in place while LoRA networks "
                                         "were merged into its weights; load the checkpoint again")

    def read_exact(self, dst: torch.Tensor, offset: int) -> None:
        """Fill contiguous CPU ``dst`` with the file's bytes at ``offset``."""
        view = memoryview(dst.detach().reshape(-1).view(torch.uint8).numpy())
        done = 0
        while done < len(view):
            got = os.preadv(self.fd, [view[done:]], offset + done)
            if got <= 0:
                raise CheckpointChangedError(f"{self.identity.path} is shorter than when it was loaded; "
                                             "load the checkpoint again")
            done += got

    def chunks(self, origin: Origin, dtype: torch.dtype, scratch: "Scratch") -> Iterator[tuple[int, torch.Tensor]]:
        """``(start element, values in dtype)`` over ``origin``, CHUNK_ELEMENTS at a time (views of ``scratch``)."""
        size = origin.dtype.itemsize
        for start in range(0, origin.numel, CHUNK_ELEMENTS):
            count = min(CHUNK_ELEMENTS, origin.numel - start)
            raw = scratch.buffer(origin.dtype, count, 0)
            self.read_exact(raw, origin.offset + start * size)
            if dtype == origin.dtype:
                yield start, raw
            else:
                yield start, scratch.buffer(dtype, count, 1).copy_(raw)


class Scratch:
    """Reusable CPU buffers by slot (here 0: raw file bytes, 1: converted values): no allocation per chunk."""

    def __init__(self):
        self._buffers: dict[int, torch.Tensor] = {}

    def buffer(self, dtype: torch.dtype, count: int, slot: int) -> torch.Tensor:
        size = dtype.itemsize
        held = self._buffers.get(slot)
        if held is None or held.numel() < count * size:
            held = self._buffers[slot] = torch.empty(max(count, CHUNK_ELEMENTS) * size, dtype=torch.uint8)
        return held[:count * size].view(dtype)


_open: "weakref.WeakValueDictionary[FileIdentity, OpenCheckpoint]" = weakref.WeakValueDictionary()
_open_lock = threading.Lock()


def open_checkpoint(identity: FileIdentity) -> OpenCheckpoint | None:
    """The shared open file for ``identity``; None when the file is gone or is another file now, or where
    there is no positioned read (``os.preadv``: not on Windows, where weights are never mapped anyway)."""
    if not hasattr(os, "preadv"):
        return None
    with _open_lock:
        held = _open.get(identity)
        if held is not None:
            return held
        try:
            held = OpenCheckpoint(identity)
        except OSError:
            return None
        _open[identity] = held
        return held

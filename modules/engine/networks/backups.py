"""Where the merger keeps its backups of original weights: in the checkpoint file, or in mappings of their own.

Why not an ordinary tensor: glibc serves large requests from free memory the heap already holds
(already faulted in) before it maps fresh pages, and the UNet's big activations (attention scores)
live there from one step to the next. Backups made with the ordinary allocator take that memory after
a restore gave it back, so the steps after a merge fault in fresh pages for their activations
(measured on the full SD1.5 layout: ~1.8 GB of page faults per 256 px UNet call with a LoRA merged, 0
without, i.e. a per-step cost of the LoRA and an extra cost on the first step after each switch). A
private mapping per backup never touches the heap, so steps cost the same with and without networks,
and a restore returns the memory to the system at once (munmap when the last view dies).

Better still, no copy at all: a weight that still holds exactly the bytes it was loaded from is read
back from the checkpoint file on restore (``FileBackup``); that needs no memory and only a comparison
with the file (page cache) before the first change.

Hand-written: torch's CPU allocator has no per-tensor placement option.
"""
from __future__ import annotations

import mmap
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Mapping, TypeVar, Union

import torch

from modules.models import file_origin, libc

OWN_MAPPING_MIN_BYTES = 256 << 10   # smaller tensors: the ordinary allocator (a mapping per tensor would waste pages)
_CAN_MAP = hasattr(mmap, "MAP_PRIVATE") and hasattr(mmap, "MAP_ANONYMOUS")
_MAX_WORKERS = 4   # comparing with the file is bound by memory bandwidth beyond a few threads
K, T, R = TypeVar("K"), TypeVar("T"), TypeVar("R")


def cpu_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A CPU copy of ``tensor`` with the same values, dtype and shape (contiguous)."""
    tensor = tensor.detach()
    nbytes = tensor.numel() * tensor.element_size()
    if not _CAN_MAP or nbytes == 0 or nbytes < OWN_MAPPING_MIN_BYTES:
        return tensor.to("cpu", copy=True)
    mapping = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    # the tensor holds the mapping through the buffer protocol: unmapped when the tensor is freed
    out = torch.frombuffer(mapping, dtype=tensor.dtype, count=tensor.numel()).view(tensor.shape)
    return out.copy_(tensor)


def lives_in_own_mapping(tensor: torch.Tensor) -> bool:
    """For tests: whether ``tensor`` was placed by ``cpu_copy`` in a mapping of its own."""
    return not tensor.untyped_storage().resizable()


class FileBackup:
    """A layer's original weight that is exactly its bytes in the checkpoint file: nothing is kept in
    memory, restoring reads the bytes back (``models/file_origin.py``)."""

    def __init__(self, source: file_origin.OpenCheckpoint, origin: file_origin.Origin, like: torch.Tensor):
        self.source, self.origin = source, origin
        self.dtype, self.shape = like.dtype, tuple(like.shape)

    def restore_into(self, weight: torch.Tensor, scratch: file_origin.Scratch) -> None:
        self.source.check()
        flat = weight.detach().view(-1)
        if self.dtype == self.origin.dtype:
            self.source.read_exact(flat, self.origin.offset)   # straight into the weight: no buffer
            return
        for start, values in self.source.chunks(self.origin, self.dtype, scratch):
            flat[start:start + values.numel()].copy_(values)

    def load(self) -> torch.Tensor:
        """The original as a new tensor (for the general merge path)."""
        out = torch.empty(self.shape, dtype=self.dtype)
        self.restore_into(out, file_origin.Scratch())
        return out


Backup = Union[torch.Tensor, FileBackup]


def take(weight: torch.Tensor, scratch: file_origin.Scratch, use_file: bool = True) -> Backup:
    """The backup of a weight about to be changed: a ``FileBackup`` when the weight still holds exactly the
    bytes it was loaded from (compared with the file now), else a copy (``cpu_copy``)."""
    if use_file:
        found = _file_backup(weight, scratch)
        if found is not None:
            return found
    return cpu_copy(weight)


def take_all(weights: Mapping[K, torch.Tensor], use_file: bool = True) -> dict[K, Backup]:
    """``take`` for many weights at once, on a few threads (``_threaded``)."""
    on_cpu = all(w.device.type == "cpu" for w in weights.values())
    return dict(_threaded(lambda item, scratch: (item[0], take(item[1], scratch, use_file)), list(weights.items()),
                          on_cpu))


def restore_all(pairs: list[tuple[Backup, torch.Tensor]]) -> None:
    """``restore_into`` for many (backup, weight) pairs at once, on a few threads (``_threaded``)."""
    on_cpu = all(weight.device.type == "cpu" for _, weight in pairs)
    _threaded(lambda pair, scratch: restore_into(pair[0], pair[1], scratch), pairs, on_cpu)


def _threaded(fn: Callable[[T, file_origin.Scratch], R], items: list[T], parallel: bool = True) -> list[R]:
    """``fn(item, scratch)`` for each item on up to _MAX_WORKERS threads, each with its own scratch buffers:
    reading the file (pread) and comparing (memcmp) run outside the GIL, and one thread would leave the
    other cores idle (SD1.5's 1.25 GB of LoRA-touched layers: ~0.25 s on one thread, ~0.17 s on two).
    ``parallel`` False (GPU weights: keep their copies on the caller's thread and stream): one at a time."""
    local = threading.local()

    def one(item: T) -> R:
        if not hasattr(local, "scratch"):
            local.scratch = file_origin.Scratch()
        return fn(item, local.scratch)
    workers = min(_MAX_WORKERS, os.cpu_count() or 1, len(items)) if parallel else 1
    if workers <= 1:
        return [one(item) for item in items]
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="lora-backup") as pool:
        return list(pool.map(one, items))


def _file_backup(weight: torch.Tensor, scratch: file_origin.Scratch) -> FileBackup | None:
    origin = file_origin.origin_of(weight)
    if (origin is None or weight.device.type != "cpu" or not weight.is_contiguous()
            or weight.numel() != origin.numel or weight.is_floating_point() != origin.dtype.is_floating_point):
        return None
    source = file_origin.open_checkpoint(origin.file)
    if source is None:
        return None
    flat = weight.detach().view(-1)
    try:
        for start, values in source.chunks(origin, weight.dtype, scratch):
            if not _same_bits(values, flat[start:start + values.numel()]):
                return None   # changed since the load (an extension's edit, a merge): keep a copy
    except (OSError, file_origin.CheckpointChangedError):
        return None
    return FileBackup(source, origin, weight)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-for-bit equality of two contiguous CPU tensors of one dtype: memcmp is ~2.5x faster than
    torch.equal here (measured on 1.3 GB of SD1.5 layers), and bits, not values, are what a restore
    must give back (NaN payloads, -0.0)."""
    same = libc.same_bytes(a.data_ptr(), b.data_ptr(), a.numel() * a.element_size())
    return torch.equal(a.view(-1).view(torch.uint8), b.view(-1).view(torch.uint8)) if same is None else same


def restore_into(backup: Backup, weight: torch.Tensor, scratch: file_origin.Scratch) -> None:
    if isinstance(backup, FileBackup):
        backup.restore_into(weight, scratch)
    else:
        weight.detach().copy_(backup)   # detach: may run on a pool thread, where no_grad is not in force


def as_tensor(backup: Backup) -> torch.Tensor:
    return backup.load() if isinstance(backup, FileBackup) else backup


def resident_bytes(backup: Backup | None) -> int:
    if backup is None or isinstance(backup, FileBackup):
        return 0
    return backup.numel() * backup.element_size()

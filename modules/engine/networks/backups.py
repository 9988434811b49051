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
from typing import Union

import torch

from modules.models import file_origin

OWN_MAPPING_MIN_BYTES = 256 << 10   # smaller tensors: the ordinary allocator (a mapping per tensor would waste pages)
_CAN_MAP = hasattr(mmap, "MAP_PRIVATE") and hasattr(mmap, "MAP_ANONYMOUS")


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
    nbytes = 0   # resident bytes held

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
            if not torch.equal(values, flat[start:start + values.numel()]):
                return None   # changed since the load (an extension's edit, a merge): keep a copy
    except (OSError, file_origin.CheckpointChangedError):
        return None
    return FileBackup(source, origin, weight)


def restore_into(backup: Backup, weight: torch.Tensor, scratch: file_origin.Scratch) -> None:
    if isinstance(backup, FileBackup):
        backup.restore_into(weight, scratch)
    else:
        weight.copy_(backup)


def as_tensor(backup: Backup) -> torch.Tensor:
    return backup.load() if isinstance(backup, FileBackup) else backup


def resident_bytes(backup: Backup | None) -> int:
    if backup is None or isinstance(backup, FileBackup):
        return 0
    return backup.numel() * backup.element_size()

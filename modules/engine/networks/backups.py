"""Where the merger keeps its backups of original weights: each large one in an anonymous mapping of its own.

Why not an ordinary tensor: glibc serves large requests from free memory the heap already holds
(already faulted in) before it maps fresh pages, and the UNet's big activations (attention scores)
live there from one step to the next. Backups made with the ordinary allocator take that memory after
a restore gave it back, so the steps after a merge fault in fresh pages for their activations
(measured on the full SD1.5 layout: ~1.8 GB of page faults per 256 px UNet call with a LoRA merged, 0
without, i.e. a per-step cost of the LoRA and an extra cost on the first step after each switch). A
private mapping per backup never touches the heap, so steps cost the same with and without networks,
and a restore returns the memory to the system at once (munmap when the last view dies).

Hand-written: torch's CPU allocator has no per-tensor placement option.
"""
from __future__ import annotations

import mmap

import torch

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

"""The checkpoint merger (A1111's Checkpoint Merger tab), streaming tensor by tensor.

A1111's rules, as it applies them: the result has A's tensors (in A's order);
  No interpolation  A                 (to convert, halve, bake a VAE in or discard weights)
  Weighted sum      A * (1 - M) + B * M
  Add difference    A + (B - C) * M   (a tensor B has and C lacks adds nothing)
only tensors with "model" in their name and present in B are merged, and the CLIP position ids
are copied from A. An inpainting (9-channel) or instruct-pix2pix (8-channel) A merged with a normal
B merges B into A's first 4 input channels; the other way round is refused, as A1111 does.

Memory: a plan is made from the headers first (shapes, dtypes, every refusal), then each output
tensor is read, computed in float32, cast and written in chunks of 4M elements through working
buffers reused for the whole merge (no allocation per tensor, so no heap growth); a `.safetensors`
input is read with plain positioned reads (not mmap, whose touched pages would stay resident), so
merging two SDXL files needs tens of MB, whatever their size. `.ckpt` inputs (pickles) can only be
loaded whole (by weights_io's safe loader), and a `.ckpt` output is built whole before torch.save.

Writing: safetensors has no streaming writer, so `_write_safetensors` writes the documented format
itself (8-byte little-endian header length, JSON header padded to 8 bytes, then the tensors' bytes
in header order). The file is created through core.atomic: complete or absent, never overwriting.
"""
from __future__ import annotations

import json
import logging
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from modules.models import detection
from modules.models.merge_names import (ADD_DIFFERENCE, FORMATS, INTERP_METHODS, NO_INTERPOLATION, WEIGHTED_SUM,
                                        MergeError, MergeInterrupted)
from modules.models.weights_io import CheckpointLoadError, _read_safetensors_header_json, load_state_dict_file

log = logging.getLogger(__name__)

SKIP_ON_MERGE = ("cond_stage_model.transformer.text_model.embeddings.position_ids",)
VAE_PREFIX = "first_stage_model."

_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}


# ---------------------------------------------------------------- reading


class TensorFile:
    """One weights file, read one tensor at a time (safetensors), or loaded whole (a pickle)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._fh = None
        self._whole: dict[str, torch.Tensor] | None = None
        self._buffer = bytearray(0)
        if self.path.suffix.lower() == ".safetensors":
            header = _read_safetensors_header_json(self.path)
            self.metadata = {str(k): str(v) for k, v in (header.pop("__metadata__", None) or {}).items()}
            self._entries = header
            self._fh = open(self.path, "rb")
            self._base = 8 + int.from_bytes(self._fh.read(8), "little")
            self.shapes = {k: tuple(int(d) for d in e["shape"]) for k, e in header.items()}
            unknown = {e["dtype"] for e in header.values()} - set(_ST_DTYPES)
            if unknown:
                raise MergeError(f"{self.path.name}: tensor types {sorted(unknown)} are not supported by the merger")
            self.dtypes = {k: _ST_DTYPES[e["dtype"]] for k, e in header.items()}
        else:
            self.metadata = {}
            self._whole = load_state_dict_file(self.path)
            self.shapes = {k: tuple(v.shape) for k, v in self._whole.items()}
            self.dtypes = {k: v.dtype for k, v in self._whole.items()}

    def keys(self) -> list[str]:
        return list(self.shapes)

    def get(self, key: str) -> torch.Tensor:
        if self._whole is not None:
            return self._whole[key]
        begin, end = (int(x) for x in self._entries[key]["data_offsets"])
        self._fh.seek(self._base + begin)
        buffer = bytearray(end - begin)
        if self._fh.readinto(buffer) != len(buffer):
            raise CheckpointLoadError(self.path, f"truncated while reading {key}")
        if not buffer:
            return torch.empty(self.shapes[key], dtype=self.dtypes[key])
        return torch.frombuffer(buffer, dtype=self.dtypes[key]).reshape(self.shapes[key])

    def read(self, key: str, start: int, count: int) -> torch.Tensor:
        """Elements start..start+count of `key`, flat. For a safetensors file the result is a view of a
        buffer this file reuses for every read: use it before the next read."""
        if self._whole is not None:
            return self._whole[key].reshape(-1)[start:start + count]
        dtype = self.dtypes[key]
        size = torch.empty((), dtype=dtype).element_size()
        need = count * size
        if len(self._buffer) < need:
            self._buffer = bytearray(need)
        begin = int(self._entries[key]["data_offsets"][0]) + start * size
        self._fh.seek(self._base + begin)
        view = memoryview(self._buffer)[:need]
        if need and self._fh.readinto(view) != need:
            raise CheckpointLoadError(self.path, f"truncated while reading {key}")
        return torch.frombuffer(self._buffer, dtype=dtype, count=count) if count else torch.empty(0, dtype=dtype)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
        self._whole = None

    def __enter__(self) -> "TensorFile":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# ---------------------------------------------------------------- planning


@dataclass
class MergeSpec:
    """What to merge, resolved to files (the core resolves titles and output paths)."""
    primary: Path
    secondary: Path | None = None
    tertiary: Path | None = None
    method: str = WEIGHTED_SUM
    multiplier: float = 0.3
    save_as_half: bool = False
    output: Path = Path("merged.safetensors")
    bake_in_vae: Path | None = None
    discard_weights: str = ""
    metadata: dict[str, str] | None = None     # the safetensors header's __metadata__ (None: none)


@dataclass
class _Entry:
    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    how: str                 # "copy" | "merge" | "merge-first-4" | "vae"


@dataclass
class MergePlan:
    entries: list[_Entry]
    is_inpainting: bool = False
    is_instruct_pix2pix: bool = False
    output: Path | None = None     # the file written


def validate_spec(spec: MergeSpec) -> None:
    if spec.method not in INTERP_METHODS:
        raise MergeError(f"interpolation method must be one of {', '.join(INTERP_METHODS)}, got {spec.method!r}")
    if spec.method in (WEIGHTED_SUM, ADD_DIFFERENCE) and spec.secondary is None:
        raise MergeError(f"{spec.method} needs a secondary model (B)")
    if spec.method == ADD_DIFFERENCE and spec.tertiary is None:
        raise MergeError("Add difference needs a tertiary model (C)")
    if spec.output.suffix.lstrip(".") not in FORMATS:
        raise MergeError(f"output format must be one of {', '.join(FORMATS)}")
    if not -10 <= spec.multiplier <= 10:  # A1111's slider is 0-1; the API may go further, within reason
        raise MergeError(f"multiplier must be between -10 and 10, got {spec.multiplier}")


def _discard(pattern: str) -> Callable[[str], bool]:
    if not pattern:
        return lambda key: False
    try:
        compiled = re.compile(pattern)
    except re.error as err:
        raise MergeError(f"discard weights: {pattern!r} is not a valid regular expression ({err})") from None
    return lambda key: compiled.search(key) is not None


def _out_dtype(dtype: torch.dtype, half: bool) -> torch.dtype:
    return torch.float16 if half and dtype in (torch.float32, torch.float64) else dtype


def _family_base(f: TensorFile) -> str:
    spec = detection.detect(f.shapes)
    if not spec.supported or spec.family_info is None:
        raise MergeError(f"{f.path.name} is not a Stable Diffusion checkpoint the merger knows ({spec.reason})")
    return spec.family_info.base.value


def check_architectures(a: TensorFile, others: list[TensorFile]) -> None:
    """Refuse models of different families (SD1 with SDXL...) before anything is written."""
    base = _family_base(a)
    for other in others:
        theirs = _family_base(other)
        if theirs != base:
            raise MergeError(f"cannot merge {a.path.name} ({base}) with {other.path.name} ({theirs}): "
                             "the models have different architectures")


def _merge_how(key: str, a_shape: tuple, b_shape: tuple | None) -> str:
    if b_shape is None or key in SKIP_ON_MERGE or "model" not in key:
        return "copy"
    if a_shape == b_shape:
        return "merge"
    channels_differ = (len(a_shape) == len(b_shape) >= 2 and a_shape[0] == b_shape[0] and a_shape[2:] == b_shape[2:])
    if channels_differ:
        a_ch, b_ch = a_shape[1], b_shape[1]
        if a_ch == 4 and b_ch == 9:
            raise MergeError("When merging an inpainting model with a normal one, A must be the inpainting model.")
        if a_ch == 4 and b_ch == 8:
            raise MergeError("When merging an instruct-pix2pix model with a normal one, A must be the "
                             "instruct-pix2pix model.")
        if a_ch in (8, 9) and b_ch == 4:
            return "merge-first-4"
    raise MergeError(f"tensor {key} has shape {list(a_shape)} in A but {list(b_shape)} in the other model: "
                     "the models do not have the same architecture")


def plan_merge(spec: MergeSpec, a: TensorFile, b: TensorFile | None, c: TensorFile | None,
               vae: TensorFile | None) -> MergePlan:
    """Every output tensor, with every refusal raised before anything is written."""
    discard = _discard(spec.discard_weights)
    merging = spec.method != NO_INTERPOLATION
    plan = MergePlan(entries=[])
    vae_shapes = _vae_keys(vae) if vae is not None else {}
    for key in a.keys():
        if discard(key):
            continue
        shape = a.shapes[key]
        how = _merge_how(key, shape, b.shapes.get(key) if merging and b is not None else None)
        if how == "merge-first-4" and c is not None and key in c.shapes and c.shapes[key] != b.shapes[key]:
            raise MergeError(f"tensor {key} has shape {list(c.shapes[key])} in C but {list(b.shapes[key])} in B")
        if how == "merge-first-4":
            plan.is_inpainting |= shape[1] == 9
            plan.is_instruct_pix2pix |= shape[1] == 8
        if key in vae_shapes:
            if vae_shapes[key] != shape:
                raise MergeError(f"the VAE to bake in does not fit: {key} is {list(vae_shapes[key])} there but "
                                 f"{list(shape)} in A")
            how = "vae"
        plan.entries.append(_Entry(key, shape, _out_dtype(a.dtypes[key], spec.save_as_half), how))
    if vae is not None and not any(e.how == "vae" for e in plan.entries):
        raise MergeError(f"the VAE {vae.path.name} has no weights in common with A's VAE: not an LDM-format VAE "
                         "for this model")
    return plan


def _vae_keys(vae: TensorFile) -> dict[str, tuple[int, ...]]:
    """The VAE file's tensors under A's names (`first_stage_model.` + the plain VAE key)."""
    return {VAE_PREFIX + k.removeprefix(VAE_PREFIX): s for k, s in vae.shapes.items()}


# ---------------------------------------------------------------- computing

CHUNK = 1 << 22   # elements computed at a time: the working buffers are a few tens of MB, reused


class _Buffers:
    """Working buffers reused for every chunk: no allocation (nor page faults) per tensor."""

    def __init__(self) -> None:
        self._bufs: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    def get(self, name: str, dtype: torch.dtype, count: int) -> torch.Tensor:
        buf = self._bufs.get((name, dtype))
        if buf is None or buf.numel() < count:
            buf = self._bufs[(name, dtype)] = torch.empty(max(count, CHUNK), dtype=dtype)
        return buf[:count]


def _chunks(spec: MergeSpec, e: _Entry, files: tuple, work: _Buffers) -> Iterator[torch.Tensor]:
    """The output tensor `e`, flat, in chunks (each valid until the next is made)."""
    a, b, c, vae = files
    if e.how == "merge-first-4":  # the input conv of an inpainting model: small, done whole
        yield _merge_first_4(spec, e, a, b, c).reshape(-1)
        return
    source, key = (vae, _vae_names(vae)[e.key]) if e.how == "vae" else (a, e.key)
    total = _numel(e.shape)
    for start in range(0, total, CHUNK):
        count = min(CHUNK, total - start)
        part = source.read(key, start, count)
        if e.how == "merge":
            part = _merge_chunk(spec, e.key, start, count, part, b, c, work)
        if part.dtype != e.dtype:
            part = work.get("out", e.dtype, count).copy_(part)
        yield part


def _merge_chunk(spec: MergeSpec, key: str, start: int, count: int, part_a: torch.Tensor, b: TensorFile,
                 c: TensorFile | None, work: _Buffers) -> torch.Tensor:
    """A*(1-M) + B*M or A + (B-C)*M in float32, in place in the working buffers."""
    m = float(spec.multiplier)
    wa = work.get("a", torch.float32, count).copy_(part_a)
    wb = work.get("b", torch.float32, count).copy_(b.read(key, start, count))
    if spec.method == WEIGHTED_SUM:
        wa.mul_(1 - m)
        wb.mul_(m)
    elif key in c.shapes:
        wb.sub_(work.get("c", torch.float32, count).copy_(c.read(key, start, count)))
        wb.mul_(m)
    else:
        wb.zero_()  # B has it, C does not: A1111 adds nothing
    return wa.add_(wb)


def _merge_first_4(spec: MergeSpec, e: _Entry, a: TensorFile, b: TensorFile, c: TensorFile | None) -> torch.Tensor:
    """A1111's rule for an inpainting (9) or instruct-pix2pix (8) A with a normal B: B goes into A's first 4
    input channels."""
    m = float(spec.multiplier)
    out = a.get(e.key).float().clone()
    tb = b.get(e.key).float()
    if spec.method == WEIGHTED_SUM:
        out[:, :4] = out[:, :4] * (1 - m) + tb * m
    else:
        diff = tb - c.get(e.key).float() if e.key in c.shapes else torch.zeros_like(tb)
        out[:, :4] = out[:, :4] + diff * m
    return out.to(e.dtype)


def _vae_names(vae: TensorFile) -> dict[str, str]:
    return {VAE_PREFIX + k.removeprefix(VAE_PREFIX): k for k in vae.keys()}


# ---------------------------------------------------------------- writing


def _header(plan: MergePlan, metadata: dict[str, str] | None) -> bytes:
    header: dict[str, Any] = {}
    offset = 0
    for e in plan.entries:
        size = _numel(e.shape) * torch.empty((), dtype=e.dtype).element_size()
        header[e.key] = {"dtype": _ST_NAMES[e.dtype], "shape": list(e.shape), "data_offsets": [offset, offset + size]}
        offset += size
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    return raw + b" " * (-len(raw) % 8)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _write_safetensors(fh, spec: MergeSpec, plan: MergePlan, files: tuple, tick: Callable[[int, int], None]) -> None:
    header = _header(plan, spec.metadata)
    fh.write(len(header).to_bytes(8, "little"))
    fh.write(header)
    work = _Buffers()
    for i, e in enumerate(plan.entries):
        for chunk in _chunks(spec, e, files, work):
            fh.write(chunk.contiguous().view(torch.uint8).numpy().data)
        tick(i + 1, len(plan.entries))


def _write_ckpt(fh, spec: MergeSpec, plan: MergePlan, files: tuple, tick: Callable[[int, int], None]) -> None:
    """A pickle holds the whole model: built tensor by tensor, then torch.save."""
    out: dict[str, torch.Tensor] = {}
    work = _Buffers()
    for i, e in enumerate(plan.entries):
        whole, pos = torch.empty(_numel(e.shape), dtype=e.dtype), 0
        for chunk in _chunks(spec, e, files, work):
            whole[pos:pos + chunk.numel()].copy_(chunk)
            pos += chunk.numel()
        out[e.key] = whole.reshape(e.shape)
        tick(i + 1, len(plan.entries))
    torch.save({"state_dict": out}, fh)


def _check_space(plan: MergePlan) -> None:
    """Refuse a merge the disk cannot hold, rather than failing (and filling it) near the end."""
    need = sum(_numel(e.shape) * torch.empty((), dtype=e.dtype).element_size() for e in plan.entries)
    free = shutil.disk_usage(plan.output.parent).free
    if need + (64 << 20) > free:
        raise MergeError(f"not enough disk space for the merged model: it needs {need / 2**30:.2f} GiB, "
                         f"{free / 2**30:.2f} GiB are free in {plan.output.parent}")


def run_merge(spec: MergeSpec, *, progress: Callable[[int, int], None] = lambda i, n: None,
              should_stop: Callable[[], bool] = lambda: False, create: Callable[[Path], Any],
              output_for: Callable[[MergePlan], Path] | None = None) -> MergePlan:
    """Merge into `spec.output` (or `output_for(plan)`: A1111 names inpainting results `*.inpainting.*`),
    which `create(path)` opens as a new file (core.atomic: all or nothing, never overwriting).
    Returns the plan, with the file written."""
    validate_spec(spec)

    def tick(i: int, n: int) -> None:
        if should_stop():
            raise MergeInterrupted("the merge was interrupted; nothing was written")
        progress(i, n)

    files = [TensorFile(p) if p is not None else None
             for p in (spec.primary, spec.secondary if spec.method != NO_INTERPOLATION else None,
                       spec.tertiary if spec.method == ADD_DIFFERENCE else None, spec.bake_in_vae)]
    try:
        a, b, c, vae = files
        check_architectures(a, [f for f in (b, c) if f is not None])
        plan = plan_merge(spec, a, b, c, vae)
        plan.output = output_for(plan) if output_for is not None else spec.output
        _check_space(plan)
        with create(plan.output) as fh:
            write = _write_safetensors if plan.output.suffix == ".safetensors" else _write_ckpt
            write(fh, spec, plan, (a, b, c, vae), tick)
        return plan
    finally:
        for f in files:
            if f is not None:
                f.close()

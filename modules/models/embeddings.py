"""Textual-inversion embeddings: the files in ``embeddings/`` (recursive), their formats, and which ones
fit the loaded model.

Formats (A1111 v1.10's, read with our own code):

* ``string_to_param``: A1111/original TI ``.pt`` (``{"string_to_param": {"*": [n, D]}, "name", "step",
  "sd_checkpoint", "sd_checkpoint_name", ...}``), also inside PNG/WEBP images (image_embedding.py);
* one tensor under one key: diffusers ``.bin`` (``{"<token>": [D]}``), kohya ``emb_params`` safetensors;
* SDXL: ``clip_l`` [n, 768] and ``clip_g`` [n, 1280] in one file.

An embedding's ``shape`` is its total width (clip_l + clip_g for SDXL). It must fit the loaded model's
text encoders (``fits``: a single tensor a one-encoder model of its width, a clip_l/clip_g pair an SDXL
model of those widths); otherwise it is skipped and listed as skipped, as A1111 does. Pickles are
read only by weights_io (torch's weights-only loader). Everything is bounded: file size, vector count.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np

from modules.models import image_embedding

if TYPE_CHECKING:
    import torch

# torch (through weights_io and network_files) is imported when the first file is read, so building
# the database at startup costs nothing.

log = logging.getLogger(__name__)

EMBEDDING_EXTENSIONS = (".pt", ".bin", ".safetensors", *image_embedding.IMAGE_SUFFIXES)
MAX_EMBEDDING_FILE_BYTES = 64 * 1024 * 1024   # real embeddings are KBs; this is not one
MAX_VECTORS = 75                              # A1111 never splits an embedding across 75-token chunks
MAX_EMBEDDINGS = 10_000
MAX_OVERLAYS = 32                             # bundled-embedding sets kept per file set (LoRA combinations)
SDXL_KEYS = ("clip_l", "clip_g")
HASH_PREFIX = "textual_inversion/"


class EmbeddingFormatError(ValueError):
    """The file is not an embedding in a format we know."""


@dataclass(eq=False)
class Embedding:
    """One embedding. ``vectors`` maps an encoder key to [count, width] float32 tensors: "clip_l"/"clip_g"
    for SDXL pairs, "" for a single tensor (any one-encoder model of that width)."""
    name: str
    vectors: dict[str, torch.Tensor]
    path: Path | None = None
    step: int | None = None
    sd_checkpoint: str | None = None
    sd_checkpoint_name: str | None = None
    sha256: str | None = None
    # What ``TI hashes`` shows instead of the file's hash: a LoRA's bundled embedding shows the LoRA's
    # name there, as A1111 does (the bundle has no file of its own to hash).
    infotext_hash: str | None = None

    @property
    def shape(self) -> int:
        return sum(int(v.shape[-1]) for v in self.vectors.values())

    @property
    def count(self) -> int:
        return int(next(iter(self.vectors.values())).shape[0])

    @property
    def shorthash(self) -> str | None:
        if self.infotext_hash:
            return self.infotext_hash
        return self.sha256[:12] if self.sha256 else None

    def for_encoder(self, key: str) -> torch.Tensor | None:
        """The vectors for an encoder ("clip_l"/"clip_g"; "" for the lone encoder of a one-encoder model)."""
        return self.vectors.get(key) if key in self.vectors else self.vectors.get("")

    def api_dict(self) -> dict[str, Any]:
        return {"step": self.step, "sd_checkpoint": self.sd_checkpoint,
                "sd_checkpoint_name": self.sd_checkpoint_name, "shape": self.shape, "vectors": self.count}


def _as_tensor(value: Any, what: str) -> torch.Tensor:
    import torch
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(value)
    if not isinstance(value, torch.Tensor):
        raise EmbeddingFormatError(f"{what} is a {type(value).__name__}, not a tensor")
    t = value.detach().to(device="cpu", dtype=torch.float32)
    if t.dim() == 1:
        t = t.unsqueeze(0)
    if t.dim() != 2 or t.shape[0] < 1 or t.shape[1] < 1:
        raise EmbeddingFormatError(f"{what} has shape {tuple(value.shape)}, not [vectors, width]")
    if not torch.isfinite(t).all():
        raise EmbeddingFormatError(f"{what} holds NaN or infinite values")
    return t


Layout = tuple[tuple[str, int], ...]
"""A model's text encoders as (embedding key, width): (("clip_l", 768),) for SD1, clip_l + clip_g for SDXL."""


def fits(embedding: Embedding, layout: Layout | None) -> bool:
    """Whether the embedding's vectors fit these encoders (None: no model known, everything fits)."""
    if layout is None:
        return True
    if set(embedding.vectors) == {""}:
        return len(layout) == 1 and layout[0][1] == embedding.shape
    return dict(layout) == {k: int(v.shape[-1]) for k, v in embedding.vectors.items()}


def _int_or_none(value: Any) -> int | None:
    try:
        return None if value is None else int(value)
    except (TypeError, ValueError):
        return None


def _str_or_none(value: Any) -> str | None:
    return None if value is None else str(value)


def _vectors_of(data: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    if "string_to_param" in data:
        params = data["string_to_param"]
        if not isinstance(params, Mapping) or len(params) != 1:
            raise EmbeddingFormatError("string_to_param must hold exactly one tensor")
        return {"": _as_tensor(next(iter(params.values())), "string_to_param")}
    if all(k in data for k in SDXL_KEYS):
        pair = {k: _as_tensor(data[k], k) for k in SDXL_KEYS}
        if pair["clip_l"].shape[0] != pair["clip_g"].shape[0]:
            raise EmbeddingFormatError("clip_l and clip_g have different vector counts")
        return pair
    import torch

    tensors = {k: v for k, v in data.items() if isinstance(v, (torch.Tensor, np.ndarray))}
    if len(tensors) == 1 and len(data) == 1:   # diffusers .bin {"<token>": [D]}, kohya {"emb_params": [n, D]}
        key, value = next(iter(tensors.items()))
        return {"": _as_tensor(value, key)}
    raise EmbeddingFormatError("neither a textual inversion embedding (string_to_param, emb_params, clip_l/clip_g) "
                               "nor a one-tensor embedding")


def embedding_from_data(data: Any, name: str, path: Path | None = None) -> Embedding:
    """Build an Embedding from a file's decoded contents (one of A1111's formats)."""
    if not isinstance(data, Mapping):
        raise EmbeddingFormatError(f"it contains a {type(data).__name__}, not a dict")
    vectors = _vectors_of(data)
    emb = Embedding(name=name, vectors=vectors, path=path, step=_int_or_none(data.get("step")),
                    sd_checkpoint=_str_or_none(data.get("sd_checkpoint")),
                    sd_checkpoint_name=_str_or_none(data.get("sd_checkpoint_name")))
    if emb.count > MAX_VECTORS:
        raise EmbeddingFormatError(f"it has {emb.count} vectors; at most {MAX_VECTORS} fit in one prompt chunk")
    return emb




def read_embedding_file(path: Path) -> tuple[str, Any] | None:
    """(name, decoded data) of one file; None for an image that carries no embedding."""
    size = path.stat().st_size
    if size > MAX_EMBEDDING_FILE_BYTES:
        raise EmbeddingFormatError(f"the file is {size} bytes; embeddings are at most {MAX_EMBEDDING_FILE_BYTES}")
    suffix = path.suffix.lower()
    name = path.stem
    if suffix in image_embedding.IMAGE_SUFFIXES:
        data = image_embedding.read_image_embedding(path)
        if data is None:
            return None
        return str(data.get("name") or name), data
    from modules.models import weights_io

    if suffix == ".safetensors":
        return name, weights_io.load_state_dict_file(path)
    return name, weights_io.load_pickled_object(path)


def _is_preview(path: Path) -> bool:
    # A1111 skips "*.preview.*" pictures: they are cards' previews, not embeddings.
    return ".preview" in path.name.lower()


@dataclass
class EmbeddingReport:
    loaded: dict[str, Embedding] = field(default_factory=dict)
    skipped: dict[str, Embedding] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)   # relpath -> why


class EmbeddingSet:
    """The embeddings usable with one model width: name lookup by token ids, for the prompt encoder.

    ``key`` changes whenever the set does, so encoders that cache conditioning can key on it."""

    def __init__(self, embeddings: Mapping[str, Embedding], key: Any, base: EmbeddingSet | None = None):
        self.embeddings = dict(embeddings)
        self.key = key
        self.base = base   # the database's own set this one extends (None: it is that set)
        self._lookups: dict[int, dict[int, list[tuple[tuple[int, ...], Embedding]]]] = {}
        self._lock = threading.Lock()
        self._overlays: dict[Any, EmbeddingSet] = {}

    def with_extra(self, extra: Mapping[str, Embedding]) -> EmbeddingSet:
        """This set plus `extra` (a job's LoRA-bundled embeddings; names already here win). The same
        extras give the same object, so the encoder's cache and token lookups are reused across jobs."""
        if not extra:
            return self
        tag = tuple((name, id(emb)) for name, emb in extra.items())
        with self._lock:
            found = self._overlays.get(tag)
            if found is None:
                if len(self._overlays) >= MAX_OVERLAYS:
                    self._overlays.clear()
                merged = {**extra, **self.embeddings}
                found = self._overlays[tag] = EmbeddingSet(merged, key=(self.key, "extra", tag), base=self)
            return found

    def __bool__(self) -> bool:
        return bool(self.embeddings)

    def lookup(self, tokenizer) -> dict[int, list[tuple[tuple[int, ...], Embedding]]]:
        """first token id -> [(name's token ids, embedding)], longest names first (as A1111 matches)."""
        with self._lock:
            table = self._lookups.get(id(tokenizer))
            if table is None:
                table = {}
                names = list(self.embeddings)
                ids = tokenizer(names, add_special_tokens=False, verbose=False)["input_ids"] if names else []
                for name, name_ids in zip(names, ids):
                    if name_ids:
                        table.setdefault(name_ids[0], []).append((tuple(name_ids), self.embeddings[name]))
                for entries in table.values():
                    entries.sort(key=lambda e: -len(e[0]))
                self._lookups[id(tokenizer)] = table
            return table


EMPTY_SET = EmbeddingSet({}, key=None)


class EmbeddingDatabase:
    """All embeddings under the roots; reloaded on demand, when files change, or when the model width does."""

    def __init__(self, roots: list[Path], hash_cache=None, *, hashing: bool = True):
        self.roots = [Path(r) for r in roots]
        self.hash_cache = hash_cache
        self.hashing = hashing
        self._lock = threading.RLock()
        self._files: list[Any] = []
        self._parsed: dict[Path, Embedding | str | None] = {}   # path -> embedding, error text, or not one
        self._signature: tuple | None = None
        self._layout: int | None = None
        self._report = EmbeddingReport()
        self._generation = 0
        self._set = EMPTY_SET
        self._registered: dict[str, Embedding] = {}   # in memory, no file (extensions' register_embedding)
        self._dirty = False

    def _scan_signature(self) -> tuple:
        from modules.models.network_files import scan_network_files

        files = [f for f in scan_network_files(self.roots, EMBEDDING_EXTENSIONS) if not _is_preview(f.path)]
        stamp = []
        for f in files[:MAX_EMBEDDINGS]:
            try:
                st = f.path.stat()
            except OSError:
                continue
            stamp.append((str(f.path), st.st_mtime_ns, st.st_size))
        self._files = files[:MAX_EMBEDDINGS]
        return tuple(stamp)

    def _parse(self, nf) -> Embedding | str | None:
        from modules.models.weights_io import CheckpointLoadError

        try:
            read = read_embedding_file(nf.path)
            if read is None:
                return None
            name, data = read
            emb = embedding_from_data(data, name, nf.path)
        except (OSError, ValueError, CheckpointLoadError) as exc:
            return str(exc)
        if self.hashing and self.hash_cache is not None:
            try:
                emb.sha256 = self.hash_cache.sha256(nf.path, HASH_PREFIX + name)
            except OSError as exc:
                log.warning("Could not hash %s: %s", nf.path, exc)
        return emb

    def load(self, layout: Layout | None, *, force: bool = False) -> EmbeddingReport:
        """(Re)load when forced, when a file changed, or when the model's encoders changed; classify by
        `layout` (None: no model known, nothing is skipped)."""
        with self._lock:
            signature = self._scan_signature()
            if not force and not self._dirty and signature == self._signature and layout == self._layout:
                return self._report
            old = self._parsed if not force else {}
            self._parsed = {}
            stamps = {s[0]: s for s in signature}
            old_stamps = {s[0]: s for s in (self._signature or ())}
            for nf in self._files:
                key = str(nf.path)
                reuse = key in old_stamps and old_stamps[key] == stamps.get(key) and nf.path in old
                self._parsed[nf.path] = old[nf.path] if reuse else self._parse(nf)
            self._signature, self._layout, self._dirty = signature, layout, False
            self._report = self._classify(layout)
            self._generation += 1
            self._set = EmbeddingSet(self._report.loaded, key=("embeddings", id(self), self._generation))
            log.info("Textual inversion embeddings loaded(%d): %s", len(self._report.loaded),
                     ", ".join(self._report.loaded))
            if self._report.skipped:
                log.info("Textual inversion embeddings skipped(%d): %s", len(self._report.skipped),
                         ", ".join(self._report.skipped))
            return self._report

    def _classify(self, layout: Layout | None) -> EmbeddingReport:
        report = EmbeddingReport()
        for nf in self._files:
            parsed = self._parsed.get(nf.path)
            if isinstance(parsed, str):
                report.failed[nf.relpath] = parsed
                log.warning("Embedding %s was not loaded: %s", nf.path, parsed)
            elif isinstance(parsed, Embedding):
                if parsed.name in report.loaded or parsed.name in report.skipped:
                    log.warning("Embedding name %r is used twice; %s is ignored", parsed.name, nf.path)
                    continue
                (report.loaded if fits(parsed, layout) else report.skipped)[parsed.name] = parsed
        for name, emb in self._registered.items():   # a registered embedding replaces a file's (as A1111)
            report.loaded.pop(name, None)
            report.skipped.pop(name, None)
            (report.loaded if fits(emb, layout) else report.skipped)[name] = emb
        return report

    def register(self, embedding: Embedding, name: str | None = None) -> None:
        """Use an in-memory embedding under `name` (default its own) from the next job on, in place of
        a file's of that name. Unlike A1111 it survives rescans, until ``unregister``."""
        name = name or embedding.name
        with self._lock:
            if name not in self._registered and len(self._registered) >= MAX_EMBEDDINGS:
                raise ValueError(f"at most {MAX_EMBEDDINGS} embeddings can be registered")
            self._registered[name] = embedding
            self._dirty = True

    def unregister(self, name: str) -> bool:
        """Forget a registered embedding (a file of that name is used again); False if none was."""
        with self._lock:
            found = self._registered.pop(name, None) is not None
            self._dirty = self._dirty or found
            return found

    def invalidate(self) -> None:
        """Reread every file at the next use (a model was loaded: A1111 reloads its embeddings then)."""
        with self._lock:
            self._signature = None

    def refresh(self, layout: Layout | None = None) -> EmbeddingReport:
        """Rescan and reread every file (the API's refresh-embeddings, the UI's refresh)."""
        with self._lock:
            return self.load(self._layout if layout is None else layout, force=True)

    def for_layout(self, layout: Layout) -> EmbeddingSet:
        """The usable set for a model with these text encoders (rescanning first if a file changed)."""
        with self._lock:
            self.load(layout)
            return self._set

    def report(self, layout: Layout | None = None) -> EmbeddingReport:
        """Loaded and skipped, for `layout` (default: the last model's), rescanning if a file changed."""
        with self._lock:
            return self.load(self._layout if layout is None else layout)

    @property
    def layout(self) -> Layout | None:
        return self._layout


def api_response(report: EmbeddingReport) -> dict[str, Any]:
    """A1111's GET /sdapi/v1/embeddings shape."""
    return {"loaded": {n: e.api_dict() for n, e in report.loaded.items()},
            "skipped": {n: e.api_dict() for n, e in report.skipped.items()}}

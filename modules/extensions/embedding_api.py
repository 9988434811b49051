"""A1111's textual-inversion objects for extensions: ``Embedding`` and ``model_hijack.embedding_db``, over
models/embeddings.py (the one database the prompt encoder uses).

``embedding_db.word_embeddings`` / ``skipped_embeddings`` are name -> Embedding for the loaded model (the last
one used when none is loaded), each with A1111's ``vec``, ``shape``, ``vectors``, ``step``, ``filename``,
``hash``/``shorthash``; ``load_textual_inversion_embeddings(force_reload=True)`` rereads the files.
``register_embedding`` / ``register_embedding_by_name`` add in-memory embeddings no file holds (the
database's ``register``); ``ids_lookup`` is the loaded model's name-token table; ``Embedding.checksum()``
A1111's 4-hex-digit checksum of the vectors.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Callable, Iterable

from modules.core.atomic import atomic_write_bytes


class Embedding:
    """A1111's ``textual_inversion.Embedding``: ``vec`` is a [vectors, width] tensor, or for SDXL a dict
    ``{"clip_l": ..., "clip_g": ...}``; ``shape`` the total width."""

    def __init__(self, vec: Any, name: str, step: int | None = None):
        self.vec, self.name, self.step = vec, name, step
        self.shape: int | None = None
        self.vectors = 0
        self.cached_checksum: str | None = None
        self.sd_checkpoint: str | None = None
        self.sd_checkpoint_name: str | None = None
        self.optimizer_state_dict = None
        self.filename: str | None = None
        self.hash: str | None = None
        self.shorthash: str | None = None
        if vec is not None:
            tensors = list(vec.values()) if isinstance(vec, dict) else [vec]
            self.shape = sum(int(t.shape[-1]) for t in tensors)
            self.vectors = int(tensors[0].shape[0]) if tensors[0].dim() > 1 else 1

    def checksum(self) -> str:
        """A1111's short checksum: 4 hex digits of a 32-bit rolling hash over the vectors times 100
        (each truncated to an int). An SDXL pair hashes clip_l's values, then clip_g's (A1111 has no
        formula for pairs). Cached, as A1111's: it is computed once."""
        if self.cached_checksum is None:
            tensors = ([self.vec[k] for k in sorted(self.vec, key=lambda k: (k != "clip_l", k))]
                       if isinstance(self.vec, dict) else [self.vec])
            values = (v for t in tensors for v in (t.detach().reshape(-1) * 100).tolist())
            self.cached_checksum = f"{_rolling_hash(values) & 0xFFFF:04x}"
        return self.cached_checksum

    def to_model(self, name: str | None = None) -> Any:
        """A models.embeddings.Embedding of a snapshot of ``vec`` (checked as a file's would be: finite,
        [vectors, width], at most 75 vectors; ValueError otherwise)."""
        from modules.models.embeddings import embedding_from_data

        if self.vec is None:
            raise ValueError(f"embedding {self.name!r} has no vectors")
        if isinstance(self.vec, dict):
            data: dict[str, Any] = {k: v.detach().clone() for k, v in self.vec.items()}
        else:
            data = {"string_to_param": {"*": self.vec.detach().clone()}}
        out = embedding_from_data(data, name or self.name, Path(self.filename) if self.filename else None)
        out.step, out.sd_checkpoint, out.sd_checkpoint_name = self.step, self.sd_checkpoint, self.sd_checkpoint_name
        out.sha256, out.infotext_hash = self.hash, self.shorthash or None
        return out

    def set_hash(self, value: str | None) -> None:
        self.hash = value
        self.shorthash = value[:12] if value else value

    def save(self, filename: str) -> None:
        """A1111's ``.pt`` layout (``string_to_param``; SDXL: ``clip_l``/``clip_g``), written atomically."""
        import torch

        meta = {"name": self.name, "step": self.step, "sd_checkpoint": self.sd_checkpoint,
                "sd_checkpoint_name": self.sd_checkpoint_name}
        if isinstance(self.vec, dict):
            data = {**{k: v.detach().cpu() for k, v in self.vec.items()}, **meta}
        else:   # the token id 265 is what A1111's files carry under string_to_token; nothing reads it
            data = {"string_to_token": {"*": 265}, "string_to_param": {"*": self.vec.detach().cpu()}, **meta}
        buffer = io.BytesIO()
        torch.save(data, buffer)
        atomic_write_bytes(filename, buffer.getvalue())

    @classmethod
    def from_model(cls, embedding: Any) -> "Embedding":
        """models.embeddings.Embedding -> this shape (vectors are shared, not copied)."""
        vectors = embedding.vectors
        vec = vectors[""] if set(vectors) == {""} else dict(vectors)
        out = cls(vec, embedding.name, embedding.step)
        out.sd_checkpoint, out.sd_checkpoint_name = embedding.sd_checkpoint, embedding.sd_checkpoint_name
        out.filename = str(embedding.path) if embedding.path is not None else None
        out.set_hash(embedding.sha256)
        return out


def _rolling_hash(values: Iterable[float]) -> int:
    """The 32-bit hash A1111's checksum takes: each value truncated to an int, mixed in by *281 and ^*997."""
    acc = 0
    for value in values:
        acc = ((acc * 281) ^ (int(value) * 997)) & 0xFFFFFFFF
    return acc


class EmbeddingDatabaseView:
    """A1111's ``model_hijack.embedding_db`` over the app's database (``services`` gives the bound app)."""

    def __init__(self, services: Callable[[], Any]):
        self._services = services
        self._seen: tuple[Any, dict[str, Embedding], dict[str, Embedding]] | None = None
        self._origins: dict[str, tuple[Any, Embedding]] = {}   # registered: (database's copy, extension's object)

    def _generation(self) -> Any:
        services = self._services()
        if services is None:
            raise RuntimeError("embedding_db is used before the app was built (modules.shared.bind)")
        return services.generation

    def load_textual_inversion_embeddings(self, force_reload: bool = False) -> None:
        self._views(self._generation().embeddings_report(refresh=force_reload))

    def _views(self, report: Any) -> tuple[dict[str, Embedding], dict[str, Embedding]]:
        """Adapters built once per loaded set (the same objects until the files or the model change)."""
        if self._seen is None or self._seen[0] is not report:
            self._seen = (report, {n: self._adapter(n, e) for n, e in report.loaded.items()},
                          {n: self._adapter(n, e) for n, e in report.skipped.items()})
        return self._seen[1], self._seen[2]

    def _adapter(self, name: str, embedding: Any) -> Embedding:
        """A registered embedding is the extension's own object again (as in A1111); others are adapters."""
        origin = self._origins.get(name)
        return origin[1] if origin is not None and origin[0] is embedding else Embedding.from_model(embedding)

    def _database(self) -> Any:
        database = self._generation().embeddings
        if database is None:
            raise RuntimeError("this app has no embedding database")
        return database

    def register_embedding(self, embedding: Embedding, model: Any = None) -> Embedding:
        return self.register_embedding_by_name(embedding, model, embedding.name)

    def register_embedding_by_name(self, embedding: Embedding | None, model: Any, name: str) -> Embedding | None:
        """A1111's: use `embedding` under `name` from the next job on (a snapshot of its vectors: register
        again after changing them); None forgets `name`. `model` is not needed: names are tokenized by
        the model that uses them. Unlike A1111's, it survives a reload of the files."""
        database = self._database()
        if embedding is None:
            database.unregister(name)
            self._origins.pop(name, None)
            return None
        copy = embedding.to_model(name)
        database.register(copy, name)
        self._origins[name] = (copy, embedding)
        return embedding

    @property
    def ids_lookup(self) -> dict[int, list[tuple[list[int], Embedding]]]:
        """A1111's: first token id -> [(the name's token ids, Embedding)], longest names first, for the
        loaded model ({} when none is). A fresh dict: change embeddings through register_embedding."""
        table = self._generation().embeddings_lookup()
        loaded = self.word_embeddings
        return {first: [(list(ids), loaded.get(e.name) or Embedding.from_model(e)) for ids, e in entries]
                for first, entries in table.items()}

    @property
    def expected_shape(self) -> int:
        """A1111's: the width an embedding needs for the last model used (-1 when none was)."""
        layout = self._database().layout
        return sum(width for _, width in layout) if layout else -1

    @property
    def word_embeddings(self) -> dict[str, Embedding]:
        return self._views(self._generation().embeddings_report())[0]

    @property
    def skipped_embeddings(self) -> dict[str, Embedding]:
        return self._views(self._generation().embeddings_report())[1]

    @property
    def embedding_dirs(self) -> dict[str, Path]:
        database = self._generation().embeddings
        return {str(root): root for root in (database.roots if database is not None else [])}

    def add_embedding_dir(self, path: str) -> None:
        """Another folder scanned for embeddings (its files are read at the next use)."""
        database = self._generation().embeddings
        root = Path(path).expanduser().resolve()
        if database is not None and root not in database.roots:
            database.roots.append(root)
            database.invalidate()


class ModelHijack:
    """A1111's ``sd_hijack.model_hijack``, as far as extensions read it: its embedding database."""

    def __init__(self, services: Callable[[], Any]):
        self.embedding_db = EmbeddingDatabaseView(services)

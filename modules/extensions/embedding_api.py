"""A1111's textual-inversion objects for extensions: ``Embedding`` and ``model_hijack.embedding_db``, over
models/embeddings.py (the one database the prompt encoder uses).

``embedding_db.word_embeddings`` / ``skipped_embeddings`` are name -> Embedding for the loaded model (the last
one used when none is loaded), each with A1111's ``vec``, ``shape``, ``vectors``, ``step``, ``filename``,
``hash``/``shorthash``; ``load_textual_inversion_embeddings(force_reload=True)`` rereads the files.
Not provided: ``register_embedding`` (in-memory embeddings that no file holds) and ``Embedding.checksum``.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Callable

from modules.core.atomic import atomic_write_bytes


class Embedding:
    """A1111's ``textual_inversion.Embedding``: ``vec`` is a [vectors, width] tensor, or for SDXL a dict
    ``{"clip_l": ..., "clip_g": ...}``; ``shape`` the total width."""

    def __init__(self, vec: Any, name: str, step: int | None = None):
        self.vec, self.name, self.step = vec, name, step
        self.shape: int | None = None
        self.vectors = 0
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


class EmbeddingDatabaseView:
    """A1111's ``model_hijack.embedding_db`` over the app's database (``services`` gives the bound app)."""

    def __init__(self, services: Callable[[], Any]):
        self._services = services
        self._seen: tuple[Any, dict[str, Embedding], dict[str, Embedding]] | None = None

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
            self._seen = (report, {n: Embedding.from_model(e) for n, e in report.loaded.items()},
                          {n: Embedding.from_model(e) for n, e in report.skipped.items()})
        return self._seen[1], self._seen[2]

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

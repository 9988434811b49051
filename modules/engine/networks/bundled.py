"""Textual-inversion embeddings bundled inside LoRA files.

kohya-style bundles (which A1111 reads) store them beside the network tensors as
``bundle_emb.<name>.string_to_param.<token>`` (A1111's ``.pt`` layout), ``bundle_emb.<name>.clip_l`` /
``.clip_g`` (SDXL), or one tensor under another part name (``bundle_emb.<name>.emb_params``, kohya's
embedding file). We also read a bare ``bundle_emb.<name>`` as a one-tensor embedding (A1111 cannot).
A name holds no ``.``: the first dot ends it, as in A1111.

While the LoRA is active in a job, its embeddings are usable by name in that job's prompts
(activation.py adds them to the prompt encoder's set); names loaded from ``embeddings/`` win.
The vectors go through models/embeddings.py's own checks (finite, [vectors, width], at most 75).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from modules.models.embeddings import Embedding, EmbeddingFormatError, embedding_from_data

PREFIX = "bundle_emb."
STRING_TO_PARAM = "string_to_param."
MAX_BUNDLED = 256   # embeddings one LoRA file may carry; more is not a LoRA we trust


@dataclass
class Bundle:
    """One LoRA file's bundled embeddings, parsed once (kept as long as the parsed file is)."""
    embeddings: dict[str, Embedding] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)          # name -> why it is not usable
    _labelled: dict[str | None, dict[str, Embedding]] = field(default_factory=dict, repr=False)

    def labelled(self, label: str | None) -> dict[str, Embedding]:
        """The embeddings with ``TI hashes`` showing `label` (the LoRA's name; None: left out of the
        infotext). The same label gives the same objects, so the encoder's cache stays warm."""
        found = self._labelled.get(label)
        if found is None:
            found = self._labelled[label] = {n: dataclasses.replace(e, infotext_hash=label)
                                             for n, e in self.embeddings.items()}
        return found


def split_bundle(state_dict: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """The network tensors, and each bundled embedding's tensors in an embedding file's layout
    (``{"string_to_param": {token: t}}``, ``{"clip_l": t, "clip_g": t}``, ``{"emb_params": t}``)."""
    network: dict[str, Any] = {}
    bundles: dict[str, dict[str, Any]] = {}
    for key, tensor in state_dict.items():
        if not key.startswith(PREFIX):
            network[key] = tensor
            continue
        name, _, part = key[len(PREFIX):].partition(".")
        data = bundles.setdefault(name, {})
        if part.startswith(STRING_TO_PARAM):
            data.setdefault("string_to_param", {})[part[len(STRING_TO_PARAM):]] = tensor
        else:
            data[part or "emb_params"] = tensor
    return network, bundles


def read_bundle(bundles: Mapping[str, Mapping[str, Any]], source: Path) -> Bundle:
    """Embeddings from `split_bundle`'s data; a malformed one is listed in ``failed``, never raised."""
    out = Bundle()
    for i, (name, data) in enumerate(bundles.items()):
        if i >= MAX_BUNDLED:
            out.failed[name] = f"the file bundles more than {MAX_BUNDLED} embeddings"
            continue
        try:
            if not name.strip():
                raise EmbeddingFormatError("it has no name")
            out.embeddings[name] = embedding_from_data(data, name, source)
        except EmbeddingFormatError as exc:
            out.failed[name] = str(exc)
    return out

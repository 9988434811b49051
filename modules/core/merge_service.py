"""Checkpoint merging as a queued job: A1111's Checkpoint Merger tab and `POST /sdapi/v1/merge-checkpoints`
(SD.Next's route; A1111 has none) both build a `MergeParams` and call `MergeService.submit`.

`submit` checks everything it can before queueing (models, names, the VAE, the regex, that the output
name is free) and raises `MergeError` with a message for the user. The job itself hashes the sources
for the metadata, streams the merge (models/merger.py) into a new file (core.atomic: complete or
absent, never over an existing file), copies the sidecar config, and refreshes the checkpoint list so
the new model can be picked at once. Interrupt stops it between tensors, leaving nothing behind.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modules.core.atomic import atomic_create_bytes, atomic_create_output
from modules.models.merge_names import (ADD_DIFFERENCE, CONFIG_SOURCES, FORMATS, INTERP_METHODS, NO_INTERPOLATION,
                                        WEIGHTED_SUM, MergeError, MergeInterrupted)

log = logging.getLogger(__name__)

MAX_NAME = 200
MAX_METADATA_JSON = 64 * 1024


@dataclass
class MergeParams:
    """One merge, with A1111's names (its run_modelmerger arguments; SD.Next's API fields)."""
    primary_model_name: str = ""            # A: a checkpoint title, name or hash
    secondary_model_name: str = ""          # B
    tertiary_model_name: str = ""           # C (Add difference)
    interp_method: str = WEIGHTED_SUM       # INTERP_METHODS
    multiplier: float = 0.3                 # M
    save_as_half: bool = False              # float32 tensors are saved as float16
    custom_name: str = ""                   # "": A1111's name from the models and M
    checkpoint_format: str = "safetensors"  # or "ckpt"
    config_source: str | int = CONFIG_SOURCES[0]   # a CONFIG_SOURCES label, or its index
    bake_in_vae: str = "None"               # a VAE name: its weights replace the result's VAE
    discard_weights: str = ""               # a regex: matching tensors are left out
    save_metadata: bool = True              # safetensors only
    add_merge_recipe: bool = True           # sd_merge_recipe / sd_merge_models in the metadata
    copy_metadata_fields: bool = True       # the sources' metadata, A then B then C
    metadata_json: str = ""                 # a JSON object of more metadata


@dataclass
class MergeResult:
    filename: str
    title: str
    message: str
    is_inpainting: bool = False


@dataclass
class _Prepared:
    params: MergeParams
    infos: list[Any]                 # CheckpointInfo of A, B, C (None where not used)
    output: Path
    vae: Any                         # VaeInfo or None
    config_source: int
    extra_metadata: dict[str, str] = field(default_factory=dict)


def legacy_hash(filename: str) -> str:
    """A1111's old 8-hex model hash: sha256 of the 64 KiB at 1 MiB (the `legacy_hash` of sd_merge_models)."""
    try:
        with open(filename, "rb") as fh:
            fh.seek(0x100000)
            return hashlib.sha256(fh.read(0x10000)).hexdigest()[:8]
    except OSError:
        return "NOFILE"


def default_name(params: MergeParams, a: Any, b: Any, c: Any) -> str:
    """A1111's file name for a merge without a custom name."""
    m = round(params.multiplier, 2)
    if params.interp_method == WEIGHTED_SUM:
        return f"{round(1 - params.multiplier, 2)}({a.model_name}) + {m}({b.model_name})"
    if params.interp_method == ADD_DIFFERENCE:
        return f"{a.model_name} + {m}({b.model_name} - {c.model_name})"
    return a.model_name


class MergeService:
    def __init__(self, models: Any, queue: Any):
        self.models = models   # ModelService: the registries and the checkpoint folder
        self.queue = queue

    # -- before the queue ------------------------------------------------------------------
    def submit(self, params: MergeParams, *, owner: str | None = None):
        prepared = self.prepare(params)
        return self.queue.submit(lambda job: self._run(prepared, job), name="merge checkpoints", owner=owner)

    def prepare(self, params: MergeParams) -> _Prepared:
        if params.interp_method not in INTERP_METHODS:
            raise MergeError(f"interp_method must be one of {', '.join(INTERP_METHODS)}, got {params.interp_method!r}")
        if params.checkpoint_format not in FORMATS:
            raise MergeError(f"checkpoint_format must be one of {', '.join(FORMATS)}, got {params.checkpoint_format!r}")
        if not -10 <= float(params.multiplier) <= 10:
            raise MergeError(f"multiplier must be between -10 and 10, got {params.multiplier}")
        method = params.interp_method
        a = self._checkpoint(params.primary_model_name, "primary model (A)")
        b = self._checkpoint(params.secondary_model_name, "secondary model (B)") if method != NO_INTERPOLATION else None
        c = self._checkpoint(params.tertiary_model_name, "tertiary model (C)") if method == ADD_DIFFERENCE else None
        if params.discard_weights:
            try:
                re.compile(params.discard_weights)
            except re.error as err:
                raise MergeError(f"discard_weights: not a valid regular expression ({err})") from None
        vae, config_source, extra = self._vae(params.bake_in_vae), _config_source(params.config_source), \
            _metadata_json(params)
        name = _clean_name(params.custom_name) or default_name(params, a, b, c)
        output = Path(self.models.registry.ckpt_dir) / f"{name}.{params.checkpoint_format}"
        _check_free(output)
        return _Prepared(params=params, infos=[a, b, c], output=output, vae=vae, config_source=config_source,
                         extra_metadata=extra)

    def _checkpoint(self, title: str, what: str) -> Any:
        if not (title or "").strip():
            raise MergeError(f"choose a {what}")
        info = self.models.registry.get_closest(title)
        if info is None:
            raise MergeError(f"{what}: checkpoint {title!r} not found")
        return info

    def _vae(self, name: str) -> Any:
        if (name or "None") == "None":
            return None
        info = self.models.vaes.find(name)
        if info is None:
            raise MergeError(f"bake_in_vae: VAE {name!r} not found; choices: None, {', '.join(self.models.vaes.names())}")
        return info

    # -- the job ---------------------------------------------------------------------------
    def _run(self, prepared: _Prepared, job: Any) -> MergeResult:
        from modules.models import merger  # torch: only once a merge runs

        p = prepared.params
        a, b, c = prepared.infos
        job.state.set_textinfo("Merging checkpoints: hashing the sources…")
        metadata = self._metadata(prepared) if p.save_metadata and p.checkpoint_format == "safetensors" else None
        spec = merger.MergeSpec(
            primary=Path(a.filename), secondary=Path(b.filename) if b else None,
            tertiary=Path(c.filename) if c else None, method=p.interp_method, multiplier=float(p.multiplier),
            save_as_half=bool(p.save_as_half), output=prepared.output,
            bake_in_vae=Path(prepared.vae.filename) if prepared.vae else None, discard_weights=p.discard_weights,
            metadata=metadata)
        job.state.set_textinfo("Merging checkpoints…")
        try:
            plan = merger.run_merge(spec, progress=job.state.set_step, should_stop=job.should_stop,
                                    create=_create, output_for=lambda plan: _output_for(prepared, plan, metadata))
        except FileExistsError as err:
            raise MergeError(f"{err}; the merger never overwrites a file: choose another name") from None
        except MergeInterrupted:
            job.state.set_textinfo("Merge interrupted; nothing was saved")
            raise
        notes = self._copy_config(prepared, plan.output)
        self.models.refresh()
        info = self.models.registry.get_closest(str(plan.output))
        message = f"Checkpoint saved to {plan.output}" + "".join(f"; {n}" for n in notes)
        log.info(message)
        return MergeResult(filename=str(plan.output), title=info.title if info else plan.output.name, message=message,
                           is_inpainting=plan.is_inpainting)

    def _sha256(self, info: Any) -> str:
        registry = self.models.registry
        if registry.hash_cache is not None:
            sha = registry.hash_cache.sha256(info.filename, info.cache_key)
            info.set_sha256(sha)
            return sha
        from modules.models.hashes import file_sha256

        return file_sha256(info.filename)

    def _metadata(self, prepared: _Prepared) -> dict[str, str]:
        """A1111's merge metadata: the sources' fields, the user's JSON, format, and the recipe."""
        from modules.models.weights_io import read_safetensors_metadata

        p, used = prepared.params, [i for i in prepared.infos if i is not None]
        metadata: dict[str, str] = {}
        sources = {i.filename: (read_safetensors_metadata(i.filename) if i.filename.endswith(".safetensors") else {})
                   for i in used}
        if p.copy_metadata_fields:
            for info in used:
                metadata.update(sources[info.filename])
        metadata.update(prepared.extra_metadata)
        metadata["format"] = "pt"
        if p.add_merge_recipe:
            hashes = [self._sha256(i) if i is not None else None for i in prepared.infos]
            metadata["sd_merge_recipe"] = json.dumps(_recipe(prepared, hashes))
            models: dict[str, Any] = {}
            for info, sha in zip(prepared.infos, hashes):
                if info is None:
                    continue
                own = sources[info.filename]
                models[sha] = {"name": info.name, "legacy_hash": legacy_hash(info.filename),
                               "sd_merge_recipe": _json_or_none(own.get("sd_merge_recipe"))}
                models.update(_json_or_none(own.get("sd_merge_models")) or {})
            metadata["sd_merge_models"] = json.dumps(models)
        return metadata

    def _copy_config(self, prepared: _Prepared, output: Path) -> list[str]:
        """A1111's "Copy config from": the first sidecar .yaml of A, B, C (or only B's, or C's)."""
        a, b, c = prepared.infos
        candidates = {0: [a, b, c], 1: [b], 2: [c]}.get(prepared.config_source, [])
        source = next((i.sidecar_config for i in candidates if i is not None and i.sidecar_config), None)
        if source is None:
            return []
        target = output.with_suffix(".yaml")
        try:
            atomic_create_bytes(target, Path(source).read_bytes())
        except FileExistsError:
            return [f"{target.name} already exists and was kept (the config was not copied)"]
        return [f"config copied from {Path(source).name}"]


def _create(path: Path):
    return atomic_create_output(path)


def _output_for(prepared: _Prepared, plan: Any, metadata: dict[str, str] | None) -> Path:
    """A1111 names an inpainting result `*.inpainting.<format>`; the recipe records what it is."""
    if metadata is not None and "sd_merge_recipe" in metadata:
        recipe = json.loads(metadata["sd_merge_recipe"])
        recipe.update(is_inpainting=plan.is_inpainting, is_instruct_pix2pix=plan.is_instruct_pix2pix)
        metadata["sd_merge_recipe"] = json.dumps(recipe)
    if not plan.is_inpainting:
        return prepared.output
    out = prepared.output.with_name(f"{prepared.output.stem}.inpainting{prepared.output.suffix}")
    _check_free(out)
    return out


def _recipe(prepared: _Prepared, hashes: list[str | None]) -> dict[str, Any]:
    p = prepared.params
    return {
        "type": "webui",
        "primary_model_hash": hashes[0], "secondary_model_hash": hashes[1], "tertiary_model_hash": hashes[2],
        "interp_method": p.interp_method, "multiplier": p.multiplier, "save_as_half": p.save_as_half,
        "custom_name": p.custom_name, "config_source": prepared.config_source,
        "bake_in_vae": p.bake_in_vae, "discard_weights": p.discard_weights,
        "is_inpainting": False, "is_instruct_pix2pix": False,
    }


def _json_or_none(text: str | None) -> Any:
    if not text:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return None


def _clean_name(name: str) -> str:
    """The custom name as a file name in the checkpoint folder, never a path out of it."""
    name = (name or "").strip()
    for ext in FORMATS:
        name = name.removesuffix(f".{ext}")
    if not name:
        return ""
    if len(name) > MAX_NAME or any(ch in name for ch in '/\\\0:') or name.startswith("."):
        raise MergeError(f"custom_name {name[:40]!r}: a plain file name (no folders, not starting with a dot, "
                         f"at most {MAX_NAME} characters)")
    return name


def _check_free(path: Path) -> None:
    if path.exists() or path.is_symlink():
        raise MergeError(f"{path.name} already exists in the checkpoint folder; the merger never overwrites a "
                         "file: choose another name")


def _config_source(value: str | int) -> int:
    if isinstance(value, int) or str(value).isdigit():
        index = int(value)
        if index not in range(len(CONFIG_SOURCES)):
            raise MergeError(f"config_source must be 0-{len(CONFIG_SOURCES) - 1}, got {value}")
        return index
    if value not in CONFIG_SOURCES:
        raise MergeError(f"config_source must be one of {', '.join(CONFIG_SOURCES)}, got {value!r}")
    return CONFIG_SOURCES.index(value)


def _metadata_json(params: MergeParams) -> dict[str, str]:
    text = (params.metadata_json or "").strip()
    if not text or not params.save_metadata:
        return {}
    if len(text) > MAX_METADATA_JSON:
        raise MergeError(f"metadata_json: at most {MAX_METADATA_JSON} characters")
    try:
        value = json.loads(text)
    except ValueError as err:
        raise MergeError(f"metadata_json: not valid JSON ({err})") from None
    if not isinstance(value, dict):
        raise MergeError("metadata_json: must be a JSON object")
    return {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in value.items()}

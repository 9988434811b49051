"""A job's ``<lora:...>`` tags -> networks merged into the loaded model, with warnings and infotext.

A1111's rules: the tags of a batch's first prompt are the ones applied; ``<lyco:...>`` is ``<lora:...>``;
``<lora:name:te:unet:dyn>`` with ``te=``/``unet=``/``dyn=`` as named arguments (unet defaults to te);
a missing, unreadable or wrong-family network is reported (job comments, API info, console) and the
image is still made.
"""
from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Hashable

from modules.engine import prompt_parser
from modules.engine.networks.bundled import Bundle, read_bundle, split_bundle
from modules.engine.networks.keys import group_layers
from modules.engine.networks.merge import MergeReport, NetworkMerger, NetworkUse, NetworkWeights
from modules.models import file_origin, weights_io
from modules.models.embeddings import EMPTY_SET, fits
from modules.models.lora_registry import LoraEntry, LoraRegistry

log = logging.getLogger(__name__)

LORA_TAGS = ("lora", "lyco")
_MERGER_ATTR = "_webui_network_merger"   # on the UNet module: the merger lives and dies with its weights


@dataclass
class Activation:
    warnings: list[str] = field(default_factory=list)
    infotext: dict[str, str] = field(default_factory=dict)
    report: MergeReport | None = None


@dataclass(frozen=True)
class LoraCall:
    name: str
    te: float
    unet: float
    dyn: int | None


def parse_lora_call(items: list[str]) -> LoraCall:
    """A1111's argument rules for ``<lora:name:te:unet:dyn>``; ValueError names the bad argument."""
    positional = [x for x in items if "=" not in x]
    named = dict(x.split("=", 1) for x in items if "=" in x)
    if not positional or not positional[0].strip():
        raise ValueError("no network name")
    te = float(named.get("te", positional[1] if len(positional) > 1 else 1.0))
    unet = float(named.get("unet", positional[2] if len(positional) > 2 else te))
    dyn_text = named.get("dyn", positional[3] if len(positional) > 3 else None)
    return LoraCall(positional[0].strip(), te, unet, int(dyn_text) if dyn_text not in (None, "") else None)


def _family_version(model: Any) -> str:
    info = model.spec.family_info
    return "SDXL" if info.is_sdxl else "SD2" if info.is_sd2 else "SD1" if info.is_sd1 else "?"


def _wait_for_weights(model: Any) -> None:
    """A just-loaded model may still be copying its weights off the mapped file (models/materialise.py)."""
    wait = getattr(model, "wait_materialised", None)
    if wait is not None:
        wait()


def _bundled_skip_reason(name: str, emb: Any, loaded: dict, taken: dict, layout: Any) -> str | None:
    """Why a LoRA's bundled embedding is not used (A1111's rules, plus: the first LoRA's name wins)."""
    if name in loaded:
        return "an embedding of that name is already loaded from the embeddings folder"
    if name in taken:
        return "an earlier LoRA bundles one of that name"
    if not fits(emb, layout):
        return f"its width {emb.shape} does not fit this model"
    return None


class ExtraNetworks:
    """Applies prompt-tag networks to whichever model a job uses. One per app (built in services)."""

    def __init__(self, loras: LoraRegistry, hypernetworks: Any = None):
        self.loras = loras
        self.hypernetworks = hypernetworks
        self._weights: OrderedDict[Hashable, NetworkWeights] = OrderedDict()   # parsed files by stamp
        self._bundles: dict[Hashable, Bundle] = {}   # their bundled embeddings, by the same stamp
        self._lock = threading.Lock()

    # -- entry point ------------------------------------------------------------------------
    def activate(self, model: Any, encoder: Any, prompts: list[str], *, options: Any = None,
                 disabled: bool = False) -> Activation:
        """Merge the first prompt's networks into `model` (undoing the last job's); report what happened.
        The set merged last time costs nothing: not even its files are read again."""
        _, calls = prompt_parser.parse_extra_networks_prompts(prompts)
        grouped = prompt_parser.group_extra_networks([] if disabled else calls)
        out = Activation()
        if getattr(getattr(model, "pipe", None), "unet", None) is None:
            if calls and not disabled:
                self._warn(out, "Extra networks need a UNet model; this one has none: tags ignored")
            return out
        wanted = self._lora_requests([c for t in LORA_TAGS for c in grouped.pop(t, [])], model, out)
        merger = self.merger(model)
        signature = tuple((stamp, call.te, call.unet, call.dyn) for call, _, stamp in wanted)
        if signature == merger.applied:
            out.report = merger.unchanged()
            named = [(call.name, entry) for call, entry, _ in wanted]
        else:
            _wait_for_weights(model)
            uses, named = [], []
            for call, entry, stamp in wanted:
                weights = self._load(entry, stamp, out)
                if weights is not None:
                    uses.append(NetworkUse(weights, te=call.te, unet=call.unet, dyn=call.dyn))
                    named.append((call.name, entry))
            out.report = self._apply(merger, uses, out)
            self._trim(int(getattr(options, "lora_in_memory_limit", 0) or 0), {u.weights.key for u in uses})
        if out.report.text_encoders_changed and encoder is not None:
            encoder.clear_cache()   # prompt encodings made with the old text-encoder weights are stale
        self._report(named, out, options)
        self._use_bundled_embeddings(named, encoder, options, out)
        if self.hypernetworks is not None:
            self.hypernetworks.activate(model, grouped.pop("hypernet", []), out)
        for unknown in grouped:
            log.warning("Skipping unknown extra network: %s", unknown)
        return out

    def _apply(self, merger: NetworkMerger, uses: list[NetworkUse], out: Activation) -> MergeReport:
        """merger.apply; on an unexpected failure (out of memory...) the model goes back to its own
        weights and the job goes on without networks."""
        try:
            return merger.apply(uses)
        except file_origin.CheckpointChangedError:
            raise   # the originals cannot be read back: the job fails with "load the checkpoint again"
        except Exception as exc:  # the image is still made, as A1111 does
            log.exception("Applying networks failed")
            self._warn(out, f"LoRA could not be applied ({type(exc).__name__}: {exc}); the image is made without")
            merger.restore()
            return MergeReport([], changed=True, text_encoders_changed=True)

    def merger(self, model: Any) -> NetworkMerger:
        unet = model.pipe.unet
        merger = getattr(unet, _MERGER_ATTR, None)
        if merger is None:
            components = {name: getattr(model.pipe, name) for name in ("unet", "text_encoder", "text_encoder_2")
                          if getattr(model.pipe, name, None) is not None}
            merger = NetworkMerger(components, unet.config)
            object.__setattr__(unet, _MERGER_ATTR, merger)
        return merger

    # -- LoRA ---------------------------------------------------------------------------------
    def _lora_requests(self, calls: list, model: Any, out: Activation) -> list[tuple[LoraCall, LoraEntry, tuple]]:
        """(call, file, file stamp) for each tag that names a usable file; warnings for the others."""
        wanted, rescanned = [], False
        for call in calls:
            try:
                parsed = parse_lora_call(call.items)
            except ValueError as exc:
                self._warn(out, f"<{call.name}:{':'.join(call.items)}>: bad arguments ({exc}); ignored")
                continue
            entry = self.loras.find(parsed.name)
            if entry is None and not rescanned:   # a file added since the last scan (A1111 rescans too)
                self.loras.refresh()
                entry, rescanned = self.loras.find(parsed.name), True
            if entry is None:
                self._warn(out, f"LoRA not found: {parsed.name} (looked in {', '.join(map(str, self.loras.roots))})")
                continue
            version = _family_version(model)
            if entry.sd_version in ("SD1", "SD2", "SDXL") and entry.sd_version != version:
                self._warn(out, f"LoRA {parsed.name} was made for {entry.sd_version}; the loaded model is "
                                f"{model.spec.family_info.label}; not applied")
                continue
            try:
                stamp = entry.stamp()
            except OSError as exc:
                self._warn(out, f"LoRA {parsed.name} could not be read: {exc}")
                continue
            if parsed.te or parsed.unet:
                wanted.append((parsed, entry, stamp))
        return wanted

    def _load(self, entry: LoraEntry, stamp: tuple, out: Activation | None) -> NetworkWeights | None:
        with self._lock:
            cached = self._weights.get(stamp)
            if cached is not None:
                self._weights.move_to_end(stamp)
                return cached
        try:
            # read into memory, not mapped: a parsed file is kept while in use and must not change under it
            state_dict = weights_io.load_state_dict_file(entry.path, in_memory=True)
        except weights_io.CheckpointLoadError as exc:
            self._warn(out, f"LoRA {entry.name} could not be loaded: {exc}")
            return None
        state_dict, bundled = split_bundle(state_dict)   # bundle_emb.* are embeddings, not layers
        bundle = read_bundle(bundled, entry.path)
        try:
            groups, unknown = group_layers(state_dict)
        except (ValueError, KeyError) as exc:   # diffusers' converters refuse a malformed key set
            self._warn(out, f"LoRA {entry.name}: its tensor names are not a known layout ({exc}); not applied")
            return None
        if not groups and not bundle.embeddings:
            self._warn(out, f"LoRA {entry.name} holds no network weights this program knows ({len(unknown)} "
                            "other tensors); not applied")
            return None
        weights = NetworkWeights(key=stamp, name=entry.name, groups=groups, unknown_keys=unknown)
        with self._lock:
            self._weights[stamp] = weights
            self._bundles[stamp] = bundle
        return weights

    def weights_of(self, entry: LoraEntry) -> NetworkWeights | None:
        """The parsed file (None, with a logged warning, when it cannot be read)."""
        return self._load(entry, entry.stamp(), None)

    def _trim(self, keep: int, in_use: set) -> None:
        """Keep the parsed files of the merged set (a new multiplier for them reads nothing) and at most
        `keep` others, the most recently used (A1111's ``lora_in_memory_limit``)."""
        with self._lock:
            others = [key for key in self._weights if key not in in_use]
            for key in others[:max(0, len(others) - max(0, keep))]:
                del self._weights[key]
                self._bundles.pop(key, None)

    def _report(self, named: list[tuple[str, LoraEntry]], out: Activation, options: Any) -> None:
        hashes = []
        for (mentioned, entry), outcome in zip(named, out.report.outcomes):
            total = outcome.total
            if outcome.error:
                self._warn(out, f"LoRA {mentioned} does not fit this model ({outcome.error}); not applied")
                continue
            if outcome.unmatched and len(outcome.unmatched) == total:
                self._warn(out, f"LoRA {mentioned}: none of its {total} layers exist in this model (made for "
                                "another model family?); not applied")
                continue
            if outcome.unmatched:
                self._warn(out, f"LoRA {mentioned}: {len(outcome.unmatched)} of {total} layers did not match this "
                                f"model and were skipped (e.g. {outcome.unmatched[0]})")
            self._warn_unknown_keys(mentioned, entry, out)
            if getattr(options, "lora_add_hashes_to_infotext", True):
                try:
                    hashes.append(f"{mentioned.replace(':', '').replace(',', '')}: {entry.shorthash}")
                except OSError as exc:
                    log.warning("Could not hash %s: %s", entry.path, exc)
        if hashes:
            out.infotext["Lora hashes"] = ", ".join(hashes)

    def _warn_unknown_keys(self, mentioned: str, entry: LoraEntry, out: Activation) -> None:
        """Tensors that are no network part this program knows: reported on every job, never dropped silently."""
        try:
            weights = self._weights.get(entry.stamp())
        except OSError:
            return
        if weights is not None and weights.unknown_keys:
            self._warn(out, f"LoRA {mentioned}: {len(weights.unknown_keys)} tensors of a kind this program does not "
                            f"know were ignored (e.g. {weights.unknown_keys[0]})")

    # -- embeddings bundled in LoRA files ------------------------------------------------------------
    def _use_bundled_embeddings(self, named: list[tuple[str, LoraEntry]], encoder: Any, options: Any,
                                out: Activation) -> None:
        """The active LoRAs' bundled embeddings join the encoder's set until the next activation (A1111:
        a name loaded from embeddings/ wins; one whose width does not fit the model is skipped)."""
        layout = getattr(encoder, "embedding_layout", None)
        if layout is None:
            return
        current = getattr(encoder, "embeddings", None)
        current = EMPTY_SET if current is None else current
        base = current.base if current.base is not None else current   # without the last batch's bundles
        label_on = getattr(options, "lora_bundled_ti_to_infotext", True)
        extra: dict[str, Any] = {}
        for mentioned, entry in named:
            bundle = self._bundle_of(entry)
            if bundle is None:
                continue
            if bundle.failed:   # one line per LoRA, however many are broken
                name, why = next(iter(bundle.failed.items()))
                more = f" (and {len(bundle.failed) - 1} more)" if len(bundle.failed) > 1 else ""
                self._warn(out, f"LoRA {mentioned}: bundled embedding {name} is not usable ({why}){more}")
            label = mentioned.replace(":", "").replace(",", "") if label_on else None   # an infotext value
            for name, emb in bundle.labelled(label).items():
                why = _bundled_skip_reason(name, emb, base.embeddings, extra, layout)
                if why:
                    self._warn(out, f"LoRA {mentioned}: bundled embedding {name} skipped: {why}")
                else:
                    extra[name] = emb
        encoder.embeddings = base.with_extra(extra)

    def _bundle_of(self, entry: LoraEntry) -> Bundle | None:
        """The file's bundle; reparsed when trimmed from memory while still merged into another model
        (that model's same set skips loading, but its embeddings are still wanted)."""
        try:
            stamp = entry.stamp()
        except OSError:
            return None
        with self._lock:
            found = self._bundles.get(stamp)
        if found is None and self._load(entry, stamp, None) is not None:
            with self._lock:
                found = self._bundles.get(stamp)
        return found

    @staticmethod
    def _warn(out: Activation | None, message: str) -> None:
        log.warning("%s", message)
        if out is not None and message not in out.warnings:
            out.warnings.append(message)

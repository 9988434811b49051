"""Networks merged into a loaded model's weights: no per-step cost, exact restore.

Before sampling, each layer a network touches gets ``W = W0 + sum(multiplier * delta)``, computed in
float32 from ``W0``, a copy of the original kept (on the CPU) only for touched layers. A new set of
networks first puts the original weights back bit for bit, then merges the new set; the same set
again is a no-op. The checkpoint is never reloaded.

A switch costs little: a float32 layer changed only by plain LoRAs gets its original put back into
the weight and each ``up @ down`` added in place (one addmm, no allocation; factors converted to
float32 per layer into two reused buffers); a layer whose change is the same in the old and new set is not touched;
layers the new set leaves alone are copied back from their backups. A layer that still holds exactly
its checkpoint bytes keeps no copy: its original is read back from the file. Copies live outside the
heap the UNet's activations reuse (``backups.py``), so a merge does not slow the steps after it.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Hashable, Mapping

import torch

from modules.engine.networks import backups, deltas
from modules.engine.networks.keys import LayerGroup, LayerIndex, LayerRef, resolve_all
from modules.models import file_origin

log = logging.getLogger(__name__)


@dataclass
class NetworkWeights:
    """One network file's layers, parsed once (model-independent)."""
    key: Hashable                      # (path, mtime, size): a changed file is a new network
    name: str
    groups: dict[str, LayerGroup]
    unknown_keys: list[str] = field(default_factory=list)
    _plain: dict | None = field(default=None, repr=False)

    def plain(self) -> dict[str, deltas.PlainLora | None]:
        """The plain-LoRA layers in float32, built on first use and kept with the parsed file."""
        if self._plain is None:
            self._plain = deltas.prepare_plain({prefix: g.parts for prefix, g in self.groups.items()})
        return self._plain


@dataclass(frozen=True)
class NetworkUse:
    """A network as a prompt asks for it."""
    weights: NetworkWeights
    te: float = 1.0
    unet: float = 1.0
    dyn: int | None = None

    def multiplier(self, component: str) -> float:
        return self.unet if component == "unet" else self.te

    @property
    def signature(self) -> tuple:
        return (self.weights.key, self.te, self.unet, self.dyn)


@dataclass
class NetworkOutcome:
    name: str
    layers: int = 0                    # layers changed
    total: int = 0                     # layers the file holds
    unmatched: list[str] = field(default_factory=list)   # file prefixes naming no layer of this model
    error: str | None = None           # set when the network was not applied at all


@dataclass
class MergeReport:
    outcomes: list[NetworkOutcome]
    changed: bool                      # weights were rewritten (False: the same set was already merged)
    text_encoders_changed: bool        # prompt encodings made before are stale


class NetworkMerger:
    """The networks merged into one loaded pipeline, with the backups of the layers they touch."""

    def __init__(self, components: Mapping[str, torch.nn.Module], unet_config=None):
        self.index = LayerIndex(components, unet_config)
        self.backups: dict[LayerRef, tuple[backups.Backup, torch.Tensor | None]] = {}
        self.file_backups = True                    # originals still in the checkpoint file are not copied
        self._scratch = file_origin.Scratch()   # reused buffers: file reads, float32 LoRA factors
        self._prepared: dict[LayerRef, backups.Backup] = {}   # backups taken ahead for this apply's new layers
        self._original: set[LayerRef] = set()   # backed-up layers whose weight holds the original again
        self._rewritten: set[LayerRef] = set()      # layers the last apply wrote
        self.merged: dict[LayerRef, tuple] = {}     # what each changed layer holds: ((network, prefix, mult, dyn), ...)
        self._bias_changed: set[LayerRef] = set()
        self.applied: tuple = ()
        self.last_outcomes: list[NetworkOutcome] = []

    @property
    def backup_bytes(self) -> int:
        return sum(backups.resident_bytes(w) + backups.resident_bytes(b) for w, b in self.backups.values())

    def apply(self, uses: list[NetworkUse]) -> MergeReport:
        """Merge exactly `uses` (in order) into the model; the previous set is undone first."""
        signature = tuple(u.signature for u in uses)
        if signature == self.applied:
            return self.unchanged()
        self._rewritten = set()
        outcomes = [NetworkOutcome(u.weights.name) for u in uses]
        plans = [self._plan(u, o) for u, o in zip(uses, outcomes)]
        new = {ref for plan in plans for ref in plan} - set(self.backups)
        self._prepared = backups.take_all({ref: self.index.modules[ref].weight for ref in new}, self.file_backups)
        try:
            while True:
                failed = self._merge(uses, plans, outcomes)
                if failed is None:
                    break
                plans[failed] = {}  # merge again without the network that does not fit
        finally:
            self._prepared = {}
        self._restore(set(self.backups) - {ref for plan in plans for ref in plan})
        self.applied, self.last_outcomes = signature, outcomes
        return MergeReport(outcomes, changed=True,
                           text_encoders_changed=any(r.component != "unet" for r in self._rewritten))

    def unchanged(self) -> MergeReport:
        """The report of the set already merged (nothing is done)."""
        return MergeReport(list(self.last_outcomes), changed=False, text_encoders_changed=False)

    def _plan(self, use: NetworkUse, outcome: NetworkOutcome) -> dict[LayerRef, LayerGroup]:
        """The layers `use` changes (parts whose multiplier is 0 are left out entirely)."""
        found, outcome.unmatched = resolve_all(use.weights.groups, self.index)
        outcome.total = len(use.weights.groups)
        return {ref: use.weights.groups[prefix] for prefix, ref in found.items() if use.multiplier(ref.component)}

    @torch.no_grad()
    def _merge(self, uses: list[NetworkUse], plans: list[dict], outcomes: list[NetworkOutcome]) -> int | None:
        """Merge every planned layer; the index of a network that fails a layer (after undoing), else None."""
        layers: dict[LayerRef, list[int]] = {}
        for i, plan in enumerate(plans):
            for ref in plan:
                layers.setdefault(ref, []).append(i)
        for outcome, plan in zip(outcomes, plans):
            outcome.layers = len(plan)
        todo = []
        for ref, users in layers.items():
            pairs = [(uses[i], plans[i][ref]) for i in users]
            state = tuple((use.weights.key, group.key, use.multiplier(ref.component), use.dyn) for use, group in pairs)
            if self.merged.get(ref) != state:   # else the layer already holds exactly this (old and new set share it)
                todo.append((ref, users, pairs, state))
        self._put_back_weights([ref for ref, *_ in todo if ref in self.backups])
        for ref, users, pairs, state in todo:
            module = self.index.modules[ref]
            try:
                self._merge_layer(ref, module, pairs, users)
                self.merged[ref] = state
                self._rewritten.add(ref)
            except _LayerFailed as failed:
                outcomes[failed.network].error = f"{ref.component} layer {ref.name}: {failed.reason}"
                outcomes[failed.network].layers = 0
                log.warning("Network %s not applied: %s", outcomes[failed.network].name,
                            outcomes[failed.network].error)
                return failed.network
        return None

    def _merge_layer(self, ref: LayerRef, module: torch.nn.Module, users: list[tuple[NetworkUse, LayerGroup]],
                     indices: list[int]) -> None:
        weight, bias = module.weight, getattr(module, "bias", None)
        fresh = ref not in self.backups
        original = fresh or ref in self._original   # the weight holds its original values now
        self._original.discard(ref)
        if fresh:
            taken = self._prepared.pop(ref, None)   # taken for all new layers at once (``apply``)
            if taken is None:
                taken = backups.take(weight, self._scratch, self.file_backups)
            self.backups[ref] = (taken, backups.cpu_copy(bias) if bias is not None else None)
        self.merged.pop(ref, None)
        plain = [use.weights.plain().get(group.key) for use, group in users]
        if weight.dtype == torch.float32 and weight.is_contiguous() and all(p is not None for p in plain):
            self._merge_plain(ref, weight, bias, list(zip(users, plain, indices)), original)
            return
        original_w, original_b = self.backups[ref]
        w0 = backups.as_tensor(original_w).to(device=weight.device, dtype=torch.float32)
        new_w, new_b = w0.clone(), None
        for (use, group), index in zip(users, indices):
            parts = {k: v.to(weight.device) for k, v in group.parts.items()}
            mult = use.multiplier(ref.component)
            try:
                db = deltas.add_into(new_w, parts, w0, mult, use.dyn)
            except (deltas.NetworkFormatError, RuntimeError, KeyError, IndexError) as exc:
                raise _LayerFailed(index, str(exc) or type(exc).__name__) from None
            if db is not None:
                if bias is None or db.numel() != bias.numel():
                    raise _LayerFailed(index, "bias change for a layer without that bias")
                if new_b is None:
                    new_b = original_b.to(device=bias.device, dtype=torch.float32).clone()
                new_b += db.reshape(new_b.shape) * mult
        weight.copy_(new_w.to(weight.dtype))
        self._set_bias(ref, bias, new_b)

    def _merge_plain(self, ref: LayerRef, weight: torch.Tensor, bias: torch.Tensor | None,
                     users: list[tuple[tuple[NetworkUse, LayerGroup], deltas.PlainLora, int]], original: bool) -> None:
        """The common case, a float32 layer changed by plain LoRAs only: the original is put back into the
        weight (copied, or read from the file; no allocation) and each ``up @ down`` is added in place by
        one addmm. The same operations on the same values as the general path, so the result is the same
        bit for bit."""
        for ((use, _), lora, index) in users:
            if lora.bias is not None and (bias is None or lora.bias.numel() != bias.numel()):
                raise _LayerFailed(index, "bias change for a layer without that bias")
            try:
                lora.check_fits(weight)
            except deltas.NetworkFormatError as exc:
                raise _LayerFailed(index, str(exc)) from None
        if not original:
            backups.restore_into(self.backups[ref][0], weight, self._scratch)
        flat = weight.view(weight.shape[0], -1)
        for ((use, _), lora, _) in users:
            up, down = self._float32_factors(lora.factors(use.dyn), weight.device)
            flat.addmm_(up, down, alpha=lora.scale * use.multiplier(ref.component))
        new_b = None
        for ((use, _), lora, _) in users:
            if lora.bias is not None:
                if new_b is None:
                    new_b = self.backups[ref][1].to(device=bias.device, dtype=torch.float32).clone()
                new_b += lora.bias.to(new_b.device).reshape(new_b.shape) * use.multiplier(ref.component)
        self._set_bias(ref, bias, new_b)

    def _float32_factors(self, factors: tuple[torch.Tensor, torch.Tensor], device: torch.device
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """A LoRA's up/down in float32 on ``device``: on the CPU converted into two buffers reused from layer
        to layer (no fresh memory per file or per layer)."""
        if device.type != "cpu":
            return tuple(t.to(device=device, dtype=torch.float32) for t in factors)
        return tuple(deltas.float32_into(self._scratch.buffer(torch.float32, t.numel(), 2 + i), t)
                     for i, t in enumerate(factors))   # slots 0-1: reading originals back (file_origin.py)

    def _set_bias(self, ref: LayerRef, bias: torch.Tensor | None, new_b: torch.Tensor | None) -> None:
        if new_b is not None:
            bias.copy_(new_b.to(bias.dtype))
            self._bias_changed.add(ref)
        elif ref in self._bias_changed:
            bias.copy_(self.backups[ref][1])   # an earlier set changed it
            self._bias_changed.discard(ref)

    def restore(self) -> None:
        """Put every touched layer's original weights back (bit for bit) and drop the backups."""
        self._restore(set(self.backups))
        self.applied, self.last_outcomes = (), []

    @torch.no_grad()
    def _put_back_weights(self, refs: list[LayerRef]) -> None:
        """Original weights back into these layers (all at once: reading from the file runs on threads);
        biases are left to the caller. The backups stay. May raise CheckpointChangedError."""
        refs = [ref for ref in refs if ref not in self._original]
        backups.restore_all([(self.backups[ref][0], self.index.modules[ref].weight) for ref in refs])
        for ref in refs:
            self.merged.pop(ref, None)
            self._original.add(ref)

    @torch.no_grad()
    def _restore(self, refs: set[LayerRef]) -> None:
        self._put_back_weights(list(refs))   # on CheckpointChangedError every backup is kept
        for ref in refs:
            b = self.backups.pop(ref)[1]
            self._original.discard(ref)
            self._rewritten.add(ref)
            module = self.index.modules[ref]
            if b is not None and ref in self._bias_changed:
                module.bias.copy_(b)
            self._bias_changed.discard(ref)


class _LayerFailed(Exception):
    def __init__(self, network: int, reason: str):
        super().__init__(reason)
        self.network, self.reason = network, reason

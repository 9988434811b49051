"""Each network type's change to one layer's weight, computed from the original weight.

The formulas are the published ones of kohya's LoRA/LoCon, LyCORIS (LoHa, LoKr, IA3, (B)OFT, GLoRA,
full/diff, DoRA) as A1111 applies them; no installed library computes LyCORIS weights from these
files, so they are written here. Everything is computed in float32 and returned as
``(weight delta, bias delta or None)`` at multiplier 1 with the network's own scale (alpha / rank)
included; the caller multiplies by the user's multiplier.
"""
from __future__ import annotations

import math

import torch

Parts = dict[str, torch.Tensor]


class NetworkFormatError(ValueError):
    """The tensors for one layer do not make a network of any known type."""


def network_type(parts: Parts) -> str:
    if "lora_up.weight" in parts and "lora_down.weight" in parts:
        return "lora"
    if "hada_w1_a" in parts:
        return "loha"
    if "lokr_w1" in parts or "lokr_w1_a" in parts:
        return "lokr"
    if "oft_blocks" in parts or "oft_diag" in parts:
        return "oft"
    if "a1.weight" in parts:
        return "glora"
    if "on_input" in parts and "weight" in parts:
        return "ia3"
    if "diff" in parts or "diff_b" in parts or "w_norm" in parts or "b_norm" in parts:
        return "full"
    raise NetworkFormatError(f"unknown network parts {sorted(parts)}")


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(dtype=torch.float32)


def _scale(parts: Parts, rank: int | None) -> float:
    if "scale" in parts:
        return float(parts["scale"])
    if rank and "alpha" in parts:
        alpha = float(parts["alpha"])
        return alpha / rank if alpha else 1.0
    return 1.0


def _tucker(core: torch.Tensor, w_in: torch.Tensor, w_out: torch.Tensor) -> torch.Tensor:
    """LyCORIS' CP/Tucker rebuild: core [r, r, k, k], w_in [r, in], w_out [r, out] -> [out, in, k, k]."""
    return torch.einsum("i j k l, j r, i p -> p r k l", core, w_in, w_out)


def _reshape(delta: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    if delta.shape == weight.shape:
        return delta
    if delta.numel() != weight.numel():
        raise NetworkFormatError(f"shape {tuple(delta.shape)} does not fit the layer's {tuple(weight.shape)}")
    return delta.reshape(weight.shape)


def lora(parts: Parts, weight: torch.Tensor, dyn: int | None = None) -> torch.Tensor:
    """LoRA / LoCon (3x3 down, or Tucker ``lora_mid``): up @ (mid) @ down."""
    up, down = _f32(parts["lora_up.weight"]), _f32(parts["lora_down.weight"])
    rank = down.shape[0]
    if dyn is not None and 0 < dyn < rank:   # DyLoRA: use the first `dyn` ranks, scale of the full rank
        up, down = up[:, :dyn], down[:dyn]
    if "lora_mid.weight" in parts:
        mid = _f32(parts["lora_mid.weight"])
        delta = _tucker(mid, down.flatten(1), up.flatten(1).t())
    elif weight.dim() == 4 and down.dim() == 4:
        delta = (up.flatten(1) @ down.flatten(1)).reshape(up.shape[0], *down.shape[1:])
    else:
        delta = up.flatten(1) @ down.flatten(1)
    return _reshape(delta, weight) * _scale(parts, rank)


def loha(parts: Parts, weight: torch.Tensor) -> torch.Tensor:
    """LoHa: (w1a @ w1b) * (w2a @ w2b), Hadamard product; Tucker cores when ``hada_t1``/``hada_t2``."""
    w1a, w1b, w2a, w2b = (_f32(parts[k]) for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"))
    if "hada_t1" in parts:
        first = _tucker(_f32(parts["hada_t1"]), w1b, w1a)
        second = _tucker(_f32(parts["hada_t2"]), w2b, w2a)
    else:
        first, second = w1a @ w1b, w2a @ w2b
    return _reshape(first * second, weight) * _scale(parts, w1b.shape[0])


def _factor(parts: Parts, name: str) -> tuple[torch.Tensor, int | None]:
    if name in parts:
        return _f32(parts[name]), None
    a, b = _f32(parts[name + "_a"]), _f32(parts[name + "_b"])
    if name == "lokr_w2" and "lokr_t2" in parts:
        return _tucker(_f32(parts["lokr_t2"]), b, a), b.shape[0]
    return a @ b.flatten(1) if b.dim() <= 2 else (a @ b.flatten(1)).reshape(a.shape[0], *b.shape[1:]), b.shape[0]


def lokr(parts: Parts, weight: torch.Tensor) -> torch.Tensor:
    """LoKr: kron(w1, w2), each factor whole or a low-rank product."""
    w1, rank1 = _factor(parts, "lokr_w1")
    w2, rank2 = _factor(parts, "lokr_w2")
    if w2.dim() == 4:
        w1 = w1[:, :, None, None]
    return _reshape(torch.kron(w1, w2), weight) * _scale(parts, rank1 or rank2)


def ia3(parts: Parts, weight: torch.Tensor) -> torch.Tensor:
    """IA3: the weight scaled per output row (or per input column with ``on_input``)."""
    w = _f32(parts["weight"]).flatten()
    on_input = bool(parts["on_input"].flatten()[0]) if parts["on_input"].numel() else False
    shape = [1, -1] + [1] * (weight.dim() - 2) if on_input else [-1] + [1] * (weight.dim() - 1)
    return weight * w.reshape(shape)


def _cayley(q: torch.Tensor, constraint: float | None) -> torch.Tensor:
    """Orthogonal blocks from stored ones: skew-symmetric part, optional norm bound, Cayley transform."""
    skew = q - q.transpose(-1, -2)
    if constraint:
        norm = torch.norm(skew.flatten())
        skew = skew * ((torch.clamp(norm, max=constraint) + 1e-8) / (norm + 1e-8))
    eye = torch.eye(q.shape[-1], dtype=q.dtype)
    return torch.matmul(eye + skew, torch.linalg.inv(eye - skew))


def oft(parts: Parts, weight: torch.Tensor) -> torch.Tensor:
    """OFT (block-diagonal rotation of the output rows) and BOFT (butterfly of such rotations)."""
    out_dim = weight.shape[0]
    flat = weight.reshape(out_dim, -1)
    if "oft_diag" in parts:              # old LyCORIS: the rotation blocks are stored as they are
        rotations = _f32(parts["oft_diag"])
    else:
        alpha = float(parts["alpha"]) if "alpha" in parts else 0.0
        rotations = _cayley(_f32(parts["oft_blocks"]), alpha * out_dim if alpha > 0 else None)
    if rotations.dim() == 3:
        blocks, size = rotations.shape[0], rotations.shape[1]
        if blocks * size != out_dim:
            raise NetworkFormatError(f"{blocks} OFT blocks of {size} do not fit {out_dim} outputs")
        rotated = torch.einsum("k n m, k n c -> k m c", rotations, flat.reshape(blocks, size, -1)).reshape(flat.shape)
    else:
        rotated = _butterfly(rotations, flat)
    if "rescale" in parts:
        rotated = rotated * _f32(parts["rescale"]).reshape(out_dim, 1)
    return (rotated - flat).reshape(weight.shape)


def _butterfly(rotations: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    """BOFT: m butterfly stages of block rotations, each on a permuted grouping of the output rows."""
    stages, _, size = rotations.shape[0], rotations.shape[1], rotations.shape[2]
    half, out = size // 2, flat
    cols = flat.shape[1]
    for i in range(stages):
        k = (2 ** i) * half
        out = out.reshape(-1, 2, k, cols).transpose(1, 2).reshape(-1, size, cols)   # (c g k) -> (c k g)
        out = torch.einsum("b i j, b j c -> b i c", rotations[i], out)
        out = out.reshape(-1, k, 2, cols).transpose(1, 2).reshape(flat.shape)        # (c k g) -> (c g k)
    return out


def glora(parts: Parts, weight: torch.Tensor) -> torch.Tensor:
    """GLoRA: b2 @ b1 + W @ a2 @ a1 (LyCORIS' linear layout; A1111's formula)."""
    a1, a2, b1, b2 = (_f32(parts[k]).flatten(1) for k in ("a1.weight", "a2.weight", "b1.weight", "b2.weight"))
    flat = weight.reshape(weight.shape[0], -1)
    delta = b2 @ b1 + (flat @ a2) @ a1
    return _reshape(delta, weight) * _scale(parts, b1.shape[0])


def full(parts: Parts, weight: torch.Tensor) -> torch.Tensor:
    """Full / diff networks: the stored difference itself (``w_norm`` for norm layers)."""
    for name in ("diff", "w_norm"):
        if name in parts:
            return _reshape(_f32(parts[name]), weight)
    return torch.zeros_like(weight)


def bias_delta(parts: Parts) -> torch.Tensor | None:
    for name in ("diff_b", "b_norm"):
        if name in parts:
            return _f32(parts[name]).flatten()
    return None


def dora(delta: torch.Tensor, weight: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """DoRA: (W + delta) renormalised to the stored magnitude, returned as a change of W.

    The magnitude is per output row (kohya, PEFT: shape [out] or [out, 1, ...]) or per input column
    (older LyCORIS: shape [1, in, ...]); its shape says which."""
    merged = weight + delta
    magnitude = _f32(magnitude)
    out_dim = weight.shape[0]
    if magnitude.numel() == out_dim and (magnitude.dim() <= 1 or magnitude.shape[0] == out_dim):
        norm = merged.reshape(out_dim, -1).norm(dim=1).reshape(out_dim, *[1] * (weight.dim() - 1))
        scaled = merged * (magnitude.reshape(norm.shape) / norm)
    else:
        in_dim = weight.shape[1]
        norm = merged.transpose(0, 1).reshape(in_dim, -1).norm(dim=1).reshape(1, in_dim, *[1] * (weight.dim() - 2))
        scaled = merged * (magnitude.reshape(norm.shape) / norm)
    return scaled - weight


COMPUTE = {"lora": lora, "loha": loha, "lokr": lokr, "ia3": ia3, "oft": oft, "glora": glora, "full": full}


def layer_delta(parts: Parts, weight: torch.Tensor, dyn: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight delta, bias delta) of one network on one layer, at multiplier 1. ``weight``: float32 original."""
    kind = network_type(parts)
    delta = lora(parts, weight, dyn) if kind == "lora" else COMPUTE[kind](parts, weight)
    if "dora_scale" in parts:
        delta = dora(delta, weight, parts["dora_scale"])
    if not torch.isfinite(delta).all():
        raise NetworkFormatError("the weights hold NaN or infinite values")
    return delta, bias_delta(parts)


def add_into(target: torch.Tensor, parts: Parts, weight: torch.Tensor, multiplier: float,
             dyn: int | None = None) -> torch.Tensor | None:
    """``target += multiplier * delta`` in place; the bias delta (or None). A plain LoRA (the common
    case) adds its low-rank product straight into ``target`` (one addmm, no layer-sized temporary)."""
    plain = ("lora_up.weight" in parts and "lora_down.weight" in parts and "lora_mid.weight" not in parts
             and "dora_scale" not in parts)
    if not plain:
        delta, bias = layer_delta(parts, weight, dyn)
        target.add_(delta, alpha=multiplier)
        return bias
    up, down = _f32(parts["lora_up.weight"]).flatten(1), _f32(parts["lora_down.weight"]).flatten(1)
    rank = down.shape[0]
    if dyn is not None and 0 < dyn < rank:
        up, down = up[:, :dyn], down[:dyn]
    flat = target.view(target.shape[0], -1)
    if up.shape[0] != flat.shape[0] or down.shape[1] != flat.shape[1] or up.shape[1] != down.shape[0]:
        raise NetworkFormatError(f"LoRA of {up.shape[0]}x{down.shape[1]} does not fit the layer's "
                                 f"{tuple(weight.shape)}")
    if not (torch.isfinite(up).all() and torch.isfinite(down).all()):
        raise NetworkFormatError("the weights hold NaN or infinite values")
    flat.addmm_(up, down, alpha=_scale(parts, rank) * multiplier)
    return bias_delta(parts)


class PlainLora:
    """A plain LoRA layer ready to merge: ``up`` [out, rank] and ``down`` [rank, in*k*k] as the file holds them
    (views, the file's dtype), the network's scale and bias change. Built once per parsed file; the
    factors are converted to float32 at merge time into the merger's reusable buffers (``float32_into``),
    so parsing a file allocates nothing (fresh memory is what cost time: see backups.py)."""
    __slots__ = ("up", "down", "scale", "bias")

    def __init__(self, up: torch.Tensor, down: torch.Tensor, scale: float, bias: torch.Tensor | None):
        self.up, self.down, self.scale, self.bias = up, down, scale, bias

    def factors(self, dyn: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        rank = self.down.shape[0]
        if dyn is not None and 0 < dyn < rank:   # DyLoRA: the first `dyn` ranks, scale of the full rank
            return self.up[:, :dyn], self.down[:dyn]
        return self.up, self.down

    def check_fits(self, weight: torch.Tensor) -> None:
        out, cols = weight.shape[0], weight[0].numel() if weight.dim() > 1 else 1
        if self.up.shape[0] != out or self.down.shape[1] != cols or self.up.shape[1] != self.down.shape[0]:
            raise NetworkFormatError(f"LoRA of {self.up.shape[0]}x{self.down.shape[1]} does not fit the layer's "
                                     f"{tuple(weight.shape)}")


def is_plain_lora(parts: Parts) -> bool:
    return ("lora_up.weight" in parts and "lora_down.weight" in parts and "lora_mid.weight" not in parts
            and "dora_scale" not in parts)


def prepare_plain(groups: dict[str, Parts]) -> dict[str, PlainLora | None]:
    """``{prefix: PlainLora}`` for the plain-LoRA layers of one file (None: the layer holds NaN/inf, so it
    takes the general path, which reports it). A sum accumulated in float32 says "all finite" far faster
    than isfinite().all() (NaN/inf propagate into it); only a sum that is not finite (a bad value, or
    finite values overflowing it) falls back to the exact check."""
    out: dict[str, PlainLora | None] = {}
    for prefix, parts in groups.items():
        if not is_plain_lora(parts):
            continue
        up_raw, down_raw = parts["lora_up.weight"].detach(), parts["lora_down.weight"].detach()
        up, down = up_raw.reshape(up_raw.shape[0], -1), down_raw.reshape(down_raw.shape[0], -1)
        if not (_finite(up) and _finite(down)):
            out[prefix] = None
            continue
        out[prefix] = PlainLora(up, down, _scale(parts, down.shape[0]), bias_delta(parts))
    return out


def _finite(t: torch.Tensor) -> bool:
    total = t.sum(dtype=torch.float64) if t.is_floating_point() else 0.0
    return math.isfinite(float(total)) or bool(torch.isfinite(t).all())


def float32_into(buffer: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``t`` as float32: itself when it is a contiguous float32 tensor, else converted into ``buffer`` (a
    float32 CPU tensor of at least ``t.numel()`` elements), with ``t``'s shape."""
    if t.dtype == torch.float32 and t.is_contiguous():
        return t
    return buffer[:t.numel()].view(t.shape).copy_(t)


def describe(parts: Parts) -> str:
    try:
        return network_type(parts)
    except NetworkFormatError:
        return "unknown"


__all__ = ["NetworkFormatError", "PlainLora", "network_type", "layer_delta", "add_into", "prepare_plain", "describe"]

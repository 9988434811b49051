"""A1111-compatible seeds, variation seeds and initial noise.

How every random number of an image derives from its seed (A1111 v1.10 behaviour):

* **Initial latent.**  For image *i* with seed ``s_i`` a fresh generator is seeded
  with ``s_i`` and ``randn(C, H, W)`` is drawn from it -- with source ``"CPU"``
  on a CPU generator (then moved to the compute device), with ``"GPU"`` on a
  generator of the compute device, with ``"NV"`` from a Philox stream that
  reproduces NVIDIA GPUs on any machine.  For the CPU source this is exactly
  ``torch.randn((C, H, W), generator=torch.Generator().manual_seed(s_i))``.
* **Variation seed.**  When ``subseed_strength > 0`` the subseed's noise is
  drawn the same way and mixed in by spherical interpolation (``slerp``).
* **Seed resize.**  When "resize seed from" W0xH0 is set, the seed's noise is
  drawn at the W0xH0 latent size and pasted centred into the target-size noise
  (see ``_paste_centred`` for the exact offsets).
* **Step noise** (ancestral / SDE samplers).  The *same* per-image generators
  that drew the initial latent keep going: ``ImageRNG.generators`` is handed to
  the diffusers pipeline as ``generator=[...]``, and diffusers draws one
  ``randn((1, C, H, W))`` per image per noisy step from generator *i*, which
  is the continuation of the seed's stream that A1111 uses.  With
  "Eta noise seed delta" (ENSD) set, A1111 instead re-seeds the step generators
  with ``s_i + ENSD``; ``eta_noise_seed_delta`` does the same.

So a whole image is reproducible from (seed, subseed, strength, resize-from,
source, ENSD).  torch's CPU generator is device-independent, hence "CPU" is the
source to pick for identical images across machines.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from modules.core.seeds import resolve_seed  # noqa: F401 - callers use rng.resolve_seed

__all__ = [
    "RNG_SOURCES",
    "MAX_SEED",
    "resolve_seed",
    "batch_seeds",
    "batch_subseeds",
    "slerp",
    "generators_for",
    "ImageRNG",
    "create_noise",
    "PhiloxGenerator",
    "philox4x32_10",
]

RNG_SOURCES: tuple[str, ...] = ("GPU", "CPU", "NV")  # A1111's "Random number generator source"
MAX_SEED = 2**32 - 1


def batch_seeds(seed: int, n_iter: int, batch_size: int, *, subseed_strength: float = 0.0) -> list[int]:
    """Seeds of all ``n_iter * batch_size`` images of a job: s, s+1, s+2, ...

    As in A1111, when a variation seed is in use (``subseed_strength != 0``)
    every image keeps the same seed and only the subseeds advance.  A negative
    seed is resolved to a random one first (once for the whole job).
    """
    base = resolve_seed(seed)
    count = max(0, int(n_iter)) * max(0, int(batch_size))
    step = 0 if subseed_strength != 0 else 1
    return [base + i * step for i in range(count)]


def batch_subseeds(subseed: int, n_iter: int, batch_size: int) -> list[int]:
    """Variation seeds of all images of a job: consecutive from ``subseed``."""
    base = resolve_seed(subseed)
    return [base + i for i in range(max(0, int(n_iter)) * max(0, int(batch_size)))]


# Dot products (of unit vectors) above this count as parallel: the slerp
# weights divide by sin(angle) and lose precision there, so lerp is used.
_SLERP_PARALLEL = 0.9995


def slerp(val: float, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation from ``low`` (val=0) to ``high`` (val=1).

    slerp(t; a, b) = sin((1-t)w)/sin(w) * a + sin(t w)/sin(w) * b, with
    cos(w) = <a, b> / (|a||b|).  To reproduce A1111's variation-seed noise the
    vectors are taken along dim 1 (for a (C, H, W) latent: one angle per
    (channel, column)), which is how A1111 applies it to per-image noise.
    When the vectors are (on average) nearly parallel the weights are
    ill-conditioned and plain linear interpolation is used instead.
    """
    low_n = low / torch.linalg.vector_norm(low, dim=1, keepdim=True)
    high_n = high / torch.linalg.vector_norm(high, dim=1, keepdim=True)
    dot = (low_n * high_n).sum(1)
    if dot.mean() > _SLERP_PARALLEL:
        return (1.0 - val) * low + val * high
    omega = torch.acos(dot.clamp(-1.0, 1.0))
    sin_omega = torch.sin(omega)
    w_low = (torch.sin((1.0 - val) * omega) / sin_omega).unsqueeze(1)
    w_high = (torch.sin(val * omega) / sin_omega).unsqueeze(1)
    return w_low * low + w_high * high


def _norm_source(source: str) -> str:
    s = str(source or "GPU").strip().upper()
    if s not in RNG_SOURCES:
        raise ValueError(f"Unknown RNG source {source!r}; expected one of {', '.join(RNG_SOURCES)}")
    return s


def _generator_device(source: str, device: torch.device) -> torch.device:
    # CPU source, and MPS whose generator differs between macOS versions, draw on CPU
    # (A1111 does the same for MPS).  NV's torch generators are only a fallback for
    # step noise, see ImageRNG.
    if source in ("CPU", "NV") or device.type == "mps":
        return torch.device("cpu")
    return device


def generators_for(seeds: Sequence[int], device: str | torch.device = "cpu", *, offset: int = 0) -> list[torch.Generator]:
    """One fresh ``torch.Generator`` per image on ``device``, seeded ``seed + offset``.

    ``offset`` is A1111's eta noise seed delta (0 = none).
    """
    dev = torch.device(device)
    return [torch.Generator(device=dev).manual_seed(int(s) + int(offset)) for s in seeds]


# ---------------------------------------------------------------------------
# NV source: Philox4x32-10 + Box-Muller, as torch's CUDA randn computes it
# ---------------------------------------------------------------------------

_MASK32 = np.uint64(0xFFFFFFFF)
_PHILOX_M = (np.uint64(0xD2511F53), np.uint64(0xCD9E8D57))  # round multipliers
_PHILOX_W = (np.uint64(0x9E3779B9), np.uint64(0xBB67AE85))  # key schedule (Weyl) increments


def philox4x32_10(counter: np.ndarray, key: np.ndarray) -> np.ndarray:
    """Philox4x32 with 10 rounds (Salmon et al. 2011, Random123), vectorised.

    ``counter``: uint32 array of shape (4, n); ``key``: uint32 array (2, n).
    Returns uint32 (4, n).
    """
    c0, c1, c2, c3 = (np.asarray(counter[i], dtype=np.uint64) for i in range(4))
    k0 = np.asarray(key[0], dtype=np.uint64)
    k1 = np.asarray(key[1], dtype=np.uint64)
    for _ in range(10):
        p0 = c0 * _PHILOX_M[0]  # 32x32 -> 64 bit products never overflow uint64
        p1 = c2 * _PHILOX_M[1]
        c0, c1, c2, c3 = (
            (p1 >> np.uint64(32)) ^ c1 ^ k0,
            p1 & _MASK32,
            (p0 >> np.uint64(32)) ^ c3 ^ k1,
            p0 & _MASK32,
        )
        k0 = (k0 + _PHILOX_W[0]) & _MASK32
        k1 = (k1 + _PHILOX_W[1]) & _MASK32
    return np.stack([c0, c1, c2, c3]).astype(np.uint32)


# curand's Box-Muller maps a uint32 to (0, 1) as x * 2**-32 + 2**-33 (in float32).
_TWO_POW_M32 = float(np.float32(2.3283064e-10))
_TWO_PI_TWO_POW_M32 = float(np.float32(2.3283064e-10) * np.float32(6.2831855))


def _box_muller_sin(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    u = x.astype(np.float64) * _TWO_POW_M32 + _TWO_POW_M32 / 2
    v = y.astype(np.float64) * _TWO_PI_TWO_POW_M32 + _TWO_PI_TWO_POW_M32 / 2
    return (np.sqrt(-2.0 * np.log(u)) * np.sin(v)).astype(np.float32)


class PhiloxGenerator:
    """A1111's "NV" source: torch-on-NVIDIA ``randn`` reproduced on any device.

    torch's CUDA normal kernel seeds curand Philox per element with
    key = seed (low, high 32 bits), subsequence = element index and an offset
    that advances by one 4-word block per kernel launch; element *i* takes the
    sine half of Box-Muller on the first two output words.  So draw number *k*
    of a seed uses counter (k, 0, i, 0).  (Like A1111's NV mode this models the
    one-block-per-element case, which covers per-image SD latents.)
    """

    def __init__(self, seed: int) -> None:
        seed = int(seed) & 0xFFFFFFFFFFFFFFFF
        self.key = (seed & 0xFFFFFFFF, seed >> 32)
        self.offset = 0

    def randn(self, shape: Sequence[int]) -> np.ndarray:
        n = int(np.prod(shape))
        counter = np.zeros((4, n), dtype=np.uint32)
        counter[0] = self.offset
        counter[2] = np.arange(n, dtype=np.uint32)
        key = np.empty((2, n), dtype=np.uint32)
        key[0], key[1] = self.key
        self.offset += 1
        words = philox4x32_10(counter, key)
        return _box_muller_sin(words[0], words[1]).reshape(tuple(shape))


# ---------------------------------------------------------------------------
# Per-job noise
# ---------------------------------------------------------------------------


def _paste_centred(target: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """Paste ``src`` (C, h0, w0) centred into ``target`` (C, h, w), in place.

    Offsets as A1111 documents "resize seed from": d = (target - source) // 2
    per axis (floor division).  Smaller source: placed at d, the rest of the
    target keeps the target-size noise of the same seed.  Larger source: its
    centre is cropped, starting at -d, with size source + 2d (so for odd
    differences one row/column of target-size noise remains, as in A1111).
    """
    dx = (target.shape[2] - src.shape[2]) // 2
    dy = (target.shape[1] - src.shape[1]) // 2
    w = src.shape[2] if dx >= 0 else src.shape[2] + 2 * dx
    h = src.shape[1] if dy >= 0 else src.shape[1] + 2 * dy
    tx, ty = max(dx, 0), max(dy, 0)
    sx, sy = max(-dx, 0), max(-dy, 0)
    target[:, ty:ty + h, tx:tx + w] = src[:, sy:sy + h, sx:sx + w]
    return target


@dataclass
class ImageRNG:
    """Noise for one batch: ``first()`` is the initial latent, then the step noise.

    ``shape`` is the per-image latent shape (C, H, W), e.g. (4, h//8, w//8) for
    SD.  ``seed_resize_from`` is (width, height) in *pixels* as in A1111's UI
    and infotext ("Seed resize from: 512x768"); 0 disables it.

    After ``first()``, pass ``generators`` to the diffusers pipeline for the
    sampler's step noise (see the module docstring), or call ``next()`` for a
    custom sampler loop.
    """

    shape: tuple[int, ...]
    seeds: Sequence[int]
    subseeds: Sequence[int] | None = None
    subseed_strength: float = 0.0
    seed_resize_from: tuple[int, int] = (0, 0)
    source: str = "CPU"
    device: str | torch.device = "cpu"
    eta_noise_seed_delta: int = 0
    latent_factor: int = 8
    generators: list[torch.Generator] = field(init=False, default_factory=list)
    _philox: list[PhiloxGenerator] = field(init=False, default_factory=list, repr=False)

    def __post_init__(self) -> None:
        self.shape = tuple(int(d) for d in self.shape)
        if len(self.shape) != 3:
            raise ValueError(f"shape must be the per-image latent shape (C, H, W), got {self.shape}")
        self.seeds = [int(s) for s in self.seeds]
        self.source = _norm_source(self.source)
        self.device = torch.device(self.device)
        self._gen_device = _generator_device(self.source, self.device)
        self.generators = generators_for(self.seeds, self._gen_device)
        if self.source == "NV":
            self._philox = [PhiloxGenerator(s) for s in self.seeds]

    # -- drawing primitives ------------------------------------------------
    def _randn_fresh(self, seed: int, shape: tuple[int, ...]) -> torch.Tensor:
        """The first draw of ``seed`` at ``shape`` (no shared state touched)."""
        if self.source == "NV":
            return torch.from_numpy(PhiloxGenerator(seed).randn(shape))
        gen = torch.Generator(device=self._gen_device).manual_seed(int(seed))
        return torch.randn(shape, generator=gen, device=self._gen_device)

    def _randn_image(self, i: int, shape: tuple[int, ...]) -> torch.Tensor:
        """Next draw from image ``i``'s own stream."""
        if self.source == "NV":
            return torch.from_numpy(self._philox[i].randn(shape))
        return torch.randn(shape, generator=self.generators[i], device=self._gen_device)

    # -- public ------------------------------------------------------------
    def first(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Initial noise, shape (B, C, H, W), on ``device``."""
        rw, rh = (int(v) for v in self.seed_resize_from)
        resized = rw > 0 and rh > 0
        noise_shape = (
            (self.shape[0], rh // self.latent_factor, rw // self.latent_factor) if resized else self.shape
        )
        resized = resized and noise_shape != self.shape
        use_subseed = self.subseeds is not None and self.subseed_strength != 0

        out = []
        for i, seed in enumerate(self.seeds):
            subnoise = None
            if use_subseed:
                subseed = self.subseeds[i] if i < len(self.subseeds) else 0
                subnoise = self._randn_fresh(subseed, noise_shape)
            # The image's own stream is advanced by exactly one target-size draw
            # in both branches, so step noise does not depend on seed resize.
            noise = self._randn_fresh(seed, noise_shape) if resized else self._randn_image(i, self.shape)
            if subnoise is not None:
                noise = slerp(float(self.subseed_strength), noise, subnoise)
            if resized:
                noise = _paste_centred(self._randn_image(i, self.shape), noise)
            out.append(noise)

        if self.eta_noise_seed_delta:
            self.generators = generators_for(self.seeds, self._gen_device, offset=self.eta_noise_seed_delta)
            if self.source == "NV":
                self._philox = [PhiloxGenerator(s + self.eta_noise_seed_delta) for s in self.seeds]
        elif self.source == "NV":
            # diffusers only takes torch generators; with NV they cannot continue
            # the Philox stream, so step noise comes from CPU generators seeded
            # with the seed (deterministic, but unlike A1111's NV step noise).
            self.generators = generators_for(self.seeds, "cpu")
        return torch.stack(out).to(device=self.device, dtype=dtype)

    def next(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """One step-noise draw per image (B, C, H, W), continuing each stream."""
        draws = [self._randn_image(i, self.shape) for i in range(len(self.seeds))]
        return torch.stack(draws).to(device=self.device, dtype=dtype)


def create_noise(
    shape: Sequence[int],
    seeds: Sequence[int],
    subseeds: Sequence[int] | None = None,
    subseed_strength: float = 0.0,
    seed_resize_from: tuple[int, int] = (0, 0),
    source: str = "CPU",
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Initial latent noise (B, C, H, W) for ``seeds``; see ImageRNG for details."""
    rng = ImageRNG(
        shape=tuple(shape),
        seeds=seeds,
        subseeds=subseeds,
        subseed_strength=subseed_strength,
        seed_resize_from=seed_resize_from,
        source=source,
        device=device,
    )
    return rng.first(dtype=dtype)

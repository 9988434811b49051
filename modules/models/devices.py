"""Device and dtype policy for the model (A1111's --use-cpu / --device-id / --no-half / --no-half-vae / --precision).

Order of preference: CUDA -> MPS -> CPU. The CPU always runs fp32: half precision there is
either unsupported or (bf16) about 100x slower than fp32 on the machines we measured.

This module imports torch, so the app imports it lazily (only when a model is loaded), never at
server start.
"""
from __future__ import annotations

import gc
import os
from dataclasses import dataclass, replace

import torch

from modules.models.libc import glibc_call

# --use-cpu names that move the diffusion model itself (A1111 accepts module names; "all" means everything).
_SD_CPU_NAMES = frozenset({"all", "sd"})


@dataclass(frozen=True)
class DevicePolicy:
    device: torch.device
    dtype: torch.dtype  # UNet (and everything not listed below)
    vae_dtype: torch.dtype
    text_encoder_dtype: torch.dtype
    # --medvram / --lowvram / --medvram-sdxl: "normal", "medvram", "medvram-sdxl" or "lowvram"
    vram: str = "normal"
    # low-RAM CPU mode: weights stay in the file's fp16/bf16 and are upcast per layer for compute
    lowram: bool = False
    compile: bool = False    # --opt-compile: torch.compile the UNet and the VAE decoder (CUDA only)

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    def offload_for(self, is_sdxl: bool) -> str:
        """"none", "medvram" or "lowvram" for a model: --medvram-sdxl applies to SDXL models only."""
        if self.vram == "lowvram":
            return "lowvram"
        if self.vram == "medvram" or (self.vram == "medvram-sdxl" and is_sdxl):
            return "medvram"
        return "none"

    @property
    def load_device(self) -> torch.device:
        """Where weights are put at load: the CPU when any offload mode may keep them there."""
        return torch.device("cpu") if self.vram != "normal" else self.device

    @property
    def is_half(self) -> bool:
        return self.dtype in (torch.float16, torch.bfloat16)

    def describe(self) -> str:
        def name(dt: torch.dtype) -> str:
            return str(dt).removeprefix("torch.")

        return f"{self.device} unet={name(self.dtype)} te={name(self.text_encoder_dtype)} vae={name(self.vae_dtype)}"


def cpu_policy(**kwargs) -> DevicePolicy:
    """fp32 on the CPU: what tests and CPU-only installs use (kwargs: vram, lowram, compile)."""
    return DevicePolicy(torch.device("cpu"), torch.float32, torch.float32, torch.float32, **kwargs)


LOWRAM_AUTO_BELOW = 16 * 2**30   # bytes of RAM under which the low-RAM CPU mode is on by default


def total_ram() -> int:
    """Physical RAM in bytes (0 when unknown)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def vram_mode(*, medvram: bool = False, lowvram: bool = False, medvram_sdxl: bool = False) -> str:
    if lowvram:
        return "lowvram"
    if medvram:
        return "medvram"
    return "medvram-sdxl" if medvram_sdxl else "normal"


def _wants_cpu(use_cpu: list[str] | tuple[str, ...] | bool | None) -> bool:
    if isinstance(use_cpu, bool):
        return use_cpu
    return any(str(name).strip().lower() in _SD_CPU_NAMES for name in (use_cpu or ()))


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def select_device_policy(
    *,
    use_cpu: list[str] | bool,
    device_id: str | None,
    no_half: bool,
    no_half_vae: bool,
    precision: str = "autocast",
    vram: str = "normal",
    lowram: bool | None = None,
    compile: bool = False,
) -> DevicePolicy:
    """Pick device and dtypes from the A1111 flags.

    - `--use-cpu all` (or `sd`) forces the CPU.
    - CUDA runs fp16 unless `--no-half` or `--precision full`; the VAE follows unless `--no-half-vae`.
    - MPS runs fp16 likewise, but its VAE always runs fp32: fp16 VAE decodes on MPS give black/NaN
      images often enough that A1111's macOS launcher passes --no-half-vae by default.
    - The CPU computes in fp32. ``lowram`` (None: on when RAM is under 16 GB) keeps the CPU's weights
      in the file's fp16/bf16 and upcasts layer by layer (``models/precision.py``).
    - ``vram`` (--medvram & co) keeps weights on the CPU and moves them in as they run (``models/offload.py``).
    """
    policy = _select(use_cpu=use_cpu, device_id=device_id, no_half=no_half, no_half_vae=no_half_vae,
                     precision=precision)
    on_cpu = policy.device.type == "cpu"
    if lowram is None:
        lowram = on_cpu and 0 < total_ram() < LOWRAM_AUTO_BELOW
    return replace(policy, vram=vram, lowram=bool(lowram and on_cpu), compile=bool(compile and policy.is_cuda))


def _select(*, use_cpu: list[str] | bool, device_id: str | None, no_half: bool, no_half_vae: bool,
            precision: str) -> DevicePolicy:
    full = no_half or precision == "full"
    if not _wants_cpu(use_cpu) and torch.cuda.is_available():
        index = int(device_id) if device_id not in (None, "") else torch.cuda.current_device()
        if not 0 <= index < torch.cuda.device_count():
            raise ValueError(f"--device-id {device_id}: only {torch.cuda.device_count()} CUDA device(s) visible")
        dtype = torch.float32 if full else torch.float16
        vae_dtype = torch.float32 if (full or no_half_vae) else torch.float16
        return DevicePolicy(torch.device("cuda", index), dtype, vae_dtype, dtype)
    if not _wants_cpu(use_cpu) and _mps_available():
        dtype = torch.float32 if full else torch.float16
        return DevicePolicy(torch.device("mps"), dtype, torch.float32, dtype)
    return cpu_policy()


def torch_gc(device: torch.device | None = None) -> None:
    """Return freed memory to the system/driver after a model is dropped."""
    gc.collect()
    _malloc_trim()
    if torch.cuda.is_available() and (device is None or device.type == "cuda"):
        torch.cuda.empty_cache()
        torch.cuda.ipc_collect()
    elif device is not None and device.type == "mps" and _mps_available():
        torch.mps.empty_cache()


def _malloc_trim() -> None:
    """Hand freed heap pages back to the OS (glibc): a dropped model's thousands of small tensors
    otherwise stay in the process's heap, and RSS creeps up with every checkpoint switch."""
    glibc_call("malloc_trim", 0)

"""Device and dtype policy for the model (A1111's --use-cpu / --device-id / --no-half / --no-half-vae / --precision).

Order of preference: CUDA -> MPS -> CPU. The CPU always runs fp32: half precision there is
either unsupported or (bf16) about 100x slower than fp32 on the machines we measured.

This module imports torch, so the app imports it lazily (only when a model is loaded), never at
server start.
"""
from __future__ import annotations

import gc
from dataclasses import dataclass

import torch

# --use-cpu names that move the diffusion model itself (A1111 accepts module names; "all" means everything).
_SD_CPU_NAMES = frozenset({"all", "sd"})


@dataclass(frozen=True)
class DevicePolicy:
    device: torch.device
    dtype: torch.dtype  # UNet (and everything not listed below)
    vae_dtype: torch.dtype
    text_encoder_dtype: torch.dtype

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def is_half(self) -> bool:
        return self.dtype in (torch.float16, torch.bfloat16)

    def describe(self) -> str:
        def name(dt: torch.dtype) -> str:
            return str(dt).removeprefix("torch.")

        return f"{self.device} unet={name(self.dtype)} te={name(self.text_encoder_dtype)} vae={name(self.vae_dtype)}"


def cpu_policy() -> DevicePolicy:
    """fp32 on the CPU: what tests and CPU-only installs use."""
    return DevicePolicy(torch.device("cpu"), torch.float32, torch.float32, torch.float32)


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
) -> DevicePolicy:
    """Pick device and dtypes from the A1111 flags.

    - `--use-cpu all` (or `sd`) forces the CPU.
    - CUDA runs fp16 unless `--no-half` or `--precision full`; the VAE follows unless `--no-half-vae`.
    - MPS runs fp16 likewise, but its VAE always runs fp32: fp16 VAE decodes on MPS give black/NaN
      images often enough that A1111's macOS launcher passes --no-half-vae by default.
    - The CPU is always fp32.
    """
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
    if torch.cuda.is_available() and (device is None or device.type == "cuda"):
        torch.cuda.empty_cache()
        torch.cuda.ipc_collect()
    elif device is not None and device.type == "mps" and _mps_available():
        torch.mps.empty_cache()

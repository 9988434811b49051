"""Tiny random-weight upscaler files in the real on-disk layouts, built with spandrel's own architecture
classes, so detection (architecture, scale) is exercised exactly as on a user's files.

* ESRGAN, old layout (``model.0.weight``, ``model.1.sub.0.RDB1.conv1.0.weight``: the original ESRGAN,
  4x-UltraSharp and most community models), saved as a bare state dict;
* ESRGAN, new layout (BasicSR's ``conv_first``/``body.0.rdb1.conv1``/``conv_up1``/``conv_hr``/``conv_last``),
  wrapped as ``{"params_ema": ...}`` like RealESRGAN_x4plus.pth;
* Real-ESRGAN compact (SRVGGNetCompact, ``body.N``), wrapped as ``{"params": ...}`` like realesr-general-x4v3.pth;
* SwinIR and DAT, wrapped as ``{"params": ...}`` / ``{"params_ema": ...}`` like their released .pth files.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

import torch

from modules.models.spandrel_support import spandrel_support

spandrel_support()  # spandrel is imported through our torchvision-free shim, once, before any arch class


def _esrgan(scale: int):
    from spandrel.architectures.ESRGAN import ESRGAN

    return ESRGAN(in_nc=3, out_nc=3, num_filters=8, num_blocks=1, scale=scale)


def esrgan_new_layout(old: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The old-layout keys renamed to BasicSR's RRDBNet names (what spandrel converts back)."""
    seq = sorted({int(k.split(".")[1]) for k in old if re.match(r"model\.\d+\.(weight|bias)$", k)})
    ups, hr, last = seq[1:-2], seq[-2], seq[-1]
    sub_last = max(int(m.group(1)) for k in old if (m := re.match(r"model\.1\.sub\.(\d+)\.(weight|bias)$", k)))
    out = {}
    for key, value in old.items():
        if m := re.match(r"model\.1\.sub\.(\d+)\.RDB(\d)\.conv(\d)\.0\.(weight|bias)$", key):
            out[f"body.{m[1]}.rdb{m[2]}.conv{m[3]}.{m[4]}"] = value
        elif m := re.match(r"model\.1\.sub\.(\d+)\.(weight|bias)$", key):
            assert int(m[1]) == sub_last
            out[f"conv_body.{m[2]}"] = value
        else:
            index, kind = int(key.split(".")[1]), key.split(".")[2]
            name = ("conv_first" if index == 0 else f"conv_up{ups.index(index) + 1}" if index in ups
                    else "conv_hr" if index == hr else "conv_last" if index == last else None)
            assert name is not None, key
            out[f"{name}.{kind}"] = value
    return out


def _compact(scale: int):
    from spandrel.architectures.Compact import Compact

    return Compact(num_in_ch=3, num_out_ch=3, num_feat=8, num_conv=2, upscale=scale)


def _swinir(scale: int):
    from spandrel.architectures.SwinIR import SwinIR

    return SwinIR(upscale=scale, img_size=16, window_size=4, embed_dim=12, depths=[1], num_heads=[2], mlp_ratio=2,
                  upsampler="pixelshuffledirect", resi_connection="1conv")


def _dat(scale: int):
    from spandrel.architectures.DAT import DAT

    return DAT(upscale=scale, img_size=16, embed_dim=32, depth=[2], num_heads=[2], split_size=[2, 4],
               expansion_factor=2, resi_connection="1conv", upsampler="pixelshuffle")


def _seeded(build: Callable[[int], torch.nn.Module], scale: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(scale * 7 + 1)
    model = build(scale).eval()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# name -> (expected spandrel architecture id, file writer(path, scale))
def write_esrgan_old(path: Path, scale: int) -> None:
    torch.save(_seeded(_esrgan, scale), path)


def write_esrgan_new(path: Path, scale: int) -> None:
    torch.save({"params_ema": esrgan_new_layout(_seeded(_esrgan, scale))}, path)


def write_compact(path: Path, scale: int) -> None:
    torch.save({"params": _seeded(_compact, scale)}, path)


def write_swinir(path: Path, scale: int) -> None:
    torch.save({"params_ema": _seeded(_swinir, scale)}, path)


def write_dat(path: Path, scale: int) -> None:
    torch.save({"params": _seeded(_dat, scale)}, path)


KINDS = {
    "esrgan-old": ("ESRGAN", write_esrgan_old, "ESRGAN"),
    "esrgan-new": ("ESRGAN", write_esrgan_new, "RealESRGAN"),
    "compact": ("Compact", write_compact, "RealESRGAN"),
    "swinir": ("SwinIR", write_swinir, "SwinIR"),
    "dat": ("DAT", write_dat, "DAT"),
}


def make_upscaler(models_dir: Path, kind: str, scale: int, name: str | None = None) -> Path:
    """Write one tiny upscaler of `kind` into its A1111 folder under `models_dir`; returns the file."""
    _arch, write, folder = KINDS[kind]
    path = models_dir / folder / f"{name or f'{scale}x-tiny-{kind}'}.pth"
    path.parent.mkdir(parents=True, exist_ok=True)
    write(path, scale)
    return path

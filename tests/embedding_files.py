"""Tiny textual-inversion embedding files in the real on-disk formats A1111 reads.

* string_to_param ``.pt``: A1111's own trainer output (torch.save of a plain dict);
* ``emb_params`` ``.safetensors``: kohya sd-scripts;
* one-tensor ``.bin``: diffusers' ``learned_embeds.bin`` ({"<token>": [D]});
* ``clip_l``/``clip_g`` ``.safetensors``: SDXL embeddings;
* PNG with the ``sd-ti-embedding`` text chunk, and PNG/WEBP with only the data layer in the pixels.
"""
from __future__ import annotations

import base64
from pathlib import Path

import torch
from PIL import Image, PngImagePlugin
from safetensors.torch import save_file

from modules.models import image_embedding


def vectors(count: int, width: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(count, width, generator=g)


def write_string_to_param_pt(path: Path, vec: torch.Tensor, *, name: str | None = None, step: int = 500) -> Path:
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vec}, "name": name or path.stem,
                "step": step, "sd_checkpoint": "abcdef1234", "sd_checkpoint_name": "tiny-sd1"}, path)
    return path


def write_emb_params_safetensors(path: Path, vec: torch.Tensor) -> Path:
    save_file({"emb_params": vec.contiguous()}, str(path))
    return path


def write_diffusers_bin(path: Path, vec: torch.Tensor, token: str = "<concept>") -> Path:
    torch.save({token: vec[0] if vec.shape[0] == 1 else vec}, path)
    return path


def write_sdxl_safetensors(path: Path, clip_l: torch.Tensor, clip_g: torch.Tensor) -> Path:
    save_file({"clip_l": clip_l.contiguous(), "clip_g": clip_g.contiguous()}, str(path))
    return path


def _image_data(vec: torch.Tensor, name: str) -> dict:
    return {"string_to_token": {"*": 265}, "string_to_param": {"*": vec.numpy()}, "name": name, "step": 100,
            "sd_checkpoint": "abcdef1234", "sd_checkpoint_name": "tiny-sd1"}


def write_png_text_chunk(path: Path, vec: torch.Tensor, name: str) -> Path:
    """A1111's "save embedding as image": the text chunk (plus a picture)."""
    info = PngImagePlugin.PngInfo()
    info.add_text(image_embedding.TEXT_CHUNK,
                  base64.b64encode(image_embedding.encode_json(_image_data(vec, name)).encode()).decode())
    Image.new("RGB", (64, 64), (200, 120, 40)).save(path, pnginfo=info)
    return path


def write_data_layer_image(path: Path, vec: torch.Tensor, name: str) -> Path:
    """Only the data layer in the pixels (what survives when the text chunk was stripped); lossless."""
    picture = Image.new("RGB", (64, 64), (200, 120, 40))
    image = image_embedding.embed_in_pixels(picture, _image_data(vec, name))
    if path.suffix.lower() == ".webp":
        image.save(path, lossless=True)
    else:
        image.save(path)
    return path

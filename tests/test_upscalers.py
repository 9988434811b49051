"""Upscaler models through spandrel: the install without torchvision, detection of the real file layouts,
exact scales, tiling, A1111's multi-pass rule, interrupt between tiles, and hostile files refused."""
from __future__ import annotations

import importlib.metadata
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT
from upscaler_fixtures import KINDS, make_upscaler

from modules.engine.model_upscale import (TileSettings, UpscaleInterrupted, passes_for, run_tiled, tile_spans,
                                          upscale_with_model)
from modules.engine.upscaling import tile_settings, upscale_image
from modules.models.spandrel_support import spandrel_support
from modules.models.upscaler_models import UnknownUpscalerError, UpscalerRegistry, guess_scale, upscaler_folders


def _image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    small = Image.fromarray((rng.random((height // 4 + 1, width // 4 + 1, 3)) * 255).astype("uint8"))
    return small.resize((width, height), Image.Resampling.BICUBIC)   # smooth, like a photo


def _tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)[None]


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("models")
    for kind in KINDS:
        for scale in (2, 4):
            make_upscaler(root, kind, scale)
    return root


@pytest.fixture(scope="module")
def registry(models_dir) -> UpscalerRegistry:
    return UpscalerRegistry(upscaler_folders(models_dir), cache_limit=2)


# --------------------------------------------------------------------------- the install

def test_the_venv_has_no_torchvision_and_spandrel_loads_the_esrgan_family(models_dir):
    assert importlib.util.find_spec("torchvision") is None
    with pytest.raises(importlib.metadata.PackageNotFoundError):
        importlib.metadata.distribution("torchvision")
    support = spandrel_support()
    assert "torchvision" not in sys.modules   # the import shim's stand-in is gone again
    assert set(support.unavailable) == {"LaMa", "RestoreFormer"}
    assert "ESRGAN" in support.registry and "LaMa" not in support.registry
    assert "CodeFormer" in support.registry   # spandrel_extra_arches
    registry = UpscalerRegistry(upscaler_folders(models_dir))
    for kind in ("esrgan-old", "esrgan-new", "compact"):
        info = registry.probe(f"4x-tiny-{kind}")
        assert info.usable and info.architecture == KINDS[kind][0] and info.scale == 4, info


def test_the_installer_puts_spandrel_in_without_its_declared_dependencies(tmp_path):
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import install_requirements as installer
    finally:
        sys.path.pop(0)
    text = (ROOT / "requirements.txt").read_text()
    assert not [line for line in text.splitlines() if "torchvision" in line.split("#")[0]]
    ordinary, no_deps = installer.split_requirements(text)
    assert no_deps == ["spandrel==0.4.2", "spandrel_extra_arches==0.2.0"]
    assert not any(line.startswith("spandrel") for line in ordinary)
    assert "einops==0.8.2" in ordinary   # spandrel's real dependencies are ordinary pinned lines
    pip = ["python", "-m", "pip", "install"]
    steps = installer.install_steps(ROOT / "requirements.txt", pip, tmp_path / "ordinary.txt")
    assert steps[0] == pip + ["torch==2.13.0"]
    assert steps[1] == pip + ["-r", str(tmp_path / "ordinary.txt")]
    assert steps[2] == pip + ["--no-deps", "spandrel==0.4.2", "spandrel_extra_arches==0.2.0"]
    assert not [line for line in (tmp_path / "ordinary.txt").read_text().splitlines()
                if "spandrel" in line.split("#")[0]]


# --------------------------------------------------------------------------- listing and detection

def test_names_follow_a1111_and_the_scan_needs_no_torch_work(registry):
    names = registry.names()
    assert "4x-tiny-esrgan-old" in names and "2x-tiny-dat" in names
    assert registry.get("2x-tiny-swinir").folder == "SwinIR"
    assert registry.get("4x-tiny-compact").folder == "RealESRGAN"
    assert guess_scale("4x-UltraSharp") == 4 and guess_scale("RealESRGAN_x2plus") == 2
    with pytest.raises(UnknownUpscalerError, match="4x-tiny-esrgan-old"):
        registry.get("4x-Nope")


@pytest.mark.parametrize("scale", [2, 4])
@pytest.mark.parametrize("kind", list(KINDS))
def test_each_model_is_detected_and_upscales_by_its_scale(registry, kind, scale):
    name = f"{scale}x-tiny-{kind}"
    info = registry.probe(name)
    assert info.usable, info.reason
    assert (info.architecture, info.scale) == (KINDS[kind][0], scale)
    image = _image(20, 12)
    out = upscale_image(image, (20 * scale, 12 * scale), name, registry=registry, options={"ESRGAN_tile": 0})
    assert out.size == (20 * scale, 12 * scale)
    model = registry.load(name)
    with torch.inference_mode():
        whole = model(_tensor(image))   # spandrel called on the whole image: the same pixels
    expected = Image.fromarray(whole[0].permute(1, 2, 0).mul(255).round().byte().numpy())
    assert np.abs(np.asarray(out, dtype=int) - np.asarray(expected, dtype=int)).max() <= 1


# --------------------------------------------------------------------------- tiling

def test_tile_spans_cover_evenly_within_the_tile_size():
    assert tile_spans(100, 0, 8) == [(0, 100)] and tile_spans(100, 192, 8) == [(0, 100)]
    spans = tile_spans(512, 192, 8)
    assert len(spans) == 3 and spans[0][0] == 0 and spans[-1][1] == 512
    assert all(e - s <= 192 for s, e in spans)
    assert all(a[1] - b[0] >= 8 for a, b in zip(spans, spans[1:]))


@pytest.mark.parametrize("name", ["2x-tiny-esrgan-old", "4x-tiny-esrgan-new", "4x-tiny-compact", "2x-tiny-dat"])
def test_tiled_and_whole_agree_on_an_image_larger_than_a_tile(registry, name):
    model = registry.load(name)
    tensor = _tensor(_image(52, 40, seed=3))
    tiles = []
    with torch.inference_mode():
        whole = model(tensor)
        tiled = run_tiled(model, tensor, TileSettings(tile=24, overlap=8), on_tile=lambda d, t: tiles.append((d, t)))
    assert tiles[-1] == (len(tiles), len(tiles)) and len(tiles) == 6   # 3 x 2 tiles, each reported
    diff = (whole - tiled).abs()
    assert diff.mean().item() < 0.003 and diff.max().item() < 0.05, (diff.mean().item(), diff.max().item())


def test_interrupt_stops_between_tiles(registry):
    model = registry.load("2x-tiny-compact")
    done = []
    with pytest.raises(UpscaleInterrupted):
        upscale_with_model(model, _image(60, 60), (120, 120), TileSettings(16, 4),
                           on_tile=lambda d, t: done.append(d), should_stop=lambda: len(done) >= 2)
    assert done == [1, 2]


def test_a1111_passes_then_lanczos_to_the_exact_target(registry):
    assert [passes_for(2, t) for t in (1, 1.5, 2, 3, 4, 8)] == [1, 1, 1, 2, 2, 3]
    assert passes_for(4, 2) == 1 and passes_for(4, 16) == 2 and passes_for(1, 4) == 1
    calls = []
    out = upscale_with_model(registry.load("2x-tiny-compact"), _image(10, 8), (30, 24), TileSettings(0, 0),
                             on_tile=lambda d, t: calls.append(t))
    assert out.size == (30, 24) and len(calls) == 2   # 10 -> 20 -> 40, then Lanczos to 30
    calls.clear()
    out = upscale_with_model(registry.load("4x-tiny-compact"), _image(10, 8), (20, 16), TileSettings(0, 0),
                             on_tile=lambda d, t: calls.append(t))
    assert out.size == (20, 16) and len(calls) == 1


def test_tile_settings_follow_a1111s_per_family_settings():
    opts = {"ESRGAN_tile": 96, "ESRGAN_tile_overlap": 4, "SWIN_tile": 64, "SWIN_tile_overlap": 2}
    assert tile_settings(opts, "ESRGAN") == TileSettings(96, 4)
    assert tile_settings(opts, "SwinIR") == TileSettings(64, 2)
    assert tile_settings(None, "Compact") == TileSettings(192, 8)


# --------------------------------------------------------------------------- hostile files

def test_corrupt_and_payload_files_are_listed_unusable_and_never_run(tmp_path):
    from security.hostile_ckpts import payload_pickle, write_torch_zip

    folder = tmp_path / "ESRGAN"
    folder.mkdir()
    marker = tmp_path / "pwned"
    write_torch_zip(folder / "evil.pth", payload_pickle(marker))
    (folder / "corrupt.pth").write_bytes(b"PK\x03\x04 not really a zip")
    (folder / "garbage.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    torch.save({"weight": torch.zeros(3)}, folder / "unknown-arch.pth")
    make_upscaler(tmp_path, "compact", 2, name="good")
    registry = UpscalerRegistry([("ESRGAN", folder), ("RealESRGAN", tmp_path / "RealESRGAN")])
    infos = {i.name: i for i in registry.infos()}   # the scan never breaks
    assert infos["good"].usable and infos["good"].scale == 2
    assert not infos["evil"].usable and "refused" in infos["evil"].reason
    assert not infos["corrupt"].usable and not infos["garbage"].usable
    assert not infos["unknown-arch"].usable and "does not recognise" in infos["unknown-arch"].reason
    assert not marker.exists()

"""The shared extra-network file scan: recursion, previews, user metadata, training metadata."""
from __future__ import annotations

import json

import torch
from safetensors.torch import save_file

from modules.models.network_files import scan_network_files


def _write(path, metadata=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"w": torch.zeros(1)}, str(path), metadata=metadata)


def test_scan_finds_nested_files_once_in_natural_order(tmp_path):
    _write(tmp_path / "a10.safetensors")
    _write(tmp_path / "a2.safetensors")
    _write(tmp_path / "sub" / "b.safetensors")
    (tmp_path / "notes.txt").write_text("x")
    files = scan_network_files([tmp_path, tmp_path / "sub"], (".safetensors",))
    assert [f.relpath for f in files] == ["a2.safetensors", "a10.safetensors", "sub/b.safetensors"]
    assert [f.name for f in files] == ["a2", "a10", "b"]


def test_preview_and_user_metadata_round_trip(tmp_path):
    _write(tmp_path / "style.safetensors", metadata={"ss_output_name": "Style", "ss_network_dim": "4"})
    (tmp_path / "style.preview.png").write_bytes(b"png")
    [item] = scan_network_files([tmp_path], (".safetensors",))
    assert item.preview() == tmp_path / "style.preview.png"
    assert item.training_metadata()["ss_output_name"] == "Style"
    assert item.user_metadata() == {}
    item.save_user_metadata({"activation text": "stylish", "preferred weight": 0.8})
    assert json.loads((tmp_path / "style.json").read_text())["activation text"] == "stylish"
    assert item.user_metadata()["preferred weight"] == 0.8


def test_bad_user_metadata_reads_as_empty(tmp_path):
    _write(tmp_path / "x.safetensors")
    (tmp_path / "x.json").write_text("{not json")
    [item] = scan_network_files([tmp_path], (".safetensors",))
    assert item.user_metadata() == {}
    (tmp_path / "x.json").write_text("[1, 2]")
    assert item.user_metadata() == {}


def test_an_embedding_png_is_not_its_own_preview(tmp_path):
    (tmp_path / "emb.png").write_bytes(b"png")
    [item] = scan_network_files([tmp_path], (".png",))
    assert item.preview() is None

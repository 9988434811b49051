"""The Extra Networks browser's card model (modules/core/extra_networks.py): pages, cards, the tag toggle,
search/sort/folders, user metadata, previews and what the preview route may serve."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from embedding_files import vectors, write_data_layer_image, write_emb_params_safetensors
from modules.core import extra_networks as en


def _lora(path: Path, metadata: dict | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32),
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(32, 4)}, str(path),
              metadata=metadata)
    return path


@pytest.fixture()
def pages(tmp_path):
    lora, emb, hyper, ckpt = (tmp_path / d for d in ("Lora", "embeddings", "hypernetworks", "ckpt"))
    for d in (lora, emb, hyper, ckpt):
        d.mkdir()
    return {p.id: p for p in (
        en.Page(en.LORA, (lora, tmp_path / "LyCORIS"), (".safetensors", ".pt", ".ckpt")),
        en.Page(en.TEXTUAL_INVERSION, (emb,), (".pt", ".bin", ".safetensors", ".png", ".webp")),
        en.Page(en.HYPERNETWORKS, (hyper,), (".pt",)),
        en.Page(en.CHECKPOINTS, (ckpt,), (".safetensors", ".ckpt")),
    )}


def test_default_pages_follow_the_folders(tmp_path):
    from modules.core.flags import parse_args
    from modules.core.paths import AppPaths

    paths = AppPaths.from_opts(parse_args(["--data-dir", str(tmp_path)], env={}).opts)
    got = {p.id: p for p in en.default_pages(paths)}
    assert [p.title for p in got.values()] == ["Textual Inversion", "Hypernetworks", "Checkpoints", "Lora"]
    assert got[en.LORA].roots == (paths.lora_dir, paths.models_dir / "LyCORIS")
    assert got[en.TEXTUAL_INVERSION].roots == (paths.embeddings_dir,)
    assert got[en.HYPERNETWORKS].roots == (paths.models_dir / "hypernetworks",)


def test_hypernetwork_dir_flag_moves_the_hypernetworks_page_and_registry(tmp_path):
    from modules.core.flags import parse_args
    from modules.core.networks_service import ExtraNetworksService
    from modules.core.paths import AppPaths

    elsewhere = tmp_path / "my-hypernets"
    paths = AppPaths.from_opts(parse_args(["--data-dir", str(tmp_path), "--hypernetwork-dir", str(elsewhere)],
                                          env={}).opts)
    assert paths.hypernetwork_dir == elsewhere.resolve()
    assert {p.id: p for p in en.default_pages(paths)}[en.HYPERNETWORKS].roots == (elsewhere.resolve(),)
    assert ExtraNetworksService.from_paths(paths).hypernetwork_dirs == [elsewhere.resolve()]


def test_lora_cards_carry_the_weight_activation_and_negative_text(pages):
    root = pages[en.LORA].roots[0]
    _lora(root / "style" / "ink.safetensors")
    (root / "style" / "ink.json").write_text(json.dumps({"preferred weight": 0.6, "activation text": "ink style",
                                                        "negative text": "colour", "description": "Ink"}))
    _lora(root / "plain.safetensors")
    Image.new("RGB", (4, 4)).save(root / "plain.preview.png")
    cards = {c.name: c for c in en.list_cards(pages[en.LORA], default_multiplier=0.8)}
    assert cards["ink"].prompt == "<lora:ink:0.6> ink style" and cards["ink"].negative == "colour"
    assert cards["ink"].folder == "style" and cards["ink"].description == "Ink"
    assert cards["plain"].prompt == "<lora:plain:0.8>" and cards["plain"].preview == root / "plain.preview.png"


def test_embedding_and_hypernetwork_cards(pages):
    emb = pages[en.TEXTUAL_INVERSION].roots[0]
    write_emb_params_safetensors(emb / "shiny.safetensors", vectors(1, 64, 1))
    Image.new("RGB", (4, 4)).save(emb / "shiny.png")           # its preview: not a card
    write_data_layer_image(emb / "picture-emb.png", vectors(1, 64, 2), "painted")
    Image.new("RGB", (4, 4)).save(emb / "holiday.jpg")         # not an embedding kind at all
    torch.save({"sizes": [1]}, pages[en.HYPERNETWORKS].roots[0] / "hn.pt")
    ti = {c.name: c for c in en.list_cards(pages[en.TEXTUAL_INVERSION])}
    assert set(ti) == {"shiny", "painted"}
    assert ti["shiny"].prompt == "shiny" and ti["shiny"].preview == emb / "shiny.png"
    assert ti["painted"].preview == emb / "picture-emb.png"   # the embedding's own picture
    assert [c.prompt for c in en.list_cards(pages[en.HYPERNETWORKS])] == ["<hypernet:hn:1>"]


@pytest.mark.parametrize("before, after_add", [
    ("", "<lora:ink:0.6> ink style"),
    ("a cat", "a cat <lora:ink:0.6> ink style"),
])
def test_a_click_adds_and_a_second_click_removes(pages, before, after_add):
    root = pages[en.LORA].roots[0]
    _lora(root / "ink.safetensors")
    (root / "ink.json").write_text(json.dumps({"preferred weight": 0.6, "activation text": "ink style",
                                               "negative text": "colour"}))
    card = en.list_cards(pages[en.LORA])[0]
    added = en.toggle(card, before, "ugly")
    assert added.added and added.prompt == after_add and added.negative_prompt == "ugly colour"
    removed = en.toggle(card, added.prompt, added.negative_prompt)
    assert not removed.added and removed.prompt == before and removed.negative_prompt == "ugly"


def test_removal_finds_the_tag_at_any_weight_and_tidies_commas(pages):
    _lora(pages[en.LORA].roots[0] / "ink.safetensors")
    card = en.list_cards(pages[en.LORA])[0]
    assert en.toggle(card, "a cat, <lora:ink:0.35>, dog", "").prompt == "a cat, dog"
    assert en.toggle(card, "<lyco:ink:1:0.5> dog", "").prompt == "dog"
    # Another network whose name starts the same is left alone; the click then adds this one.
    assert en.toggle(card, "<lora:inky:1>", "").prompt == "<lora:inky:1> <lora:ink:1>"
    assert en.toggle(card, "x", "", separator=", ").prompt == "x, <lora:ink:1>"


def test_embedding_names_toggle_as_words(pages):
    write_emb_params_safetensors(pages[en.TEXTUAL_INVERSION].roots[0] / "shiny.safetensors", vectors(1, 64, 1))
    card = en.list_cards(pages[en.TEXTUAL_INVERSION])[0]
    assert en.toggle(card, "shinyhat", "").prompt == "shinyhat shiny"
    assert en.toggle(card, "a shiny hat", "").prompt == "a hat"


def test_search_sort_and_folders(pages):
    root = pages[en.LORA].roots[0]
    for rel in ("b/deep/zeta.safetensors", "a/alpha.safetensors", "mid.safetensors"):
        _lora(root / rel)
    os.utime(root / "mid.safetensors", (1, 1))
    cards = en.list_cards(pages[en.LORA])
    assert en.folders(cards) == ["a", "b", "b/deep"]
    assert [c.name for c in en.filter_cards(cards, folder="b")] == ["zeta"]
    assert [c.name for c in en.filter_cards(cards, search="ALPHA")] == ["alpha"]
    assert [c.name for c in en.filter_cards(cards, search="deep zeta")] == ["zeta"]
    assert [c.name for c in en.sort_cards(cards, "Name", descending=True)] == ["zeta", "mid", "alpha"]
    assert [c.name for c in en.sort_cards(cards, "Path")] == ["alpha", "zeta", "mid"]
    assert en.sort_cards(cards, "Date Modified")[0].name == "mid"
    assert en.tree_label("b/deep").endswith("📁 deep") and en.tree_label("b/deep").startswith("\u2003")


def test_user_metadata_is_saved_atomically_and_keeps_other_keys(pages):
    root = pages[en.LORA].roots[0]
    _lora(root / "ink.safetensors")
    (root / "ink.json").write_text(json.dumps({"modelId": 123, "notes": "old"}))
    card = en.list_cards(pages[en.LORA])[0]
    en.save_user_metadata(card, {"description": "Ink lines", "activation text": "ink", "preferred weight": "0.7",
                                 "negative text": "", "notes": "new", "sd version": "SD1"})
    saved = json.loads((root / "ink.json").read_text())
    assert saved == {"modelId": 123, "notes": "new", "description": "Ink lines", "activation text": "ink",
                     "preferred weight": 0.7, "negative text": "", "sd version": "SD1"}
    assert not [p for p in root.iterdir() if "atomic-tmp" in p.name]
    with pytest.raises(ValueError, match="preferred weight"):
        en.save_user_metadata(card, {"preferred weight": "heavy"})
    with pytest.raises(ValueError, match="sd version"):
        en.save_user_metadata(card, {"sd version": "SD9"})
    assert json.loads((root / "ink.json").read_text()) == saved   # a refused edit changes nothing


def test_training_metadata_and_tag_frequency(pages):
    root = pages[en.LORA].roots[0]
    freq = {"10_ink": {"ink": 12, "lines": 3}, "5_extra": {"ink": 2, "paper": 5}}
    _lora(root / "ink.safetensors", {"ss_network_dim": "4", "ss_tag_frequency": json.dumps(freq)})
    card = en.list_cards(pages[en.LORA])[0]
    meta = en.training_metadata(card)
    assert meta["ss_network_dim"] == "4"
    assert en.tag_frequency(meta) == [("ink", 14), ("paper", 5), ("lines", 3)]
    assert en.tag_frequency({"ss_tag_frequency": "not json"}) == []


def test_replace_preview_writes_name_preview_png(pages):
    root = pages[en.LORA].roots[0]
    _lora(root / "ink.safetensors")
    Image.new("RGB", (4, 4), (1, 2, 3)).save(root / "ink.png")
    card = en.list_cards(pages[en.LORA])[0]
    target = en.save_preview(card, Image.new("RGB", (8, 8), (200, 0, 0)))
    assert target == root / "ink.preview.png"
    assert Image.open(target).getpixel((0, 0)) == (200, 0, 0)
    assert en.list_cards(pages[en.LORA])[0].preview == target   # it wins over ink.png from now on
    en.save_preview(card, Image.new("RGB", (8, 8), (0, 200, 0)))  # asked again: replaced
    assert Image.open(target).getpixel((0, 0)) == (0, 200, 0)


def test_previews_resolve_only_inside_the_roots(pages, tmp_path):
    page = pages[en.LORA]
    root = page.roots[0]
    _lora(root / "ink.safetensors")
    Image.new("RGB", (4, 4)).save(root / "ink.preview.png")
    outside = tmp_path / "secret"
    outside.mkdir()
    _lora(outside / "x.safetensors")
    Image.new("RGB", (4, 4)).save(outside / "x.png")
    (root / "linked.safetensors").symlink_to(outside / "x.safetensors")
    Image.new("RGB", (4, 4)).save(root / "escape.safetensors.png")
    (root / "evil.png").symlink_to(outside / "x.png")

    assert en.resolve_preview(page, "ink.safetensors") == root / "ink.preview.png"
    for item in ("../secret/x.safetensors", "/etc/passwd", "linked.safetensors", "ink.preview.png", "",
                 "sub/../../secret/x.safetensors", "..\\secret\\x.safetensors"):
        assert en.resolve_preview(page, item) is None, item
    assert en.allowed_preview_file([page], str(root / "ink.preview.png")) == root / "ink.preview.png"
    for name in (str(outside / "x.png"), str(root / ".." / "secret" / "x.png"), str(root / "evil.png"),
                 str(root / "ink.safetensors"), "/etc/passwd"):
        assert en.allowed_preview_file([page], name) is None, name

"""Embeddings bundled inside LoRA files (kohya's ``bundle_emb.<name>.*``): usable by name while the LoRA is
active in a job, on the tiny SD1 and SDXL checkpoints, in the real on-disk layout."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from embedding_files import vectors, write_string_to_param_pt
from lora_fixtures import kohya_lora, save
from modules.core.pipeline import Txt2ImgParams
from modules.engine.networks.bundled import read_bundle, split_bundle

WORDS = "red dog"   # the bundled vectors are these words' token vectors: the prompt must encode exactly as them


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _word_vectors(tokenizer, text_encoder, words: str) -> torch.Tensor:
    ids = tokenizer(words, add_special_tokens=False)["input_ids"]
    return text_encoder.get_input_embeddings().weight[ids].detach().clone().float()


def _with_bundle(path, network: dict, bundle: dict) -> None:
    save(path, {**network, **{f"bundle_emb.{k}": v for k, v in bundle.items()}})


def _select(svc, stem: str):
    info = svc.models.registry.get_closest(stem)
    return svc.models.select(info.title), info.title


@pytest.fixture(scope="module")
def svc(tmp_path_factory):
    from conftest import make_services

    data_dir = tmp_path_factory.mktemp("bundled-emb")
    services = make_services(data_dir, {"tiny-sd1.safetensors": ("sd1", 0), "tiny-sdxl.safetensors": ("sdxl", 0)})
    lora_dir, emb_dir = services.paths.lora_dir, services.paths.embeddings_dir
    write_string_to_param_pt(emb_dir / "filestyle.pt", vectors(2, 64, 21) * 2)
    sd1, services.sd1_title = _select(services, "tiny-sd1")
    pipe = sd1.pipe
    words = _word_vectors(pipe.tokenizer, pipe.text_encoder, WORDS)
    network = kohya_lora(lora_dir / "noemb.safetensors", pipe, seed=1)
    _with_bundle(lora_dir / "withemb.safetensors", network, {"bundlestyle.string_to_param.*": words})
    _with_bundle(lora_dir / "clash.safetensors", {}, {"filestyle.string_to_param.*": words,   # embeddings/ wins
                                                      "widestyle.emb_params": vectors(1, 96, 3),   # SD1 is 64 wide
                                                      "nanstyle.emb_params": torch.full((1, 64), float("nan"))})
    _with_bundle(lora_dir / "dupe.safetensors", {}, {"bundlestyle.string_to_param.*": vectors(2, 64, 4)})
    xl, services.xl_title = _select(services, "tiny-sdxl")
    xpipe = xl.pipe
    xl_network = kohya_lora(lora_dir / "xlnoemb.safetensors", xpipe, sdxl=True, seed=2)
    _with_bundle(lora_dir / "xlemb.safetensors", xl_network,
                 {"xlbundle.clip_l": _word_vectors(xpipe.tokenizer, xpipe.text_encoder, WORDS),
                  "xlbundle.clip_g": _word_vectors(xpipe.tokenizer_2, xpipe.text_encoder_2, WORDS)})
    yield services
    services.generation.queue.shutdown()


def _run(svc, title: str, prompt: str, negative_prompt: str = "", **settings):
    params = Txt2ImgParams(width=64, height=64, steps=2, seed=5, prompt=prompt, negative_prompt=negative_prompt)
    return svc.generation.txt2img(params, override_settings={"sd_model_checkpoint": title, **settings})


def _pixels(processed) -> np.ndarray:
    return np.asarray(processed.images[0].convert("RGB"), dtype=np.int16)


def test_a_bundled_embedding_works_while_its_lora_is_active_and_only_then(svc):
    title = svc.sd1_title
    before = _run(svc, title, "a cat, bundlestyle")
    bundled = _run(svc, title, "<lora:withemb:1> a cat, bundlestyle")
    same_network_no_bundle = _run(svc, title, "<lora:noemb:1> a cat, bundlestyle")
    as_words = _run(svc, title, f"<lora:withemb:1> a cat, {WORDS}")
    negative = _run(svc, title, "<lora:withemb:1> a cat", negative_prompt="bundlestyle")
    negative_plain = _run(svc, title, "<lora:withemb:1> a cat", negative_prompt="")
    after = _run(svc, title, "a cat, bundlestyle")
    # the name is the embedding only with its LoRA: the same network without the bundle gives another image
    assert not np.array_equal(_pixels(bundled), _pixels(same_network_no_bundle))
    assert np.array_equal(_pixels(bundled), _pixels(as_words))   # it takes the positions of its 2 vectors
    assert not np.array_equal(_pixels(negative), _pixels(negative_plain))
    assert np.array_equal(_pixels(before), _pixels(after))       # afterwards the name is plain text again
    assert 'TI hashes: "bundlestyle: withemb"' in bundled.infotexts[0]
    assert "TI hashes" not in before.infotexts[0] and "TI hashes" not in after.infotexts[0]
    assert "of a kind this program does not know" not in bundled.comments   # bundle_emb.* are known now


def test_an_embeddings_folder_name_wins_and_unfit_or_bad_bundles_are_skipped_with_warnings(svc):
    title = svc.sd1_title
    plain = _run(svc, title, "a cat, filestyle, widestyle, nanstyle")
    clash = _run(svc, title, "<lora:clash:1> a cat, filestyle, widestyle, nanstyle")
    assert np.array_equal(_pixels(plain), _pixels(clash))   # the file's filestyle, the others are text
    assert "bundled embedding filestyle skipped: an embedding of that name is already loaded" in clash.comments
    assert "bundled embedding widestyle skipped: its width 96 does not fit this model" in clash.comments
    assert "bundled embedding nanstyle is not usable (emb_params holds NaN or infinite values)" in clash.comments
    assert "holds no network weights" not in clash.comments    # a file of bundled embeddings only is a LoRA too


def test_two_loras_bundling_one_name_the_first_wins(svc):
    title = svc.sd1_title
    first = _run(svc, title, "<lora:withemb:1> a cat, bundlestyle")
    both = _run(svc, title, "<lora:withemb:1> <lora:dupe:1> a cat, bundlestyle")
    assert np.array_equal(_pixels(first), _pixels(both))   # dupe adds no layers; its bundlestyle is not used
    assert "LoRA dupe: bundled embedding bundlestyle skipped: an earlier LoRA bundles one of that name" in both.comments


def test_sdxl_bundles_feed_each_encoder_its_own_vectors(svc):
    title = svc.xl_title
    before = _run(svc, title, "a cat, xlbundle")
    bundled = _run(svc, title, "<lora:xlemb:1> a cat, xlbundle")
    no_bundle = _run(svc, title, "<lora:xlnoemb:1> a cat, xlbundle")
    as_words = _run(svc, title, f"<lora:xlemb:1> a cat, {WORDS}")
    after = _run(svc, title, "a cat, xlbundle")
    assert not np.array_equal(_pixels(bundled), _pixels(no_bundle))
    assert np.array_equal(_pixels(bundled), _pixels(as_words))
    assert np.array_equal(_pixels(before), _pixels(after))
    assert 'TI hashes: "xlbundle: xlemb"' in bundled.infotexts[0]
    # an SD1 model skips the SDXL pair: it does not fit
    sd1 = _run(svc, svc.sd1_title, "<lora:xlemb:1> a cat, xlbundle")
    assert "bundled embedding xlbundle skipped: its width 192 does not fit this model" in sd1.comments


def test_the_lora_name_leaves_the_ti_hashes_when_the_setting_is_off(svc):
    result = _run(svc, svc.sd1_title, "<lora:withemb:1> a cat, bundlestyle", lora_bundled_ti_to_infotext=False)
    assert "TI hashes" not in result.infotexts[0] and "Lora hashes" in result.infotexts[0]


def test_split_bundle_reads_every_layout(tmp_path):
    t = torch.ones(2, 8)
    network, bundles = split_bundle({"lora_unet_x.lora_down.weight": t, "bundle_emb.a.string_to_param.*": t,
                                     "bundle_emb.b.clip_l": t, "bundle_emb.b.clip_g": torch.ones(2, 16),
                                     "bundle_emb.c.emb_params": t, "bundle_emb.d": t})
    assert list(network) == ["lora_unet_x.lora_down.weight"]
    bundle = read_bundle(bundles, tmp_path / "x.safetensors")
    assert {n: e.shape for n, e in bundle.embeddings.items()} == {"a": 8, "b": 24, "c": 8, "d": 8}
    assert not bundle.failed


def test_a_loras_embeddings_survive_its_parsed_file_being_dropped_while_merged(svc):
    """lora_in_memory_limit 0 drops parsed files not in the last merge; a model whose merged set is
    unchanged reads nothing, yet its LoRA's bundled embeddings are still wanted."""
    first = _run(svc, svc.sd1_title, "<lora:withemb:1> a cat, bundlestyle")
    svc.networks.engine._trim(0, set())   # what a job merging other LoRAs into another model does
    again = _run(svc, svc.sd1_title, "<lora:withemb:1> a cat, bundlestyle")
    assert np.array_equal(_pixels(first), _pixels(again))
    assert 'TI hashes: "bundlestyle: withemb"' in again.infotexts[0]

"""Textual-inversion embeddings: the real file formats, the prompt encoder using them, and whole generations."""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from embedding_files import (vectors, write_data_layer_image, write_diffusers_bin, write_emb_params_safetensors,
                             write_png_text_chunk, write_sdxl_safetensors, write_string_to_param_pt)
from modules.engine import conditioning as C
from modules.models import image_embedding
from modules.models.embeddings import EmbeddingDatabase, api_response
from modules.models.families import load_tokenizer

SD1 = (("clip_l", 64),)
SDXL = (("clip_l", 64), ("clip_g", 128))


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _text_model(cls, width, layers, seed, **kw):
    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=49408, hidden_size=width, num_attention_heads=width // 64,
                         num_hidden_layers=layers, intermediate_size=2 * width, max_position_embeddings=77, **kw)
    return cls(cfg).eval()


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("clip-l")


@pytest.fixture(scope="module")
def sd1_parts(tok):
    return tok, _text_model(CLIPTextModel, 64, 2, 1)


@pytest.fixture(scope="module")
def sdxl_parts(tok):
    return (tok, _text_model(CLIPTextModel, 64, 2, 1), load_tokenizer("openclip"),
            _text_model(CLIPTextModelWithProjection, 128, 3, 3, projection_dim=32))


@pytest.fixture()
def emb_dir(tmp_path):
    d = tmp_path / "embeddings"
    (d / "sub").mkdir(parents=True)
    return d


# --------------------------------------------------------------------------- formats


def test_every_format_loads_with_its_name_and_shape(emb_dir):
    write_string_to_param_pt(emb_dir / "a1111.pt", vectors(2, 64, 1), step=500)
    write_emb_params_safetensors(emb_dir / "sub" / "kohya.safetensors", vectors(3, 64, 2))
    write_diffusers_bin(emb_dir / "diffusers.bin", vectors(1, 64, 3))
    write_sdxl_safetensors(emb_dir / "xl.safetensors", vectors(2, 64, 4), vectors(2, 128, 5))
    write_png_text_chunk(emb_dir / "chunk.png", vectors(1, 64, 6), "in-chunk")
    write_data_layer_image(emb_dir / "layer.png", vectors(2, 64, 7), "in-pixels")
    write_data_layer_image(emb_dir / "sub" / "layer.webp", vectors(4, 64, 8), "in-webp")
    Image.new("RGB", (8, 8), (9, 9, 9)).save(emb_dir / "a1111.preview.png")   # a card preview, not an embedding
    Image.new("RGB", (8, 8), (9, 9, 9)).save(emb_dir / "holiday.png")         # a plain picture

    report = EmbeddingDatabase([emb_dir]).report(SD1)
    got = api_response(report)
    assert got["loaded"] == {
        "a1111": {"step": 500, "sd_checkpoint": "abcdef1234", "sd_checkpoint_name": "tiny-sd1", "shape": 64,
                  "vectors": 2},
        "kohya": {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": 64, "vectors": 3},
        "diffusers": {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": 64, "vectors": 1},
        "in-chunk": {"step": 100, "sd_checkpoint": "abcdef1234", "sd_checkpoint_name": "tiny-sd1", "shape": 64,
                     "vectors": 1},
        "in-pixels": {"step": 100, "sd_checkpoint": "abcdef1234", "sd_checkpoint_name": "tiny-sd1", "shape": 64,
                      "vectors": 2},
        "in-webp": {"step": 100, "sd_checkpoint": "abcdef1234", "sd_checkpoint_name": "tiny-sd1", "shape": 64,
                    "vectors": 4},
    }
    # The SDXL pair does not fit an SD1 model: skipped and listed as skipped.
    assert got["skipped"] == {"xl": {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None,
                                     "shape": 192, "vectors": 2}}
    assert report.failed == {}
    # The vectors are the file's, exactly (the image layers carry float32 through JSON).
    assert torch.equal(report.loaded["kohya"].vectors[""], vectors(3, 64, 2))
    assert torch.equal(report.loaded["in-pixels"].vectors[""], vectors(2, 64, 7))


def test_on_an_sdxl_model_the_pair_loads_and_sd1_files_are_skipped(emb_dir):
    write_sdxl_safetensors(emb_dir / "xl.safetensors", vectors(2, 64, 4), vectors(2, 128, 5))
    write_emb_params_safetensors(emb_dir / "sd1.safetensors", vectors(1, 64, 2))
    report = EmbeddingDatabase([emb_dir]).report(SDXL)
    assert list(report.loaded) == ["xl"] and list(report.skipped) == ["sd1"]
    assert report.loaded["xl"].shape == 192


def test_a_hostile_pickle_is_refused_and_runs_nothing(emb_dir, tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    (emb_dir / "evil.pt").write_bytes(pickle.dumps({"string_to_param": {"*": Evil()}}, protocol=2))
    write_emb_params_safetensors(emb_dir / "good.safetensors", vectors(1, 64, 2))
    report = EmbeddingDatabase([emb_dir]).report(SD1)
    assert not marker.exists()
    assert list(report.loaded) == ["good"] and "evil.pt" in report.failed


def test_bad_embedding_data_in_images_is_refused_safely(emb_dir):
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text(image_embedding.TEXT_CHUNK, "not base64 json at all")
    Image.new("RGB", (16, 16)).save(emb_dir / "broken.png", pnginfo=info)
    info = PngImagePlugin.PngInfo()   # a tensor that is not numbers
    import base64
    info.add_text(image_embedding.TEXT_CHUNK, base64.b64encode(
        b'{"string_to_param": {"*": {"TORCHTENSOR": [["x"]]}}, "name": "bad"}').decode())
    Image.new("RGB", (16, 16)).save(emb_dir / "badtensor.png", pnginfo=info)
    report = EmbeddingDatabase([emb_dir]).report(SD1)
    assert report.loaded == {} and set(report.failed) == {"broken.png", "badtensor.png"}


def test_files_are_rescanned_when_they_change_and_on_refresh(emb_dir):
    db = EmbeddingDatabase([emb_dir])
    assert db.report(SD1).loaded == {}
    first = db.for_layout(SD1)
    write_emb_params_safetensors(emb_dir / "late.safetensors", vectors(1, 64, 2))
    second = db.for_layout(SD1)   # a new file is seen at the next use, and the set's key changes
    assert list(second.embeddings) == ["late"] and second.key != first.key
    assert db.refresh().loaded.keys() == {"late"}
    assert db.for_layout(SD1).key != second.key


# --------------------------------------------------------------------------- the prompt encoder


def _encoder(parts, family, embeddings=None):
    enc = C.PromptEncoder.from_components(*parts, family=family)
    enc.embeddings = embeddings
    return enc


def _token_vectors(text_model, tok, words: str) -> torch.Tensor:
    ids = tok(words, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        return text_model.get_input_embeddings()(torch.tensor(ids)).clone()


def test_an_embedding_made_of_word_vectors_encodes_exactly_like_those_words(sd1_parts, emb_dir):
    tok, te = sd1_parts
    words = "red fox jumping"
    write_emb_params_safetensors(emb_dir / "foxy.safetensors", _token_vectors(te, tok, words))
    enc = _encoder(sd1_parts, "sd1", EmbeddingDatabase([emb_dir]).for_layout(SD1))
    assert enc.embedding_layout == SD1
    with_emb = enc.encode_text("a photo of foxy, forest").embeds
    plain = _encoder(sd1_parts, "sd1").encode_text(f"a photo of {words}, forest").embeds
    assert torch.allclose(with_emb, plain, atol=1e-5)
    assert not torch.allclose(with_emb, _encoder(sd1_parts, "sd1").encode_text("a photo of foxy, forest").embeds)
    assert list(enc.used_embeddings(["a photo of foxy", "nothing"], 20)) == ["foxy"]


def test_a_multi_vector_embedding_takes_that_many_positions_and_never_straddles_chunks(sd1_parts, emb_dir):
    write_emb_params_safetensors(emb_dir / "wide.safetensors", vectors(5, 64, 9))
    enc = _encoder(sd1_parts, "sd1", EmbeddingDatabase([emb_dir]).for_layout(SD1))
    short = enc.tokenize("cat wide dog").chunks
    assert len(short) == 1 and len(short[0].tokens) == 1 + 5 + 1
    assert [(at, e.name) for at, e in short[0].fixes] == [(1, "wide")]
    # 72 tokens then the 5-vector embedding: it does not fit in the first chunk, so it opens the next.
    crowded = enc.tokenize(" ".join(["cat"] * 72) + " wide").chunks
    assert len(crowded) == 2 and len(crowded[0].tokens) == 72 and crowded[0].fixes == []
    assert [(at, e.name) for at, e in crowded[1].fixes] == [(0, "wide")]
    # BREAK still closes the chunk; the embedding starts the new one.
    broken = enc.tokenize("cat BREAK wide").chunks
    assert len(broken) == 2 and [(at, e.name) for at, e in broken[1].fixes] == [(0, "wide")]
    assert enc.count_tokens("cat wide").count == 6
    # And the encoding of the crowded prompt is two chunks long.
    assert enc.encode_text(" ".join(["cat"] * 72) + " wide").embeds.shape[1] == 2 * 77


def test_embedding_changes_invalidate_the_conditioning_cache(sd1_parts, emb_dir):
    db = EmbeddingDatabase([emb_dir])
    write_emb_params_safetensors(emb_dir / "thing.safetensors", vectors(1, 64, 1))
    enc = _encoder(sd1_parts, "sd1", db.for_layout(SD1))
    before = enc.encode_text("a thing").embeds
    write_emb_params_safetensors(emb_dir / "thing.safetensors", vectors(1, 64, 2) * 3)
    enc.embeddings = db.for_layout(SD1)   # what the generation service does before each job
    after = enc.encode_text("a thing").embeds
    assert not torch.allclose(before, after)


def test_sdxl_pairs_feed_each_encoder_its_own_vectors(sdxl_parts, emb_dir):
    tok_l, te_l, tok_g, te_g = sdxl_parts
    words = "blue bird"
    write_sdxl_safetensors(emb_dir / "birdy.safetensors", _token_vectors(te_l, tok_l, words),
                           _token_vectors(te_g, tok_g, words))
    enc = _encoder(sdxl_parts, "sdxl", EmbeddingDatabase([emb_dir]).for_layout(SDXL))
    got = enc.encode_text("birdy on a branch")
    want = _encoder(sdxl_parts, "sdxl").encode_text(f"{words} on a branch")
    assert torch.allclose(got.embeds, want.embeds, atol=1e-5)
    assert torch.allclose(got.pooled, want.pooled, atol=1e-5)


# --------------------------------------------------------------------------- whole generations


@pytest.fixture(scope="module")
def svc(tmp_path_factory):
    from conftest import make_services

    data_dir = tmp_path_factory.mktemp("ti-gen")
    emb = data_dir / "embeddings"
    emb.mkdir()
    write_string_to_param_pt(emb / "sd1style.pt", vectors(3, 64, 11) * 2)
    write_sdxl_safetensors(emb / "xlstyle.safetensors", vectors(2, 64, 12), vectors(2, 128, 13))
    write_emb_params_safetensors(emb / "toowide.safetensors", vectors(1, 96, 14))
    services = make_services(data_dir, {"tiny-sd1.safetensors": ("sd1", 0), "tiny-sdxl.safetensors": ("sdxl", 0)})
    yield services
    services.generation.queue.shutdown()


def _run(svc, stem: str, **kw):
    from modules.core.pipeline import Txt2ImgParams

    info = svc.models.registry.get_closest(stem)
    svc.models.registry.calculate_shorthash(info)
    params = Txt2ImgParams(**{"width": 64, "height": 64, "steps": 2, "seed": 5, "prompt": "a cat", **kw})
    return svc.generation.txt2img(params, override_settings={"sd_model_checkpoint": info.title})


def _pixels(processed) -> np.ndarray:
    return np.asarray(processed.images[0].convert("RGB"), dtype=np.int16)


def test_an_embedding_in_the_prompt_changes_the_image_and_its_hash_is_in_the_infotext(svc):
    from modules.core.infotext import parse_infotext
    from modules.models.hashes import file_sha256

    plain = _run(svc, "tiny-sd1")
    styled = _run(svc, "tiny-sd1", prompt="a cat, sd1style")
    assert np.abs(_pixels(plain) - _pixels(styled)).max() > 0
    assert "TI hashes" not in plain.infotexts[0]
    want = file_sha256(svc.paths.embeddings_dir / "sd1style.pt")[:12]
    assert f'TI hashes: "sd1style: {want}"' in styled.infotexts[0]
    assert parse_infotext(styled.infotexts[0])["TI hashes"] == f"sd1style: {want}"
    # The same job again is the same image (the encoder cache keys on the embedding set).
    assert np.array_equal(_pixels(_run(svc, "tiny-sd1", prompt="a cat, sd1style")), _pixels(styled))


def test_an_embedding_in_the_negative_prompt_works(svc):
    plain = _run(svc, "tiny-sd1", negative_prompt="ugly")
    negative = _run(svc, "tiny-sd1", negative_prompt="ugly, sd1style")
    assert np.abs(_pixels(plain) - _pixels(negative)).max() > 0
    assert "TI hashes: \"sd1style: " in negative.infotexts[0]


def test_the_report_follows_the_loaded_model(svc):
    _run(svc, "tiny-sd1")
    report = svc.generation.embeddings_report()
    assert set(report.loaded) == {"sd1style"} and set(report.skipped) == {"xlstyle", "toowide"}
    xl = _run(svc, "tiny-sdxl", prompt="a cat, xlstyle")
    assert "TI hashes: \"xlstyle: " in xl.infotexts[0]
    report = svc.generation.embeddings_report()
    assert set(report.loaded) == {"xlstyle"} and set(report.skipped) == {"sd1style", "toowide"}
    # A wrong-width embedding's name is just text: the image is made.
    assert _run(svc, "tiny-sd1", prompt="a cat, toowide").images


# --------------------------------------------------------------------------- the API


@pytest.fixture(scope="module")
def api_server(tmp_path_factory):
    from conftest import start_server
    from tiny_models import make_checkpoint

    data_dir = tmp_path_factory.mktemp("ti-api")
    make_checkpoint(data_dir / "models" / "Stable-diffusion" / "tiny-sd1.safetensors", "sd1")
    emb = data_dir / "embeddings"
    (emb / "styles").mkdir(parents=True)
    write_string_to_param_pt(emb / "styles" / "painterly.pt", vectors(2, 64, 1), step=1234)
    write_sdxl_safetensors(emb / "xl-only.safetensors", vectors(1, 64, 2), vectors(1, 128, 3))
    write_png_text_chunk(emb / "card.png", vectors(1, 64, 4), "from-png")
    srv = start_server(data_dir, "--api")
    yield srv
    srv.stop()


def test_api_lists_loaded_and_skipped_embeddings_in_a1111_shape_and_refreshes(api_server):
    import requests

    url = api_server.url + "/sdapi/v1"
    r = requests.post(url + "/txt2img", json={"prompt": "a cat painterly", "negative_prompt": "from-png",
                                              "width": 64, "height": 64, "steps": 2, "seed": 3}, timeout=300)
    assert r.status_code == 200, r.text
    import json
    info = json.loads(r.json()["info"])
    assert "TI hashes: \"painterly: " in info["infotexts"][0] and "from-png: " in info["infotexts"][0]

    got = requests.get(url + "/embeddings", timeout=60).json()
    assert got == {
        "loaded": {
            "painterly": {"step": 1234, "sd_checkpoint": "abcdef1234", "sd_checkpoint_name": "tiny-sd1",
                          "shape": 64, "vectors": 2},
            "from-png": {"step": 100, "sd_checkpoint": "abcdef1234", "sd_checkpoint_name": "tiny-sd1",
                         "shape": 64, "vectors": 1},
        },
        "skipped": {"xl-only": {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": 192,
                                "vectors": 1}},
    }
    write_emb_params_safetensors(api_server.data_dir / "embeddings" / "added.safetensors", vectors(3, 64, 5))
    assert requests.post(url + "/refresh-embeddings", timeout=60).status_code == 200
    got = requests.get(url + "/embeddings", timeout=60).json()
    assert got["loaded"]["added"]["vectors"] == 3 and "xl-only" in got["skipped"]


def test_the_token_counter_counts_an_embedding_as_its_vectors(svc):
    _run(svc, "tiny-sd1", prompt="a cat, sd1style")   # the loaded model's encoder now holds the set
    assert svc.generation.count_tokens("cat sd1style") == (4, 75)   # 1 word + 3 vectors


@pytest.mark.parametrize("writer, filename", [
    (write_string_to_param_pt, "a1111.pt"),
    (write_emb_params_safetensors, "kohya.safetensors"),
    (write_diffusers_bin, "learned_embeds.bin"),
])
def test_diffusers_reads_the_same_vectors_from_the_fixtures(tmp_path, writer, filename):
    """The fixtures are real: diffusers' own textual-inversion loader finds the vectors we load."""
    from diffusers.loaders import TextualInversionLoaderMixin

    count = 1 if writer is write_diffusers_bin else 2
    vec = vectors(count, 64, 21)
    path = writer(tmp_path / filename, vec)
    ours = EmbeddingDatabase([tmp_path]).report(SD1).loaded[path.stem].vectors[""]
    tok, te = load_tokenizer("clip-l"), _text_model(CLIPTextModel, 64, 2, 1)
    class Holder(TextualInversionLoaderMixin):   # the least of a pipeline the loader needs
        hf_device_map = None
        components: dict = {}

    Holder().load_textual_inversion(str(path), token="<x>", tokenizer=tok, text_encoder=te)
    theirs = te.get_input_embeddings().weight[-count:].detach()
    assert torch.equal(ours, theirs) and torch.equal(ours, vec)


def test_the_data_layer_prng_is_a1111s_stream():
    """The first values of A1111's LCG (seed 0, a=1664525, c=1013904223, mod 2**32, then mod 255), low nibbles;
    the long stream is computed in blocks and must match the plain recurrence."""
    first = [253, 242, 127, 44, 157, 27, 239, 133, 38, 79, 167, 4, 177, 95, 130, 79]
    assert image_embedding._lcg_nibbles(16).tolist() == [v & 0x0F for v in first]
    state, plain = 0, []
    for _ in range(9000):
        state = (1664525 * state + 1013904223) % 2 ** 32
        plain.append((state % 255) & 0x0F)
    assert image_embedding._lcg_nibbles(9000).tolist() == plain


def test_a_zlib_bomb_in_the_data_layer_is_not_inflated(emb_dir):
    """100 MB of zeros compress to ~100 kB; the reader stops at its bound and the file is no embedding."""
    import zlib

    bomb = zlib.compress(b"{" + b" " * (100 * 1024 * 1024) + b"}", 9)
    image = image_embedding.embed_bytes_in_pixels(Image.new("RGB", (64, 64), (200, 120, 40)), bomb)
    image.save(emb_dir / "bomb.png")
    report = EmbeddingDatabase([emb_dir]).report(SD1)
    assert report.loaded == {} and report.skipped == {}
    with pytest.raises(image_embedding.ImageEmbeddingError, match="larger than"):
        image_embedding._inflate(bomb)


def test_unchanged_files_are_reused_until_a_model_load_invalidates_them(emb_dir, monkeypatch):
    write_emb_params_safetensors(emb_dir / "one.safetensors", vectors(1, 64, 1))
    db = EmbeddingDatabase([emb_dir])
    reads = []
    real = EmbeddingDatabase._parse
    monkeypatch.setattr(EmbeddingDatabase, "_parse", lambda self, nf: reads.append(nf.name) or real(self, nf))
    db.for_layout(SD1)
    db.for_layout(SD1)
    db.for_layout(SDXL)     # another model: classified again, files not reread
    assert reads == ["one"]
    db.invalidate()         # what the services do when a model is loaded
    db.for_layout(SDXL)
    assert reads == ["one", "one"]


def test_loading_a_model_invalidates_the_embeddings(svc, monkeypatch):
    calls = []
    monkeypatch.setattr(svc.generation.embeddings, "invalidate", lambda: calls.append(1))
    _run(svc, "tiny-sdxl")
    _run(svc, "tiny-sd1")
    assert len(calls) >= 1

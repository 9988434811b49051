"""A1111's embedding-db calls that extensions make beyond listing files, imported as extensions import them:
``model_hijack.embedding_db.register_embedding`` / ``register_embedding_by_name`` (in-memory embeddings no
file holds, used in prompts), ``ids_lookup``, ``expected_shape`` and ``Embedding.checksum()``."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from embedding_files import vectors, write_string_to_param_pt
from modules.core.pipeline import Txt2ImgParams
from test_processing import make_services

SMALL = dict(width=64, height=64, steps=2, cfg_scale=7.0, seed=5)
WORDS = "red dog"


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    from modules import shared

    services = make_services(tmp_path_factory.mktemp("emb-register"), "sd1")
    write_string_to_param_pt(services.paths.embeddings_dir / "fluffy.pt", vectors(2, 64, 1), step=300)
    shared.bind(services)
    yield services
    shared.bind(None)
    services.generation.queue.shutdown()


def run(services, prompt: str):
    return services.generation.txt2img(Txt2ImgParams(prompt=prompt, **SMALL))


def pixels(result) -> np.ndarray:
    return np.asarray(result.images[0].convert("RGB"), dtype=np.int16)


def word_vectors(services, words: str) -> torch.Tensor:
    pipe = services.models.current().pipe
    ids = pipe.tokenizer(words, add_special_tokens=False)["input_ids"]
    return pipe.text_encoder.get_input_embeddings().weight[ids].detach().clone()


def test_a_registered_in_memory_embedding_is_used_in_prompts_until_unregistered(app):
    from modules import sd_hijack
    from modules.textual_inversion import textual_inversion

    db = sd_hijack.model_hijack.embedding_db
    before = run(app, "a cat, memstyle")
    as_words = run(app, f"a cat, {WORDS}")
    made = textual_inversion.Embedding(word_vectors(app, WORDS), "memstyle", step=3)
    assert db.register_embedding(made, None) is made
    used = run(app, "a cat, memstyle")
    assert np.array_equal(pixels(used), pixels(as_words))      # its 2 vectors stand where the name was
    assert not np.array_equal(pixels(used), pixels(before))
    assert db.word_embeddings["memstyle"] is made               # the extension's own object, as in A1111
    assert db.expected_shape == 64
    assert db.register_embedding_by_name(None, None, "memstyle") is None
    assert "memstyle" not in db.word_embeddings
    assert np.array_equal(pixels(run(app, "a cat, memstyle")), pixels(before))


def test_registering_replaces_a_file_embedding_by_name_and_unfit_ones_are_skipped(app):
    from modules.sd_hijack import model_hijack
    from modules.textual_inversion.textual_inversion import Embedding

    db = model_hijack.embedding_db
    from_file = run(app, "a cat, fluffy")
    db.register_embedding_by_name(Embedding(word_vectors(app, WORDS), "anything"), None, "fluffy")
    try:
        assert np.array_equal(pixels(run(app, "a cat, fluffy")), pixels(run(app, f"a cat, {WORDS}")))
    finally:
        db.register_embedding_by_name(None, None, "fluffy")
    assert np.array_equal(pixels(run(app, "a cat, fluffy")), pixels(from_file))   # the file's again
    wide = Embedding(vectors(1, 96, 2), "widemem")
    db.register_embedding(wide, None)
    try:
        assert "widemem" in db.skipped_embeddings and "widemem" not in db.word_embeddings
        assert run(app, "a cat, widemem").images   # its name is text; the job runs
    finally:
        db.register_embedding_by_name(None, None, "widemem")
    with pytest.raises(ValueError, match="NaN"):
        db.register_embedding(Embedding(torch.full((1, 64), float("nan")), "bad"), None)


def test_ids_lookup_maps_first_token_ids_to_names_and_embeddings(app):
    from modules.sd_hijack import model_hijack
    from modules.textual_inversion.textual_inversion import Embedding

    db = model_hijack.embedding_db
    run(app, "a cat")
    made = Embedding(vectors(1, 64, 3), "fluffy cloud")   # two words: its ids are two tokens
    db.register_embedding(made, None)
    try:
        tokenizer = app.models.current().pipe.tokenizer
        table = db.ids_lookup
        for name, emb in (("fluffy", db.word_embeddings["fluffy"]), ("fluffy cloud", made)):
            ids = tokenizer(name, add_special_tokens=False)["input_ids"]
            assert (ids, emb) in table[ids[0]]
        # both names start with "fluffy": the longer one is tried first, as A1111 orders them
        first = tokenizer("fluffy", add_special_tokens=False)["input_ids"][0]
        assert [len(ids) for ids, _ in table[first]] == [2, 1]
    finally:
        db.register_embedding_by_name(None, None, "fluffy cloud")


def test_checksum_is_a1111s_four_hex_digits():
    from modules.textual_inversion.textual_inversion import Embedding

    # values x100 -> 100, -250, 25, 300, 50, -1 (-0.01 x100 rounds to -1.0 in float32); A1111's formula gives 6462
    emb = Embedding(torch.tensor([[1.0, -2.5, 0.25], [3.0, 0.5, -0.01]]), "x")
    assert emb.checksum() == "6462"
    emb.vec = torch.zeros(1, 3)
    assert emb.checksum() == "6462"   # cached, as A1111's
    assert Embedding(torch.zeros(2, 8), "z").checksum() == "0000"
    pair = Embedding({"clip_g": torch.tensor([[0.5]]), "clip_l": torch.tensor([[1.0, -2.5, 0.25, 3.0]])}, "xl")
    # clip_l's values then clip_g's: 100, -250, 25, 300, 50
    assert pair.checksum() == Embedding(torch.tensor([[1.0, -2.5, 0.25, 3.0, 0.5]]), "flat").checksum()

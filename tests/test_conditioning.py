"""A1111-style text conditioning on tiny, seeded CLIP text encoders (CPU, no downloads)."""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection  # noqa: E402

from modules.engine import conditioning as C  # noqa: E402
from modules.models.families import load_tokenizer  # noqa: E402

BOS, EOS = 49406, 49407
PROJ = 32


def _config(width: int, layers: int, **kw) -> CLIPTextConfig:
    return CLIPTextConfig(vocab_size=49408, hidden_size=width, num_attention_heads=width // 64,
                          num_hidden_layers=layers, intermediate_size=2 * width,
                          max_position_embeddings=77, **kw)


def _seeded(cls, cfg, seed):
    torch.manual_seed(seed)
    return cls(cfg).eval()


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tok_l():
    return load_tokenizer("clip-l")


@pytest.fixture(scope="module")
def tok_oc():
    return load_tokenizer("openclip")


@pytest.fixture(scope="module")
def te_l():
    return _seeded(CLIPTextModel, _config(64, 3), 1)


@pytest.fixture(scope="module")
def te_h():
    return _seeded(CLIPTextModel, _config(64, 3), 2)


@pytest.fixture(scope="module")
def te_g():
    return _seeded(CLIPTextModelWithProjection, _config(128, 10, projection_dim=PROJ), 3)


@pytest.fixture()
def sd1(tok_l, te_l):
    return C.PromptEncoder.from_components(tok_l, te_l, family="sd1")


@pytest.fixture()
def sd2(tok_oc, te_h):
    return C.PromptEncoder.from_components(tok_oc, te_h, family="sd2-v")


@pytest.fixture()
def sdxl(tok_l, te_l, tok_oc, te_g):
    return C.PromptEncoder.from_components(tok_l, te_l, tok_oc, te_g, family="sdxl")


def _ids(tok, text, pad):
    """Reference ids built independently: BOS + tokens + EOS, then `pad` up to 77."""
    toks = tok(text, add_special_tokens=False)["input_ids"]
    ids = [BOS, *toks, EOS]
    return torch.tensor([ids + [pad] * (77 - len(ids))])


def _pos(tok, text, word):
    return 1 + tok(text, add_special_tokens=False)["input_ids"].index(tok.convert_tokens_to_ids(word + "</w>"))


# --------------------------------------------------------------------------- weights


def test_unweighted_equals_raw_encoder(sd1, tok_l, te_l):
    out = sd1.encode_text("a photo of a cat")
    with torch.no_grad():
        raw = te_l(input_ids=_ids(tok_l, "a photo of a cat", EOS)).last_hidden_state
    assert out.embeds.shape == (1, 77, 64)
    assert out.pooled is None
    assert torch.equal(out.embeds, raw)


def test_weight_scales_only_that_token_then_renormalises(sd1, tok_l):
    plain = sd1.encode_text("a cat photo").embeds[0]
    weighted = sd1.encode_text("a (cat:1.5) photo").embeds[0]
    cat = _pos(tok_l, "a cat photo", "cat")
    mult = torch.ones(77, 1)
    mult[cat] = 1.5
    scale = plain.mean() / (plain * mult).mean()  # A1111 "Original": restore the mean
    assert not torch.isclose(scale, torch.tensor(1.0))
    torch.testing.assert_close(weighted, plain * mult * scale, rtol=1e-5, atol=1e-6)
    # every other row only changes by that one scalar
    others = [i for i in range(77) if i != cat]
    ratio = weighted[others] / plain[others]
    torch.testing.assert_close(ratio, torch.full_like(ratio, float(scale)), rtol=1e-4, atol=1e-5)


def test_no_norm_and_ignore_emphasis(tok_l, te_l):
    no_norm = C.PromptEncoder.from_components(tok_l, te_l, family="sd1",
                                              options=C.ConditioningOptions(emphasis="No norm"))
    plain = no_norm.encode_text("a cat photo").embeds[0]
    weighted = no_norm.encode_text("a (cat:1.5) photo").embeds[0]
    cat = _pos(tok_l, "a cat photo", "cat")
    torch.testing.assert_close(weighted[cat], plain[cat] * 1.5)
    assert torch.equal(weighted[:cat], plain[:cat])
    ignore = C.PromptEncoder.from_components(tok_l, te_l, family="sd1",
                                             options=C.ConditioningOptions(emphasis="Ignore"))
    assert torch.equal(ignore.encode_text("a (cat:1.5) photo").embeds, ignore.encode_text("a cat photo").embeds)


def test_bracket_shorthands(sd1):
    assert torch.equal(sd1.encode_text("a (cat) photo").embeds, sd1.encode_text("a (cat:1.1) photo").embeds)
    assert torch.equal(sd1.encode_text("a [cat] photo").embeds,
                       sd1.encode_text(f"a (cat:{1 / 1.1!r}) photo").embeds)
    assert not torch.equal(sd1.encode_text("a (cat) photo").embeds, sd1.encode_text("a cat photo").embeds)


def test_extra_network_tags_never_reach_the_tokenizer(sd1):
    assert torch.equal(sd1.encode_text("a cat <lora:foo:0.8>").embeds, sd1.encode_text("a cat").embeds)
    assert sd1.count_tokens("<lora:foo:0.8> a cat <hypernet:x:1>") == (2, 75)


# --------------------------------------------------------------------------- chunking


def test_long_prompt_becomes_two_chunks(sd1, tok_l, te_l):
    prompt = "cat " * 100
    t = sd1.tokenize(prompt)
    assert [len(c.tokens) for c in t.chunks] == [75, 25]
    out = sd1.encode_text(prompt)
    assert out.embeds.shape == (1, 154, 64)
    with torch.no_grad():
        second = te_l(input_ids=_ids(tok_l, "cat " * 25, EOS)).last_hidden_state
    torch.testing.assert_close(out.embeds[:, 77:], second, rtol=1e-5, atol=1e-6)


def test_exactly_75_tokens_is_one_chunk(sd1):
    assert sd1.encode_text("cat " * 75).embeds.shape == (1, 77, 64)
    assert sd1.encode_text("cat " * 76).embeds.shape == (1, 154, 64)


def test_break_starts_a_new_chunk_padded_with_pad_tokens(sd1, sd2, tok_l):
    t = sd1.tokenize("a cat BREAK a dog")
    assert [len(c.tokens) for c in t.chunks] == [2, 2]
    a, cat = tok_l("a cat", add_special_tokens=False)["input_ids"]
    assert t.chunks[0].ids(BOS, EOS, EOS) == [BOS, a, cat] + [EOS] * 74
    oc = sd2.encoders[0]
    assert sd2.tokenize("a cat BREAK a dog").chunks[0].ids(oc.bos_id, oc.eos_id, oc.pad_id) == \
        [BOS, a, cat, EOS] + [0] * 73
    out = sd1.encode_text("a cat BREAK a dog").embeds
    assert out.shape == (1, 154, 64)
    torch.testing.assert_close(out[:, :77], sd1.encode_text("a cat").embeds, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out[:, 77:], sd1.encode_text("a dog").embeds, rtol=1e-5, atol=1e-6)
    # a leading BREAK leaves an empty first chunk, as in A1111
    assert [len(c.tokens) for c in sd1.tokenize("BREAK a dog").chunks] == [0, 2]
    # BREAK inside brackets is not a break (A1111 bug-compatible)
    assert len(sd1.tokenize("(a BREAK b)").chunks) == 1


def test_comma_padding_backtrack(tok_l, te_l, sd1):
    near = "cat " * 60 + ", " + "dog " * 20  # comma is token 61; chunk fills 14 tokens later
    t = sd1.tokenize(near)
    assert [len(c.tokens) for c in t.chunks] == [61, 20]
    assert t.chunks[0].tokens[-1] == tok_l.convert_tokens_to_ids(",</w>")
    assert t.token_count == 95
    far = "cat " * 50 + ", " + "dog " * 30  # comma 25 tokens before the edge: no backtrack
    assert [len(c.tokens) for c in sd1.tokenize(far).chunks] == [75, 6]
    off = C.PromptEncoder.from_components(tok_l, te_l, family="sd1",
                                          options=C.ConditioningOptions(comma_padding_backtrack=0))
    assert [len(c.tokens) for c in off.tokenize(near).chunks] == [75, 6]
    # the carried tokens keep their weights
    weighted = sd1.tokenize("cat " * 60 + ", " + "(dog:1.3) " * 20)
    assert weighted.chunks[1].multipliers == [1.3] * 20


def test_empty_prompt(sd1, sd2, sdxl):
    assert sd1.encode_text("").embeds.shape == (1, 77, 64)
    assert sd1.tokenize("").chunks[0].tokens == []
    assert sd2.encode_text("").embeds.shape == (1, 77, 64)
    out = sdxl.encode_text("")
    assert out.embeds.shape == (1, 77, 192) and out.pooled.shape == (1, PROJ)


# --------------------------------------------------------------------------- clip skip / families


def test_clip_skip_sd1(sd1, tok_l, te_l):
    one = sd1.encode_text("a photo of a cat", clip_skip=1).embeds
    two = sd1.encode_text("a photo of a cat", clip_skip=2).embeds
    assert not torch.allclose(one, two)
    with torch.no_grad():
        hs = te_l(input_ids=_ids(tok_l, "a photo of a cat", EOS), output_hidden_states=True).hidden_states
        manual = te_l.final_layer_norm(hs[-2])
    torch.testing.assert_close(two, manual, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError):
        sd1.encode_text("a", clip_skip=99)


def test_sd2_penultimate_with_zero_padding_and_no_clip_skip(sd2, tok_oc, te_h):
    out = sd2.encode_text("a photo of a cat").embeds
    with torch.no_grad():
        raw = te_h(input_ids=_ids(tok_oc, "a photo of a cat", 0)).last_hidden_state
    assert torch.equal(out, raw)
    # A1111 never applies clip skip to OpenCLIP-H
    assert torch.equal(sd2.encode_text("a photo of a cat", clip_skip=2).embeds, out)


def test_sdxl_concat_and_pooled(sdxl, tok_l, tok_oc, te_l, te_g):
    out = sdxl.encode_text("a photo of a cat")
    assert sdxl.width == 64 + 128
    assert out.embeds.shape == (1, 77, 192)
    assert out.pooled.shape == (1, PROJ)
    with torch.no_grad():
        h1 = te_l(input_ids=_ids(tok_l, "a photo of a cat", EOS), output_hidden_states=True).hidden_states[-2]
        o2 = te_g(input_ids=_ids(tok_oc, "a photo of a cat", 0), output_hidden_states=True)
    torch.testing.assert_close(out.embeds[..., :64], h1, rtol=1e-5, atol=1e-6)  # no final layer norm
    torch.testing.assert_close(out.embeds[..., 64:], o2.hidden_states[-2], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.pooled, o2.text_embeds, rtol=1e-5, atol=1e-6)
    # clip skip is ignored for SDXL unless sdxl_clip_l_skip is on, and then only touches CLIP-L
    assert torch.equal(sdxl.encode_text("a photo of a cat", clip_skip=3).embeds, out.embeds)
    sdxl.options = C.ConditioningOptions(sdxl_clip_l_skip=True)
    skipped = sdxl.encode_text("a photo of a cat", clip_skip=3)
    assert not torch.allclose(skipped.embeds[..., :64], out.embeds[..., :64])
    assert torch.equal(skipped.embeds[..., 64:], out.embeds[..., 64:])
    # long prompt: pooled comes from the first chunk
    long = "cat " * 80
    lo = sdxl.encode_text(long)
    assert lo.embeds.shape == (1, 154, 192)
    with torch.no_grad():
        first = te_g(input_ids=_ids(tok_oc, "cat " * 75, 0)).text_embeds
    torch.testing.assert_close(lo.pooled, first, rtol=1e-5, atol=1e-6)


def test_sdxl_empty_negative_is_zero(sdxl):
    neg = sdxl.encode_schedules([""], 10, is_negative=True)[0][0].cond
    assert torch.count_nonzero(neg.embeds) == 0 and torch.count_nonzero(neg.pooled) == 0
    pos = sdxl.encode_schedules([""], 10)[0][0].cond
    assert torch.count_nonzero(pos.embeds) > 0
    assert torch.count_nonzero(sdxl.encode_schedules(["blurry"], 10, is_negative=True)[0][0].cond.embeds) > 0


def test_refiner_uses_te2_only(tok_oc, te_g, sdxl):
    ref = C.PromptEncoder.from_components(None, None, tok_oc, te_g, family="sdxl-refiner")
    assert len(ref.encoders) == 1 and ref.width == 128
    out = ref.encode_text("a photo of a cat")
    full = sdxl.encode_text("a photo of a cat")
    assert out.embeds.shape == (1, 77, 128) and out.pooled.shape == (1, PROJ)
    assert torch.equal(out.embeds, full.embeds[..., 64:])
    assert torch.equal(out.pooled, full.pooled)


def test_family_ids_map_to_text_sides(tok_l, te_l, tok_oc, te_h, te_g):
    assert C.PromptEncoder.from_components(tok_l, te_l, family="sd1-inpaint").family == "sd1"
    assert C.PromptEncoder.from_components(tok_oc, te_h, family="sd2-depth").family == "sd2"
    xl = C.PromptEncoder.from_components(tok_l, te_l, tok_oc, te_g, family="sdxl-inpaint")
    assert xl.family == "sdxl" and xl.zero_empty_negative
    with pytest.raises(ValueError):
        C.PromptEncoder.from_components(tok_l, te_l, family="flux")
    with pytest.raises(ValueError):
        C.PromptEncoder.from_components(tok_l, te_l, family="sdxl")


# --------------------------------------------------------------------------- schedules


def test_prompt_editing_schedule(sd1):
    [schedule] = sd1.encode_schedules(["a [cat:dog:0.5] photo"], 10)
    assert [e.end_at_step for e in schedule] == [5, 10]
    cat, dog = schedule[0].cond.embeds, schedule[1].cond.embeds
    assert cat.shape == dog.shape == (1, 77, 64)
    assert not torch.allclose(cat, dog)
    torch.testing.assert_close(cat, sd1.encode_text("a cat photo").embeds, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dog, sd1.encode_text("a dog photo").embeds, rtol=1e-5, atol=1e-6)
    assert C.cond_at(schedule, 5) is schedule[0].cond
    assert C.cond_at(schedule, 6) is schedule[1].cond
    assert C.cond_at(schedule, 99) is schedule[1].cond


def test_alternation(sd1):
    [schedule] = sd1.encode_schedules(["a [cat|dog] photo"], 4)
    assert [e.end_at_step for e in schedule] == [1, 2, 3, 4]
    cat = sd1.encode_text("a cat photo").embeds
    dog = sd1.encode_text("a dog photo").embeds
    picks = [C.cond_at(schedule, s).embeds for s in (1, 2, 3, 4)]
    for got, want in zip(picks, [cat, dog, cat, dog]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_schedule_entries_share_chunk_count(sd1):
    # A1111 encodes a prompt's step texts as one batch: shorter ones get empty chunks.
    [schedule] = sd1.encode_schedules(["[" + "cat " * 80 + ":dog:3]"], 6)
    assert [e.cond.embeds.shape[1] for e in schedule] == [154, 154]
    torch.testing.assert_close(schedule[1].cond.embeds[:, 77:], sd1.empty_chunk(), rtol=1e-5, atol=1e-6)


def test_and_gives_weighted_subconds(sd1):
    [multi] = sd1.encode_multicond(["a cat:1.2 AND a dog:0.5"], 10)
    assert [w for _, w in multi] == [1.2, 0.5]
    assert len(multi) == 2
    torch.testing.assert_close(C.cond_at(multi[0].schedule, 0).embeds, sd1.encode_text("a cat").embeds)
    torch.testing.assert_close(C.cond_at(multi[1].schedule, 0).embeds, sd1.encode_text("a dog").embeds)
    [plain] = sd1.encode_multicond(["a cat"], 10)
    assert len(plain) == 1 and plain[0].weight == 1.0


def test_sdxl_schedule_carries_pooled(sdxl):
    [schedule] = sdxl.encode_schedules(["a [cat:dog:2] photo"], 4)
    assert all(e.cond.pooled.shape == (1, PROJ) for e in schedule)
    assert not torch.allclose(schedule[0].cond.pooled, schedule[1].cond.pooled)


# --------------------------------------------------------------------------- cache, padding, counter


def test_cache_hit_does_not_reencode(tok_l, te_l):
    enc = C.PromptEncoder.from_components(tok_l, te_l, family="sd1")
    calls = []
    handle = te_l.register_forward_pre_hook(lambda *a, **k: calls.append(1))
    try:
        first = enc.encode_schedules(["a [cat:dog:0.5] photo", "a [cat:dog:0.5] photo"], 10)
        assert len(calls) == 1  # one prompt, both step texts in one batch; duplicate reused
        again = enc.encode_schedules(["a [cat:dog:0.5] photo"], 10)
        assert len(calls) == 1
        assert enc.cache_info().hits >= 1
        assert again[0][0].cond.embeds.data_ptr() == first[0][0].cond.embeds.data_ptr()
        enc.encode_schedules(["a [cat:dog:0.5] photo"], 10, clip_skip=2)
        assert len(calls) == 2
        enc.encode_schedules(["a [cat:dog:0.5] photo"], 10, cache_tag="lora:foo")
        assert len(calls) == 3
        enc.clear_cache()
        enc.encode_schedules(["a [cat:dog:0.5] photo"], 10)
        assert len(calls) == 4
    finally:
        handle.remove()
    small = C.PromptEncoder.from_components(tok_l, te_l, family="sd1", cache_size=2)
    for p in ("a", "b", "c"):
        small.encode_text(p)
    assert small.cache_info().size == 2


def test_pad_to_same_length_uses_empty_chunk(sd1):
    cond = sd1.encode_text("cat " * 100).embeds
    uncond = sd1.encode_text("blurry").embeds
    c2, u2 = sd1.pad_to_same_length([cond, uncond])
    assert c2 is cond and u2.shape == (1, 154, 64)
    assert torch.equal(u2[:, :77], uncond)
    assert torch.equal(u2[:, 77:], sd1.empty_chunk())
    same = sd1.pad_to_same_length([uncond, uncond])
    assert same[0] is uncond


def test_stack_conds_repeats_last_vector(sd1):
    a = sd1.encode_text("cat " * 100).embeds
    b = sd1.encode_text("dog").embeds
    s = C.stack_conds([a, b])
    assert s.shape == (2, 154, 64)
    assert torch.equal(s[1, 77:], b[0, -1:].repeat(77, 1))


@pytest.mark.parametrize("text,expected", [
    ("", (0, 75)),
    ("a cat", (2, 75)),
    ("cat " * 75, (75, 75)),
    ("cat " * 80, (80, 150)),
    ("a BREAK b", (76, 150)),
    ("[cat:" + "dog " * 90 + ":5]", (90, 150)),
    ("a cat AND " + "dog " * 80, (80, 150)),
])
def test_count_tokens(sd1, text, expected):
    got = sd1.count_tokens(text)
    assert got == expected
    assert str(got) == f"{expected[0]}/{expected[1]}"


def test_count_tokens_negative_does_not_split_and(tok_l):
    assert C.count_prompt_tokens("a AND b", tok_l, is_positive=False).count == 3
    assert C.count_prompt_tokens("a AND b", tok_l).count == 1

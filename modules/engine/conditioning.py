"""Prompt text -> text-encoder conditioning, the way A1111 builds it, on transformers CLIP models.

What happens to one prompt (A1111 v1.10 behaviour):

1. ``<lora:...>``-style extra-network tags are removed (``prompt_parser.parse_extra_networks``);
   applying the networks is someone else's job.
2. ``AND`` splits it into weighted sub-prompts (composable diffusion), each scheduled on its
   own (``[from:to:when]`` editing, ``[a|b]`` alternation) into one plain text per step range.
3. Each text is split into ``[fragment, weight]`` pieces (``(x:1.5)``, ``[x]``, ``BREAK``);
   every fragment is tokenized *without* BOS/EOS and the tokens are packed into chunks of 75.
   A chunk becomes 77 ids: BOS + tokens + EOS padding. There is no length limit: a long prompt
   is several chunks, each encoded on its own and concatenated on the sequence axis
   ([1, 77*k, D]). When a chunk overflows and a comma sits in its last 20 tokens, the words
   after the comma move to the next chunk ("comma padding backtrack"). ``BREAK`` ends the
   current chunk early. SD1's CLIP-L pads with EOS; OpenCLIP (SD2, SDXL's second encoder)
   keeps one EOS and pads with id 0 after it.
4. Each token's hidden state is multiplied by its weight; the "Original" emphasis mode then
   rescales the chunk so its mean is what it was before weighting.

Which hidden state each family uses (``clip_skip`` is A1111's ``CLIP_stop_at_last_layers``); the
policies live on the text-encoder slots of the family records (``modules/models/families.py``):

=============  ==========================================================================
sd1            CLIP-L ``hidden_states[-clip_skip]`` + final layer norm (clip skip 1 is the
               plain last_hidden_state).
sd2            OpenCLIP-H penultimate layer + final layer norm; clip skip is *ignored*
               (A1111 never wired it up for OpenCLIP). diffusers' SD2 text encoder already
               has the last block removed (23 layers), so this is its last_hidden_state.
sdxl           CLIP-L ``hidden_states[-2]`` and OpenCLIP-bigG ``hidden_states[-2]``, both
               *without* final layer norm, concatenated on the feature axis (768 + 1280).
               Clip skip is ignored unless ``sdxl_clip_l_skip`` is set, and then it selects
               CLIP-L's ``hidden_states[-clip_skip]`` (still no layer norm; so clip skip 1
               with that option means the last layer, as in A1111). ``pooled`` is bigG's
               projected, layer-normed EOS state (``text_embeds``) of the first chunk.
               An all-empty *negative* prompt gives all-zero embeddings and pooled.
sdxl-refiner   The bigG encoder alone, as for sdxl.
=============  ==========================================================================

A1111 encodes all step-texts of one prompt as one batch, and the "Original" mean restoration
is taken over that whole batch per chunk position; we do the same, so results match it
exactly even for edited prompts.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections import OrderedDict
from collections.abc import Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal, NamedTuple

import torch

from modules.engine import prompt_parser
# LayerPolicy is the family registry's (the records hold each encoder's policy), re-exported here.
from modules.models.families import FamilyInfo, LayerPolicy, TextEncoderSlot, get_family

__all__ = [
    "CHUNK_LENGTH",
    "DEFAULT_COMMA_PADDING_BACKTRACK",
    "EMPHASIS_MODES",
    "EncoderKind",
    "LayerPolicy",
    "EncoderSlot",
    "TextEncoderSpec",
    "ConditioningOptions",
    "PromptChunk",
    "TokenizedPrompt",
    "TokenCount",
    "Conditioning",
    "ScheduledCond",
    "PromptSchedule",
    "ComposableCond",
    "MultiCond",
    "CacheInfo",
    "PromptEncoder",
    "tokenize_prompt",
    "count_prompt_tokens",
    "cond_at",
    "pad_with_chunk",
    "stack_conds",
]

CHUNK_LENGTH = 75
"""Prompt tokens per chunk; BOS and EOS make it the encoders' 77 positions."""

DEFAULT_COMMA_PADDING_BACKTRACK = 20
"""A1111's ``comma_padding_backtrack`` default (0 disables it)."""

EMPHASIS_MODES = ("Original", "No norm", "Ignore", "None")
"""A1111's ``emphasis`` setting: Original = weight then restore the mean; No norm = weight only;
Ignore = parse the brackets but apply no weights; None = brackets are literal text (and
``BREAK`` is an ordinary word)."""

EncoderKind = Literal["clip-l", "openclip", "openclip-g-proj"]
_EMBEDDING_KEYS = {"clip-l": "clip_l", "openclip": "clip_h", "openclip-g-proj": "clip_g"}


# ---------------------------------------------------------------------------
# Encoder description
# ---------------------------------------------------------------------------


# Defaults per kind, when an EncoderSlot is built without a policy.
_DEFAULT_POLICY: Mapping[str, LayerPolicy] = MappingProxyType({
    "clip-l": LayerPolicy(1, True, "always"),            # SD1
    "openclip": LayerPolicy(1, True, "never"),           # SD2 (diffusers already dropped the last block)
    "openclip-g-proj": LayerPolicy(2, False, "never"),   # SDXL bigG
})


@dataclass
class EncoderSlot:
    """One text encoder with its tokenizer.

    ``kind`` decides padding: "clip-l" pads with EOS, the OpenCLIP kinds pad with id 0 after
    one EOS (A1111 decides by encoder type, not by the tokenizer's pad token).
    "openclip-g-proj" must be a ``CLIPTextModelWithProjection``: it also provides ``pooled``.
    """

    tokenizer: Any
    text_model: Any
    kind: EncoderKind
    layer: LayerPolicy | None = None
    bos_id: int = field(init=False)
    eos_id: int = field(init=False)
    pad_id: int = field(init=False)
    comma_id: int | None = field(init=False)

    def __post_init__(self) -> None:
        if self.kind not in _DEFAULT_POLICY:
            raise ValueError(f"unknown encoder kind {self.kind!r}; expected one of {tuple(_DEFAULT_POLICY)}")
        if self.layer is None:
            self.layer = _DEFAULT_POLICY[self.kind]
        self.bos_id = int(self.tokenizer.bos_token_id)
        self.eos_id = int(self.tokenizer.eos_token_id)
        self.pad_id = self.eos_id if self.kind == "clip-l" else 0
        comma = self.tokenizer.convert_tokens_to_ids(",</w>")
        self.comma_id = None if comma is None or comma == self.tokenizer.unk_token_id else int(comma)

    @property
    def has_pooled(self) -> bool:
        return self.kind == "openclip-g-proj"

    @property
    def embedding_key(self) -> str:
        """Which vectors of an SDXL embedding (clip_l / clip_g) this encoder takes."""
        return _EMBEDDING_KEYS[self.kind]

    @property
    def width(self) -> int:
        return int(self.text_model.config.hidden_size)

    @property
    def num_layers(self) -> int:
        return int(self.text_model.config.num_hidden_layers)


TextEncoderSpec = EncoderSlot


@dataclass(frozen=True)
class ConditioningOptions:
    """The A1111 settings that change how prompts are encoded (part of the cache key)."""

    emphasis: str = "Original"
    comma_padding_backtrack: int = DEFAULT_COMMA_PADDING_BACKTRACK
    sdxl_clip_l_skip: bool = False

    def __post_init__(self) -> None:
        if self.emphasis not in EMPHASIS_MODES:
            raise ValueError(f"unknown emphasis mode {self.emphasis!r}; expected one of {EMPHASIS_MODES}")
        if self.comma_padding_backtrack < 0:
            raise ValueError("comma_padding_backtrack must be >= 0")


# ---------------------------------------------------------------------------
# Tokenisation into 75-token chunks
# ---------------------------------------------------------------------------


@dataclass
class PromptChunk:
    """Up to 75 prompt tokens and their weights, before BOS/EOS/padding are added."""

    tokens: list[int] = field(default_factory=list)
    multipliers: list[float] = field(default_factory=list)
    # (position in tokens, embedding): textual-inversion vectors that replace placeholder tokens there
    fixes: list[tuple[int, Any]] = field(default_factory=list)

    def ids(self, bos: int, eos: int, pad: int) -> list[int]:
        """The 77 ids the encoder sees: BOS, tokens, EOS, then ``pad`` (EOS for CLIP-L)."""
        fill = CHUNK_LENGTH + 1 - len(self.tokens)
        return [bos, *self.tokens, eos] + [pad] * (fill - 1)

    def weights(self) -> list[float]:
        return [1.0, *self.multipliers] + [1.0] * (CHUNK_LENGTH + 1 - len(self.multipliers))


@dataclass
class TokenizedPrompt:
    chunks: list[PromptChunk]
    token_count: int
    """A1111's count for the token counter: 75 per closed chunk plus the real tokens of the last."""


def _is_break(text: str, weight: float) -> bool:
    # Only a top-level BREAK (weight exactly -1) breaks; inside brackets its weight is scaled and
    # A1111 then tokenizes it as the word "break" -- kept for compatibility.
    return text == prompt_parser.BREAK_MARKER and weight == -1


def _fragments(text: str, emphasis: str) -> list[tuple[str, float]]:
    if emphasis == "None":
        return [(text, 1.0)]
    return [(t, float(w)) for t, w in prompt_parser.parse_prompt_attention(text)]


def _tokenize_fragments(tokenizer, texts: list[str]) -> list[list[int]]:
    if not texts:
        return []
    # verbose=False: prompts longer than 77 tokens are expected here, no warning wanted.
    return tokenizer(texts, truncation=False, add_special_tokens=False, verbose=False)["input_ids"]


def tokenize_prompt(
    text: str,
    tokenizer,
    *,
    emphasis: str = "Original",
    comma_padding_backtrack: int = DEFAULT_COMMA_PADDING_BACKTRACK,
    comma_id: int | None = None,
    embeddings: Any = None,
) -> TokenizedPrompt:
    """Pack one (already scheduled, tag-free) prompt into 75-token chunks, A1111's way.

    ``embeddings`` (models.embeddings.EmbeddingSet): a textual-inversion name in the text takes as many
    positions as the embedding has vectors, recorded in the chunk's ``fixes``; an embedding that does
    not fit in the current chunk starts the next one (A1111 never splits one across chunks).

    A chunk is only closed when the next token does not fit, so exactly 75 tokens is one chunk.
    At that moment, if the chunk's last comma is at most ``comma_padding_backtrack`` tokens from
    its end, the tokens after the comma are carried over into the next chunk. The overflowing
    token being a comma itself does not trigger this. ``BREAK`` closes the chunk as it is
    (even an empty one). An empty prompt is one empty chunk.
    """
    if comma_id is None:
        comma = tokenizer.convert_tokens_to_ids(",</w>")
        comma_id = None if comma == tokenizer.unk_token_id else comma
    parsed = _fragments(text, emphasis)
    tokenized = _tokenize_fragments(tokenizer, [t for t, _ in parsed])
    use_weights = emphasis != "Ignore"
    lookup = embeddings.lookup(tokenizer) if embeddings else {}

    chunks: list[PromptChunk] = []
    chunk = PromptChunk()
    token_count = 0
    last_comma = -1

    def close(is_last: bool = False) -> None:
        nonlocal chunk, token_count, last_comma
        token_count += len(chunk.tokens) if is_last else CHUNK_LENGTH
        chunks.append(chunk)
        chunk = PromptChunk()
        last_comma = -1

    for ids, (frag, weight) in zip(tokenized, parsed):
        if _is_break(frag, weight):
            close()
            continue
        w = weight if use_weights else 1.0
        position = 0
        while position < len(ids):
            tok = ids[position]
            if tok == comma_id:
                last_comma = len(chunk.tokens)
            elif (
                comma_padding_backtrack
                and len(chunk.tokens) == CHUNK_LENGTH
                and last_comma != -1
                and len(chunk.tokens) - last_comma <= comma_padding_backtrack
            ):
                cut = last_comma + 1
                carried = PromptChunk(chunk.tokens[cut:], chunk.multipliers[cut:],
                                      [(at - cut, e) for at, e in chunk.fixes if at >= cut])
                del chunk.tokens[cut:], chunk.multipliers[cut:]
                chunk.fixes = [(at, e) for at, e in chunk.fixes if at < cut]
                close()
                chunk = carried
            if len(chunk.tokens) == CHUNK_LENGTH:
                close()
            embedding, name_length = _embedding_at(lookup, ids, position)
            if embedding is None:
                chunk.tokens.append(tok)
                chunk.multipliers.append(w)
                position += 1
                continue
            if len(chunk.tokens) + embedding.count > CHUNK_LENGTH:
                close()
            chunk.fixes.append((len(chunk.tokens), embedding))
            chunk.tokens += [0] * embedding.count
            chunk.multipliers += [w] * embedding.count
            position += name_length

    if chunk.tokens or not chunks:
        close(is_last=True)
    return TokenizedPrompt(chunks, token_count)


def _embedding_at(lookup: Mapping[int, Any], ids: Sequence[int], position: int) -> tuple[Any, int]:
    """The embedding whose name's tokens start at ``ids[position]`` (longest name first), and that length."""
    for name_ids, embedding in lookup.get(ids[position], ()):
        if tuple(ids[position:position + len(name_ids)]) == name_ids:
            return embedding, len(name_ids)
    return None, 0


class TokenCount(NamedTuple):
    count: int
    max_length: int  # 75 * chunks needed: the "/75", "/150" of the UI counter

    def __str__(self) -> str:
        return f"{self.count}/{self.max_length}"


def _target_token_count(count: int) -> int:
    return math.ceil(max(count, 1) / CHUNK_LENGTH) * CHUNK_LENGTH


def count_prompt_tokens(
    text: str,
    tokenizer,
    steps: int = 20,
    *,
    is_positive: bool = True,
    emphasis: str = "Original",
    comma_padding_backtrack: int = DEFAULT_COMMA_PADDING_BACKTRACK,
    embeddings: Any = None,
) -> TokenCount:
    """The UI token counter: the longest step-text of the prompt, as ``(count, max_length)``.

    Extra-network tags are removed first; a positive prompt is split on ``AND``; every
    scheduled text is counted and the largest wins. All CLIP tokenizers here share one vocab, so
    any of them (even without a model loaded) gives the same answer.
    """
    stripped, _ = prompt_parser.parse_extra_networks(text)
    try:
        if is_positive:
            _, flat, _ = prompt_parser.get_multicond_prompt_list([stripped])
        else:
            flat = [stripped]
        schedules = prompt_parser.get_learned_conditioning_prompt_schedules(flat, steps)
        texts = [t for schedule in schedules for _, t in schedule]
    except Exception:  # a counter must never fail on a half-typed prompt
        texts = [stripped]
    count = max(
        tokenize_prompt(t, tokenizer, emphasis=emphasis, comma_padding_backtrack=comma_padding_backtrack,
                        embeddings=embeddings).token_count
        for t in dict.fromkeys(texts)
    )
    return TokenCount(count, _target_token_count(count))


# ---------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------


class Conditioning(NamedTuple):
    embeds: torch.Tensor  # [1, 77*k, D]
    pooled: torch.Tensor | None  # [1, P] for SDXL, else None


class ScheduledCond(NamedTuple):
    end_at_step: int
    cond: Conditioning


PromptSchedule = list[ScheduledCond]


class ComposableCond(NamedTuple):
    schedule: PromptSchedule
    weight: float


MultiCond = list[ComposableCond]
"""The ``AND`` parts of one prompt (a plain prompt is one part with weight 1.0)."""


def cond_at(schedule: Sequence[ScheduledCond], step: int) -> Conditioning:
    """The conditioning in effect at sampler step ``step``.

    ``step`` is the sampler's step index as A1111's denoiser counts it (0 for the first step);
    the first entry whose ``end_at_step >= step`` wins, the last entry past the end. So
    ``[cat:dog:0.5]`` at 10 steps is "cat" for steps 0..5 and "dog" for 6..9, as in A1111.
    """
    for entry in schedule:
        if step <= entry.end_at_step:
            return entry.cond
    return schedule[-1].cond


def pad_with_chunk(conds: Sequence[torch.Tensor], chunk: torch.Tensor) -> list[torch.Tensor]:
    """Append copies of ``chunk`` ([1, 77, D]) so every tensor has the longest sequence length.

    A1111's "pad prompt/negative prompt to be same length" does this with the empty prompt's
    encoding so cond and uncond can share one UNet batch.
    """
    target = max(c.shape[1] for c in conds)
    out = []
    for c in conds:
        missing = target - c.shape[1]
        if missing % chunk.shape[1]:
            raise ValueError(f"sequence lengths {c.shape[1]} and {target} differ by a partial chunk")
        reps = missing // chunk.shape[1]
        if reps:
            c = torch.cat([c, chunk.to(c).repeat(c.shape[0], reps, 1)], dim=1)
        out.append(c)
    return out


def stack_conds(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Stack [T_i, D] (or [1, T_i, D]) conds of *different prompts* into one batch.

    A1111 pads shorter ones here by repeating their last token vector (not a chunk): this is
    what it does for a batch of prompts of different lengths.
    """
    rows = [t[0] if t.dim() == 3 else t for t in tensors]
    target = max(r.shape[0] for r in rows)
    padded = [r if r.shape[0] == target else torch.cat([r, r[-1:].repeat(target - r.shape[0], 1)]) for r in rows]
    return torch.stack(padded)


@dataclass(frozen=True)
class CacheInfo:
    hits: int
    misses: int
    size: int
    maxsize: int


class _LRU:
    """A small thread-safe LRU; the UI thread and the job worker may both encode."""

    def __init__(self, maxsize: int):
        self.maxsize = maxsize
        self._data: OrderedDict[Hashable, Any] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: Hashable) -> Any | None:
        with self._lock:
            if key in self._data:
                self._data.move_to_end(key)
                self.hits += 1
                return self._data[key]
            self.misses += 1
            return None

    def put(self, key: Hashable, value: Any) -> None:
        if self.maxsize <= 0:
            return
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > self.maxsize:
                self._data.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()

    def info(self) -> CacheInfo:
        with self._lock:
            return CacheInfo(self.hits, self.misses, len(self._data), self.maxsize)


# ---------------------------------------------------------------------------
# The encoder
# ---------------------------------------------------------------------------


def _family_record(family: FamilyInfo | str) -> FamilyInfo:
    if isinstance(family, FamilyInfo):
        return family
    try:
        return get_family(family)
    except KeyError as exc:
        raise ValueError(f"{exc.args[0]} (text conditioning)") from None


def _encoder_kind(slot: TextEncoderSlot) -> EncoderKind:
    """Padding follows the tokenizer kind; the pooled encoder is the projection model."""
    return "openclip-g-proj" if slot.pooled else slot.tokenizer


def _first(*candidates):
    return next((c for c in candidates if c is not None), None)


def _final_layer_norm(model) -> torch.nn.Module:
    # transformers >= 5.6 flattened CLIPTextModel (no .text_model); WithProjection still nests it.
    for owner in (model, getattr(model, "text_model", None)):
        norm = getattr(owner, "final_layer_norm", None) if owner is not None else None
        if norm is not None:
            return norm
    raise AttributeError(f"{type(model).__name__} has no final_layer_norm")


def _model_device(model) -> torch.device:
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    return next(model.parameters()).device


@contextlib.contextmanager
def _embedding_vectors(model, slot: EncoderSlot, rows: Sequence[PromptChunk]) -> Iterator[None]:
    """While the encoder runs, its token-embedding output takes the textual-inversion vectors at each
    chunk's fixes (position + 1: after BOS). A forward hook, removed at once: the model is shared."""
    fixes = [(row, at, emb.for_encoder(slot.embedding_key)) for row, chunk in enumerate(rows) for at, emb in chunk.fixes]
    fixes = [f for f in fixes if f[2] is not None and f[2].shape[-1] == slot.width]
    if not fixes:
        yield
        return

    def replace(module, inputs, output):
        output = output.clone()
        for row, at, vectors in fixes:
            output[row, at + 1:at + 1 + vectors.shape[0]] = vectors.to(output)
        return output

    handle = model.get_input_embeddings().register_forward_hook(replace)
    try:
        yield
    finally:
        handle.remove()


class PromptEncoder:
    """Encodes prompts for one loaded model. Holds the model's text encoders and a small cache.

    The cache is keyed by the texts, clip skip, options, the ``is_negative`` zeroing rule and an
    optional caller ``cache_tag``; it lives in this object, so a new model means a new cache.
    Call ``clear_cache()`` (or pass a different ``cache_tag``, e.g. the active LoRAs) whenever the
    text encoders' weights change. Returned tensors are shared with the cache: do not modify
    them in place.
    """

    def __init__(
        self,
        encoders: Sequence[EncoderSlot],
        *,
        options: ConditioningOptions | None = None,
        zero_empty_negative: bool = False,
        cache_size: int = 32,
        family: str | None = None,
    ):
        if not encoders:
            raise ValueError("PromptEncoder needs at least one text encoder")
        self.encoders: list[EncoderSlot] = list(encoders)
        self.options: ConditioningOptions = options or ConditioningOptions()
        self.zero_empty_negative = zero_empty_negative
        self.family = family
        self._cache = _LRU(cache_size)
        # models.embeddings.EmbeddingSet of the textual-inversion embeddings usable with these encoders
        self.embeddings: Any = None

    # --- construction -----------------------------------------------------------------------

    @classmethod
    def from_components(
        cls,
        tokenizer=None,
        text_encoder=None,
        tokenizer_2=None,
        text_encoder_2=None,
        *,
        family: FamilyInfo | str,
        options: ConditioningOptions | None = None,
        cache_size: int = 32,
    ) -> PromptEncoder:
        """Build from diffusers pipeline components: one encoder per text-encoder slot of the family
        record (``family``: the record or a family id such as ``sd2-v``)."""
        fam = _family_record(family)
        given = {"tokenizer": tokenizer, "text_encoder": text_encoder,
                 "tokenizer_2": tokenizer_2, "text_encoder_2": text_encoder_2}
        lone = len(fam.text.slots) == 1
        encoders = []
        for slot in fam.text.slots:
            tok, te = given[slot.tokenizer_component], given[slot.component]
            if lone:  # the refiner pipeline names its one encoder *_2; accept either naming
                tok = _first(tok, tokenizer, tokenizer_2)
                te = _first(te, text_encoder, text_encoder_2)
            if tok is None or te is None:
                raise ValueError(f"{fam.id}: missing {slot.tokenizer_component} or {slot.component}")
            encoders.append(EncoderSlot(tok, te, _encoder_kind(slot), slot.layer))
        return cls(encoders, options=options, zero_empty_negative=fam.text.zero_empty_negative,
                   cache_size=cache_size, family=fam.text.name)

    @classmethod
    def from_pipeline(cls, pipe, *, family: FamilyInfo | str, **kwargs) -> PromptEncoder:
        return cls.from_components(
            getattr(pipe, "tokenizer", None), getattr(pipe, "text_encoder", None),
            getattr(pipe, "tokenizer_2", None), getattr(pipe, "text_encoder_2", None),
            family=family, **kwargs,
        )

    # --- facts ------------------------------------------------------------------------------

    @property
    def width(self) -> int:
        """Feature width of ``embeds`` (768 SD1, 1024 SD2, 2048 SDXL, 1280 refiner)."""
        return sum(s.width for s in self.encoders)

    @property
    def embedding_layout(self) -> tuple[tuple[str, int], ...]:
        """(embedding key, width) per encoder: which embeddings fit (models.embeddings.fits)."""
        return tuple((s.embedding_key, s.width) for s in self.encoders)

    @property
    def pooled_slot(self) -> EncoderSlot | None:
        return next((s for s in reversed(self.encoders) if s.has_pooled), None)

    def tokenize(self, text: str, slot: int = 0) -> TokenizedPrompt:
        enc = self.encoders[slot]
        return tokenize_prompt(text, enc.tokenizer, emphasis=self.options.emphasis,
                               comma_padding_backtrack=self.options.comma_padding_backtrack,
                               comma_id=enc.comma_id, embeddings=self.embeddings)

    def count_tokens(self, text: str, steps: int = 20, *, is_positive: bool = True) -> TokenCount:
        return count_prompt_tokens(text, self.encoders[0].tokenizer, steps, is_positive=is_positive,
                                   emphasis=self.options.emphasis,
                                   comma_padding_backtrack=self.options.comma_padding_backtrack,
                                   embeddings=self.embeddings)

    # --- cache ------------------------------------------------------------------------------

    def cache_info(self) -> CacheInfo:
        return self._cache.info()

    def clear_cache(self) -> None:
        self._cache.clear()

    # --- encoding ---------------------------------------------------------------------------

    def encode_batch(
        self,
        texts: Sequence[str],
        *,
        clip_skip: int = 1,
        is_negative: bool = False,
        cache_tag: Hashable = None,
    ) -> Conditioning:
        """Encode plain (scheduled, tag-free) texts together: embeds [B, 77k, D], pooled [B, P].

        Like A1111's ``get_learned_conditioning``, texts of one call share the chunk count
        (shorter ones get empty chunks) and the emphasis mean restoration.
        """
        texts = list(texts)
        if not texts:
            raise ValueError("encode_batch needs at least one text")
        if clip_skip < 1:
            raise ValueError("clip_skip must be >= 1")
        zero = is_negative and self.zero_empty_negative and all(t == "" for t in texts)
        key = (tuple(texts), clip_skip, self.options, zero, cache_tag, getattr(self.embeddings, "key", None))
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        result = self._encode(texts, clip_skip)
        if zero:
            # SDXL (sgm): an empty negative prompt is all zeros, pooled included.
            result = Conditioning(torch.zeros_like(result.embeds),
                                  None if result.pooled is None else torch.zeros_like(result.pooled))
        self._cache.put(key, result)
        return result

    def encode_text(self, text: str, *, clip_skip: int = 1, is_negative: bool = False,
                    cache_tag: Hashable = None) -> Conditioning:
        """One prompt without schedule parsing (tags are still removed)."""
        stripped, _ = prompt_parser.parse_extra_networks(text)
        return self.encode_batch([stripped], clip_skip=clip_skip, is_negative=is_negative, cache_tag=cache_tag)

    def encode_schedules(
        self,
        prompts: Sequence[str],
        steps: int,
        *,
        clip_skip: int = 1,
        hires_steps: int | None = None,
        is_negative: bool = False,
        use_old_scheduling: bool = False,
        cache_tag: Hashable = None,
    ) -> list[PromptSchedule]:
        """Per prompt, its step schedule of conditionings (A1111's ``get_learned_conditioning``).

        Extra-network tags are removed first and otherwise ignored (the caller applies them).
        ``hires_steps`` schedules the hires-fix pass. ``is_negative`` enables SDXL's zeroing of
        an empty negative prompt. ``AND`` is not split here: use ``encode_multicond``.
        """
        stripped = [prompt_parser.parse_extra_networks(p)[0] for p in prompts]
        schedules = prompt_parser.get_learned_conditioning_prompt_schedules(
            stripped, steps, hires_steps, use_old_scheduling)
        done: dict[str, PromptSchedule] = {}
        out: list[PromptSchedule] = []
        for prompt, schedule in zip(stripped, schedules):
            if prompt not in done:
                cond = self.encode_batch([text for _, text in schedule], clip_skip=clip_skip,
                                         is_negative=is_negative, cache_tag=cache_tag)
                done[prompt] = [
                    ScheduledCond(int(end), Conditioning(
                        cond.embeds[i:i + 1], None if cond.pooled is None else cond.pooled[i:i + 1]))
                    for i, (end, _) in enumerate(schedule)
                ]
            out.append(done[prompt])
        return out

    def encode_multicond(
        self,
        prompts: Sequence[str],
        steps: int,
        *,
        clip_skip: int = 1,
        hires_steps: int | None = None,
        use_old_scheduling: bool = False,
        cache_tag: Hashable = None,
    ) -> list[MultiCond]:
        """Per prompt, its ``AND`` parts as ``(schedule, weight)`` (composable diffusion)."""
        stripped = [prompt_parser.parse_extra_networks(p)[0] for p in prompts]
        per_prompt, flat, _ = prompt_parser.get_multicond_prompt_list(stripped)
        scheduled = self.encode_schedules(flat, steps, clip_skip=clip_skip, hires_steps=hires_steps,
                                          use_old_scheduling=use_old_scheduling, cache_tag=cache_tag)
        return [[ComposableCond(scheduled[i], float(w)) for i, w in parts] for parts in per_prompt]

    def used_embeddings(self, prompts: Sequence[str], steps: int) -> dict[str, Any]:
        """{name: embedding} of the textual-inversion embeddings these prompts encode (for ``TI hashes``)."""
        if not self.embeddings:
            return {}
        stripped = [prompt_parser.parse_extra_networks(p)[0] for p in dict.fromkeys(prompts)]
        try:
            _, flat, _ = prompt_parser.get_multicond_prompt_list(stripped)
            texts = [t for sched in prompt_parser.get_learned_conditioning_prompt_schedules(flat, steps) for _, t in sched]
        except Exception:  # the encoder reports bad prompts; here we only list names
            texts = stripped
        used: dict[str, Any] = {}
        for text in dict.fromkeys(texts):
            for chunk in self.tokenize(text).chunks:
                used.update((emb.name, emb) for _, emb in chunk.fixes)
        return used

    def empty_chunk(self, *, clip_skip: int = 1, cache_tag: Hashable = None) -> torch.Tensor:
        """The empty prompt's encoding, [1, 77, D] (never zeroed)."""
        return self.encode_batch([""], clip_skip=clip_skip, cache_tag=cache_tag).embeds

    def pad_to_same_length(self, conds: Sequence[torch.Tensor], *, clip_skip: int = 1,
                           cache_tag: Hashable = None) -> list[torch.Tensor]:
        """Make cond/uncond tensors ([B, 77k, D]) equally long by appending empty-prompt chunks."""
        conds = list(conds)
        if len({c.shape[1] for c in conds}) <= 1:
            return conds
        return pad_with_chunk(conds, self.empty_chunk(clip_skip=clip_skip, cache_tag=cache_tag))

    # --- internals --------------------------------------------------------------------------

    def _encode(self, texts: list[str], clip_skip: int) -> Conditioning:
        per_slot_chunks = [[self.tokenize(t, i).chunks for t in texts] for i in range(len(self.encoders))]
        # Same vocab everywhere, so chunking agrees across encoders; pad defensively if not.
        n_chunks = max(len(c) for slot in per_slot_chunks for c in slot)
        embeds, pooled = [], None
        for slot, chunked in zip(self.encoders, per_slot_chunks):
            z, p = self._encode_slot(slot, chunked, n_chunks, clip_skip)
            embeds.append(z)
            if p is not None:
                pooled = p
        return Conditioning(torch.cat(embeds, dim=-1) if len(embeds) > 1 else embeds[0], pooled)

    def _encode_slot(self, slot: EncoderSlot, chunked: list[list[PromptChunk]], n_chunks: int,
                     clip_skip: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch = len(chunked)
        empty = PromptChunk()
        rows = [chunks[i] if i < len(chunks) else empty for i in range(n_chunks) for chunks in chunked]
        ids = torch.tensor([r.ids(slot.bos_id, slot.eos_id, slot.pad_id) for r in rows])
        weights = [r.weights() for r in rows]

        layer = slot.layer.select(clip_skip, self.options.sdxl_clip_l_skip)
        if layer > slot.num_layers + 1:
            raise ValueError(f"clip skip {clip_skip} is deeper than the encoder's {slot.num_layers} layers")
        model = slot.text_model
        use_last = layer == 1 and slot.layer.final_layer_norm
        # One forward for every chunk of every text: rows are independent in the transformer,
        # and A1111's per-chunk batching only matters for the emphasis mean below.
        with torch.no_grad(), _embedding_vectors(model, slot, rows):
            out = model(input_ids=ids.to(_model_device(model)), output_hidden_states=not use_last)
            if use_last:
                z = out.last_hidden_state
            else:
                z = out.hidden_states[-layer]
                if slot.layer.final_layer_norm:
                    z = _final_layer_norm(model)(z)
            pooled = out.text_embeds if slot.has_pooled else None

            z = z.reshape(n_chunks, batch, *z.shape[1:])
            emphasis = self.options.emphasis
            if emphasis in ("Original", "No norm") and any(w != 1.0 for row in weights for w in row):
                mult = torch.tensor(weights, dtype=z.dtype, device=z.device).reshape(n_chunks, batch, -1, 1)
                # A1111 takes the mean over the whole batch of one chunk position.
                before = z.mean(dim=(1, 2, 3), keepdim=True)
                z = z * mult
                if emphasis == "Original":
                    z = z * (before / z.mean(dim=(1, 2, 3), keepdim=True))
            # [chunks, B, 77, D] -> [B, chunks*77, D]
            z = z.permute(1, 0, 2, 3).reshape(batch, n_chunks * z.shape[2], z.shape[3])
            if pooled is not None:
                pooled = pooled.reshape(n_chunks, batch, -1)[0]  # first chunk, as A1111/sgm
        return z, pooled

"""The model-family registry: one record per family, holding everything family-specific.

Code asks the record (``get_family(spec.family)``) what a family is: its pipeline, config dirs,
text encoders and how their hidden states are used, latent format, SDXL time ids, UNet facts
and prediction type. It never matches family-name strings. Detection maps the *weights* (or a
sidecar yaml) to a ``FamilyId``; everything after that reads the record. Adding a family means a
record here and, for a new weight layout, one loader entry in ``loader.py``.

The ``FamilyId`` values are the strings used project-wide (config dirs, infotexts, tests):
sd1, sd1-inpaint, sd2, sd2-v, sd2-inpaint, sd2-depth, sdxl, sdxl-refiner, sdxl-inpaint.

The diffusers config dirs under configs/diffusers/<family>/ carry no tokenizer files (the
49,408-token CLIP vocab is shipped once, in configs/tokenizers/), so pass the tokenizers
explicitly when loading:

    pipe = cls.from_single_file(path, config=str(fam.diffusers_dir), local_files_only=True,
                                **load_tokenizers(fam.id))

Torch-free on purpose: the UI imports this on the way to the first HTTP response.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Literal

CONFIGS_DIR = Path(__file__).resolve().parents[2] / "configs"
DIFFUSERS_CONFIGS_DIR = CONFIGS_DIR / "diffusers"
TOKENIZERS_DIR = CONFIGS_DIR / "tokenizers"

# "clip-l": OpenAI CLIP ViT-L/14 (SD1, SDXL's first encoder), pads with <|endoftext|>.
# "openclip": OpenCLIP ViT-H / ViT-bigG (SD2, SDXL's second encoder), pads with "!" (id 0).
# Both share the same vocab/merges; the openclip dir only overrides the config files.
# The kind also names the encoder's weight layout in a single-file checkpoint.
TOKENIZER_KINDS = ("clip-l", "openclip")
TokenizerKind = Literal["clip-l", "openclip"]


class FamilyId(StrEnum):
    SD1 = "sd1"
    SD1_INPAINT = "sd1-inpaint"
    SD2 = "sd2"
    SD2_V = "sd2-v"
    SD2_INPAINT = "sd2-inpaint"
    SD2_DEPTH = "sd2-depth"
    SDXL = "sdxl"
    SDXL_REFINER = "sdxl-refiner"
    SDXL_INPAINT = "sdxl-inpaint"


# ---------------------------------------------------------------- shared sub-records


ClipSkipMode = Literal["always", "never", "opt-in"]


@dataclass(frozen=True)
class LayerPolicy:
    """Which hidden state an encoder contributes.

    ``layer`` counts from the end of transformers' ``hidden_states`` (1 = output of the model's
    last block). ``clip_skip``: "always" means clip skip N selects ``hidden_states[-N]``
    instead of ``layer``; "opt-in" does so only with the ``sdxl_clip_l_skip`` setting;
    "never" ignores clip skip.
    """

    layer: int = 1
    final_layer_norm: bool = True
    clip_skip: ClipSkipMode = "always"

    def select(self, clip_skip: int, sdxl_clip_l_skip: bool) -> int:
        if self.clip_skip == "always" or (self.clip_skip == "opt-in" and sdxl_clip_l_skip):
            return clip_skip
        return self.layer


@dataclass(frozen=True)
class TextEncoderSlot:
    """One text encoder of a family: where it lives in the pipeline and in an A1111 file."""

    component: str                 # pipeline attribute: "text_encoder" | "text_encoder_2"
    ldm_prefix: str                # its keys in a single-file checkpoint
    tokenizer: TokenizerKind       # shipped tokenizer, and the weight layout (transformers CLIP / OpenCLIP)
    layer: LayerPolicy
    pooled: bool = False           # a CLIPTextModelWithProjection giving SDXL's pooled embedding
    # SD2 files keep OpenCLIP's last block, which SD never runs; diffusers' converter drops it.
    dropped_block: int | None = None

    @property
    def tokenizer_component(self) -> str:
        return self.component.replace("text_encoder", "tokenizer")

    @property
    def token_embedding_key(self) -> str:
        """The key whose presence says this encoder is in the file."""
        return self.ldm_prefix + ("embeddings.token_embedding.weight" if self.tokenizer == "clip-l"
                                  else "token_embedding.weight")


@dataclass(frozen=True)
class TextEncoders:
    """A family's text side; families that read prompts alike share one (SD1 and SD1 inpaint...)."""

    name: str                            # "sd1" | "sd2" | "sdxl" | "sdxl-refiner"
    slots: tuple[TextEncoderSlot, ...]   # in pipeline order; embeddings concatenate in this order
    zero_empty_negative: bool = False    # SDXL: an all-empty negative prompt is all zeros (A1111)

    @property
    def pooled_slot(self) -> TextEncoderSlot | None:
        return next((s for s in reversed(self.slots) if s.pooled), None)


@dataclass(frozen=True)
class LatentFormat:
    """The VAE latent space: its shape and the cheap latent -> RGB preview fit.

    ``rgb_factors`` rows are latent channels, columns R, G, B: the widely published
    least-squares fits of VAE-decoded colour against the latents (A1111's "Approx cheap").
    """

    name: str
    rgb_factors: tuple[tuple[float, float, float], ...]
    rgb_bias: tuple[float, float, float] = (0.0, 0.0, 0.0)
    channels: int = 4
    downscale: int = 8               # pixels per latent along each side


class TimeIds(StrEnum):
    """SDXL's micro-conditioning added to the pooled text embedding."""

    NONE = "none"
    BASE = "base"          # original size, crop top-left, target size
    REFINER = "refiner"    # original size, crop top-left, aesthetic score

    @property
    def n_ids(self) -> int:
        return {"none": 0, "base": 6, "refiner": 5}[self.value]


# ---------------------------------------------------------------- the record


@dataclass(frozen=True)
class FamilyInfo:
    id: FamilyId
    label: str                       # human label shown in the UI, e.g. "SD 1.x"
    base: FamilyId                   # the model this is a variant of: A1111's is_sd1/is_sd2/is_sdxl
    ldm_yaml: Path                   # A1111-named LDM config in configs/
    diffusers_dir: Path              # configs/diffusers/<id>/
    pipeline_class: str              # diffusers pipeline named in model_index.json
    text: TextEncoders
    latent: LatentFormat
    time_ids: TimeIds
    unet_in_channels: int            # 4, 9 (inpaint) or 5 (depth)
    # Channels per UNet attention head (SD2/SDXL: 64). None: the stock config's fixed head count
    # (SD1's 8 everywhere). Heads are invisible in the weights, so shape inference needs this.
    unet_head_width: int | None
    resolution: int                  # native training resolution (px)
    prediction_type: str             # "epsilon" | "v_prediction"
    is_inpaint: bool = False
    # A tensor whose presence means v-prediction (SGM files mark v models with "v_pred").
    v_pred_key: str | None = None
    # The weights cannot tell eps from v: a yaml or the UNet probe decides; v makes it this family.
    probe_v_as: FamilyId | None = None
    found_by_keys: bool = True       # False: only a yaml or the probe leads here (sd2-v)

    @property
    def is_depth(self) -> bool:
        return self.unet_in_channels == 5

    @property
    def is_sdxl(self) -> bool:  # A1111's model flags, which extensions read off shared.sd_model
        return self.base == FamilyId.SDXL

    @property
    def is_sd2(self) -> bool:
        return self.base == FamilyId.SD2

    @property
    def is_sd1(self) -> bool:
        return self.base == FamilyId.SD1

    @property
    def text_encoders(self) -> tuple[tuple[str, str], ...]:
        """(pipeline component, tokenizer kind) per text encoder, in pipeline order."""
        return tuple((s.component, s.tokenizer) for s in self.text.slots)

    @property
    def tokenizer_components(self) -> tuple[tuple[str, str], ...]:
        """(tokenizer component name, kind), e.g. (("tokenizer", "clip-l"),)."""
        return tuple((s.tokenizer_component, s.tokenizer) for s in self.text.slots)


# ---------------------------------------------------------------- the families

# LDM single-file prefixes of the text encoders.
TE_SD1 = "cond_stage_model.transformer.text_model."
TE_SD2 = "cond_stage_model.model."
TE_XL1 = "conditioner.embedders.0.transformer.text_model."
TE_XL2 = "conditioner.embedders.1.model."
TE_REFINER = "conditioner.embedders.0.model."

# SD1: CLIP-L's clip-skip layer with the final norm. SD2: diffusers' SD2 encoder already lacks the
# last block, so its last output is OpenCLIP's penultimate; A1111 never wired clip skip for it.
# SDXL: the penultimate layer of both, without the final norm; clip skip only with sdxl_clip_l_skip.
SD1_TEXT = TextEncoders("sd1", (TextEncoderSlot("text_encoder", TE_SD1, "clip-l", LayerPolicy(1, True, "always")),))
SD2_TEXT = TextEncoders("sd2", (TextEncoderSlot("text_encoder", TE_SD2, "openclip", LayerPolicy(1, True, "never"),
                                                dropped_block=23),))
_BIGG_POLICY = LayerPolicy(2, False, "never")
SDXL_TEXT = TextEncoders("sdxl", (
    TextEncoderSlot("text_encoder", TE_XL1, "clip-l", LayerPolicy(2, False, "opt-in")),
    TextEncoderSlot("text_encoder_2", TE_XL2, "openclip", _BIGG_POLICY, pooled=True),
), zero_empty_negative=True)
SDXL_REFINER_TEXT = TextEncoders("sdxl-refiner", (
    TextEncoderSlot("text_encoder_2", TE_REFINER, "openclip", _BIGG_POLICY, pooled=True),
), zero_empty_negative=True)

# SD1 and SD2 share a VAE latent space; SDXL has its own, with a bias.
SD_LATENT = LatentFormat("sd", (
    (0.298, 0.207, 0.208),
    (0.187, 0.286, 0.173),
    (-0.158, 0.189, 0.264),
    (-0.184, -0.271, -0.473),
))
SDXL_LATENT = LatentFormat("sdxl", (
    (0.3651, 0.4232, 0.4341),
    (-0.2533, -0.0042, 0.1068),
    (0.1076, 0.1111, -0.0362),
    (-0.3165, -0.2492, -0.2188),
), rgb_bias=(0.1084, -0.0175, -0.0011))

LATENT_FORMATS = {f.name: f for f in (SD_LATENT, SDXL_LATENT)}


def _sd1(id, label, yaml, pipeline, **kw) -> FamilyInfo:
    return _fam(id, label, FamilyId.SD1, yaml, pipeline, text=SD1_TEXT, latent=SD_LATENT,
                time_ids=TimeIds.NONE, head_width=None, res=512, **kw)


def _sd2(id, label, yaml, pipeline, *, res=512, **kw) -> FamilyInfo:
    return _fam(id, label, FamilyId.SD2, yaml, pipeline, text=SD2_TEXT, latent=SD_LATENT,
                time_ids=TimeIds.NONE, head_width=64, res=res, **kw)


def _sdxl(id, label, yaml, pipeline, *, text=SDXL_TEXT, time_ids=TimeIds.BASE, **kw) -> FamilyInfo:
    return _fam(id, label, FamilyId.SDXL, yaml, pipeline, text=text, latent=SDXL_LATENT, time_ids=time_ids,
                head_width=64, res=1024, v_pred_key="v_pred", **kw)


def _fam(id, label, base, yaml, pipeline, *, text, latent, time_ids, head_width, res, in_ch=4, pred="epsilon",
         inpaint=False, **kw) -> FamilyInfo:
    return FamilyInfo(
        id=FamilyId(id), label=label, base=base, ldm_yaml=CONFIGS_DIR / yaml,
        diffusers_dir=DIFFUSERS_CONFIGS_DIR / str(id), pipeline_class=pipeline, text=text, latent=latent,
        time_ids=time_ids, unet_in_channels=in_ch, unet_head_width=head_width, resolution=res,
        prediction_type=pred, is_inpaint=inpaint, **kw,
    )


FAMILIES: dict[FamilyId, FamilyInfo] = {
    f.id: f
    for f in (
        _sd1(FamilyId.SD1, "SD 1.x", "v1-inference.yaml", "StableDiffusionPipeline"),
        _sd1(FamilyId.SD1_INPAINT, "SD 1.x Inpainting", "v1-inpainting-inference.yaml",
             "StableDiffusionInpaintPipeline", inpaint=True, in_ch=9),
        _sd2(FamilyId.SD2, "SD 2.x", "v2-inference.yaml", "StableDiffusionPipeline", probe_v_as=FamilyId.SD2_V),
        _sd2(FamilyId.SD2_V, "SD 2.x (v-prediction)", "v2-inference-v.yaml", "StableDiffusionPipeline",
             pred="v_prediction", res=768, found_by_keys=False),
        _sd2(FamilyId.SD2_INPAINT, "SD 2.x Inpainting", "v2-inpainting-inference.yaml",
             "StableDiffusionInpaintPipeline", inpaint=True, in_ch=9),
        # No from_single_file for the depth pipeline: build it per component.
        _sd2(FamilyId.SD2_DEPTH, "SD 2.x Depth", "v2-midas-inference.yaml", "StableDiffusionDepth2ImgPipeline",
             in_ch=5),
        _sdxl(FamilyId.SDXL, "SDXL", "sd_xl_base.yaml", "StableDiffusionXLPipeline"),
        _sdxl(FamilyId.SDXL_REFINER, "SDXL Refiner", "sd_xl_refiner.yaml", "StableDiffusionXLImg2ImgPipeline",
              text=SDXL_REFINER_TEXT, time_ids=TimeIds.REFINER),
        _sdxl(FamilyId.SDXL_INPAINT, "SDXL Inpainting", "sd_xl_inpaint.yaml", "StableDiffusionXLInpaintPipeline",
              inpaint=True, in_ch=9),
    )
}


def get_family(family_id: str) -> FamilyInfo:
    """The record for a family id (a ``FamilyId`` or its string value)."""
    try:
        return FAMILIES[FamilyId(family_id)]
    except ValueError:
        raise KeyError(f"unknown model family {family_id!r}; known: {', '.join(FAMILIES)}") from None


def family_for(text: TextEncoders, unet_in_channels: int) -> FamilyInfo | None:
    """The family whose weights have this text side and UNet input width (families the keys can tell)."""
    return next((f for f in FAMILIES.values()
                 if f.found_by_keys and f.text == text and f.unet_in_channels == unet_in_channels), None)


def load_tokenizer(kind: str = "clip-l"):
    """A fresh CLIPTokenizer built from the shipped vocab, offline.

    Not cached on purpose: textual-inversion embeddings add tokens to the
    tokenizer, which must not leak between loaded models.
    """
    from transformers import CLIPTokenizer

    if kind not in TOKENIZER_KINDS:
        raise ValueError(f"unknown tokenizer kind {kind!r}; expected one of {TOKENIZER_KINDS}")
    overrides = {}
    if kind == "openclip":
        cfg = json.loads((TOKENIZERS_DIR / "openclip" / "tokenizer_config.json").read_text("utf-8"))
        overrides = {k: cfg[k] for k in ("pad_token", "model_max_length") if k in cfg}
    return CLIPTokenizer.from_pretrained(str(TOKENIZERS_DIR / "clip"), local_files_only=True, **overrides)


def load_tokenizers(family_id: str) -> dict:
    """{"tokenizer": ..., "tokenizer_2": ...} for the family, ready to pass to from_single_file."""
    return {name: load_tokenizer(kind) for name, kind in get_family(family_id).tokenizer_components}

"""Where the shipped, offline model configs live, and what each model family is.

Family ids are used project-wide: sd1, sd1-inpaint, sd2, sd2-v, sd2-inpaint,
sd2-depth, sdxl, sdxl-refiner, sdxl-inpaint.

The diffusers config dirs under configs/diffusers/<family>/ carry no tokenizer
files (the 49,408-token CLIP vocab is shipped once, in configs/tokenizers/), so
pass the tokenizers explicitly when loading:

    pipe = cls.from_single_file(path, config=str(fam.diffusers_dir), local_files_only=True,
                                **load_tokenizers(fam.id))
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

CONFIGS_DIR = Path(__file__).resolve().parents[2] / "configs"
DIFFUSERS_CONFIGS_DIR = CONFIGS_DIR / "diffusers"
TOKENIZERS_DIR = CONFIGS_DIR / "tokenizers"

# "clip-l": OpenAI CLIP ViT-L/14 (SD1, SDXL's first encoder), pads with <|endoftext|>.
# "openclip": OpenCLIP ViT-H / ViT-bigG (SD2, SDXL's second encoder), pads with "!" (id 0).
# Both share the same vocab/merges; the openclip dir only overrides the config files.
TOKENIZER_KINDS = ("clip-l", "openclip")


@dataclass(frozen=True)
class FamilyInfo:
    id: str
    label: str                       # human label shown in the UI, e.g. "SD 1.x"
    ldm_yaml: Path                   # A1111-named LDM config in configs/
    diffusers_dir: Path              # configs/diffusers/<id>/
    pipeline_class: str              # diffusers txt2img-ish pipeline named in model_index.json
    is_sdxl: bool
    is_inpaint: bool
    prediction_type: str             # "epsilon" | "v_prediction"
    unet_in_channels: int            # 4, 9 (inpaint) or 5 (depth)
    resolution: int                  # native training resolution (px)
    # (pipeline component, tokenizer kind) per text encoder, in pipeline order
    text_encoders: tuple[tuple[str, str], ...]

    @property
    def is_depth(self) -> bool:
        return self.unet_in_channels == 5

    @property
    def tokenizer_components(self) -> tuple[tuple[str, str], ...]:
        """(tokenizer component name, kind), e.g. (("tokenizer", "clip-l"),)."""
        return tuple((c.replace("text_encoder", "tokenizer"), k) for c, k in self.text_encoders)


def _fam(id, label, yaml, pipeline, *, xl=False, inpaint=False, pred="epsilon", in_ch=4, res=512, tes):
    return FamilyInfo(
        id=id, label=label, ldm_yaml=CONFIGS_DIR / yaml, diffusers_dir=DIFFUSERS_CONFIGS_DIR / id,
        pipeline_class=pipeline, is_sdxl=xl, is_inpaint=inpaint, prediction_type=pred,
        unet_in_channels=in_ch, resolution=res, text_encoders=tes,
    )


_CLIP = (("text_encoder", "clip-l"),)
_OPENCLIP = (("text_encoder", "openclip"),)
_XL = (("text_encoder", "clip-l"), ("text_encoder_2", "openclip"))

FAMILIES: dict[str, FamilyInfo] = {
    f.id: f
    for f in (
        _fam("sd1", "SD 1.x", "v1-inference.yaml", "StableDiffusionPipeline", tes=_CLIP),
        _fam("sd1-inpaint", "SD 1.x Inpainting", "v1-inpainting-inference.yaml",
             "StableDiffusionInpaintPipeline", inpaint=True, in_ch=9, tes=_CLIP),
        _fam("sd2", "SD 2.x", "v2-inference.yaml", "StableDiffusionPipeline", tes=_OPENCLIP),
        _fam("sd2-v", "SD 2.x (v-prediction)", "v2-inference-v.yaml", "StableDiffusionPipeline",
             pred="v_prediction", res=768, tes=_OPENCLIP),
        _fam("sd2-inpaint", "SD 2.x Inpainting", "v2-inpainting-inference.yaml",
             "StableDiffusionInpaintPipeline", inpaint=True, in_ch=9, tes=_OPENCLIP),
        # No from_single_file for the depth pipeline: build it per component.
        _fam("sd2-depth", "SD 2.x Depth", "v2-midas-inference.yaml",
             "StableDiffusionDepth2ImgPipeline", in_ch=5, tes=_OPENCLIP),
        _fam("sdxl", "SDXL", "sd_xl_base.yaml", "StableDiffusionXLPipeline", xl=True, res=1024, tes=_XL),
        _fam("sdxl-refiner", "SDXL Refiner", "sd_xl_refiner.yaml", "StableDiffusionXLImg2ImgPipeline",
             xl=True, res=1024, tes=(("text_encoder_2", "openclip"),)),
        _fam("sdxl-inpaint", "SDXL Inpainting", "sd_xl_inpaint.yaml", "StableDiffusionXLInpaintPipeline",
             xl=True, inpaint=True, in_ch=9, res=1024, tes=_XL),
    )
}


def get_family(family_id: str) -> FamilyInfo:
    try:
        return FAMILIES[family_id]
    except KeyError:
        raise KeyError(f"unknown model family {family_id!r}; known: {', '.join(FAMILIES)}") from None


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

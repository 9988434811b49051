"""Shipped configs, the CLIP tokenizer, and tiny A1111-layout checkpoints that round-trip
through diffusers' own single-file loader."""

from __future__ import annotations

import inspect
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from modules.models import families as sd_configs
from modules.models.families import FAMILIES, load_tokenizer, load_tokenizers
from tests import tiny_models as tm

EXPECTED_IDS = ["sd1", "sd1-inpaint", "sd2", "sd2-v", "sd2-inpaint", "sd2-depth",
                "sdxl", "sdxl-refiner", "sdxl-inpaint"]
CAT_IDS = [49406, 320, 1125, 539, 320, 2368, 49407]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """family -> TinyCheckpoint, made once per module on first use."""
    root = tmp_path_factory.mktemp("tiny")
    cache: dict[str, tm.TinyCheckpoint] = {}

    def get(family):
        if family not in cache:
            cache[family] = tm.make_checkpoint(root / f"{family}.safetensors", family)
        return cache[family]

    return get


def _unet_defaults():
    from diffusers import UNet2DConditionModel

    return {k: p.default for k, p in inspect.signature(UNet2DConditionModel.__init__).parameters.items()
            if p.default is not inspect.Parameter.empty}


def _fake_real_ckpt(family, unet_cfg):
    """Meta tensors with the real shapes that diffusers' model-type inference looks at."""
    meta = lambda *s: torch.empty(*s, device="meta")  # noqa: E731
    ck = {"model.diffusion_model.input_blocks.0.0.weight": meta(unet_cfg["block_out_channels"][0],
                                                               unet_cfg["in_channels"], 3, 3)}
    if family.startswith("sd2"):
        ck["model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight"] = meta(320, 1024)
    if family in ("sdxl", "sdxl-inpaint"):
        ck["conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias"] = meta(1280)
    if family == "sdxl-refiner":
        ck["conditioner.embedders.0.model.transformer.resblocks.9.mlp.c_proj.bias"] = meta(1280)
    return ck


def _assert_same(got: dict, ref: dict, what: str):
    assert set(got) == set(ref), f"{what}: key sets differ: {sorted(set(got) ^ set(ref))[:8]}"
    for k, v in ref.items():
        g = got[k]
        assert g.device.type != "meta", f"{what}: {k} was never loaded"
        assert g.shape == v.shape and torch.equal(g, v.to(g.dtype)), f"{what}: {k} differs"


def _load_components(ck: tm.TinyCheckpoint, **kw) -> dict:
    """Load every component of a tiny checkpoint through diffusers' single-file code."""
    import diffusers

    fam = FAMILIES[ck.family]
    if fam.pipeline_class == "StableDiffusionDepth2ImgPipeline":
        # No from_single_file on the depth pipeline: per component.
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
        from safetensors.torch import load_file
        from transformers import CLIPTextModel

        common = dict(config=str(ck.config_dir), local_files_only=True)
        return {
            "unet": UNet2DConditionModel.from_single_file(str(ck.path), subfolder="unet", **common),
            "vae": AutoencoderKL.from_single_file(str(ck.path), subfolder="vae", **common),
            "text_encoder": create_diffusers_clip_model_from_ldm(
                CLIPTextModel, load_file(str(ck.path)), subfolder="text_encoder", **common),
        }
    pipe = getattr(diffusers, fam.pipeline_class).from_single_file(
        str(ck.path), config=str(ck.config_dir), local_files_only=True, **load_tokenizers(ck.family), **kw)
    return {c: getattr(pipe, c) for c in ck.diffusers_state_dicts}


# --------------------------------------------------------------------------- registry


def test_family_ids_and_paths():
    assert list(FAMILIES) == EXPECTED_IDS
    for fid, f in FAMILIES.items():
        assert f.id == fid and f.label
        assert f.ldm_yaml.is_file(), f.ldm_yaml
        assert (f.diffusers_dir / "model_index.json").is_file()
        assert f.ldm_yaml.parent == sd_configs.CONFIGS_DIR
    assert FAMILIES["sd2-v"].prediction_type == "v_prediction"
    assert FAMILIES["sdxl-refiner"].tokenizer_components == (("tokenizer_2", "openclip"),)
    assert [f.id for f in FAMILIES.values() if f.is_inpaint] == ["sd1-inpaint", "sd2-inpaint", "sdxl-inpaint"]
    with pytest.raises(KeyError, match="unknown model family"):
        sd_configs.get_family("flux")


# --------------------------------------------------------------------------- shipped configs


@pytest.mark.parametrize("family", EXPECTED_IDS)
def test_shipped_yaml_matches_config_dir(family):
    from diffusers.loaders.single_file_utils import (
        create_unet_diffusers_config_from_ldm, create_vae_diffusers_config_from_ldm)
    from omegaconf import OmegaConf

    fam = FAMILIES[family]
    assert OmegaConf.load(fam.ldm_yaml).model.target
    import yaml

    original = yaml.safe_load(fam.ldm_yaml.read_text("utf-8"))
    d = fam.diffusers_dir
    unet = json.loads((d / "unet" / "config.json").read_text("utf-8"))
    vae = json.loads((d / "vae" / "config.json").read_text("utf-8"))
    fake = _fake_real_ckpt(family, unet)

    got = create_unet_diffusers_config_from_ldm(original, fake)
    defaults = _unet_defaults()
    for k, v in got.items():
        if k == "sample_size":
            continue
        want = unet.get(k, defaults.get(k))
        assert v == want or (isinstance(v, list) and list(want or []) == v), (k, v, want)

    vgot = create_vae_diffusers_config_from_ldm(original, fake)
    for k, v in vgot.items():
        if k != "sample_size":
            assert v == vae[k], (k, v, vae[k])

    is_v = original["model"]["params"].get("parameterization") == "v"
    assert is_v == (fam.prediction_type == "v_prediction")


@pytest.mark.parametrize("family", EXPECTED_IDS)
def test_shipped_config_dir_consistent(family):
    import diffusers
    from transformers import CLIPTextConfig

    fam = FAMILIES[family]
    d = fam.diffusers_dir
    index = json.loads((d / "model_index.json").read_text("utf-8"))
    assert index["_class_name"] == fam.pipeline_class
    sched_cfg = json.loads((d / "scheduler" / "scheduler_config.json").read_text("utf-8"))
    assert index["scheduler"] == ["diffusers", sched_cfg["_class_name"]]
    sched = getattr(diffusers, sched_cfg["_class_name"]).from_pretrained(str(d), subfolder="scheduler")
    assert sched.config.prediction_type == fam.prediction_type
    assert (sched.config.beta_start, sched.config.beta_end) == (0.00085, 0.012)
    unet = diffusers.UNet2DConditionModel.load_config(str(d), subfolder="unet")
    assert unet["in_channels"] == fam.unet_in_channels
    widths = 0
    for te, kind in fam.text_encoders:
        assert index[te][0] == "transformers"
        cfg = CLIPTextConfig.from_pretrained(str(d), subfolder=te)
        assert cfg.vocab_size == 49408 and cfg.hidden_size // cfg.num_attention_heads == 64
        assert cfg.hidden_act == ("quick_gelu" if kind == "clip-l" else "gelu")
        widths += cfg.hidden_size
    assert unet["cross_attention_dim"] == widths
    for name in ("tokenizer", "tokenizer_2"):  # vocab is shipped once, not per dir
        assert not (d / name).exists()
    listed = {k for k, v in index.items() if isinstance(v, list) and v[0] is not None}
    assert {t for t, _ in fam.tokenizer_components} <= listed


# --------------------------------------------------------------------------- tokenizer


def test_tokenizer_ids_and_padding():
    clip = load_tokenizer("clip-l")
    oc = load_tokenizer("openclip")
    assert len(clip) == len(oc) == 49408
    assert clip("a photo of a cat").input_ids == CAT_IDS
    assert oc("a photo of a cat").input_ids == CAT_IDS
    assert (clip.pad_token, clip.pad_token_id) == ("<|endoftext|>", 49407)
    assert (oc.pad_token, oc.pad_token_id) == ("!", 0)
    assert clip.model_max_length == oc.model_max_length == 77
    padded = oc("a cat", padding="max_length", max_length=77).input_ids
    assert len(padded) == 77 and padded[-1] == 0
    with pytest.raises(ValueError):
        load_tokenizer("t5")


def test_shipped_vocab_follows_byte_construction():
    from tools.derive_clip_tokenizer import N_MERGES, byte_to_unicode

    vocab = json.loads((sd_configs.TOKENIZERS_DIR / "clip" / "vocab.json").read_text("utf-8"))
    chars = list(byte_to_unicode().values())
    assert [vocab[c] for c in chars] == list(range(256))
    assert [vocab[c + "</w>"] for c in chars] == list(range(256, 512))
    assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407
    merges = (sd_configs.TOKENIZERS_DIR / "clip" / "merges.txt").read_text("utf-8").splitlines()
    assert merges[0].startswith("#version") and len(merges) == N_MERGES + 1
    assert set(os.listdir(sd_configs.TOKENIZERS_DIR / "openclip")) == {
        "tokenizer_config.json", "special_tokens_map.json"}


# --------------------------------------------------------------------------- tiny checkpoints

_TE_PROBE = {
    "sd1": ("cond_stage_model.transformer.text_model.embeddings.token_embedding.weight", (49408, 64)),
    "sd2": ("cond_stage_model.model.transformer.resblocks.23.attn.in_proj_weight", (192, 64)),
    "sdxl": ("conditioner.embedders.1.model.text_projection", (128, 128)),
    "sdxl-refiner": ("conditioner.embedders.0.model.transformer.resblocks.9.mlp.c_proj.bias", (128,)),
}


@pytest.mark.parametrize("family", EXPECTED_IDS)
def test_round_trip_through_diffusers(family, tiny):
    ck = tiny(family)
    sd = ck.ldm_state_dict
    fam = FAMILIES[family]
    assert sd["model.diffusion_model.input_blocks.0.0.weight"].shape[1] == fam.unet_in_channels
    assert any(k.startswith("first_stage_model.decoder.") for k in sd)
    probe = _TE_PROBE.get(family) or _TE_PROBE.get(family.split("-")[0])
    assert tuple(sd[probe[0]].shape) == probe[1], probe
    if family == "sd2-depth":
        assert any(k.startswith("depth_model.") for k in sd)

    loaded = _load_components(ck)
    assert set(loaded) == set(ck.diffusers_state_dicts)
    for comp, ref in ck.diffusers_state_dicts.items():
        _assert_same(loaded[comp].state_dict(), ref, f"{family}/{comp}")


def test_diffusers_detects_tiny_sdxl_and_inpaint(tiny):
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    expect = {"sd1": "v1", "sd1-inpaint": "inpainting", "sdxl": "xl_base",
              "sdxl-refiner": "xl_refiner", "sdxl-inpaint": "xl_inpaint"}
    for family, mtype in expect.items():
        assert infer_diffusers_model_type(tiny(family).ldm_state_dict) == mtype, family


def test_diffusers_loads_a_non_standard_sdxl_time_embedding(tmp_path):
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    ck = tm.make_checkpoint(tmp_path / "t8.safetensors", "sdxl", addition_time_embed_dim=8)
    assert infer_diffusers_model_type(ck.ldm_state_dict) == "xl_base"
    loaded = _load_components(ck)
    assert loaded["unet"].config.addition_time_embed_dim == 8
    for comp, ref in ck.diffusers_state_dicts.items():
        _assert_same(loaded[comp].state_dict(), ref, f"t8/{comp}")


def test_ckpt_pickle_and_sidecar_yaml(tmp_path):
    ck = tm.make_checkpoint(tmp_path / "m" / "old.ckpt", "sd2", fmt="ckpt", yaml=True, seed=3)
    assert ck.yaml_path == tmp_path / "m" / "old.yaml" and ck.config_dir.is_dir()
    raw = torch.load(str(ck.path), weights_only=True, map_location="cpu")
    assert set(raw) == {"state_dict"} and len(raw["state_dict"]) == len(ck.ldm_state_dict)
    # The sidecar alone configures UNet and VAE (diffusers then ignores the config dir's).
    loaded = _load_components(ck, original_config=str(ck.yaml_path))
    for comp, ref in ck.diffusers_state_dicts.items():
        _assert_same(loaded[comp].state_dict(), ref, f"ckpt/{comp}")


def test_nonstandard_shapes(tmp_path):
    ck = tm.make_checkpoint(tmp_path / "odd.safetensors", "sdxl", seed=5,
                            unet_block_out_channels=[64, 128, 128], te_width=(128, 192), te_layers=(2, 11))
    unet_cfg = json.loads((ck.config_dir / "unet" / "config.json").read_text("utf-8"))
    assert unet_cfg["cross_attention_dim"] == 320 and unet_cfg["attention_head_dim"] == [1, 2, 2]
    sd = ck.ldm_state_dict
    assert sd["conditioner.embedders.0.transformer.text_model.final_layer_norm.weight"].shape == (128,)
    assert "conditioner.embedders.1.model.transformer.resblocks.10.ln_1.weight" in sd
    loaded = _load_components(ck)
    for comp, ref in ck.diffusers_state_dicts.items():
        _assert_same(loaded[comp].state_dict(), ref, f"odd/{comp}")


def test_standalone_vae_file(tmp_path):
    from diffusers import AutoencoderKL

    ck = tm.make_vae_file(tmp_path / "vae" / "tiny.vae.safetensors", "sdxl")
    assert not any(k.startswith("first_stage_model.") for k in ck.ldm_state_dict)
    assert ck.ldm_state_dict["encoder.mid.attn_1.q.weight"].ndim == 4  # 1x1 conv, as in LDM files
    vae = AutoencoderKL.from_single_file(str(ck.path), config=str(ck.config_dir), subfolder="vae",
                                         local_files_only=True)
    _assert_same(vae.state_dict(), ck.diffusers_state_dicts["vae"], "vae")
    assert vae.config.scaling_factor == 0.13025


def test_unsupported_files(tmp_path):
    from safetensors.torch import load_file

    for kind in ("flux", "sd3", "lora", "random"):
        sd = tm.make_unsupported_file(tmp_path / f"{kind}.safetensors", kind)
        assert set(load_file(str(tmp_path / f"{kind}.safetensors"))) == set(sd)
    with pytest.raises(ValueError):
        tm.make_unsupported_file(tmp_path / "x.safetensors", "nope")


def test_tiny_generation_smoke(tiny):
    """Two steps at 64x64 px: the tiny pipeline runs end to end on CPU."""
    import diffusers

    ck = tiny("sd1")
    pipe = diffusers.StableDiffusionPipeline.from_single_file(
        str(ck.path), config=str(ck.config_dir), local_files_only=True, **load_tokenizers("sd1"))
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a photo of a cat", num_inference_steps=2, guidance_scale=7.0, output_type="np",
               generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (1, 64, 64, 3)
    assert torch.isfinite(torch.from_numpy(out.images)).all()

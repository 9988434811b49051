"""Tiny, seeded-random Stable Diffusion checkpoints in the real A1111 single-file layout.

For every family id of modules.models.families, `make_checkpoint` builds tiny diffusers
components (same structure and conventions as the real models, tiny widths),
converts them to the LDM key layout that A1111 checkpoints use and writes a
`.safetensors` (or pickled `.ckpt`) file plus a tiny diffusers config dir beside it.
The weights are random: anything generated with them is noise.

Conventions kept from the real models (so shape-inferring loaders treat them alike):
  * CLIP text encoders use head_dim 64 and the full 49,408-token vocab.
  * SD1 UNets use 8 heads; SD2/SDXL UNets use head_dim 64 and linear projections.
  * SD2's OpenCLIP encoder is stored with one layer more than diffusers uses
    (the penultimate-layer convention; diffusers drops resblocks.23).
  * SDXL: cross-attention dim = width(TE1) + width(TE2), TE2 has >= 10 layers and a
    different width; TE2 is a CLIPTextModelWithProjection.
  * Inpaint UNets take 9 input channels, depth UNets 5 (plus a depth_model.* stub).

The diffusers -> LDM converter below is written as the inverse of diffusers'
own LDM -> diffusers mapping (diffusers.loaders.single_file_utils).
"""

from __future__ import annotations

import copy
import json
import math
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from modules.models.families import FAMILIES, get_family

# Tiny widths. TE1 = CLIP-L-like, TE2 = OpenCLIP-bigG-like (SDXL), SD2 = OpenCLIP-H-like.
TINY_CLIP_WIDTH = 64
TINY_CLIP_LAYERS = 4
TINY_OPENCLIP_WIDTH = 64
TINY_OPENCLIP_LAYERS = 23      # as SD2 in diffusers; the LDM file holds 24
TINY_BIGG_WIDTH = 128
TINY_BIGG_LAYERS = 10          # diffusers' SDXL detection needs resblocks.9
TINY_VAE_CHANNELS = [32, 32, 64, 64]
TINY_RESOLUTION = 64           # px; latents are 8x8

_SD1_UNET = [32, 64]
_HD64_UNET = [64, 128]         # SD2 / SDXL: head_dim 64 -> heads [1, 2]

__all__ = [
    "TinyCheckpoint", "make_checkpoint", "tiny_config_dir", "tiny_configs", "build_components",
    "make_vae_file", "make_unsupported_file", "unet_to_ldm", "vae_to_ldm", "clip_to_ldm",
    "openclip_to_ldm", "components_to_ldm", "copy_checkpoint", "FAMILY_IDS",
]

FAMILY_IDS = tuple(FAMILIES)


@dataclass
class TinyCheckpoint:
    path: Path
    family: str
    config_dir: Path
    ldm_state_dict: dict[str, torch.Tensor]
    diffusers_state_dicts: dict[str, dict[str, torch.Tensor]] = field(repr=False)
    yaml_path: Path | None = None


# --------------------------------------------------------------------------- configs


def _heads(width: int) -> int:
    return max(1, width // 64)


def _te_config(real: dict, width: int, layers: int) -> dict:
    cfg = dict(real)
    cfg.update(hidden_size=width, intermediate_size=4 * width, num_attention_heads=_heads(width),
               num_hidden_layers=layers, projection_dim=width)
    return cfg


def _block_types(n: int, family: str) -> tuple[list[str], list[str]]:
    if family.startswith("sdxl"):
        # SDXL: no attention at the top level; the refiner also has none at the bottom.
        attn = [i > 0 and not (family == "sdxl-refiner" and n > 2 and i == n - 1) for i in range(n)]
    else:
        attn = [i < n - 1 for i in range(n)] if n > 1 else [True]
    down = ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn]
    up = ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)]
    return down, up


def _as_pair(v, default):
    if v is None:
        return default
    if isinstance(v, (tuple, list)):
        return tuple(v)
    return (v, default[1])


def tiny_configs(family: str, *, unet_block_out_channels=None, te_width=None, te_layers=None,
                 addition_time_embed_dim=None) -> dict:
    """Tiny diffusers config dicts {component: config} derived from the shipped real ones.

    te_width / te_layers apply to the first (or only) text encoder; for SDXL pass a
    pair to set both encoders. For SD2, te_layers counts diffusers layers (the LDM
    file gets one more). addition_time_embed_dim (SDXL families) sets the width of each
    time-id embedding (stock 256) and the add-embedding's input width with it.
    """
    fam = get_family(family)
    real = _read_real_configs(family)
    out: dict[str, dict] = {"model_index": real["model_index"], "scheduler": real["scheduler"]}

    widths: dict[str, int] = {}
    if fam.is_sdxl:
        if family == "sdxl-refiner":
            w = te_width if te_width is not None else TINY_BIGG_WIDTH
            n = te_layers if te_layers is not None else TINY_BIGG_LAYERS
            out["text_encoder_2"] = _te_config(real["text_encoder_2"], int(w), int(n))
            widths["text_encoder_2"] = int(w)
        else:
            w1, w2 = _as_pair(te_width, (TINY_CLIP_WIDTH, TINY_BIGG_WIDTH))
            n1, n2 = _as_pair(te_layers, (TINY_CLIP_LAYERS, TINY_BIGG_LAYERS))
            out["text_encoder"] = _te_config(real["text_encoder"], w1, n1)
            out["text_encoder_2"] = _te_config(real["text_encoder_2"], w2, n2)
            widths.update(text_encoder=w1, text_encoder_2=w2)
    else:
        openclip = fam.text_encoders[0][1] == "openclip"
        w = te_width if te_width is not None else (TINY_OPENCLIP_WIDTH if openclip else TINY_CLIP_WIDTH)
        n = te_layers if te_layers is not None else (TINY_OPENCLIP_LAYERS if openclip else TINY_CLIP_LAYERS)
        out["text_encoder"] = _te_config(real["text_encoder"], int(w), int(n))
        widths["text_encoder"] = int(w)

    unet = dict(real["unet"])
    boc = list(unet_block_out_channels or (_SD1_UNET if family.startswith("sd1") else _HD64_UNET))
    down, up = _block_types(len(boc), family)
    unet.update(block_out_channels=boc, down_block_types=down, up_block_types=up,
                cross_attention_dim=sum(widths.values()), sample_size=TINY_RESOLUTION // 8,
                # an old version plus sample_size < 64 makes the SD pipelines force 64 (512px)
                _diffusers_version="0.42.1")
    if not family.startswith("sd1"):
        unet["attention_head_dim"] = [_heads(c) for c in boc]
    if addition_time_embed_dim is not None and not fam.time_ids.n_ids:
        raise ValueError(f"{family} has no time ids: addition_time_embed_dim is for SDXL families")
    if fam.is_sdxl:
        tlpb = real["unet"]["transformer_layers_per_block"]
        unet["transformer_layers_per_block"] = 2 if isinstance(tlpb, int) else [1] + [2] * (len(boc) - 1)
        if addition_time_embed_dim is not None:
            unet["addition_time_embed_dim"] = int(addition_time_embed_dim)
        n_time_ids = fam.time_ids.n_ids
        unet["projection_class_embeddings_input_dim"] = (
            widths["text_encoder_2"] + n_time_ids * unet["addition_time_embed_dim"])
    out["unet"] = unet

    vae = dict(real["vae"])
    vae.update(block_out_channels=list(TINY_VAE_CHANNELS), layers_per_block=1, sample_size=TINY_RESOLUTION)
    out["vae"] = vae
    return out


def _read_real_configs(family: str) -> dict:
    d = get_family(family).diffusers_dir
    read = lambda p: json.loads((d / p).read_text("utf-8"))  # noqa: E731
    out = {"model_index": read("model_index.json"), "scheduler": read("scheduler/scheduler_config.json"),
           "unet": read("unet/config.json"), "vae": read("vae/config.json")}
    for te in ("text_encoder", "text_encoder_2"):
        if (d / te / "config.json").exists():
            out[te] = read(f"{te}/config.json")
    return out


def tiny_config_dir(family: str, dest, *, with_tokenizers: bool = False, **shape_overrides) -> Path:
    """Write the tiny diffusers config dir for `family` at `dest` (created) and return it.

    Like the shipped dirs it holds no tokenizer files unless with_tokenizers=True;
    pass `modules.models.families.load_tokenizers(family)` to from_single_file instead.
    """
    return _write_config_dir(tiny_configs(family, **shape_overrides), Path(dest), family, with_tokenizers)


def _write_config_dir(cfgs: dict, dest: Path, family: str, with_tokenizers: bool) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    names = {"model_index": "model_index.json", "scheduler": "scheduler/scheduler_config.json"}
    for comp, cfg in cfgs.items():
        p = dest / names.get(comp, f"{comp}/config.json")
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
    if with_tokenizers:
        from modules.models.families import TOKENIZERS_DIR

        for name, kind in get_family(family).tokenizer_components:
            tdir = dest / name
            tdir.mkdir(exist_ok=True)
            for f in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
                src = TOKENIZERS_DIR / kind / f
                shutil.copyfile(src if src.exists() else TOKENIZERS_DIR / "clip" / f, tdir / f)
    return dest


# --------------------------------------------------------------------------- models


def build_components(cfgs: dict, seed: int = 0, dtype: torch.dtype | None = None) -> dict:
    """Instantiate seeded-random diffusers/transformers models from tiny config dicts."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    models = {}
    with torch.random.fork_rng(devices=[]):
        for i, comp in enumerate(("unet", "vae", "text_encoder", "text_encoder_2")):
            if comp not in cfgs:
                continue
            torch.manual_seed(seed * 1000 + i)
            cfg = {k: v for k, v in cfgs[comp].items() if not k.startswith("_")}
            if comp == "unet":
                m = UNet2DConditionModel.from_config(cfg)
            elif comp == "vae":
                m = AutoencoderKL.from_config(cfg)
            else:
                cls = CLIPTextModelWithProjection if comp == "text_encoder_2" else CLIPTextModel
                m = cls(CLIPTextConfig(**cfg))
            # Default init leaves norms at exactly 1/0; jitter every tensor so that a
            # swapped or dropped key cannot go unnoticed by round-trip checks.
            with torch.no_grad():
                for p in m.parameters():
                    p.add_(torch.randn_like(p) * 0.02)
            if dtype is not None:
                m.to(dtype)
            models[comp] = m.eval()
    return models


# --------------------------------------------------------------------------- diffusers -> LDM

_RESNET = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
           ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection")]
_UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
             "class_embedding.linear_1": "label_emb.0.0", "class_embedding.linear_2": "label_emb.0.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}


def _resnet_rest(rest: str) -> str:
    for d, l in _RESNET:
        if rest.startswith(d + "."):
            return l + rest[len(d):]
    raise KeyError(rest)


def unet_to_ldm(sd: dict, config: dict) -> dict:
    """diffusers UNet2DConditionModel state dict -> LDM openaimodel keys (no prefix)."""
    lpb = config["layers_per_block"]
    up_has_attn = ["CrossAttn" in t for t in config["up_block_types"]]
    out = {}
    for k, v in sd.items():
        m = re.match(r"(.+)\.(weight|bias)$", k)
        mod, p = (m.group(1), m.group(2)) if m else (k, "")
        if mod in _UNET_TOP:
            out[f"{_UNET_TOP[mod]}.{p}"] = v
            continue
        if m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", k):
            i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
            idx = 1 + i * (lpb + 1) + j
            new = f"input_blocks.{idx}.0.{_resnet_rest(rest)}" if kind == "resnets" else f"input_blocks.{idx}.1.{rest}"
        elif m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", k):
            new = f"input_blocks.{(int(m[1]) + 1) * (lpb + 1)}.0.op.{m[2]}"
        elif m := re.match(r"mid_block\.resnets\.(\d+)\.(.+)", k):
            new = f"middle_block.{2 * int(m[1])}.{_resnet_rest(m[2])}"
        elif m := re.match(r"mid_block\.attentions\.0\.(.+)", k):
            new = f"middle_block.1.{m[1]}"
        elif m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", k):
            i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
            idx = i * (lpb + 1) + j
            new = f"output_blocks.{idx}.0.{_resnet_rest(rest)}" if kind == "resnets" else f"output_blocks.{idx}.1.{rest}"
        elif m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", k):
            i = int(m[1])
            new = f"output_blocks.{i * (lpb + 1) + lpb}.{2 if up_has_attn[i] else 1}.conv.{m[2]}"
        else:
            raise KeyError(f"unmapped UNet key {k}")
        out[new] = v
    return out


_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def vae_to_ldm(sd: dict, config: dict) -> dict:
    """diffusers AutoencoderKL state dict -> LDM autoencoder keys (no prefix).

    Mid-block attention projections become 1x1 convs, as in the original files.
    """
    n_up = len(config["up_block_types"])
    out = {}
    for k, v in sd.items():
        new = k.replace("conv_norm_out", "norm_out")
        if m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)$", k):
            new = f"{m[1]}.mid.attn_1.{_VAE_ATTN[m[2]]}.{m[3]}"
            if m[3] == "weight" and m[2] != "group_norm":
                v = v.reshape(*v.shape, 1, 1)
        elif m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", k):
            new = f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}"
        elif m := re.match(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", k):
            new = f"encoder.down.{m[1]}.block.{m[2]}.{m[3]}"
        elif m := re.match(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", k):
            new = f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", k):
            new = f"decoder.up.{n_up - 1 - int(m[1])}.block.{m[2]}.{m[3]}"
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", k):
            new = f"decoder.up.{n_up - 1 - int(m[1])}.upsample.conv.{m[2]}"
        new = new.replace("conv_shortcut", "nin_shortcut")
        out[new] = v
    return out


def clip_to_ldm(sd: dict) -> dict:
    """transformers CLIPTextModel state dict -> `transformer.text_model.*` keys (no outer prefix).

    transformers >= 5.6 dropped the `text_model.` prefix from CLIPTextModel keys;
    accept both spellings.
    """
    out = {}
    for k, v in sd.items():
        k = k if k.startswith("text_model.") else "text_model." + k
        out["transformer." + k] = v
    # Original files carry the position_ids buffer (not part of the state dict any more).
    n = out["transformer.text_model.embeddings.position_embedding.weight"].shape[0]
    out["transformer.text_model.embeddings.position_ids"] = torch.arange(n, dtype=torch.int64)[None]
    return out


_OC_LAYER = [("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"),
             ("mlp.fc2", "mlp.c_proj"), ("self_attn.out_proj", "attn.out_proj")]


def openclip_to_ldm(sd: dict, *, extra_layer: bool = False, seed: int = 0) -> dict:
    """transformers CLIPTextModel[WithProjection] state dict -> open_clip keys (no outer prefix).

    q/k/v are fused into in_proj_weight/bias. Without a projection (SD2) a random
    `text_projection` is added, as real SD2 files carry one that diffusers ignores.
    extra_layer=True appends one more resblock, which SD2 files hold beyond the
    diffusers model (penultimate-layer convention).
    """
    sd = {k.removeprefix("text_model."): v for k, v in sd.items()}
    out = {
        "token_embedding.weight": sd["embeddings.token_embedding.weight"],
        "positional_embedding": sd["embeddings.position_embedding.weight"],
        "ln_final.weight": sd["final_layer_norm.weight"],
        "ln_final.bias": sd["final_layer_norm.bias"],
    }
    width = out["positional_embedding"].shape[1]
    n_layers = 1 + max(int(m[1]) for k in sd if (m := re.match(r"encoder\.layers\.(\d+)\.", k)))
    for i in range(n_layers):
        src, dst = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for p in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{p}"] = torch.cat(
                [sd[f"{src}self_attn.{q}_proj.{p}"] for q in ("q", "k", "v")], dim=0)
            for d, l in _OC_LAYER:
                out[f"{dst}{l}.{p}"] = sd[f"{src}{d}.{p}"]
    gen = torch.Generator().manual_seed(seed + 7)
    dtype = out["positional_embedding"].dtype
    rnd = lambda *s: (torch.randn(*s, generator=gen) * 0.02).to(dtype)  # noqa: E731
    if extra_layer:
        dst = f"transformer.resblocks.{n_layers}."
        for name, t in list(out.items()):
            if name.startswith("transformer.resblocks.0."):
                out[dst + name[len("transformer.resblocks.0."):]] = rnd(*t.shape)
    if "text_projection.weight" in sd:
        # open_clip computes x @ text_projection, i.e. the transposed Linear weight.
        out["text_projection"] = sd["text_projection.weight"].T.contiguous()
    else:
        out["text_projection"] = rnd(width, width)
    out["logit_scale"] = torch.tensor(math.log(1 / 0.07), dtype=dtype)
    return out


def _ddpm_buffers(dtype) -> dict:
    """The schedule buffers CompVis LatentDiffusion saves in SD1/SD2 checkpoints."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    ac = torch.cumprod(1 - betas, 0)
    ac_prev = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
    post_var = betas * (1 - ac_prev) / (1 - ac)
    bufs = {
        "betas": betas, "alphas_cumprod": ac, "alphas_cumprod_prev": ac_prev,
        "sqrt_alphas_cumprod": ac.sqrt(), "sqrt_one_minus_alphas_cumprod": (1 - ac).sqrt(),
        "log_one_minus_alphas_cumprod": (1 - ac).log(), "sqrt_recip_alphas_cumprod": (1 / ac).sqrt(),
        "sqrt_recipm1_alphas_cumprod": (1 / ac - 1).sqrt(), "posterior_variance": post_var,
        "posterior_log_variance_clipped": post_var.clamp(min=1e-20).log(),
        "posterior_mean_coef1": betas * ac_prev.sqrt() / (1 - ac),
        "posterior_mean_coef2": (1 - ac_prev) * (1 - betas).sqrt() / (1 - ac),
    }
    return {k: v.to(dtype) for k, v in bufs.items()}


def components_to_ldm(family: str, models: dict, cfgs: dict, seed: int = 0) -> dict:
    """Assemble the full A1111 single-file state dict for a family."""
    sd: dict[str, torch.Tensor] = {}
    add = lambda prefix, d: sd.update({prefix + k: v for k, v in d.items()})  # noqa: E731
    add("model.diffusion_model.", unet_to_ldm(models["unet"].state_dict(), cfgs["unet"]))
    add("first_stage_model.", vae_to_ldm(models["vae"].state_dict(), cfgs["vae"]))
    dtype = next(models["unet"].parameters()).dtype
    if family.startswith("sd1"):
        add("cond_stage_model.", clip_to_ldm(models["text_encoder"].state_dict()))
    elif family.startswith("sd2"):
        add("cond_stage_model.model.",
            openclip_to_ldm(models["text_encoder"].state_dict(), extra_layer=True, seed=seed))
    elif family == "sdxl-refiner":
        add("conditioner.embedders.0.model.", openclip_to_ldm(models["text_encoder_2"].state_dict(), seed=seed))
    else:
        add("conditioner.embedders.0.", clip_to_ldm(models["text_encoder"].state_dict()))
        add("conditioner.embedders.1.model.", openclip_to_ldm(models["text_encoder_2"].state_dict(), seed=seed))
    if not get_family(family).is_sdxl:
        sd.update(_ddpm_buffers(dtype))
    if family == "sd2-depth":
        # A recognisable stub of the MiDaS DPT-Hybrid weights A1111 depth files carry.
        gen = torch.Generator().manual_seed(seed + 11)
        for name, shape in (("pretrained.act_postprocess3.0.project.0.weight", (8, 16)),
                            ("pretrained.act_postprocess3.0.project.0.bias", (8,)),
                            ("scratch.output_conv.4.weight", (1, 8, 1, 1)),
                            ("scratch.output_conv.4.bias", (1,))):
            sd["depth_model.model." + name] = (torch.randn(*shape, generator=gen) * 0.02).to(dtype)
    return {k: v.detach().clone().contiguous() for k, v in sd.items()}


# --------------------------------------------------------------------------- files


def _save(sd: dict, path: Path, fmt: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(sd, str(path), metadata={"format": "pt"})
    elif fmt == "ckpt":
        torch.save({"state_dict": sd}, str(path))
    else:
        raise ValueError(f"fmt must be 'safetensors' or 'ckpt', not {fmt!r}")


def _tiny_yaml(family: str, cfgs: dict) -> str:
    """The family's LDM yaml with the tiny UNet/VAE values substituted."""
    import yaml as pyyaml

    conf = pyyaml.safe_load(get_family(family).ldm_yaml.read_text("utf-8"))
    params = conf["model"]["params"]
    u, v = cfgs["unet"], cfgs["vae"]
    unet_key = "network_config" if "network_config" in params else "unet_config"
    up = params[unet_key]["params"]
    boc = u["block_out_channels"]
    base = boc[0]
    up["model_channels"] = base
    up["channel_mult"] = [c // base for c in boc]
    up["attention_resolutions"] = [2 ** i for i, t in enumerate(u["down_block_types"]) if "CrossAttn" in t]
    up["in_channels"] = u["in_channels"]
    ctx = u["cross_attention_dim"]
    up["context_dim"] = [ctx] * len(boc) if isinstance(up["context_dim"], list) else ctx
    if isinstance(up.get("transformer_depth"), list):
        tl = u["transformer_layers_per_block"]
        up["transformer_depth"] = list(tl) if isinstance(tl, list) else [tl] * len(boc)
    elif "transformer_layers_per_block" in u:
        up["transformer_depth"] = u["transformer_layers_per_block"]
    if "adm_in_channels" in up:
        up["adm_in_channels"] = u["projection_class_embeddings_input_dim"]
        for emb in params["conditioner_config"]["params"]["emb_models"]:
            if "outdim" in emb.get("params", {}):  # the time-id embedders
                emb["params"]["outdim"] = u["addition_time_embed_dim"]
    dd = params["first_stage_config"]["params"]["ddconfig"]
    vb = v["block_out_channels"]
    dd["ch"] = vb[0]
    dd["ch_mult"] = [c // vb[0] for c in vb]
    dd["num_res_blocks"] = v["layers_per_block"]
    head = f"# Tiny test config for family {family} (random weights), derived from {get_family(family).ldm_yaml.name}\n"
    return head + pyyaml.safe_dump(conf, sort_keys=False)


def make_checkpoint(path, family: str, *, fmt: str = "safetensors", yaml: bool = False, seed: int = 0,
                    unet_block_out_channels=None, te_width=None, te_layers=None, addition_time_embed_dim=None,
                    dtype: torch.dtype | None = None) -> TinyCheckpoint:
    """Write a tiny A1111-layout checkpoint for `family` at `path`.

    Also writes the tiny diffusers config dir `<stem>.tiny-config/` beside it and,
    with yaml=True, a same-stem sidecar `.yaml` holding the tiny LDM values.
    fmt="ckpt" pickles {"state_dict": sd} with torch.save.
    """
    path = Path(path)
    get_family(family)
    cfgs = tiny_configs(family, unet_block_out_channels=unet_block_out_channels,
                        te_width=te_width, te_layers=te_layers, addition_time_embed_dim=addition_time_embed_dim)
    models = build_components(cfgs, seed=seed, dtype=dtype)
    ldm = components_to_ldm(family, models, cfgs, seed=seed)
    _save(ldm, path, fmt)
    config_dir = _write_config_dir(cfgs, path.parent / f"{path.stem}.tiny-config", family, False)
    yaml_path = None
    if yaml:
        yaml_path = path.with_suffix(".yaml")
        yaml_path.write_text(_tiny_yaml(family, cfgs), encoding="utf-8")
    return TinyCheckpoint(
        path=path, family=family, config_dir=config_dir, ldm_state_dict=ldm,
        diffusers_state_dicts={c: {k: v.detach().clone() for k, v in m.state_dict().items()}
                               for c, m in models.items()},
        yaml_path=yaml_path,
    )


def make_vae_file(path, family: str = "sd1", *, fmt: str = "safetensors", prefixed: bool = False,
                  seed: int = 1) -> TinyCheckpoint:
    """A standalone tiny VAE (models/VAE style): LDM VAE keys, no `first_stage_model.` prefix
    unless prefixed=True. config_dir is a tiny config dir whose vae/ matches."""
    path = Path(path)
    cfgs = tiny_configs(family)
    vae = build_components({"vae": cfgs["vae"]}, seed=seed)["vae"]
    prefix = "first_stage_model." if prefixed else ""
    ldm = {prefix + k: v.detach().clone().contiguous()
           for k, v in vae_to_ldm(vae.state_dict(), cfgs["vae"]).items()}
    _save(ldm, path, fmt)
    config_dir = _write_config_dir(cfgs, path.parent / f"{path.stem}.tiny-config", family, False)
    return TinyCheckpoint(path=path, family=family, config_dir=config_dir, ldm_state_dict=ldm,
                          diffusers_state_dicts={"vae": {k: v.clone() for k, v in vae.state_dict().items()}})


_UNSUPPORTED_KEYS = {
    # Flux (BFL single file): double/single stream blocks.
    "flux": ["model.diffusion_model.double_blocks.0.img_attn.norm.key_norm.scale",
             "model.diffusion_model.double_blocks.0.img_attn.qkv.weight",
             "model.diffusion_model.single_blocks.0.linear1.weight",
             "model.diffusion_model.img_in.weight", "model.diffusion_model.guidance_in.in_layer.bias"],
    # SD3 MMDiT.
    "sd3": ["model.diffusion_model.joint_blocks.0.context_block.adaLN_modulation.1.bias",
            "model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight",
            "model.diffusion_model.pos_embed"],
    # kohya-style LoRA for SD1.
    "lora": ["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight",
             "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight",
             "lora_unet_down_blocks_0_attentions_0_proj_in.alpha",
             "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight",
             "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight",
             "lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha"],
    # Something that is not a diffusion model at all (listed in sorted order, as files store them).
    "random": ["encoder.layer.0.weight", "encoder.layer.1.weight", "head.weight"],
}


def make_unsupported_file(path, kind: str = "random", *, fmt: str = "safetensors", seed: int = 0) -> dict:
    """Write a small file whose keys look like `kind` ("flux", "sd3", "lora", "random").

    The tensors are tiny placeholders: enough for key-based detection, not loadable.
    Returns the state dict written.
    """
    if kind not in _UNSUPPORTED_KEYS:
        raise ValueError(f"kind must be one of {sorted(_UNSUPPORTED_KEYS)}")
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for k in _UNSUPPORTED_KEYS[kind]:
        sd[k] = torch.tensor(1.0) if k.endswith(".alpha") else torch.randn(4, 4, generator=gen)
    _save(sd, Path(path), fmt)
    return sd


def copy_checkpoint(ckpt: TinyCheckpoint, dest) -> TinyCheckpoint:
    """Copy a made checkpoint (file, config dir, sidecar) to a new path; cheaper than remaking."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(ckpt.path, dest)
    cdir = dest.parent / f"{dest.stem}.tiny-config"
    shutil.copytree(ckpt.config_dir, cdir, dirs_exist_ok=True)
    ypath = None
    if ckpt.yaml_path is not None:
        ypath = dest.with_suffix(".yaml")
        shutil.copyfile(ckpt.yaml_path, ypath)
    new = copy.copy(ckpt)
    new.path, new.config_dir, new.yaml_path = dest, cdir, ypath
    return new


def fp16_checkpoint(dest: Path) -> Path:
    """The tiny SD1 fixture saved in fp16, as most downloaded checkpoints are."""
    import safetensors.torch

    ckpt = make_checkpoint(dest, "sd1")
    state = safetensors.torch.load_file(str(ckpt.path))
    safetensors.torch.save_file({k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in state.items()},
                                str(ckpt.path))
    return ckpt.path

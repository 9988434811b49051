"""The MiDaS depth estimator inside an SD2 depth checkpoint, run as transformers' DPTForDepthEstimation.

Stability's ``512-depth-ema.ckpt`` carries the estimator it was trained with: ldm's
``LatentDepth2ImageDiffusion.depth_model`` is ``MiDaSInference(model_type="dpt_hybrid")``, i.e. MiDaS's
DPT-Hybrid (timm's ``vit_base_resnet50_384``: a BiT/ResNetV2 stem, then a ViT-B/16; MiDaS's
reassemble/fusion neck and depth head), stored under ``depth_model.model.*``. With it, depth2img needs
no other file.

The weights are taken out of the checkpoint's state dict as it is read (weights_io's safe reader;
nothing is unpickled twice), renamed to transformers' DPT-Hybrid layout and assigned to a
``DPTForDepthEstimation`` built on the meta device from the shipped ``configs/depth/dpt-hybrid-midas``
(Intel/dpt-hybrid-midas's config, the model diffusers' StableDiffusionDepth2ImgPipeline uses). The sizes
the tensors fix (widths, depths, grid) are read from them (for 512-depth-ema.ckpt they are the shipped
values; tiny test files take the same path); the rest (heads, norms, activations) comes from the
shipped config. The tensors stay with the loaded model (about 0.5 GB in the real file's float32) and
become the model's own on first use. Preprocessing is that pipeline's
DPTImageProcessor: the image resized (bicubic) to 384x384 and normalised to [-1, 1]. ldm's own
transform keeps the aspect ratio (multiple of 32), which transformers' DPT-Hybrid cannot take (it
accepts only its configured square size).

Incomplete or damaged ``depth_model.*`` weights: the checkpoint is used without its estimator (a depth
map or an estimator folder is then needed, and the refusal says why the embedded one was not used).
"""
from __future__ import annotations

import hashlib
import json
import re
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from PIL import Image

PREFIX = "depth_model."
MODEL_PREFIX = "depth_model.model."
CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "depth" / "dpt-hybrid-midas"
# timm's ImageNet classifier on the ViT: MiDaS never runs it (transformers' conversion drops it too).
UNUSED = frozenset({"pretrained.model.head.weight", "pretrained.model.head.bias"})
_RESULT_CACHE = 4
MAX_IMAGE_SIZE = 1024  # DPT-Hybrid runs at 384


# ---------------------------------------------------------------- names
# Hand-written: no library converts this layout (transformers' convert_dpt_hybrid_to_pytorch.py is a
# script, not an API). The renames follow that script's facts: timm ViT blocks -> DPT encoder layers
# (qkv split into query/key/value), the ResNetV2 stem/stages -> BiT embedder/stages, MiDaS's
# act_postprocess{n} -> reassemble stage n-1, layer{n}_rn -> neck.convs.{n-1}, refinenet{n} ->
# fusion layer 4-n (the fusion runs deepest first), output_conv -> the depth head.

_VIT = "pretrained.model."
_BIT = _VIT + "patch_embed.backbone."
_BLOCK_PARTS = {"norm1": "layernorm_before", "norm2": "layernorm_after", "attn.proj": "attention.output.dense",
                "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense"}
_RULES: list[tuple[re.Pattern[str], Any]] = [
    (re.compile(r"pretrained\.model\.cls_token"), lambda m: "dpt.embeddings.cls_token"),
    (re.compile(r"pretrained\.model\.pos_embed"), lambda m: "dpt.embeddings.position_embeddings"),
    (re.compile(r"pretrained\.model\.patch_embed\.proj\.(weight|bias)"), lambda m: f"dpt.embeddings.projection.{m[1]}"),
    (re.compile(r"pretrained\.model\.patch_embed\.backbone\.stem\.(conv|norm)\.(weight|bias)"),
     lambda m: f"dpt.embeddings.backbone.bit.embedder.{'convolution' if m[1] == 'conv' else 'norm'}.{m[2]}"),
    (re.compile(r"pretrained\.model\.patch_embed\.backbone\.stages\.(\d+)\.blocks\.(\d+)\."
                r"((?:downsample\.)?(?:conv|norm)\d?\.(?:weight|bias))"),
     lambda m: f"dpt.embeddings.backbone.bit.encoder.stages.{m[1]}.layers.{m[2]}.{m[3]}"),
    (re.compile(r"pretrained\.model\.blocks\.(\d+)\.(norm1|norm2|attn\.proj|mlp\.fc1|mlp\.fc2)\.(weight|bias)"),
     lambda m: f"dpt.encoder.layer.{m[1]}.{_BLOCK_PARTS[m[2]]}.{m[3]}"),
    (re.compile(r"pretrained\.model\.norm\.(weight|bias)"), lambda m: f"dpt.layernorm.{m[1]}"),
    (re.compile(r"pretrained\.act_postprocess([1-4])\.0\.project\.0\.(weight|bias)"),
     lambda m: f"neck.reassemble_stage.readout_projects.{int(m[1]) - 1}.0.{m[2]}"),
    (re.compile(r"pretrained\.act_postprocess([1-4])\.([34])\.(weight|bias)"),
     lambda m: f"neck.reassemble_stage.layers.{int(m[1]) - 1}.{'projection' if m[2] == '3' else 'resize'}.{m[3]}"),
    (re.compile(r"scratch\.layer([1-4])_rn\.weight"), lambda m: f"neck.convs.{int(m[1]) - 1}.weight"),
    (re.compile(r"scratch\.refinenet([1-4])\.out_conv\.(weight|bias)"),
     lambda m: f"neck.fusion_stage.layers.{4 - int(m[1])}.projection.{m[2]}"),
    (re.compile(r"scratch\.refinenet([1-4])\.resConfUnit([12])\.conv([12])\.(weight|bias)"),
     lambda m: f"neck.fusion_stage.layers.{4 - int(m[1])}.residual_layer{m[2]}.convolution{m[3]}.{m[4]}"),
    (re.compile(r"scratch\.output_conv\.([024])\.(weight|bias)"), lambda m: f"head.head.{m[1]}.{m[2]}"),
]
_QKV = re.compile(r"pretrained\.model\.blocks\.(\d+)\.attn\.qkv\.(weight|bias)")


def transformers_names(name: str) -> list[str] | None:
    """The DPTForDepthEstimation parameter name(s) of one MiDaS/timm key (without ``depth_model.model.``):
    three for a fused qkv (query, key, value, in that order), [] for a key MiDaS never uses, None when
    the key is not part of DPT-Hybrid."""
    if name in UNUSED:
        return []
    qkv = _QKV.fullmatch(name)
    if qkv:
        return [f"dpt.encoder.layer.{qkv[1]}.attention.attention.{part}.{qkv[2]}" for part in ("query", "key", "value")]
    for pattern, rename in _RULES:
        match = pattern.fullmatch(name)
        if match:
            return [rename(match)]
    return None


def convert(midas: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """(transformers state dict, keys that are not DPT-Hybrid's). Views of the source tensors: no copy."""
    out: dict[str, Any] = {}
    unknown = []
    for name, tensor in midas.items():
        targets = transformers_names(name)
        if targets is None:
            unknown.append(name)
        elif len(targets) == 3 and (tensor.dim() == 0 or tensor.shape[0] % 3):
            unknown.append(f"{name} of shape {tuple(tensor.shape)}")  # no query/key/value in it
        elif len(targets) == 3:
            for target, part in zip(targets, tensor.chunk(3, dim=0)):
                out[target] = part
        elif targets:
            out[targets[0]] = tensor
    return out, unknown


# ---------------------------------------------------------------- config


def shipped_config() -> dict[str, Any]:
    return json.loads((CONFIG_DIR / "config.json").read_text(encoding="utf-8"))


def config_for(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
    """The shipped config with the sizes these (transformers-named) tensors fix. KeyError: a tensor
    the sizes are read from is missing."""
    cfg = shipped_config()
    bit = dict(cfg["backbone_config"])
    hidden = shapes["dpt.embeddings.cls_token"][-1]
    grid = round((shapes["dpt.embeddings.position_embeddings"][1] - 1) ** 0.5)
    stage = "dpt.embeddings.backbone.bit.encoder.stages.{}.layers.{}.conv3.weight"
    depths = [_count(shapes, re.escape(stage.format(s, "N")).replace("N", r"\d+")) for s in range(len(bit["depths"]))]
    widths = [shapes[stage.format(s, 0)][0] for s in range(len(depths))]
    bit.update(embedding_size=shapes["dpt.embeddings.backbone.bit.embedder.convolution.weight"][0],
               depths=depths, hidden_sizes=widths + bit["hidden_sizes"][len(widths):])
    cfg.update(hidden_size=hidden, image_size=grid * cfg["patch_size"],
               num_hidden_layers=_count(shapes, r"dpt\.encoder\.layer\.\d+\.output\.dense\.weight"),
               intermediate_size=shapes["dpt.encoder.layer.0.intermediate.dense.weight"][0],
               backbone_featmap_shape=[1, widths[-1], grid, grid], backbone_config=bit,
               neck_hidden_sizes=[shapes[f"neck.convs.{i}.weight"][1] for i in range(4)],
               fusion_hidden_size=shapes["neck.convs.0.weight"][0])
    return cfg


def _count(shapes: Mapping[str, Any], pattern: str) -> int:
    return sum(1 for k in shapes if re.fullmatch(pattern, k))


def build_empty(cfg: Mapping[str, Any]) -> Any:
    """DPTForDepthEstimation with its parameters on the meta device (nothing allocated, no init)."""
    from accelerate import init_empty_weights
    from transformers import DPTConfig, DPTForDepthEstimation

    with init_empty_weights():
        return DPTForDepthEstimation(DPTConfig.from_dict(dict(cfg)))


def check(weights: Mapping[str, Any], unknown: list[str]) -> tuple[dict[str, Any] | None, str | None]:
    """(config, None) when these transformers-named weights are exactly a DPT-Hybrid, else (None, why)."""
    try:
        cfg = config_for({k: tuple(v.shape) for k, v in weights.items()})
        if not 16 <= cfg["image_size"] <= MAX_IMAGE_SIZE:  # the input is resized to it: bound it
            return None, f"their input size {cfg['image_size']} is not that of a MiDaS model"
        expected = {k: tuple(v.shape) for k, v in build_empty(cfg).state_dict().items()}
    except KeyError as exc:  # a tensor the sizes are read from
        return None, f"they are incomplete ({len(weights)} tensors; no {exc.args[0]})"
    except Exception as exc:  # shapes that make no DPT-Hybrid
        return None, f"they are not MiDaS DPT-Hybrid weights ({type(exc).__name__}: {exc})"
    missing = sorted(set(expected) - set(weights))
    wrong = sorted(k for k in expected.keys() & weights.keys() if tuple(weights[k].shape) != expected[k])
    if missing or wrong or unknown:
        parts = [f"{len(v)} {what} (e.g. {v[0]})" for what, v in
                 (("missing", missing), ("misshapen", wrong), ("unknown", unknown)) if v]
        return None, "they are incomplete: " + ", ".join(parts)
    return cfg, None


# ---------------------------------------------------------------- the estimator


class EmbeddedMidas:
    """A checkpoint's MiDaS weights; the model is built on first use and kept (one lock around it)."""

    def __init__(self, tensors: Mapping[str, Any], source: str = "the checkpoint"):
        midas = {k[len(MODEL_PREFIX):]: v for k, v in tensors.items() if k.startswith(MODEL_PREFIX)}
        self._weights, unknown = convert(midas)
        unknown += [k for k in tensors if not k.startswith(MODEL_PREFIX)]
        self.source = source
        self._config, self.problem = check(self._weights, unknown)
        if self.problem:
            self._weights = {}  # never used: do not keep the tensors
        self._lock = threading.RLock()
        self._model: Any = None
        self._results: OrderedDict[tuple, np.ndarray] = OrderedDict()

    @property
    def usable(self) -> bool:
        return self.problem is None

    def describe_problem(self) -> str:
        return f"the MiDaS depth weights in {self.source} (depth_model.*) are not used: {self.problem}"

    def estimate_raw(self, image: Image.Image, device: Any = None, park: bool = False) -> np.ndarray:
        """float32 [h, w] nearness at the model's resolution (what diffusers' depth2img resizes), run on
        `device` (None: where the model is); `park`: move the model back to the CPU afterwards."""
        rgb = image.convert("RGB")
        key = (rgb.size, hashlib.sha1(rgb.tobytes()).hexdigest())
        with self._lock:
            if key in self._results:
                self._results.move_to_end(key)
                return self._results[key].copy()
            model, processor = self._ready(device)
            try:
                depth = _predict(model, processor, rgb)
            finally:
                if park:
                    model.to("cpu")
            self._results[key] = depth
            while len(self._results) > _RESULT_CACHE:
                self._results.popitem(last=False)
            return depth.copy()

    def _ready(self, device: Any) -> tuple[Any, Any]:
        if not self.usable:
            raise RuntimeError(self.describe_problem())
        if self._model is None:
            self._model = (_assign(build_empty(self._config), self._weights), _processor(self._config["image_size"]))
            self._weights = {}  # the model owns the tensors now
        model, processor = self._model
        if device is not None and next(model.parameters()).device != _torch_device(device):
            model.to(device)
        return model, processor

    def release(self) -> None:
        with self._lock:
            self._model = None
            self._weights = {}
            self._results.clear()


def take(state_dict: dict[str, Any], source: str = "the checkpoint") -> EmbeddedMidas | None:
    """Pop the ``depth_model.*`` tensors out of a checkpoint's state dict (the diffusers pipeline has
    no place for them); None when there are none."""
    keys = [k for k in state_dict if k.startswith(PREFIX)]
    if not keys:
        return None
    return EmbeddedMidas({k: state_dict.pop(k) for k in keys}, source)


def load_status(embedded: EmbeddedMidas | None) -> str:
    """The loaded depth model's status line."""
    if embedded is not None and embedded.usable:
        return ("ready for img2img: the init image's depth comes from a supplied depth map, an estimator in "
                "models/depth/, or else the MiDaS model inside the checkpoint")
    why = f" ({embedded.describe_problem()})" if embedded is not None else ""
    return ("ready for img2img: the init image's depth comes from a supplied depth map or the depth "
            f"estimator in models/depth/{why}")


def of(model: Any) -> EmbeddedMidas | None:
    """The usable embedded estimator of a loaded model, else None."""
    embedded = getattr(model, "embedded_depth", None)
    return embedded if embedded is not None and embedded.usable else None


# ---------------------------------------------------------------- torch


def _torch_device(device: Any) -> Any:
    import torch

    return torch.device(device)


def _assign(model: Any, weights: dict[str, Any]) -> Any:
    """Strict load by assignment, in float32 (DPT-Hybrid is small; its norms are not fp16-safe)."""
    import torch

    weights = {k: v.to(torch.float32) for k, v in weights.items()}
    model.load_state_dict(weights, strict=True, assign=True)  # the keys and shapes were checked at load
    model.requires_grad_(False)
    return model.eval()


def _processor(image_size: int) -> Any:
    from transformers import DPTImageProcessorPil

    return DPTImageProcessorPil.from_pretrained(str(CONFIG_DIR), local_files_only=True,
                                                size={"height": image_size, "width": image_size})


def _predict(model: Any, processor: Any, image: Image.Image) -> np.ndarray:
    import torch

    device = next(model.parameters()).device
    pixels = processor(images=image, return_tensors="pt")["pixel_values"].to(device=device, dtype=torch.float32)
    with torch.inference_mode():
        depth = model(pixel_values=pixels).predicted_depth
    return depth[0].float().cpu().numpy().astype(np.float32)

"""Tiny random-weight depth estimators saved as real transformers folders (config.json +
model.safetensors, as save_pretrained writes them): a DPT-Hybrid (MiDaS v3) and a Depth
Anything (V2 layout: a DINOv2 backbone). Anything they estimate is noise, but the loading path and
the tensor shapes are the real ones."""
from __future__ import annotations

from pathlib import Path

import torch


def _processor(size: int, multiple: int = 1):
    from transformers import DPTImageProcessorPil

    # Small inputs keep the tests fast; the folder's preprocessor_config.json is read like a real one's.
    return DPTImageProcessorPil(size={"height": size, "width": size}, ensure_multiple_of=multiple,
                                image_mean=[0.5] * 3, image_std=[0.5] * 3)


def make_tiny_dpt(folder: Path, *, seed: int = 0) -> Path:
    """DPT-Hybrid, the MiDaS model SD2 depth was trained with: a BiT (ResNet) stem, then a ViT."""
    from transformers import BitConfig, DPTConfig, DPTForDepthEstimation

    torch.manual_seed(seed)
    backbone = BitConfig(global_padding="same", layer_type="bottleneck", depths=[1, 1, 1], hidden_sizes=[8, 16, 32],
                         embedding_size=8, num_groups=2, embedding_dynamic_padding=True,
                         out_features=["stage1", "stage2", "stage3"])
    config = DPTConfig(is_hybrid=True, backbone_config=backbone, backbone_featmap_shape=[1, 32, 4, 4], hidden_size=32,
                       num_hidden_layers=4, num_attention_heads=2, intermediate_size=37, image_size=64, patch_size=16,
                       neck_hidden_sizes=[8, 16, 32, 32], fusion_hidden_size=16, backbone_out_indices=[0, 1, 2, 3],
                       readout_type="project")
    DPTForDepthEstimation(config).eval().save_pretrained(folder)
    _processor(64).save_pretrained(folder)  # DPT-Hybrid takes exactly its configured size
    return Path(folder)


def make_tiny_depth_anything(folder: Path, *, seed: int = 0) -> Path:
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config

    torch.manual_seed(seed)
    backbone = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
                            image_size=28, patch_size=14, out_features=["stage1", "stage2"],
                            reshape_hidden_states=False)
    config = DepthAnythingConfig(backbone_config=backbone, reassemble_hidden_size=32, neck_hidden_sizes=[16, 32],
                                 fusion_hidden_size=16, head_hidden_size=8, patch_size=14, reassemble_factors=[2, 1])
    model = DepthAnythingForDepthEstimation(config).eval()
    with torch.no_grad():  # random heads end in a ReLU that zeroes almost everything: make the output vary
        model.head.conv3.bias.fill_(1.0)
    model.save_pretrained(folder)
    _processor(56, multiple=14).save_pretrained(folder)
    return Path(folder)

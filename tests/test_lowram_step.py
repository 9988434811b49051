"""Low-RAM mode's per-call cost on the tiny model: the shared fp32 workspace is allocated once per UNet
call, at the size of the largest upcast layer, and the result is unchanged."""
from __future__ import annotations

import torch

from modules.models import precision
from modules.models.devices import cpu_policy
from modules.models.loader import load_checkpoint
from tiny_models import fp16_checkpoint


def _own_floats(module: torch.nn.Module) -> int:
    return sum(t.numel() for t in (*module.parameters(recurse=False), *module.buffers(recurse=False))
               if t.is_floating_point())


def test_the_workspace_is_made_once_per_call_at_the_largest_layers_size(tmp_path, monkeypatch):
    path = fp16_checkpoint(tmp_path / "a.safetensors")
    normal, low = load_checkpoint(path, cpu_policy()), load_checkpoint(path, cpu_policy(lowram=True))
    for model in (normal, low):
        model.wait_materialised()
    unet = low.components["unet"]
    workspace = unet.conv_in._diffusers_hook.get_hook("layerwise_casting").workspace
    layers = [m for m in unet.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    largest = max(_own_floats(m) for m in layers)
    assert workspace.capacity == largest and _own_floats(unet.conv_in) < largest  # conv_in is not the largest

    made: list[int] = []
    real_empty = torch.empty

    def counting_empty(*size, **kwargs):
        out = real_empty(*size, **kwargs)
        if kwargs.get("dtype") == torch.float32 and out.numel() > 0:
            made.append(out.numel())
        return out
    monkeypatch.setattr(precision.torch, "empty", counting_empty)
    x, emb = torch.randn(2, 4, 8, 8), torch.randn(2, 77, unet.config.cross_attention_dim)
    with torch.inference_mode():
        first = unet(x, 10, emb).sample
        second = unet(x, 10, emb).sample
        reference = normal.components["unet"](x, 10, emb).sample
    assert made == [largest, largest]  # one buffer per call, never regrown
    assert workspace.buffer.numel() == 0  # and none held between calls
    assert torch.equal(first, second) and torch.allclose(first, reference, atol=2e-3)

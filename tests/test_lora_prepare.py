"""prepare_plain's per-tensor sum finiteness check: finite values that overflow the sum are still merged, and a
NaN or infinite value fails only its own layer."""
from __future__ import annotations

import pytest
import torch

from modules.engine.networks import deltas


def layer(value: float | None = None, dtype=torch.float16) -> dict[str, torch.Tensor]:
    up, down = torch.randn(8, 2), torch.randn(2, 6)
    if value is not None:
        up[3, 1] = value
    return {"lora_up.weight": up.to(dtype), "lora_down.weight": down.to(dtype), "alpha": torch.tensor(1.0)}


def test_finite_values_that_overflow_the_sum_are_kept():
    huge = {"lora_up.weight": torch.full((4, 2), 3e38), "lora_down.weight": torch.full((2, 3), 3e38)}
    assert not torch.isfinite(torch.cat([huge["lora_up.weight"].reshape(-1)]).sum())
    prepared = deltas.prepare_plain({"a": huge, "b": layer()})
    assert prepared["a"] is not None and prepared["b"] is not None
    assert torch.equal(prepared["a"].up, huge["lora_up.weight"])


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_a_non_finite_value_fails_only_its_layer(bad):
    good = layer()
    prepared = deltas.prepare_plain({"good": good, "bad": layer(bad), "other": layer(dtype=torch.float32)})
    assert prepared["bad"] is None
    assert torch.equal(prepared["good"].up, good["lora_up.weight"])
    assert prepared["other"] is not None


def test_all_finite_file_prepares_every_layer():
    groups = {f"l{i}": layer() for i in range(5)}
    prepared = deltas.prepare_plain(groups)
    assert all(prepared[k] is not None and torch.equal(prepared[k].down, g["lora_down.weight"])
               for k, g in groups.items())

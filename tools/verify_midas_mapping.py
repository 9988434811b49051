"""Check modules/models/midas_embedded.py against the real MiDaS code, at full size (a developer tool).

ldm builds the estimator of SD2 depth checkpoints with timm, which this project does not install (it
pulls torchvision). This tool runs the original code from source checkouts instead: Stability-AI's
stablediffusion (ldm/modules/midas) and timm of the ldm era (v0.6.13; 0.6.12 fails on Python 3.11).
torchvision and cv2 are stubbed: the model code never calls them (only ldm's transforms do).

It builds ``MiDaSInference(model_type="dpt_hybrid")`` with random weights (nothing downloaded), then
  1. prints its depth_model.* names and shapes (``--keys``: the text of tests/midas_dpt_hybrid_keys.txt),
  2. converts that state dict with midas_embedded and compares both models' depth on a random input.

Usage:  python tools/verify_midas_mapping.py --ldm SD_CHECKOUT --timm TIMM_CHECKOUT [--keys]
Takes about 1-2 minutes and ~2 GB of RAM on a CPU.
"""
from __future__ import annotations

import argparse
import importlib.abc
import importlib.machinery
import sys
import types
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
STUBBED = ("torchvision", "cv2")


class _Anything(types.ModuleType):
    """A module whose every attribute is another such module, callable: enough for import-time use."""

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Anything(f"{self.__name__}.{name}")

    def __call__(self, *args, **kwargs):
        return _Anything("call")


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in STUBBED:
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _Anything(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        pass


def build_reference(ldm_dir: Path, timm_dir: Path):
    finder = _StubFinder()
    sys.meta_path.insert(0, finder)
    sys.path[:0] = [str(timm_dir), str(ldm_dir)]
    try:
        from ldm.modules.midas import api

        api.ISL_PATHS["dpt_hybrid"] = None  # structure only: no MiDaS weights file
        return api.MiDaSInference(model_type="dpt_hybrid").eval()
    finally:  # transformers probes torchvision: it must not find the stub
        sys.meta_path.remove(finder)
        for name in [n for n in sys.modules if n.split(".")[0] in STUBBED]:
            del sys.modules[name]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ldm", type=Path, required=True, help="a checkout of Stability-AI/stablediffusion")
    parser.add_argument("--timm", type=Path, required=True, help="a checkout of pytorch-image-models (v0.6.13)")
    parser.add_argument("--keys", action="store_true", help="print the depth_model.* names and shapes only")
    args = parser.parse_args()

    import torch

    torch.manual_seed(0)
    reference = build_reference(args.ldm, args.timm)
    state = {"depth_model." + k: v for k, v in reference.state_dict().items()}
    if args.keys:
        for name, tensor in state.items():
            print(f"{name}\t{list(tensor.shape)}")
        return 0

    sys.path.insert(0, str(REPO))
    from modules.models import midas_embedded

    with torch.no_grad():  # random weights end in a ReLU: lift the last bias so the depth is not all zeros
        reference.model.scratch.output_conv[4].bias.fill_(0.5)
    state = {"depth_model." + k: v for k, v in reference.state_dict().items()}
    embedded = midas_embedded.EmbeddedMidas(state, "ldm MiDaSInference")
    if not embedded.usable:
        print("NOT USABLE:", embedded.describe_problem())
        return 1
    ours, _processor = embedded._ready("cpu")
    pixels = torch.rand(1, 3, 384, 384) * 2 - 1
    with torch.no_grad():
        expected = reference(pixels)[:, 0]
        got = ours(pixel_values=pixels).predicted_depth
    diff = float((expected - got).abs().max())
    print(f"keys: {len(state)}; depth std ldm {float(expected.std()):.6g}, ours {float(got.std()):.6g}; "
          f"max |diff| {diff:.3g} ({diff / float(expected.abs().max()):.3g} of the max)")
    return 0 if diff <= 1e-4 * float(expected.abs().max()) else 1


if __name__ == "__main__":
    sys.exit(main())

"""Checkpoint load time: ours (identify + per-component build) vs raw safetensors.load_file +
diffusers' from_single_file with the same shipped config dir, in one run.

    venv/bin/python bench/load.py [--size tiny|full] [--runs 3]

Prints seconds and the ratio ours/raw; asserts nothing.
"""
from __future__ import annotations

import argparse
import gc
import statistics
import tempfile
from pathlib import Path

from common import ROOT, Timer, make_sd1_checkpoint


def load_ours(path: Path):
    from modules.models.devices import cpu_policy
    from modules.models.loader import load_checkpoint

    return load_checkpoint(path, cpu_policy())


def load_raw(path: Path, config_dir: Path):
    from diffusers import StableDiffusionPipeline

    from modules.models.families import load_tokenizers

    # diffusers reads the file with safetensors itself (load_file), then builds every component
    return StableDiffusionPipeline.from_single_file(str(path), config=str(config_dir), local_files_only=True,
                                                    safety_checker=None, requires_safety_checker=False,
                                                    **load_tokenizers("sd1"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", choices=("tiny", "full"), default="tiny")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--dir", default=None, help="keep the generated checkpoint here between runs")
    args = parser.parse_args()
    import torch

    torch.set_grad_enabled(False)
    workdir = Path(args.dir) if args.dir else Path(tempfile.mkdtemp())
    workdir.mkdir(parents=True, exist_ok=True)
    path = make_sd1_checkpoint(workdir, args.size)
    config_dir = path.with_suffix("").with_name(path.stem + ".tiny-config") if args.size == "tiny" else ROOT / "configs/diffusers/sd1"
    ours, raw = [], []
    for _ in range(args.runs):
        for fn, out in ((lambda: load_raw(path, config_dir), raw), (lambda: load_ours(path), ours)):
            with Timer() as t:
                model = fn()
            out.append(t.seconds)
            del model
            gc.collect()
    o, r = statistics.median(ours), statistics.median(raw)
    print(f"{args.size} SD1 checkpoint ({path.stat().st_size / 2**20:.1f} MiB), median of {args.runs} runs:")
    print(f"  ours (identify + build): {o:.2f}s")
    print(f"  raw diffusers from_single_file (safetensors load + build): {r:.2f}s")
    print(f"  ratio ours/raw: {o / r:.2f}x")


if __name__ == "__main__":
    main()

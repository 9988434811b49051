"""reference_only cost: per-step time of our loop with one reference_only unit ÷ without, in one run.

    flock /tmp/bench.lock venv/bin/python bench/controlnet_reference.py --size full --res 256 --steps 1 2 \
        --dir /work/bench-cache [--ckpt /work/bench-cache/full-fp16-sd1.safetensors]

The extension's method costs one extra UNet pass of the reference per UNet call (same rows, same
prompts) plus self-attention over twice the tokens, so expect about 2x; there is no diffusers peer in
the installed package (its reference pipelines are community examples). Same sampler (Euler), CFG 7,
seed and reference image in both runs; seconds per step from the difference of two step counts.
Prints the ratio; asserts nothing.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from common import make_sd1_checkpoint
from controlnet import control_image
from txt2img import PROMPT, measure


def runners(ckpt: Path, data_dir: Path, res: int):
    from modules.core.controlnet_units import ControlNetUnit
    from modules.core.flags import parse_args
    from modules.core.options import Options, default_templates
    from modules.core.paths import AppPaths
    from modules.core.pipeline import Txt2ImgParams
    from modules.services import build_services

    opts = parse_args(["--data-dir", str(data_dir), "--ckpt", str(ckpt)], env={}).opts
    paths = AppPaths.from_opts(opts)
    paths.ensure_user_dirs()
    options = Options(paths.config_file, default_templates())
    options.set("samples_save", False)
    options.set("live_previews_enable", False)
    services = build_services(opts, paths, options)
    image = control_image(res)

    def run(steps: int, with_unit: bool):
        units = [ControlNetUnit(module="reference_only", model="None", image=image)] if with_unit else []
        return services.generation.txt2img(Txt2ImgParams(prompt=PROMPT, steps=steps, width=res, height=res, seed=1,
                                                         sampler_name="Euler", cfg_scale=7.0,
                                                         controlnet_units=units))
    return services, (lambda n: run(n, False)), (lambda n: run(n, True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", choices=("tiny", "full"), default="tiny")
    parser.add_argument("--res", type=int, default=None, help="pixels (default: 64 tiny, 256 full)")
    parser.add_argument("--steps", type=int, nargs=2, default=(1, 2))
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--dir", default=None, help="where the weight files are made and reused")
    parser.add_argument("--ckpt", default=None, help="an existing SD1.5-layout checkpoint to use instead of making one")
    args = parser.parse_args()

    res = args.res or (64 if args.size == "tiny" else 256)
    workdir = Path(args.dir) if args.dir else Path(tempfile.mkdtemp())
    workdir.mkdir(parents=True, exist_ok=True)
    ckpt = Path(args.ckpt) if args.ckpt else make_sd1_checkpoint(workdir, args.size)
    steps = tuple(args.steps)
    services, plain, referenced = runners(ckpt, Path(tempfile.mkdtemp()), res)
    plain_step, plain_total = measure(plain, steps, args.repeats)
    ref_step, ref_total = measure(referenced, steps, args.repeats)
    services.generation.queue.shutdown()
    print(f"{args.size} SD1 + reference_only at {res}x{res}, Euler, CFG 7, steps {steps}, median of {args.repeats}:")
    print(f"  per step: without {plain_step * 1000:.0f} ms, with reference_only {ref_step * 1000:.0f} ms, "
          f"ratio {ref_step / plain_step:.3f}x (expected about 2x: one extra UNet pass)")
    print(f"  {steps[1]} steps end to end: without {plain_total:.2f}s, with {ref_total:.2f}s")


if __name__ == "__main__":
    main()

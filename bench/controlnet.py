"""ControlNet speed: per-step time of our loop with one unit ÷ without (target <= 1.45x: the
ControlNet's own compute), and ÷ diffusers' StableDiffusionControlNetPipeline on the same
checkpoint and ControlNet weights (target <= 1.03x), in one run.

    flock /tmp/bench.lock venv/bin/python bench/controlnet.py --size full --res 256 --steps 1 2 --dir /work/bench-cache \
        [--ckpt /work/bench-cache/full-fp16-sd1.safetensors]

Same sampler (Euler), CFG 7, seed and control image everywhere. Seconds per step come from the
difference between two step counts (loading, text encoding and VAE decoding cancel out).
`--size full` uses random weights with the real SD1.5 / ControlNet-SD1.5 shapes (files are made once
in --dir and reused). Prints the ratios; asserts nothing.
"""
from __future__ import annotations

import argparse
import gc
import json
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from common import ROOT, make_sd1_checkpoint
from txt2img import PROMPT, measure


def make_controlnet_file(dest: Path, size: str) -> Path:
    """An SD1.5 ControlNet in lllyasviel's single-file layout: the tiny fixture, or random weights with the real shapes."""
    import torch
    from safetensors.torch import save_file

    import tiny_controlnets

    path = dest / f"{size}-controlnet-sd1.safetensors"
    if path.exists():
        return path
    if size == "tiny":
        tiny_controlnets.make_controlnet(path, "sd1")
        return path
    from diffusers import ControlNetModel

    cfg = json.loads((ROOT / "configs/controlnet/sd1/config.json").read_text())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = ControlNetModel.from_config(cfg)
    state = tiny_controlnets.controlnet_to_ldm(model.state_dict(), dict(model.config))
    save_file({k: v.to(torch.float16).contiguous() for k, v in state.items()}, str(path))
    return path


def control_image(res: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 255, (res, res, 3), dtype=np.uint8))


def ours_runners(ckpt: Path, cn_file: Path, data_dir: Path, res: int):
    from modules.core.controlnet_units import ControlNetUnit
    from modules.core.flags import parse_args
    from modules.core.options import Options, default_templates
    from modules.core.paths import AppPaths
    from modules.core.pipeline import Txt2ImgParams
    from modules.services import build_services

    opts = parse_args(["--data-dir", str(data_dir), "--ckpt", str(ckpt), "--controlnet-dir", str(cn_file.parent)],
                      env={}).opts
    paths = AppPaths.from_opts(opts)
    paths.ensure_user_dirs()
    options = Options(paths.config_file, default_templates())
    options.set("samples_save", False)
    options.set("live_previews_enable", False)
    services = build_services(opts, paths, options)
    image = control_image(res)

    def run(steps: int, with_unit: bool):
        units = [ControlNetUnit(model=cn_file.stem, image=image, module="none")] if with_unit else []
        return services.generation.txt2img(Txt2ImgParams(prompt=PROMPT, steps=steps, width=res, height=res, seed=1,
                                                         sampler_name="Euler", cfg_scale=7.0,
                                                         controlnet_units=units))
    return services, (lambda n: run(n, False)), (lambda n: run(n, True))


def raw_runner(ckpt: Path, cn_file: Path, config_dir: Path, cn_config: Path, res: int, dtype):
    import torch
    from diffusers import ControlNetModel, EulerDiscreteScheduler, StableDiffusionControlNetPipeline

    from modules.models.families import load_tokenizers

    controlnet = ControlNetModel.from_single_file(str(cn_file), config=str(cn_config), local_files_only=True,
                                                  torch_dtype=dtype)
    pipe = StableDiffusionControlNetPipeline.from_single_file(
        str(ckpt), config=str(config_dir), local_files_only=True, controlnet=controlnet, safety_checker=None,
        requires_safety_checker=False, torch_dtype=dtype, **load_tokenizers("sd1"))
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    image = control_image(res)

    def run(steps: int):
        return pipe(PROMPT, image=image, num_inference_steps=steps, guidance_scale=7.0, height=res, width=res,
                    generator=torch.Generator("cpu").manual_seed(1))
    return pipe, run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", choices=("tiny", "full"), default="tiny")
    parser.add_argument("--res", type=int, default=None, help="pixels (default: 64 tiny, 256 full)")
    parser.add_argument("--steps", type=int, nargs=2, default=(1, 2))
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--dir", default=None, help="where the weight files are made and reused")
    parser.add_argument("--ckpt", default=None, help="an existing SD1.5-layout checkpoint to use instead of making one")
    args = parser.parse_args()
    import torch

    res = args.res or (64 if args.size == "tiny" else 256)
    workdir = Path(args.dir) if args.dir else Path(tempfile.mkdtemp())
    workdir.mkdir(parents=True, exist_ok=True)
    ckpt = Path(args.ckpt) if args.ckpt else make_sd1_checkpoint(workdir, args.size)
    cn_file = make_controlnet_file(workdir / "controlnet", args.size)
    steps = tuple(args.steps)

    services, plain, with_unit = ours_runners(ckpt, cn_file, Path(tempfile.mkdtemp()), res)
    plain_step, _ = measure(plain, steps, args.repeats)
    unit_step, unit_total = measure(with_unit, steps, args.repeats)
    services.generation.queue.shutdown()
    services.models.manager.unload_all() if hasattr(services.models.manager, "unload_all") else None
    del services, plain, with_unit
    gc.collect()

    if args.size == "tiny":
        config_dir = ckpt.with_name(ckpt.stem + ".tiny-config")
        cn_config = cn_file.with_name(cn_file.stem + ".tiny-config")
    else:
        config_dir, cn_config = ROOT / "configs/diffusers/sd1", ROOT / "configs/controlnet/sd1"
    _pipe, raw = raw_runner(ckpt, cn_file, config_dir, cn_config, res, torch.float32)
    raw_step, raw_total = measure(raw, steps, args.repeats)

    print(f"{args.size} SD1 + ControlNet at {res}x{res}, Euler, CFG 7, cpu float32, steps {steps}, "
          f"median of {args.repeats}:")
    print(f"  per step: ours without a unit {plain_step * 1000:.0f} ms, with one unit {unit_step * 1000:.0f} ms, "
          f"ratio {unit_step / plain_step:.3f}x (target <= 1.45x)")
    print(f"  per step with one unit: ours {unit_step * 1000:.0f} ms, diffusers StableDiffusionControlNetPipeline "
          f"{raw_step * 1000:.0f} ms, ratio {unit_step / raw_step:.3f}x (target <= 1.03x)")
    print(f"  {steps[1]} steps end to end with the unit: ours {unit_total:.2f}s, diffusers {raw_total:.2f}s")


if __name__ == "__main__":
    main()

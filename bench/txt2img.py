"""txt2img speed: our processing path vs a raw diffusers StableDiffusionPipeline, same checkpoint,
sampler (Euler), steps, CFG and seed, in one run.

    venv/bin/python bench/txt2img.py [--size tiny|full] [--res 256] [--steps 8]

Seconds per step are the median over the steps of `--repeats` jobs, timed from the UNet's calls
(common.StepClock), so model loading, text encoding and VAE decoding fall outside; end-to-end time
is reported for a job of the larger step count. The diffusers pipeline runs in a worker thread, as
our queue runs every job (torch's CPU threading differs between the main thread and others).
Prints the ratios (target: <= 1.03x per step); asserts nothing.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from common import (ROOT, StepClock, Timer, build_services, default_cache_dir, in_worker_thread,
                    make_sd1_checkpoint)

PROMPT = "a photograph of an astronaut riding a horse"


def ours_runner(ckpt: Path, data_dir: Path, res: int, device_args: list[str]):
    from modules.core.pipeline import Txt2ImgParams

    services = build_services(ckpt, data_dir, device_args)

    def run(steps: int):
        return services.generation.txt2img(Txt2ImgParams(prompt=PROMPT, steps=steps, width=res, height=res,
                                                         seed=1, sampler_name="Euler", cfg_scale=7.0))
    run(1)  # loads the checkpoint
    return services.models.current().pipe.unet, run


def raw_runner(ckpt: Path, config_dir: Path, res: int, device: str, dtype):
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    from modules.models.families import load_tokenizers

    pipe = StableDiffusionPipeline.from_single_file(str(ckpt), config=str(config_dir), local_files_only=True,
                                                    safety_checker=None, requires_safety_checker=False,
                                                    torch_dtype=dtype, **load_tokenizers("sd1"))
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)

    def run(steps: int):
        return pipe(PROMPT, num_inference_steps=steps, guidance_scale=7.0, height=res, width=res,
                    generator=torch.Generator("cpu").manual_seed(1))
    return pipe.unet, in_worker_thread(run)   # our jobs run in the queue's worker thread: so does this


def measure(unet, run, steps: int, repeats: int) -> tuple[float, float]:
    """(median seconds per step, timed from the UNet's calls (common.StepClock), median seconds of a
    `steps`-step job end to end)."""
    run(1)  # warm-up: first calls allocate and pick kernels
    clock = StepClock(unet)
    totals = []
    for _ in range(repeats):
        with Timer() as t:
            clock.job(run, steps)
        totals.append(t.seconds)
    clock.close()
    return clock.per_step()[0], statistics.median(totals)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", choices=("tiny", "full"), default="tiny")
    parser.add_argument("--res", type=int, default=None, help="pixels (default: 64 tiny, 256 full)")
    parser.add_argument("--steps", type=int, nargs="+", default=[8], help="steps per job (of two numbers, the larger)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where full-size weight files are made once and reused "
                                                    "(default: $BENCH_CACHE or tmp/bench-cache)")
    args = parser.parse_args()
    import torch

    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.float16) if cuda else ("cpu", torch.float32)
    res = args.res or (64 if args.size == "tiny" else 256)
    workdir = Path(args.dir or (default_cache_dir() if args.size == "full" else tempfile.mkdtemp()))
    workdir.mkdir(parents=True, exist_ok=True)
    ckpt = make_sd1_checkpoint(workdir, args.size)
    config_dir = ckpt.with_name(ckpt.stem + ".tiny-config") if args.size == "tiny" else ROOT / "configs/diffusers/sd1"
    raw_step, raw_total = measure(*raw_runner(ckpt, config_dir, res, device, dtype), max(args.steps), args.repeats)
    ours_step, ours_total = measure(*ours_runner(ckpt, workdir / "data", res, []), max(args.steps), args.repeats)
    hi = max(args.steps)
    print(f"{args.size} SD1 at {res}x{res}, Euler, CFG 7, {device} {str(dtype).replace('torch.', '')}, "
          f"median of {args.repeats}:")
    print(f"  per step : ours {ours_step * 1000:.1f} ms, raw diffusers {raw_step * 1000:.1f} ms, "
          f"ratio {ours_step / raw_step:.3f}x (target <= 1.03x)")
    print(f"  {hi} steps end to end: ours {ours_total:.2f}s, raw {raw_total:.2f}s, ratio {ours_total / raw_total:.3f}x")
    if cuda:
        print(f"  it/s: ours {1 / ours_step:.2f}, raw {1 / raw_step:.2f}")


if __name__ == "__main__":
    main()

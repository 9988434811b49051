"""ControlNet speed, in one run: seconds per step of our loop with one unit / without (target <= 1.45x:
the ControlNet's own compute), and / diffusers' StableDiffusionControlNetPipeline on the same checkpoint
and ControlNet file (target <= 1.03x); also ours / diffusers' StableDiffusionPipeline without a unit.

    flock -w 900 /tmp/bench.lock venv/bin/python bench/controlnet.py --size full --res 256 --steps 3 --jobs 1 \
        --dir /work/bench-cache --ckpt /work/bench-cache/full-fp16-sd1.safetensors

Same sampler (Euler), CFG 7, seed, prompt and control image everywhere, CPU float32 on both sides.
A step is timed from the UNet's calls (common.StepClock: one step = from the first UNet call at one
timestep to the first at the next, so text encoding, set-up and VAE decoding fall outside), the same way
for both loops; jobs with and without the unit alternate, and the median over every timed step is
reported, with its CPU time (less sensitive to other processes than wall time). `--size full` uses
random weights with the real SD1.5 / ControlNet-SD1.5 shapes (files made once in --dir, default
$BENCH_CACHE or tmp/bench-cache). Prints the figures and ratios; asserts nothing.
"""
from __future__ import annotations

import argparse
import gc
import json
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from common import ROOT, StepClock, build_services, default_cache_dir, in_worker_thread, make_sd1_checkpoint
from txt2img import PROMPT


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
    from modules.core.pipeline import Txt2ImgParams

    services = build_services(ckpt, data_dir, ["--controlnet-dir", str(cn_file.parent)])
    image = control_image(res)

    def run(steps: int, with_unit: bool):
        units = [ControlNetUnit(model=cn_file.stem, image=image, module="none")] if with_unit else []
        return services.generation.txt2img(Txt2ImgParams(prompt=PROMPT, steps=steps, width=res, height=res, seed=1,
                                                         sampler_name="Euler", cfg_scale=7.0,
                                                         controlnet_units=units))
    return services, (lambda n: run(n, False)), (lambda n: run(n, True))


def raw_pipeline(ckpt: Path, cn_file: Path, config_dir: Path, cn_config: Path, dtype):
    """diffusers' StableDiffusionControlNetPipeline, loaded by diffusers from the same two files."""
    from diffusers import ControlNetModel, EulerDiscreteScheduler, StableDiffusionControlNetPipeline

    from modules.models.families import load_tokenizers

    controlnet = ControlNetModel.from_single_file(str(cn_file), config=str(cn_config), local_files_only=True,
                                                  torch_dtype=dtype)
    pipe = StableDiffusionControlNetPipeline.from_single_file(
        str(ckpt), config=str(config_dir), local_files_only=True, controlnet=controlnet, safety_checker=None,
        requires_safety_checker=False, torch_dtype=dtype, **load_tokenizers("sd1"))
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def setup_line(label: str, unet, controlnet) -> str:
    """What decides the speed of a step, so a reader can see both sides ran alike."""
    import torch

    def procs(model) -> str:
        return "/".join(sorted({type(p).__name__ for p in model.attn_processors.values()}))
    conv = next(m for m in unet.modules() if isinstance(m, torch.nn.Conv2d))
    layout = "channels_last" if conv.weight.is_contiguous(memory_format=torch.channels_last) else "contiguous"
    def size(model) -> str:   # parameter count and every dtype among them (after the warm-up's upcasts)
        dtypes = "+".join(sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters()}))
        return f"{sum(p.numel() for p in model.parameters()) / 1e6:.0f}M {dtypes}"
    return (f"  {label:10s}: UNet {size(unet)} {procs(unet)} {layout}, ControlNet {size(controlnet)} "
            f"{procs(controlnet)}, torch threads {torch.get_num_threads()}")


class CallCounter:
    def __init__(self, module):
        self.calls = 0
        self._handle = module.register_forward_pre_hook(self._count)

    def _count(self, *_args) -> None:
        self.calls += 1

    def close(self) -> None:
        self._handle.remove()


def timed(runs: dict, unet, controlnet, steps: int, jobs: int, warm: tuple[str, ...] = ()) -> dict[str, tuple]:
    """One job of each configuration in turn, `jobs` rounds (so load changes hit them alike). Per
    configuration: (median wall s per step, median CPU s per step, steps timed, ControlNet calls per step,
    UNet calls per step). `warm`: configurations that have run a job already."""
    for name, run in runs.items():
        if name not in warm:
            run(1)  # warm-up: first calls allocate, pick kernels and upcast fp16 weights
    clocks = {name: StepClock(unet) for name in runs}
    counter = CallCounter(controlnet)
    cn_calls = dict.fromkeys(runs, 0)
    for _ in range(jobs):
        for name, run in runs.items():
            before = counter.calls
            clocks[name].job(run, steps)
            cn_calls[name] += counter.calls - before
    counter.close()
    for clock in clocks.values():
        clock.close()
    return {name: (*clock.per_step(), cn_calls[name] / (jobs * steps), clock.calls_per_step())
            for name, clock in clocks.items()}


def diffusers_runners(pipe, res: int):
    """diffusers' ControlNet pipeline and its plain txt2img pipeline on the same modules, each called in a
    worker thread as our queue runs jobs."""
    import torch
    from diffusers import StableDiffusionPipeline

    sd = StableDiffusionPipeline(**{k: v for k, v in pipe.components.items() if k != "controlnet"},
                                 requires_safety_checker=False)
    sd.set_progress_bar_config(disable=True)
    image = control_image(res)

    def run(steps: int, with_unit: bool):
        kwargs = {"image": image} if with_unit else {}
        return (pipe if with_unit else sd)(PROMPT, num_inference_steps=steps, guidance_scale=7.0, height=res,
                                           width=res, generator=torch.Generator("cpu").manual_seed(1), **kwargs)
    return in_worker_thread(lambda n: run(n, False)), in_worker_thread(lambda n: run(n, True))


def on_our_modules(services, controlnet):
    """diffusers' StableDiffusionControlNetPipeline built on the modules our loader made (--shared-modules)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionControlNetPipeline

    ours = services.models.current().pipe
    pipe = StableDiffusionControlNetPipeline(
        vae=ours.vae, text_encoder=ours.text_encoder, tokenizer=ours.tokenizer, unet=ours.unet, controlnet=controlnet,
        scheduler=EulerDiscreteScheduler.from_config(ours.scheduler.config), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", choices=("tiny", "full"), default="tiny")
    parser.add_argument("--res", type=int, default=None, help="pixels (default: 64 tiny, 256 full)")
    parser.add_argument("--steps", type=int, default=4, help="steps per job (each job times steps - 1 of them)")
    parser.add_argument("--jobs", type=int, default=2, help="timed jobs per configuration")
    parser.add_argument("--dir", default=None, help="where full-size weight files are made once and reused "
                                                    "(default: $BENCH_CACHE or tmp/bench-cache)")
    parser.add_argument("--ckpt", default=None, help="an existing SD1.5-layout checkpoint to use instead of making one")
    parser.add_argument("--shared-modules", action="store_true",
                        help="run diffusers' pipelines on the modules our loader made (loads once; compares the "
                             "loops alone, all four configurations alternated)")
    args = parser.parse_args()
    import torch

    res = args.res or (64 if args.size == "tiny" else 256)
    workdir = Path(args.dir or (default_cache_dir() if args.size == "full" else tempfile.mkdtemp()))
    workdir.mkdir(parents=True, exist_ok=True)
    ckpt = Path(args.ckpt) if args.ckpt else make_sd1_checkpoint(workdir, args.size)
    cn_file = make_controlnet_file(workdir / "controlnet", args.size)

    services, plain, with_unit = ours_runners(ckpt, cn_file, Path(tempfile.mkdtemp()), res)
    plain(1)  # loads the checkpoint
    unet = services.models.current().pipe.unet
    _file, controlnet, _spec = services.controlnets.load(cn_file.stem, unet.device, unet.dtype, unet)
    ours_runs = {"ours plain": plain, "ours unit": with_unit}
    if args.shared_modules:
        raw_plain, raw_unit = diffusers_runners(on_our_modules(services, controlnet), res)
        results = timed({**ours_runs, "diffusers plain": raw_plain, "diffusers unit": raw_unit}, unet, controlnet,
                        args.steps, args.jobs, warm=("ours plain",))
        setup = [setup_line("both", unet, controlnet)]
    else:
        results = timed(ours_runs, unet, controlnet, args.steps, args.jobs, warm=("ours plain",))
        setup = [setup_line("ours", unet, controlnet)]
        services.generation.queue.shutdown()
        del services, plain, with_unit, unet, controlnet, ours_runs
        gc.collect()
        if args.size == "tiny":
            config_dir = ckpt.with_name(ckpt.stem + ".tiny-config")
            cn_config = cn_file.with_name(cn_file.stem + ".tiny-config")
        else:
            config_dir, cn_config = ROOT / "configs/diffusers/sd1", ROOT / "configs/controlnet/sd1"
        pipe = raw_pipeline(ckpt, cn_file, config_dir, cn_config, torch.float32)
        raw_plain, raw_unit = diffusers_runners(pipe, res)
        results.update(timed({"diffusers plain": raw_plain, "diffusers unit": raw_unit}, pipe.unet, pipe.controlnet,
                             args.steps, args.jobs))
        setup.append(setup_line("diffusers", pipe.unet, pipe.controlnet))
    report(args, res, setup, results)


def report(args, res: int, setup: list[str], results: dict) -> None:
    def ms(v: tuple) -> str:
        return (f"{v[0] * 1000:.0f} ms (CPU {v[1] * 1000:.0f} ms; {v[2]} steps; calls per step: "
                f"{v[4]:.0f} UNet, {v[3]:.0f} ControlNet)")
    how = "on the same modules, all alternated" if args.shared_modules else "each side loading its own"
    print(f"{args.size} SD1 + ControlNet at {res}x{res}, Euler, CFG 7, cpu float32, {args.jobs} jobs x {args.steps} "
          f"steps per configuration ({how}); median wall time per step (its CPU time):")
    print("\n".join(setup))
    for name, value in results.items():
        print(f"  {name:16s} {ms(value)}")
    ours_unit, ours_plain = results["ours unit"], results["ours plain"]
    raw_unit, raw_plain = results["diffusers unit"], results["diffusers plain"]
    print(f"  ratio ours with a unit / without: {ours_unit[0] / ours_plain[0]:.3f}x (target <= 1.45x; diffusers' own: "
          f"{raw_unit[0] / raw_plain[0]:.3f}x)")
    print(f"  ratio ours / diffusers StableDiffusionControlNetPipeline, with one unit: "
          f"{ours_unit[0] / raw_unit[0]:.3f}x (target <= 1.03x; CPU time {ours_unit[1] / raw_unit[1]:.3f}x)")
    print(f"  ratio ours / diffusers StableDiffusionPipeline, without a unit: "
          f"{ours_plain[0] / raw_plain[0]:.3f}x (CPU time {ours_plain[1] / raw_plain[1]:.3f}x)")


if __name__ == "__main__":
    main()

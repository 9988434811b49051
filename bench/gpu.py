"""GPU benchmark, one prepared run: ours vs raw diffusers on the same card, same checkpoint, Euler, CFG 7.

    venv/bin/python bench/gpu.py [--family sd1|sdxl] [--res 512] [--batch 1 4] [--compile] [--vram normal medvram lowvram]

For each batch size: seconds per step (from a 2-step and a 6-step run, so load, text encoding and VAE
decode cancel out) and peak VRAM, for
  - raw diffusers: the pipeline in fp16 with SDPA (its default attention) and channels_last, and with
    --compile also ``torch.compile(unet)``: its fastest configurations;
  - ours: the txt2img path through the job queue with the flags of each --vram mode (and --opt-compile).
Then ratios ours/diffusers (targets: SD1.5 512² batch 1 >= 1.0x diffusers' speed, >= 1.5x with
--opt-compile; medvram SDXL 1024² peak VRAM <= 8 GB, lowvram SDXL <= 4 GB and SD1.5 <= 2 GB).

Random full-size weights (bench/common.py); the card's name is printed with the figures. Also runs on
the CPU with --family sd1 --size tiny (a smoke test of the script itself).
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import tempfile
import time
from pathlib import Path

from common import ROOT, make_sd1_checkpoint

PROMPT = "a photograph of an astronaut riding a horse"


def make_checkpoint(workdir: Path, family: str, size: str) -> Path:
    if family == "sd1":
        return make_sd1_checkpoint(workdir, size, "fp16" if size == "full" else "fp32")
    import tiny_models

    path = workdir / f"{size}-sdxl.safetensors"
    if not path.exists():
        if size == "tiny":
            tiny_models.make_checkpoint(path, "sdxl")
        else:
            _full_sdxl(path)
    return path


def _full_sdxl(path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    import tiny_models

    cfg_dir = ROOT / "configs/diffusers/sdxl"
    cfgs = {name: json.loads((cfg_dir / name / "config.json").read_text())
            for name in ("unet", "vae", "text_encoder", "text_encoder_2")}
    cfgs["scheduler"] = json.loads((cfg_dir / "scheduler/scheduler_config.json").read_text())
    models = tiny_models.build_components(cfgs, seed=0)
    state = tiny_models.components_to_ldm("sdxl", models, cfgs)
    save_file({k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in state.items()}, str(path))
    del models, state
    gc.collect()
    torch.cuda.empty_cache() if torch.cuda.is_available() else None


def config_dir(ckpt: Path, family: str) -> Path:
    tiny = ckpt.with_name(ckpt.stem + ".tiny-config")
    return tiny if tiny.is_dir() else ROOT / "configs/diffusers" / family


def peak_vram_reset():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_vram() -> int:
    import torch

    return torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0


def per_step(run, lo: int = 2, hi: int = 6, repeats: int = 3) -> tuple[float, int]:
    import torch

    run(lo)  # warm-up (and compile)
    run(lo)
    peak_vram_reset()
    times = {}
    for n in (lo, hi):
        samples = []
        for _ in range(repeats):
            t = time.perf_counter()
            run(n)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            samples.append(time.perf_counter() - t)
        times[n] = statistics.median(samples)
    return (times[hi] - times[lo]) / (hi - lo), peak_vram()


def raw_runner(ckpt: Path, family: str, res: int, batch: int, compile_unet: bool):
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    from modules.models.families import load_tokenizers

    cuda = torch.cuda.is_available()
    cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    extra = {} if family == "sdxl" else {"safety_checker": None, "requires_safety_checker": False}
    pipe = cls.from_single_file(str(ckpt), config=str(config_dir(ckpt, family)), local_files_only=True,
                                torch_dtype=torch.float16 if cuda else torch.float32,
                                **load_tokenizers(family), **extra)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.to("cuda" if cuda else "cpu")
    if cuda:
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    if compile_unet:
        pipe.unet = torch.compile(pipe.unet)
    pipe.set_progress_bar_config(disable=True)

    def run(steps: int):
        return pipe([PROMPT] * batch, num_inference_steps=steps, guidance_scale=7.0, height=res, width=res,
                    generator=torch.Generator("cpu").manual_seed(1))
    return run, pipe


def ours_runner(ckpt: Path, res: int, batch: int, flags: list[str]):
    from modules.core.flags import parse_args
    from modules.core.options import Options, default_templates
    from modules.core.paths import AppPaths
    from modules.core.pipeline import Txt2ImgParams
    from modules.services import build_services

    data_dir = Path(tempfile.mkdtemp())
    opts = parse_args(["--data-dir", str(data_dir), "--ckpt", str(ckpt), "--no-hashing", *flags], env={}).opts
    paths = AppPaths.from_opts(opts)
    paths.ensure_user_dirs()
    options = Options(paths.config_file, default_templates())
    for key, value in (("samples_save", False), ("grid_save", False), ("live_previews_enable", False)):
        options.set(key, value)
    services = build_services(opts, paths, options)

    def run(steps: int):
        return services.generation.txt2img(Txt2ImgParams(prompt=PROMPT, steps=steps, width=res, height=res, seed=1,
                                                         batch_size=batch, sampler_name="Euler", cfg_scale=7.0))
    return run, services


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=("sd1", "sdxl"), default="sd1")
    parser.add_argument("--size", choices=("tiny", "full"), default="full")
    parser.add_argument("--res", type=int, default=None, help="default 512 (sd1), 1024 (sdxl), 64 (tiny)")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--vram", nargs="+", default=["normal", "medvram", "lowvram"])
    parser.add_argument("--compile", action="store_true", help="also torch.compile: diffusers' and --opt-compile")
    parser.add_argument("--dir", default=None)
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args()
    import torch

    torch.set_grad_enabled(False)
    card = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (no CUDA)"
    res = args.res or (64 if args.size == "tiny" else 1024 if args.family == "sdxl" else 512)
    workdir = Path(args.dir) if args.dir else Path(tempfile.mkdtemp())
    workdir.mkdir(parents=True, exist_ok=True)
    ckpt = make_checkpoint(workdir, args.family, args.size)
    rows = []
    for batch in args.batch:
        configs = [("diffusers", False)] + ([("diffusers+compile", True)] if args.compile else [])
        for name, comp in configs:
            run, pipe = raw_runner(ckpt, args.family, res, batch, comp)
            step, vram = per_step(run)
            rows.append({"engine": name, "batch": batch, "step_s": step, "peak_vram": vram})
            del run, pipe
            gc.collect()
        modes = [(v, ["--" + v] if v != "normal" else []) for v in args.vram]
        if args.compile:
            modes.append(("normal+opt-compile", ["--opt-compile"]))
        for name, flags in modes:
            run, services = ours_runner(ckpt, res, batch, flags)
            step, vram = per_step(run)
            rows.append({"engine": f"ours {name}", "batch": batch, "step_s": step, "peak_vram": vram})
            services.generation.queue.shutdown()
            services.models.unload()
            del run, services
            gc.collect()
    print(f"{card}: {args.family} {args.size} {res}x{res}, Euler, CFG 7, {torch.__version__}")
    for batch in args.batch:
        base = next(r for r in rows if r["batch"] == batch and r["engine"] == "diffusers")
        fastest = min((r for r in rows if r["batch"] == batch and r["engine"].startswith("diffusers")),
                      key=lambda r: r["step_s"])
        for r in (r for r in rows if r["batch"] == batch):
            print(f"  batch {batch} {r['engine']:22s} {r['step_s'] * 1000:8.1f} ms/step  {1 / r['step_s']:6.2f} it/s  "
                  f"peak VRAM {r['peak_vram'] / 2**30:5.2f} GiB  speed vs diffusers {base['step_s'] / r['step_s']:.2f}x"
                  f"  vs diffusers' fastest {fastest['step_s'] / r['step_s']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"card": card, "family": args.family, "res": res, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()

"""Shared bench helpers: checkpoints in the real single-file layout (tiny, or full-size random SD1.5)."""
from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def default_cache_dir() -> Path:
    """Where full-size bench weights are made once and reused: $BENCH_CACHE, else tmp/bench-cache in the
    repository (git-ignored). Several GB; pass --dir to reuse a shared folder."""
    return Path(os.environ.get("BENCH_CACHE") or ROOT / "tmp" / "bench-cache")


def build_services(ckpt: Path, data_dir: Path, extra_args: list[str] | tuple[str, ...] = ()):
    """Our services (as webui.py builds them) on `ckpt`, with a fresh data dir; images are not saved and
    live previews are off, so a job times sampling and decoding only. `extra_args`: more command-line flags."""
    from modules.core.flags import parse_args
    from modules.core.options import Options, default_templates
    from modules.core.paths import AppPaths
    from modules.services import build_services as build

    opts = parse_args(["--data-dir", str(data_dir), "--ckpt", str(ckpt), *extra_args], env={}).opts
    paths = AppPaths.from_opts(opts)
    paths.ensure_user_dirs()
    options = Options(paths.config_file, default_templates())
    options.set("samples_save", False)
    options.set("live_previews_enable", False)
    return build(opts, paths, options)


def make_sd1_checkpoint(dest: Path, size: str, dtype: str = "fp32") -> Path:
    """`tiny`: the test fixture; `full`: random weights with the real SD1.5 shapes (about 4 GB in fp32,
    2.1 GB with dtype="fp16", the size of the usual downloaded SD1.5 file)."""
    import torch
    from safetensors.torch import save_file

    import tiny_models

    path = dest / (f"{size}-sd1.safetensors" if dtype == "fp32" else f"{size}-{dtype}-sd1.safetensors")
    if path.exists():
        return path
    if size == "tiny":
        tiny_models.make_checkpoint(path, "sd1")
        return path
    real = {name: json.loads((ROOT / "configs/diffusers/sd1" / name / "config.json").read_text())
            for name in ("unet", "vae", "text_encoder")}
    cfgs = {**real, "scheduler": json.loads((ROOT / "configs/diffusers/sd1/scheduler/scheduler_config.json").read_text())}
    models = tiny_models.build_components(cfgs, seed=0)
    state = tiny_models.components_to_ldm("sd1", models, cfgs)
    cast = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    save_file({k: (v.to(cast) if cast is not None and v.is_floating_point() else v).contiguous()
               for k, v in state.items()}, str(path))
    del models, state
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return path


class Timer:
    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start


class StepClock:
    """Wall and CPU seconds of each sampling step, read from the UNet's own calls (a forward pre-hook), so
    our loop and a diffusers pipeline are timed the same way: a step starts at the first UNet call with a
    new timestep and lasts until the next one (UNet, ControlNet, CFG and scheduler step included). Only
    steps inside one job count (text encoding, the first step's set-up and VAE decoding fall outside).
    The median over many steps stands up to a loaded machine far better than (t(n2) - t(n1)) / (n2 - n1)."""

    def __init__(self, unet):
        self.jobs: list[list[tuple[float, float, float]]] = []   # per job: (timestep, wall, cpu) per step start
        self.calls = 0   # UNet calls inside jobs
        self._timing = False
        self._handle = unet.register_forward_pre_hook(self._stamp)

    def _stamp(self, _module, args) -> None:
        if not self._timing:
            return
        self.calls += 1
        t = float(args[1])   # the timestep: positional in our loop and in diffusers' pipelines
        job = self.jobs[-1]
        if not job or job[-1][0] != t:
            job.append((t, time.perf_counter(), time.process_time()))

    def job(self, run, steps: int) -> None:
        """One timed job of `steps` steps."""
        self.jobs.append([])
        self._timing = True
        try:
            run(steps)
        finally:
            self._timing = False

    def per_step(self) -> tuple[float, float, int]:
        """(median wall s, median CPU s, number of steps timed) over every job so far."""
        walls = [b[1] - a[1] for job in self.jobs for a, b in zip(job, job[1:])]
        cpus = [b[2] - a[2] for job in self.jobs for a, b in zip(job, job[1:])]
        return statistics.median(walls), statistics.median(cpus), len(walls)

    def calls_per_step(self) -> float:
        return self.calls / max(1, sum(len(job) for job in self.jobs))

    def close(self) -> None:
        self._handle.remove()


def in_worker_thread(run):
    """`run`, called in one long-lived worker thread, as our job queue runs every generation. Both sides of
    a comparison must run in the same kind of thread: torch's OpenMP team differs between the main thread
    and others (on a loaded machine a main-thread team spin-waits, and small ops there cost several
    times more CPU and wall time), which alone moved our-vs-diffusers ratios by far more than 3%."""
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bench-reference")
    return lambda *args, **kwargs: pool.submit(run, *args, **kwargs).result()

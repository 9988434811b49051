"""Memory benchmarks on the CPU: low-RAM mode, load to ready, checkpoint switching, tiled VAE.

    venv/bin/python bench/memory.py lowram [--res 512] [--steps 5] [--ckpt FILE] [--lora]  # peak RSS, step time: fp32 vs low-RAM
    venv/bin/python bench/memory.py load [--runs 3]                      # fp16 file -> ready, ours vs diffusers
    venv/bin/python bench/memory.py switch [--switches 20] [--mode lowram|fp32]
    venv/bin/python bench/memory.py loadswitch [--runs 3] [--mode lowram|fp32]  # both of the above
    venv/bin/python bench/memory.py vae [--res 2048] [--max-tiles 4]     # tiled VAE decode peak RSS
    venv/bin/python bench/memory.py vae-trace [--res 512]                # decode activation peaks, traced (seconds)

Each measurement runs in a fresh Python process (peak RSS is per process), on a full-size SD1.5-shaped
fp16 checkpoint (random weights; generated once into --dir). Prints figures; asserts nothing.
Run full-size benchmarks under `flock /tmp/bench.lock` on a shared machine.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import ROOT, make_sd1_checkpoint

PROMPT = "a photograph of an astronaut riding a horse"
DEFAULT_DIR = Path("/work/bench-cache") if Path("/work/bench-cache").is_dir() else ROOT / "bench-cache"


def proc_status() -> dict[str, int]:
    """VmRSS / VmHWM (peak) / RssAnon / RssFile of this process, in bytes (Linux)."""
    out = {}
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) * 1024
    return out


def gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


# ------------------------------------------------------------------ children (one process each)


def _services(ckpt: Path, data_dir: Path, args: list[str]):
    from modules.core.flags import parse_args
    from modules.core.options import Options, default_templates
    from modules.core.paths import AppPaths
    from modules.services import build_services

    opts = parse_args(["--data-dir", str(data_dir), "--ckpt", str(ckpt), "--no-hashing", *args], env={}).opts
    paths = AppPaths.from_opts(opts)
    paths.ensure_user_dirs()
    options = Options(paths.config_file, default_templates())
    for key, value in (("samples_save", False), ("grid_save", False), ("live_previews_enable", False)):
        options.set(key, value)
    return build_services(opts, paths, options)


def reset_peak() -> None:
    """Start a new VmHWM measurement (Linux: writing 5 to clear_refs resets the peak RSS)."""
    with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
        f.write("5")


class StagePeaks:
    """Peak RSS per stage of one job: load + prompt, sampling (the UNet's calls), VAE decode.
    The peak is reset at each boundary, so the job's peak is the largest of the three."""

    def __init__(self, unet, vae):
        self.peaks: dict[str, int] = {}
        self.unet_calls: list[float] = []
        self.step_starts: list[tuple[float, float, float, int]] = []  # (timestep, wall, cpu, minor faults)
        self._stage, self._t = "load+prompt", 0.0
        # prepend: the stage starts before low-RAM mode's own pre-hooks fault the component's weights in
        self.handles = [unet.register_forward_pre_hook(self._unet_pre, prepend=True),
                        unet.register_forward_hook(self._unet_post),
                        vae.decoder.register_forward_pre_hook(lambda *_: self._enter("vae decode"), prepend=True)]

    def _enter(self, stage: str) -> None:
        if stage != self._stage:
            self.peaks[self._stage] = max(self.peaks.get(self._stage, 0), proc_status()["VmHWM"])
            reset_peak()
            self._stage = stage

    def _unet_pre(self, _module, args):
        self._enter("sampling")
        self._t = time.perf_counter()
        t = float(args[1])  # a step starts at the first UNet call with a new timestep (as StepClock)
        if not self.step_starts or self.step_starts[-1][0] != t:
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            self.step_starts.append((t, self._t, time.process_time(), faults))

    def steady_steps(self) -> dict:
        """Median wall s, CPU s and minor page faults per step, over the steps after the first (the
        first also pays one-time costs); the last step ends at the VAE decode's start."""
        starts = self.step_starts
        spans = [[b[i] - a[i] for a, b in zip(starts, starts[1:])][1:] for i in (1, 2, 3)]
        med = [statistics.median(s) if s else float("nan") for s in spans]
        return {"step_s": med[0], "step_cpu_s": med[1], "step_faults": med[2], "steps_timed": len(spans[0]),
                "step_walls": spans[0]}

    def _unet_post(self, *_):
        self.unet_calls.append(time.perf_counter() - self._t)

    def finish(self) -> dict[str, int]:
        self._enter("done")
        for h in self.handles:
            h.remove()
        return self.peaks


def child_lowram(ckpt: Path, data_dir: Path, mode: str, res: int, steps: int, lora: bool = False,
                 keep_resident: bool = False) -> dict:
    """One txt2img job of ``steps`` steps; step time = the median step after the first (in fp32 mode
    the first call also converts each layer from fp16 for good), with its CPU time and minor page
    faults (a figure a loaded machine does not move); peak RSS per stage."""
    from modules.core.pipeline import Txt2ImgParams

    import diffusers  # noqa: F401 - imports are not part of the load time
    import transformers  # noqa: F401

    import modules.models.loader  # noqa: F401

    if keep_resident:  # for comparison: low-RAM as before models/residency.py (weights copied off the file)
        from modules.models import residency
        residency.available = lambda _span: False
    services = _services(ckpt, data_dir, ["--lowram" if mode == "lowram" else "--no-lowram"])
    reset_peak()
    t0 = time.perf_counter()
    model = services.models.current()
    load = time.perf_counter() - t0
    prompt = PROMPT
    if lora:  # a rank-4 kohya LoRA on every attention/MLP layer of the text encoder and UNet, merged in place
        sys.path.insert(0, str(ROOT / "tests"))
        import torch
        from lora_fixtures import kohya_lora

        kohya_lora(services.paths.lora_dir / "bench_lowram.safetensors", model.pipe, rank=4, alpha=2.0,
                   seed=1, dtype=torch.float16)
        prompt += " <lora:bench_lowram:1>"
        reset_peak()
    stages = StagePeaks(model.components["unet"], model.components["vae"])
    t = time.perf_counter()
    services.generation.txt2img(Txt2ImgParams(prompt=prompt, steps=steps, width=res, height=res, seed=1,
                                              sampler_name="Euler", cfg_scale=7.0))
    job = time.perf_counter() - t
    peaks = stages.finish()
    services.generation.queue.shutdown()
    calls = stages.unet_calls
    resident = getattr(model, "residency", None)  # low-RAM: idle components' mapped pages dropped (residency.py)
    return {"mode": mode, "load_s": load, "job_s": job, "unet_calls_s": calls, **stages.steady_steps(),
            "calls_per_step": len(calls) / max(1, len(stages.step_starts)),
            "drops": resident.released if resident is not None else None,
            "owned": [f"{k}: {v} tensors" for k, v in sorted(resident.owned.items())] if resident is not None else None,
            "stage_peaks": peaks, **proc_status(), "VmHWM": max(peaks.values())}


def child_load(ckpt: Path, mode: str, runs: int) -> dict:
    import torch

    torch.set_grad_enabled(False)
    # imports are not part of "load to ready" (diffusers and transformers import their classes lazily)
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel  # noqa: F401
    from diffusers.loaders import single_file_utils  # noqa: F401
    from transformers import CLIPTextModel, CLIPTokenizer  # noqa: F401

    from modules.models.devices import cpu_policy
    from modules.models.loader import load_checkpoint

    ckpt.read_bytes()  # page cache warm
    times, timings, settled = [], {}, []
    for _ in range(runs):
        t = time.perf_counter()
        if mode == "diffusers":
            model = _raw_pipeline(ckpt)
        else:
            model = load_checkpoint(ckpt, cpu_policy(lowram=mode == "lowram"))
            timings = model.timings
        times.append(time.perf_counter() - t)
        if mode != "diffusers":
            model.wait_materialised()  # the background copy off the mapped file (not part of "ready")
            settled.append(time.perf_counter() - t)
            model.unload()  # as a switch does (returns the freed memory): the next run's peak is its own
        del model
        import gc
        gc.collect()
    return {"mode": mode, "times": times, "median_s": statistics.median(times), "timings": timings,
            "settled_s": statistics.median(settled) if settled else None, **proc_status()}


def _raw_pipeline(ckpt: Path):
    from diffusers import StableDiffusionPipeline

    from modules.models.families import load_tokenizers

    return StableDiffusionPipeline.from_single_file(str(ckpt), config=str(ROOT / "configs/diffusers/sd1"),
                                                    local_files_only=True, safety_checker=None,
                                                    requires_safety_checker=False, **load_tokenizers("sd1"))


def child_switch(paths: list[Path], mode: str, switches: int) -> dict:
    import torch

    torch.set_grad_enabled(False)
    from modules.models.devices import cpu_policy
    from modules.models.loader import ModelManager, make_load_fn

    manager = ModelManager(make_load_fn(cpu_policy(lowram=mode == "lowram")), limit=1)
    manager.switch(paths[0]).wait_materialised()  # RSS once every weight is in process memory
    first = proc_status()["VmRSS"]
    after, t0 = [], time.perf_counter()
    for i in range(1, switches + 1):
        manager.switch(paths[i % len(paths)]).wait_materialised()
        after.append(proc_status()["VmRSS"])
    return {"mode": mode, "rss_after_first_load": first, "rss_after_each_switch": after,
            "seconds_per_switch": (time.perf_counter() - t0) / switches,
            "ratio_last_to_first": after[-1] / first, "max_ratio": max(after) / first, **proc_status()}


def child_vae(ckpt: Path, res: int, mode: str, max_tiles: int) -> dict:
    import torch

    torch.set_grad_enabled(False)
    from modules.engine import vae_tiling
    from modules.models import detection
    from modules.models.devices import cpu_policy
    from modules.models.loader import load_vae

    # only the VAE: the file is memory-mapped, so the UNet's pages are never read
    vae = load_vae(ckpt, detection.identify(ckpt), cpu_policy())
    before = proc_status()
    latents = torch.randn(1, 4, res // 8, res // 8)
    tiles = {"decoded": 0, "calls": 0, "seconds": []}
    real_decoder = vae.decoder.forward

    def decoder(z, *a, **kw):
        """The first ``max_tiles`` tiles are really decoded; later ones (when capped) are zeros of the
        decoded tile's shape, so the blending and the full-size output are still real."""
        tiles["calls"] += 1
        if max_tiles and tiles["decoded"] >= max_tiles:
            return torch.zeros(z.shape[0], 3, z.shape[2] * 8, z.shape[3] * 8, dtype=z.dtype)
        tiles["decoded"] += 1
        t0 = time.perf_counter()
        out = real_decoder(z, *a, **kw)
        tiles["seconds"].append(time.perf_counter() - t0)
        return out
    vae.decoder.forward = decoder
    reset_peak()
    t = time.perf_counter()
    with torch.inference_mode():
        pixels = vae_tiling.decode(vae, latents, vae_tiling.TilingPolicy(mode=mode))
    return {"res": res, "mode": mode, "seconds": time.perf_counter() - t, "shape": list(pixels.shape),
            "tiles": tiles, "rss_before_decode": before["VmRSS"], **proc_status()}


def trace_decode_activations(res: int, lowram: bool, tile: int | None = None) -> tuple[int, str]:
    """Peak bytes of live tensors during an SD1.5 VAE decode of ``res``x``res``, traced on the meta
    device: shapes only, no compute, so it runs in seconds on any machine. It counts what the decode
    itself holds (activations, not weights, allocator slack or library scratch): a lower bound on the
    RSS the decode adds, for comparing decode strategies. ``lowram``: with precision.py's VAE changes."""
    import weakref

    import torch
    from diffusers import AutoencoderKL
    from torch.utils._python_dispatch import TorchDispatchMode

    from modules.engine import vae_tiling
    from modules.models import precision

    class LiveBytes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.live: dict[int, int] = {}
            self.peak, self.where = 0, ""

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor) and t.untyped_storage()._cdata not in self.live:
                    key = t.untyped_storage()._cdata
                    self.live[key] = t.untyped_storage().nbytes()
                    weakref.finalize(t, self.live.pop, key, None)
                    if sum(self.live.values()) > self.peak:
                        self.peak, self.where = sum(self.live.values()), f"{func._schema.name} {tuple(t.shape)}"
            return out

    config = json.loads((ROOT / "configs/diffusers/sd1/vae/config.json").read_text())
    with torch.device("meta"):
        vae = AutoencoderKL.from_config(config)
    if lowram:
        precision._inplace_vae_silu(vae)  # noqa: SLF001 - what apply_lowram_casting does to a VAE
    latents = torch.randn(1, 4, res // 8, res // 8, device="meta")
    policy = vae_tiling.TilingPolicy(mode="Always" if tile else "Never", tile=tile)
    with torch.inference_mode(), LiveBytes() as trace:
        vae_tiling.decode(vae, latents, policy)
    return trace.peak, trace.where


# ------------------------------------------------------------------ parent


def spawn(*args: str) -> dict:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    # the child dies with this process (`timeout` or Ctrl-C on the bench must not leave it running)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    child = subprocess.Popen([sys.executable, __file__, "_child", *args], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=env, cwd=str(ROOT))
    try:
        stdout, stderr = child.communicate()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    if child.returncode != 0:
        raise SystemExit(f"child {args} failed:\n{stderr[-3000:]}")
    return json.loads(stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("lowram", "load", "switch", "loadswitch", "vae", "vae-trace", "_child"))
    parser.add_argument("rest", nargs="*")
    parser.add_argument("--dir", default=str(DEFAULT_DIR))
    parser.add_argument("--ckpt", default=None, help="an fp16 SD1.5 .safetensors (default: generate one into --dir)")
    parser.add_argument("--res", type=int, default=None)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--switches", type=int, default=20)
    parser.add_argument("--mode", default="lowram")
    parser.add_argument("--steps", type=int, default=5, help="lowram: steps of the one job per mode (>= 3)")
    parser.add_argument("--only", choices=("fp32", "lowram"), default=None, help="lowram: run one mode only")
    parser.add_argument("--lora", action="store_true", help="lowram: the job merges a kohya LoRA (TE and UNet)")
    parser.add_argument("--keep-resident", action="store_true",
                        help="lowram: copy the weights off the file, never drop idle components (the old way)")
    parser.add_argument("--max-tiles", type=int, default=0,
                        help="vae: decode only this many tiles for real (0: all); the peak is per tile")
    args = parser.parse_args()
    if args.what == "_child":
        return _child(args.rest)
    workdir = Path(args.dir)
    workdir.mkdir(parents=True, exist_ok=True)
    ckpt = Path(args.ckpt) if args.ckpt else make_sd1_checkpoint(workdir, "full", "fp16")
    size = f"{ckpt.name} ({ckpt.stat().st_size / 1e9:.2f} GB)"
    if args.what == "lowram":
        res = args.res or 512
        modes = [m for m in ("fp32", "lowram") if args.only in (None, m)]
        rows = [spawn("lowram", str(ckpt), str(workdir / "data"), mode, str(res), str(args.steps), str(int(args.lora)),
                      str(int(args.keep_resident)))
                for mode in modes]
        print(f"{size} at {res}x{res}, Euler, CFG 7, batch 1, one {args.steps}-step job on our txt2img path "
              f"{'with a LoRA merged (text encoder and UNet) ' if args.lora else ''}"
              f"{'[--keep-resident: weights copied off the file, as before] ' if args.keep_resident else ''}"
              f"(step = median over the steps after the first; peak RSS per stage, load included):")
        for r in rows:
            stages = ", ".join(f"{k} {gb(v)}" for k, v in r["stage_peaks"].items())
            print(f"  {r['mode']:7s} load {r['load_s']:.2f}s  step {r['step_s']:.2f}s (CPU {r['step_cpu_s']:.2f}s, "
                  f"{r['step_faults'] / 1e3:.0f}k minor faults; {r['steps_timed']} steps "
                  f"{[round(c, 2) for c in r['step_walls']]}; {r['calls_per_step']:.0f} UNet call/step)  "
                  f"job {r['job_s']:.1f}s  peak RSS {gb(r['VmHWM'])}"
                  f"  [{stages}]  (RSS after: anon {gb(r['RssAnon'])}, file {gb(r['RssFile'])})"
                  + (f"  idle components dropped {r['drops']}x" if r.get("drops") is not None else "")
                  + (f"; written, so owned: {', '.join(r['owned'])}" if r.get("owned") else ""))
        if len(rows) < 2:
            return
        fp32, low = rows
        print(f"  low-RAM / fp32: step time {low['step_s'] / fp32['step_s']:.3f}x (target <= 1.10x; CPU time "
              f"{low['step_cpu_s'] / fp32['step_cpu_s']:.3f}x, page faults {low['step_faults'] / fp32['step_faults']:.2f}x), "
              f"peak RSS {gb(low['VmHWM'])} (target <= 3.0 GB)")
    elif args.what == "loadswitch":  # the fast-loading figures in one command (< 5 minutes)
        for what in ("load", "switch"):
            sub = [sys.executable, __file__, what, "--dir", args.dir, "--runs", str(args.runs),
                   "--switches", str(args.switches), "--mode", args.mode, *(["--ckpt", args.ckpt] if args.ckpt else [])]
            subprocess.run(sub, check=True)
    elif args.what == "load":
        rows = [spawn("load", str(ckpt), mode, str(args.runs)) for mode in ("lowram", "fp32", "diffusers")]
        print(f"{size}: load to ready (imports done, page cache warm), median of {args.runs} runs:")
        for r in rows:
            settled = f"  weights off the file after {r['settled_s']:.2f}s" if r["settled_s"] is not None else ""
            print(f"  {r['mode']:9s} ready {r['median_s']:.2f}s  runs {[round(t, 2) for t in r['times']]}  "
                  f"peak RSS {gb(r['VmHWM'])}{settled}  {r['timings'] or ''}")
        print(f"  ours low-RAM / diffusers: {rows[0]['median_s'] / rows[2]['median_s']:.2f}x; "
              f"ours fp32 / diffusers: {rows[1]['median_s'] / rows[2]['median_s']:.2f}x (target: ready <= 2.5 s)")
    elif args.what == "switch":
        paths = []
        for i in range(3):  # three names of the same bytes (hard links): three cache entries, one file's pages
            link = workdir / f"switch-{i}-{ckpt.name}"
            if not link.exists():
                os.link(ckpt, link)
            paths.append(link)
        r = spawn("switch", args.mode, str(args.switches), *map(str, paths))
        print(f"{args.switches} switches among 3 checkpoints ({size} each), mode {args.mode}, sd_checkpoints_limit=1:")
        print(f"  RSS after first load {gb(r['rss_after_first_load'])}; after switches "
              f"{[round(x / 1e9, 2) for x in r['rss_after_each_switch']]} GB")
        print(f"  last / first {r['ratio_last_to_first']:.3f}x, worst {r['max_ratio']:.3f}x (target: within 5%); "
              f"peak RSS {gb(r['VmHWM'])}; {r['seconds_per_switch']:.1f}s per switch (load + copy off the file)")
    elif args.what == "vae-trace":
        print("SD1.5 VAE decode: peak of live tensors (activations only; meta-device trace, no compute):")
        for res, tile in ((args.res or 512, None), (2048, 512)):
            for lowram in (False, True):
                peak, where = trace_decode_activations(res, lowram, tile)
                print(f"  {res}x{res} {'tiled ' + str(tile) + ' px' if tile else 'untiled':14s} "
                      f"{'low-RAM VAE' if lowram else 'plain VAE':11s} {peak / 1e6:6.0f} MB  (at {where})")
    elif args.what == "vae":
        res = args.res or 2048
        r = spawn("vae", str(ckpt), str(res), "Automatic", str(args.max_tiles))
        t = r["tiles"]
        per_tile = statistics.median(t["seconds"]) if t["seconds"] else 0.0
        part = "all" if t["decoded"] == t["calls"] else f"the first {t['decoded']} (the rest zeros of the same shape)"
        print(f"SD1.5 VAE decode {res}x{res} on the CPU, fp32, tiled (Automatic): {t['calls']} tiles, {part} "
              f"decoded, {per_tile:.1f}s per tile (median), {r['seconds']:.1f}s in all")
        print(f"  peak RSS {gb(r['VmHWM'])} (RSS before decode {gb(r['rss_before_decode'])}; target peak < 4 GB)")


def _child(rest: list[str]) -> None:
    kind, *a = rest
    if kind == "lowram":
        result = child_lowram(Path(a[0]), Path(a[1]), a[2], int(a[3]), int(a[4]), a[5] == "1", a[6] == "1")
    elif kind == "load":
        result = child_load(Path(a[0]), a[1], int(a[2]))
    elif kind == "switch":
        result = child_switch([Path(p) for p in a[2:]], a[0], int(a[1]))
    else:
        result = child_vae(Path(a[0]), int(a[1]), a[2], int(a[3]))
    print(json.dumps(result))


if __name__ == "__main__":
    main()

"""Upscaler benchmark: a full-size RRDB (ESRGAN 4x: 23 blocks, 64 features, random weights) on the CPU,
our tiled inference (engine/model_upscale.py, A1111's default tile 192 / overlap 8) vs spandrel called on
the whole image. Each mode runs in its own process, so its peak memory is its own.

    flock /tmp/bench.lock venv/bin/python bench/upscale.py               # 512x512 -> 2048x2048
    flock /tmp/bench.lock venv/bin/python bench/upscale.py --size 256    # a smaller input as well

Target (issue 14): tiled peak memory <= 1/4 of whole, at <= 1.15x the time.
Peak memory is the process's peak RSS (VmHWM) minus its RSS after the model was loaded: what inference adds.
CPU seconds are printed beside wall seconds: on a shared machine the wall clock mostly measures the others.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from common import ROOT

CACHE = Path("/work/bench-cache")


def model_file() -> Path:
    """The random full-size RRDB in ESRGAN's old layout (what 4x-UltraSharp & co. use), made once."""
    path = CACHE / "rrdb-23x64-x4.pth"
    if not path.exists():
        import torch
        from modules.models.spandrel_support import spandrel_support

        spandrel_support()
        from spandrel.architectures.ESRGAN import ESRGAN

        torch.manual_seed(0)
        model = ESRGAN(in_nc=3, out_nc=3, num_filters=64, num_blocks=23, scale=4)
        with torch.no_grad():   # small weights keep activations finite through 69 dense blocks
            for p in model.parameters():
                p.mul_(0.3)
        CACHE.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(model.state_dict(), tmp)
        tmp.replace(path)
    return path


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def run_one(mode: str, size: int, tile: int, overlap: int, threads: int) -> dict:
    """In the child process: load, upscale once, report seconds and memory."""
    import numpy as np
    import torch
    from PIL import Image

    from modules.engine.model_upscale import TileSettings, _to_tensor, run_tiled
    from modules.models.upscaler_models import read_model

    torch.set_num_threads(threads)
    model = read_model(model_file())
    rng = np.random.default_rng(0)
    image = Image.fromarray((rng.random((size // 8, size // 8, 3)) * 255).astype("uint8")).resize((size, size))
    tensor = _to_tensor(image, torch.device("cpu"), torch.float32)
    base = _rss_kb("VmRSS")
    start, cpu_start = time.perf_counter(), time.process_time()
    with torch.inference_mode():
        if mode == "whole":
            out = model(tensor)
        else:
            out = run_tiled(model, tensor, TileSettings(tile, overlap))
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    return {"mode": mode, "seconds": seconds, "cpu_seconds": cpu, "peak_mb": (_rss_kb("VmHWM") - base) / 1024,
            "out": list(out.shape[-2:]), "threads": threads}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--tile", type=int, default=192)
    parser.add_argument("--overlap", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", choices=("whole", "tiled"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_one(args.child, args.size, args.tile, args.overlap, args.threads)))
        return
    model_file()
    results = {}
    for mode in ("tiled", "whole"):
        cmd = [sys.executable, __file__, "--child", mode, "--size", str(args.size), "--tile", str(args.tile),
               "--overlap", str(args.overlap), "--threads", str(args.threads)]
        out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True)
        results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
        r = results[mode]
        print(f"{mode:5}: {args.size}x{args.size} -> {r['out'][1]}x{r['out'][0]}  {r['seconds']:.1f} s wall, "
              f"{r['cpu_seconds']:.1f} s CPU  "
              f"peak +{r['peak_mb']:.0f} MB  ({r['threads']} threads)", flush=True)
    tiled, whole = results["tiled"], results["whole"]
    print(f"tiled/whole: time {tiled['seconds'] / whole['seconds']:.2f}x wall, "
          f"{tiled['cpu_seconds'] / whole['cpu_seconds']:.2f}x CPU (target <= 1.15), "
          f"peak memory {tiled['peak_mb'] / whole['peak_mb']:.3f}x (target <= 0.25)")


if __name__ == "__main__":
    main()

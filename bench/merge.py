"""Checkpoint merger: time and peak memory to merge two full-size SD1.5 fp16 files (weighted sum, saved
fp16), against plain reading of both files plus writing one of the output's size, in one run.

    flock /tmp/bench.lock venv/bin/python bench/merge.py [--dir DIR] [--runs 2]

The two inputs (about 2.1 GB each) are made once in --dir (default: $BENCH_CACHE, else tmp/bench-cache
in the repository, which git ignores): `full-fp16-sd1.safetensors` (random weights
with the real SD1.5 shapes) and `full-fp16-sd1-b.safetensors` (other random values, same layout). Each
merge runs in a fresh child process, which reports its peak RSS (ru_maxrss) above its RSS once Python,
torch and the merger are imported. Targets: peak RSS <= 1.5 GB above that baseline, and merge time
<= 1.2x the read+write reference. Prints the figures; asserts nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import ROOT, default_cache_dir, make_sd1_checkpoint

CHUNK = 16 << 20


def _rss_bytes() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def ensure_inputs(cache: Path) -> tuple[Path, Path]:
    """The two fp16 inputs, made tensor by tensor from the fp32 full-size fixture when missing."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    a, b = cache / "full-fp16-sd1.safetensors", cache / "full-fp16-sd1-b.safetensors"
    if not a.exists():
        full = make_sd1_checkpoint(cache, "full")
        with safe_open(str(full), "pt") as f:
            save_file({k: (f.get_tensor(k).half() if f.get_tensor(k).is_floating_point() else f.get_tensor(k))
                       for k in f.keys()}, str(a))
    if not b.exists():
        gen = torch.Generator().manual_seed(1)
        out = {}
        with safe_open(str(a), "pt") as f:
            for k in f.keys():
                t = f.get_tensor(k)
                if t.is_floating_point() and t.numel() > 1:
                    t = (torch.randn(t.shape, generator=gen) * t.float().std().clamp(min=1e-3)).to(t.dtype)
                out[k] = t
        save_file(out, str(b))
    return a, b


def reference_seconds(a: Path, b: Path, out_bytes: int, out_dir: Path) -> float:
    """Read both inputs in 16 MiB chunks, then write (and fsync) a file of the output's size."""
    buffer = bytearray(CHUNK)
    start = time.perf_counter()
    for path in (a, b):
        with open(path, "rb", buffering=0) as fh:
            while fh.readinto(buffer):
                pass
    target = out_dir / ".bench-reference.bin"
    with open(target, "wb", buffering=0) as fh:
        left = out_bytes
        while left > 0:
            left -= fh.write(memoryview(buffer)[:min(CHUNK, left)])
        os.fsync(fh.fileno())
    seconds = time.perf_counter() - start
    target.unlink()
    return seconds


def child(a: str, b: str, out: str) -> None:
    """One merge in this fresh process: prints JSON {seconds, baseline, peak} (bytes)."""
    from modules.core.atomic import atomic_create_output
    from modules.models import merger

    baseline = _rss_bytes()
    spec = merger.MergeSpec(primary=Path(a), secondary=Path(b), method="Weighted sum", multiplier=0.3,
                            save_as_half=True, output=Path(out))
    start = time.perf_counter()
    merger.run_merge(spec, create=atomic_create_output)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"seconds": seconds, "baseline": baseline, "peak": peak}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dir", default=None, help="where the inputs are made once and reused "
                                                    "(default: $BENCH_CACHE or tmp/bench-cache in the repository)")
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--child", nargs=3, metavar=("A", "B", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    cache = Path(args.dir or default_cache_dir())
    cache.mkdir(parents=True, exist_ok=True)
    a, b = ensure_inputs(cache)
    out = cache / "bench-merged.safetensors"
    merges, refs, extra = [], [], []
    for _ in range(args.runs):
        out.unlink(missing_ok=True)
        refs.append(reference_seconds(a, b, a.stat().st_size, cache))
        run = subprocess.run([sys.executable, __file__, "--child", str(a), str(b), str(out)], cwd=ROOT,
                             capture_output=True, text=True, check=True)
        result = json.loads(run.stdout.strip().splitlines()[-1])
        merges.append(result["seconds"])
        extra.append(result["peak"] - result["baseline"])
    size = out.stat().st_size
    out.unlink(missing_ok=True)
    m, r = statistics.median(merges), statistics.median(refs)
    print(f"weighted sum of two SD1.5 fp16 files ({a.stat().st_size / 1e9:.2f} GB + {b.stat().st_size / 1e9:.2f} GB)"
          f" -> fp16 ({size / 1e9:.2f} GB), median of {args.runs} runs:")
    print(f"  merge: {m:.1f}s   read both + write one: {r:.1f}s   ratio {m / r:.2f}x (target <= 1.2x)")
    print(f"  peak RSS above the Python+torch baseline: {max(extra) / 1e9:.2f} GB (target <= 1.5 GB)")


if __name__ == "__main__":
    main()

"""LoRA: apply / switch time, per-step cost and extra memory; ours vs raw diffusers load_lora_weights + fuse_lora.

    flock /tmp/bench.lock venv/bin/python bench/lora.py [--size full|tiny] [--rank 32] [--res 256]

On the full-size SD1.5 layout (random weights, bench/common.py) two realistic kohya LoRAs are made:
rank 32, alpha 16, fp16, every UNet attention and feed-forward layer and every text-encoder
attention/MLP layer (the layers kohya's default LoRA trains). Timed:

* apply: the first job's LoRA (file read + merge), the same set again (should cost nothing), a switch
  to the other LoRA, to both, and back to none (restore); every switch includes reading its files;
* diffusers: load_lora_weights + fuse_lora, and a switch (unfuse + unload + load + fuse), same files;
* per step: seconds per step with the LoRA applied / without it, from 1- and 2-step jobs at 256x256
  (the difference cancels text encoding and decoding); target <= 1.01x;
* memory: our backups (the touched layers' original weights) and the process RSS growth.

Prints the figures and ratios; asserts nothing.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from common import ROOT, Timer, build_services, default_cache_dir, make_sd1_checkpoint  # noqa: F401  (ROOT)

PROMPT = "a photograph of an astronaut riding a horse"


def rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def timed(fn) -> float:
    with Timer() as t:
        fn()
    return t.seconds


def ours(services, model) -> dict[str, float]:
    engine = services.networks.engine
    encoder = services.generation._encoder_for(model)
    merger = engine.merger(model)

    def activate(tags: str):
        return lambda: engine.activate(model, encoder, [f"{PROMPT} {tags}"])
    rss0 = rss_mb()
    out = {"first apply (read file + merge) s": timed(activate("<lora:bench_a:1>"))}
    out["backups MB"] = merger.backup_bytes / 2**20
    out["RSS growth after first apply MB"] = rss_mb() - rss0
    out["same set again s"] = timed(activate("<lora:bench_a:1>"))
    # lora_in_memory_limit is 0 (A1111's default): every switch reads its files again, as in real use
    out["switch A -> B s"] = timed(activate("<lora:bench_b:1>"))
    out["switch to A + B s"] = timed(activate("<lora:bench_a:1> <lora:bench_b:0.5>"))
    out["back to none (restore) s"] = timed(activate(""))
    out["backups after restore MB"] = merger.backup_bytes / 2**20
    return out


def per_step(services, tags: str, res: int, repeats: int) -> float:
    from modules.core.pipeline import Txt2ImgParams

    def run(steps: int):
        services.generation.txt2img(Txt2ImgParams(prompt=f"{PROMPT} {tags}", steps=steps, width=res, height=res,
                                                  seed=1, sampler_name="Euler", cfg_scale=7.0))
    run(1)  # warm-up; with a LoRA this also merges it once
    one = statistics.median(timed(lambda: run(1)) for _ in range(repeats))
    two = statistics.median(timed(lambda: run(2)) for _ in range(repeats))
    return two - one


def diffusers_times(pipe, a: Path, b: Path) -> dict[str, float]:
    out = {}

    def load(path: Path):
        pipe.load_lora_weights(str(path))
        pipe.fuse_lora()
    out["diffusers load + fuse s"] = timed(lambda: load(a))

    def switch():
        pipe.unfuse_lora()
        pipe.unload_lora_weights()
        load(b)
    out["diffusers switch (unfuse, unload, load, fuse) s"] = timed(switch)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", choices=("tiny", "full"), default="full")
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--res", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where full-size weights are made once and reused "
                                                    "(default: $BENCH_CACHE or tmp/bench-cache)")
    args = parser.parse_args()

    import torch
    from lora_fixtures import kohya_lora

    cache = Path(args.dir or default_cache_dir()) if args.size == "full" else Path(tempfile.mkdtemp())
    cache.mkdir(parents=True, exist_ok=True)
    ckpt = make_sd1_checkpoint(cache, args.size)
    data_dir = Path(tempfile.mkdtemp(prefix="bench-lora-"))
    services = build_services(ckpt, data_dir)
    model = services.models.current()
    lora_dir = services.paths.lora_dir
    for name, seed in (("bench_a", 1), ("bench_b", 2)):
        kohya_lora(lora_dir / f"{name}.safetensors", model.pipe, rank=args.rank, alpha=args.rank / 2, seed=seed,
                   dtype=torch.float16)
    size_mb = (lora_dir / "bench_a.safetensors").stat().st_size / 2**20
    weights_mb = sum(p.numel() * p.element_size() for c in (model.pipe.unet, model.pipe.text_encoder)
                     for p in c.parameters()) / 2**20
    print(f"checkpoint {ckpt.name}; UNet + text encoder {weights_mb:.0f} MB; LoRA rank {args.rank}, "
          f"{size_mb:.1f} MB file; torch threads {torch.get_num_threads()}")
    results = ours(services, model)
    results["per step without LoRA s"] = per_step(services, "", args.res, args.repeats)
    results["per step with one LoRA s"] = per_step(services, "<lora:bench_a:1>", args.res, args.repeats)
    services.networks.engine.merger(model).restore()
    results.update(diffusers_times(model.pipe, lora_dir / "bench_a.safetensors", lora_dir / "bench_b.safetensors"))
    for key, value in results.items():
        print(f"{key:52s} {value:10.3f}")
    print(f"ratio per-step with/without LoRA (target <= 1.01, {args.res}px, 1 vs 2 steps): "
          f"{results['per step with one LoRA s'] / results['per step without LoRA s']:.3f}x")
    print(f"ratio first apply ours/diffusers: "
          f"{results['first apply (read file + merge) s'] / results['diffusers load + fuse s']:.2f}x; "
          f"switch ours/diffusers: "
          f"{results['switch A -> B s'] / results['diffusers switch (unfuse, unload, load, fuse) s']:.2f}x "
          f"(target: <= 0.5 s per LoRA)")
    print(f"backups / touched share of weights: {results['backups MB']:.0f} MB of {weights_mb:.0f} MB")
    services.generation.queue.shutdown()


if __name__ == "__main__":
    main()

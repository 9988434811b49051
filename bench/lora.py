"""LoRA: apply / switch time, per-step cost and extra memory; ours vs raw diffusers load_lora_weights + fuse_lora.

    flock -w 900 /tmp/bench.lock venv/bin/python bench/lora.py [--size full|tiny] [--rank 32] [--res 256]

On the full-size SD1.5 layout (random weights, bench/common.py) two realistic kohya LoRAs are made:
rank 32, alpha 16, fp16, every UNet attention and feed-forward layer and every text-encoder
attention/MLP layer (the layers kohya's default LoRA trains). Timed:

* apply: the first job's LoRA (file read + merge), the same set again (should cost nothing), a switch
  A -> B (B never read before: restore A's layers + read and merge B), back B -> A (A's file is read again: A1111's default
  lora_in_memory_limit of 0), a new multiplier for the merged LoRA (its parsed file is kept), both, and
  back to none (restore); target <= 0.5 s per LoRA;
* diffusers: load_lora_weights + fuse_lora, and a switch (unfuse + unload + load + fuse), same files; and
  UNet calls with our merge vs with diffusers' fuse of the same file, paired (merged weights may run
  slower than unmerged ones for their values alone: random weights can produce denormal activations);
* per step, with the LoRA merged / without (target <= 1.01x): one UNet call (CFG batch of 2) at
  256x256, with and without alternated so machine load hits both alike, min and median, also with
  denormals flushed (random weights may produce denormal activations, slow on x86). Call 1 after each
  merge or restore (what a user's first step after a switch costs) and call 2 (the steady step) are
  reported apart; and real txt2img jobs, (2-step job - 1-step job) medians, which cancels text
  encoding and decoding;
* hooks: forward hooks, pre-hooks, parametrizations and non-library module classes in the UNet and
  text encoder, with and without the LoRA (merging must leave nothing in the forward);
* memory: our backups (the touched layers' original weights: copies only where a layer no longer holds its
  checkpoint bytes, else read back from the file) and the process RSS growth.

Prints each figure as taken, then a summary of the issue's targets; asserts nothing. About 4-5 minutes
on the 2-core CPU VM.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from common import ROOT, Timer, build_services, default_cache_dir, make_sd1_checkpoint  # noqa: F401  (ROOT)

PROMPT = "a photograph of an astronaut riding a horse"
SWITCH_AB = "switch A -> B (B never seen: restore A, read + merge B) s"


class Figures(dict):
    """The measured figures, each printed as soon as it is taken (a run cut short still reports)."""

    def __setitem__(self, key: str, value: float) -> None:
        super().__setitem__(key, value)
        print(f"{key:52s} {value:10.3f}", flush=True)


def rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def timed(fn) -> float:
    with Timer() as t:
        fn()
    return t.seconds


def hook_count(model) -> int:
    """Forward hooks, pre-hooks and parametrizations on the UNet and text encoder (0 expected: a merged
    LoRA must leave nothing in the forward)."""
    import torch

    count = 0
    for module in (m for c in (model.pipe.unet, model.pipe.text_encoder) for m in c.modules()):
        count += len(module._forward_hooks) + len(module._forward_pre_hooks)
        count += len(getattr(module, "parametrizations", {}))
        count += not type(module).__module__.startswith(("torch.", "diffusers.", "transformers."))
    return count + len(torch.nn.modules.module._global_forward_hooks)


def ours(services, model, out: Figures) -> None:
    from modules.engine.networks import backups

    engine = services.networks.engine
    encoder = services.generation._encoder_for(model)
    merger = engine.merger(model)

    def activate(tags: str):
        return lambda: engine.activate(model, encoder, [f"{PROMPT} {tags}"])
    rss0 = rss_mb()
    out["hooks/wrappers/parametrizations without LoRA"] = hook_count(model)
    out["first apply (read file + merge) s"] = timed(activate("<lora:bench_a:1>"))
    out["hooks/wrappers/parametrizations with LoRA"] = hook_count(model)
    out["backups MB"] = merger.backup_bytes / 2**20
    out["layers read back from the checkpoint (no copy)"] = sum(
        isinstance(w, backups.FileBackup) for w, _ in merger.backups.values())
    out["layers with a copy"] = sum(not isinstance(w, backups.FileBackup) for w, _ in merger.backups.values())
    out["RSS growth after first apply MB"] = rss_mb() - rss0
    out["same set again s"] = timed(activate("<lora:bench_a:1>"))
    # lora_in_memory_limit is 0 (A1111's default): a file not in the merged set is read again, as in real use
    out[SWITCH_AB] = timed(activate("<lora:bench_b:1>"))
    out["switch B -> A (read again) s"] = timed(activate("<lora:bench_a:1>"))
    out["new multiplier A:1 -> A:0.5 s"] = timed(activate("<lora:bench_a:0.5>"))
    out["switch to A + B (2 LoRAs) s"] = timed(activate("<lora:bench_a:1> <lora:bench_b:0.5>"))
    out["back to none (restore) s"] = timed(activate(""))
    out["backups after restore MB"] = merger.backup_bytes / 2**20


def unet_call_times(services, model, res: int, repeats: int) -> dict[tuple[bool, str, int], list[float]]:
    """Seconds of one UNet call (a CFG batch of 2), {(flush denormals?, tags, call after the change): times}:
    without / with the LoRA merged, alternated so that load changes on the machine hit both alike; the
    merge or restore itself happens outside the timing. Call 1 is the first after the change (a user's
    first step after switching), call 2 the steady state. With denormals flushed too: random weights can
    drive activations into the denormal range, where x86 arithmetic is slow, and a merged LoRA changes
    which values land there."""
    import torch

    engine = services.networks.engine
    encoder = services.generation._encoder_for(model)
    unet = model.pipe.unet
    gen = torch.Generator().manual_seed(0)
    sample = torch.randn(2, unet.config.in_channels, res // 8, res // 8, generator=gen)
    context = torch.randn(2, 77, unet.config.cross_attention_dim, generator=gen)
    step = torch.tensor(500)
    kinds = [(flush, tags) for flush in (False, True) for tags in ("", "<lora:bench_a:1>")]
    times: dict[tuple[bool, str, int], list[float]] = {(f, t, call): [] for f, t in kinds for call in (1, 2)}
    with torch.inference_mode():
        unet(sample, step, context)   # warm-up
        for repeat in range(repeats):
            for flush, tags in (kinds if repeat % 2 == 0 else kinds[::-1]):   # no kind always goes first
                engine.activate(model, encoder, [f"{PROMPT} {tags}"])
                torch.set_flush_denormal(flush)
                for call in (1, 2):
                    times[(flush, tags, call)].append(timed(lambda: unet(sample, step, context)))
                torch.set_flush_denormal(False)
    return times


def paired_ratio(calls: dict[tuple[bool, str, int], list[float]], flush: bool) -> float:
    """Median over the repeats and both calls of (call with the LoRA / the same call without it, taken
    moments apart): pairing cancels the machine's slow drifts that make medians of each side wander."""
    with_lora = {k: v for k, v in calls.items() if k[0] == flush and k[1]}
    ratios = [t / calls[(flush, "", call)][i] for (_, _, call), found in with_lora.items() for i, t in enumerate(found)]
    return statistics.median(ratios)


def job_step_times(services, res: int, repeats: int) -> tuple[float, float]:
    """Seconds per sampling step of real txt2img jobs without / with the LoRA: (2-step job - 1-step job),
    medians, the four kinds of job alternated; the LoRA is merged before each timed job."""
    from modules.core.pipeline import Txt2ImgParams

    engine, model = services.networks.engine, services.models.current()
    encoder = services.generation._encoder_for(model)

    def run(tags: str, steps: int) -> float:
        engine.activate(model, encoder, [f"{PROMPT} {tags}"])
        return timed(lambda: services.generation.txt2img(Txt2ImgParams(
            prompt=f"{PROMPT} {tags}", steps=steps, width=res, height=res, seed=1, sampler_name="Euler",
            cfg_scale=7.0)))
    run("", 1)   # warm-up
    kinds = {(tags, steps): [] for tags in ("", "<lora:bench_a:1>") for steps in (1, 2)}
    for _ in range(repeats):
        for (tags, steps), found in kinds.items():
            found.append(run(tags, steps))

    def step(tags: str) -> float:
        return statistics.median(kinds[(tags, 2)]) - statistics.median(kinds[(tags, 1)])
    return step(""), step("<lora:bench_a:1>")


def fused_step_ratio(services, model, lora: Path, res: int, repeats: int) -> float:
    """Median of paired UNet calls, our merged LoRA / diffusers' load_lora_weights + fuse_lora of the same
    file (denormals not flushed): the same weights up to rounding, so a ratio near 1 says our merge
    leaves no per-step cost beyond what merged weights cost anyway. Two calls of each per repeat."""
    import torch

    engine, encoder, pipe = services.networks.engine, services.generation._encoder_for(model), model.pipe
    unet = pipe.unet
    gen = torch.Generator().manual_seed(0)
    sample = torch.randn(2, unet.config.in_channels, res // 8, res // 8, generator=gen)
    context = torch.randn(2, 77, unet.config.cross_attention_dim, generator=gen)
    ratios = []
    with torch.inference_mode():
        def ours() -> list[float]:
            engine.activate(model, encoder, [f"{PROMPT} <lora:{lora.stem}:1>"])
            found = [timed(lambda: unet(sample, torch.tensor(500), context)) for _ in range(2)]
            engine.activate(model, encoder, [PROMPT])
            return found

        def theirs() -> list[float]:
            with torch.inference_mode(False):
                pipe.load_lora_weights(str(lora))
                pipe.fuse_lora()
            found = [timed(lambda: unet(sample, torch.tensor(500), context)) for _ in range(2)]
            with torch.inference_mode(False):
                pipe.unfuse_lora()
                pipe.unload_lora_weights()
            return found
        for repeat in range(repeats):   # alternate which side goes first: the first of a pair ran slower here
            if repeat % 2 == 0:
                mine, other = ours(), theirs()
            else:
                other, mine = theirs(), ours()
            ratios += [o / t for o, t in zip(mine, other)]
    return statistics.median(ratios)


def diffusers_times(pipe, a: Path, b: Path, out: Figures) -> None:

    def load(path: Path):
        pipe.load_lora_weights(str(path))
        pipe.fuse_lora()
    out["diffusers load + fuse s"] = timed(lambda: load(a))

    def switch():
        pipe.unfuse_lora()
        pipe.unload_lora_weights()
        load(b)
    out["diffusers switch (unfuse, unload, load, fuse) s"] = timed(switch)


def summary(r: Figures, args, weights_mb: float) -> None:
    """The figures the issue's targets name, with their ratios, in one block at the end."""
    def call(n: int, tags: str, flush: str = "", stat: str = "median") -> float:
        return r[f"UNet call {'1 (first after the change)' if n == 1 else '2 (steady)'} {tags} LoRA{flush} s ({stat})"]
    first, diff_first = r["first apply (read file + merge) s"], r["diffusers load + fuse s"]
    switch, diff_switch = r[SWITCH_AB], r["diffusers switch (unfuse, unload, load, fuse) s"]
    print("--- summary (target: apply/switch <= 0.5 s per LoRA; step with/without <= 1.01x)")
    print(f"first apply of a LoRA          {first:7.3f} s   diffusers load+fuse {diff_first:.3f} s  "
          f"ours/diffusers {first / diff_first:.2f}x")
    print(f"switch A -> B (B never seen)   {switch:7.3f} s   diffusers switch {diff_switch:.3f} s  "
          f"ours/diffusers {switch / diff_switch:.2f}x")
    print(f"switch B -> A (read again)     {r['switch B -> A (read again) s']:7.3f} s")
    print(f"switch to A + B                {r['switch to A + B (2 LoRAs) s'] / 2:7.3f} s per LoRA")
    print(f"new multiplier                 {r['new multiplier A:1 -> A:0.5 s']:7.3f} s;  "
          f"back to none {r['back to none (restore) s']:.3f} s")
    for flush in ("", ", denormals flushed"):
        steady = call(2, "with", flush) / call(2, "without", flush)
        steady_min = call(2, "with", flush, "min") / call(2, "without", flush, "min")
        print(f"step with/without LoRA{flush or ''}: steady {steady:.3f}x (median; min {steady_min:.3f}x); "
              f"first call after the change {call(1, 'with', flush):.2f} s with LoRA "
              f"({call(1, 'with', flush) - call(2, 'with', flush):+.2f} s vs steady), "
              f"{call(1, 'without', flush):.2f} s without ({call(1, 'without', flush) - call(2, 'without', flush):+.2f} s)"
              f"  [UNet call {args.res}px, {args.unet_repeats} repeats]")
    print(f"step with/without LoRA, median of {2 * args.unet_repeats} paired UNet calls: "
          f"{r['step with/without, median of paired calls']:.3f}x; denormals flushed "
          f"{r['step with/without, median of paired calls, denormals flushed']:.3f}x")
    print(f"step with the LoRA, ours merged / diffusers fused, median of {2 * args.fused_repeats} paired UNet calls: "
          f"{r['step ours merged / diffusers fused, median of paired calls']:.3f}x")
    print(f"step with/without LoRA, txt2img job (2-step - 1-step, {args.res}px, {args.repeats} job(s) each: a "
          f"difference of two noisy totals, rough): {r['job step with LoRA s'] / r['job step without LoRA s']:.3f}x")
    print(f"hooks/wrappers/parametrizations left in the forward: {r['hooks/wrappers/parametrizations with LoRA']:.0f} "
          f"with LoRA, {r['hooks/wrappers/parametrizations without LoRA']:.0f} without")
    print(f"backups: {r['backups MB']:.0f} MB held of {weights_mb:.0f} MB of weights; touched layers read back "
          f"from the checkpoint {r['layers read back from the checkpoint (no copy)']:.0f}, copied "
          f"{r['layers with a copy']:.0f}; RSS growth after the first apply {r['RSS growth after first apply MB']:.0f} MB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", choices=("tiny", "full"), default="full")
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--res", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=1, help="txt2img jobs of each kind")
    parser.add_argument("--fused-repeats", type=int, default=3, help="paired calls, ours vs diffusers fused")
    parser.add_argument("--unet-repeats", type=int, default=5, help="UNet calls with and without the LoRA")
    parser.add_argument("--dir", default=None, help="where full-size weights are made once and reused "
                                                    "(default: $BENCH_CACHE or tmp/bench-cache)")
    args = parser.parse_args()

    import torch
    from lora_fixtures import kohya_lora

    cache = Path(args.dir or default_cache_dir()) if args.size == "full" else Path(tempfile.mkdtemp())
    cache.mkdir(parents=True, exist_ok=True)
    ckpt = make_sd1_checkpoint(cache, args.size)
    data_dir = Path(tempfile.mkdtemp(prefix="bench-lora-"))
    with Timer() as load:
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
          f"{size_mb:.1f} MB file; torch threads {torch.get_num_threads()}; model loaded in {load.seconds:.1f} s",
          flush=True)
    results = Figures()
    ours(services, model, results)
    calls = unet_call_times(services, model, args.res, args.unet_repeats)
    for (flush, tags, call), found in calls.items():
        label = (f"UNet call {'1 (first after the change)' if call == 1 else '2 (steady)'} "
                 f"{'with' if tags else 'without'} LoRA{', denormals flushed' if flush else ''} s")
        results[label + " (min)"], results[label + " (median)"] = min(found), statistics.median(found)
    for flush in (False, True):
        results[f"step with/without, median of paired calls{', denormals flushed' if flush else ''}"] = \
            paired_ratio(calls, flush)
    results["job step without LoRA s"], results["job step with LoRA s"] = job_step_times(services, args.res,
                                                                                       args.repeats)
    services.networks.engine.merger(model).restore()
    results["step ours merged / diffusers fused, median of paired calls"] = fused_step_ratio(
        services, model, lora_dir / "bench_a.safetensors", args.res, args.fused_repeats)
    diffusers_times(model.pipe, lora_dir / "bench_a.safetensors", lora_dir / "bench_b.safetensors", results)
    summary(results, args, weights_mb)
    services.generation.queue.shutdown()


if __name__ == "__main__":
    main()

"""Shared bench helpers: checkpoints in the real single-file layout (tiny, or full-size random SD1.5)."""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
os.environ.setdefault("HF_HUB_OFFLINE", "1")


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

"""The error a job fails with when the GPU runs out of memory (torch-free, so the API can name it)."""
from __future__ import annotations


class GpuOutOfMemoryError(RuntimeError):
    """CUDA ran out of memory; the cache was emptied and the server goes on. The message says what to try."""

    def __init__(self, detail: str = "", *, vram_mode: str = "normal"):
        self.detail = detail
        advice = {
            "normal": "restart with --medvram (or --medvram-sdxl for SDXL only), or --lowvram on 4 GB cards",
            "medvram": "restart with --lowvram",
            "medvram-sdxl": "restart with --medvram, or --lowvram on 4 GB cards",
        }.get(vram_mode, "use a smaller image size or batch size")
        super().__init__(f"The GPU ran out of memory. Try a smaller image or batch size, or {advice}. "
                         "The memory was freed; the next job can run."
                         + (f" ({detail.splitlines()[0][:200]})" if detail else ""))

"""Progress and live previews without host syncs inside the sampling loop.

Progress is host bookkeeping (step counters), so it never waits on the device. A live preview needs
the latents on the host: on CUDA, reading them (``.cpu()``, ``.item()``, numpy) would make the loop
wait for every queued kernel. Instead, when a preview is due, the latents are copied into a reused
pinned host buffer with ``non_blocking=True`` and a CUDA event is recorded behind the copy; the
preview is built on a later step, once ``event.query()`` says the copy has landed (polling never
blocks). At most one copy is in flight; a preview due while one is still in flight is skipped.
After the loop, ``finish`` waits for the last copy (a sync outside the loop is harmless).

On the CPU (and MPS, whose copies are synchronous anyway) the latents are already readable: the
preview is built at once from them, exactly as before.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

__all__ = ["HostRead", "PinnedCopy", "StepReporter", "copier_for"]


class HostRead:
    """CPU latents: nothing to copy or wait for."""

    def start(self, latents: torch.Tensor) -> torch.Tensor:
        return latents

    def ready(self, handle: Any) -> bool:
        return True

    def wait(self, handle: Any) -> None:
        pass

    def host(self, handle: Any) -> torch.Tensor:
        return handle


class PinnedCopy:
    """Device latents -> a reused (pinned) host buffer, asynchronously; an event marks the copy's end.

    ``pin`` and ``make_event`` exist so the tests can drive this very code on the CPU with a fake event.
    """

    def __init__(self, *, pin: bool = True, make_event: Callable[[], Any] | None = None):
        self.pin = pin
        self.make_event = make_event or torch.cuda.Event
        self.buffer: torch.Tensor | None = None

    def start(self, latents: torch.Tensor) -> Any:
        src = latents.detach()
        buf = self.buffer
        if buf is None or buf.shape != src.shape or buf.dtype != src.dtype:
            buf = self.buffer = torch.empty(src.shape, dtype=src.dtype, device="cpu", pin_memory=self.pin)
        buf.copy_(src, non_blocking=True)
        event = self.make_event()
        event.record()  # on the current stream, behind the copy
        return event

    def ready(self, event: Any) -> bool:
        return bool(event.query())  # a host-side flag: never waits

    def wait(self, event: Any) -> None:
        event.synchronize()

    def host(self, _event: Any) -> torch.Tensor:
        return self.buffer


def copier_for(device: torch.device | str) -> HostRead | PinnedCopy:
    """How a device's latents reach the host: asynchronously from CUDA, directly elsewhere."""
    return PinnedCopy() if torch.device(device).type == "cuda" else HostRead()


class StepReporter:
    """The sampling loop's ``on_step``: progress every step, previews every N steps, no waiting.

    ``job`` is the job's context (``core.jobs.JobContext``); one without ``preview_due`` (an older
    or foreign context) gets the plain synchronous ``step_callback(step, total, latents)``.
    """

    def __init__(self, job: Any, device: torch.device | str, copier: Any = None):
        self.job = job
        self.copier = copier if copier is not None else copier_for(device)
        self.pending: tuple[int, Any] | None = None  # (step, handle) of the copy in flight

    def __call__(self, step: int, total: int, latents: torch.Tensor | None) -> None:
        job = self.job
        if job is None:
            return
        if not hasattr(job, "preview_due"):
            job.step_callback(step, total, latents)
            return
        self._deliver_if_ready()
        job.step_callback(step, total)
        if latents is not None and self.pending is None and job.preview_due(step):
            self.pending = (step, self.copier.start(latents))
            self._deliver_if_ready()

    def finish(self) -> None:
        """After the loop: wait for the copy still in flight, if any, and show it."""
        if self.pending is not None:
            self.copier.wait(self.pending[1])
            self._deliver_if_ready()

    def _deliver_if_ready(self) -> None:
        if self.pending is None or not self.copier.ready(self.pending[1]):
            return
        step, handle = self.pending
        self.pending = None
        self.job.show_preview(self.copier.host(handle), step)

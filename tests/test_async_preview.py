"""Live previews without host syncs in the sampling loop (engine/async_preview.py).

There is no GPU here, so the asynchronous path (pinned buffer + CUDA event) is driven on the CPU with
a fake event that lands a chosen number of polls after it was recorded. While the loop's ``on_step``
runs, a torch function mode records every synchronising read (``.item()``, ``.cpu()``, ``.tolist()``,
``.numpy()``, ``bool()``, ``.to("cpu")``) of a latent the loop handed over: there must be none.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

from modules.core.jobs import JobContext
from modules.core.pipeline import Txt2ImgParams
from modules.engine import async_preview
from test_processing import make_services

SYNCING = {torch.Tensor.item, torch.Tensor.cpu, torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.__bool__,
           torch.Tensor.__float__, torch.Tensor.__int__, torch.Tensor.to}


class FakeEvent:
    """A CUDA event stand-in: ``query()`` turns True after ``delay`` polls (a copy still in flight)."""

    delay = 2
    made: list["FakeEvent"] = []

    def __init__(self):
        self.polls, self.recorded, self.waited = 0, False, False
        FakeEvent.made.append(self)

    def record(self, *_):
        self.recorded = True

    def query(self):
        self.polls += 1
        return self.recorded and self.polls > self.delay

    def synchronize(self):
        self.waited = True
        self.polls = self.delay


class SyncRecorder(TorchFunctionMode):
    """Records synchronising reads of the loop's latents (only in the thread that enters the mode)."""

    def __init__(self, watched: list[torch.Tensor]):
        super().__init__()
        self.watched, self.syncs = watched, []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in SYNCING and args and any(args[0] is t for t in self.watched):
            to_host = func is not torch.Tensor.to or "cpu" in map(str, (*args[1:], *kwargs.values()))
            if to_host:
                self.syncs.append(func.__name__)
        return func(*args, **kwargs)


def run_job(tmp_path, monkeypatch, *, copier_factory, every: int = 1, steps: int = 5):
    """A real txt2img job on the tiny SD1 model, previews every ``every`` steps, ``on_step`` watched."""
    shown: list[tuple[int, torch.Tensor]] = []
    watched: list[torch.Tensor] = []
    syncs: list[str] = []
    real_show, real_call = JobContext.show_preview, async_preview.StepReporter.__call__

    def show(ctx, latents, step):
        shown.append((step, latents.clone()))
        real_show(ctx, latents, step)

    def watched_call(reporter, step, total, latents):
        watched.append(latents)
        with SyncRecorder(watched) as rec:
            real_call(reporter, step, total, latents)
        syncs.extend(rec.syncs)

    monkeypatch.setattr(JobContext, "show_preview", show)
    monkeypatch.setattr(async_preview.StepReporter, "__call__", watched_call)
    monkeypatch.setattr(async_preview, "copier_for", lambda _device: copier_factory())
    services = make_services(tmp_path, "sd1")
    try:
        services.options.set("show_progress_every_n_steps", every)
        result = services.generation.txt2img(Txt2ImgParams(prompt="a red cube", seed=3, width=64, height=64,
                                                           steps=steps, sampler_name="Euler"))
        return result.images[0], shown, watched, syncs
    finally:
        services.generation.queue.shutdown()


def pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def test_async_previews_never_sync_in_the_loop_and_land_on_later_steps(tmp_path, monkeypatch):
    FakeEvent.made.clear()
    image, shown, watched, syncs = run_job(
        tmp_path / "async", monkeypatch,
        copier_factory=lambda: async_preview.PinnedCopy(pin=False, make_event=FakeEvent))
    assert len(watched) == 5 and syncs == []
    # each copy reads "not done" on its first two polls: step 1's copy is polled at steps 1 and 2 (step 2
    # starts none: one copy at a time) and lands at step 3's first poll, which then starts its own; that
    # one lands at step 5, whose copy is still in flight after the loop, when finish() waits for it
    assert [s for s, _ in shown] == [1, 3, 5]
    assert all(e.recorded for e in FakeEvent.made) and FakeEvent.made[-1].waited
    # what was shown is what the loop held at that step, copied before later steps changed it
    for step, latents in shown:
        assert torch.equal(latents, watched[step - 1])
    plain, _, _, _ = run_job(tmp_path / "plain", monkeypatch, copier_factory=async_preview.HostRead)
    assert np.array_equal(pixels(image), pixels(plain))  # previews never change the image


def test_cpu_previews_are_immediate_and_read_without_copies(tmp_path, monkeypatch):
    _, shown, watched, syncs = run_job(tmp_path, monkeypatch, copier_factory=async_preview.HostRead, every=2)
    assert [s for s, _ in shown] == [2, 4]  # as before: every N steps, at that step
    assert syncs == []


def test_the_copier_follows_the_device():
    assert isinstance(async_preview.copier_for("cpu"), async_preview.HostRead)
    assert isinstance(async_preview.copier_for(torch.device("cuda", 0)), async_preview.PinnedCopy)


def test_the_pinned_buffer_is_reused_and_a_foreign_job_context_still_gets_latents():
    copier = async_preview.PinnedCopy(pin=False, make_event=FakeEvent)
    a = torch.randn(1, 4, 8, 8)
    copier.start(a)
    buf = copier.buffer
    copier.start(a * 2)
    assert copier.buffer is buf and torch.equal(buf, a * 2)

    class OldStyle:  # an extension's context with only step_callback
        def __init__(self):
            self.calls = []

        def step_callback(self, step, total, latents=None):
            self.calls.append((step, total, latents is not None))

    job = OldStyle()
    async_preview.StepReporter(job, "cpu")(1, 3, a)
    assert job.calls == [(1, 3, True)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: pinned memory and real events")
def test_pinned_copy_on_cuda():
    copier = async_preview.PinnedCopy()
    x = torch.randn(1, 4, 64, 64, device="cuda")
    event = copier.start(x)
    copier.wait(event)
    assert copier.buffer.is_pinned() and torch.equal(copier.host(event), x.cpu())

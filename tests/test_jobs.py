"""The job queue: FIFO order, error isolation, interrupt/skip, progress and previews."""
from __future__ import annotations

import threading
import time

import pytest
import torch
from PIL import Image

from modules.core.jobs import CancelledError, JobContext, JobQueue, JobState

TIMEOUT = 10


@pytest.fixture
def queue():
    q = JobQueue("test-jobs", progress_bar=False)
    yield q
    q.shutdown(cancel_pending=True, interrupt=True, timeout=TIMEOUT)


def blocker(queue: JobQueue):
    """Submit a job that holds the worker until the returned event is set."""
    started, release = threading.Event(), threading.Event()

    def fn(ctx):
        started.set()
        release.wait(TIMEOUT)
        return "blocker"

    job = queue.submit(fn, name="blocker")
    assert started.wait(TIMEOUT)
    return job, release


def test_fifo_order_across_threads(queue):
    submitted: list[str] = []
    ran: list[str] = []
    order_lock = threading.Lock()
    jobs = []

    def run(ctx: JobContext):
        ran.append(ctx.job.name)
        time.sleep(0.002)
        return ctx.job.name

    def producer(t: int, count: int) -> None:
        for i in range(count):
            with order_lock:  # the order the queue saw is the order we record
                name = f"t{t}-{i}"
                jobs.append(queue.submit(run, name=name))
                submitted.append(name)

    job, release = blocker(queue)  # let the queue fill up while workers race
    threads = [threading.Thread(target=producer, args=(t, n)) for t, n in enumerate((3, 3, 2, 2))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert queue.pending() == 10
    release.set()
    assert [j.result(TIMEOUT) for j in jobs] == submitted
    assert ran == submitted
    assert all(j.status == "done" for j in jobs)
    assert job.result(TIMEOUT) == "blocker"


def test_failing_job_does_not_stop_the_queue(queue):
    def bad(ctx):
        raise ValueError("broken job")

    failed = queue.submit(bad, name="bad")
    good = queue.submit(lambda ctx: 42, name="good")
    assert good.result(TIMEOUT) == 42
    with pytest.raises(ValueError, match="broken job"):
        failed.result(TIMEOUT)
    assert failed.status == "failed" and isinstance(failed.error, ValueError)
    assert good.status == "done"
    assert not queue.state.active  # state was ended after each job


def steps_job(total: int, reached_at: int, reached: threading.Event, go: threading.Event):
    def fn(ctx: JobContext):
        done = 0
        for step in range(1, total + 1):
            ctx.step_callback(step, total)
            done = step
            if step == reached_at:
                reached.set()
                go.wait(TIMEOUT)
            if ctx.should_stop():
                break
        return done
    return fn


def test_interrupt_stops_at_step_boundary_and_later_jobs_run(queue):
    reached, go = threading.Event(), threading.Event()
    first = queue.submit(steps_job(50, 5, reached, go), name="first")
    second = queue.submit(steps_job(8, -1, threading.Event(), threading.Event()), name="second")
    assert reached.wait(TIMEOUT)
    assert queue.state.sampling_step == 5
    assert queue.interrupt() is True
    go.set()
    assert first.result(TIMEOUT) == 5  # finished the step it was in, then stopped
    assert first.status == "interrupted"
    assert second.result(TIMEOUT) == 8  # the queued job is not affected
    assert second.status == "done"


def test_interrupt_when_idle_does_not_affect_the_next_job(queue):
    assert queue.interrupt() is False
    job = queue.submit(steps_job(4, -1, threading.Event(), threading.Event()), name="after")
    assert job.result(TIMEOUT) == 4 and job.status == "done"


def test_interrupt_by_id_cancels_a_queued_job(queue):
    hold, release = blocker(queue)
    waiting = queue.submit(lambda ctx: "never", name="waiting")
    assert queue.interrupt(waiting.id) is True
    release.set()
    with pytest.raises(CancelledError):
        waiting.result(TIMEOUT)
    assert waiting.status == "cancelled"
    assert hold.result(TIMEOUT) == "blocker" and hold.status == "done"


def test_skip_moves_to_next_image(queue):
    reached, go = threading.Event(), threading.Event()
    skipped_seen_after_next: list[bool] = []

    def fn(ctx: JobContext):
        per_image = []
        for image in range(3):
            done = 0
            for step in range(1, 11):
                ctx.step_callback(step, 10)
                done = step
                if image == 1 and step == 4:
                    reached.set()
                    go.wait(TIMEOUT)
                if ctx.should_skip() or ctx.should_stop():
                    break
            per_image.append(done)
            ctx.nextjob()
            skipped_seen_after_next.append(ctx.should_skip())
        return per_image

    job = queue.submit(fn, name="batch", job_count=3)
    assert reached.wait(TIMEOUT)
    assert queue.state.job_no == 1
    assert queue.skip() is True
    go.set()
    assert job.result(TIMEOUT) == [10, 4, 10]
    assert job.status == "done"
    assert skipped_seen_after_next == [False, False, False]


def test_queue_position_pending_and_cancel(queue):
    hold, release = blocker(queue)
    a = queue.submit(lambda ctx: "a", name="a")
    b = queue.submit(lambda ctx: "b", name="b")
    c = queue.submit(lambda ctx: "c", name="c")
    assert queue.pending() == 3
    assert [queue.queue_position(j) for j in (hold, a, b, c)] == [0, 1, 2, 3]
    assert queue.running() is hold
    assert queue.get(b.id) is b
    assert queue.cancel(b) is True
    assert queue.cancel(hold) is False  # already running
    assert queue.queue_position(c) == 2
    release.set()
    assert c.result(TIMEOUT) == "c" and a.result(TIMEOUT) == "a"
    assert queue.queue_position(c) is None
    assert queue.get(c.id) is c  # finished jobs stay findable for progress polling
    with pytest.raises(CancelledError):
        b.result(0)


def test_result_timeout(queue):
    hold, release = blocker(queue)
    late = queue.submit(lambda ctx: 1, name="late")
    with pytest.raises(TimeoutError):
        late.result(timeout=0.05)
    assert late.wait(0.01) is False
    release.set()
    assert late.result(TIMEOUT) == 1


def test_custom_job_id_and_snapshot_during_run(queue):
    seen = {}
    reached, go = threading.Event(), threading.Event()

    def fn(ctx: JobContext):
        ctx.step_callback(3, 12)
        seen.update(queue.state.snapshot())
        reached.set()
        go.wait(TIMEOUT)

    job = queue.submit(fn, name="txt2img", job_id="task(abc)", job_count=2)
    assert reached.wait(TIMEOUT)
    go.set()
    job.result(TIMEOUT)
    assert set(seen) >= {"progress", "eta_relative", "state", "textinfo", "current_task"}
    assert set(seen["state"]) == {"job", "job_count", "job_no", "job_timestamp", "sampling_step",
                                  "sampling_steps", "interrupted", "skipped", "stopping_generation"}
    assert seen["current_task"] == "task(abc)"
    assert seen["state"]["job"] == "txt2img"
    assert seen["state"]["sampling_step"] == 3 and seen["state"]["sampling_steps"] == 12
    assert seen["progress"] == pytest.approx(3 / 12 / 2)
    assert len(seen["state"]["job_timestamp"]) == 14


def test_shutdown_refuses_new_jobs():
    q = JobQueue("test-shutdown", progress_bar=False)
    job = q.submit(lambda ctx: "ok", name="last")
    q.shutdown(timeout=TIMEOUT)
    assert job.result(0) == "ok"  # queued work still ran
    with pytest.raises(RuntimeError):
        q.submit(lambda ctx: None, name="too late")


# ----------------------------------------------------------------- state arithmetic

class FakeClock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def test_progress_and_eta():
    clock = FakeClock()
    s = JobState(clock=clock)
    assert s.progress() == 0.0 and s.eta_relative() == 0.0  # idle
    s.begin("txt2img", 4)
    assert s.progress() == 0.0 and s.eta_relative() == 0.0  # nothing done yet: no estimate
    s.set_step(5, 10)
    clock.t += 5
    assert s.progress() == pytest.approx(0.125)
    assert s.eta_relative() == pytest.approx(5 / 0.125 - 5)
    s.nextjob()
    s.set_step(5, 10)
    clock.t += 5
    assert s.progress() == pytest.approx((1 + 0.5) / 4)
    assert s.eta_relative() == pytest.approx(10 / 0.375 - 10)
    s.set_job_count(2)  # hires fix may change the count mid-job; progress stays <= 1
    s.nextjob()
    s.set_step(10, 10)
    assert s.progress() == 1.0
    snap = s.snapshot()
    assert snap["progress"] == 1.0 and snap["state"]["job_no"] == 2
    s.end()
    assert s.progress() == 0.0 and not s.active


def test_begin_resets_flags():
    s = JobState()
    s.begin("a", 1)
    s.interrupt()
    s.skip()
    s.stop_generating()
    assert s.interrupted and s.skipped and s.stopping_generation
    s.end()
    s.begin("b", 1)
    assert not (s.interrupted or s.skipped or s.stopping_generation)


# ----------------------------------------------------------------- previews

def test_step_callback_makes_previews_every_n_steps(queue):
    calls = []

    def preview(latents):
        calls.append(latents.shape)
        return Image.new("RGB", (latents.shape[-1], latents.shape[-2]))

    def fn(ctx: JobContext):
        ids = []
        for step in range(1, 7):
            ctx.step_callback(step, 6, torch.zeros(1, 4, 8, 6))
            ids.append(ctx.state.current_preview()[1])
        return ids, ctx.state.current_image.size, ctx.state.current_image_sampling_step

    job = queue.submit(fn, name="preview", preview_fn=preview, preview_every=2)
    ids, size, step = job.result(TIMEOUT)
    assert ids == [0, 1, 1, 2, 2, 3]
    assert len(calls) == 3
    assert size == (6, 8) and step == 6


def test_set_preview_and_batch_grid_and_broken_preview(queue):
    def fn(ctx: JobContext):
        ctx.set_preview(lambda lat: [Image.new("RGB", (4, 4))] * 4, every=1)
        ctx.step_callback(1, 3, torch.zeros(4, 4, 4, 4))
        grid_size = ctx.state.current_image.size

        def broken(lat):
            raise RuntimeError("decoder exploded")

        ctx.set_preview(broken, every=1)
        ctx.step_callback(2, 3, torch.zeros(1, 4, 4, 4))
        ctx.step_callback(3, 3, torch.zeros(1, 4, 4, 4))
        return grid_size, ctx.state.id_live_preview

    grid_size, previews = queue.submit(fn, name="p").result(TIMEOUT)
    assert grid_size == (8, 8)  # 4 previews become a 2x2 grid
    assert previews == 1  # the broken preview was switched off; the job still finished


def test_progress_bar_in_terminal(capfd):
    q = JobQueue("test-bar", progress_bar=True)
    try:
        def fn(ctx: JobContext):
            for image in range(2):
                for step in range(1, 4):
                    ctx.step_callback(step, 3)
                ctx.nextjob()
            return "ok"

        assert q.submit(fn, name="barjob", job_count=2).result(TIMEOUT) == "ok"
    finally:
        q.shutdown(timeout=TIMEOUT)
    err = capfd.readouterr().err
    # one bar per image, cleared afterwards (leave=False); tqdm throttles the redraws in between
    assert err.count("barjob:") >= 2 and "/3 [" in err


# --------------------------------------------------------------------------- bounds and ownership

def bounded_queue(per_owner, total):
    return JobQueue("test-bounds", progress_bar=False, max_per_owner=per_owner, max_total=total)


def test_per_owner_bound_counts_queued_and_running_jobs_and_frees_as_they_finish():
    from modules.core.jobs import QueueFullError

    q = bounded_queue(2, 10)
    try:
        first, release = blocker_owned(q, "a")
        second = q.submit(lambda ctx: "a2", name="a2", owner="a")
        assert q.owned("a") == 2
        with pytest.raises(QueueFullError, match=r"limit per client is 2 \(--queue-max-per-client\)") as err:
            q.submit(lambda ctx: "a3", name="a3", owner="a")
        assert err.value.limit == "per client"
        q.submit(lambda ctx: "b1", name="b1", owner="b")     # another client is not held back by a's jobs
        q.submit(lambda ctx: "sys", name="internal")           # jobs without an owner are not per-owner counted
        assert q.cancel(second) and q.owned("a") == 1          # a cancelled job frees its place
        third = q.submit(lambda ctx: "a3", name="a3", owner="a")
        release.set()
        assert third.result(TIMEOUT) == "a3" and first.result(TIMEOUT) == "blocker"
        assert q.owned("a") == 0
    finally:
        q.shutdown(cancel_pending=True, interrupt=True, timeout=TIMEOUT)


def test_total_bound_counts_waiting_jobs_of_everybody():
    from modules.core.jobs import QueueFullError

    q = bounded_queue(None, 2)
    try:
        _, release = blocker_owned(q, "a")                     # running: not waiting
        q.submit(lambda ctx: 1, name="x", owner="b")
        q.submit(lambda ctx: 2, name="y", owner="c")
        with pytest.raises(QueueFullError, match=r"limit is 2 \(--queue-max-total\)") as err:
            q.submit(lambda ctx: 3, name="z", owner="d")
        assert err.value.limit == "total"
        with pytest.raises(QueueFullError):
            q.submit(lambda ctx: 3, name="z")                  # internal jobs too
        release.set()
    finally:
        q.shutdown(cancel_pending=True, interrupt=True, timeout=TIMEOUT)


def test_no_bounds_by_default(queue):
    _, release = blocker_owned(queue, "a")
    jobs = [queue.submit(lambda ctx: 1, name="x", owner="a") for _ in range(50)]
    release.set()
    assert all(j.result(TIMEOUT) == 1 for j in jobs)


def blocker_owned(queue: JobQueue, owner: str):
    started, release = threading.Event(), threading.Event()

    def fn(ctx):
        started.set()
        while not release.wait(0.01):
            if ctx.should_stop() or ctx.should_skip():
                return "stopped"
        return "blocker"
    job = queue.submit(fn, name="blocker", owner=owner)
    assert started.wait(TIMEOUT)
    return job, release


def test_control_acts_only_on_the_callers_own_job(queue):
    from modules.core.jobs import Caller

    assert queue.control(Caller("a"), "interrupt") == "idle"
    job, release = blocker_owned(queue, "a")
    try:
        assert queue.control(Caller("b"), "interrupt") == "not yours"
        assert queue.control(Caller("b"), "skip") == "not yours"
        assert queue.control(Caller(None), "interrupt") == "not yours"   # no name owns nothing
        assert not queue.state.interrupted and not queue.state.skipped and not job.wait(0.1)
        assert queue.control(Caller("a"), "skip") == "done" and queue.state.skipped
        assert job.result(TIMEOUT) == "stopped"
    finally:
        release.set()
    job, release = blocker_owned(queue, "a")
    assert queue.control(Caller("root", admin=True), "interrupt") == "done"
    assert job.result(TIMEOUT) == "stopped" and job.status == "interrupted"
    release.set()


def test_an_ownerless_job_is_controlled_only_by_an_admin(queue):
    from modules.core.jobs import Caller

    job, release = blocker_owned(queue, None)
    assert queue.control(Caller("a"), "interrupt") == "not yours"
    assert queue.control(Caller("a", admin=True), "interrupt") == "done"
    assert job.result(TIMEOUT) == "stopped"
    release.set()


def test_stop_cancels_a_queued_job_and_interrupts_a_running_one(queue):
    running, release = blocker_owned(queue, "a")
    queued = queue.submit(lambda ctx: "never", name="queued", owner="b")
    assert queue.stop(queued) and queued.status == "cancelled"
    with pytest.raises(CancelledError):
        queued.result(0)
    assert queue.stop(running)
    assert running.result(TIMEOUT) == "stopped" and running.status == "interrupted"
    assert not queue.stop(running)   # finished: nothing to do
    release.set()


def test_caller_policy_names_and_admins():
    import argparse

    from modules.core.callers import CallerPolicy, basic_auth_user

    def opts(**kw):
        base = dict(api_auth=None, gradio_auth=None, gradio_auth_path=None, admin_users=None,
                    listen=False, share=False, server_name=None)
        return argparse.Namespace(**{**base, **kw})
    local = CallerPolicy(opts())
    assert local.caller(None, "127.0.0.1").admin                       # the one user of a local server
    assert local.api_caller("Basic " + __import__("base64").b64encode(b"x:y").decode(), "1.2.3.4").name == "addr:1.2.3.4"
    exposed = CallerPolicy(opts(listen=True))
    assert not exposed.caller(None, "10.0.0.2").admin
    assert exposed.caller(None, "10.0.0.2").name != exposed.caller(None, "10.0.0.3").name
    authed = CallerPolicy(opts(api_auth="a:pa,b:pb,root:pr", admin_users="root, ops"))
    header = "Basic " + __import__("base64").b64encode(b"a:pa").decode()
    assert authed.api_caller(header, "127.0.0.1").name == "user:a" and not authed.api_caller(header, None).admin
    root = "Basic " + __import__("base64").b64encode(b"root:pr").decode()
    assert authed.api_caller(root, "127.0.0.1").admin
    # A user named like an address is not that address.
    assert authed.caller("127.0.0.1", None).name != authed.caller(None, "127.0.0.1").name
    assert basic_auth_user("Bearer x") is None and basic_auth_user("Basic !!") is None


def test_stop_takes_out_that_job_even_when_another_has_the_same_client_chosen_id(queue):
    _, release = blocker_owned(queue, "a")
    theirs = queue.submit(lambda ctx: "theirs", name="x", job_id="same", owner="a")
    mine = queue.submit(lambda ctx: "mine", name="x", job_id="same", owner="b")
    assert queue.stop(mine) and mine.status == "cancelled" and theirs.status == "queued"
    release.set()
    assert theirs.result(TIMEOUT) == "theirs"

"""One FIFO queue for all generation work, plus the progress state the UI and API read.

diffusers pipelines are not re-entrant and one model fills the device, so every entry point
(UI tabs, API routes, scripts) submits to the same single-worker :class:`JobQueue`.
:class:`JobState` has the shape of A1111's ``shared.state`` so the progress endpoints and
extensions that read it see familiar fields.

Interrupt and skip follow A1111: interrupt stops the *running* job after its current step
(queued jobs still run), skip abandons the current image and moves to the next one.
"""
from __future__ import annotations

import collections
import datetime as _dt
import logging
import sys
import threading
import time
import uuid
from concurrent.futures import CancelledError
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Literal, TypeVar

from PIL import Image

log = logging.getLogger(__name__)

__all__ = ["Caller", "CancelledError", "Job", "JobContext", "JobQueue", "JobState", "JobStatus", "QueueFullError"]

T = TypeVar("T")
JobStatus = Literal["queued", "running", "done", "failed", "interrupted", "cancelled"]
PreviewFn = Callable[[Any], "Image.Image | list[Image.Image] | None"]


# --------------------------------------------------------------------------- who asks

class QueueFullError(RuntimeError):
    """A submit over a queue bound; ``limit`` names the bound ("per client" or "total")."""

    def __init__(self, message: str, *, limit: str):
        super().__init__(message)
        self.limit = limit


@dataclass(frozen=True)
class Caller:
    """Who submits or controls jobs: a name (the authenticated user, else the client address) and
    whether they may act on any job (an admin, or the only user of a local server)."""

    name: str | None = None
    admin: bool = False

    def owns(self, job: "Job[Any] | None") -> bool:
        """True when this caller may interrupt/skip ``job`` and see its preview."""
        if job is None:
            return False
        return self.admin or (job.owner is not None and job.owner == self.name)


# --------------------------------------------------------------------------- state

class JobState:
    """Progress of the job that is running now (A1111's ``shared.state``), thread-safe.

    Written by the worker thread through :class:`JobContext`; read by any thread.
    ``sampling_step`` counts finished steps of the current image (0..``sampling_steps``);
    ``job_no`` counts finished images of the current job (0..``job_count``).
    """

    def __init__(self, clock: Callable[[], float] = time.time):
        self._lock = threading.RLock()
        self._clock = clock
        self.job = ""
        self.job_id: str | None = None
        self.job_no = 0
        self.job_count = 0
        self.job_timestamp = "0"
        self.sampling_step = 0
        self.sampling_steps = 0
        self.interrupted = False
        self.skipped = False
        self.stopping_generation = False
        self.textinfo: str | None = None
        self.time_start: float | None = None
        self.current_image: Image.Image | None = None
        self.current_image_sampling_step = 0
        self.id_live_preview = 0

    # -- lifecycle ------------------------------------------------------
    def begin(self, job_name: str = "(unknown)", job_count: int = 1, job_id: str | None = None) -> None:
        with self._lock:
            self.job = job_name
            self.job_id = job_id
            self.job_no = 0
            self.job_count = job_count
            self.job_timestamp = _dt.datetime.now().strftime("%Y%m%d%H%M%S")
            self.sampling_step = 0
            self.sampling_steps = 0
            # A new job never inherits a stop request meant for the previous one.
            self.interrupted = False
            self.skipped = False
            self.stopping_generation = False
            self.textinfo = None
            self.time_start = self._clock()
            self.current_image = None
            self.current_image_sampling_step = 0
            self.id_live_preview = 0

    def end(self) -> None:
        with self._lock:
            self.job = ""
            self.job_id = None
            self.job_no = 0
            self.job_count = 0
            self.sampling_step = 0
            self.sampling_steps = 0
            self.current_image = None
            self.current_image_sampling_step = 0
            self.textinfo = None
            self.time_start = None

    def nextjob(self) -> None:
        """One image (or batch) of the job is finished; the skip request, if any, is served."""
        with self._lock:
            self.job_no += 1
            self.sampling_step = 0
            self.current_image_sampling_step = 0
            self.skipped = False

    def set_job_count(self, job_count: int) -> None:
        # Hires fix and scripts learn the real amount of work only after the job started.
        with self._lock:
            self.job_count = job_count

    def set_step(self, step: int, total: int) -> None:
        with self._lock:
            self.sampling_step = step
            self.sampling_steps = total

    def set_textinfo(self, text: str | None) -> None:
        with self._lock:
            self.textinfo = text

    def set_current_image(self, image: Image.Image | None, step: int | None = None) -> None:
        with self._lock:
            self.current_image = image
            self.current_image_sampling_step = self.sampling_step if step is None else step
            self.id_live_preview += 1

    # -- requests from the UI/API --------------------------------------
    def interrupt(self) -> None:
        with self._lock:
            self.interrupted = True

    def skip(self) -> None:
        with self._lock:
            self.skipped = True

    def stop_generating(self) -> None:
        """Finish the current image, then stop (A1111's "stop generating" request)."""
        with self._lock:
            self.stopping_generation = True

    # -- reading -------------------------------------------------------
    @property
    def active(self) -> bool:
        with self._lock:
            return bool(self.job)

    def progress(self) -> float:
        """Fraction of the running job done, across its images and the steps of the current one."""
        with self._lock:
            if not self.job or self.job_count <= 0:
                return 0.0
            done = float(self.job_no)
            if self.sampling_steps > 0:
                done += self.sampling_step / self.sampling_steps
            return max(0.0, min(1.0, done / self.job_count))

    def eta_relative(self) -> float:
        """Seconds left, extrapolated from the time taken so far (0 until there is progress)."""
        with self._lock:
            progress = self.progress()
            if progress <= 0.0 or self.time_start is None:
                return 0.0
            elapsed = max(0.0, self._clock() - self.time_start)
            return max(0.0, elapsed / progress - elapsed)

    def current_preview(self) -> tuple[Image.Image | None, int]:
        """The latest live preview and its id (so a poller can tell whether it changed)."""
        with self._lock:
            return self.current_image, self.id_live_preview

    def snapshot(self) -> dict[str, Any]:
        """A consistent, JSON-ready copy for the ``progress`` API route (image left out)."""
        with self._lock:
            return {
                "progress": self.progress(),
                "eta_relative": self.eta_relative(),
                "state": {
                    "skipped": self.skipped,
                    "interrupted": self.interrupted,
                    "stopping_generation": self.stopping_generation,
                    "job": self.job,
                    "job_count": self.job_count,
                    "job_timestamp": self.job_timestamp,
                    "job_no": self.job_no,
                    "sampling_step": self.sampling_step,
                    "sampling_steps": self.sampling_steps,
                },
                "textinfo": self.textinfo,
                "current_task": self.job_id,
                "id_live_preview": self.id_live_preview,
            }


# --------------------------------------------------------------------------- jobs

class Job(Generic[T]):
    """A handle on submitted work: its status, and its result once finished."""

    def __init__(self, fn: Callable[["JobContext"], T], *, name: str, job_count: int, job_id: str,
                 preview_fn: PreviewFn | None, preview_every: int, owner: str | None = None):
        self.id = job_id
        self.owner = owner
        self.name = name
        self.job_count = job_count
        self.status: JobStatus = "queued"
        self.submitted_at = time.time()
        self.started_at: float | None = None
        self.finished_at: float | None = None
        self.error: BaseException | None = None
        self._fn = fn
        self._preview_fn = preview_fn
        self._preview_every = preview_every
        self._result: T | None = None
        self._done = threading.Event()
        self.meta: dict[str, Any] = {}   # what a listener keeps on the job (core/queue_service.py: its store id)

    def __repr__(self) -> str:
        return f"<Job {self.id} {self.name!r} {self.status}>"

    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the job finished (any way); False on timeout."""
        return self._done.wait(timeout)

    def result(self, timeout: float | None = None) -> T:
        """The job's return value; re-raises its exception, ``CancelledError`` if cancelled."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"job {self.id} ({self.name}) still {self.status} after {timeout}s")
        if self.status == "cancelled":
            raise CancelledError(f"job {self.id} ({self.name}) was cancelled")
        if self.error is not None:
            raise self.error
        return self._result  # type: ignore[return-value]

    def _finish(self, status: JobStatus, result: Any = None, error: BaseException | None = None) -> None:
        self._result = result
        self.error = error
        self.status = status
        self.finished_at = time.time()
        self._fn = None  # type: ignore[assignment]  # let closures (and their tensors) go
        self._done.set()


@dataclass
class JobContext:
    """What a job function gets: the shared state, stop/skip checks and the step callback."""

    job: Job[Any]
    state: JobState
    preview_fn: PreviewFn | None = None
    preview_every: int = 0
    progress_bar: bool = True
    _bar: Any = field(default=None, repr=False)
    _preview_failed: bool = field(default=False, repr=False)

    def should_stop(self) -> bool:
        """True once Interrupt was pressed: finish the current step and return what is done."""
        return self.state.interrupted

    def should_skip(self) -> bool:
        """True once Skip was pressed: abandon the current image, go on with the next."""
        return self.state.skipped

    def should_stop_generating(self) -> bool:
        return self.state.stopping_generation

    def set_preview(self, preview_fn: PreviewFn | None, every: int) -> None:
        """Install the live-preview decoder (it depends on the loaded model) and its period."""
        self.preview_fn = preview_fn
        self.preview_every = max(0, int(every))
        self._preview_failed = False

    def set_job_count(self, job_count: int) -> None:
        self.state.set_job_count(job_count)

    def nextjob(self) -> None:
        self._close_bar()
        self.state.nextjob()

    def step_callback(self, step: int, total: int, latents: Any = None) -> bool:
        """Record that ``step`` of ``total`` steps of the current image are done (1-based).

        Updates the state and the terminal bar, and every ``preview_every`` steps decodes
        ``latents`` into ``state.current_image``. Returns True when the sampler should stop
        now (interrupt or skip), so a diffusers callback can set ``pipe._interrupt``.
        """
        self.state.set_step(step, total)
        self._update_bar(step, total)
        if latents is not None and self.preview_due(step):
            self._make_preview(latents, step)
        return self.should_stop() or self.should_skip()

    def preview_due(self, step: int) -> bool:
        """True when ``step`` should give a live preview (a decoder, the period, no earlier failure)."""
        return (self.preview_fn is not None and self.preview_every > 0 and step % self.preview_every == 0
                and not self._preview_failed)

    def show_preview(self, latents: Any, step: int) -> None:
        """Make the live preview from host-readable ``latents`` of ``step`` (``engine/async_preview.py``
        calls this once an asynchronous copy has landed, possibly a step or two later)."""
        if not self._preview_failed:
            self._make_preview(latents, step)

    # -- internals -------------------------------------------------------
    def _make_preview(self, latents: Any, step: int) -> None:
        try:
            out = self.preview_fn(latents)  # type: ignore[misc]
            if isinstance(out, (list, tuple)):
                if not out:
                    return
                if len(out) == 1:
                    out = out[0]
                else:
                    from modules.core.saving import image_grid  # lazy: jobs stays light to import

                    out = image_grid(list(out))
            if out is not None:
                self.state.set_current_image(out, step)
        except Exception:
            # A broken preview must never cost the user the image itself.
            self._preview_failed = True
            log.exception("live preview failed; previews are off for the rest of job %s", self.job.id)

    def _update_bar(self, step: int, total: int) -> None:
        if not self.progress_bar:
            return
        if self._bar is not None and (self._bar.total != total or step < self._bar.n):
            self._close_bar()
        if self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(total=total, leave=False, desc=self.job.name, unit="it", file=sys.stderr,
                             dynamic_ncols=True)
        if step > self._bar.n:
            self._bar.update(step - self._bar.n)
        if step >= total:
            self._close_bar()

    def _close_bar(self) -> None:
        if self._bar is not None:
            try:
                self._bar.close()
            finally:
                self._bar = None


class JobQueue:
    """Jobs run one at a time by a single worker thread, taken round-robin across owners.

    Each owner's jobs run in their order (submission order, changed by :meth:`move`); between
    owners the worker serves the one it served least recently, so one client's batch of 50 does
    not starve the others (jobs without an owner count as one more owner). An owner may pause
    its own waiting jobs (:meth:`set_paused`). An exception in one job is stored on that job and
    the worker carries on with the next. ``max_per_owner`` bounds the unfinished
    (queued or running) jobs of one owner, ``max_total`` the queued ones of everybody; a submit
    over either raises :class:`QueueFullError` (None: no bound).
    """

    def __init__(self, worker_name: str = "jobs", *, state: JobState | None = None,
                 progress_bar: bool = True, history: int = 256, max_per_owner: int | None = None,
                 max_total: int | None = None):
        self.state = state or JobState()
        self.max_per_owner = max_per_owner
        self.max_total = max_total
        self.progress_bar = progress_bar
        self._cond = threading.Condition(threading.RLock())
        self._queue: collections.deque[Job[Any]] = collections.deque()
        self._running: Job[Any] | None = None
        self._finished: collections.OrderedDict[str, Job[Any]] = collections.OrderedDict()
        self._history = history
        self._closed = False
        self._served: dict[str | None, int] = {}   # owner -> tick of the last job taken for it
        self._tick = 0
        self._paused: set[str | None] = set()
        # Objects with on_start(job) / on_finish(job), called on the worker (or the cancelling) thread.
        self.listeners: list[Any] = []
        self._worker = threading.Thread(target=self._run, name=worker_name, daemon=True)
        self._worker.start()

    def in_worker(self) -> bool:
        """True on the thread that runs jobs (where waiting for another job would deadlock)."""
        return threading.current_thread() is self._worker

    # -- submitting ------------------------------------------------------
    def submit(self, fn: Callable[[JobContext], T], *, name: str, job_count: int = 1,
               job_id: str | None = None, preview_fn: PreviewFn | None = None,
               preview_every: int = 0, owner: str | None = None, meta: dict[str, Any] | None = None,
               bounded: bool = True) -> Job[T]:
        """Queue ``fn(ctx)``; ``job_id`` lets a client use its own task id (A1111's ``id_task``).

        ``owner`` (a user name or client address) is who may stop the job and see its preview;
        jobs with an owner count against the per-owner bound. Over a bound: :class:`QueueFullError`
        (``bounded=False``: jobs accepted before a restart, requeued). ``meta`` is kept on the job.
        """
        job: Job[T] = Job(fn, name=name, job_count=max(1, int(job_count)),
                          job_id=job_id or uuid.uuid4().hex[:16],
                          preview_fn=preview_fn, preview_every=preview_every, owner=owner)
        job.meta.update(meta or {})
        with self._cond:
            if self._closed:
                raise RuntimeError("the job queue is shut down")
            if bounded:
                self._check_bounds(owner)
            self._queue.append(job)
            self._cond.notify_all()
        return job

    def _check_bounds(self, owner: str | None) -> None:
        if self.max_total is not None and len(self._queue) >= self.max_total:
            raise QueueFullError(f"the server's queue is full: {len(self._queue)} jobs are waiting, the limit is "
                                 f"{self.max_total} (--queue-max-total); try again later", limit="total")
        if owner is not None and self.max_per_owner is not None:
            mine = self.owned(owner)
            if mine >= self.max_per_owner:
                raise QueueFullError(f"you have {mine} unfinished jobs, the limit per client is {self.max_per_owner} "
                                     f"(--queue-max-per-client); wait for one to finish", limit="per client")

    # -- looking -----------------------------------------------------------
    def owned(self, owner: str) -> int:
        """Unfinished (queued or running) jobs of ``owner``."""
        with self._cond:
            running = 1 if self._running is not None and self._running.owner == owner else 0
            return running + sum(1 for job in self._queue if job.owner == owner)

    def pending(self) -> int:
        """Jobs waiting to start (the running one not counted)."""
        with self._cond:
            return len(self._queue)

    def running(self) -> Job[Any] | None:
        with self._cond:
            return self._running

    def queue_position(self, job: Job[Any] | str) -> int | None:
        """How many jobs run before ``job``: 0 when it is running, None when it is finished."""
        job_id = job if isinstance(job, str) else job.id
        with self._cond:
            if self._running is not None and self._running.id == job_id:
                return 0
            ahead = 1 if self._running is not None else 0
            order = self.order()
            for i, queued in enumerate(order):
                if queued.id == job_id:
                    return ahead + i
            if any(queued.id == job_id for queued in self._queue):
                return ahead + len(order)  # paused: behind everything that will run
            return None

    def get(self, job_id: str) -> Job[Any] | None:
        """A queued, running or recently finished job by id."""
        with self._cond:
            if self._running is not None and self._running.id == job_id:
                return self._running
            for queued in self._queue:
                if queued.id == job_id:
                    return queued
            return self._finished.get(job_id)

    # -- controlling -------------------------------------------------------
    def cancel(self, job: Job[Any] | str) -> bool:
        """Take a job out of the queue before it starts; False if it already started."""
        job_id = job if isinstance(job, str) else job.id
        with self._cond:
            for queued in self._queue:
                if queued.id == job_id:
                    self._queue.remove(queued)
                    queued._finish("cancelled")
                    self._remember(queued)
                    self._notify("on_finish", queued)
                    return True
            return False

    def interrupt(self, job_id: str | None = None) -> bool:
        """Interrupt the running job (or, given an id, only that job: cancelled if still queued)."""
        with self._cond:
            running = self._running
            if job_id is not None and (running is None or running.id != job_id):
                return self.cancel(job_id)
            if running is None:
                return False
            self.state.interrupt()
            return True

    def skip(self) -> bool:
        with self._cond:
            if self._running is None:
                return False
            self.state.skip()
            return True

    def control(self, caller: Caller, action: Literal["interrupt", "skip"]) -> str:
        """Interrupt or skip the running job on behalf of ``caller``, only if it may (:meth:`Caller.owns`).

        Returns "done", "idle" (nothing runs) or "not yours" (someone else's job runs: left alone).
        """
        with self._cond:
            running = self._running
            if running is None:
                return "idle"
            if not caller.owns(running):
                return "not yours"
            self.state.interrupt() if action == "interrupt" else self.state.skip()
            return "done"

    def stop(self, job: Job[Any]) -> bool:
        """``job`` is no longer wanted (its client left): cancelled if queued, interrupted if running."""
        with self._cond:
            # By identity, not id: a client-chosen id (force_task_id) may repeat another client's.
            if any(queued is job for queued in self._queue):
                self._queue.remove(job)
                job._finish("cancelled")
                self._remember(job)
                self._notify("on_finish", job)
                return True
            if self._running is job:
                self.state.interrupt()
                return True
            return False

    def shutdown(self, wait: bool = True, *, cancel_pending: bool = False, interrupt: bool = False,
                 timeout: float | None = None) -> None:
        """Stop taking jobs; queued jobs still run unless ``cancel_pending``."""
        with self._cond:
            self._closed = True
            if cancel_pending:
                while self._queue:
                    queued = self._queue.popleft()
                    queued._finish("cancelled")
                    self._remember(queued)
                    self._notify("on_finish", queued)
            if interrupt and self._running is not None:
                self.state.interrupt()
            self._cond.notify_all()
        if wait and threading.current_thread() is not self._worker:
            self._worker.join(timeout)

    # -- the worker ----------------------------------------------------------
    def _remember(self, job: Job[Any]) -> None:
        self._finished[job.id] = job
        while len(self._finished) > self._history:
            self._finished.popitem(last=False)

    def _notify(self, event: str, job: Job[Any]) -> None:
        for listener in list(self.listeners):
            try:
                getattr(listener, event)(job)
            except Exception:  # a broken listener (the store's disk is full...) never stops the queue
                log.exception("queue listener %s failed on %s", event, job)

    def _run(self) -> None:
        while True:
            with self._cond:
                job = self._take_next()
                while job is None and not (self._closed and not self._queue):
                    self._cond.wait()
                    job = self._take_next()
                if job is None:
                    return  # closed and drained
                self._running = job
                job.status = "running"
                job.started_at = time.time()
                self.state.begin(job.name, job.job_count, job.id)
            self._notify("on_start", job)
            self._execute(job)

    def _execute(self, job: Job[Any]) -> None:
        ctx = JobContext(job=job, state=self.state, preview_fn=job._preview_fn,
                         preview_every=job._preview_every, progress_bar=self.progress_bar)
        status: JobStatus = "done"
        result: Any = None
        error: BaseException | None = None
        try:
            result = job._fn(ctx)
            if self.state.interrupted:
                status = "interrupted"
        except BaseException as err:  # the worker must outlive any job, whatever it raises
            status, error = "failed", err
            if isinstance(err, ValueError):  # bad input (ProcessingError...): the caller shows the message
                log.warning("job %s (%s) failed: %s", job.id, job.name, err)
            else:
                log.error("job %s (%s) failed", job.id, job.name, exc_info=err)
        finally:
            ctx._close_bar()
            with self._cond:
                self.state.end()
                job._finish(status, result, error)
                self._remember(job)
            # Before the next job is taken: the store names this job's files before anything else runs.
            self._notify("on_finish", job)
            with self._cond:
                self._running = None
                self._cond.notify_all()

    # -- order, fairness, pause (round-robin across owners) ------------------------------------
    def order(self) -> list[Job[Any]]:
        """The waiting jobs in the order the worker will take them (paused owners' jobs left out)."""
        with self._cond:
            per_owner: dict[str | None, list[Job[Any]]] = {}
            for job in self._queue:
                if job.owner not in self._paused:
                    per_owner.setdefault(job.owner, []).append(job)
            # Least recently served first; owners never served by their first job's place in the queue.
            owners = sorted(per_owner, key=lambda o: self._served.get(o, -1))
            out: list[Job[Any]] = []
            for r in range(max((len(v) for v in per_owner.values()), default=0)):
                out.extend(per_owner[o][r] for o in owners if r < len(per_owner[o]))
            return out

    def _take_next(self) -> Job[Any] | None:
        """The next job round-robin across owners (under the lock), or None."""
        best: Job[Any] | None = None
        best_key = None
        seen: set[str | None] = set()
        for job in self._queue:
            if (job.owner in self._paused and not self._closed) or job.owner in seen:
                continue
            seen.add(job.owner)  # only each owner's first job competes
            key = self._served.get(job.owner, -1)
            if best is None or key < best_key:
                best, best_key = job, key
        if best is None:
            return None
        self._queue.remove(best)
        self._tick += 1
        self._served[best.owner] = self._tick
        if len(self._served) > 10_000:  # forget owners with nothing queued (many one-off addresses)
            waiting = {job.owner for job in self._queue}
            self._served = {o: t for o, t in self._served.items() if o in waiting}
        return best

    def queued(self, owner: str | None = None) -> list[Job[Any]]:
        """Waiting jobs (of ``owner`` when given) in queue order, paused ones included."""
        with self._cond:
            return [job for job in self._queue if owner is None or job.owner == owner]

    def move(self, job_id: str, delta: int) -> bool:
        """Move a waiting job ``delta`` places among its owner's waiting jobs (-1: one up)."""
        with self._cond:
            job = next((j for j in self._queue if j.id == job_id), None)
            if job is None:
                return False
            mine = [j for j in self._queue if j.owner == job.owner]
            i = mine.index(job)
            k = max(0, min(len(mine) - 1, i + int(delta)))
            if k == i:
                return False
            slots = [n for n, j in enumerate(self._queue) if j.owner == job.owner]
            mine.insert(k, mine.pop(i))
            for slot, moved in zip(slots, mine):
                self._queue[slot] = moved
            self._cond.notify_all()
            return True

    def set_paused(self, owner: str | None, paused: bool) -> None:
        """Hold (or release) ``owner``'s waiting jobs; a running job is not affected."""
        with self._cond:
            (self._paused.add if paused else self._paused.discard)(owner)
            self._cond.notify_all()

    def is_paused(self, owner: str | None) -> bool:
        with self._cond:
            return owner in self._paused

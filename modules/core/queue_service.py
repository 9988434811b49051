"""The queue as users see it: persistent jobs, their history, and what each caller may do with them.

Ties the in-memory :class:`~modules.core.jobs.JobQueue` (which runs jobs, round-robin across owners)
to the SQLite :class:`~modules.core.job_store.JobStore` (which remembers them):

- every generation job is recorded when it is submitted (GenerationService calls
  :meth:`QueueService.record_generation`), its start and end as the queue reports them, and each
  file as soon as it is saved;
- after a restart, :meth:`QueueService.restore` marks jobs that were running "interrupted" and
  submits the queued ones again, in their order;
- job kinds are strings with a JSON body: "txt2img" and "img2img" are built in; others ("extras",
  "merge") are added with :meth:`QueueService.register_kind`.

Visibility: a caller sees and acts on its own jobs; an admin (core/callers.py) on everybody's.
"""
from __future__ import annotations

import collections
import logging
import os
import threading
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Protocol

from modules.core.job_store import FINISHED, HistoryQuery, JobOutput, JobRecord, JobStore
from modules.core.jobs import Caller, Job

log = logging.getLogger(__name__)

__all__ = ["QueueService", "KindRunner", "JobView", "NotFound", "QueueActionError", "params_to_body",
           "params_from_body"]


class NotFound(LookupError):
    """No such job, or not one the caller may see (the two are not told apart)."""


class QueueActionError(ValueError):
    """An action that does not apply to the job in its state (cancel a finished job...)."""


class KindRunner(Protocol):
    """How jobs of one kind are queued from their stored body (after a restart, or on Re-run).

    A runner may also have ``prepare_api(params: dict, caller: Caller) -> JobRecord``: for
    ``POST /queue/v1/jobs`` with its kind, it checks the request's ``params`` (ValueError/HTTP 4xx on bad
    input), records the row (``QueueService.record(kind, body, owner=caller.name, source="queue-api")``)
    and queues it through its own ``submit``. Without it, the kind is restored and re-run but not
    accepted by the API."""

    def submit(self, record: JobRecord, *, bounded: bool) -> Job[Any]:
        """Queue the job `record` describes, with ``meta={"rid": record.id}`` and ``owner=record.owner``."""


@dataclass
class JobView:
    """A job as the UI and /queue/v1 show it."""
    record: JobRecord
    position: int | None = None     # 0: running; None: finished
    eta: float | None = None        # seconds until it is done, estimated
    progress: float | None = None   # of the running job
    paused: bool = False


# --------------------------------------------------------------------------- params <-> JSON

def _dataclass_from(cls: type, data: dict[str, Any]) -> Any:
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in names})


def params_to_body(params: Any, inputs_dir: Path) -> dict[str, Any]:
    """The typed params as JSON; img2img's images are written as PNG files under ``inputs_dir`` first."""
    from modules.core import atomic

    data: dict[str, Any] = {}
    for f in fields(params):
        value = getattr(params, f.name)
        if f.name in ("init_images", "mask"):
            continue
        if f.name == "controlnet_units":   # units carry images: written as PNG files beside the init images
            data[f.name] = [_unit_to_body(i, u, inputs_dir) for i, u in enumerate(value or [])]
            continue
        data[f.name] = value.__dict__.copy() if hasattr(value, "__dataclass_fields__") else value
    images = list(getattr(params, "init_images", None) or [])
    mask = getattr(params, "mask", None)
    if images or mask is not None:
        inputs_dir.mkdir(parents=True, exist_ok=True)
        names = []
        for i, image in enumerate(images):
            names.append(f"init-{i}.png")
            atomic.atomic_write_bytes(inputs_dir / names[-1], _png(image))
        data["init_images"] = names
        if mask is not None:
            atomic.atomic_write_bytes(inputs_dir / "mask.png", _png(mask))
            data["mask"] = "mask.png"
    return data


def _unit_to_body(index: int, unit: Any, inputs_dir: Path) -> dict[str, Any]:
    from modules.core import atomic

    data = {k: v for k, v in unit.__dict__.items() if k not in ("image", "mask")}
    for name in ("image", "mask"):
        image = getattr(unit, name, None)
        if image is not None:
            inputs_dir.mkdir(parents=True, exist_ok=True)
            data[name] = f"controlnet-{index}-{name}.png"
            atomic.atomic_write_bytes(inputs_dir / data[name], _png(image))
    return data


def _units_from_body(units: list[dict[str, Any]], load: Any) -> list[Any]:
    from modules.core.controlnet_units import ControlNetUnit

    out = []
    for data in units or []:
        data = dict(data)
        for name in ("image", "mask"):
            data[name] = load(data[name]) if data.get(name) else None
        out.append(_dataclass_from(ControlNetUnit, data))
    return out


def _png(image: Any) -> bytes:
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def params_from_body(kind: str, data: dict[str, Any], inputs_dir: Path) -> Any:
    """Typed params again from :func:`params_to_body`'s JSON (fields unknown to this version are dropped)."""
    from PIL import Image

    from modules.core.pipeline import HiresParams, Img2ImgParams, Txt2ImgParams

    data = dict(data)

    def load(name: str) -> Any:
        path = (inputs_dir / Path(name).name)   # only a file name, inside the job's own folder
        with Image.open(path) as image:
            image.load()
            return image.copy()
    data["controlnet_units"] = _units_from_body(data.get("controlnet_units") or [], load)
    if kind == "txt2img":
        data["hires"] = _dataclass_from(HiresParams, data.get("hires") or {})
        return _dataclass_from(Txt2ImgParams, data)
    if kind != "img2img":
        raise QueueActionError(f"not a generation kind: {kind!r}")
    data["init_images"] = [load(n) for n in data.get("init_images") or []]
    data["mask"] = load(data["mask"]) if data.get("mask") else None
    return _dataclass_from(Img2ImgParams, data)


# --------------------------------------------------------------------------- the service

class GenerationKind:
    """txt2img / img2img: the body is {"params", "override_settings", "restore_settings", "script"}."""

    def __init__(self, service: "QueueService"):
        self.service = service

    def submit(self, record: JobRecord, *, bounded: bool) -> Job[Any]:
        body = record.body
        if body.get("script"):
            raise QueueActionError("this job used a script; run it again from its tab")
        params = params_from_body(record.kind, body.get("params") or {}, self.service.inputs_dir(record.id))
        return self.service.generation.submit(
            params, override_settings=body.get("override_settings") or None,
            restore_settings=bool(body.get("restore_settings", True)), job_id=record.id, owner=record.owner,
            meta={"rid": record.id}, bounded=bounded)


class QueueService:
    def __init__(self, store: JobStore, generation: Any, *, data_dir: Path, outputs_dir: Path,
                 single_user: bool = False):
        self.store = store
        self.generation = generation
        self.queue = generation.queue
        self.data_dir = Path(data_dir)
        self.outputs_dir = Path(outputs_dir)
        self.single_user = single_user
        self.kinds: dict[str, KindRunner] = {}
        self._durations: collections.deque[float] = collections.deque(maxlen=20)
        self._lock = threading.Lock()
        for kind in ("txt2img", "img2img"):
            self.register_kind(kind, GenerationKind(self))
        self.queue.listeners.append(self)
        generation.queue_service = self

    def register_kind(self, kind: str, runner: KindRunner) -> None:
        """Jobs of `kind` can be queued from a stored body (restart, Re-run, POST /queue/v1/jobs)."""
        self.kinds[kind] = runner

    def inputs_dir(self, job_id: str) -> Path:
        return self.data_dir / "queue" / "inputs" / Path(job_id).name

    # -- recording (called by GenerationService.submit and by the queue) ----------------------
    def record_generation(self, params: Any, *, owner: str | None, source: str,
                          override_settings: dict[str, Any] | None, restore_settings: bool,
                          scripted: bool) -> str:
        """Insert the row of a generation job about to be queued; returns its id."""
        rid = JobRecord.new_id()
        body = {"params": params_to_body(params, self.inputs_dir(rid)),
                "override_settings": dict(override_settings or {}), "restore_settings": restore_settings,
                "script": scripted}
        model = str((override_settings or {}).get("sd_model_checkpoint") or "")
        self.store.insert(JobRecord(id=rid, owner=owner, source=source, kind=params.kind, body=body,
                                    detached=source != "api", prompt=params.prompt or "", model=model))
        return rid

    def record(self, kind: str, body: dict[str, Any], *, owner: str | None, source: str, prompt: str = "",
               model: str = "") -> JobRecord:
        """Insert the row of a job of another kind (the caller queues it with meta={"rid": id})."""
        return self.store.insert(JobRecord(id=JobRecord.new_id(), owner=owner, source=source, kind=kind, body=body,
                                           detached=source != "api", prompt=prompt, model=model))

    def discard(self, rid: str) -> None:
        """The submit that recorded `rid` failed (queue full...): no trace of it."""
        self.store.delete(rid)
        self._remove_inputs(rid)

    def on_start(self, job: Job[Any]) -> None:
        rid = job.meta.get("rid")
        if rid:
            self.store.mark_started(rid, job.started_at)

    def on_finish(self, job: Job[Any]) -> None:
        rid = job.meta.get("rid")
        if job.status == "done" and job.started_at and job.finished_at and job.name in ("txt2img", "img2img"):
            with self._lock:
                self._durations.append(job.finished_at - job.started_at)
        if not rid:
            return
        result = job._result if job.status in ("done", "interrupted") else None  # noqa: SLF001
        info, model = None, None
        if result is not None and hasattr(result, "infotexts"):
            first = getattr(result, "index_of_first_image", 0)
            info = result.infotexts[first] if len(result.infotexts) > first else None
            model = getattr(result, "sd_model_name", None)
            known = {o.path for o in self.store.outputs(rid)}
            for path in getattr(result, "saved_paths", None) or []:   # files saved past the on_saved hook
                if str(path) not in known:
                    self.store.add_output(rid, JobOutput(path=str(path)))
        error = None if job.error is None else (str(job.error) or type(job.error).__name__)
        self.store.mark_finished(rid, job.status, error=error, info=info, model=model, at=job.finished_at)

    def on_saved(self, path: str, infotext: str | None, grid: bool) -> None:
        """A file of the running job is on disk (written atomically): name it in its row."""
        running = self.queue.running()
        rid = running.meta.get("rid") if running is not None else None
        if rid:
            self.store.add_output(rid, JobOutput(path=str(path), infotext=infotext or "", grid=grid))

    # -- startup ------------------------------------------------------------------------------
    def restore(self) -> dict[str, int]:
        """After a restart: running jobs -> interrupted; queued ones queued again, in their order."""
        interrupted = self.store.recover()
        for owner in self.store.paused_owners():
            self.queue.set_paused(owner, True)
        requeued = failed = 0
        for rec in self.store.unfinished():
            if not rec.detached:
                self.store.mark_finished(rec.id, "interrupted", error="the server restarted while its client waited")
                continue
            try:
                self._submit_record(rec, bounded=False)
                requeued += 1
            except Exception as err:  # noqa: BLE001 - one bad row must not stop the others
                failed += 1
                self.store.mark_finished(rec.id, "failed", error=f"could not be queued again: {err}")
        if interrupted or requeued or failed:
            log.info("Job queue restored: %d queued again, %d interrupted by the restart, %d could not be queued",
                     requeued, len(interrupted), failed)
        return {"requeued": requeued, "interrupted": len(interrupted), "failed": failed}

    def _submit_record(self, rec: JobRecord, *, bounded: bool) -> Job[Any]:
        runner = self.kinds.get(rec.kind)
        if runner is None:
            raise QueueActionError(f"no runner for jobs of kind {rec.kind!r}")
        return runner.submit(rec, bounded=bounded)

    # -- looking ------------------------------------------------------------------------------
    def visible(self, caller: Caller, rec: JobRecord | None) -> bool:
        return rec is not None and (caller.admin or (rec.owner is not None and rec.owner == caller.name))

    def get(self, caller: Caller, rid: str) -> JobRecord:
        rec = self.store.get(rid)
        if not self.visible(caller, rec):
            raise NotFound(f"no job {rid!r}")
        return rec  # type: ignore[return-value]

    def live_job(self, rid: str) -> Job[Any] | None:
        running = self.queue.running()
        if running is not None and running.meta.get("rid") == rid:
            return running
        return next((j for j in self.queue.queued() if j.meta.get("rid") == rid), None)

    def average_seconds(self) -> float | None:
        with self._lock:
            return sum(self._durations) / len(self._durations) if self._durations else None

    def eta(self, job: Job[Any]) -> float | None:
        """Seconds until `job` is done: the running job's rest plus the jobs ahead, from recent run times."""
        position = self.queue.queue_position(job)
        if position is None:
            return None
        average = self.average_seconds()
        state = self.generation.state
        running = self.queue.running()
        rest = 0.0
        if running is not None:
            progress = state.progress()
            rest = state.eta_relative() if progress > 0 else (average or 0.0)
            if running is job:
                return rest
        if average is None:
            return None
        ahead = position - (1 if running is not None else 0)
        return rest + (ahead + 1) * average

    def view(self, rec: JobRecord) -> JobView:
        job = self.live_job(rec.id) if rec.status in ("queued", "running") else None
        if job is None:
            return JobView(record=rec, paused=False)
        position = self.queue.queue_position(job)
        running = self.queue.running() is job
        return JobView(record=rec, position=position, eta=self.eta(job),
                       progress=self.generation.state.progress() if running else None,
                       paused=not running and self.queue.is_paused(job.owner))

    def unfinished(self, caller: Caller, *, owner: str | None = None) -> list[JobView]:
        """Running then queued jobs the caller may see, in the order they will run."""
        if not caller.admin:
            owner = caller.name
        recs = {r.id: r for r in self.store.unfinished() if owner is None or r.owner == owner}
        views = [self.view(r) for r in recs.values()]
        big = 10 ** 9
        return sorted(views, key=lambda v: (v.position if v.position is not None else big, v.record.seq))

    def list(self, caller: Caller, *, owner: str | None = None, statuses: tuple[str, ...] = (),
             limit: int = 100, offset: int = 0) -> list[JobView]:
        if not caller.admin:
            owner = caller.name
        recs = self.store.list(owner=owner, statuses=statuses or None, limit=limit, offset=offset, newest_first=True)
        return [self.view(r) for r in recs]

    def history(self, caller: Caller, query: HistoryQuery) -> tuple[list[JobRecord], int]:
        if not caller.admin:
            query.owner = caller.name
        return self.store.history(query)

    def display_owner(self, owner: str | None) -> str:
        """The login name; "local" for the one user of a local server; the address otherwise."""
        if owner is None:
            return "server"
        kind, _, name = owner.partition(":")
        if kind == "addr" and self.single_user:
            return "local"
        return name or owner

    # -- acting ---------------------------------------------------------------------------------
    def cancel(self, caller: Caller, rid: str) -> str:
        """Cancel a queued job or interrupt a running one; returns what was done."""
        rec = self.get(caller, rid)
        job = self.live_job(rid)
        if job is None:
            raise QueueActionError(f"job {rid} is {rec.status}; only a queued or running job can be cancelled")
        if self.queue.stop(job):
            return "interrupted" if self.queue.running() is job else "cancelled"
        raise QueueActionError(f"job {rid} has just finished")

    def move(self, caller: Caller, rid: str, delta: int) -> bool:
        """Move a queued job up (-1) or down (+1) among its owner's queued jobs."""
        self.get(caller, rid)
        job = self.live_job(rid)
        if job is None or self.queue.running() is job:
            raise QueueActionError("only a waiting job can be moved")
        if not self.queue.move(job.id, int(delta)):
            return False
        # The store keeps the new order for a restart.
        self.store.reorder([j.meta["rid"] for j in self.queue.queued(job.owner) if j.meta.get("rid")])
        return True

    def set_paused(self, caller: Caller, paused: bool, owner: str | None = None) -> None:
        """Pause (or resume) the caller's own queue; an admin may name another owner's."""
        target = owner if (owner is not None and caller.admin) else caller.name
        self.queue.set_paused(target, paused)
        if target is not None:
            self.store.set_paused(target, paused)

    def is_paused(self, caller: Caller) -> bool:
        return self.queue.is_paused(caller.name)

    def rerun(self, caller: Caller, rid: str) -> JobRecord:
        """The same job again (same kind and body), queued as a new job of the caller."""
        rec = self.get(caller, rid)
        if rec.kind not in self.kinds:
            raise QueueActionError(f"jobs of kind {rec.kind!r} cannot be run again here")
        if rec.body.get("script"):
            raise QueueActionError("this job used a script; run it again from its tab")
        body = dict(rec.body)
        inputs = self.inputs_dir(rec.id)
        new = JobRecord(id=JobRecord.new_id(), owner=caller.name, source=rec.source if rec.detached else "ui",
                        kind=rec.kind, body=body, detached=True, prompt=rec.prompt, model=rec.model)
        if inputs.is_dir():
            import shutil

            shutil.copytree(inputs, self.inputs_dir(new.id))
        self.store.insert(new)
        try:
            self._submit_record(new, bounded=True)
        except BaseException:
            self.discard(new.id)
            raise
        return new

    def delete(self, caller: Caller, rid: str) -> list[str]:
        """Delete a finished job and its files (outputs, .txt sidecars, stored inputs); returns the files removed."""
        rec = self.get(caller, rid)
        if rec.status not in FINISHED:
            raise QueueActionError(f"job {rid} is {rec.status}; cancel it first")
        removed: list[str] = []
        for out in self.store.delete(rid):
            path = Path(out.path)
            sidecar = path.with_suffix(".txt")   # save_txt's infotext beside the image
            for file in (path, sidecar) if sidecar != path else (path,):
                if self.inside_outputs(file) and file.is_file():
                    try:
                        file.unlink()
                        removed.append(str(file))
                    except OSError as err:
                        log.warning("could not delete %s: %s", file, err)
        self._remove_inputs(rid)
        return removed

    def folder_of(self, caller: Caller, rid: str) -> str | None:
        """The folder of the job's first output (a path on the server), or None."""
        rec = self.get(caller, rid)
        for out in rec.outputs:
            path = Path(out.path)
            if self.inside_outputs(path):
                return str(path.parent)
        return None

    def inside_outputs(self, path: Path) -> bool:
        """Only files under the outputs folder are ever deleted or shown (a row never names others)."""
        try:
            Path(os.path.realpath(path)).relative_to(os.path.realpath(self.outputs_dir))
            return True
        except ValueError:
            return False

    def _remove_inputs(self, rid: str) -> None:
        import shutil

        folder = self.inputs_dir(rid)
        if folder.is_dir():
            shutil.rmtree(folder, ignore_errors=True)

    # -- submitting detached jobs (the Queue API) ---------------------------------------------
    def submit_generation(self, params: Any, *, owner: str | None, source: str,
                          override_settings: dict[str, Any] | None = None,
                          restore_settings: bool = True) -> JobRecord:
        """Queue a generation job that outlives its client; returns its row."""
        job = self.generation.submit(params, override_settings=override_settings, restore_settings=restore_settings,
                                     owner=owner, source=source)
        rec = self.store.get(job.meta["rid"])
        assert rec is not None
        return rec

    def wait_started(self, rid: str, timeout: float) -> bool:
        """For tests and the benchmark: wait until the job left the queue."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.live_job(rid)
            if job is None or job.status != "queued":
                return True
            time.sleep(0.001)
        return False


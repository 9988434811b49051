"""/queue/v1: submit without waiting, then follow up; the same jobs and history the Queue tab shows.

- ``POST /queue/v1/jobs`` {"kind": "txt2img" | "img2img" | "extras" | ..., "params": {the /sdapi/v1 body}}
  -> 202 {"id", "status", "position", "eta"}
- ``GET /queue/v1/jobs/{id}``: status, position, ETA, progress; images (base64) and infotexts when done
- ``DELETE /queue/v1/jobs/{id}``: cancel a queued job, interrupt a running one
- ``POST /queue/v1/jobs/{id}/move`` {"delta": -1 | 1}, ``POST /queue/v1/jobs/{id}/rerun``,
  ``POST /queue/v1/pause`` {"paused": true}
- ``GET /queue/v1/jobs?user=&status=&limit=&offset=``, ``GET /queue/v1/history?search=&model=&date_from=...``
- ``DELETE /queue/v1/history/{id}``: a finished job and its files

Behind the same login as /sdapi/v1; a user sees and acts only on their own jobs, an admin on all
(core/queue_service.py). Another user's job answers 404, as one that does not exist.
"""
from __future__ import annotations

import base64
import datetime as dt
import logging
from typing import Any, Optional

from fastapi import APIRouter, FastAPI, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from modules.api import models as m
from modules.core.job_store import FINISHED, HistoryQuery, JobRecord
from modules.core.jobs import Caller
from modules.core.queue_service import JobView, NotFound, QueueActionError, QueueService

log = logging.getLogger(__name__)

QUEUE_PREFIX = "/queue/v1"
STATUSES = ("queued", "running", "done", "failed", "cancelled", "interrupted")
MAX_PAGE = 200


class QueueSubmitRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: str = Field(..., description="txt2img, img2img, or another registered kind (extras...)")
    params: dict[str, Any] = Field(default_factory=dict, description="the body the matching /sdapi/v1 route takes")


class QueueMoveRequest(BaseModel):
    delta: int = Field(..., ge=-1000, le=1000, description="-1: one place up (earlier), 1: one down")


class QueuePauseRequest(BaseModel):
    paused: bool
    user: Optional[str] = Field(None, description="admins: whose queue (default: your own)")


class QueueJob(BaseModel):
    id: str
    kind: str
    user: str
    source: str
    status: str
    position: Optional[int] = None
    eta: Optional[float] = None
    progress: Optional[float] = None
    paused: bool = False
    prompt: str = ""
    model: str = ""
    submitted_at: float
    started_at: Optional[float] = None
    finished_at: Optional[float] = None
    error: Optional[str] = None
    info: Optional[str] = None
    files: list[str] = Field(default_factory=list, description="output files, relative to the outputs folder")
    infotexts: list[str] = Field(default_factory=list)
    images: Optional[list[str]] = Field(None, description="base64 PNG/JPEG/WebP of the outputs, when finished")


class QueueJobList(BaseModel):
    jobs: list[QueueJob]
    total: Optional[int] = None


class QueueApi:
    def __init__(self, app: FastAPI, services: Any, api: Any):
        self.services = services
        self.queue: QueueService = services.queue
        self.api = api   # routes.Api: request -> params helpers and the caller policy
        self.router = APIRouter(prefix=QUEUE_PREFIX, tags=["queue"],
                                responses={404: {"model": m.ErrorResponse}, 409: {"model": m.ErrorResponse},
                                           422: {"model": m.ErrorResponse}})
        self._add_routes()
        app.include_router(self.router)
        app.add_exception_handler(NotFound, _error(404))
        app.add_exception_handler(QueueActionError, _error(409))

    def caller(self, request: Request) -> Caller:
        return self.api.caller(request)

    # -- conversion ------------------------------------------------------------------------
    def job_out(self, view: JobView, *, images: bool = False) -> QueueJob:
        rec = view.record
        outputs = [o for o in rec.outputs if not o.grid] or rec.outputs
        return QueueJob(
            id=rec.id, kind=rec.kind, user=self.queue.display_owner(rec.owner), source=rec.source, status=rec.status,
            position=view.position, eta=view.eta, progress=view.progress, paused=view.paused, prompt=rec.prompt,
            model=rec.model, submitted_at=rec.submitted_at, started_at=rec.started_at, finished_at=rec.finished_at,
            error=rec.error, info=rec.info, files=[self._relative(o.path) for o in outputs],
            infotexts=[o.infotext for o in outputs],
            images=[self._read_b64(o.path) for o in outputs] if images and rec.status in FINISHED else None)

    def _relative(self, path: str) -> str:
        try:
            from pathlib import Path

            return str(Path(path).resolve().relative_to(self.queue.outputs_dir.resolve()))
        except ValueError:
            return ""

    def _read_b64(self, path: str) -> str:
        from pathlib import Path

        if not self._relative(path):
            return ""
        try:
            return base64.b64encode(Path(path).read_bytes()).decode("ascii")
        except OSError:
            return ""   # deleted from outputs/ by hand: the row outlives the file

    def _owner_of(self, caller: Caller, user: str | None) -> str | None:
        """`user=` of a listing: yourself, or (admins) anyone; None: everybody's (admins) or your own."""
        if not user:
            return None if caller.admin else caller.name
        wanted = f"user:{user}"
        if caller.admin:
            return wanted if not user.startswith(("user:", "addr:")) else user
        if wanted != caller.name and user != self.queue.display_owner(caller.name):
            raise HTTPException(status_code=403, detail="only an admin may list another user's jobs")
        return caller.name

    # -- submitting ------------------------------------------------------------------------
    async def submit(self, body: QueueSubmitRequest, request: Request) -> JSONResponse:
        caller = self.caller(request)
        kind = body.kind.strip().lower()
        if kind in ("txt2img", "img2img"):
            rec = await self._submit_generation(kind, body.params, caller)
        else:
            runner = self.queue.kinds.get(kind)
            prepare = getattr(runner, "prepare_api", None)
            if runner is None or prepare is None:
                known = ", ".join(k for k, r in self.queue.kinds.items()
                                  if k in ("txt2img", "img2img") or getattr(r, "prepare_api", None))
                raise HTTPException(status_code=422, detail=f"kind {kind!r} cannot be queued here; known: {known}")
            rec = await run_in_threadpool(prepare, body.params, caller)
        view = self.queue.view(self.queue.store.get(rec.id) or rec)
        return JSONResponse({"id": rec.id, "status": view.record.status, "position": view.position,
                             "eta": view.eta}, status_code=202)

    async def _submit_generation(self, kind: str, raw: dict[str, Any], caller: Caller) -> JobRecord:
        from modules.api import routes
        from modules.core.styles import apply_styles_to_params

        model = m.StableDiffusionProcessingTxt2Img if kind == "txt2img" else m.StableDiffusionProcessingImg2Img
        try:
            parsed = model.model_validate(raw)
        except ValidationError as err:
            detail = "; ".join(f"params.{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors())
            raise HTTPException(status_code=422, detail=detail or "invalid params") from None
        req = self.api._prepare(parsed)   # noqa: SLF001 - the same conversion /sdapi/v1 uses
        if req.script_name or req.alwayson_scripts:
            raise HTTPException(status_code=422, detail="scripts (script_name, alwayson_scripts) are not supported "
                                                        "on /queue/v1 yet; use /sdapi/v1")
        if kind == "txt2img":
            params = routes.txt2img_params(req)
        else:
            if not req.init_images:
                raise HTTPException(status_code=422, detail="params.init_images: img2img needs an init image")
            self.api._check_count("init_images", len(req.init_images))   # noqa: SLF001
            limits = self.api.limits

            def decode() -> tuple[list[Any], Any]:
                inits = [routes.decode_base64_to_image(d, field=f"init_images[{i}]", limits=limits)
                         for i, d in enumerate(req.init_images)]
                mask = routes.decode_base64_to_image(req.mask, field="mask", limits=limits) if req.mask else None
                return inits, mask
            inits, mask = await run_in_threadpool(decode)
            params = routes.img2img_params(req, inits, mask)
        # Detached jobs are found again in the history: their images are always saved.
        params.save_images, params.do_not_save_grid = True, False
        apply_styles_to_params(params, self.services.styles, req.styles)
        overrides = self.api.override_settings(req.override_settings)
        restore = True if req.override_settings_restore_afterwards is None else bool(req.override_settings_restore_afterwards)
        return await run_in_threadpool(lambda: self.queue.submit_generation(
            params, owner=caller.name, source="queue-api", override_settings=overrides, restore_settings=restore))

    # -- routes ----------------------------------------------------------------------------
    def _add_routes(self) -> None:
        r = self.router
        q = self.queue

        r.add_api_route("/jobs", self.submit, methods=["POST"], status_code=202,
                        summary="Queue a job without waiting for it")

        @r.get("/jobs/{job_id}", response_model=QueueJob)
        def get_job(job_id: str, request: Request, images: bool = True) -> QueueJob:
            return self.job_out(q.view(q.get(self.caller(request), job_id)), images=images)

        @r.delete("/jobs/{job_id}")
        def cancel_job(job_id: str, request: Request) -> dict[str, str]:
            return {"id": job_id, "result": q.cancel(self.caller(request), job_id)}

        @r.post("/jobs/{job_id}/move")
        def move_job(job_id: str, body: QueueMoveRequest, request: Request) -> dict[str, Any]:
            return {"id": job_id, "moved": q.move(self.caller(request), job_id, body.delta)}

        @r.post("/jobs/{job_id}/rerun", status_code=202)
        def rerun_job(job_id: str, request: Request) -> dict[str, Any]:
            rec = q.rerun(self.caller(request), job_id)
            return {"id": rec.id, "status": rec.status}

        @r.post("/pause")
        def pause(body: QueuePauseRequest, request: Request) -> dict[str, Any]:
            caller = self.caller(request)
            owner = self._owner_of(caller, body.user) if body.user else None
            q.set_paused(caller, body.paused, owner)
            return {"paused": body.paused}

        @r.get("/jobs", response_model=QueueJobList)
        def list_jobs(request: Request, user: Optional[str] = None, status: Optional[str] = None,
                      limit: int = Query(50, ge=1, le=MAX_PAGE), offset: int = Query(0, ge=0)) -> QueueJobList:
            caller = self.caller(request)
            statuses = tuple(s.strip() for s in (status or "").split(",") if s.strip())
            bad = [s for s in statuses if s not in STATUSES]
            if bad:
                raise HTTPException(status_code=422, detail=f"status: {', '.join(bad)} unknown; one of {', '.join(STATUSES)}")
            owner = self._owner_of(caller, user)
            views = q.list(caller, owner=owner, statuses=statuses, limit=limit, offset=offset)
            return QueueJobList(jobs=[self.job_out(v) for v in views])

        @r.get("/history", response_model=QueueJobList)
        def history(request: Request, user: Optional[str] = None, search: str = "", model: str = "",
                    date_from: Optional[str] = None, date_to: Optional[str] = None,
                    limit: int = Query(24, ge=1, le=MAX_PAGE), offset: int = Query(0, ge=0),
                    images: bool = False) -> QueueJobList:
            caller = self.caller(request)
            query = HistoryQuery(owner=self._owner_of(caller, user), search=search[:500], model=model[:500],
                                 date_from=_day(date_from, "date_from"), date_to=_day(date_to, "date_to", end=True),
                                 limit=limit, offset=offset)
            recs, total = q.history(caller, query)
            return QueueJobList(jobs=[self.job_out(JobView(record=rec), images=images) for rec in recs], total=total)

        @r.delete("/history/{job_id}")
        def delete_job(job_id: str, request: Request) -> dict[str, Any]:
            removed = q.delete(self.caller(request), job_id)
            return {"id": job_id, "deleted_files": len(removed)}


def _day(text: str | None, field: str, *, end: bool = False) -> float | None:
    """YYYY-MM-DD (local time) -> epoch seconds at its start (``end``: at the next day's start)."""
    if not text:
        return None
    try:
        day = dt.datetime.strptime(text.strip(), "%Y-%m-%d")
    except ValueError:
        raise HTTPException(status_code=422, detail=f"{field}: expected YYYY-MM-DD, got {text[:40]!r}") from None
    if end:
        day += dt.timedelta(days=1)
    return day.timestamp()


def _error(status: int):
    async def handler(request: Request, exc: Exception) -> JSONResponse:
        text = str(exc)
        return JSONResponse({"error": type(exc).__name__, "detail": text, "body": "", "errors": text},
                            status_code=status)
    return handler

"""The persistent queue's overhead: submit->start latency with an idle worker, and page latency with
1,000 jobs in the history.

Run with the venv's python:  venv/bin/python bench/job_queue.py [--jobs 200] [--history 1000]

1. In-process (the app's services over a temp data dir): GenerationService.submit with the worker idle,
   timed until the job has started and its row says "running" (the store's insert and start commits,
   each fsynced). The job body is replaced by a no-op, so only the queue and the store are measured;
   the same is timed with the store switched off, and the difference is the store's cost. Target <= 20 ms.
2. A real server whose job store holds `--history` finished jobs (each with a small PNG): a page of
   /queue/v1/history (plain, with a prompt search, with a model filter), /queue/v1/jobs, and the Queue
   tab's history event as the page sends it (Gradio's run route, with the page's session). Target <= 100 ms.

Prints figures; asserts nothing (speed targets live here, not in tests).
"""
from __future__ import annotations

import sys
from pathlib import Path

# This file is named like the standard library's `queue` (which requests and gradio import): take its own
# folder off the import path first, then load bench/common.py by its path.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

_spec = importlib.util.spec_from_file_location("bench_common", _HERE / "common.py")
_common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_common)  # puts the repo and tests/ on sys.path

TARGET_SUBMIT_MS = 20.0
TARGET_PAGE_MS = 100.0


def _stats(values: list[float]) -> str:
    ms = sorted(v * 1000 for v in values)
    p95 = ms[min(len(ms) - 1, int(len(ms) * 0.95))]
    return f"median {statistics.median(ms):6.2f} ms  p95 {p95:6.2f} ms  max {ms[-1]:6.2f} ms  (n={len(ms)})"


# --------------------------------------------------------------------------- 1. submit -> start

class _StartClock:
    """A queue listener after the store's: the time the job has started and its row is written."""

    def __init__(self):
        self.started: dict[str, float] = {}
        self.event = threading.Event()

    def on_start(self, job):
        self.started[job.id] = time.perf_counter()
        self.event.set()

    def on_finish(self, job):
        pass


def submit_latency(n: int, with_store: bool) -> list[float]:
    from conftest import make_services
    from modules.core.pipeline import Processed, Txt2ImgParams

    with tempfile.TemporaryDirectory() as data:
        services = make_services(Path(data), {})
        gen, queue = services.generation, services.generation.queue
        gen._run = lambda params, job, options, **kw: Processed(params=params)   # noqa: SLF001 - a no-op job
        if not with_store:
            gen.queue_service = None
            queue.listeners.remove(services.queue)
        clock = _StartClock()
        queue.listeners.append(clock)
        out = []
        try:
            for i in range(n):
                params = Txt2ImgParams(prompt=f"bench {i}", width=64, height=64, steps=1)
                clock.event.clear()
                t0 = time.perf_counter()
                job = gen.submit(params)
                clock.event.wait(10)
                out.append(clock.started[job.id] - t0)
                job.wait(10)
                while queue.running() is not None:   # the finish is written before the worker is idle again
                    time.sleep(0.0005)
        finally:
            queue.shutdown()
            services.queue.store.close()
        return out


# --------------------------------------------------------------------------- 2. pages with 1,000 rows

def fill_history(data: Path, rows: int) -> None:
    from PIL import Image

    from modules.core.job_store import JobOutput, JobRecord, JobStore

    store = JobStore(data / "queue" / "jobs.sqlite3")
    folder = data / "outputs" / "txt2img-images" / "bench"
    folder.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", (64, 64), (120, 40, 200))
    now = time.time()
    for i in range(rows):
        path = folder / f"{i:05d}-{i}.png"
        image.save(path)
        rec = JobRecord(id=JobRecord.new_id(), owner="addr:127.0.0.1", source="ui", kind="txt2img",
                        body={"params": {"prompt": f"prompt {i}"}}, detached=True, status="done",
                        prompt=f"a {'cat' if i % 2 else 'dog'} number {i}", model=f"model-{i % 3}",
                        submitted_at=now - rows + i, started_at=now - rows + i, finished_at=now - rows + i + 0.5)
        store.insert(rec)
        store.add_output(rec.id, JobOutput(path=str(path), infotext=f"a cat number {i}\nSteps: 1"))
    store.close()


def page_latency(rows: int, repeats: int) -> None:
    import requests

    from conftest import start_server

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        t0 = time.perf_counter()
        fill_history(data, rows)
        print(f"  filled {rows} history rows (with files) in {time.perf_counter() - t0:.1f} s")
        srv = start_server(data, "--api")
        try:
            # A new connection per request: on a kept-alive one, Linux's delayed ACK adds ~40 ms to every
            # response uvicorn writes in two sends, which would hide what the route itself costs.
            session = requests
            for label, path, params in (
                    ("API  /sdapi/v1/progress (baseline)", "/sdapi/v1/progress", {}),
                    ("API  /queue/v1/history (page of 24)", "/queue/v1/history", {}),
                    ("API  /queue/v1/history page 20", "/queue/v1/history", {"offset": 24 * 20}),
                    ("API  /queue/v1/history search=cat", "/queue/v1/history", {"search": "cat"}),
                    ("API  /queue/v1/history model filter", "/queue/v1/history", {"model": "model-1"}),
                    ("API  /queue/v1/jobs?limit=50", "/queue/v1/jobs", {"limit": 50})):
                session.get(srv.url + path, params=params, timeout=60).raise_for_status()   # warm
                times = []
                for _ in range(repeats):
                    start = time.perf_counter()
                    r = session.get(srv.url + path, params=params, timeout=60)
                    times.append(time.perf_counter() - start)
                    r.raise_for_status()
                print(f"  {label:40s} {_stats(times)}  {_verdict(times)}")
            _ui_latency(srv, repeats)
            _ui_function_latency(data, repeats)
        finally:
            srv.stop()


def _ui_function_latency(data: Path, repeats: int) -> None:
    """The same Queue-tab handler in-process (no HTTP): the part of the page time that is ours."""
    from types import SimpleNamespace

    from conftest import make_services
    from modules.ui.queue_tab import history_page

    services = make_services(data, {})
    request = SimpleNamespace(username=None, client=SimpleNamespace(host="127.0.0.1"))
    try:
        for label, search in (("UI   history_page() in-process", ""), ("UI   history_page() search=cat", "cat")):
            history_page(services, request, search, "All models", "", "", 0)
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                out = history_page(services, request, search, "All models", "", "", 0)
                times.append(time.perf_counter() - start)
            assert len(out[0]) == 24
            print(f"  {label:40s} {_stats(times)}  {_verdict(times)}")
    finally:
        services.generation.queue.shutdown()


def _ui_latency(srv, repeats: int) -> None:
    """The Queue tab's history event beside the tab's light status tick: the difference is what the history
    costs over Gradio's own per-event overhead."""
    # The same events as one plain HTTP POST each (Gradio's /gradio_api/run route), as a page sends them: with
    # its session id, so Gradio reuses the session's state. Without one, Gradio builds a new session state
    # (the config of every component on the page) for each request, ~150 ms here for this page.
    import requests

    for label, api, data, session in (
            ("UI   POST run/queue_status (baseline)", "queue_status", [None], {"session_hash": "bench"}),
            ("UI   POST run/queue_history", "queue_history", ["", "All models", "", ""], {"session_hash": "bench"}),
            ("UI   POST run/queue_history, no session", "queue_history", ["", "All models", "", ""], {})):
        body = {"data": data, **session}
        requests.post(f"{srv.url}/gradio_api/run/{api}", json=body, timeout=60).raise_for_status()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            requests.post(f"{srv.url}/gradio_api/run/{api}", json=body, timeout=60).raise_for_status()
            times.append(time.perf_counter() - start)
        print(f"  {label:40s} {_stats(times)}  {_verdict(times)}")


def _verdict(times: list[float], target_ms: float = TARGET_PAGE_MS) -> str:
    return "OK" if statistics.median(times) * 1000 <= target_ms else f"OVER the {target_ms:g} ms target"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=200, help="jobs submitted one after another (idle worker)")
    parser.add_argument("--history", type=int, default=1000, help="finished jobs in the history")
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()

    print(f"1. submit -> start, idle worker ({args.jobs} jobs, no-op job body)")
    bare = submit_latency(args.jobs, with_store=False)
    stored = submit_latency(args.jobs, with_store=True)
    print(f"  queue only (no store)  {_stats(bare)}")
    print(f"  queue + SQLite store   {_stats(stored)}  "
          f"{_verdict(stored, TARGET_SUBMIT_MS)} (target <= {TARGET_SUBMIT_MS:g} ms)")
    print(f"  store overhead: +{(statistics.median(stored) - statistics.median(bare)) * 1000:.2f} ms median")
    print(f"2. pages with {args.history} jobs in the history (target <= {TARGET_PAGE_MS:g} ms a page)")
    page_latency(args.history, args.repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())

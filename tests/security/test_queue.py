"""The job queue against a real server: the event loop stays free, the queue is bounded, a client that
leaves takes its job with it, and interrupt/skip/previews belong to the job's owner.

Every server binds 127.0.0.1 on a free port (conftest.start_server); every request loop is bounded in
count and in time.
"""
from __future__ import annotations

import statistics
import threading
import time

import pytest
import requests

from conftest import start_server, wait_until

TINY = {"prompt": "a cat", "width": 64, "height": 64, "steps": 2, "seed": 1}
LONG = {**TINY, "steps": 150, "seed": 7}    # long enough to act on while it runs (interrupted by the tests)
USERS = {"a": "pa", "b": "pb", "root": "pr"}


def _api(srv, path: str) -> str:
    assert srv.url.startswith("http://127.0.0.1:")
    return f"{srv.url}/sdapi/v1/{path}"


def _progress(srv, user: str | None = None, **params) -> dict:
    r = requests.get(_api(srv, "progress"), params=params, auth=_auth(user), timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def _auth(user: str | None):
    return (user, USERS[user]) if user else None


def _in_background(fn) -> tuple[threading.Thread, dict]:
    out: dict = {}

    def run():
        try:
            out["r"] = fn()
        except Exception as err:  # noqa: BLE001 - the test reads it
            out["error"] = err
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


def _running_step(srv, user: str | None, steps: int = 3):
    def check():
        body = _progress(srv, user)
        return body if body["state"]["job"] == "txt2img" and body["state"]["sampling_step"] >= steps else None
    return wait_until(check, 120, f"a txt2img job past step {steps}")


def _idle(srv, user: str | None = None):
    return wait_until(lambda: (lambda b: b if b["state"]["job"] == "" and b["queue_pending"] == 0 else None)(
        _progress(srv, user)), 120, "an idle queue")


# --------------------------------------------------------------------------- servers

@pytest.fixture(scope="module")
def local_server(tmp_path_factory):
    """No login, 127.0.0.1 only: its one user may act on every job."""
    from tiny_models import make_checkpoint

    root = tmp_path_factory.mktemp("queue-local")
    ckpt_dir = root / "models" / "Stable-diffusion"
    make_checkpoint(ckpt_dir / "a-tiny-sd1.safetensors", "sd1")
    # A larger SDXL checkpoint (wider UNet and text encoders) whose load takes seconds on this CPU.
    make_checkpoint(ckpt_dir / "b-big-sdxl.safetensors", "sdxl", unet_block_out_channels=(64, 128, 256),
                    te_width=(384, 512), te_layers=(4, 4))
    # --no-hashing: the load job goes straight to the model manager (and holds its lock for the whole load).
    srv = start_server(root, "--api", "--no-hashing")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def users_server(tmp_path_factory):
    """Three Basic-auth users; root is an admin."""
    from tiny_models import make_checkpoint

    root = tmp_path_factory.mktemp("queue-users")
    make_checkpoint(root / "models" / "Stable-diffusion" / "tiny-sd1.safetensors", "sd1")
    creds = ",".join(f"{u}:{p}" for u, p in USERS.items())
    srv = start_server(root, "--api", "--api-auth", creds, "--admin-users", "root")
    r = requests.post(_api(srv, "options"), json={"show_progress_every_n_steps": 2, "live_previews_enable": True},
                      auth=_auth("root"), timeout=60)
    assert r.status_code == 200, r.text
    yield srv
    srv.stop()


def _txt2img(srv, user: str | None, payload: dict, timeout: float = 300) -> requests.Response:
    return requests.post(_api(srv, "txt2img"), json=payload, auth=_auth(user), timeout=timeout)


# --------------------------------------------------------------------------- 1. off the event loop

def _latencies(srv, path: str, n: int) -> list[float]:
    out = []
    for _ in range(n):
        start = time.perf_counter()
        r = requests.get(srv.url + path, timeout=30)
        out.append(time.perf_counter() - start)
        assert r.status_code == 200, r.text
    return out


def _ms(values: list[float]) -> str:
    if not values:
        return "no samples"
    return (f"{len(values)} samples, median {statistics.median(values) * 1000:.0f}ms, "
            f"max {max(values) * 1000:.0f}ms")


# A light UI route (through the same event loop and the Gradio mount), the page and its config.
UI_PATHS = ("/gradio_api/app_id", "/", "/config")


@pytest.mark.slow
def test_progress_and_ui_answer_quickly_while_a_checkpoint_loads(local_server):
    srv = local_server
    assert _txt2img(srv, None, TINY).status_code == 200   # the small model is loaded and warm
    base = _latencies(srv, "/sdapi/v1/progress", 5)
    base_ui = {path: _latencies(srv, path, 5) for path in UI_PATHS}
    started = time.monotonic()
    switch, out = _in_background(lambda: requests.post(_api(srv, "options"), timeout=600,
                                                       json={"sd_model_checkpoint": "b-big-sdxl.safetensors"}))
    wait_until(lambda: _progress(srv)["state"]["job"] == "load checkpoint", 60, "the checkpoint load to start", 0.01)
    # A setting whose onchange callback waits for the model manager, which the load holds: its POST must
    # wait on a worker thread, not on the event loop.
    limit, limit_out = _in_background(lambda: requests.post(_api(srv, "options"), json={"sd_checkpoints_limit": 2},
                                                            timeout=600))
    during, ui, samples = [], {path: [] for path in UI_PATHS}, 0
    while switch.is_alive() and samples < 40 and time.monotonic() - started < 300:
        during += _latencies(srv, "/sdapi/v1/progress", 1)
        ui["/gradio_api/app_id"] += _latencies(srv, "/gradio_api/app_id", 1)
        heavy = ("/", "/config")[samples % 2]        # the page and its config cost ~100 ms each: every other turn
        ui[heavy] += _latencies(srv, heavy, 1)
        samples += 1
        time.sleep(0.01)
    load_seconds = time.monotonic() - started
    switch.join(600)
    limit.join(600)
    assert "error" not in out and out["r"].status_code == 200, out
    assert "error" not in limit_out and limit_out["r"].status_code == 200, limit_out
    report = (f"load {load_seconds:.2f}s; GET /sdapi/v1/progress idle {_ms(base)}, during the load {_ms(during)}; "
              + "; ".join(f"GET {path} idle {_ms(base_ui[path])}, during the load {_ms(ui[path])}" for path in ui))
    print(report)
    assert len(during) >= 4, f"too few samples (a blocked event loop, or a load too quick to measure): {report}"
    assert statistics.median(during) < 0.1, report
    assert statistics.median(ui["/gradio_api/app_id"]) < 0.1, report
    # The page and its config cost 80-200 ms of Gradio's own rendering on this CPU even when idle, and that
    # CPU work shares 2 cores and the GIL with the load (measured: median 150 ms idle -> 420 ms during the
    # load in a full-suite run): recorded above, only checked for being answered at all.
    for path in ("/", "/config"):
        assert ui[path] and max(ui[path]) < 5, report


# --------------------------------------------------------------------------- 2. bounded queue

@pytest.mark.slow
def test_a_client_over_its_share_of_the_queue_is_refused_with_429(users_server):
    srv = users_server
    first, first_out = _in_background(lambda: _txt2img(srv, "a", LONG))
    _running_step(srv, "a", 1)
    waiting = [_in_background(lambda: _txt2img(srv, "a", TINY)) for _ in range(3)]   # 4 unfinished: the default bound
    wait_until(lambda: _progress(srv, "a")["queue_pending"] == 3, 60, "three queued jobs")
    r = _txt2img(srv, "a", TINY, timeout=60)
    assert r.status_code == 429, r.text
    assert "limit per client is 4" in r.json()["detail"] and "--queue-max-per-client" in r.json()["detail"]
    # Another user is not held back by a's jobs.
    other, other_out = _in_background(lambda: _txt2img(srv, "b", TINY))
    wait_until(lambda: _progress(srv, "b")["queue_pending"] == 4, 60, "b's job queued")
    assert requests.post(_api(srv, "interrupt"), auth=_auth("a"), timeout=30).status_code == 200
    for thread, out in [(first, first_out), *waiting, (other, other_out)]:
        thread.join(300)
        assert out["r"].status_code == 200, out
    _idle(srv, "a")


# --------------------------------------------------------------------------- 3. a client that leaves

@pytest.mark.slow
def test_a_client_that_disconnects_takes_its_queued_and_running_jobs_with_it(local_server):
    srv = local_server
    assert requests.post(_api(srv, "options"), json={"sd_model_checkpoint": "a-tiny-sd1.safetensors"},
                         timeout=600).status_code == 200
    many = {**TINY, "steps": 150, "n_iter": 20, "seed": 3}   # minutes of work
    # Running: the client gives up after 3 s; the job must stop long before its 20 images are done.
    gone, gone_out = _in_background(lambda: requests.post(_api(srv, "txt2img"), json=many, timeout=(10, 3)))
    _running_step(srv, None, 1)
    gone.join(60)
    assert isinstance(gone_out.get("error"), requests.exceptions.ReadTimeout)
    left = time.monotonic()
    _idle(srv)
    stopped_after = time.monotonic() - left
    # Queued: behind a job of a patient client, a leaving client's job is cancelled before it starts.
    kept, kept_out = _in_background(lambda: _txt2img(srv, None, LONG))
    _running_step(srv, None, 1)
    queued, queued_out = _in_background(lambda: requests.post(_api(srv, "txt2img"), json=many, timeout=(10, 2)))
    wait_until(lambda: _progress(srv)["queue_pending"] == 1, 30, "the second job queued", 0.02)
    queued.join(60)
    assert isinstance(queued_out.get("error"), requests.exceptions.ReadTimeout)
    wait_until(lambda: _progress(srv)["queue_pending"] == 0, 10, "the queued job cancelled")
    assert _progress(srv)["state"]["job"] == "txt2img"      # the patient client's job still runs
    requests.post(_api(srv, "interrupt"), timeout=30)
    kept.join(300)
    assert kept_out["r"].status_code == 200
    print(f"running job stopped {stopped_after:.2f}s after its client left")
    assert stopped_after < 20, stopped_after


# --------------------------------------------------------------------------- 4. your own job

@pytest.mark.slow
def test_interrupt_skip_and_previews_belong_to_the_jobs_owner(users_server):
    srv = users_server
    job, out = _in_background(lambda: _txt2img(srv, "a", LONG))
    _running_step(srv, "a", 4)
    theirs = _progress(srv, "b")
    assert theirs["state"]["job"] == "txt2img"            # the queue's state is public...
    assert theirs["current_image"] is None and theirs["textinfo"] is None   # ...the preview is not
    for action in ("interrupt", "skip"):
        r = requests.post(_api(srv, action), auth=_auth("b"), timeout=30)
        assert r.status_code == 409 and "another client" in r.json()["detail"], r.text
    before = _progress(srv, "a")["state"]["sampling_step"]
    wait_until(lambda: _progress(srv, "a")["state"]["sampling_step"] > before + 1, 60, "a's job to go on")
    assert not _progress(srv, "a")["state"]["interrupted"]
    assert wait_until(lambda: _progress(srv, "a")["current_image"], 60, "a's preview")   # the owner sees it
    assert requests.post(_api(srv, "interrupt"), auth=_auth("a"), timeout=30).status_code == 200
    job.join(300)
    assert out["r"].status_code == 200 and len(out["r"].json()["images"]) == 1
    _idle(srv, "a")
    # An admin may stop anyone's job and see its preview.
    job, out = _in_background(lambda: _txt2img(srv, "a", LONG))
    _running_step(srv, "a", 4)
    assert wait_until(lambda: _progress(srv, "root")["current_image"], 60, "the admin's view of the preview")
    assert requests.post(_api(srv, "interrupt"), auth=_auth("root"), timeout=30).status_code == 200
    job.join(300)
    assert out["r"].status_code == 200
    # Nothing runs: interrupt and skip answer 200 {} as in A1111.
    _idle(srv, "b")
    for action in ("interrupt", "skip"):
        r = requests.post(_api(srv, action), auth=_auth("b"), timeout=30)
        assert r.status_code == 200 and r.json() == {}

"""The persistent queue against a real server, over /queue/v1: no job lost, each user's jobs in order and
interleaved across users, cancel and reorder, per-user visibility, and a kill -9 then restart.

Jobs are tiny (64x64, 1 step on tests/tiny_models' SD1) so 50 of them finish in about a minute here.
"""
from __future__ import annotations

import base64
import io
import os
import signal
import time

import pytest
import requests
from PIL import Image

from conftest import start_server, wait_until

USERS = {"a": "pa", "b": "pb", "c": "pc", "root": "pr"}
TINY = {"width": 64, "height": 64, "steps": 1, "seed": 3}
LONG = {"prompt": "blocker", "width": 64, "height": 64, "steps": 150, "seed": 1}


def _url(srv, path: str) -> str:
    assert srv.url.startswith("http://127.0.0.1:")
    return f"{srv.url}/queue/v1/{path}"


def _auth(user: str | None):
    return (user, USERS[user]) if user else None


def _submit(srv, user: str | None, params: dict, kind: str = "txt2img") -> str:
    r = requests.post(_url(srv, "jobs"), json={"kind": kind, "params": params}, auth=_auth(user), timeout=60)
    assert r.status_code == 202, r.text
    return r.json()["id"]


def _get(srv, user: str | None, job_id: str, **params) -> requests.Response:
    return requests.get(_url(srv, f"jobs/{job_id}"), params=params, auth=_auth(user), timeout=60)


def _status(srv, user, job_id) -> dict:
    r = _get(srv, user, job_id, images=False)
    assert r.status_code == 200, r.text
    return r.json()


def _wait_status(srv, user, job_id, statuses, timeout=300) -> dict:
    return wait_until(lambda: (lambda j: j if j["status"] in statuses else None)(_status(srv, user, job_id)),
                 timeout, f"job {job_id} to be {statuses}")


def _wait_running(srv, user, job_id) -> dict:
    return wait_until(lambda: (lambda j: j if j["status"] == "running" and (j["progress"] or 0) > 0 else None)(
        _status(srv, user, job_id)), 300, f"job {job_id} to run")


@pytest.fixture(scope="module")
def users_server(tmp_path_factory):
    """Four Basic-auth users, root the admin; no per-user bound, room for 60 waiting jobs."""
    from tiny_models import make_checkpoint

    root = tmp_path_factory.mktemp("queue-api")
    make_checkpoint(root / "models" / "Stable-diffusion" / "tiny-sd1.safetensors", "sd1")
    creds = ",".join(f"{u}:{p}" for u, p in USERS.items())
    srv = start_server(root, "--api", "--api-auth", creds, "--admin-users", "root", "--queue-max-per-client", "0",
                       "--queue-max-total", "60")
    yield srv
    srv.stop()


def _blocker(srv) -> str:
    """An admin job that holds the worker until it is cancelled, so what is queued behind it waits."""
    job_id = _submit(srv, "root", LONG)
    _wait_running(srv, "root", job_id)
    return job_id


@pytest.mark.slow
def test_fifty_jobs_from_three_users_none_lost_in_order_and_interleaved(users_server):
    srv = users_server
    blocker = _blocker(srv)
    counts = {"a": 20, "b": 15, "c": 15}
    submitted: dict[str, list[str]] = {u: [] for u in counts}
    for i in range(max(counts.values())):   # each user's i-th job, users in turn
        for user, n in counts.items():
            if i < n:
                submitted[user].append(_submit(srv, user, {**TINY, "prompt": f"{user} job {i}"}))
    listed = requests.get(_url(srv, "jobs"), params={"status": "queued", "limit": 200}, auth=_auth("root"), timeout=60)
    assert listed.status_code == 200 and len(listed.json()["jobs"]) == 50
    assert requests.delete(_url(srv, f"jobs/{blocker}"), auth=_auth("root"), timeout=60).json()["result"] == "interrupted"

    done = {u: [_wait_status(srv, u, j, ("done",), timeout=600) for j in ids] for u, ids in submitted.items()}
    # None lost: every job done, with its own image file.
    for user, jobs in done.items():
        for i, job in enumerate(jobs):
            assert job["prompt"] == f"{user} job {i}" and len(job["files"]) == 1 and job["user"] == user
            assert (srv.data_dir / "outputs" / job["files"][0]).is_file()
    # Each user's jobs started in the order they were submitted.
    for jobs in done.values():
        starts = [j["started_at"] for j in jobs]
        assert starts == sorted(starts)
    # Round-robin: while all three have jobs waiting, every three starts serve all three users.
    order = [j["user"] for j in sorted((j for jobs in done.values() for j in jobs), key=lambda j: j["started_at"])]
    assert [set(order[k:k + 3]) for k in range(0, 45, 3)] == [{"a", "b", "c"}] * 15, order
    assert order[45:] == ["a"] * 5
    assert _status(srv, "root", blocker)["status"] == "interrupted"


def test_cancel_and_reorder(users_server):
    srv = users_server
    blocker = _blocker(srv)
    x, y, z = (_submit(srv, "a", {**TINY, "prompt": f"reorder {n}"}) for n in "xyz")
    assert [_status(srv, "a", j)["position"] for j in (x, y, z)] == [1, 2, 3]
    for _ in range(2):   # z to the front of a's jobs
        r = requests.post(_url(srv, f"jobs/{z}/move"), json={"delta": -1}, auth=_auth("a"), timeout=60)
        assert r.status_code == 200 and r.json()["moved"], r.text
    assert [_status(srv, "a", j)["position"] for j in (z, x, y)] == [1, 2, 3]
    r = requests.delete(_url(srv, f"jobs/{y}"), auth=_auth("a"), timeout=60)
    assert r.status_code == 200 and r.json()["result"] == "cancelled"
    assert _status(srv, "a", y)["status"] == "cancelled"
    again = requests.delete(_url(srv, f"jobs/{y}"), auth=_auth("a"), timeout=60)
    assert again.status_code == 409, again.text    # a finished job cannot be cancelled
    requests.delete(_url(srv, f"jobs/{blocker}"), auth=_auth("root"), timeout=60)
    jz, jx = (_wait_status(srv, "a", j, ("done",)) for j in (z, x))
    assert jz["started_at"] < jx["started_at"]
    assert _status(srv, "a", y)["started_at"] is None


def test_pause_holds_only_that_users_jobs(users_server):
    srv = users_server
    assert requests.post(_url(srv, "pause"), json={"paused": True}, auth=_auth("b"), timeout=60).status_code == 200
    held = _submit(srv, "b", {**TINY, "prompt": "held"})
    other = _submit(srv, "c", {**TINY, "prompt": "not held"})
    _wait_status(srv, "c", other, ("done",))
    job = _status(srv, "b", held)
    assert job["status"] == "queued" and job["paused"]
    assert requests.post(_url(srv, "pause"), json={"paused": False}, auth=_auth("b"), timeout=60).status_code == 200
    _wait_status(srv, "b", held, ("done",))


def test_one_user_cannot_see_or_cancel_anothers_jobs(users_server):
    srv = users_server
    blocker = _blocker(srv)
    mine = _submit(srv, "a", {**TINY, "prompt": "private to a"})
    for method, path in (("get", f"jobs/{mine}"), ("delete", f"jobs/{mine}"), ("post", f"jobs/{mine}/rerun"),
                         ("delete", f"history/{mine}")):
        r = requests.request(method, _url(srv, path), auth=_auth("b"), timeout=60)
        assert r.status_code == 404, (method, path, r.text)
    r = requests.post(_url(srv, f"jobs/{mine}/move"), json={"delta": 1}, auth=_auth("b"), timeout=60)
    assert r.status_code == 404
    listed = requests.get(_url(srv, "jobs"), params={"limit": 200}, auth=_auth("b"), timeout=60).json()["jobs"]
    assert listed and all(j["user"] == "b" for j in listed) and mine not in {j["id"] for j in listed}
    assert requests.get(_url(srv, "jobs"), params={"user": "a"}, auth=_auth("b"), timeout=60).status_code == 403
    history = requests.get(_url(srv, "history"), params={"limit": 200}, auth=_auth("b"), timeout=60).json()
    assert all(j["user"] == "b" for j in history["jobs"])
    assert _status(srv, "a", mine)["status"] == "queued"          # untouched by b
    everyone = requests.get(_url(srv, "jobs"), params={"limit": 200}, auth=_auth("root"), timeout=60).json()["jobs"]
    assert {"a", "b", "root"} <= {j["user"] for j in everyone}    # the admin sees everybody's
    assert requests.get(_url(srv, "jobs"), auth=None, timeout=60).status_code == 401
    requests.delete(_url(srv, f"jobs/{blocker}"), auth=_auth("root"), timeout=60)
    _wait_status(srv, "a", mine, ("done",))


def test_history_search_filter_images_and_delete(users_server):
    srv = users_server
    job_id = _submit(srv, "c", {**TINY, "prompt": "a lighthouse at dusk"})
    job = _wait_status(srv, "c", job_id, ("done",))
    page = requests.get(_url(srv, "history"), params={"search": "LIGHTHOUSE"}, auth=_auth("c"), timeout=60).json()
    assert [j["id"] for j in page["jobs"]] == [job_id] and page["total"] == 1
    assert requests.get(_url(srv, "history"), params={"model": "nope"}, auth=_auth("c"), timeout=60).json()["total"] == 0
    assert requests.get(_url(srv, "history"), params={"model": job["model"], "search": "lighthouse"},
                        auth=_auth("c"), timeout=60).json()["total"] == 1
    today = time.strftime("%Y-%m-%d")
    assert requests.get(_url(srv, "history"), params={"date_from": today, "date_to": today, "search": "lighthouse"},
                        auth=_auth("c"), timeout=60).json()["total"] == 1
    assert requests.get(_url(srv, "history"), params={"date_to": "2001-01-01"}, auth=_auth("c"),
                        timeout=60).json()["total"] == 0
    assert requests.get(_url(srv, "history"), params={"date_from": "yesterday"}, auth=_auth("c"),
                        timeout=60).status_code == 422
    full = _get(srv, "c", job_id).json()
    image = Image.open(io.BytesIO(base64.b64decode(full["images"][0])))
    assert image.size == (64, 64) and "a lighthouse at dusk" in image.info["parameters"]
    path = srv.data_dir / "outputs" / full["files"][0]
    assert path.is_file()
    r = requests.delete(_url(srv, f"history/{job_id}"), auth=_auth("c"), timeout=60)
    assert r.status_code == 200 and r.json()["deleted_files"] == 1
    assert not path.exists() and _get(srv, "c", job_id).status_code == 404


def test_bad_submissions_are_refused_clearly(users_server):
    srv = users_server
    r = requests.post(_url(srv, "jobs"), json={"kind": "teleport", "params": {}}, auth=_auth("a"), timeout=60)
    assert r.status_code == 422 and "teleport" in r.json()["detail"]
    r = requests.post(_url(srv, "jobs"), json={"kind": "txt2img", "params": {"steps": "many"}}, auth=_auth("a"),
                      timeout=60)
    assert r.status_code == 422 and "steps" in r.json()["detail"]
    r = requests.post(_url(srv, "jobs"), json={"kind": "txt2img", "params": {**TINY, "width": 65}}, auth=_auth("a"),
                      timeout=60)
    assert r.status_code == 422 and "width" in r.json()["detail"]
    assert requests.get(_url(srv, "jobs/nope"), auth=_auth("a"), timeout=60).status_code == 404


# --------------------------------------------------------------------------- kill -9, restart

@pytest.fixture(scope="module")
def restarted(tmp_path_factory):
    """A local server (no login: its one user "local" is the admin) killed with SIGKILL mid-job, then
    started again on the same data dir. Yields (server, {name: job id}, finished job before the kill)."""
    from tiny_models import make_checkpoint

    data = tmp_path_factory.mktemp("queue-kill")
    make_checkpoint(data / "models" / "Stable-diffusion" / "tiny-sd1.safetensors", "sd1")
    srv = start_server(data, "--api")
    try:
        first = _submit(srv, None, {**TINY, "prompt": "finished before the crash"})
        finished = _wait_status(srv, None, first, ("done",))
        long_id = _submit(srv, None, LONG)
        waiting = [_submit(srv, None, {**TINY, "prompt": f"waiting {i}"}) for i in range(2)]
        _wait_running(srv, None, long_id)
        assert [_status(srv, None, j)["status"] for j in waiting] == ["queued", "queued"]
    finally:
        os.kill(srv.proc.pid, signal.SIGKILL)
        srv.proc.wait(timeout=30)
    srv = start_server(data, "--api")
    yield srv, {"first": first, "long": long_id, "waiting": waiting}, finished
    srv.stop()


@pytest.mark.slow
def test_kill_9_mid_run_then_restart_requeues_waiting_and_interrupts_running(restarted):
    srv, ids, finished = restarted
    long_job = _status(srv, None, ids["long"])
    assert long_job["status"] == "interrupted" and "stopped" in (long_job["error"] or "")
    for job_id in ids["waiting"]:
        job = _wait_status(srv, None, job_id, ("done",))
        assert len(job["files"]) == 1 and job["user"] == "local"
    # The finished job and its image survived.
    again = _get(srv, None, ids["first"]).json()
    assert again["status"] == "done" and again["files"] == finished["files"] and again["images"][0]
    # An interrupted job is re-run with one request.
    r = requests.post(_url(srv, f"jobs/{ids['long']}/rerun"), auth=None, timeout=60)
    assert r.status_code == 202, r.text
    rerun = r.json()["id"]
    _wait_running(srv, None, rerun)
    assert requests.delete(_url(srv, f"jobs/{rerun}"), timeout=60).json()["result"] == "interrupted"
    assert _wait_status(srv, None, rerun, ("interrupted",))["status"] == "interrupted"

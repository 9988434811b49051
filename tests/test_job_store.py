"""The persistent queue without a server: round-robin across owners, move and pause in the JobQueue;
the SQLite store (WAL, history queries, recovery); the QueueService recording real tiny generations,
restoring after a simulated crash, and keeping users apart."""
from __future__ import annotations

import sqlite3
import threading
import time

import pytest
from PIL import Image

from modules.core.job_store import HistoryQuery, JobOutput, JobRecord, JobStore
from modules.core.jobs import Caller, JobQueue

TIMEOUT = 30


@pytest.fixture
def queue():
    q = JobQueue("test-fair", progress_bar=False)
    yield q
    q.shutdown(cancel_pending=True, interrupt=True, timeout=TIMEOUT)


def _hold(queue: JobQueue):
    started, release = threading.Event(), threading.Event()
    queue.submit(lambda ctx: (started.set(), release.wait(TIMEOUT)), name="hold", owner="admin")
    assert started.wait(TIMEOUT)
    return release


def _record_order(queue: JobQueue, jobs: list[tuple[str, str]]):
    ran: list[str] = []
    handles = [queue.submit(lambda ctx, label=label: ran.append(label), name=label, owner=owner)
               for owner, label in jobs]
    return ran, handles


def test_round_robin_across_owners_keeps_each_owners_order(queue):
    release = _hold(queue)
    ran, handles = _record_order(queue, [("a", f"a{i}") for i in range(4)] + [("b", "b0"), ("b", "b1"), ("c", "c0")])
    assert [j.name for j in queue.order()] == ["a0", "b0", "c0", "a1", "b1", "a2", "a3"]
    assert queue.queue_position(handles[-1]) == 3   # c0: behind the running job, a0 and b0
    release.set()
    for job in handles:
        job.result(TIMEOUT)
    assert ran == ["a0", "b0", "c0", "a1", "b1", "a2", "a3"]


def test_move_reorders_only_within_the_owner_and_pause_holds_the_owner(queue):
    release = _hold(queue)
    ran, handles = _record_order(queue, [("a", "a0"), ("b", "b0"), ("a", "a1"), ("a", "a2")])
    assert queue.move(handles[3].id, -2)                  # a2 to the front of a's jobs
    assert not queue.move(handles[3].id, -1)              # already first
    assert [j.name for j in queue.queued("a")] == ["a2", "a0", "a1"]
    queue.set_paused("b", True)
    assert [j.name for j in queue.order()] == ["a2", "a0", "a1"]
    release.set()
    for job in (handles[0], handles[2], handles[3]):
        job.result(TIMEOUT)
    assert ran == ["a2", "a0", "a1"] and handles[1].status == "queued"
    queue.set_paused("b", False)
    assert handles[1].result(TIMEOUT) is None and ran[-1] == "b0"


def test_store_uses_wal_and_history_queries(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite3")
    assert store._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"   # noqa: SLF001
    now = time.time()
    for i in range(30):
        rec = store.insert(JobRecord(id=f"j{i}", owner="user:a" if i % 3 else "user:b", source="ui", kind="txt2img",
                                     body={"n": i}, detached=True, prompt=f"a {'cat' if i % 2 else 'dog'} {i}",
                                     model=f"m{i % 2}"))
        store.mark_started(rec.id, now + i)
        store.add_output(rec.id, JobOutput(path=f"/x/{i}.png", infotext=f"info {i}"))
        store.mark_finished(rec.id, "done", at=now + i + 0.5)
    page, total = store.history(HistoryQuery(owner="user:a", limit=5))
    assert total == 20 and [r.id for r in page] == ["j29", "j28", "j26", "j25", "j23"]
    assert page[0].outputs[0].infotext == "info 29"
    _, cats = store.history(HistoryQuery(search="CAT", limit=100))
    assert cats == 15
    _, literal = store.history(HistoryQuery(search="%", limit=100))   # LIKE wildcards are plain characters
    assert literal == 0
    _, m1 = store.history(HistoryQuery(model="m1", date_from=now + 10, date_to=now + 20, limit=100))
    assert m1 == 5
    assert store.models() == ["m0", "m1"]
    store.reorder(["j2", "j1"])
    assert [r.id for r in store.list(statuses=("done",), limit=3)] == ["j0", "j2", "j1"]
    store.close()


def test_recover_marks_running_interrupted_and_keeps_queued(tmp_path):
    path = tmp_path / "jobs.sqlite3"
    store = JobStore(path)
    for i, status in enumerate(("done", "running", "queued", "queued")):
        store.insert(JobRecord(id=f"j{i}", owner="user:a", source="ui", kind="txt2img", body={}, detached=True,
                               status=status))
    # A second connection (another process after a crash) sees every committed row.
    other = sqlite3.connect(str(path))
    assert other.execute("SELECT COUNT(*) FROM jobs").fetchone()[0] == 4
    other.close()
    store.close()
    again = JobStore(path)
    assert [r.id for r in again.recover()] == ["j1"]
    assert again.get("j1").status == "interrupted" and "stopped" in again.get("j1").error
    assert [r.id for r in again.unfinished()] == ["j2", "j3"]
    again.close()


# --------------------------------------------------------------------------- the service, real tiny jobs

@pytest.fixture
def services(tmp_path):
    from conftest import make_services

    svc = make_services(tmp_path, {"tiny.safetensors": ("sd1", 0)})
    yield svc
    svc.generation.queue.shutdown(cancel_pending=True, interrupt=True, timeout=120)
    svc.queue.store.close()


def _tiny(prompt: str, **kw):
    from modules.core.pipeline import Txt2ImgParams

    return Txt2ImgParams(prompt=prompt, width=64, height=64, steps=1, seed=5, **kw)


def test_a_generation_is_recorded_with_its_files(services):
    job = services.generation.submit(_tiny("a recorded cat"), owner="user:a")
    job.result(300)
    services.generation.queue.shutdown(timeout=60)   # the finish is written before the worker stops
    rec = services.queue.store.get(job.meta["rid"])
    assert rec.status == "done" and rec.prompt == "a recorded cat" and rec.model == "tiny"
    assert len(rec.outputs) == 1 and "a recorded cat" in rec.outputs[0].infotext
    assert Image.open(rec.outputs[0].path).size == (64, 64)
    # The stored body rebuilds the same typed params.
    from modules.core.queue_service import params_from_body

    again = params_from_body("txt2img", rec.body["params"], services.queue.inputs_dir(rec.id))
    assert again == _tiny("a recorded cat")


def test_img2img_inputs_are_kept_for_a_requeue(services):
    from modules.core.pipeline import Img2ImgParams
    from modules.core.queue_service import params_from_body

    init = Image.new("RGB", (64, 64), (10, 200, 30))
    params = Img2ImgParams(prompt="kept", width=64, height=64, steps=1, init_images=[init],
                           mask=Image.new("L", (64, 64), 255))
    rid = services.queue.record_generation(params, owner="user:a", source="ui", override_settings={},
                                           restore_settings=True, scripted=False)
    rebuilt = params_from_body("img2img", services.queue.store.get(rid).body["params"], services.queue.inputs_dir(rid))
    assert rebuilt.init_images[0].tobytes() == init.tobytes() and rebuilt.mask.mode == "L"
    services.queue.discard(rid)
    assert services.queue.store.get(rid) is None and not services.queue.inputs_dir(rid).exists()


def test_restore_requeues_in_order_and_only_detached_jobs(tmp_path):
    from conftest import make_services

    first = make_services(tmp_path, {"tiny.safetensors": ("sd1", 0)})
    first.generation.queue.set_paused("user:a", True)    # nothing runs: every job stays queued
    q = first.queue
    ids = [q.record_generation(_tiny(f"p{i}"), owner="user:a", source="ui", override_settings={},
                               restore_settings=True, scripted=False) for i in range(3)]
    waiting_client = q.record_generation(_tiny("sync"), owner="user:a", source="api", override_settings={},
                                         restore_settings=True, scripted=False)
    q.store.mark_started(ids[0])                      # "running" when the process died
    first.generation.queue.shutdown(wait=False)
    first.queue.store.close()

    second = make_services(tmp_path, {})
    try:
        second.generation.queue.set_paused("user:a", True)
        counts = second.queue.restore()
        assert counts == {"requeued": 2, "interrupted": 1, "failed": 0}
        assert [j.meta["rid"] for j in second.generation.queue.queued("user:a")] == ids[1:]
        assert second.queue.store.get(ids[0]).status == "interrupted"
        assert second.queue.store.get(waiting_client).status == "interrupted"
    finally:
        second.generation.queue.shutdown(cancel_pending=True, timeout=60)
        second.queue.store.close()


def test_callers_see_and_act_only_on_their_own_jobs(services):
    from modules.core.queue_service import NotFound

    q = services.queue
    services.generation.queue.set_paused("user:a", True)
    job = services.generation.submit(_tiny("a's job"), owner="user:a")
    rid = job.meta["rid"]
    a, b, admin = Caller("user:a"), Caller("user:b"), Caller("user:root", admin=True)
    for action in (lambda: q.get(b, rid), lambda: q.cancel(b, rid), lambda: q.move(b, rid, 1),
                   lambda: q.rerun(b, rid), lambda: q.delete(b, rid)):
        with pytest.raises(NotFound):
            action()
    assert [v.record.id for v in q.unfinished(b)] == [] and [v.record.id for v in q.unfinished(a)] == [rid]
    assert [v.record.id for v in q.unfinished(admin)] == [rid]
    assert q.cancel(admin, rid) == "cancelled" and q.store.get(rid).status == "cancelled"


def test_a_refused_submit_leaves_no_row(tmp_path):
    from conftest import make_services
    from modules.core.jobs import QueueFullError

    svc = make_services(tmp_path, {})
    try:
        svc.generation.queue.max_total = 0
        with pytest.raises(QueueFullError):
            svc.generation.submit(_tiny("refused"), owner="user:a")
        assert svc.queue.store.list(limit=10) == []
    finally:
        svc.generation.queue.shutdown(cancel_pending=True, timeout=60)
        svc.queue.store.close()


def test_the_queue_tab_handlers_show_each_user_only_their_own_jobs(services, tmp_path):
    import argparse
    from types import SimpleNamespace

    from modules.core.callers import CallerPolicy
    from modules.ui.queue_tab import history_page, job_details, refresh_waiting

    services.callers = CallerPolicy(argparse.Namespace(api_auth="root:pr,a:pa,b:pb", gradio_auth=None,
                                                       gradio_auth_path=None, admin_users=None, listen=False,
                                                       share=False, server_name=None))
    store = services.queue.store
    image = tmp_path / "outputs" / "x.png"
    image.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8)).save(image)
    for owner in ("user:a", "user:b"):
        rec = store.insert(JobRecord(id=f"done-{owner}", owner=owner, source="ui", kind="txt2img", body={},
                                     detached=True, prompt=f"{owner} picture"))
        store.add_output(rec.id, JobOutput(path=str(image), infotext=f"{owner} picture"))
        store.mark_finished(rec.id, "done")
    services.generation.queue.set_paused("user:b", True)
    waiting = services.generation.submit(_tiny("b waits"), owner="user:b")

    def request(user):
        return SimpleNamespace(username=user, client=SimpleNamespace(host="10.0.0.9"))

    items, ids, *_ = history_page(services, request("a"), "", "All models", "", "", 0)
    assert ids == ["done-user:a"] and "user:a picture" in items[0][1]
    assert job_details(services, request("a"), ["done-user:b"], 0)[1] is None        # b's job: not for a
    _, _, table, picked, _ = refresh_waiting(services, request("a"), None)
    assert "b waits" not in table and picked["choices"] == []
    _, _, table, picked, _ = refresh_waiting(services, request("b"), None)
    assert "b waits" in table and picked["value"] == waiting.meta["rid"]
    # root is the first --api-auth user: the admin sees everybody's.
    _, admin_ids, *_ = history_page(services, request("root"), "", "All models", "", "", 0)
    assert sorted(admin_ids) == ["done-user:a", "done-user:b"]
    assert "b waits" in refresh_waiting(services, request("root"), None)[2]

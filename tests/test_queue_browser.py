"""The Queue tab in a real Chromium: the history survives a kill -9 and restart and its gallery works
(search, pick, Send to txt2img, Open folder, Delete with confirmation); Generate clicked while a job runs
queues another job without blocking the tab, which shows its place in the queue."""
from __future__ import annotations

import os
import signal
import time

import pytest
import requests

from conftest import start_server

pytestmark = [pytest.mark.browser, pytest.mark.slow]

TINY = {"width": 64, "height": 64, "steps": 1}


def _submit(srv, prompt: str, seed: int, steps: int = 1) -> str:
    params = {**TINY, "prompt": prompt, "seed": seed, "steps": steps}
    r = requests.post(f"{srv.url}/queue/v1/jobs", json={"kind": "txt2img", "params": params}, timeout=60)
    assert r.status_code == 202, r.text
    return r.json()["id"]


def _pause(srv, paused: bool) -> None:
    r = requests.post(f"{srv.url}/queue/v1/pause", json={"paused": paused}, timeout=60)
    assert r.status_code == 200, r.text


def _wait_done(srv, job_id: str, timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = requests.get(f"{srv.url}/queue/v1/jobs/{job_id}", params={"images": False}, timeout=60).json()
        if job["status"] not in ("queued", "running"):
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} did not finish in {timeout}s")


@pytest.fixture(scope="module")
def history_server(tmp_path_factory):
    """Two finished jobs and one killed mid-run (kill -9), then a restart on the same data dir."""
    from tiny_models import make_checkpoint

    data = tmp_path_factory.mktemp("queue-browser")
    make_checkpoint(data / "models" / "Stable-diffusion" / "tiny-sd1.safetensors", "sd1")
    srv = start_server(data, "--api")
    try:
        jobs = [_wait_done(srv, _submit(srv, prompt, seed)) for prompt, seed in
                (("a red lighthouse", 11), ("a green forest", 12))]
        assert [j["status"] for j in jobs] == ["done", "done"]
        long_id = _submit(srv, "an unfinished castle", 13, steps=150)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            job = requests.get(f"{srv.url}/queue/v1/jobs/{long_id}", params={"images": False}, timeout=60).json()
            if job["status"] == "running" and (job["progress"] or 0) > 0:
                break
            time.sleep(0.1)
    finally:
        os.kill(srv.proc.pid, signal.SIGKILL)
        srv.proc.wait(timeout=30)
    srv = start_server(data, "--api")
    yield srv, jobs
    srv.stop()


def _open_queue_tab(page, srv):
    page.goto(srv.url + "/")
    page.get_by_role("tab", name="Queue").click(timeout=60000)


def test_history_gallery_after_a_restart(history_server, page, tmp_path):
    srv, jobs = history_server
    _open_queue_tab(page, srv)
    gallery = page.locator("#queue_history_gallery img")
    page.locator("#queue_history_count").get_by_text("3 job(s)").wait_for()
    assert gallery.count() == 3      # the interrupted job too (a placeholder tile): it can be re-run
    # Search by prompt.
    page.locator("#queue_search textarea, #queue_search input").first.fill("lighthouse")
    page.locator("#queue_search textarea, #queue_search input").first.press("Enter")
    page.locator("#queue_history_count").get_by_text("1 job(s)").wait_for()
    assert gallery.count() == 1
    # Pick it: its infotext; Open folder shows where its file is on the server.
    gallery.first.click()
    page.locator("#queue_history_info").get_by_text("Seed: 11", exact=False).wait_for()
    page.locator("#queue_open_folder").click()
    folder = page.locator("#queue_folder textarea, #queue_folder input").first
    page.wait_for_function("el => el.value.includes('txt2img-images')", arg=folder.element_handle())
    assert os.path.isdir(folder.input_value())
    page.screenshot(path=str(tmp_path / "queue-history.png"), full_page=True)
    # Send to txt2img fills its prompt.
    page.locator("#queue_send_to_txt2img").click()
    page.wait_for_function("() => document.querySelector('#txt2img_prompt textarea').value === 'a red lighthouse'")
    # Delete asks first, then removes the job and its file.
    page.get_by_role("tab", name="Queue").click()
    # Selecting the tab reloads the page of the history (still searched for "lighthouse") and clears the pick.
    page.wait_for_function("() => !document.querySelector('#queue_history_info').innerText.includes('Seed')")
    page.locator("#queue_history_count").get_by_text("1 job(s)").wait_for()
    gallery.first.click()
    page.locator("#queue_history_info").get_by_text("Seed: 11", exact=False).wait_for()
    path = srv.data_dir / "outputs" / jobs[0]["files"][0]
    assert path.is_file()
    page.locator("#queue_delete").click()
    page.locator("#queue_confirm_delete").wait_for(state="visible")
    assert path.is_file()                      # nothing is deleted before the confirmation
    page.locator("#queue_confirm_delete").click()
    page.locator("#queue_history_message").get_by_text("Deleted the job and 1 file(s).").wait_for()
    assert not path.exists()
    page.locator("#queue_history_count").get_by_text("0 job(s)").wait_for()
    # The job the kill interrupted is re-run with one click.
    page.locator("#queue_search textarea, #queue_search input").first.fill("castle")
    page.locator("#queue_search textarea, #queue_search input").first.press("Enter")
    page.locator("#queue_history_count").get_by_text("1 job(s)").wait_for()
    gallery.first.click()
    page.locator("#queue_history_info").get_by_text("interrupted").first.wait_for()
    page.locator("#queue_rerun").click()
    page.locator("#queue_history_message").get_by_text("Queued again").wait_for()
    waiting = requests.get(f"{srv.url}/queue/v1/jobs", params={"status": "queued,running"}, timeout=60).json()["jobs"]
    assert [j["prompt"] for j in waiting] == ["an unfinished castle"]
    assert requests.delete(f"{srv.url}/queue/v1/jobs/{waiting[0]['id']}", timeout=60).status_code == 200


def test_generate_while_a_job_runs_queues_another(history_server, page):
    srv, _ = history_server
    page.goto(srv.url + "/")
    page.locator("#txt2img_prompt textarea").wait_for(timeout=60000)
    page.locator("#txt2img_prompt textarea").fill("queued from the page")
    for elem_id, value in (("txt2img_width", "64"), ("txt2img_height", "64"), ("txt2img_steps", "30")):
        box = page.locator(f"#{elem_id} input[type=number]")
        box.fill(value)
        box.press("Tab")
    # The user's queue is held, so both jobs are certainly waiting when the second click lands (no race
    # with how fast the first one renders); releasing it lets both run.
    _pause(srv, True)
    try:
        page.locator("#txt2img_generate").click()
        try:
            page.locator("#txt2img_progress .queue-busy").first.wait_for()   # the first job waits
        except Exception as err:  # say what the page and the server show, not just "timeout"
            raise AssertionError(f"progress: {page.locator('#txt2img_progress').inner_text()!r}; "
                                 f"server:\n{srv.output[-3000:]}") from err
        page.locator("#txt2img_generate").click()                       # the tab is not blocked: a second job
        page.locator("#txt2img_progress").get_by_text("+1 more queued").wait_for()
    finally:
        _pause(srv, False)
    page.locator("#txt2img_progress").get_by_text("Done").wait_for(timeout=300000)

    def finished() -> int:
        return requests.get(f"{srv.url}/queue/v1/history", params={"limit": 200, "search": "queued from the page"},
                            timeout=60).json()["total"]
    deadline = time.monotonic() + 300
    while finished() < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    listed = requests.get(f"{srv.url}/queue/v1/jobs", params={"limit": 20}, timeout=60).json()["jobs"]
    assert finished() == 2, [(j["prompt"], j["status"], j["started_at"], j["finished_at"]) for j in listed]
    jobs = requests.get(f"{srv.url}/queue/v1/history", params={"search": "queued from the page"}, timeout=60).json()
    assert {j["source"] for j in jobs["jobs"]} == {"ui"} and all(j["status"] == "done" for j in jobs["jobs"])


def test_waiting_jobs_move_cancel_and_pause_from_the_queue_tab(history_server, page):
    srv, _ = history_server
    blocker = _submit(srv, "a long blocker", 21, steps=150)
    first, second = _submit(srv, "waiting first", 22), _submit(srv, "waiting second", 23)

    def position(job_id):
        return requests.get(f"{srv.url}/queue/v1/jobs/{job_id}", params={"images": False}, timeout=60).json()

    try:
        _open_queue_tab(page, srv)
        page.locator("#queue_running_job").get_by_text("step", exact=False).wait_for()   # the running job
        page.locator("#queue_table tbody tr").nth(2).wait_for()                        # running + 2 waiting
        assert "waiting second" in page.locator("#queue_table").inner_text()
        # Pick the second waiting job, move it up: it runs before the first now.
        page.locator("#queue_pick input").click()
        page.get_by_role("option", name="waiting second", exact=False).click()
        page.locator("#queue_up").click()
        deadline = time.monotonic() + 60
        while position(second)["position"] != 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert (position(second)["position"], position(first)["position"]) == (1, 2), (
            page.locator("#queue_pick input").input_value(), page.locator("#queue_action_info").inner_text(),
            srv.output[-2000:])
        # Pause: the button says Resume; the jobs say paused.
        page.locator("#queue_pause").click()
        page.locator("#queue_pause").get_by_text("Resume", exact=False).wait_for()
        assert position(first)["paused"]
        page.locator("#queue_pause").click()
        page.locator("#queue_pause").get_by_text("Pause", exact=False).wait_for()
        # Cancel the picked job.
        page.locator("#queue_cancel").click()
        page.locator("#queue_action_info").get_by_text("cancelled", exact=False).wait_for()
        assert position(second)["status"] == "cancelled" and position(first)["status"] == "queued"
    finally:
        for job_id in (first, second, blocker):
            requests.delete(f"{srv.url}/queue/v1/jobs/{job_id}", timeout=60)


def test_generate_forever_keeps_one_job_going_until_cancelled(history_server, page):
    srv, _ = history_server
    page.goto(srv.url + "/")
    page.locator("#txt2img_prompt textarea").wait_for(timeout=60000)
    page.locator("#txt2img_prompt textarea").fill("forever and ever")
    for elem_id, value in (("txt2img_width", "64"), ("txt2img_height", "64"), ("txt2img_steps", "3")):
        box = page.locator(f"#{elem_id} input[type=number]")
        box.fill(value)
        box.press("Tab")

    def mine(status: str) -> list:
        return [j for j in requests.get(f"{srv.url}/queue/v1/jobs", params={"status": status, "limit": 200},
                                        timeout=60).json()["jobs"] if j["prompt"] == "forever and ever"]

    page.locator("#txt2img_generate").click(button="right")
    page.locator("#generate_forever_menu").get_by_text("Generate forever", exact=True).click()
    most_in_flight = 0
    deadline = time.monotonic() + 400
    while len(mine("done")) < 3 and time.monotonic() < deadline:
        most_in_flight = max(most_in_flight, len(mine("queued,running")))
        time.sleep(0.2)
    assert len(mine("done")) >= 3
    assert most_in_flight == 1          # one job at a time, not a flood
    page.locator("#txt2img_generate").click(button="right")
    page.locator("#generate_forever_menu").get_by_text("Cancel generate forever").click()
    page.locator("#txt2img_generate").click(button="right")
    page.locator("#generate_forever_menu").get_by_text("Generate forever", exact=True).wait_for()   # off again
    page.keyboard.press("Escape")
    page.mouse.click(5, 5)
    deadline = time.monotonic() + 300
    while mine("queued,running") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not mine("queued,running")

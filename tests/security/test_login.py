"""Logins: who must have one, what counts as one, and guessing passwords against a real server.

- A server reachable from the network refuses to start without credentials (unless --insecure-no-auth).
- Empty passwords are a startup error naming the flag, and the message never repeats the entry.
- Guessing: 5 wrong passwords from one address, then 429 + Retry-After for 1 s, 2 s, 4 s... (Basic
  auth and the UI's login form alike); another address is not affected; the right password works
  again once the lockout is over.
- An honest browser logs in on the UI's own page with the --api-auth credentials.
"""
from __future__ import annotations

import base64
import http.client
import time

import pytest
import requests

from trust_helpers import run_webui, start_server

USER, PASSWORD = "bob", "pw-Guess-Me-Not"


# --------------------------------------------------------------------------- refusing to start

@pytest.mark.parametrize("flags, named", [
    (["--listen"], "--listen"),
    (["--share"], "--share"),
    (["--server-name", "192.0.2.10"], "--server-name 192.0.2.10"),
])
def test_a_network_reachable_server_without_a_login_refuses_to_start(tmp_path, flags, named):
    result = run_webui(["--data-dir", str(tmp_path), *flags])
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("webui: error:")]
    assert len(lines) == 1, result.stderr
    line = lines[0]
    assert f"{named} makes this server reachable from your network" in line
    for fix in ("--gradio-auth", "--gradio-auth-path", "--api-auth", "--insecure-no-auth"):
        assert fix in line
    assert "Running on" not in result.stdout and "Traceback" not in result.stderr


@pytest.mark.parametrize("flags, named", [
    (["--gradio-auth", "alice:pw,carol:"], "--gradio-auth: user 'carol' has an empty password"),
    (["--api-auth", "alice:   "], "--api-auth: user 'alice' has an empty password"),
    (["--api-auth", "Secret-Typed-Alone"], "--api-auth expects user:password pairs"),
])
def test_an_empty_password_is_a_startup_error_naming_the_flag(tmp_path, flags, named):
    result = run_webui(["--data-dir", str(tmp_path), "--listen", *flags])
    assert result.returncode == 2, result.stderr
    assert named in result.stderr
    assert "Secret-Typed-Alone" not in result.stderr  # an entry without ':' may be a password


def test_an_empty_password_in_the_auth_file_is_a_startup_error(tmp_path):
    auth_file = tmp_path / "users.txt"
    auth_file.write_text("alice:pw\ncarol:\n", encoding="utf-8")
    result = run_webui(["--data-dir", str(tmp_path), "--listen", "--gradio-auth-path", str(auth_file)])
    assert result.returncode == 1, result.stderr
    assert "--gradio-auth-path: user 'carol' has an empty password" in result.stderr
    assert "Traceback" not in result.stderr


# --------------------------------------------------------------------------- guessing passwords

@pytest.fixture(scope="module")
def locked(tmp_path_factory):
    """--api --api-auth: Basic auth on the API, and the UI's login page with the same credentials."""
    srv = start_server(tmp_path_factory.mktemp("login"), "--api", "--api-auth", f"{USER}:{PASSWORD}")
    yield srv
    srv.stop()


def _basic(user: str, password: str) -> dict:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def _get_options(srv, headers: dict, source: str | None = None) -> tuple[int, dict]:
    """GET /sdapi/v1/options from a chosen loopback address (127.0.0.x is all this machine's)."""
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30,
                                      source_address=(source, 0) if source else None)
    try:
        conn.request("GET", "/sdapi/v1/options", headers=headers)
        response = conn.getresponse()
        response.read()
        return response.status, {k.lower(): v for k, v in response.getheaders()}
    finally:
        conn.close()


def _guess_until_locked(attempt, limit: int = 12) -> tuple[int, dict]:
    """Wrong passwords until the server answers 429; returns (attempts made, the 429's headers).
    Up to 5 wrong ones are 401s; the lockout that follows only grows, so it is met quickly."""
    for made in range(1, limit + 1):
        status, headers = attempt()
        if status == 429:
            return made, headers
        assert status in (400, 401), status
    raise AssertionError(f"no 429 after {limit} wrong passwords")


def _wait_out(headers: dict) -> None:
    time.sleep(int(headers["retry-after"]) + 0.2)


def test_basic_auth_guessing_is_locked_out_per_address(locked):
    wrong = _basic(USER, "guess")
    made, headers = _guess_until_locked(lambda: _get_options(locked, wrong))
    assert made >= 6  # the first 5 wrong passwords are answered 401
    assert 1 <= int(headers["retry-after"]) <= 60
    # Locked out: even the right password gets 429 (a lockout says nothing about the password).
    assert _get_options(locked, _basic(USER, PASSWORD))[0] == 429
    # Another client address is not locked out by this one's guesses.
    assert _get_options(locked, _basic(USER, PASSWORD), source="127.0.0.3")[0] == 200
    assert _get_options(locked, wrong, source="127.0.0.3")[0] == 401
    # Once the lockout is over, the right password works (and clears the record).
    _wait_out(headers)
    assert _get_options(locked, _basic(USER, PASSWORD))[0] == 200
    assert _get_options(locked, wrong)[0] == 401  # a fresh count: not locked out again at once
    assert _get_options(locked, _basic(USER, PASSWORD))[0] == 200


def test_the_ui_login_form_is_throttled_too(locked):
    def form_login(password: str) -> tuple[int, dict]:
        response = requests.post(locked.url + "/login", data={"username": USER, "password": password}, timeout=30)
        return response.status_code, {k.lower(): v for k, v in response.headers.items()}

    made, headers = _guess_until_locked(lambda: form_login("guess"))
    assert made >= 6
    assert form_login(PASSWORD)[0] == 429
    _wait_out(headers)
    session = requests.Session()
    assert session.post(locked.url + "/login", data={"username": USER, "password": PASSWORD},
                        timeout=30).status_code == 200
    assert session.get(locked.url + "/config", timeout=30).status_code == 200


def test_wrong_passwords_on_the_form_and_on_basic_auth_count_together(locked):
    for _ in range(3):
        assert requests.post(locked.url + "/login", data={"username": USER, "password": "x"}, timeout=30).status_code == 400
    for _ in range(2):
        assert _get_options(locked, _basic(USER, "x"))[0] == 401
    status, headers = _get_options(locked, _basic(USER, PASSWORD))
    assert status == 429
    _wait_out(headers)
    assert _get_options(locked, _basic(USER, PASSWORD))[0] == 200


# --------------------------------------------------------------------------- the honest browser

@pytest.mark.browser
def test_an_honest_browser_logs_in_on_the_ui_page_with_the_api_auth_credentials(locked, page):
    page.goto(locked.url + "/")
    page.locator("input[type=password]").wait_for(timeout=60000)  # Gradio's own login form
    page.locator("input[type=text]").fill(USER)
    page.locator("input[type=password]").fill(PASSWORD)
    page.get_by_role("button", name="Login").click()
    page.get_by_role("tab", name="Settings").wait_for(timeout=60000)
    page.get_by_role("button", name="Generate").wait_for(timeout=60000)
    tabs = [t.strip() for t in page.locator("#tabs > .tab-wrapper [role=tab]").all_inner_texts()]
    assert tabs == ["txt2img", "img2img", "Extras", "PNG Info", "Checkpoint Merger", "Queue", "Settings", "Extensions"]

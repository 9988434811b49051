"""Attacks on a real server across the trust boundary (modules/api: hosts, cors, auth).

Two servers, both on a free loopback port:

- ``locked``: ``--api --api-auth`` (no --gradio-auth): the UI's event API must be behind the same
  credentials, foreign Host names and foreign web pages refused, and no password shown anywhere.
- ``lan``: ``--listen --insecure-no-auth --allowed-hosts evil.example --cors-allow-origins
  http://good.example``: what a LAN server answers to, and the one origin it lets in.
"""
from __future__ import annotations

import http.client
import io
import json
import socket

import pytest
import requests
from PIL import Image

from trust_helpers import start_server

USER, PASSWORD = "u", "Pw-Never-Shown-7"
ATTACKER = "http://attacker.example"
GOOD = "http://good.example"


@pytest.fixture(scope="module")
def locked(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("locked")
    image = data_dir / "outputs" / "txt2img-images" / "2024-01-01" / "00000-1.png"
    image.parent.mkdir(parents=True)
    Image.new("RGB", (8, 8), "red").save(image)
    srv = start_server(data_dir, "--api", "--api-auth", f"{USER}:{PASSWORD}")
    srv.image = image
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def lan(tmp_path_factory):
    srv = start_server(tmp_path_factory.mktemp("lan"), "--listen", "--insecure-no-auth", "--api",
                       "--allowed-hosts", "evil.example", "--cors-allow-origins", GOOD)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def session(locked):
    """A browser-like session logged in on the UI's page (Gradio's form, the --api-auth credentials)."""
    s = requests.Session()
    assert s.post(locked.url + "/login", data={"username": USER, "password": PASSWORD}, timeout=30).status_code == 200
    return s


AUTH = (USER, PASSWORD)


def _event_api_calls(srv) -> list[tuple[str, str, dict]]:
    """The Gradio routes that drive the UI (Gradio 6 names), each as (method, path, requests kwargs)."""
    return [
        ("GET", "/config", {}),
        ("GET", "/gradio_api/info", {}),
        ("POST", "/gradio_api/upload", {"files": {"files": ("a.txt", b"hello")}}),
        ("POST", "/gradio_api/queue/join", {"json": {"data": [], "fn_index": 0, "session_hash": "s3ss10n",
                                                     "event_data": None, "trigger_id": None}}),
        ("GET", "/gradio_api/queue/data?session_hash=s3ss10n", {}),
        ("POST", "/gradio_api/run/predict", {"json": {"data": []}}),
        ("POST", "/gradio_api/call/predict", {"json": {"data": []}}),
        ("GET", f"/gradio_api/file={srv.image}", {}),
        ("GET", "/gradio_api/upload_progress?upload_id=x", {}),
        # Routes Gradio itself leaves open even with a login:
        ("POST", "/gradio_api/cancel", {"json": {"session_hash": "s3ss10n", "fn_index": 0, "event_id": "e"}}),
        ("POST", "/gradio_api/reset", {"json": {"session_hash": "s3ss10n", "fn_index": 0, "event_id": "e"}}),
        ("GET", "/gradio_api/heartbeat/s3ss10n", {}),
        ("GET", "/gradio_api/startup-events", {}),
    ]


# --------------------------------------------------------------------------- 2. the UI's event API

def test_the_ui_event_api_is_refused_without_a_login(locked):
    for method, path, kwargs in _event_api_calls(locked):
        response = requests.request(method, locked.url + path, timeout=30, **kwargs)
        assert response.status_code == 401, (method, path, response.status_code, response.text[:200])
        # and Basic credentials are not a UI session (the UI's side takes its login form only)
        response = requests.request(method, locked.url + path, auth=AUTH, timeout=30, **kwargs)
        assert response.status_code == 401, (method, path, response.status_code, response.text[:200])


def test_the_login_page_loads_and_gives_nothing_away(locked):
    page = requests.get(locked.url + "/", timeout=30)
    assert page.status_code == 200 and "WWW-Authenticate" not in page.headers
    assert '"auth_required":true' in page.text.replace(" ", "")
    # Gradio embeds a description of every endpoint (choices, settings values) in its page, even
    # before a login: stripped until the login.
    assert "Stable Diffusion checkpoint" not in page.text and "sd_model_checkpoint" not in page.text
    assert 'window.gradio_api_info = {"named_endpoints": {}, "unnamed_endpoints": {}}' in page.text
    assert requests.get(locked.url + "/theme.css", timeout=30).status_code == 200


def test_after_the_login_the_ui_event_api_works(locked, session):
    assert session.get(locked.url + "/config", timeout=30).status_code == 200
    assert session.get(locked.url + "/gradio_api/info", timeout=30).status_code == 200
    uploaded = session.post(locked.url + "/gradio_api/upload", files={"files": ("a.txt", b"hello")}, timeout=30)
    assert uploaded.status_code == 200 and len(uploaded.json()) == 1
    image = session.get(f"{locked.url}/gradio_api/file={locked.image}", timeout=30)
    assert image.status_code == 200 and image.content.startswith(b"\x89PNG")
    joined = session.post(locked.url + "/gradio_api/queue/join", timeout=30,
                          json={"data": [], "fn_index": 10**6, "session_hash": "s", "event_data": None,
                                "trigger_id": None})
    assert joined.status_code not in (401, 403), joined.text[:200]  # Gradio's own answer to a bad fn_index
    page = session.get(locked.url + "/", timeout=30)
    assert page.status_code == 200 and "Stable Diffusion checkpoint" in page.text


# --------------------------------------------------------------------------- 3. DNS rebinding

def _raw_get(srv, path: str, host: str | None, headers: dict | None = None) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
    try:
        conn.putrequest("GET", path, skip_host=True, skip_accept_encoding=True)
        if host is not None:
            conn.putheader("Host", host)
        for name, value in (headers or {}).items():
            conn.putheader(name, value)
        conn.endheaders()
        response = conn.getresponse()
        return response.status, response.read().decode("utf-8", "replace")
    finally:
        conn.close()


def test_a_foreign_host_name_is_refused_everywhere(locked, session):
    basic = {"Authorization": requests.auth._basic_auth_str(USER, PASSWORD)}
    for path, headers in (("/", {}), ("/sdapi/v1/options", basic), ("/config", {}), ("/docs", basic)):
        status, body = _raw_get(locked, path, f"evil.example:{locked.port}", headers)
        assert status == 400, (path, status, body[:200])
        assert "Invalid Host header" in body and "--allowed-hosts evil.example" in body
    # even with a valid UI session (what a rebinding page would ride on)
    response = session.get(locked.url + "/config", headers={"Host": "evil.example"}, timeout=30)
    assert response.status_code == 400
    # a LAN address is not this server's name without --listen, and no Host is no name at all
    assert _raw_get(locked, "/", f"192.168.1.5:{locked.port}")[0] == 400
    assert _raw_get(locked, "/", None)[0] == 400


def test_this_machines_loopback_names_work(locked):
    basic = {"Authorization": requests.auth._basic_auth_str(USER, PASSWORD)}
    for host in (f"127.0.0.1:{locked.port}", f"localhost:{locked.port}", "localhost", f"[::1]:{locked.port}",
                 f"127.0.0.2:{locked.port}", f"LOCALHOST.:{locked.port}"):
        assert _raw_get(locked, "/", host)[0] == 200, host
        assert _raw_get(locked, "/sdapi/v1/options", host, basic)[0] == 200, host


def test_listen_answers_to_ip_addresses_its_host_name_and_allowed_hosts(lan):
    for host in (f"192.168.1.5:{lan.port}", f"10.0.0.7:{lan.port}", f"[fe80::1]:{lan.port}",
                 f"{socket.gethostname()}:{lan.port}", f"evil.example:{lan.port}", "EVIL.example"):
        assert _raw_get(lan, "/sdapi/v1/options", host)[0] == 200, host
    status, body = _raw_get(lan, "/sdapi/v1/options", f"other.example:{lan.port}")
    assert status == 400 and "--allowed-hosts other.example" in body


# --------------------------------------------------------------------------- 4. CORS and cross-site writes

def _assert_no_cors(response: requests.Response, what: str, *, credentials_listed: bool = False) -> None:
    """No Access-Control-Allow-Origin: the browser keeps the response from the page. (A server with
    --cors-allow-origins sends Allow-Credentials on every answer; without Allow-Origin it allows nothing.)"""
    headers = {k.lower() for k in response.headers}
    assert "access-control-allow-origin" not in headers, (what, dict(response.headers))
    if not credentials_listed:
        assert "access-control-allow-credentials" not in headers, (what, dict(response.headers))


def test_a_foreign_origin_is_never_reflected(locked, session):
    origin = {"Origin": ATTACKER}
    _assert_no_cors(requests.get(locked.url + "/sdapi/v1/options", auth=AUTH, headers=origin, timeout=30), "api")
    _assert_no_cors(requests.get(locked.url + "/", headers=origin, timeout=30), "ui page")
    # Gradio's own CORS treats any Host but "localhost"/"127.0.0.1" as remote and reflects every
    # Origin there, with credentials: 127.0.0.2 (or the LAN address) is such a Host.
    lan_host = {"Origin": ATTACKER, "Host": f"127.0.0.2:{locked.port}"}
    _assert_no_cors(requests.get(locked.url + "/", headers=lan_host, timeout=30), "ui page, other host")
    _assert_no_cors(session.get(locked.url + "/config", headers=lan_host, timeout=30), "config")
    _assert_no_cors(session.get(locked.url + "/gradio_api/info", headers=lan_host, timeout=30), "info")


def test_a_foreign_preflight_gets_no_permission(locked):
    for path in ("/sdapi/v1/txt2img", "/gradio_api/queue/join", "/gradio_api/upload"):
        for host in (f"127.0.0.1:{locked.port}", f"127.0.0.2:{locked.port}"):
            response = requests.options(locked.url + path, timeout=30, headers={
                "Origin": ATTACKER, "Host": host, "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "content-type, authorization"})
            _assert_no_cors(response, f"preflight {path} {host}")


def test_a_foreign_page_cannot_make_the_browser_write(locked, session):
    """A form POST or a fetch without a JSON type needs no preflight: the browser sends it with the
    user's cookies or cached Basic credentials. It carries the page's Origin, and is refused."""
    settings = json.dumps({"samples_save": False})
    response = requests.post(locked.url + "/sdapi/v1/options", data=settings, auth=AUTH, timeout=30,
                             headers={"Origin": ATTACKER, "Content-Type": "text/plain"})
    assert response.status_code == 403 and "Cross-site request refused" in response.text
    response = session.post(locked.url + "/gradio_api/upload", files={"files": ("a.txt", b"x")}, timeout=30,
                            headers={"Origin": "null"})
    assert response.status_code == 403
    # The UI's own page (same origin) and clients that send no Origin are fine.
    same = requests.post(locked.url + "/sdapi/v1/options", json={"samples_save": True}, auth=AUTH, timeout=30,
                         headers={"Origin": locked.url})
    assert same.status_code == 200, same.text[:200]
    assert requests.post(locked.url + "/sdapi/v1/options", json={"samples_save": True}, auth=AUTH,
                         timeout=30).status_code == 200
    uploaded = session.post(locked.url + "/gradio_api/upload", files={"files": ("a.txt", b"x")}, timeout=30,
                            headers={"Origin": locked.url})
    assert uploaded.status_code == 200


def test_an_allowed_origin_gets_cors_with_credentials(lan):
    for path in ("/sdapi/v1/options", "/", "/config"):
        response = requests.get(lan.url + path, headers={"Origin": GOOD, "Host": f"192.168.1.5:{lan.port}"}, timeout=30)
        assert response.status_code == 200, path
        assert response.headers["access-control-allow-origin"] == GOOD, path
        assert response.headers["access-control-allow-credentials"] == "true", path
        _assert_no_cors(requests.get(lan.url + path, headers={"Origin": ATTACKER, "Host": f"192.168.1.5:{lan.port}"},
                                     timeout=30), f"lan {path}", credentials_listed=True)
    preflight = requests.options(lan.url + "/sdapi/v1/txt2img", timeout=30, headers={
        "Origin": GOOD, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"})
    assert preflight.status_code == 200 and preflight.headers["access-control-allow-origin"] == GOOD
    written = requests.post(lan.url + "/sdapi/v1/options", json={"samples_save": True}, headers={"Origin": GOOD},
                            timeout=30)
    assert written.status_code == 200
    refused = requests.post(lan.url + "/sdapi/v1/options", json={"samples_save": True}, headers={"Origin": ATTACKER},
                            timeout=30)
    assert refused.status_code == 403


# --------------------------------------------------------------------------- 5. no secrets out

def test_cmd_flags_never_show_a_password(locked):
    response = requests.get(locked.url + "/sdapi/v1/cmd-flags", auth=AUTH, timeout=30)
    assert response.status_code == 200
    flags = response.json()
    assert flags["api_auth"] == "***" and flags["gradio_auth"] is None
    assert PASSWORD not in response.text


def test_the_settings_tab_and_the_pages_never_show_a_password(locked, session):
    config = session.get(locked.url + "/config", timeout=30)
    assert config.status_code == 200
    elem_ids = {c.get("props", {}).get("elem_id") for c in config.json()["components"]}
    assert "settings_submit" in elem_ids  # the Settings tab is in this config
    assert PASSWORD not in config.text
    for path in ("/", "/gradio_api/info"):
        assert PASSWORD not in session.get(locked.url + path, timeout=30).text, path
    for path in ("/sdapi/v1/options", "/openapi.json"):
        assert PASSWORD not in requests.get(locked.url + path, auth=AUTH, timeout=30).text, path

"""The trust boundary's rules, in-process: the login throttle on a hand-moved clock, which Host names
and origins pass, which flags are secret, who must log in. The attacks on a real server are in
test_trust_boundary.py and test_login.py."""
from __future__ import annotations

from argparse import Namespace

import pytest
from fastapi import FastAPI, WebSocket
from fastapi.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from modules.api import auth, cors, hosts
from modules.api.throttle import LoginThrottle
from modules.core import flags as cmd_args
from modules.core.flags import FlagError, parse_args


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# --------------------------------------------------------------------------- the throttle

def test_five_failures_lock_an_address_out_for_a_growing_time():
    clock = Clock()
    throttle = LoginThrottle(clock=clock)
    for _ in range(4):
        assert throttle.failure("10.0.0.1") == 0
        assert throttle.retry_after("10.0.0.1") == 0
    assert throttle.failure("10.0.0.1") == 1.0           # the 5th: locked out for 1 s
    assert throttle.retry_after("10.0.0.1") == 1.0
    assert throttle.retry_after_header("10.0.0.1") == "1"
    clock.now += 1.0
    assert throttle.retry_after("10.0.0.1") == 0           # over: the next attempt is checked
    delays = []
    for _ in range(8):
        delays.append(throttle.failure("10.0.0.1"))
        clock.now += delays[-1]
    assert delays == [2, 4, 8, 16, 32, 60, 60, 60]        # doubling, up to 60 s


def test_failures_are_per_address():
    clock = Clock()
    throttle = LoginThrottle(clock=clock)
    for _ in range(5):
        throttle.failure("10.0.0.1")
    assert throttle.retry_after("10.0.0.1") > 0
    assert throttle.retry_after("10.0.0.2") == 0           # another client is not locked out
    throttle.failure("10.0.0.2")
    assert throttle.retry_after("10.0.0.2") == 0


def test_a_good_login_clears_the_record_and_old_failures_are_forgotten():
    clock = Clock()
    throttle = LoginThrottle(clock=clock, forget_after=600)
    for _ in range(4):
        throttle.failure("a")
    throttle.success("a")
    assert throttle.failure("a") == 0                      # counting starts again
    for _ in range(3):
        throttle.failure("a")
    clock.now += 601                                       # 4 failures, then a long quiet time
    assert throttle.failure("a") == 0 and throttle.retry_after("a") == 0


def test_the_throttle_remembers_a_bounded_number_of_addresses():
    throttle = LoginThrottle(clock=Clock(), max_clients=3)
    for n in range(10):
        throttle.failure(f"10.0.0.{n}")
    assert len(throttle._records) == 3 and "10.0.0.9" in throttle._records


# --------------------------------------------------------------------------- Host names

def _hosts(*argv: str, hostname: str = "studio") -> hosts.HostPolicy:
    return hosts.HostPolicy.from_opts(parse_args(list(argv), env={}).opts, hostname=hostname)


@pytest.mark.parametrize("argv, allowed, refused", [
    ((), ["localhost", "localhost:7860", "127.0.0.1:7860", "127.3.4.5", "[::1]:7860", "LocalHost.:80"],
     ["evil.example", "evil.example:7860", "192.168.1.5:7860", "studio:7860", "", "localhost:x", "[::1",
      "localhost.evil.example", "127.0.0.1.evil.example"]),
    (("--listen",), ["192.168.1.5:7860", "[fe80::1]:7860", "studio:7860", "studio.local", "127.0.0.1"],
     ["evil.example", "studio.evil.example"]),
    (("--server-name", "box.lan"), ["box.lan:7860", "localhost"], ["192.168.1.5", "studio"]),
    (("--server-name", "192.168.1.5"), ["192.168.1.5:7860"], ["192.168.1.6:7860", "evil.example"]),
    (("--server-name", "0.0.0.0"), ["10.1.2.3", "studio"], ["evil.example"]),
    (("--allowed-hosts", "sd.example.com, Other.example"), ["sd.example.com:443", "other.example"], ["evil.example"]),
])
def test_which_host_names_are_this_servers(argv, allowed, refused):
    policy = _hosts(*argv)
    for host in allowed:
        assert policy.allows(host), (argv, host)
    for host in refused:
        assert not policy.allows(host), (argv, host)
    assert not policy.allows(None)


def test_allowed_hosts_star_turns_the_check_off():
    assert _hosts("--allowed-hosts", "*").allows("anything.example")


def _app_with_boundary(opts: Namespace) -> FastAPI:
    app = FastAPI()

    @app.get("/ping")
    def ping():
        return {"ok": True}

    @app.post("/write")
    def write():
        return {"ok": True}

    @app.websocket("/ws")
    async def ws(websocket: WebSocket):
        await websocket.accept()
        await websocket.send_text("hi")
        await websocket.close()

    cors.install(app, opts)
    hosts.install(app, opts)
    return app


def _opts(**kw) -> Namespace:
    return Namespace(**{"server_name": None, "listen": False, "allowed_hosts": None, "cors_allow_origins": None,
                        "cors_allow_origins_regex": None, **kw})


def test_the_host_check_covers_websockets():
    client = TestClient(_app_with_boundary(_opts()), base_url="http://localhost")
    with client.websocket_connect("ws://localhost/ws") as ws:
        assert ws.receive_text() == "hi"
    with pytest.raises(WebSocketDisconnect):
        with client.websocket_connect("ws://evil.example/ws") as ws:
            ws.receive_text()
    assert client.get("/ping", headers={"host": "evil.example"}).status_code == 400


def test_a_websocket_from_a_foreign_page_is_refused():
    client = TestClient(_app_with_boundary(_opts()), base_url="http://localhost")
    with pytest.raises(WebSocketDisconnect):
        with client.websocket_connect("ws://localhost/ws", headers={"origin": "http://attacker.example"}) as ws:
            ws.receive_text()
    with client.websocket_connect("ws://localhost/ws", headers={"origin": "http://localhost"}) as ws:
        assert ws.receive_text() == "hi"


# --------------------------------------------------------------------------- CORS

def test_a_star_in_the_origin_list_never_comes_with_credentials():
    client = TestClient(_app_with_boundary(_opts(cors_allow_origins="*")), base_url="http://localhost")
    response = client.get("/ping", headers={"origin": "http://anyone.example", "cookie": "a=b"})
    assert response.headers["access-control-allow-origin"] == "*"
    assert "access-control-allow-credentials" not in response.headers
    assert client.post("/write", headers={"origin": "http://anyone.example"}).status_code == 200  # '*': any site


def test_a_regex_matching_any_origin_counts_as_star():
    assert not cors.CorsPolicy(regex=".*").credentials
    assert not cors.CorsPolicy(regex="https?://.*").credentials
    assert cors.CorsPolicy(regex=r"https://(a|b)\.example\.com").credentials
    assert cors.CorsPolicy(origins=("https://a.example",)).credentials
    assert not cors.CorsPolicy().credentials


def test_listed_origins_and_no_others():
    app = _app_with_boundary(_opts(cors_allow_origins="https://a.example,https://b.example/",
                                   cors_allow_origins_regex=r"https://.*\.c\.example"))
    client = TestClient(app, base_url="http://localhost")
    for origin in ("https://a.example", "https://b.example", "https://x.c.example"):
        response = client.get("/ping", headers={"origin": origin})
        assert response.headers["access-control-allow-origin"] == origin
        assert response.headers["access-control-allow-credentials"] == "true"
        assert client.post("/write", headers={"origin": origin}).status_code == 200
    for origin in ("https://a.example.evil", "https://c.example", "null"):
        assert "access-control-allow-origin" not in client.get("/ping", headers={"origin": origin}).headers
        assert client.post("/write", headers={"origin": origin}).status_code == 403


@pytest.mark.parametrize("origin, host, same", [
    ("http://127.0.0.1:7860", "127.0.0.1:7860", True),
    ("http://127.0.0.1:7861", "127.0.0.1:7860", False),
    ("http://localhost:7860", "127.0.0.1:7860", False),
    ("https://sd.example.com", "sd.example.com", True),       # a proxy in front: no port in Host
    ("http://sd.example.com", "sd.example.com:80", True),
    ("https://sd.example.com", "sd.example.com:80", False),
    ("http://[::1]:7860", "[::1]:7860", True),
    ("null", "127.0.0.1:7860", False),
    ("file://", "127.0.0.1:7860", False),
])
def test_same_origin(origin, host, same):
    assert cors.same_origin(origin, host) is same


# --------------------------------------------------------------------------- flags

def test_secret_flags_are_redacted():
    opts = parse_args(["--api-auth", "u:p", "--gradio-auth", "a:b", "--gradio-auth-path", "/etc/users",
                       "--tls-keyfile", "k.pem", "--tls-certfile", "c.pem"], env={}).opts
    opts.civitai_api_key = "sk-123"       # as an extension's preload.py might add
    opts.hf_token = "hf_abc"
    opts.max_token_count = 75
    shown = cmd_args.public_flags(opts)
    assert shown["api_auth"] == shown["gradio_auth"] == shown["civitai_api_key"] == shown["hf_token"] == "***"
    assert shown["gradio_auth_path"] == "/etc/users" and shown["tls_keyfile"] == "k.pem"
    assert shown["max_token_count"] == 75
    assert opts.api_auth == "u:p"  # the live flags are untouched
    assert cmd_args.public_flags(parse_args([], env={}).opts)["api_auth"] is None


@pytest.mark.parametrize("text", ["alice:", "alice", "alice: ", "a:b,carol:", ":pw"])
def test_entries_without_a_password_are_refused(text):
    with pytest.raises(FlagError, match="--api-auth"):
        cmd_args.parse_credentials(text, flag="--api-auth")


@pytest.mark.parametrize("argv, reachable", [
    ([], None), (["--server-name", "127.0.0.1"], None), (["--server-name", "localhost"], None),
    (["--server-name", "::1"], None), (["--listen"], "--listen"), (["--share"], "--share"),
    (["--server-name", "0.0.0.0"], "--server-name 0.0.0.0"), (["--server-name", "box.lan"], "--server-name box.lan"),
])
def test_what_makes_a_server_reachable(argv, reachable):
    assert cmd_args.network_exposure(parse_args(argv, env={}).opts) == reachable


@pytest.mark.parametrize("extra, refused", [
    ([], True), (["--gradio-auth", "a:b"], False), (["--api-auth", "a:b"], False),
    (["--gradio-auth-path", "users.txt"], False), (["--insecure-no-auth"], False),
])
def test_a_reachable_server_needs_a_login(extra, refused):
    error = cmd_args.login_required_error(parse_args(["--listen", *extra], env={}).opts)
    assert bool(error) is refused
    assert cmd_args.login_required_error(parse_args(extra, env={}).opts) is None  # loopback: never


def test_the_ui_login_uses_gradio_auth_else_api_auth():
    both = Namespace(api_auth="api:1")
    assert auth.ui_credentials_for(both, [("ui", "2")]) == [("ui", "2")]
    assert auth.credentials_for(both, [("ui", "2")]) == [("api", "1")]
    assert auth.ui_credentials_for(Namespace(api_auth="api:1"), []) == [("api", "1")]
    assert auth.credentials_for(Namespace(api_auth=None), [("ui", "2")]) == [("ui", "2")]
    assert auth.ui_credentials_for(Namespace(api_auth=None), []) == []

"""The real server, started as users start it, on a free port."""
import socket

import requests

from conftest import free_port, run_webui, start_server


def test_serves_the_ui_and_prints_the_url(server):
    response = requests.get(server.url + "/", timeout=10)
    assert response.status_code == 200
    assert f"Running on local URL:  http://127.0.0.1:{server.port}" in server.output
    assert "Traceback" not in server.output
    assert (server.data_dir / "models" / "Stable-diffusion").is_dir()
    config = requests.get(server.url + "/config", timeout=10).json()
    labels = [c.get("props", {}).get("label") for c in config["components"]]
    assert "Apply settings" not in labels  # a button's text is its value, not a label
    assert any(c.get("props", {}).get("elem_id") == "settings_submit" for c in config["components"])


def test_default_bind_is_loopback_only(server):
    # 127.0.0.2 is another loopback address: reachable only if the server bound all interfaces.
    with socket.socket() as s:
        s.settimeout(2)
        assert s.connect_ex(("127.0.0.2", server.port)) != 0


def test_listen_binds_all_interfaces(tmp_path):
    srv = start_server(tmp_path, "--listen", "--insecure-no-auth")  # tests/security: --listen needs a login
    try:
        assert requests.get(f"http://127.0.0.2:{srv.port}/", timeout=10).status_code == 200
        assert "Listening on all interfaces" in srv.output
        assert "--insecure-no-auth: anyone who can reach this server can use it" in srv.output
    finally:
        srv.stop()


def test_gradio_auth_turns_away_requests_without_credentials(tmp_path):
    srv = start_server(tmp_path, "--gradio-auth", "alice:pw")
    try:
        assert requests.get(srv.url + "/config", timeout=10).status_code == 401
        assert requests.get(srv.url + "/gradio_api/info", timeout=10).status_code == 401
        bad = requests.Session()
        bad.post(srv.url + "/login", data={"username": "alice", "password": "wrong"}, timeout=10)
        assert bad.get(srv.url + "/config", timeout=10).status_code == 401
        good = requests.Session()
        assert good.post(srv.url + "/login", data={"username": "alice", "password": "pw"}, timeout=10).status_code == 200
        assert good.get(srv.url + "/config", timeout=10).status_code == 200
    finally:
        srv.stop()


def test_busy_port_gives_one_clear_message(tmp_path):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        port = holder.getsockname()[1]
        result = run_webui(["--data-dir", str(tmp_path), "--port", str(port)])
    assert result.returncode == 1
    assert f"port {port} on 127.0.0.1 is already in use" in result.stderr
    assert "--port" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_bad_flag_gives_one_clear_message(tmp_path):
    result = run_webui(["--data-dir", str(tmp_path), "--lisen"])
    assert result.returncode == 2
    assert result.stderr.strip() == "webui: error: unknown flag --lisen; did you mean --listen?"


def test_corrupt_config_warns_backs_up_and_starts(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    srv = start_server(tmp_path)
    try:
        assert requests.get(srv.url + "/", timeout=10).status_code == 200
        warnings = [line for line in srv.output.splitlines() if line.startswith("Warning:")]
        assert len(warnings) == 1 and "config.json could not be read" in warnings[0]
        assert len(list(tmp_path.glob("config.json.corrupt-*"))) == 1
        assert "Traceback" not in srv.output
    finally:
        srv.stop()


def test_legacy_flag_prints_a_notice_and_starts(tmp_path):
    port = free_port()
    srv = start_server(tmp_path, "--xformers", port=port)
    try:
        assert "Note: --xformers is accepted for compatibility" in srv.output
    finally:
        srv.stop()


def test_the_selected_checkpoint_is_loaded_after_start(tmp_path):
    from tiny_models import make_checkpoint

    make_checkpoint(tmp_path / "models" / "Stable-diffusion" / "tiny.safetensors", "sd1")
    srv = start_server(tmp_path)
    try:
        import time

        deadline = time.monotonic() + 120
        while "loaded in" not in srv.output and time.monotonic() < deadline:
            time.sleep(0.5)
        assert "Model tiny.safetensors" in srv.output and "loaded in" in srv.output, srv.output
        # the page stayed responsive while loading
        assert requests.get(srv.url + "/", timeout=10).status_code == 200
    finally:
        srv.stop()

"""Shared fixtures: a real server process on a free port, and a real headless Chromium."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
# Every playwright wait that names no timeout (clicks, fills, wait_for, goto...) waits this long, not
# playwright's 30 s: on a busy 2-core machine the page, and the server behind it, can take longer.
PAGE_TIMEOUT_MS = 120_000

# Built-in scripts keep their own logic beside them (outpainting_lib, sd_upscale_lib); the extension
# loader puts these folders on sys.path at run time, and the tests import the libraries the same way.
for _lib_dir in ("outpainting", "sd-upscale"):
    sys.path.insert(0, str(ROOT / "extensions-builtin" / _lib_dir))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServerProcess:
    proc: subprocess.Popen
    url: str
    port: int
    data_dir: Path
    lines: list[str] = field(default_factory=list)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)


def wait_until(predicate, timeout: float, what: str, interval: float = 0.05):
    """Poll `predicate` until it returns something truthy (and return that), at most `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def set_number(page, elem_id: str, value: str) -> None:
    """Type `value` into a slider's or number field's number box and leave it (Gradio commits on blur)."""
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(value)
    box.press("Tab")


def run_webui(args: list[str], *, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run webui.py to completion (for flags that make it exit)."""
    env = {**os.environ, "COMMANDLINE_ARGS": ""}
    return subprocess.run([sys.executable, str(ROOT / "webui.py"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def start_server(data_dir: Path, *args: str, port: int | None = None, ready_path: str = "/",
                 timeout: float = 120, env: dict[str, str] | None = None) -> ServerProcess:
    port = port or free_port()
    full_env = {**os.environ, "COMMANDLINE_ARGS": "", "PYTHONUNBUFFERED": "1", **(env or {})}
    cmd = [sys.executable, str(ROOT / "webui.py"), "--data-dir", str(data_dir), "--port", str(port), *args]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    server = ServerProcess(proc=proc, url=f"http://127.0.0.1:{port}", port=port, data_dir=data_dir)
    reader = threading.Thread(target=lambda: server.lines.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            reader.join(timeout=15)  # its last lines: the reader ends at the end of its output
            raise RuntimeError(f"server exited with {proc.returncode}:\n{server.output}")
        if "Running on local URL" in server.output:
            try:
                requests.get(server.url + ready_path, timeout=5)
                return server
            except requests.RequestException:
                pass
        time.sleep(0.2)
    server.stop()
    raise RuntimeError(f"server did not start within {timeout}s:\n{server.output}")


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """One plain server shared by the tests that only read from it."""
    srv = start_server(tmp_path_factory.mktemp("data"))
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def browser():
    """Debian's chromium driven by playwright; never a downloaded browser."""
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: install it with `apt-get install chromium` (the browser tests need it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(
            executable_path=CHROMIUM,
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--no-first-run", "--disable-sync", "--disable-quic"],
        )
        yield b
        b.close()


@pytest.fixture
def page(browser, tmp_path):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(PAGE_TIMEOUT_MS)
    pg = context.new_page()
    yield pg
    context.close()


def make_services(data_dir: Path, checkpoints: dict[str, tuple[str, int]]):
    """The app's core objects (no server) over `data_dir`, with tiny checkpoints {file name: (family, seed)}
    in its models/Stable-diffusion. The caller shuts the queue down: services.generation.queue.shutdown()."""
    from modules.core.flags import parse_args
    from modules.core.options import Options, default_templates
    from modules.core.paths import AppPaths
    from modules.services import build_services
    from tiny_models import make_checkpoint

    opts = parse_args(["--data-dir", str(data_dir)], env={}).opts
    paths = AppPaths.from_opts(opts)
    paths.ensure_user_dirs()
    for name, (family, seed) in checkpoints.items():
        make_checkpoint(paths.ckpt_dir / name, family, seed=seed)
    options = Options(paths.config_file, default_templates())
    options.load()
    return build_services(opts, paths, options)


@pytest.fixture(scope="module")
def model_server(tmp_path_factory):
    """A real server (one per test module) with one tiny SD1 checkpoint, tiny-sd1.safetensors."""
    from tiny_models import make_checkpoint

    data_dir = tmp_path_factory.mktemp("model-server")
    make_checkpoint(data_dir / "models" / "Stable-diffusion" / "tiny-sd1.safetensors", "sd1")
    srv = start_server(data_dir)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def one_torch_thread():
    """For modules of tiny models: on a busy shared CPU, intra-op threads cost far more than they give
    (measured in test_conditioning.py: 38 s with the default threads vs 8 s with one)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

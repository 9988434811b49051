"""Time from `python webui.py` to the first HTTP 200 on /, over a few runs.

Run with the venv's python:  venv/bin/python bench/startup.py [--runs 3]
Prints figures; asserts nothing (speed targets live here, not in tests).
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_run(timeout: float) -> float:
    port = free_port()
    with tempfile.TemporaryDirectory() as data_dir:
        env = {**os.environ, "COMMANDLINE_ARGS": ""}
        started = time.perf_counter()
        proc = subprocess.Popen([sys.executable, str(ROOT / "webui.py"), "--data-dir", data_dir, "--port", str(port)],
                                cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            while time.perf_counter() - started < timeout:
                if proc.poll() is not None:
                    raise RuntimeError(f"webui.py exited with {proc.returncode}")
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as response:
                        if response.status == 200:
                            return time.perf_counter() - started
                except OSError:
                    time.sleep(0.05)
            raise RuntimeError(f"no HTTP 200 within {timeout}s")
        finally:
            proc.terminate()
            proc.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=120)
    args = parser.parse_args()
    times = [one_run(args.timeout) for _ in range(args.runs)]
    print(f"startup to first HTTP 200: median {statistics.median(times):.2f}s, "
          f"min {min(times):.2f}s, max {max(times):.2f}s over {len(times)} runs")


if __name__ == "__main__":
    main()

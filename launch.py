"""A1111's `launch` module, for extensions' install.py (`import launch; launch.run_pip(...)`).

install.py runs in a child Python with the app folder on PYTHONPATH (modules/extensions.py), so
this is what `import launch` finds. The app itself starts from webui.py.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shlex
import subprocess
import sys

python = sys.executable
git = os.environ.get("GIT", "git")
index_url = os.environ.get("INDEX_URL", "")
dir_repos = "repositories"


def is_installed(package: str) -> bool:
    """True if the distribution (or, failing that, the importable module) `package` is present."""
    try:
        importlib.metadata.distribution(package)
        return True
    except importlib.metadata.PackageNotFoundError:
        pass
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):
        return False


def run(command: str | list[str], desc: str | None = None, errdesc: str | None = None,
        custom_env: dict[str, str] | None = None, live: bool = True) -> str:
    """Run a command; raise RuntimeError with its output when it fails. Returns stdout (when not live)."""
    if desc:
        print(desc, flush=True)
    args = command if isinstance(command, list) else shlex.split(command)
    result = subprocess.run(args, env=custom_env or os.environ, text=True,
                            capture_output=not live)
    if result.returncode != 0:
        message = f"{errdesc or 'Error running command'}.\nCommand: {command}\nError code: {result.returncode}"
        if not live:
            message += f"\nstdout: {result.stdout}\nstderr: {result.stderr}"
        raise RuntimeError(message)
    return result.stdout or ""


def run_pip(command: str, desc: str | None = None, live: bool = True) -> str:
    """`pip <command>` with this Python (A1111: run_pip("install x", "x"))."""
    index = ["--index-url", index_url] if index_url else []
    return run([python, "-m", "pip", *shlex.split(command), "--prefer-binary", *index],
               desc=f"Installing {desc}" if desc else None, errdesc=f"Couldn't install {desc or command}", live=live)


def commit_hash() -> str:
    try:
        return subprocess.run([git, "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__)), timeout=10).stdout.strip() or "<none>"
    except (OSError, subprocess.TimeoutExpired):
        return "<none>"

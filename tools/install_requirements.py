"""Install a requirements file into the running Python, only when it changed.

Used by webui.sh and webui.bat with the venv's python. A stamp (the file's
sha256) in the environment's prefix records the last successful install.
torch is installed first and alone, so the pinned build is the one chosen.

Lines marked ``# no-deps`` are installed in a last step with ``pip install --no-deps``: spandrel
and spandrel_extra_arches declare torchvision, which must never be installed (docs/architecture.md,
"spandrel without torchvision"); their real dependencies are pinned as ordinary lines.
"""
from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

NO_DEPS_MARK = re.compile(r"#\s*no-deps\b")


def split_requirements(text: str) -> tuple[list[str], list[str]]:
    """(ordinary lines, requirement specs to install with --no-deps)."""
    ordinary, no_deps = [], []
    for line in text.splitlines():
        if NO_DEPS_MARK.search(line) and line.split("#", 1)[0].strip():
            no_deps.append(line.split("#", 1)[0].strip())
        else:
            ordinary.append(line)
    return ordinary, no_deps


def install_steps(req: Path, pip: list[str], ordinary_file: Path) -> list[list[str]]:
    """The pip commands for `req`: torch alone, the ordinary lines, then the --no-deps lines."""
    text = req.read_text()
    ordinary, no_deps = split_requirements(text)
    ordinary_file.write_text("\n".join(ordinary) + "\n")
    torch_pin = next((line.strip() for line in ordinary if re.match(r"^torch==", line.strip())), None)
    steps = ([pip + [torch_pin]] if torch_pin else []) + [pip + ["-r", str(ordinary_file)]]
    if no_deps:
        steps.append(pip + ["--no-deps", *no_deps])
    return steps


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: install_requirements.py REQUIREMENTS_FILE", file=sys.stderr)
        return 2
    req = Path(argv[0])
    digest = hashlib.sha256(req.read_bytes()).hexdigest()
    stamp = Path(sys.prefix) / f".webui-{req.name}.sha256"
    if stamp.exists() and stamp.read_text().strip() == digest:
        return 0
    print(f"Installing {req}", flush=True)
    pip = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check"]
    fd, tmp = tempfile.mkstemp(prefix="webui-requirements-", suffix=".txt")
    os.close(fd)
    try:
        for cmd in install_steps(req, pip, Path(tmp)):
            if subprocess.call(cmd) != 0:
                print(f"install_requirements: error: pip failed: {' '.join(cmd[3:])}", file=sys.stderr)
                return 1
    finally:
        Path(tmp).unlink(missing_ok=True)
    stamp.write_text(digest + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Install a requirements file into the running Python, only when it changed.

Used by webui.sh and webui.bat with the venv's python. A stamp (the file's
sha256) in the environment's prefix records the last successful install.
torch is installed first and alone, so the pinned build is the one chosen.
"""
from __future__ import annotations

import hashlib
import re
import subprocess
import sys
from pathlib import Path


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
    torch_pin = next((line.strip() for line in req.read_text().splitlines() if re.match(r"^torch==", line.strip())), None)
    steps = ([pip + [torch_pin]] if torch_pin else []) + [pip + ["-r", str(req)]]
    for cmd in steps:
        if subprocess.call(cmd) != 0:
            print(f"install_requirements: error: pip failed: {' '.join(cmd[3:])}", file=sys.stderr)
            return 1
    stamp.write_text(digest + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

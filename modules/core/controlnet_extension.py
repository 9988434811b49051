"""A user-installed sd-webui-controlnet in extensions/: ControlNet is built in, so its code never
loads (the extension loader skips it), but its models/ folder is still scanned for ControlNet models.

It is recognised by its folder name (a clone, or a GitHub zip's ``-main``/``-master`` folder), by a git
remote naming the repository, or by the extension's entry script ``scripts/controlnet.py``.
Reads files only; never runs git. Torch-free.
"""
from __future__ import annotations

import re
from pathlib import Path

NAME = "sd-webui-controlnet"
ENTRY_SCRIPT = Path("scripts") / "controlnet.py"
_FOLDER = re.compile(rf"^{re.escape(NAME)}(-main|-master)?$", re.IGNORECASE)
_REMOTE = re.compile(rf"^\s*url\s*=\s*\S*/{re.escape(NAME)}(\.git)?/?\s*$", re.IGNORECASE | re.MULTILINE)
SKIP_REASON = "skipped: ControlNet is built in"


def is_controlnet_extension(path: Path) -> bool:
    path = Path(path)
    if not path.is_dir():
        return False
    if _FOLDER.match(path.name) or (path / ENTRY_SCRIPT).is_file():
        return True
    config = _git_config(path)
    return config is not None and bool(_REMOTE.search(config))


def _git_config(path: Path) -> str | None:
    """The checkout's .git/config text (a worktree's or submodule's ``gitdir:`` file followed), or None."""
    git = path / ".git"
    try:
        if git.is_file():
            target = git.read_text(encoding="utf-8", errors="replace").strip()
            if not target.startswith("gitdir:"):
                return None
            git = (path / target[len("gitdir:"):].strip()).resolve()
            common = git / "commondir"
            if common.is_file():
                git = (git / common.read_text(encoding="utf-8", errors="replace").strip()).resolve()
        config = git / "config"
        if not config.is_file() or config.stat().st_size > 1_000_000:
            return None
        return config.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None


def controlnet_extension_dirs(extensions_dir: Path) -> list[Path]:
    """The sd-webui-controlnet folders in `extensions_dir`, by name."""
    try:
        folders = sorted(p for p in Path(extensions_dir).iterdir() if not p.name.startswith("."))
    except OSError:
        return []
    return [p for p in folders if is_controlnet_extension(p)]


def model_dirs(extensions_dir: Path) -> list[Path]:
    """Where the extension keeps models: its models/ folder (the default path even when not installed)."""
    default = Path(extensions_dir) / NAME / "models"
    found = [p / "models" for p in controlnet_extension_dirs(extensions_dir)]
    return [default] + [p for p in found if p != default]

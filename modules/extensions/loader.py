"""Extensions: discovery, ordering, install.py, preload.py, scripts/*.py, page assets.

Layout (A1111's): ``extensions/<name>/`` (the user's, under --data-dir) and
``extensions-builtin/<name>/`` (ours) hold ``install.py``, ``preload.py``, ``scripts/*.py``,
``javascript/*.js``, ``style.css`` and ``metadata.ini``. A broken extension is logged with
its name, marked failed, and the app starts without it.
"""
from __future__ import annotations

import argparse
import configparser
import importlib.util
import json
import logging
import os
import re
import shlex
import subprocess
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

log = logging.getLogger(__name__)

INSTALL_TIMEOUT_S = 600


@dataclass
class ExtensionMetadata:
    canonical_name: str
    requires: list[str] = field(default_factory=list)
    before: list[str] = field(default_factory=list)
    after: list[str] = field(default_factory=list)


def _names(value: str | None) -> list[str]:
    return [n.strip() for n in re.split(r"[,\s]+", value or "") if n.strip()]


def read_metadata(path: Path, default_name: str) -> ExtensionMetadata:
    """metadata.ini's [Extension] section; a missing or unreadable file means no constraints."""
    parser = configparser.ConfigParser()
    file = path / "metadata.ini"
    try:
        if file.is_file():
            parser.read(file, encoding="utf-8")
    except (configparser.Error, OSError, UnicodeDecodeError) as err:
        log.warning("Extension %s: cannot read metadata.ini: %s", default_name, err)
        return ExtensionMetadata(default_name)
    section = parser["Extension"] if parser.has_section("Extension") else {}
    return ExtensionMetadata(
        canonical_name=(section.get("Name") or default_name).strip().lower(),
        requires=[n.lower() for n in _names(section.get("Requires"))],
        before=[n.lower() for n in _names(section.get("Before"))],
        after=[n.lower() for n in _names(section.get("After"))],
    )


@dataclass
class Extension:
    name: str
    path: Path
    is_builtin: bool
    enabled: bool = True
    status: str = "ok"          # "ok" | "failed: <why>" | "disabled"
    errors: list[str] = field(default_factory=list)
    metadata: ExtensionMetadata | None = None

    def fail(self, why: str, details: str = "") -> None:
        if self.status == "ok":
            self.status = f"failed: {why}"
        self.errors.append(details or why)

    @property
    def usable(self) -> bool:
        return self.enabled and self.status == "ok"

    def files(self, subdir: str, suffix: str) -> list[Path]:
        folder = self.path / subdir
        if not folder.is_dir():
            return []
        return sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(suffix))


# -- early flags: what must be known before the full parse ---------------------------------
def early_flags(argv: Sequence[str] | None, env: dict[str, str] | None = None) -> argparse.Namespace:
    """The flags that decide which extensions run, read before preload.py can add flags.

    Lenient: anything it cannot read is left to the real parse to report.
    """
    from modules.core import flags as cmd_args

    env = os.environ if env is None else env
    args = list(sys.argv[1:] if argv is None else argv) + shlex.split(env.get("COMMANDLINE_ARGS", ""))
    args = [a for a in args if a not in ("-h", "--help")]  # help is printed once, by the full parse
    parser = cmd_args.build_parser()
    try:
        opts, _ = parser.parse_known_args(args)
    except (cmd_args.FlagError, SystemExit):
        opts, _ = parser.parse_known_args([])
    return opts


def read_disable_settings(config_file: Path) -> tuple[set[str], str]:
    """(disabled_extensions, disable_all_extensions) from config.json, read raw: Options does not exist yet."""
    try:
        raw = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return set(), "none"
    if not isinstance(raw, dict):
        return set(), "none"
    disabled = raw.get("disabled_extensions") or []
    mode = raw.get("disable_all_extensions") or "none"
    return {str(n) for n in disabled if isinstance(n, str)}, mode if mode in ("none", "extra", "all") else "none"


# -- discovery and order -------------------------------------------------------------------
def discover(user_dir: Path, builtin_dir: Path, *, disabled: Iterable[str] = (), mode: str = "none") -> list[Extension]:
    """Every extension folder, in load order. `mode`: "none", "extra" (built-ins only) or "all"."""
    disabled = set(disabled)
    found: list[Extension] = []
    for folder, builtin in ((builtin_dir, True), (user_dir, False)):
        if not folder.is_dir():
            continue
        for path in sorted(folder.iterdir(), key=lambda p: p.name.lower()):
            if not path.is_dir() or path.name.startswith("."):
                continue
            ext = Extension(name=path.name, path=path, is_builtin=builtin,
                            metadata=read_metadata(path, path.name.lower()))
            off = (mode == "all" or (mode == "extra" and not builtin) or path.name in disabled)
            if off:
                ext.enabled, ext.status = False, "disabled"
            elif not builtin:
                _skip_if_builtin_controlnet(ext)
            found.append(ext)
    return order(found)


def _skip_if_builtin_controlnet(ext: Extension) -> None:
    """sd-webui-controlnet replaces the ldm UNet's forward: on our core ControlNet is built in, so none
    of its code runs (install.py, preload.py, scripts, javascript); services still scan its models/."""
    from modules.core.controlnet_extension import SKIP_REASON, is_controlnet_extension

    if is_controlnet_extension(ext.path):
        ext.status = SKIP_REASON
        log.info("Extension %s skipped: ControlNet is built into this web UI (its models/ folder is still "
                 "scanned for ControlNet models)", ext.name)


def order(exts: list[Extension]) -> list[Extension]:
    """Topological order by Requires/After (dependency first) and Before; else discovery order.

    Unknown names are ignored; a cycle is broken at the earliest-discovered extension, with a warning.
    """
    by_name: dict[str, Extension] = {}
    for ext in exts:
        by_name.setdefault(ext.metadata.canonical_name if ext.metadata else ext.name.lower(), ext)
        by_name.setdefault(ext.name.lower(), ext)
    preds: dict[int, set[int]] = {id(e): set() for e in exts}
    for ext in exts:
        md = ext.metadata
        if md is None:
            continue
        for dep in md.requires:
            if dep not in by_name:
                if ext.enabled:
                    log.warning("Extension %s requires %s, which is not installed", ext.name, dep)
            elif not by_name[dep].enabled and ext.enabled:
                log.warning("Extension %s requires %s, which is disabled", ext.name, dep)
        for dep in md.requires + md.after:
            other = by_name.get(dep)
            if other is not None and other is not ext:
                preds[id(ext)].add(id(other))
        for later in md.before:
            other = by_name.get(later)
            if other is not None and other is not ext:
                preds[id(other)].add(id(ext))
    remaining = list(exts)
    done: set[int] = set()
    result: list[Extension] = []
    while remaining:
        ready = next((e for e in remaining if preds[id(e)] <= done), None)
        if ready is None:
            ready = remaining[0]
            log.warning("Extension load order has a cycle among %s; loading %s first",
                        ", ".join(e.name for e in remaining if not preds[id(e)] <= done), ready.name)
        remaining.remove(ready)
        done.add(id(ready))
        result.append(ready)
    return result


# -- install.py ----------------------------------------------------------------------------
def run_installers(exts: Iterable[Extension], app_root: Path) -> None:
    """Each enabled extension's install.py, once, in a child Python with the app root importable."""
    for ext in exts:
        script = ext.path / "install.py"
        if not ext.usable or not script.is_file():
            continue
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            p for p in (str(app_root), os.environ.get("PYTHONPATH", "")) if p)}
        try:
            result = subprocess.run([sys.executable, str(script)], cwd=ext.path, env=env,
                                    capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired) as err:
            log.error("Extension %s: install.py could not run: %s", ext.name, err)
            ext.fail("install.py could not run", str(err))
            continue
        if result.returncode != 0:
            output = (result.stdout + result.stderr).strip()[-4000:]
            log.error("Extension %s: install.py failed with exit code %d:\n%s", ext.name, result.returncode, output)
            ext.fail(f"install.py exited with {result.returncode}", output)


# -- preload.py ----------------------------------------------------------------------------
def _import_file(module_name: str, file: Path) -> Any:
    spec = importlib.util.spec_from_file_location(module_name, file)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {file}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(module_name, None)
        raise
    return module


def _module_name(ext: Extension, part: str) -> str:
    safe = re.sub(r"\W", "_", f"{ext.name}_{part}")
    base = f"ext_{'builtin' if ext.is_builtin else 'user'}_{safe}"  # flat: no parent package needed
    name, n = base, 1
    while name in sys.modules:  # "a-b" and "a_b" must not share (and clobber) one module
        n += 1
        name = f"{base}_{n}"
    return name


def preloaders(exts: Iterable[Extension]) -> list[Callable[[argparse.ArgumentParser], None]]:
    """One function per preload.py; each runs isolated, so one bad preload only fails its extension."""
    out = []
    for ext in exts:
        file = ext.path / "preload.py"
        if not ext.usable or not file.is_file():
            continue

        def run(parser: argparse.ArgumentParser, ext: Extension = ext, file: Path = file) -> None:
            try:
                with _on_sys_path(ext.path):
                    module = _import_file(_module_name(ext, "preload"), file)
                    preload = getattr(module, "preload", None)
                    if callable(preload):
                        preload(parser)
            except Exception as err:
                log.error("Extension %s: preload.py failed:\n%s", ext.name, traceback.format_exc())
                ext.fail(f"preload.py: {err}", traceback.format_exc())
        out.append(run)
    return out


class _on_sys_path:
    """Put an extension's folder first on sys.path while its code is imported (A1111 does too)."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __enter__(self):
        sys.path.insert(0, self.path)

    def __exit__(self, *exc):
        try:
            sys.path.remove(self.path)
        except ValueError:
            pass


# -- scripts/*.py --------------------------------------------------------------------------
def load_scripts(exts: Iterable[Extension], registry: Any) -> dict[str, Any]:
    """Import every enabled extension's scripts/*.py, each as its own module; name -> module.

    The registry's current_script is set during each import so callbacks name their file.
    """
    modules: dict[str, Any] = {}
    for ext in exts:
        if not ext.usable:
            continue
        for file in ext.files("scripts", ".py"):
            registry.current_script = str(file)
            _importing[0] = file
            try:
                # The folder stays on sys.path: scripts import their own helpers lazily too.
                if str(ext.path) not in sys.path:
                    sys.path.append(str(ext.path))
                name = _module_name(ext, f"scripts_{file.stem}")
                modules[name] = _import_file(name, file)
            except Exception as err:
                details = traceback.format_exc()
                log.error("Extension %s: error loading script %s:\n%s", ext.name, file.name, details)
                ext.fail(f"{file.name}: {type(err).__name__}: {err}", details)
                registry.remove_script(str(file))
            finally:
                registry.current_script = None
                _importing[0] = None
    return modules


_importing: list[Path | None] = [None]   # the scripts/*.py being imported now (for scripts.basedir())


def importing_script() -> Path | None:
    return _importing[0]


# -- page assets ---------------------------------------------------------------------------
def page_assets(exts: Iterable[Extension]) -> tuple[str, str]:
    """(head HTML with every javascript/*.js inlined, concatenated style.css) of enabled extensions."""
    head: list[str] = []
    css: list[str] = []
    for ext in exts:
        if not ext.usable:
            continue
        for file in ext.files("javascript", ".js"):
            try:
                # "</script" inside the code would end the tag early.
                code = file.read_text(encoding="utf-8").replace("</script", "<\\/script")
            except (OSError, UnicodeDecodeError) as err:
                log.error("Extension %s: cannot read %s: %s", ext.name, file.name, err)
                continue
            head.append(f'<script type="text/javascript" data-extension="{ext.name}">\n{code}\n</script>')
        style = ext.path / "style.css"
        if style.is_file():
            try:
                css.append(f"/* {ext.name} */\n" + style.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError) as err:
                log.error("Extension %s: cannot read style.css: %s", ext.name, err)
    return "\n".join(head), "\n".join(css)


def log_summary(exts: Iterable[Extension]) -> None:
    exts = list(exts)
    if not exts:
        return
    loaded = [e.name for e in exts if e.usable]
    failed = [f"{e.name} ({e.status})" for e in exts if e.status.startswith("failed")]
    log.info("Extensions loaded: %s", ", ".join(loaded) or "none")
    if failed:
        log.warning("Extensions that failed: %s", "; ".join(failed))


# -- management (the Extensions tab) -------------------------------------------------------
class ExtensionAccessError(PermissionError):
    """Installing or updating is refused: the server is reachable from other machines."""


def check_install_access(cmd_opts: Any) -> None:
    """A1111's rule: with --listen/--share/--server-name anyone on the network could run code
    through an install, so it takes --enable-insecure-extension-access."""
    from modules.core import flags as cmd_args

    if cmd_args.is_non_local(cmd_opts) and not getattr(cmd_opts, "enable_insecure_extension_access", False):
        raise ExtensionAccessError(
            "Installing and updating extensions is disabled because the server is reachable from other "
            "machines (--listen, --share or --server-name). Add --enable-insecure-extension-access to allow it.")


def apply_enabled(options: Any, names: Iterable[str], enabled: Iterable[str], mode: str = "none") -> list[str]:
    """Store which extensions are disabled (config.json); they take effect at the next start."""
    disabled = sorted(set(names) - set(enabled))
    options.set("disabled_extensions", disabled)
    options.set("disable_all_extensions", mode)
    options.save()
    return disabled


_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def name_from_url(url: str) -> str:
    name = url.rstrip("/").rsplit("/", 1)[-1]
    return name[:-4] if name.endswith(".git") else name


def install_from_url(cmd_opts: Any, extensions_dir: Path, url: str, name: str = "") -> Path:
    """git clone `url` into extensions_dir/<name>; raises ExtensionAccessError or ValueError/RuntimeError."""
    check_install_access(cmd_opts)
    url = url.strip()
    if not url:
        raise ValueError("give the URL of a git repository")
    name = (name or name_from_url(url)).strip()
    if not _SAFE_NAME.match(name):
        raise ValueError(f"not a usable folder name: {name!r}")
    target = extensions_dir / name
    if target.exists():
        raise ValueError(f"extension folder already exists: {target}")
    temp = extensions_dir / f".tmp-{name}"
    if temp.exists():
        import shutil

        shutil.rmtree(temp)
    extensions_dir.mkdir(parents=True, exist_ok=True)
    # "--" so a URL can never be read as a git option.
    result = subprocess.run(["git", "clone", "--depth", "1", "--", url, str(temp)], capture_output=True, text=True,
                            timeout=INSTALL_TIMEOUT_S, env={**os.environ, "GIT_TERMINAL_PROMPT": "0"})
    if result.returncode != 0:
        raise RuntimeError(f"git clone failed: {(result.stderr or result.stdout).strip()[-2000:]}")
    temp.rename(target)
    log.info("Installed extension %s from %s; restart to load it", name, url)
    return target


def update(cmd_opts: Any, ext: Extension) -> str:
    """git pull --ff-only in the extension's folder; returns git's message."""
    check_install_access(cmd_opts)
    if not (ext.path / ".git").exists():
        raise ValueError(f"{ext.name} is not a git checkout")
    result = subprocess.run(["git", "-C", str(ext.path), "pull", "--ff-only"], capture_output=True, text=True,
                            timeout=INSTALL_TIMEOUT_S, env={**os.environ, "GIT_TERMINAL_PROMPT": "0"})
    if result.returncode != 0:
        raise RuntimeError(f"git pull failed: {(result.stderr or result.stdout).strip()[-2000:]}")
    return result.stdout.strip()


def git_info(path: Path) -> dict[str, Any]:
    """remote, branch, commit hash and date of a git checkout (empty for a plain folder), for the API's
    /extensions; git failing or missing gives the empty values."""
    out: dict[str, Any] = {"remote": "", "branch": "", "commit_hash": "", "commit_date": 0}
    if not (path / ".git").exists():
        return out

    def git(*args: str) -> str:
        try:
            result = subprocess.run(["git", "-C", str(path), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return ""
        return result.stdout.strip() if result.returncode == 0 else ""
    out["remote"] = git("config", "--get", "remote.origin.url")
    out["branch"] = git("rev-parse", "--abbrev-ref", "HEAD")
    head = git("log", "-1", "--format=%H %ct")
    if head:
        commit, _, when = head.partition(" ")
        out["commit_hash"] = commit
        out["commit_date"] = int(when) if when.isdigit() else 0
    return out

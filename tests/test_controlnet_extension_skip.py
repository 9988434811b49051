"""A user-installed sd-webui-controlnet is skipped (ControlNet is built in): none of its code runs,
its models/ folder is still scanned. The fake extensions' code would leave a marker or raise if run."""
from __future__ import annotations

import logging
from pathlib import Path

import requests

from conftest import start_server
from modules.core.controlnet_extension import SKIP_REASON, is_controlnet_extension, model_dirs
from modules.extensions import loader as extensions
from tiny_controlnets import make_controlnet


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def fake_controlnet_extension(folder: Path, *, entry_script: bool = True) -> None:
    """Every place the real extension runs code, each leaving a marker (and the preload a flag clash)."""
    marker = folder.parent.parent / "ran.txt"
    leave = f"open({str(marker)!r}, 'a').write({folder.name!r} + ' ' + __file__ + '\\n')\n"
    write(folder / "install.py", leave)
    write(folder / "preload.py", leave + "def preload(parser):\n    parser.add_argument('--controlnet-dir')\n")
    script = folder / "scripts" / ("controlnet.py" if entry_script else "other.py")
    write(script, leave + "raise RuntimeError('sd-webui-controlnet imported')\n")
    write(folder / "javascript" / "cn.js", "window.cnExtensionRan = true;\n")


def test_recognised_by_name_entry_script_or_git_remote(tmp_path):
    named, zipped, renamed, cloned, other = (tmp_path / n for n in (
        "sd-webui-controlnet", "SD-WEBUI-CONTROLNET-main", "my-cn", "cn-clone", "sd-webui-controlnet-evaclip"))
    for folder in (named, zipped, other):
        folder.mkdir()
    write(renamed / "scripts" / "controlnet.py", "")
    write(cloned / ".git" / "config", '[remote "origin"]\n\turl = git@github.com:Mikubill/sd-webui-controlnet.git\n')
    assert all(is_controlnet_extension(p) for p in (named, zipped, renamed, cloned))
    assert not is_controlnet_extension(other)
    write(other / ".git" / "config", '[remote "origin"]\n\turl = https://github.com/someone/sd-webui-controlnet-evaclip\n')
    assert not is_controlnet_extension(other)
    # a worktree-style .git file pointing at the real git dir
    linked = tmp_path / "linked"
    write(linked / ".git", f"gitdir: {cloned / '.git'}\n")
    assert is_controlnet_extension(linked)
    assert model_dirs(tmp_path)[0] == tmp_path / "sd-webui-controlnet" / "models"
    assert {p.parent.name for p in model_dirs(tmp_path)} == {"sd-webui-controlnet", "SD-WEBUI-CONTROLNET-main",
                                                             "my-cn", "cn-clone", "linked"}


def test_loader_never_runs_its_code_and_says_so_once(tmp_path, caplog):
    user = tmp_path / "data" / "extensions"
    fake_controlnet_extension(user / "sd-webui-controlnet-main")
    fake_controlnet_extension(user / "renamed-cn")
    write(user / "other-ext" / "scripts" / "ok.py", "VALUE = 1\n")
    with caplog.at_level(logging.INFO, logger="modules.extensions.loader"):
        found = extensions.discover(user, tmp_path / "none")
    status = {e.name: e.status for e in found}
    assert status == {"other-ext": "ok", "renamed-cn": SKIP_REASON, "sd-webui-controlnet-main": SKIP_REASON}
    skipped = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(skipped) == 2 and all("ControlNet is built in" in m for m in skipped)

    import argparse

    extensions.run_installers(found, tmp_path)
    for preload in extensions.preloaders(found):
        preload(argparse.ArgumentParser())
    modules = extensions.load_scripts(found, _Registry())
    head, _ = extensions.page_assets(found)
    assert not (tmp_path / "data" / "ran.txt").exists()
    assert [name for name in modules if "ok" in name] and not [n for n in modules if "controlnet" in n]
    assert "cnExtensionRan" not in head


def test_a_disabled_copy_stays_disabled(tmp_path):
    user = tmp_path / "extensions"
    fake_controlnet_extension(user / "sd-webui-controlnet")
    found = extensions.discover(user, tmp_path / "none", disabled={"sd-webui-controlnet"})
    assert [e.status for e in found] == ["disabled"]


class _Registry:
    current_script = None

    def remove_script(self, name):
        pass


def test_server_starts_skips_the_extension_and_lists_its_models(tmp_path):
    data = tmp_path / "data"
    folder = data / "extensions" / "sd-webui-controlnet"
    fake_controlnet_extension(folder)
    make_controlnet(folder / "models" / "control_from_extension.safetensors", "sd1", layout="ldm")
    renamed = data / "extensions" / "cn-copy"
    fake_controlnet_extension(renamed)   # found by its scripts/controlnet.py
    make_controlnet(renamed / "models" / "control_from_copy.pth", "sd1", layout="ldm", seed=2)
    srv = start_server(data, "--api")
    try:
        models = requests.get(srv.url + "/controlnet/model_list", timeout=30).json()["model_list"]
        assert any(m.startswith("control_from_extension [") for m in models), models
        assert any(m.startswith("control_from_copy [") for m in models), models
        assert "Extension sd-webui-controlnet skipped: ControlNet is built into this web UI" in srv.output
        assert "Extension cn-copy skipped" in srv.output
        assert "sd-webui-controlnet imported" not in srv.output
    finally:
        srv.stop()
    assert not (data / "ran.txt").exists()

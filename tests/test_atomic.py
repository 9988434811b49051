"""Atomic writes: temp files a killed process leaves are removed at startup; symlinked targets keep their link."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT
from modules.core.atomic import (
    atomic_output,
    atomic_write_json,
    atomic_write_text,
    is_temp_file_name,
    remove_stale_temp_files,
)


def _age(path, seconds):
    t = time.time() - seconds
    os.utime(path, (t, t))
    return path


# --------------------------------------------------------------------------- temp file names

def test_temp_file_is_hidden_recognisable_and_keeps_the_extension(tmp_path):
    target = tmp_path / "00001-42.png"
    with atomic_output(target) as fh:
        (temp,) = [p for p in tmp_path.iterdir()]
        assert temp.name.startswith(".00001-42.png.") and temp.name.endswith(".atomic-tmp.png")
        assert is_temp_file_name(temp.name) and fh.name == str(temp)
        fh.write(b"x")
    assert [p.name for p in tmp_path.iterdir()] == ["00001-42.png"]


@pytest.mark.parametrize("name,is_temp", [
    (".config.json.a1b2_c3d.atomic-tmp.json", True),
    (".cache.json.zzzzzzzz.atomic-tmp.json", True),
    (".README.abcdefgh.atomic-tmp", True),
    (".00005-1.png.k3j4h5g6.tmp.png", True),       # the name earlier versions used
    (".00005-1.png.k3j4h5g6.atomic-tmp.jpg", False),  # suffix must be the target's
    (".config.json.ABCDEFGH.atomic-tmp.json", False),
    (".config.json.abc.atomic-tmp.json", False),
    ("config.json.abcdefgh.atomic-tmp.json", False),
    ("00005-1.png", False),
    (".hidden.png", False),
    (".00500-1.png.tmp", False),
])
def test_temp_file_name_pattern(name, is_temp):
    assert is_temp_file_name(name) is is_temp


def test_remove_stale_temp_files_only_removes_old_temp_files(tmp_path):
    stale = tmp_path / ".config.json.abcdefgh.atomic-tmp.json"
    stale.write_text("{")
    _age(stale, 120)
    legacy = tmp_path / ".00001-1.png.abcdefgh.tmp.png"
    legacy.write_bytes(b"x")
    _age(legacy, 3600)
    fresh = tmp_path / ".config.json.hgfedcba.atomic-tmp.json"
    fresh.write_text("{")  # another process may be writing it right now
    kept = [tmp_path / "config.json", tmp_path / ".hidden"]
    for p in kept:
        p.write_text("x")
        _age(p, 3600)
    a_dir = tmp_path / ".x.json.abcdefgh.atomic-tmp.json"
    a_dir.mkdir()
    _age(a_dir, 3600)
    link = tmp_path / ".y.json.abcdefgh.atomic-tmp.json"
    link.symlink_to(kept[0])
    nested = tmp_path / "2024-01-01"
    nested.mkdir()
    deep = nested / ".00002-1.png.abcdefgh.atomic-tmp.png"
    deep.write_bytes(b"x")
    _age(deep, 3600)

    removed = remove_stale_temp_files(tmp_path)
    assert sorted(removed) == sorted([stale, legacy])
    assert not stale.exists() and not legacy.exists()
    assert fresh.exists() and all(p.exists() for p in kept) and a_dir.is_dir() and link.is_symlink()
    assert deep.exists()  # one folder, never a recursive walk
    assert remove_stale_temp_files(tmp_path / "missing") == []
    assert remove_stale_temp_files(tmp_path, now=time.time() + 120) == [fresh]


KILLED_WRITER = """
import os, signal, sys
from modules.core.atomic import atomic_output
with atomic_output(sys.argv[1]) as fh:
    fh.write(b"half an image")
    fh.flush()
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_write_killed_midway_leaves_the_target_alone_and_the_temp_file_is_cleaned_up(tmp_path):
    target = tmp_path / "config.json"
    target.write_text('{"old": true}')
    result = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(target)], cwd=ROOT, capture_output=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert result.returncode == -signal.SIGKILL, result.stderr
    assert target.read_text() == '{"old": true}'
    (leftover,) = [p for p in tmp_path.iterdir() if p != target]
    assert is_temp_file_name(leftover.name)
    assert remove_stale_temp_files(tmp_path) == []  # too recent: could be a live writer
    assert remove_stale_temp_files(tmp_path, now=time.time() + 61) == [leftover]
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]


def test_startup_removes_stale_temp_files_from_the_folders_atomic_writes_go_to(tmp_path):
    import webui
    from modules.core import flags

    data = tmp_path / "data"
    out = data / "outputs"
    stale = [
        data / ".config.json.abcdefgh.atomic-tmp.json",
        data / ".cache.json.abcdefgh.tmp.json",
        out / "txt2img-images" / "2025-03-02" / ".00007-1.png.abcdefgh.atomic-tmp.png",
        out / "txt2img-images" / "2025-03-01" / ".00003-1.txt.abcdefgh.atomic-tmp.txt",
        out / "txt2img-grids" / "2025-03-02" / ".grid-0001.png.abcdefgh.atomic-tmp.png",
        out / "img2img-images" / ".00001-1.png.abcdefgh.atomic-tmp.png",
        out / "extras-images" / ".00001.png.abcdefgh.atomic-tmp.png",
    ]
    fresh = data / ".styles.csv.abcdefgh.atomic-tmp.csv"
    # the third most recent date folder is not listed: huge output trees stay cheap
    old_folder = out / "txt2img-images" / "2025-02-28"
    not_listed = old_folder / ".00001-1.png.abcdefgh.atomic-tmp.png"
    for p in [*stale, fresh, not_listed]:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")
        if p is not fresh:
            _age(p, 600)
    for age, folder in ((500, "2025-03-02"), (550, "2025-03-01"), (900, "2025-02-28")):
        _age(out / "txt2img-images" / folder, age)

    parsed = flags.parse_args(["--data-dir", str(data)], env={})
    services, _ = webui.prepare(parsed)
    try:
        assert [p for p in stale if p.exists()] == []
        assert fresh.exists() and not_listed.exists()
    finally:
        services.generation.queue.shutdown()


# --------------------------------------------------------------------------- symlinks

@pytest.mark.parametrize("relative", [False, True])
def test_write_through_a_symlink_replaces_the_target_and_keeps_the_link(tmp_path, relative):
    real_dir = tmp_path / "dotfiles"
    real_dir.mkdir()
    real = real_dir / "webui-config.json"
    real.write_text('{"a": 1}\n')
    real.chmod(0o640)
    data = tmp_path / "data"
    data.mkdir()
    link = data / "config.json"
    link.symlink_to(os.path.relpath(real, data) if relative else real)

    atomic_write_json(link, {"a": 2})
    assert link.is_symlink() and os.readlink(link) == (os.path.relpath(real, data) if relative else str(real))
    assert json.loads(real.read_text()) == {"a": 2}
    assert real.stat().st_mode & 0o777 == 0o640
    assert sorted(p.name for p in data.iterdir()) == ["config.json"]
    assert sorted(p.name for p in real_dir.iterdir()) == ["webui-config.json"]


def test_write_through_a_chain_of_symlinks_and_a_failed_write(tmp_path):
    real = tmp_path / "real.txt"
    real.write_text("old")
    mid = tmp_path / "mid.txt"
    mid.symlink_to(real)
    link = tmp_path / "link.txt"
    link.symlink_to(mid)
    atomic_write_text(link, "new")
    assert link.is_symlink() and mid.is_symlink() and real.read_text() == "new"
    with pytest.raises(RuntimeError):
        with atomic_output(link, "w") as fh:
            fh.write("half")
            raise RuntimeError("boom")
    assert real.read_text() == "new" and link.is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.txt", "mid.txt", "real.txt"]


def test_options_saved_through_a_symlinked_config_keep_the_link(tmp_path):
    from modules.core.options import Options, default_templates

    real = tmp_path / "shared" / "config.json"
    real.parent.mkdir()
    real.write_text("{}")
    link = tmp_path / "config.json"
    link.symlink_to(real)
    opts = Options(link, default_templates())
    opts.load()
    opts.set("samples_format", "webp")
    opts.save()
    assert link.is_symlink() and json.loads(real.read_text())["samples_format"] == "webp"

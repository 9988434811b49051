"""Folders and file names a client may not choose, and saves that never overwrite.

Against real servers on free loopback ports: a crafted file name pattern or prompt cannot replace an
existing file (a ``.txt`` sidecar over ``requirements.txt`` would run code at the next start) nor
write outside the output folder; the API can never change output folders, name patterns, formats or
``save_txt``; a server reachable from other machines locks them in the UI too (unless
--allow-dir-config); img2img Batch folders must lie inside the data folder.
"""
from __future__ import annotations

import datetime as dt
import json
import os
import threading
from pathlib import Path

import pytest
import requests
from PIL import Image

from conftest import start_server

TINY = {"prompt": "a cat", "width": 64, "height": 64, "steps": 2, "seed": 1}
FOLDER_KEYS = {
    "outdir_samples": "/tmp/evil", "outdir_txt2img_samples": "..", "outdir_img2img_samples": "/",
    "outdir_extras_samples": "x", "outdir_txt2img_grids": "/tmp", "outdir_img2img_grids": "/tmp",
    "outdir_grids": "/tmp", "outdir_save": "/tmp", "outdir_init_images": "/tmp",
    "save_txt": True, "samples_filename_pattern": "../../requirements", "directories_filename_pattern": "..",
    "samples_format": "jpg", "grid_format": "webp",
}


def _url(srv, path: str) -> str:
    assert srv.url.startswith("http://127.0.0.1:")
    return f"{srv.url}/sdapi/v1/{path}"


@pytest.fixture(scope="module")
def attacked(tmp_path_factory):
    """A server whose own config (set by its admin) saves [prompt]-named images with .txt sidecars,
    numbers off, into a folder that already holds files the attacker wants replaced."""
    from tiny_models import make_checkpoint

    root = tmp_path_factory.mktemp("folders")
    make_checkpoint(root / "models" / "Stable-diffusion" / "tiny.safetensors", "sd1")
    install_like = root / "install-like"
    (root / "config.json").write_text(json.dumps({
        "outdir_txt2img_samples": str(install_like), "save_txt": True, "save_images_add_number": False,
        "samples_filename_pattern": "[prompt_spaces]",
    }), encoding="utf-8")
    server = start_server(root, "--api")
    yield server, install_like
    server.stop()


def _today(folder: Path) -> Path:
    return folder / dt.datetime.now().strftime("%Y-%m-%d")


def test_a_sidecar_never_replaces_an_existing_file(attacked):
    srv, install_like = attacked
    target = _today(install_like)
    target.mkdir(parents=True, exist_ok=True)
    (target / "requirements.txt").write_text("ORIGINAL\n", encoding="utf-8")
    (target / "webui.png").write_bytes(b"ORIGINAL PNG")
    for prompt in ("requirements", "webui", "requirements"):
        r = requests.post(_url(srv, "txt2img"), json={**TINY, "prompt": prompt, "save_images": True}, timeout=300)
        assert r.status_code == 200, r.text[:300]
    assert (target / "requirements.txt").read_text(encoding="utf-8") == "ORIGINAL\n"
    assert (target / "webui.png").read_bytes() == b"ORIGINAL PNG"
    names = sorted(p.name for p in target.iterdir())
    # each image has its own sidecar with the image's stem; nothing was replaced
    for stem in ("requirements-1", "requirements-2", "webui-1"):
        assert f"{stem}.png" in names and f"{stem}.txt" in names, names


def test_a_prompt_cannot_walk_out_of_the_output_folder(attacked):
    srv, install_like = attacked
    target = _today(install_like)
    before = {p for p in Path(srv.data_dir).rglob("*") if p.is_file()}
    for prompt in ("../../../escape", "/tmp/escape", "..\\..\\escape", "..", "....//....//escape", "sub/dir/x"):
        r = requests.post(_url(srv, "txt2img"), json={**TINY, "prompt": prompt, "save_images": True}, timeout=300)
        assert r.status_code == 200, r.text[:300]
    new = {p for p in Path(srv.data_dir).rglob("*") if p.is_file()} - before
    assert new and all(p.parent == target for p in new), sorted(map(str, new))
    assert not list(Path("/tmp").glob("escape*"))


def test_concurrent_saves_of_one_name_never_overwrite(tmp_path):
    from modules.core.saving import save_image

    images = [Image.new("RGB", (8, 8), (i, 0, 0)) for i in range(12)]
    results: list[Path] = []

    def save(img):
        results.append(save_image(img, tmp_path, seed=1, info="x", pattern="same", add_number=False,
                                  save_txt=True).path)
    threads = [threading.Thread(target=save, args=(img,)) for img in images]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(set(results)) == 12
    assert sorted(p.name for p in tmp_path.glob("*.txt")) == sorted(p.with_suffix(".txt").name for p in results)


def test_a_dangling_symlink_is_not_written_through(tmp_path):
    from modules.core.saving import save_image

    outside = tmp_path / "outside.txt"
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "x.txt").symlink_to(outside)
    saved = save_image(Image.new("RGB", (8, 8)), folder, seed=1, info="hi", pattern="x", add_number=False, save_txt=True)
    assert not outside.exists() and saved.txt_path.name == "x-1.txt" and saved.path.name == "x-1.png"


# --------------------------------------------------------------------------- the API never chooses folders

@pytest.fixture(scope="module")
def api(tmp_path_factory):
    from tiny_models import make_checkpoint

    root = tmp_path_factory.mktemp("folders-api")
    make_checkpoint(root / "models" / "Stable-diffusion" / "tiny.safetensors", "sd1")
    server = start_server(root, "--api", "--allow-dir-config")  # not even with the flag
    yield server
    server.stop()


@pytest.mark.parametrize("key", sorted(FOLDER_KEYS))
def test_post_options_refuses_folder_settings_naming_the_key(api, key):
    before = requests.get(_url(api, "options"), timeout=60).json()
    r = requests.post(_url(api, "options"), json={key: FOLDER_KEYS[key]}, timeout=60)
    assert r.status_code in (403, 422), r.text
    assert key in r.json()["detail"]
    assert requests.get(_url(api, "options"), timeout=60).json() == before


@pytest.mark.parametrize("key", sorted(FOLDER_KEYS))
def test_override_settings_refuses_folder_settings_naming_the_key(api, key):
    r = requests.post(_url(api, "txt2img"), json={**TINY, "override_settings": {key: FOLDER_KEYS[key]}}, timeout=60)
    assert r.status_code in (403, 422), r.text
    assert key in r.json()["detail"]


def test_output_formats_must_be_a_choice_everywhere(api):
    for key in ("samples_format", "grid_format"):
        for bad in ("gif", "exe", "../png", "png/../../x"):
            r = requests.post(_url(api, "txt2img"), json={**TINY, "override_settings": {key: bad}}, timeout=60)
            assert r.status_code == 422 and key in r.json()["detail"], r.text
            r = requests.post(_url(api, "options"), json={key: bad}, timeout=60)
            assert r.status_code == 422 and key in r.json()["detail"], r.text


def test_honest_clients_still_echo_the_current_values(api):
    current = requests.get(_url(api, "options"), timeout=60).json()
    echo = {key: current[key] for key in FOLDER_KEYS if key in current}
    r = requests.post(_url(api, "txt2img"), json={**TINY, "override_settings": echo}, timeout=300)
    assert r.status_code == 200, r.text[:300]
    assert requests.post(_url(api, "options"), json=current, timeout=60).status_code == 200


def test_core_options_refuse_api_and_locked_changes(tmp_path):
    from modules.core.options import OptionError, Options, default_templates

    opts = Options(tmp_path / "config.json", default_templates())
    with pytest.raises(OptionError, match="outdir_samples"):
        opts.set("outdir_samples", "/tmp", is_api=True)
    with pytest.raises(OptionError, match="samples_format"):
        opts.snapshot({"samples_format": "gif"})
    opts.lock_dir_config()
    for key, value in FOLDER_KEYS.items():
        with pytest.raises(OptionError, match=key):
            opts.set(key, value)
    assert opts.set("jpeg_quality", 90)  # other settings stay editable


# --------------------------------------------------------------------------- network-reachable: UI locked too

def _settings_component(srv, key: str, prefix: str = "setting_") -> dict:
    config = requests.get(f"{srv.url}/config", timeout=60).json()
    for comp in config["components"]:
        if comp.get("props", {}).get("elem_id") == f"{prefix}{key}":
            return comp["props"]
    raise AssertionError(f"no component for {key}")


@pytest.mark.parametrize("flags, locked", [
    (("--server-name", "127.0.0.1"), True),            # reachable by name: treated as non-local
    (("--server-name", "127.0.0.1", "--allow-dir-config"), False),
    (("--hide-ui-dir-config",), True),
    ((), False),
])
def test_ui_folder_settings_locked_on_a_reachable_server(tmp_path, flags, locked):
    srv = start_server(tmp_path, *flags)
    try:
        for key in ("outdir_samples", "outdir_txt2img_samples", "samples_filename_pattern", "save_txt", "samples_format"):
            assert _settings_component(srv, key)["interactive"] is (not locked), key
        for elem in ("input_dir", "output_dir", "inpaint_mask_dir", "png_info_dir"):
            assert _settings_component(srv, elem, "img2img_batch_")["interactive"] is (not locked), elem
        assert _settings_component(srv, "jpeg_quality")["interactive"] is True
    finally:
        srv.stop()


# --------------------------------------------------------------------------- img2img Batch folders

class _Generation:
    state = options = models = None
    save_hooks = (None, None)

    def img2img(self, p, **kwargs):
        from modules.core.pipeline import Processed

        return Processed(images=[p.init_images[0]], infotexts=["info"], params=p)


def test_batch_folders_must_lie_inside_the_data_dir(tmp_path):
    from modules.core.img2img_batch import run_batch
    from modules.core.pipeline import Img2ImgParams, ProcessingError

    data, outside = tmp_path / "data", tmp_path / "outside"
    (data / "in").mkdir(parents=True)
    outside.mkdir()
    Image.new("RGB", (64, 64)).save(data / "in" / "a.png")
    Image.new("RGB", (64, 64)).save(outside / "b.png")
    (data / "escape").symlink_to(outside)
    base = Img2ImgParams(prompt="x", width=64, height=64)
    for kwargs, name in (({"input_dir": outside}, "input directory"),
                         ({"input_dir": data / "in", "output_dir": outside / "o"}, "output directory"),
                         ({"input_dir": data / "escape"}, "input directory"),
                         ({"input_dir": "../outside"}, "input directory"),
                         ({"input_dir": data / "in", "output_dir": "escape/o"}, "output directory"),
                         ({"input_dir": data / "in", "mask_dir": "/"}, "mask directory"),
                         ({"input_dir": data / "in", "png_info_dir": "/etc"}, "PNG info directory")):
        with pytest.raises(ProcessingError, match=name):
            run_batch(_Generation(), base, root=data, **kwargs)
    result = run_batch(_Generation(), base, "in", "out", root=data)   # relative: from the data dir
    assert result.ok and [Path(p).parent for p in result.outputs] == [(data / "out").resolve()]
    assert run_batch(_Generation(), base, outside, tmp_path / "o2").ok   # --allow-dir-config: no root

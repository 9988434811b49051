"""A real server asked to switch to a hostile checkpoint answers 4xx naming the file and keeps working.

One server (--api, 127.0.0.1, a free port) with one tiny good checkpoint and every hostile file of
hostile_ckpts.py in its models/Stable-diffusion folder.
"""
from __future__ import annotations

import base64

import pytest
import requests

import hostile_ckpts as h
from conftest import start_server

TINY = {"prompt": "a cat", "width": 64, "height": 64, "steps": 2, "seed": 1}
GOOD = "tiny-good.safetensors"


@pytest.fixture(scope="module")
def hostile_server(tmp_path_factory):
    from tiny_models import make_checkpoint

    root = tmp_path_factory.mktemp("hostile-server")
    ckpt_dir = root / "models" / "Stable-diffusion"
    make_checkpoint(ckpt_dir / GOOD, "sd1")
    marker = root / "PWNED"
    expected = h.write_hostile_files(ckpt_dir, marker)
    srv = start_server(root, "--api")
    yield srv, expected, marker
    srv.stop()


def _api(srv, path: str) -> str:
    assert srv.url.startswith("http://127.0.0.1:")
    return f"{srv.url}/sdapi/v1/{path}"


def _txt2img(srv) -> None:
    r = requests.post(_api(srv, "txt2img"), json=TINY, timeout=300)
    assert r.status_code == 200, r.text
    assert base64.b64decode(r.json()["images"][0])[:8] == b"\x89PNG\r\n\x1a\n"


def _selected(srv) -> str:
    r = requests.get(_api(srv, "options"), timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["sd_model_checkpoint"]


@pytest.mark.slow
def test_switching_to_a_hostile_checkpoint_is_refused_and_the_server_keeps_serving(hostile_server):
    srv, expected, marker = hostile_server
    r = requests.post(_api(srv, "options"), json={"sd_model_checkpoint": GOOD}, timeout=300)
    assert r.status_code == 200, r.text
    good_title = _selected(srv)
    assert good_title.startswith(GOOD)
    _txt2img(srv)

    titles = [m["title"] for m in requests.get(_api(srv, "sd-models"), timeout=60).json()]
    assert {t.split(" [")[0] for t in titles} == {GOOD, *expected}

    for name, refused in expected.items():
        r = requests.post(_api(srv, "options"), json={"sd_model_checkpoint": name}, timeout=300)
        assert 400 <= r.status_code < 500, (name, r.status_code, r.text)
        assert name in r.text and refused in r.text and ".safetensors" in r.text, (name, r.text)
        assert _selected(srv) == good_title, name
        assert srv.proc.poll() is None, srv.output[-3000:]

    _txt2img(srv)
    assert not marker.exists(), "a payload ran in the server"
    assert srv.proc.poll() is None

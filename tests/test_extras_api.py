"""/sdapi/v1 extras and listings with real upscaler files, against a real server: A1111's shapes, exact
sizes, 422 for unknown names, and hostile model files refused while the server stays up."""
from __future__ import annotations

import base64
import io

import pytest
import requests
from PIL import Image

from conftest import start_server
from security.hostile_ckpts import payload_pickle, write_torch_zip
from upscaler_fixtures import make_upscaler


def _b64(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _decode(data: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(data)))


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("extras-api")
    models = data_dir / "models"
    make_upscaler(models, "esrgan-old", 2, name="2x-tiny-esrgan")
    make_upscaler(models, "compact", 4, name="4x-tiny-compact")
    make_upscaler(models, "swinir", 2, name="2x-tiny-swinir")
    marker = data_dir / "pwned"
    write_torch_zip(models / "ESRGAN" / "4x-evil.pth", payload_pickle(marker))
    (models / "ESRGAN" / "4x-corrupt.pth").write_bytes(b"\x80\x02}q\x00(truncated")
    srv = start_server(data_dir, "--api")
    srv.marker = marker
    yield srv
    srv.stop()


def post(srv, path: str, body: dict) -> requests.Response:
    return requests.post(f"{srv.url}/sdapi/v1/{path}", json=body, timeout=120)


def get(srv, path: str) -> requests.Response:
    return requests.get(f"{srv.url}/sdapi/v1/{path}", timeout=120)


def test_listings_name_every_usable_model_with_its_scale(api):
    upscalers = get(api, "upscalers").json()
    by_name = {u["name"]: u for u in upscalers}
    assert [u["name"] for u in upscalers[:3]] == ["None", "Lanczos", "Nearest"]
    assert by_name["2x-tiny-esrgan"]["scale"] == 2 and by_name["2x-tiny-esrgan"]["model_name"] == "ESRGAN"
    assert by_name["4x-tiny-compact"]["scale"] == 4
    assert by_name["4x-tiny-compact"]["model_path"].endswith("RealESRGAN/4x-tiny-compact.pth")
    assert by_name["2x-tiny-swinir"]["model_name"] == "SwinIR"
    assert "4x-evil" not in by_name and "4x-corrupt" not in by_name
    assert [m["name"] for m in get(api, "realesrgan-models").json()] == ["4x-tiny-compact"]
    assert get(api, "face-restorers").json() == []
    assert not api.marker.exists()


@pytest.mark.parametrize("name, resize, size", [
    ("2x-tiny-esrgan", 2, (96, 64)),
    ("2x-tiny-esrgan", 3, (144, 96)),      # two passes of 2x, then Lanczos down to 3x
    ("4x-tiny-compact", 2, (96, 64)),
    ("2x-tiny-swinir", 2, (96, 64)),
])
def test_single_image_upscales_to_the_exact_size(api, name, resize, size):
    response = post(api, "extra-single-image", {"image": _b64(Image.new("RGB", (48, 32), (10, 120, 200))),
                                                "upscaler_1": name, "upscaling_resize": resize})
    assert response.status_code == 200, response.text
    out = _decode(response.json()["image"])
    assert out.size == size
    assert f"Postprocess upscaler: {name}" in response.json()["html_info"]
    assert f"Postprocess upscaler: {name}" in out.info["postprocessing"]


def test_batch_with_scale_to_crop_and_a_second_upscaler(api):
    image = _b64(Image.new("RGB", (40, 20), (200, 30, 30)))
    response = post(api, "extra-batch-images", {
        "imageList": [{"data": image, "name": "a.png"}, {"data": image, "name": "b.png"}],
        "resize_mode": 1, "upscaling_resize_w": 64, "upscaling_resize_h": 64, "upscaling_crop": True,
        "upscaler_1": "4x-tiny-compact", "upscaler_2": "2x-tiny-esrgan", "extras_upscaler_2_visibility": 0.5})
    assert response.status_code == 200, response.text
    assert [_decode(i).size for i in response.json()["images"]] == [(64, 64), (64, 64)]
    assert "Postprocess upscaler 2: 2x-tiny-esrgan" in response.json()["html_info"]


def test_unknown_and_hostile_upscalers_are_refused_and_the_server_stays_up(api):
    image = _b64(Image.new("RGB", (16, 16)))
    unknown = post(api, "extra-single-image", {"image": image, "upscaler_1": "4x-Nope"})
    assert unknown.status_code == 422
    assert "4x-Nope" in unknown.text and "Lanczos" in unknown.text and "2x-tiny-esrgan" in unknown.text
    evil = post(api, "extra-single-image", {"image": image, "upscaler_1": "4x-evil"})
    assert evil.status_code == 422 and "refused" in evil.json()["detail"], evil.text
    corrupt = post(api, "extra-single-image", {"image": image, "upscaler_1": "4x-corrupt"})
    assert corrupt.status_code == 422, corrupt.text
    hires = post(api, "txt2img", {"prompt": "x", "steps": 1, "width": 64, "height": 64, "enable_hr": True,
                                  "hr_upscaler": "4x-Nope"})
    assert hires.status_code == 422 and "4x-Nope" in hires.text
    assert not api.marker.exists()
    ok = post(api, "extra-single-image", {"image": image, "upscaler_1": "2x-tiny-esrgan", "upscaling_resize": 2})
    assert ok.status_code == 200 and _decode(ok.json()["image"]).size == (32, 32)

"""sd-webui-controlnet's wire format against a real server: the /controlnet routes and
alwayson_scripts.controlnet in /sdapi/v1/txt2img and img2img, sent as clients send them."""
from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import requests
from PIL import Image

from conftest import start_server
from tiny_controlnets import make_controlnet
from tiny_models import make_checkpoint


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    data = tmp_path_factory.mktemp("cn-api")
    make_checkpoint(data / "models" / "Stable-diffusion" / "tiny-sd1.safetensors", "sd1")
    make_controlnet(data / "models" / "ControlNet" / "control_v11p_tiny.pth", "sd1", layout="ldm")
    srv = start_server(data, "--api")
    yield srv
    srv.stop()


def b64(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def unb64(text: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(text)))


def hint() -> Image.Image:
    rng = np.random.default_rng(1)
    return Image.fromarray(rng.integers(0, 255, (80, 48, 3), dtype=np.uint8))


BASE = {"prompt": "a cat", "steps": 3, "width": 64, "height": 64, "seed": 42, "sampler_name": "Euler",
        "cfg_scale": 7}


def test_info_routes(api):
    assert requests.get(api.url + "/controlnet/version").json() == {"version": 2}
    models = requests.get(api.url + "/controlnet/model_list").json()["model_list"]
    assert len(models) == 1 and models[0].startswith("control_v11p_tiny [")
    modules = requests.get(api.url + "/controlnet/module_list").json()
    assert {"none", "invert", "canny"} <= set(modules["module_list"])
    assert set(modules["module_detail"]) == set(modules["module_list"])
    assert "sliders" in modules["module_detail"]["canny"]
    aliases = requests.get(api.url + "/controlnet/module_list", params={"alias_names": "true"}).json()
    assert "depth_midas" in aliases["module_list"] and "depth_midas" in aliases["module_detail"]
    assert requests.get(api.url + "/controlnet/settings").json() == {"control_net_unit_count": 3}
    scripts = requests.get(api.url + "/sdapi/v1/scripts").json()   # clients check for it there
    assert "controlnet" in scripts["txt2img"] and "controlnet" in scripts["img2img"]


def test_detect_returns_maps(api):
    image = hint()
    r = requests.post(api.url + "/controlnet/detect", json={
        "controlnet_module": "invert", "controlnet_input_images": [b64(image), b64(image)],
        "controlnet_processor_res": 512, "controlnet_threshold_a": 64, "controlnet_threshold_b": 64})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["info"] == "Success" and len(body["images"]) == 2
    got = np.asarray(unb64(body["images"][0]).convert("RGB"), dtype=np.int16)
    assert np.array_equal(got, 255 - np.asarray(image, dtype=np.int16))
    bad = requests.post(api.url + "/controlnet/detect", json={"controlnet_module": "nope",
                                                              "controlnet_input_images": [b64(image)]})
    assert bad.status_code == 422
    assert requests.post(api.url + "/controlnet/detect", json={"controlnet_module": "invert"}).status_code == 422


def _txt2img(api, units=None, **extra):
    body = {**BASE, **extra}
    if units is not None:
        body["alwayson_scripts"] = {"controlnet": {"args": units}}
    r = requests.post(api.url + "/sdapi/v1/txt2img", json=body, timeout=300)
    return r


def _pixels(response) -> np.ndarray:
    return np.asarray(unb64(response.json()["images"][0]).convert("RGB"), dtype=np.int16)


def test_the_extension_payload_works(api):
    model = requests.get(api.url + "/controlnet/model_list").json()["model_list"][0]
    plain = _txt2img(api)
    assert plain.status_code == 200, plain.text
    # The payload as the extension's README and clients send it (old aliases included).
    unit = {"input_image": b64(hint()), "module": "none", "model": model, "weight": 1.0,
            "resize_mode": "Crop and Resize", "lowvram": False, "processor_res": 64, "threshold_a": 64,
            "threshold_b": 64, "guidance_start": 0.0, "guidance_end": 1.0, "control_mode": 0, "pixel_perfect": False}
    controlled = _txt2img(api, [unit])
    assert controlled.status_code == 200, controlled.text
    assert not np.array_equal(_pixels(plain), _pixels(controlled))
    info = json.loads(controlled.json()["info"])
    assert 'ControlNet 0: "Module: none, Model: ' + model in info["infotexts"][0]
    # ints and strings for the modes, `image` instead of `input_image`, the name without the hash
    same = _txt2img(api, [{**{k: v for k, v in unit.items() if k != "input_image"}, "image": unit["input_image"],
                           "resize_mode": 1, "control_mode": "Balanced", "model": model.split(" [")[0]}])
    assert np.array_equal(_pixels(controlled), _pixels(same))
    off = _txt2img(api, [{**unit, "weight": 0}, {"enabled": False, "model": model}])
    assert np.array_equal(_pixels(plain), _pixels(off))


def test_img2img_unit_without_image_uses_the_init_image(api):
    model = requests.get(api.url + "/controlnet/model_list").json()["model_list"][0]
    body = {**BASE, "init_images": [b64(hint())], "denoising_strength": 0.6}
    plain = requests.post(api.url + "/sdapi/v1/img2img", json=body, timeout=300)
    controlled = requests.post(api.url + "/sdapi/v1/img2img", timeout=300, json={
        **body, "alwayson_scripts": {"ControlNet": {"args": [{"model": model, "module": "invert"}]}}})
    assert plain.status_code == 200 and controlled.status_code == 200, controlled.text
    assert not np.array_equal(_pixels(plain), _pixels(controlled))


def test_bad_units_are_422_and_the_server_stays_up(api):
    model = requests.get(api.url + "/controlnet/model_list").json()["model_list"][0]
    for unit, words in (({"model": model, "resize_mode": "Sideways", "image": b64(hint())}, "resize"),
                        ({"model": model, "weight": 5, "image": b64(hint())}, "weight"),
                        ({"model": "missing", "image": b64(hint())}, "not found"),
                        # a path is never opened: only files listed in the ControlNet folders load
                        ({"model": "../Stable-diffusion/tiny-sd1.safetensors", "image": b64(hint())}, "not found"),
                        ({"model": model, "module": "../../etc/passwd", "image": b64(hint())}, "preprocessor"),
                        ({"model": model, "image": "not base64!"}, "image"),
                        ({"model": model}, "no input image")):
        r = _txt2img(api, [unit])
        assert r.status_code == 422, (unit, r.status_code, r.text)
        assert words in r.text.lower() or words in r.text, r.text
    assert _txt2img(api).status_code == 200


def test_detected_maps_are_appended_to_the_images_as_the_extension_does(api):
    """Each unit's map, fitted to the image size, after the generated images; no infotext of its own;
    none with the setting control_net_no_detectmap; with hires fix the hires-size map, then the first pass's."""
    model = requests.get(api.url + "/controlnet/model_list").json()["model_list"][0]
    source = hint()   # 48x80: "Crop and Resize" covers 64x64 and crops the height
    unit = {"image": b64(source), "module": "invert", "model": model, "processor_res": 64}
    r = _txt2img(api, [unit, {**unit, "module": "none"}], batch_size=2)
    assert r.status_code == 200, r.text
    images, info = r.json()["images"], json.loads(r.json()["info"])
    assert len(images) == 4 and len(info["infotexts"]) == 2 and info["index_of_first_image"] == 0
    plain_map = np.asarray(unb64(images[3]).convert("RGB"), dtype=np.int16)
    inverted_map = np.asarray(unb64(images[2]).convert("RGB"), dtype=np.int16)
    assert plain_map.shape == (64, 64, 3)
    expected = np.asarray(source.resize((64, round(80 * 64 / 48)), Image.Resampling.LANCZOS), dtype=np.int16)
    top = -((64 - expected.shape[0]) // 2)   # centred (the odd row falls at the top)
    assert np.abs(plain_map - expected[top:top + 64]).mean() < 2
    assert np.abs(inverted_map - (255 - plain_map)).mean() < 2
    assert "ControlNet 1" in info["infotexts"][0]   # the units themselves are in the infotext, the maps not

    off = _txt2img(api, [unit], override_settings={"control_net_no_detectmap": True})
    assert off.status_code == 200 and len(off.json()["images"]) == 1
    assert len(_txt2img(api, [{**unit, "weight": 0}]).json()["images"]) == 1   # a unit that does not run: no map
    hires = _txt2img(api, [unit], enable_hr=True, hr_scale=1.5, hr_second_pass_steps=1, hr_upscaler="Latent")
    assert hires.status_code == 200, hires.text
    assert [unb64(i).size for i in hires.json()["images"]] == [(96, 96), (96, 96), (64, 64)]


def test_img2img_inpaint_map_shows_the_mask_half_transparent(api):
    model = requests.get(api.url + "/controlnet/model_list").json()["model_list"][0]
    picture = Image.new("RGB", (64, 64), (10, 200, 30))
    mask = Image.new("L", (64, 64))
    mask.paste(255, (0, 0, 32, 64))
    r = requests.post(api.url + "/sdapi/v1/img2img", timeout=300, json={
        **BASE, "init_images": [b64(picture)], "denoising_strength": 0.5,
        "alwayson_scripts": {"controlnet": {"args": [{"model": model, "module": "inpaint_only",
                                                      "image": {"image": b64(picture), "mask": b64(mask)}}]}}})
    assert r.status_code == 200, r.text
    images = r.json()["images"]
    assert len(images) == 2
    shown = unb64(images[1])
    assert shown.mode == "RGBA"
    assert shown.getpixel((5, 5))[3] == 128 and shown.getpixel((60, 5))[3] == 255
    # outside the mask (beyond the blurred seam) the picture is pasted back exactly
    out = np.asarray(unb64(images[0]).convert("RGB"), dtype=np.int16)
    assert np.abs(out[:, 48:] - np.array([10, 200, 30])).max() <= 1


def test_reference_only_payload_with_model_none_and_a_normal_unit(api):
    """The extension's reference payload (module "reference_only", model "None"), alone and next to a
    ControlNet unit; a plain job afterwards is bit-identical to one before (the UNet is restored)."""
    model = requests.get(api.url + "/controlnet/model_list").json()["model_list"][0]
    detail = requests.get(api.url + "/controlnet/module_list").json()["module_detail"]["reference_only"]
    assert detail["model_free"] is True and detail["sliders"][0]["name"].startswith("Style Fidelity")
    plain = _txt2img(api)
    ref = {"input_image": b64(hint()), "module": "reference_only", "model": "None", "weight": 1.0,
           "threshold_a": 0.5, "control_mode": 0, "guidance_start": 0.0, "guidance_end": 1.0}
    referenced = _txt2img(api, [ref])
    assert referenced.status_code == 200, referenced.text
    assert not np.array_equal(_pixels(plain), _pixels(referenced))
    info = json.loads(referenced.json()["info"])
    assert 'ControlNet 0: "Module: reference_only, Model: None, Weight: 1.0' in info["infotexts"][0]
    cn = {"input_image": b64(hint()), "module": "invert", "model": model}
    controlled = _txt2img(api, [cn])
    both = _txt2img(api, [ref, cn])
    assert both.status_code == 200, both.text
    assert not np.array_equal(_pixels(both), _pixels(controlled))
    assert not np.array_equal(_pixels(both), _pixels(referenced))
    assert 'ControlNet 1: "Module: invert' in json.loads(both.json()["info"])["infotexts"][0]
    assert np.array_equal(_pixels(plain), _pixels(_txt2img(api, [{**ref, "weight": 0}])))
    assert np.array_equal(_pixels(plain), _pixels(_txt2img(api)))

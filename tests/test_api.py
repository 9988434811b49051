"""The /sdapi/v1 API against the real server (tiny random-weight checkpoints, 64x64, few steps).

One server per mode, shared by the tests of this module: --api (UI + API, no auth),
--api-auth with the UI under --subpath, --gradio-auth with the UI at "/", and --nowebui.
"""
from __future__ import annotations

import base64
import io
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
from PIL import Image, PngImagePlugin

from conftest import start_server

TINY = {"width": 64, "height": 64, "steps": 2}
ERROR_KEYS = {"error", "detail", "body", "errors"}


# --------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from tiny_models import make_checkpoint

    root = tmp_path_factory.mktemp("api")
    ckpt_dir = root / "models" / "Stable-diffusion"
    ckpt_dir.mkdir(parents=True)
    make_checkpoint(ckpt_dir / "tiny-a.safetensors", "sd1", seed=0)
    make_checkpoint(ckpt_dir / "tiny-b.safetensors", "sd1", seed=1)
    (root / "styles.csv").write_text('name,prompt,negative_prompt\n"Cinematic","{prompt}, film grain","cartoon"\n',
                                     encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def api(data_dir):
    srv = start_server(data_dir, "--api")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def api_auth_server(tmp_path_factory):
    srv = start_server(tmp_path_factory.mktemp("apiauth"), "--api", "--api-auth", "alice:s3cret,carol:pw:with:colons",
                       "--subpath", "/sd", ready_path="/sd/")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def gradio_auth_server(tmp_path_factory):
    srv = start_server(tmp_path_factory.mktemp("gradioauth"), "--api", "--gradio-auth", "bob:hunter2")
    yield srv
    srv.stop()


def url(server, path: str) -> str:
    return f"{server.url}/sdapi/v1/{path}"


def post(server, path: str, payload=None, **kwargs) -> requests.Response:
    return requests.post(url(server, path), json=payload, timeout=kwargs.pop("timeout", 300), **kwargs)


def get(server, path: str, **kwargs) -> requests.Response:
    return requests.get(url(server, path), timeout=kwargs.pop("timeout", 60), **kwargs)


def txt2img(server, **fields) -> dict:
    response = post(server, "txt2img", {**TINY, **fields})
    assert response.status_code == 200, response.text
    return response.json()


def decode(b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    image.load()
    return image


def assert_error(response: requests.Response, status: int | tuple[int, ...], *needles: str) -> dict:
    statuses = (status,) if isinstance(status, int) else status
    assert response.status_code in statuses, (response.status_code, response.text)
    body = response.json()
    assert ERROR_KEYS <= set(body), body
    assert all(isinstance(body[k], str) for k in ERROR_KEYS), body
    text = json.dumps(body)
    for needle in needles:
        assert needle in text, (needle, body)
    return body


def png_b64(image: Image.Image, parameters: str | None = None) -> str:
    info = PngImagePlugin.PngInfo()
    if parameters is not None:
        info.add_text("parameters", parameters)
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return base64.b64encode(buf.getvalue()).decode()


# --------------------------------------------------------------------------- txt2img

def test_txt2img_images_carry_infotext_and_info_is_a_json_string(api):
    data = txt2img(api, prompt="a red cube", negative_prompt="blurry", seed=1234, batch_size=2,
                   sampler_name="Euler a", cfg_scale=6.5, alwayson_scripts={}, no_such_field_in_a1111=1)
    assert set(data) == {"images", "parameters", "info"}
    assert isinstance(data["info"], str)
    info = json.loads(data["info"])
    assert info["all_seeds"] == [1234, 1235] and info["seed"] == 1234
    assert info["sampler_name"] == "Euler a" and info["steps"] == 2 and info["width"] == 64
    assert info["sd_model_name"] == "tiny-a" and len(info["infotexts"]) == 2
    # save_images is false by default, so (as in A1111) no grid is made: one image per seed
    assert len(data["images"]) == 2
    for b64, seed in zip(data["images"], (1234, 1235)):
        image = decode(b64)
        assert image.format == "PNG" and image.size == (64, 64)
        text = image.info["parameters"]
        assert text.startswith("a red cube\nNegative prompt: blurry\n")
        assert f"Seed: {seed}," in text and "Sampler: Euler a," in text and "Model: tiny-a" in text
    assert not list((api.data_dir / "outputs").rglob("*.png")), "save_images defaults to false in the API"


def test_txt2img_parameters_echo_a1111_api_defaults(api):
    response = post(api, "txt2img", {"prompt": "defaults", "width": 64, "height": 64, "negative_prompt": None})
    assert response.status_code == 200, response.text
    data = response.json()
    p = data["parameters"]  # steps not given: A1111's API default, 50
    assert p["steps"] == 50 and json.loads(data["info"])["steps"] == 50
    assert p["sampler_index"] == "Euler" and p["sampler_name"] is None
    assert json.loads(data["info"])["sampler_name"] == "Euler"
    expected = {"cfg_scale": 7.0, "seed": -1, "subseed": -1, "batch_size": 1, "n_iter": 1, "save_images": False,
                "send_images": True, "enable_hr": False, "hr_scale": 2.0, "denoising_strength": 0.75,
                "override_settings_restore_afterwards": True, "script_name": None, "script_args": [],
                "alwayson_scripts": {}, "infotext": None, "force_task_id": None, "styles": None,
                "hr_prompt": "", "hr_negative_prompt": "", "seed_resize_from_w": -1, "seed_resize_from_h": -1,
                "negative_prompt": ""}  # an explicit null means the default
    assert {k: p[k] for k in expected} == expected
    assert "no_such_field" not in p


def test_txt2img_send_images_false_save_images_true_and_force_task_id(api):
    data = txt2img(api, prompt="saved", seed=7, send_images=False, save_images=True, force_task_id="task-abc")
    assert data["images"] == []
    saved = list((api.data_dir / "outputs" / "txt2img-images").rglob("*-7.png"))
    assert len(saved) == 1
    assert "Seed: 7," in Image.open(saved[0]).info["parameters"]


def test_txt2img_infotext_fills_fields_the_request_left_at_default(api):
    infotext = ("a blue sphere\nNegative prompt: ugly\n"
                "Steps: 9, Sampler: Euler a, Schedule type: Automatic, CFG scale: 5.5, Seed: 4242, Size: 64x64, "
                "Clip skip: 2, Model: tiny-a")
    data = txt2img(api, infotext=infotext, steps=2)  # explicit steps win over the infotext's 9
    p, info = data["parameters"], json.loads(data["info"])
    assert p["prompt"] == "a blue sphere" and p["negative_prompt"] == "ugly"
    assert p["seed"] == 4242 and p["cfg_scale"] == 5.5 and p["sampler_name"] == "Euler a"
    assert p["steps"] == 2 and info["steps"] == 2 and info["all_seeds"] == [4242]
    assert p["override_settings"] == {"CLIP_stop_at_last_layers": 2}
    assert info["clip_skip"] == 2 and "Clip skip: 2" in decode(data["images"][0]).info["parameters"]
    assert get(api, "options").json()["CLIP_stop_at_last_layers"] == 1, "override was restored"


def test_unknown_script_is_422_naming_it(api):
    assert_error(post(api, "txt2img", {**TINY, "script_name": "no such script"}), 422, "no such script")
    # (controlnet is built in: an unknown always-on script is still a 422 naming it)
    assert_error(post(api, "txt2img", {**TINY, "alwayson_scripts": {"no-such-ext": {"args": []}}}), 422, "no-such-ext")


def test_bad_input_gives_4xx_json_and_the_server_keeps_serving(api):
    assert_error(post(api, "txt2img", {**TINY, "sampler_name": "No Such Sampler"}), 404, "No Such Sampler")
    assert_error(post(api, "txt2img", {**TINY, "sampler_name": "", "sampler_index": "Bogus"}), 404, "Bogus")
    assert_error(post(api, "txt2img", {**TINY, "steps": 0}), 422, "steps")
    assert_error(post(api, "txt2img", {**TINY, "steps": 500}), 422, "steps")
    assert_error(post(api, "txt2img", {**TINY, "width": 65}), 422, "width")
    assert_error(post(api, "txt2img", {**TINY, "steps": "many"}), 422, "steps")
    assert_error(post(api, "txt2img", {**TINY, "enable_hr": True, "hr_upscaler": "ESRGAN_9x"}), 422, "ESRGAN_9x")
    assert_error(post(api, "txt2img", {**TINY, "override_settings": {"CLIP_stop_at_last_layers": "two"}}), 422,
                 "CLIP_stop_at_last_layers")
    assert_error(post(api, "txt2img", {**TINY, "override_settings": {"sd_model_checkpoint": "nope.safetensors"}}),
                 422, "nope.safetensors")
    malformed = requests.post(url(api, "txt2img"), data=b'{"prompt": "x",', timeout=30,
                              headers={"Content-Type": "application/json"})
    assert_error(malformed, 422, "RequestValidationError")
    assert_error(requests.post(url(api, "txt2img"), data=b"[1, 2]", timeout=30,
                               headers={"Content-Type": "application/json"}), 422)
    assert_error(post(api, "png-info", {"image": "this is not base64 at all!"}), 422, "image")
    assert_error(post(api, "png-info", {"image": "data:image/png;base64,aGVsbG8="}), 422, "invalid encoded image")
    assert_error(post(api, "png-info", {}), 422, "image")
    assert_error(post(api, "img2img", {**TINY, "prompt": "x"}), 404, "Init image not found")  # A1111's status
    assert_error(post(api, "img2img", {**TINY, "init_images": ["###"]}), 422, "init_images[0]")
    assert_error(post(api, "extra-single-image", {"image": png_b64(Image.new("RGB", (8, 8))), "upscaler_1": "4x-Foo"}),
                 422, "4x-Foo")
    assert_error(post(api, "extra-single-image", {"image": png_b64(Image.new("RGB", (8, 8))), "resize_mode": 3}),
                 422, "resize_mode")
    # still serving, and still generating
    assert get(api, "samplers").status_code == 200
    assert len(txt2img(api, seed=3)["images"]) == 1


def test_txt2img_styles_expand_from_styles_csv(api):
    info = json.loads(txt2img(api, prompt="a fox", negative_prompt="", styles=["Cinematic"], seed=8)["info"])
    assert info["prompt"] == "a fox, film grain" and info["negative_prompt"] == "cartoon"
    assert info["styles"] == ["Cinematic"]


def test_img2img_and_inpaint(api):
    rng = np.random.default_rng(0)
    init = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    data = post(api, "img2img", {**TINY, "prompt": "repaint", "seed": 21, "denoising_strength": 0.5,
                                  "init_images": ["data:image/png;base64," + png_b64(init)]})
    assert data.status_code == 200, data.text
    body = data.json()
    info = json.loads(body["info"])
    assert info["all_seeds"] == [21] and info["denoising_strength"] == 0.5
    image = decode(body["images"][0])
    assert image.size == (64, 64) and "Denoising strength: 0.5" in image.info["parameters"]
    p = body["parameters"]
    assert p["init_images"] is None and p["mask"] is None  # include_init_images defaults to false
    assert p["inpainting_fill"] == 0 and p["inpaint_full_res"] is True and p["steps"] == 2
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    inpaint = post(api, "img2img", {**TINY, "prompt": "inpaint", "seed": 22, "init_images": [png_b64(init)],
                                     "mask": png_b64(mask), "include_init_images": True})
    assert inpaint.status_code == 200, inpaint.text
    assert "Mask blur: 4" in decode(inpaint.json()["images"][0]).info["parameters"]
    assert inpaint.json()["parameters"]["init_images"] == [png_b64(init)]


# --------------------------------------------------------------------------- options and models

def test_img2img_sd_upscale_script(api):
    """A1111 clients call the built-in "SD upscale" by name with positional script_args."""
    init = Image.new("RGB", (64, 64), (90, 120, 200))
    data = post(api, "img2img", {**TINY, "prompt": "upscale", "seed": 5, "denoising_strength": 0.3,
                                  "init_images": [png_b64(init)], "script_name": "SD upscale",
                                  "script_args": ["", 16, 1, 2.0]})
    assert data.status_code == 200, data.text
    data = data.json()
    out = decode(data["images"][0])
    assert out.size == (128, 128)  # 2x Lanczos, rendered as overlapping 64x64 tiles
    info = json.loads(data["info"])
    assert info["all_seeds"] == [5]
    infos = {s["name"]: s for s in get(api, "script-info").json()}
    upscale = infos["sd upscale"]
    assert upscale["is_img2img"] is True and upscale["is_alwayson"] is False
    assert [a["label"] for a in upscale["args"]][1:] == ["Tile overlap", "Upscaler", "Scale Factor"]
    assert upscale["args"][2]["value"] == 1 and upscale["args"][2]["choices"] == ["None", "Lanczos", "Nearest"]
    assert_error(post(api, "img2img", {**TINY, "init_images": [png_b64(init)], "script_name": "SD upscale",
                                       "script_args": ["", 16, 9, 2.0]}), 422, "SD upscale")
    assert_error(post(api, "txt2img", {**TINY, "script_name": "SD upscale"}), 422, "SD upscale")


def test_options_get_post_round_trip(api):
    txt2img(api, seed=1)  # the model is loaded
    before = get(api, "options").json()
    titles = [m["title"] for m in get(api, "sd-models").json()]
    assert before["sd_model_checkpoint"] in titles
    assert before["samples_format"] == "png" and before["CLIP_stop_at_last_layers"] == 1
    # A1111 1.10.1's whole key set, with its defaults (as Open WebUI reads and posts it back)
    assert len(before) >= 250
    assert before["send_seed"] is True and before["js_modal_lightbox"] is True and before["show_progressbar"] is True
    assert before["img2img_fix_steps"] is False and before["sd_vae_as_default"] is True
    assert before["lora_preferred_name"] == "Alias from file" and before["upscaler_for_img2img"] is None
    config = api.data_dir / "config.json"
    stored = config.read_text() if config.exists() else None
    loads = api.output.count(" loaded in ")
    response = post(api, "options", before)
    assert response.status_code == 200, response.text
    assert get(api, "options").json() == before
    assert (config.read_text() if config.exists() else None) == stored  # nothing changed, nothing written
    assert api.output.count(" loaded in ") == loads  # the unchanged sd_model_checkpoint did not reload it


def test_options_post_checks_types_choices_and_ranges_of_a1111_keys(api):
    before = get(api, "options").json()
    assert_error(post(api, "options", {"send_seed": "sometimes"}), 422, "send_seed")
    assert_error(post(api, "options", {"uni_pc_order": "three"}), 422, "uni_pc_order")
    assert_error(post(api, "options", {"eta_ddim": [0.5]}), 422, "eta_ddim")
    assert_error(post(api, "options", {"notification_volume": 101}), 422, "notification_volume")
    assert_error(post(api, "options", {"canvas_hotkey_zoom": "Meta"}), 422, "canvas_hotkey_zoom")
    assert_error(post(api, "options", {"canvas_disabled_functions": ["Overlap", "Nope"]}), 422,
                 "canvas_disabled_functions")
    # a bad value anywhere in the dict: nothing of it is applied
    assert_error(post(api, "options", {**before, "send_size": False, "eta_ddim": "x"}), 422, "eta_ddim")
    assert get(api, "options").json() == before
    # values A1111 accepts and this product uses: the NV generator, "-1: no previews while sampling"
    for key, value in (("randn_source", "NV"), ("show_progress_every_n_steps", -1)):
        assert post(api, "options", {key: value}).status_code == 200
        assert post(api, "options", {key: before[key]}).status_code == 200
    # settings A1111 refuses through the API are left alone, as there
    assert post(api, "options", {"api_useragent": "evil"}).status_code == 200
    assert get(api, "options").json()["api_useragent"] == ""


def test_options_post_validates_and_refuses_unknown_keys(api):
    assert_error(post(api, "options", {"jpeg_quality": "high"}), 422, "jpeg_quality")
    assert_error(post(api, "options", {"jpeg_quality": 1000}), 422, "jpeg_quality")
    assert_error(post(api, "options", {"samples_format": "gif"}), 422, "samples_format")
    assert_error(post(api, "options", {"sd_model_checkpoint": "missing-model"}), 422, "missing-model")
    assert_error(post(api, "options", {"sd_vae": "missing.vae.pt"}), 422, "missing.vae.pt")
    assert_error(requests.post(url(api, "options"), data=b"not json", timeout=30,
                               headers={"Content-Type": "application/json"}), 422)
    assert_error(post(api, "options", {"some_extension_setting": 5, "jpeg_quality": 91}), 422,
                 "some_extension_setting")
    assert get(api, "options").json()["jpeg_quality"] != 91   # nothing applied
    response = post(api, "options", {"jpeg_quality": 91})
    assert response.status_code == 200, response.text
    after = get(api, "options").json()
    assert after["jpeg_quality"] == 91 and "some_extension_setting" not in after
    assert json.loads((api.data_dir / "config.json").read_text())["jpeg_quality"] == 91
    assert post(api, "options", {"jpeg_quality": 80}).status_code == 200


def test_options_sd_model_checkpoint_switches_the_model(api):
    def selected() -> str:
        return get(api, "options").json()["sd_model_checkpoint"]

    models = {m["model_name"]: m["title"] for m in get(api, "sd-models").json()}
    assert set(models) == {"tiny-a", "tiny-b"}
    try:
        response = post(api, "options", {"sd_model_checkpoint": models["tiny-b"]})
        assert response.status_code == 200, response.text
        # loading hashes the file, so the title may have gained its "[hash]" (as in A1111)
        titles = {m["model_name"]: m["title"] for m in get(api, "sd-models").json()}
        assert selected() == titles["tiny-b"] and titles["tiny-b"].startswith("tiny-b.safetensors")
        data = txt2img(api, seed=11)
        assert json.loads(data["info"])["sd_model_name"] == "tiny-b"
        assert "Model: tiny-b" in decode(data["images"][0]).info["parameters"]
        # a per-request override picks the model for that job only
        data = txt2img(api, seed=11, override_settings={"sd_model_checkpoint": "tiny-a"})
        assert json.loads(data["info"])["sd_model_name"] == "tiny-a"
        assert selected() == titles["tiny-b"]
    finally:
        assert post(api, "options", {"sd_model_checkpoint": "tiny-a"}).status_code == 200  # by name, as A1111 allows
    assert selected().startswith("tiny-a.safetensors")
    assert json.loads(txt2img(api, seed=11)["info"])["sd_model_name"] == "tiny-a"


def test_a_corrupt_checkpoint_is_a_clear_error_and_the_previous_model_stays(api, data_dir):
    before = get(api, "options").json()["sd_model_checkpoint"]
    assert json.loads(txt2img(api, seed=3)["info"])["sd_model_name"] == "tiny-a"
    broken = data_dir / "models" / "Stable-diffusion" / "zz-broken.safetensors"
    broken.write_bytes((data_dir / "models" / "Stable-diffusion" / "tiny-b.safetensors").read_bytes()[:5000])
    try:
        assert post(api, "refresh-checkpoints").status_code == 200
        response = post(api, "options", {"sd_model_checkpoint": "zz-broken.safetensors"})
        assert 400 <= response.status_code < 600 and response.status_code != 500, response.text
        assert "zz-broken.safetensors" in response.json()["detail"]
        assert get(api, "options").json()["sd_model_checkpoint"] == before
        assert json.loads(txt2img(api, seed=3)["info"])["sd_model_name"] == "tiny-a"
    finally:
        broken.unlink()
        post(api, "refresh-checkpoints")


def test_checkpoint_actions(api):
    for action in ("refresh-checkpoints", "refresh-vae", "unload-checkpoint", "reload-checkpoint"):
        response = post(api, action)
        assert response.status_code == 200, (action, response.text)


# --------------------------------------------------------------------------- listings

def test_listings_have_a1111_shapes(api):
    samplers = get(api, "samplers").json()
    assert {"name", "aliases", "options"} <= set(samplers[0]) and "Euler" in [s["name"] for s in samplers]
    schedulers = get(api, "schedulers").json()
    assert {"name", "label", "aliases", "default_rho", "need_inner_model"} <= set(schedulers[0])
    assert "Karras" in [s["label"] for s in schedulers]
    upscalers = get(api, "upscalers").json()
    assert [u["name"] for u in upscalers] == ["None", "Lanczos", "Nearest"]
    assert set(upscalers[0]) == {"name", "model_name", "model_path", "model_url", "scale"}
    assert {"name": "Latent"} in get(api, "latent-upscale-modes").json()
    models = get(api, "sd-models").json()
    assert len(models) == 2 and set(models[0]) == {"title", "model_name", "hash", "sha256", "filename", "config"}
    assert models[0]["title"] == f"tiny-a.safetensors [{models[0]['hash']}]" and len(models[0]["sha256"]) == 64
    assert get(api, "sd-vae").json() == []
    for empty in ("hypernetworks", "face-restorers", "realesrgan-models"):
        assert get(api, empty).json() == [], empty
    extensions = {e["name"]: e for e in get(api, "extensions").json()}
    assert extensions["sd-upscale"]["enabled"] is True and extensions["sd-upscale"]["remote"] == ""
    assert get(api, "prompt-styles").json() == [
        {"name": "Cinematic", "prompt": "{prompt}, film grain", "negative_prompt": "cartoon"}]
    assert get(api, "embeddings").json() == {"loaded": {}, "skipped": {}}
    scripts = get(api, "scripts").json()
    assert {"sd upscale", "poor man's outpainting"} <= set(scripts["img2img"])
    assert "sd upscale" not in scripts["txt2img"]
    flags = get(api, "cmd-flags").json()
    assert flags["api"] is True and flags["nowebui"] is False and flags["data_dir"] == str(api.data_dir)
    memory = get(api, "memory").json()
    assert memory["ram"]["total"] > memory["ram"]["used"] > 0 and "cuda" in memory


def test_docs_list_routes_with_a1111_model_names(api):
    assert requests.get(api.url + "/docs", timeout=30).status_code == 200
    spec = requests.get(api.url + "/openapi.json", timeout=30).json()
    for path in ("/sdapi/v1/txt2img", "/sdapi/v1/options", "/sdapi/v1/progress", "/sdapi/v1/png-info",
                 "/sdapi/v1/extra-single-image", "/sdapi/v1/sd-models", "/sdapi/v1/memory"):
        assert path in spec["paths"], path
    schemas = spec["components"]["schemas"]
    for name in ("StableDiffusionProcessingTxt2Img", "TextToImageResponse", "ProgressResponse", "OptionsModel",
                 "PNGInfoRequest", "ExtrasSingleImageRequest", "SDModelItem", "FlagsModel"):
        assert name in schemas, name
    assert schemas["StableDiffusionProcessingTxt2Img"]["properties"]["steps"]["default"] == 50


# --------------------------------------------------------------------------- png-info and extras

def test_png_info_reads_a_generated_image_with_a_data_uri(api):
    b64 = txt2img(api, prompt="png info", seed=99)["images"][0]
    response = post(api, "png-info", {"image": "data:image/png;base64," + b64})
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"info", "items", "parameters"}
    assert body["info"].startswith("png info\n") and "Seed: 99," in body["info"]
    assert body["parameters"]["Prompt"] == "png info" and str(body["parameters"]["Seed"]) == "99"
    assert str(body["parameters"]["Size-1"]) == "64"
    plain = post(api, "png-info", {"image": png_b64(Image.new("RGB", (8, 8)))}).json()
    assert plain["info"] == "" and plain["parameters"] == {}


def test_extras_single_and_batch(api):
    source = Image.new("RGB", (64, 48), (200, 10, 10))
    b64 = png_b64(source, "a source\nSteps: 3, Seed: 5, Size: 64x48")
    by = post(api, "extra-single-image", {"image": b64, "upscaler_1": "Lanczos", "upscaling_resize": 2})
    assert by.status_code == 200, by.text
    out = decode(by.json()["image"])
    assert out.size == (128, 96)
    assert out.info["parameters"].startswith("a source")  # the source's infotext is kept
    assert "Postprocess upscaler: Lanczos" in out.info["postprocessing"]
    assert "Postprocess upscale by: 2" in by.json()["html_info"]
    to = post(api, "extra-single-image", {"image": "data:image/png;base64," + b64, "upscaler_1": "Nearest",
                                          "resize_mode": 1, "upscaling_resize_w": 100, "upscaling_resize_h": 100})
    assert decode(to.json()["image"]).size == (100, 100)
    same = post(api, "extra-single-image", {"image": b64})  # upscaler_1 defaults to "None"
    assert decode(same.json()["image"]).size == (64, 48)
    batch = post(api, "extra-batch-images", {"upscaler_1": "Lanczos", "upscaling_resize": 1.5, "imageList": [
        {"data": b64, "name": "a.png"}, {"data": png_b64(Image.new("RGB", (32, 32))), "name": "b.png"}]})
    assert batch.status_code == 200, batch.text
    assert [decode(i).size for i in batch.json()["images"]] == [(96, 72), (48, 48)]
    assert "html_info" in batch.json()


# --------------------------------------------------------------------------- progress, interrupt, queue

def test_progress_idle_shape(api):
    body = get(api, "progress", params={"skip_current_image": "false"}).json()
    assert {"progress", "eta_relative", "state", "current_image", "textinfo"} <= set(body)
    assert body["progress"] == 0 and body["current_image"] is None and body["queue_pending"] == 0
    assert {"skipped", "interrupted", "job", "job_count", "job_no", "sampling_step", "sampling_steps"} <= set(body["state"])


def test_progress_follows_a_running_job_and_interrupt_stops_it(api):
    assert post(api, "options", {"show_progress_every_n_steps": 2}).status_code == 200
    result: dict = {}
    worker = threading.Thread(target=lambda: result.update(r=post(api, "txt2img", {**TINY, "steps": 150, "seed": 5})))
    worker.start()
    try:
        seen_step, seen_image = None, None
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and (seen_step is None or seen_image is None):
            body = get(api, "progress").json()
            if body["state"]["sampling_step"] >= 3:
                seen_step = body
                if body["current_image"]:
                    seen_image = decode(body["current_image"])
            time.sleep(0.1)
        assert seen_step is not None, "never saw the job run"
        assert seen_step["state"]["job"] == "txt2img" and seen_step["state"]["sampling_steps"] == 150
        assert 0 < seen_step["progress"] < 1 and seen_step["state"]["job_count"] == 1
        assert seen_image is not None and seen_image.format == "PNG"
        assert get(api, "progress", params={"skip_current_image": True}).json()["current_image"] is None
        assert post(api, "interrupt").status_code == 200
    finally:
        worker.join(120)
        post(api, "options", {"show_progress_every_n_steps": 10})
    assert result["r"].status_code == 200
    assert len(result["r"].json()["images"]) == 1  # an interrupted job still answers with what it made
    assert post(api, "skip").status_code == 200
    assert get(api, "progress").json()["state"]["job"] == ""


def test_twenty_concurrent_requests_all_complete_with_distinct_seeds(api):
    pending_seen: list[int] = []
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            pending_seen.append(get(api, "progress").json()["queue_pending"])
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with ThreadPoolExecutor(20) as pool:
            responses = list(pool.map(lambda i: post(api, "txt2img", {**TINY, "steps": 1, "prompt": f"p{i}"}),
                                      range(20)))
    finally:
        stop.set()
        watcher.join()
    assert [r.status_code for r in responses] == [200] * 20
    infos = [json.loads(r.json()["info"]) for r in responses]
    seeds = [i["seed"] for i in infos]
    assert len(set(seeds)) == 20
    assert [i["prompt"] for i in infos] == [f"p{i}" for i in range(20)]
    arrays = [np.asarray(decode(r.json()["images"][0]).convert("RGB")) for r in responses]
    assert len({a.tobytes() for a in arrays}) == 20
    assert max(pending_seen) > 0, "the progress endpoint never saw the queue"


# --------------------------------------------------------------------------- auth

PROTECTED = [("GET", "/sdapi/v1/options"), ("GET", "/sdapi/v1/sd-models"), ("GET", "/sdapi/v1/progress"),
             ("POST", "/sdapi/v1/txt2img"), ("POST", "/sdapi/v1/png-info"), ("GET", "/docs"),
             ("GET", "/openapi.json"), ("GET", "/redoc"), ("GET", "/sdapi/v1/no-such-route")]


def _assert_401(server, method: str, path: str, auth=None) -> None:
    response = requests.request(method, server.url + path, json={}, auth=auth, timeout=30)
    assert response.status_code == 401, (method, path, response.status_code, response.text[:200])
    assert response.headers["WWW-Authenticate"].startswith("Basic"), (path, response.headers)
    assert ERROR_KEYS <= set(response.json())


def test_api_auth_protects_every_non_ui_route(api_auth_server):
    srv = api_auth_server
    for method, path in PROTECTED:
        _assert_401(srv, method, path)
    # Wrong credentials: 4 tries, under the 5 after which an address is locked out (tests/security).
    for method, path in PROTECTED[:2]:
        _assert_401(srv, method, path, auth=("alice", "wrong"))
        _assert_401(srv, method, path, auth=("bob", "s3cret"))
    _assert_401(srv, "GET", "/")  # not the UI (that is under --subpath /sd): ours to protect
    good = ("alice", "s3cret")
    assert requests.get(srv.url + "/sdapi/v1/options", auth=good, timeout=30).status_code == 200
    assert requests.get(srv.url + "/sdapi/v1/sd-models", auth=("carol", "pw:with:colons"), timeout=30).json() == []
    assert requests.get(srv.url + "/docs", auth=good, timeout=30).status_code == 200
    assert "/sdapi/v1/txt2img" in requests.get(srv.url + "/openapi.json", auth=good, timeout=30).json()["paths"]
    png = requests.post(srv.url + "/sdapi/v1/png-info", json={"image": ""}, auth=good, timeout=30)
    assert png.status_code == 200 and png.json()["info"] == ""
    # The UI has a login with the --api-auth credentials (no --gradio-auth here): its page loads
    # without Basic auth, its config only after the form login.
    page = requests.get(srv.url + "/sd/", timeout=30)
    assert page.status_code == 200 and "WWW-Authenticate" not in page.headers
    assert requests.get(srv.url + "/sd/config", timeout=30).status_code == 401
    session = requests.Session()
    assert session.post(srv.url + "/sd/login", data={"username": "alice", "password": "s3cret"}, timeout=30).status_code == 200
    assert session.get(srv.url + "/sd/config", timeout=30).status_code == 200


def test_gradio_auth_alone_protects_the_api_with_the_same_credentials(gradio_auth_server):
    srv = gradio_auth_server
    for method, path in PROTECTED:
        _assert_401(srv, method, path)
    for method, path in PROTECTED[:4]:  # under the 5 wrong passwords that lock an address out
        _assert_401(srv, method, path, auth=("bob", "wrong"))
    good = ("bob", "hunter2")
    assert requests.get(srv.url + "/sdapi/v1/samplers", auth=good, timeout=30).status_code == 200
    assert requests.get(srv.url + "/docs", auth=good, timeout=30).status_code == 200
    assert requests.get(srv.url + "/openapi.json", auth=good, timeout=30).status_code == 200
    # The UI at "/" keeps Gradio's own login: its page loads without Basic auth, /config is
    # Gradio's 401 until the form login, and the form login works.
    page = requests.get(srv.url + "/", timeout=30)
    assert page.status_code == 200 and "WWW-Authenticate" not in page.headers
    assert requests.get(srv.url + "/config", timeout=30).status_code == 401
    session = requests.Session()
    assert session.post(srv.url + "/login", data={"username": "bob", "password": "hunter2"}, timeout=30).status_code == 200
    assert session.get(srv.url + "/config", timeout=30).status_code == 200


def test_auth_middleware_covers_routes_added_later_but_not_the_ui_mount():
    """In-process: an extension route registered after startup is protected; the UI mount is not."""
    from argparse import Namespace

    from fastapi import FastAPI
    from fastapi.testclient import TestClient
    from starlette.responses import PlainTextResponse
    from starlette.routing import Mount

    from modules.api import auth

    app = FastAPI()
    policy = auth.install(app, Namespace(api_auth=None), [("u", "p")])
    assert policy is not None

    async def ui(scope, receive, send):
        await PlainTextResponse("ui")(scope, receive, send)

    app.router.routes.append(Mount("/", app=ui))
    policy.exempt(app.router.routes[-1])

    @app.get("/ext/hello")  # like an extension's on_app_started route
    def hello():
        return {"hi": True}
    app.router.routes.insert(0, app.router.routes.pop())  # reachable despite the "/" mount

    client = TestClient(app)
    assert client.get("/").text == "ui"
    assert client.get("/anything/else").text == "ui"
    assert client.get("/ext/hello").status_code == 401
    assert client.get("/ext/hello", auth=("u", "p")).json() == {"hi": True}
    assert client.get("/sdapi/v1/whatever").status_code == 401  # API prefix: never left to the UI
    assert auth.install(FastAPI(), Namespace(api_auth=None), []) is None  # no flags: nothing checked


# --------------------------------------------------------------------------- --nowebui

def test_nowebui_serves_the_api_alone(tmp_path):
    srv = start_server(tmp_path, "--nowebui", ready_path="/sdapi/v1/samplers")
    try:
        assert requests.get(srv.url + "/sdapi/v1/samplers", timeout=30).status_code == 200
        assert requests.get(srv.url + "/docs", timeout=30).status_code == 200
        for path in ("/", "/sdapi/v1/no-such-endpoint"):
            assert_error(requests.get(srv.url + path, timeout=30), 404, "Not Found")
        memory = requests.get(srv.url + "/sdapi/v1/memory", timeout=30).json()
        assert "torch" in memory["cuda"]["error"]  # no model loaded: torch was never imported
        options = requests.get(srv.url + "/sdapi/v1/options", timeout=30).json()
        assert requests.post(srv.url + "/sdapi/v1/options", json=options, timeout=30).status_code == 200
        # no checkpoint at all: a clear error, not a crash
        assert_error(requests.post(srv.url + "/sdapi/v1/txt2img", json=TINY, timeout=60), 503, "Stable-diffusion")
        assert requests.get(srv.url + "/sdapi/v1/progress", timeout=30).status_code == 200
    finally:
        srv.stop()


# --------------------------------------------------------------------------- A1111 keys kept for compatibility

def test_a_compat_only_setting_is_stored_survives_a_restart_and_says_it_has_no_effect(tmp_path):
    srv = start_server(tmp_path, "--api")
    try:
        response = post(srv, "options", {"send_seed": False, "hypertile_max_tile_vae": 256})
        assert response.status_code == 200, response.text
        assert {k: get(srv, "options").json()[k] for k in ("send_seed", "hypertile_max_tile_vae")} == \
            {"send_seed": False, "hypertile_max_tile_vae": 256}
        # only what was set is written, not the ~300 defaults
        assert json.loads((tmp_path / "config.json").read_text()) == {"send_seed": False, "hypertile_max_tile_vae": 256}
        # the settings metadata says so: the Settings tab's entry and the API schema
        components = requests.get(srv.url + "/config", timeout=30).json()["components"]
        props = next(c["props"] for c in components if c.get("props", {}).get("elem_id") == "setting_send_seed")
        assert props["info"] == "kept for compatibility, no effect"
        used = next(c["props"] for c in components if c.get("props", {}).get("elem_id") == "setting_jpeg_quality")
        assert "no effect" not in (used.get("info") or "")
        schema = requests.get(srv.url + "/openapi.json", timeout=30).json()["components"]["schemas"]["OptionsModel"]
        assert schema["properties"]["send_seed"]["description"] == "kept for compatibility, no effect"
        assert "description" not in schema["properties"]["jpeg_quality"]
    finally:
        srv.stop()
    # a setting of an extension that is not installed now is kept, returned and round-trips unchanged
    stored = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**stored, "gone_extension_setting": 3}))
    srv = start_server(tmp_path, "--nowebui", ready_path="/sdapi/v1/options")
    try:
        after = get(srv, "options").json()
        assert after["send_seed"] is False and after["hypertile_max_tile_vae"] == 256 and after["send_size"] is True
        assert after["gone_extension_setting"] == 3
        assert post(srv, "options", after).status_code == 200
        assert_error(post(srv, "options", {**after, "gone_extension_setting": 4}), 422, "gone_extension_setting")
    finally:
        srv.stop()

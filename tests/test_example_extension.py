"""An extension written as for A1111 (tests/example_extensions/sd-webui-example) running unmodified in a
real server: install.py, preload.py flag, route, setting, always-visible script through the API and the
page, every callback, infotext paste, its tab with modules.ui_components, and on_script_unloaded at
shutdown; a broken extension beside it is reported and left out. Plus the save hooks of img2img batch."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import requests
from PIL import Image

from conftest import start_server

EXAMPLES = Path(__file__).resolve().parent / "example_extensions"
TIMEOUT = 120


@pytest.fixture(scope="module")
def example_server(tmp_path_factory):
    from tiny_models import make_checkpoint

    data = tmp_path_factory.mktemp("example-ext")
    for name in ("sd-webui-example", "sd-webui-broken"):
        shutil.copytree(EXAMPLES / name, data / "extensions" / name,
                        ignore=shutil.ignore_patterns("__pycache__", "installed.txt"))
    make_checkpoint(data / "models" / "Stable-diffusion" / "tiny.safetensors", "sd1")
    srv = start_server(data, "--api", "--example-flag", timeout=TIMEOUT)
    yield srv
    srv.stop()


def ping(srv) -> dict:
    r = requests.get(srv.url + "/example/ping", timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    return r.json()


def txt2img(srv, **extra) -> dict:
    body = {"prompt": "a cat", "width": 64, "height": 64, "steps": 2, "seed": 5, "save_images": True, **extra}
    r = requests.post(srv.url + "/sdapi/v1/txt2img", json=body, timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    return json.loads(r.json()["info"])


def test_install_preload_route_setting_and_the_broken_extension(example_server):
    srv, data = example_server, example_server.data_dir
    assert (data / "extensions" / "sd-webui-example" / "installed.txt").read_text() == "ran\n"
    got = ping(srv)
    assert got["pong"] is True and got["flag"] is True and got["setting"] == "hello"
    assert got["counts"]["before_ui"] == 1
    options = requests.get(srv.url + "/sdapi/v1/options", timeout=TIMEOUT).json()
    assert options["example_setting"] == "hello"
    scripts = requests.get(srv.url + "/sdapi/v1/scripts", timeout=TIMEOUT).json()
    assert "example" in scripts["txt2img"] and "example" in scripts["img2img"]
    info = [s for s in requests.get(srv.url + "/sdapi/v1/script-info", timeout=TIMEOUT).json()
            if s["name"] == "example"]
    assert [a["label"] for a in info[0]["args"]] == ["Enable", "Prompt suffix"]
    assert "sd-webui-broken" in srv.output and "example-broken-import" in srv.output


def test_api_runs_the_always_visible_script_and_the_callbacks(example_server):
    srv, data = example_server, example_server.data_dir
    before = ping(srv)["counts"]
    plain = txt2img(srv)
    assert "Example suffix" not in plain["infotexts"][0] and plain["infotexts"][0].startswith("a cat\n")

    info = txt2img(srv, alwayson_scripts={"Example": {"args": [True, "oil"]}})
    text = info["infotexts"][0]
    assert text.startswith("a cat, oil\n") and "Example suffix: oil" in text
    assert info["all_prompts"] == ["a cat, oil"]

    counts = ping(srv)["counts"]
    assert counts["model_loaded"] == 1
    assert counts["cfg_denoiser"] - before["cfg_denoiser"] == 4  # 2 steps x 2 jobs
    assert counts["cfg_denoised"] - before["cfg_denoised"] == 4
    assert ping(srv)["inner_models"] == ["UNet2DConditionModel"]
    assert counts["before_image_saved"] - before["before_image_saved"] == 2
    saved = (data / "example-saved.txt").read_text().splitlines()
    assert len(saved) >= 2
    last = Image.open(saved[-1])
    assert last.info["example"] == "seen by the example extension"
    assert "Example suffix: oil" in last.info["parameters"]

    r = requests.post(srv.url + "/sdapi/v1/txt2img", timeout=TIMEOUT, json={
        "prompt": "x", "width": 64, "height": 64, "steps": 1,
        "alwayson_scripts": {"Example": {"args": [True, "a", "too many"]}}})
    assert r.status_code == 422, r.text


@pytest.mark.browser
def test_the_page_runs_the_extension(example_server, page):
    srv = example_server
    page.goto(srv.url + "/")
    page.locator("#txt2img_prompt textarea").wait_for(timeout=TIMEOUT * 1000)
    page.wait_for_function("window.exampleExtensionLoaded === 'example-js-ok'", timeout=TIMEOUT * 1000)
    page.wait_for_function("window.exampleUiLoaded === true && window.exampleUiUpdates > 0", timeout=TIMEOUT * 1000)

    # The extension's tab: its CSS applies, and the InputAccordion's open state is its value.
    page.get_by_role("tab", name="Example tab").click()
    note = page.locator(".example-note").first
    note.wait_for(timeout=TIMEOUT * 1000)
    assert note.evaluate("e => getComputedStyle(e).fontStyle") == "italic"
    page.locator("#example_options").get_by_text("Example options").first.click()
    page.locator("#example_check").click()
    state = page.locator("#example_state textarea")
    page.wait_for_function("document.querySelector('#example_state textarea').value === 'options on: True'",
                           timeout=TIMEOUT * 1000)
    assert state.input_value() == "options on: True"

    # txt2img with the script on: the suffix reaches the infotext shown on the page.
    page.get_by_role("tab", name="txt2img").click()
    page.locator("#script_txt2img_example_accordion").get_by_text("Example").first.click()
    page.locator("#script_txt2img_example_enabled input").check()
    suffix = page.locator("#script_txt2img_example_suffix textarea")
    suffix.fill("oil")
    prompt = page.locator("#txt2img_prompt textarea")
    prompt.fill("a cat")
    for elem_id, value in (("txt2img_width", "64"), ("txt2img_height", "64"), ("txt2img_steps", "2")):
        box = page.locator(f"#{elem_id} input[type=number]")
        box.fill(value)
        box.press("Tab")
    page.locator("#txt2img_generate").click()
    infotext = page.locator("#txt2img_infotext")
    try:
        infotext.get_by_text("Example suffix: oil", exact=False).wait_for(timeout=TIMEOUT * 1000)
    except Exception as err:
        raise AssertionError(f"no infotext; progress: {page.locator('#txt2img_progress').inner_text()!r}; "
                             f"server output:\n{srv.output[-3000:]}") from err
    assert "a cat, oil" in infotext.inner_text()

    # ↙ with an empty prompt reads the last generation: infotext_fields restore the script's controls,
    # and the extension's on_infotext_pasted takes its suffix back out of the prompt.
    pasted_before = ping(srv)["counts"]["infotext_pasted"]
    page.locator("#script_txt2img_example_enabled input").uncheck()
    suffix.fill("changed")
    prompt.fill("")
    page.locator("#txt2img_paste").click()
    page.wait_for_function(
        "document.querySelector('#script_txt2img_example_suffix textarea').value === 'oil'", timeout=TIMEOUT * 1000)
    assert page.locator("#script_txt2img_example_enabled input").is_checked()
    assert prompt.input_value() == "a cat"
    assert ping(srv)["counts"]["infotext_pasted"] == pasted_before + 1


def test_script_unloaded_fires_when_the_server_stops(example_server):
    marker = example_server.data_dir / "example-unloaded.txt"
    assert not marker.exists()
    example_server.stop()
    assert marker.read_text() == "unloaded", example_server.output[-3000:]


def test_img2img_batch_saves_through_the_save_hooks(tmp_path):
    """Results written under their source names (an output folder) fire on_before_image_saved and
    on_image_saved, as every other saved image does."""
    from modules.core.img2img_batch import run_batch
    from modules.core.pipeline import Img2ImgParams, Processed

    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    Image.new("RGB", (64, 64), "red").save(src / "photo.png")
    seen = []

    class Generation:
        state = options = models = None

        def __init__(self):
            self.save_hooks = (lambda params: seen.append(("before", Path(params.filename).name)),
                               lambda params: seen.append(("after", Path(params.filename).name)))

        def img2img(self, p, **kwargs):
            return Processed(images=[p.init_images[0]], infotexts=["info"], params=p)

    result = run_batch(Generation(), Img2ImgParams(prompt="x", width=64, height=64), src, out)
    assert result.ok and [Path(p).name for p in result.outputs] == ["photo.png"]
    assert seen == [("before", "photo.png"), ("after", "photo.png")]

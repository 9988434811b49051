"""A1111's ``sd_hypernetwork`` setting ("Add hypernetwork to prompt"): a hypernetwork added to every prompt.

Real job path on the tiny SD1 checkpoint with A1111-format hypernetwork files; the settings dropdown and the
API. The twin of tests/test_lora_setting.py (both settings are core/network_settings.py).
"""
from __future__ import annotations

import logging

import numpy as np
import pytest

from lora_fixtures import hypernetwork, kohya_lora
from modules.core.infotext import parse_infotext
from modules.core.pipeline import Txt2ImgParams
from test_lora_setting import SMALL, pixels, run, setting
from test_processing import make_services

WIDTHS = (32, 64)   # the tiny SD1's context width and a self-attention width


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    services = make_services(tmp_path_factory.mktemp("hypernetwork-setting"), "sd1")
    folder = services.paths.hypernetwork_dir
    hypernetwork(folder / "hn.pt", WIDTHS)
    hypernetwork(folder / "other.pt", WIDTHS, seed=3)
    kohya_lora(services.paths.lora_dir / "style.safetensors", services.models.current().pipe)
    yield services
    services.generation.queue.shutdown()


def test_the_setting_applies_its_hypernetwork_as_if_the_tag_were_written(sd1):
    base = run(sd1, "a cat", batch_size=2)
    written = run(sd1, "a cat <hypernet:hn:1>", batch_size=2)
    with setting(sd1, sd_hypernetwork="hn"):
        added = run(sd1, "a cat", batch_size=2)
    assert len(added.images) == 3   # the grid and both images
    assert not np.array_equal(pixels(base), pixels(added))
    assert np.array_equal(pixels(written), pixels(added))
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(written.images, added.images))
    assert not added.comments
    for text in added.infotexts:
        assert parse_infotext(text)["Prompt"] == "a cat<hypernet:hn:1.0>"   # appended as A1111 does
    with setting(sd1, sd_hypernetwork="hn", extra_networks_default_multiplier=0.5):
        half = run(sd1, "a cat")
    assert parse_infotext(half.infotexts[0])["Prompt"] == "a cat<hypernet:hn:0.5>"
    assert np.array_equal(pixels(half), pixels(run(sd1, "a cat <hypernet:hn:0.5>")))
    assert not np.array_equal(pixels(half), pixels(added))
    assert np.array_equal(pixels(run(sd1, "a cat", batch_size=2)), pixels(base))   # and it comes off again


def test_a_hypernetwork_already_in_the_prompt_is_not_added_twice(sd1):
    for prompt in ("a cat <hypernet:hn:0.5>", "a cat <hypernet:HN:0.5>"):   # the name as a tag finds it
        plain = run(sd1, prompt)
        with setting(sd1, sd_hypernetwork="hn"):
            result = run(sd1, prompt)
        assert parse_infotext(result.infotexts[0])["Prompt"] == prompt
        assert np.array_equal(pixels(plain), pixels(result))
    with setting(sd1, sd_hypernetwork="hn"):   # another hypernetwork in the prompt: the setting's is still added
        both = run(sd1, "a cat <hypernet:other:1>")
    assert parse_infotext(both.infotexts[0])["Prompt"] == "a cat <hypernet:other:1><hypernet:hn:1.0>"
    assert np.array_equal(pixels(both), pixels(run(sd1, "a cat <hypernet:other:1> <hypernet:hn:1>")))


def test_with_sd_lora_both_are_added_hypernetwork_first(sd1):
    with setting(sd1, sd_hypernetwork="hn", sd_lora="style"):
        result = run(sd1, "a cat")
    fields = parse_infotext(result.infotexts[0])
    assert fields["Prompt"] == "a cat<hypernet:hn:1.0><lora:style:1.0>" and fields["Lora hashes"].startswith("style: ")
    assert np.array_equal(pixels(result), pixels(run(sd1, "a cat <hypernet:hn:1> <lora:style:1>")))


def test_none_changes_nothing_and_an_unknown_name_warns_and_still_makes_the_image(sd1, caplog):
    base = run(sd1, "a cat")
    with setting(sd1, sd_hypernetwork="None"):
        none = run(sd1, "a cat")
    assert np.array_equal(pixels(base), pixels(none)) and none.infotexts == base.infotexts
    with setting(sd1, sd_hypernetwork="nosuchnet"), caplog.at_level(logging.WARNING):
        unknown = run(sd1, "a cat")
    assert np.array_equal(pixels(base), pixels(unknown))
    assert "Setting 'Hypernetwork added to prompts' names nosuchnet" in unknown.comments
    assert "nosuchnet" in caplog.text   # the console too
    assert parse_infotext(unknown.infotexts[0])["Prompt"] == "a cat"
    with setting(sd1, sd_hypernetwork="hn"):   # A1111's "disable extra networks" turns the setting off too
        off = sd1.generation.txt2img(Txt2ImgParams(prompt="a cat", disable_extra_networks=True, **SMALL))
    assert np.array_equal(pixels(base), pixels(off))


def test_settings_dropdown_lists_the_hypernetwork_files_and_refreshes(sd1):
    import gradio as gr

    from modules.ui.components import component_for_option

    info = sd1.options.templates["sd_hypernetwork"]
    assert not info.compat_only and info.kind == "dropdown"
    assert info.current_choices() == ["None", "hn", "other"]
    dropdown = component_for_option("sd_hypernetwork", info, "None")
    assert isinstance(dropdown, gr.Dropdown)
    assert [c[0] for c in dropdown.choices] == ["None", "hn", "other"]
    hypernetwork(sd1.paths.hypernetwork_dir / "sub" / "late.pt", WIDTHS, seed=5)
    info.refresh()
    assert info.current_choices() == ["None", "hn", "late", "other"]


def test_the_api_accepts_the_setting_and_its_jobs_use_it(sd1):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from modules.api.routes import Api

    app = FastAPI()
    Api(app, sd1)
    client = TestClient(app)
    try:
        assert client.post("/sdapi/v1/options", json={"sd_hypernetwork": "hn"}).status_code == 200
        assert client.get("/sdapi/v1/options").json()["sd_hypernetwork"] == "hn"
        reply = client.post("/sdapi/v1/txt2img", json={"prompt": "a cat", **SMALL}).json()
        assert "a cat<hypernet:hn:1.0>" in reply["info"]
    finally:
        assert client.post("/sdapi/v1/options", json={"sd_hypernetwork": "None"}).status_code == 200


def test_the_settings_tab_shows_a_dropdown_with_a_refresh_button(sd1):
    import gradio as gr

    from modules.ui.settings_tab import build_settings_tab

    with gr.Blocks() as demo:
        build_settings_tab(sd1)
    by_id = {getattr(b, "elem_id", None): b for b in demo.blocks.values()}
    dropdown, button = by_id["setting_sd_hypernetwork"], by_id["refresh_sd_hypernetwork"]
    assert isinstance(dropdown, gr.Dropdown) and isinstance(button, gr.Button)
    assert "hn" in [c[0] for c in dropdown.choices]
    hypernetwork(sd1.paths.hypernetwork_dir / "fresh.pt", WIDTHS, seed=6)
    handler = next(fn for fn in demo.fns.values() if (button._id, "click") in fn.targets)
    assert handler.outputs == [dropdown]
    assert "fresh" in handler.fn()["choices"]

"""A1111's ``sd_lora`` setting ("Add network to prompt"): a LoRA added to every prompt of a job.

Real job path on the tiny SD1 checkpoint with a kohya LoRA file; the settings dropdown and the API.
"""
from __future__ import annotations

import contextlib

import numpy as np
import pytest

from lora_fixtures import kohya_lora
from modules.core.infotext import parse_infotext
from modules.core.pipeline import Txt2ImgParams
from test_processing import make_services

SMALL = dict(width=64, height=64, steps=3, cfg_scale=7.0, seed=77)


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    services = make_services(tmp_path_factory.mktemp("lora-setting"), "sd1")
    pipe = services.models.current().pipe
    kohya_lora(services.paths.lora_dir / "style.safetensors", pipe,
               metadata={"ss_output_name": "styleAlias", "ss_base_model_version": "sd_v1"})
    kohya_lora(services.paths.lora_dir / "other.safetensors", pipe, seed=3)
    yield services
    services.generation.queue.shutdown()


@contextlib.contextmanager
def setting(services, **values):
    before = {key: services.options.get(key) for key in values}
    for key, value in values.items():
        services.options.set(key, value)
    try:
        yield
    finally:
        for key, value in before.items():
            services.options.set(key, value)


def run(services, prompt: str, **kwargs):
    return services.generation.txt2img(Txt2ImgParams(prompt=prompt, **{**SMALL, **kwargs}))


def pixels(result) -> np.ndarray:
    return np.asarray(result.images[0].convert("RGB"), dtype=np.int16)


def test_the_setting_applies_its_lora_as_if_the_tag_were_written(sd1):
    base = run(sd1, "a cat", batch_size=2)
    written = run(sd1, "a cat <lora:style:1>", batch_size=2)
    with setting(sd1, sd_lora="style"):
        added = run(sd1, "a cat", batch_size=2)
    assert len(added.images) == 3   # the grid and both images
    assert not np.array_equal(pixels(base), pixels(added))
    assert np.array_equal(pixels(written), pixels(added))
    assert not added.comments
    for text in added.infotexts:
        fields = parse_infotext(text)
        assert fields["Prompt"] == "a cat<lora:style:1.0>"   # appended as A1111 does, default weight
        assert fields["Lora hashes"].startswith("style: ")
    with setting(sd1, sd_lora="style", extra_networks_default_multiplier=0.5):
        half = run(sd1, "a cat")
    assert parse_infotext(half.infotexts[0])["Prompt"] == "a cat<lora:style:0.5>"
    assert np.array_equal(pixels(half), pixels(run(sd1, "a cat <lora:style:0.5>")))


def test_a_lora_already_in_the_prompt_is_not_added_twice(sd1):
    for prompt in ("a cat <lora:style:0.5>", "a cat <lyco:styleAlias:0.5>"):   # by name or alias
        plain = run(sd1, prompt)
        with setting(sd1, sd_lora="style"):
            result = run(sd1, prompt)
        assert parse_infotext(result.infotexts[0])["Prompt"] == prompt
        assert np.array_equal(pixels(plain), pixels(result))
    with setting(sd1, sd_lora="style"):   # another LoRA in the prompt: the setting's one is still added
        both = run(sd1, "a cat <lora:other:1>")
    assert parse_infotext(both.infotexts[0])["Prompt"] == "a cat <lora:other:1><lora:style:1.0>"
    assert np.array_equal(pixels(both), pixels(run(sd1, "a cat <lora:other:1> <lora:style:1>")))


def test_none_changes_nothing_and_an_unknown_name_warns_and_still_makes_the_image(sd1):
    base = run(sd1, "a cat")
    with setting(sd1, sd_lora="None"):
        none = run(sd1, "a cat")
    assert np.array_equal(pixels(base), pixels(none)) and none.infotexts == base.infotexts
    with setting(sd1, sd_lora="nosuchlora"):
        unknown = run(sd1, "a cat")
    assert np.array_equal(pixels(base), pixels(unknown))
    assert "nosuchlora" in unknown.comments
    assert parse_infotext(unknown.infotexts[0])["Prompt"] == "a cat"
    with setting(sd1, sd_lora="style"):   # A1111's "disable extra networks" turns the setting off too
        off = sd1.generation.txt2img(Txt2ImgParams(prompt="a cat", disable_extra_networks=True, **SMALL))
    assert np.array_equal(pixels(base), pixels(off))


def test_settings_dropdown_lists_the_lora_files_and_refreshes(sd1):
    import gradio as gr

    from modules.ui.components import component_for_option

    info = sd1.options.templates["sd_lora"]
    assert not info.compat_only and info.kind == "dropdown"
    assert not sd1.options.templates["extra_networks_default_multiplier"].compat_only   # it has an effect now
    assert info.current_choices() == ["None", "other", "style"]
    dropdown = component_for_option("sd_lora", info, "None")
    assert isinstance(dropdown, gr.Dropdown)
    assert [c[0] for c in dropdown.choices] == ["None", "other", "style"]
    kohya_lora(sd1.paths.lora_dir / "sub" / "late.safetensors", sd1.models.current().pipe, seed=5)
    info.refresh()
    assert info.current_choices() == ["None", "late", "other", "style"]


def test_the_api_accepts_the_setting_and_its_jobs_use_it(sd1):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from modules.api.routes import Api

    app = FastAPI()
    Api(app, sd1)
    client = TestClient(app)
    try:
        assert client.post("/sdapi/v1/options", json={"sd_lora": "style"}).status_code == 200
        assert client.get("/sdapi/v1/options").json()["sd_lora"] == "style"
        reply = client.post("/sdapi/v1/txt2img", json={"prompt": "a cat", **SMALL}).json()
        info = reply["info"]
        assert "a cat<lora:style:1.0>" in info and "Lora hashes" in info
    finally:
        assert client.post("/sdapi/v1/options", json={"sd_lora": "None"}).status_code == 200


def test_the_settings_tab_shows_a_dropdown_with_a_refresh_button(sd1):
    import gradio as gr

    from modules.ui.settings_tab import build_settings_tab

    with gr.Blocks() as demo:
        build_settings_tab(sd1)
    by_id = {getattr(b, "elem_id", None): b for b in demo.blocks.values()}
    dropdown, button = by_id["setting_sd_lora"], by_id["refresh_sd_lora"]
    assert isinstance(dropdown, gr.Dropdown) and isinstance(button, gr.Button)
    assert "style" in [c[0] for c in dropdown.choices]
    kohya_lora(sd1.paths.lora_dir / "fresh.safetensors", sd1.models.current().pipe, seed=6)
    handler = next(fn for fn in demo.fns.values() if (button._id, "click") in fn.targets)
    assert handler.outputs == [dropdown]
    update = handler.fn()
    assert "fresh" in update["choices"]

"""Checks shared by the "add network to prompt" settings' tests (sd_lora, sd_hypernetwork): how a job runs
with a setting, the Settings dropdown, the Settings tab's refresh button, and /sdapi/v1/options."""
from __future__ import annotations

import contextlib
from typing import Callable

import numpy as np

from modules.core.pipeline import Txt2ImgParams

SMALL = dict(width=64, height=64, steps=3, cfg_scale=7.0, seed=77)


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


def check_added_as_written(services, key: str, name: str, tag: str):
    """With `key` set to `name`, "a cat" (a batch of 2) makes the images "a cat <tag:name:1>" makes, bit for bit,
    and the infotext prompt shows the appended tag with the default weight (0.5 too); the added job's result."""
    from modules.core.infotext import parse_infotext

    base = run(services, "a cat", batch_size=2)
    written = run(services, f"a cat <{tag}:{name}:1>", batch_size=2)
    with setting(services, **{key: name}):
        added = run(services, "a cat", batch_size=2)
    assert len(added.images) == 3   # the grid and both images
    assert not np.array_equal(pixels(base), pixels(added))
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(written.images, added.images))
    assert not added.comments
    for text in added.infotexts:
        assert parse_infotext(text)["Prompt"] == f"a cat<{tag}:{name}:1.0>"   # appended as A1111 does
    with setting(services, **{key: name, "extra_networks_default_multiplier": 0.5}):
        half = run(services, "a cat")
    assert parse_infotext(half.infotexts[0])["Prompt"] == f"a cat<{tag}:{name}:0.5>"
    assert np.array_equal(pixels(half), pixels(run(services, f"a cat <{tag}:{name}:0.5>")))
    assert not np.array_equal(pixels(half), pixels(added))
    assert np.array_equal(pixels(run(services, "a cat", batch_size=2)), pixels(base))   # and it comes off again
    return added


def check_dropdown(services, key: str, listed: list[str], add_file: Callable[[], object], added: str) -> None:
    """The setting is a dropdown of "None" and the files; a file added (add_file, named `added`) shows after
    a refresh."""
    import gradio as gr

    from modules.ui.components import component_for_option

    info = services.options.templates[key]
    assert not info.compat_only and info.kind == "dropdown"
    assert info.current_choices() == ["None", *listed]
    dropdown = component_for_option(key, info, "None")
    assert isinstance(dropdown, gr.Dropdown)
    assert [c[0] for c in dropdown.choices] == ["None", *listed]
    add_file()
    info.refresh()
    assert info.current_choices() == ["None", *sorted([*listed, added], key=str.lower)]


def check_settings_tab(services, key: str, listed: str, add_file: Callable[[], object], added: str) -> None:
    """The Settings tab shows the dropdown with a refresh button that lists a file added since."""
    import gradio as gr

    from modules.ui.settings_tab import build_settings_tab

    with gr.Blocks() as demo:
        build_settings_tab(services)
    by_id = {getattr(b, "elem_id", None): b for b in demo.blocks.values()}
    dropdown, button = by_id[f"setting_{key}"], by_id[f"refresh_{key}"]
    assert isinstance(dropdown, gr.Dropdown) and isinstance(button, gr.Button)
    assert listed in [c[0] for c in dropdown.choices]
    add_file()
    handler = next(fn for fn in demo.fns.values() if (button._id, "click") in fn.targets)
    assert handler.outputs == [dropdown]
    assert added in handler.fn()["choices"]


def api_job_info(services, key: str, value: str) -> str:
    """POST /sdapi/v1/options {key: value} (read back), a txt2img job's `info`; the setting is reset after."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from modules.api.routes import Api

    app = FastAPI()
    Api(app, services)
    client = TestClient(app)
    try:
        assert client.post("/sdapi/v1/options", json={key: value}).status_code == 200
        assert client.get("/sdapi/v1/options").json()[key] == value
        return client.post("/sdapi/v1/txt2img", json={"prompt": "a cat", **SMALL}).json()["info"]
    finally:
        assert client.post("/sdapi/v1/options", json={key: "None"}).status_code == 200

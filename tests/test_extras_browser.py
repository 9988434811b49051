"""The Extras tab in a real Chromium: PNG Info's "Send to extras", a model upscaler picked from the list,
progress to done, the result shown and saved as outputs/extras-images/00000.png with the infotext lines."""
from __future__ import annotations

import pytest
from PIL import Image, PngImagePlugin

from conftest import start_server
from upscaler_fixtures import make_upscaler


@pytest.fixture(scope="module")
def extras_server(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("extras-ui")
    make_upscaler(data_dir / "models", "compact", 2, name="2x-tiny-ui")
    srv = start_server(data_dir)
    yield srv
    srv.stop()


def test_extras_tab_upscales_with_a_model_and_saves(extras_server, page, tmp_path):
    source = tmp_path / "source.png"
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "a red square\nSteps: 3, Seed: 11, Size: 48x40")
    Image.new("RGB", (48, 40), (220, 20, 20)).save(source, pnginfo=info)

    page.goto(extras_server.url + "/")
    page.locator("#txt2img_prompt textarea").wait_for(timeout=120000)
    page.locator("#tabs").get_by_role("tab", name="PNG Info").click()
    page.locator("#pnginfo_image input[type=file]").set_input_files(str(source))
    page.locator("#pnginfo_html_info").get_by_text("a red square").wait_for(timeout=60000)
    page.locator("#pnginfo_send_to_extras").click()
    page.locator("#extras_image img").wait_for(timeout=60000)   # the Extras tab opened with the image

    page.locator("#extras_upscaler_1 input").click()
    page.get_by_role("option", name="2x-tiny-ui", exact=True).click()
    resize = page.locator("#extras_upscaling_resize input[type=number]")
    resize.fill("2")
    resize.press("Tab")
    page.locator("#extras_generate").click()
    try:
        page.locator("#extras_html_info").get_by_text("Postprocess upscaler: 2x-tiny-ui").wait_for(timeout=120000)
    except Exception as err:
        raise AssertionError(f"no result; progress: {page.locator('#extras_progress').inner_text()!r}; "
                             f"server output:\n{extras_server.output[-3000:]}") from err
    assert "Postprocess upscale by: 2" in page.locator("#extras_html_info").inner_text()
    page.locator("#extras_gallery img").first.wait_for(timeout=60000)
    assert "Done" in page.locator("#extras_progress").inner_text()

    saved = extras_server.data_dir / "outputs" / "extras-images" / "00000.png"
    assert saved.exists()
    with Image.open(saved) as image:
        assert image.size == (96, 80)
        assert image.info["parameters"].startswith("a red square")
        assert image.info["extras"] == "Postprocess upscale by: 2, Postprocess upscaler: 2x-tiny-ui"

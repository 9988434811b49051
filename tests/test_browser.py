"""A real headless Chromium against the real server."""
import json

import pytest

pytestmark = pytest.mark.browser


def test_page_shows_the_tabs(server, page, tmp_path):
    page.goto(server.url + "/")
    page.get_by_role("tab", name="Settings").wait_for(timeout=60000)
    tabs = [t.strip() for t in page.locator("#tabs > .tab-wrapper [role=tab]").all_inner_texts()]
    assert tabs == ["txt2img", "img2img", "Extras", "PNG Info", "Queue", "Settings", "Extensions"]
    # With no checkpoint, the page says where to put one.
    assert "models/Stable-diffusion" in page.locator("#checkpoint_status").inner_text()
    page.screenshot(path=str(tmp_path / "home.png"), full_page=True)
    assert (tmp_path / "home.png").stat().st_size > 0


def test_settings_apply_persists_to_config_json(server, page):
    page.goto(server.url + "/")
    page.get_by_role("tab", name="Settings").click(timeout=60000)
    checkbox = page.locator("#setting_save_txt input[type=checkbox]")
    checkbox.wait_for(timeout=60000)
    assert not checkbox.is_checked()
    checkbox.check()
    page.locator("#settings_submit").click()
    page.locator("#settings_result").get_by_text("1 settings changed: save_txt.").wait_for(timeout=60000)
    saved = json.loads((server.data_dir / "config.json").read_text())
    assert saved["save_txt"] is True


def test_txt2img_generates_an_image_into_the_gallery(model_server, page, tmp_path):
    page.goto(model_server.url + "/")
    page.locator("#txt2img_prompt textarea").wait_for(timeout=60000)
    assert "tiny-sd1.safetensors" in page.locator("#setting_sd_model_checkpoint").inner_text(timeout=60000) + \
        page.locator("#setting_sd_model_checkpoint input").input_value()
    page.locator("#txt2img_prompt textarea").fill("a photo of a cat")
    # Small and fast: 64x64, 2 steps.
    for elem_id, value in (("txt2img_width", "64"), ("txt2img_height", "64"), ("txt2img_steps", "2"),
                           ("txt2img_seed", "777")):
        box = page.locator(f"#{elem_id} input[type=number]")
        box.fill(value)
        box.press("Tab")
    page.locator("#txt2img_prompt textarea").press("Control+Enter")
    try:
        page.locator("#txt2img_gallery img").first.wait_for(timeout=120000)
    except Exception as err:  # say what the page and the server show, not just "timeout"
        raise AssertionError(f"no image in the gallery; progress: {page.locator('#txt2img_progress').inner_text()!r}; "
                             f"server output:\n{model_server.output[-3000:]}") from err
    page.locator("#txt2img_infotext").get_by_text("Seed: 777", exact=False).wait_for(timeout=120000)
    text = page.locator("#txt2img_infotext").inner_text()
    assert "a photo of a cat" in text and "Steps: 2" in text and "Size: 64x64" in text
    page.screenshot(path=str(tmp_path / "txt2img.png"), full_page=True)
    saved = list((model_server.data_dir / "outputs" / "txt2img-images").rglob("*-777.png"))
    assert len(saved) == 1

"""img2img and PNG Info in a real headless Chromium against the real server (tiny sd1 checkpoints)."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def img2img_server(tmp_path_factory):
    from conftest import start_server
    from tiny_models import make_checkpoint

    data_dir = tmp_path_factory.mktemp("browser-img2img")
    ckpt_dir = data_dir / "models" / "Stable-diffusion"
    make_checkpoint(ckpt_dir / "tiny-sd1.safetensors", "sd1")
    make_checkpoint(ckpt_dir / "zz-other-sd1.safetensors", "sd1", seed=1)  # not the default: for the checkpoint paste
    srv = start_server(data_dir)
    yield srv
    srv.stop()


def gradient(size: int = 256) -> Image.Image:
    y, x = np.mgrid[0:size, 0:size]
    return Image.fromarray(np.dstack([x % 256, y % 256, ((x + y) // 2) % 256]).astype(np.uint8), "RGB")


def set_number(page, elem_id: str, value: str) -> None:
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(value)
    box.press("Tab")


def upload_to_editor(page, editor, path) -> None:
    # Gradio 6's ImageEditor: clicking its empty canvas opens the file chooser.
    with page.expect_file_chooser() as chooser:
        editor.get_by_text("Upload an image").click()
    chooser.value.set_files(str(path))


def test_inpaint_a_stroke_drawn_with_the_mouse(img2img_server, page, tmp_path):
    source = tmp_path / "source.png"
    gradient().save(source)
    page.goto(img2img_server.url + "/")
    page.get_by_role("tab", name="img2img", exact=True).click(timeout=60000)
    page.get_by_role("tab", name="Inpaint", exact=True).click()
    editor = page.locator("#img2maskimg")
    editor.wait_for()
    page.locator("#img2img_mask_blur").wait_for()  # the inpaint controls appear with the tab
    page.wait_for_timeout(500)
    upload_to_editor(page, editor, source)
    canvas = editor.locator("canvas").first
    canvas.wait_for()
    page.wait_for_timeout(1000)

    # A short horizontal stroke through the middle of the picture (the brush is the active tool).
    box = canvas.bounding_box()
    cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(cx - 30, cy)
    page.mouse.down()
    for dx in range(-30, 31, 6):
        page.mouse.move(cx + dx, cy, steps=2)
    page.mouse.up()
    page.wait_for_timeout(500)
    page.screenshot(path=str(tmp_path / "inpaint-mask.png"), full_page=True)

    page.locator("#img2img_prompt textarea").fill("a lighthouse")
    for elem_id, value in (("img2img_width", "64"), ("img2img_height", "64"), ("img2img_steps", "2"),
                           ("img2img_seed", "4321"), ("img2img_mask_blur", "0")):
        set_number(page, elem_id, value)
    page.locator("#img2img_denoising_strength input[type=number]").fill("0.9")
    page.locator("#img2img_denoising_strength input[type=number]").press("Tab")
    page.locator("#img2img_generate").click()

    infotext = page.locator("#img2img_infotext")
    infotext.get_by_text("Mask blur: 0", exact=False).wait_for(timeout=120000)
    page.locator("#img2img_gallery img").first.wait_for(timeout=60000)
    text = infotext.inner_text()
    assert "a lighthouse" in text and "Seed: 4321" in text and "Mask mode: Inpaint masked" in text
    assert "Size: 64x64" in text and "Denoising strength: 0.9" in text
    page.screenshot(path=str(tmp_path / "inpaint-result.png"), full_page=True)

    saved = list((img2img_server.data_dir / "outputs" / "img2img-images").rglob("*-4321.png"))
    assert len(saved) == 1
    out = np.asarray(Image.open(saved[0]).convert("RGB"), dtype=np.int16)
    from modules.core.masking import resize_image

    expected = np.asarray(resize_image(gradient(), 64, 64, 0), dtype=np.int16)
    # Inpainted: the stroke across the middle changed, the corners (never painted) did not.
    assert (np.abs(out[28:36, 24:40] - expected[28:36, 24:40]) > 0).any()
    for ys, xs in ((slice(0, 8), slice(0, 8)), (slice(56, 64), slice(56, 64))):
        assert np.array_equal(out[ys, xs], expected[ys, xs])


def test_png_info_send_to_txt2img_fills_the_fields_and_picks_the_checkpoint(img2img_server, page, tmp_path):
    from modules.core import saving as images

    other = img2img_server.data_dir / "models" / "Stable-diffusion" / "zz-other-sd1.safetensors"
    shorthash = hashlib.sha256(other.read_bytes()).hexdigest()[:10]
    info = ("a photo of a lighthouse, (dusk:1.2)\nNegative prompt: fog\n"
            "Steps: 7, Sampler: Euler a, Schedule type: Automatic, CFG scale: 5.5, Seed: 98765, Size: 64x96, "
            f"Model hash: {shorthash}, Model: zz-other-sd1, Clip skip: 2, Version: v1.10.1")
    png = images.save_image(gradient(64), tmp_path, seed=98765, info=info).path

    page.goto(img2img_server.url + "/")
    page.get_by_role("tab", name="PNG Info").click(timeout=60000)
    page.locator("#pnginfo_image input[type=file]").set_input_files(str(png))
    page.locator("#pnginfo_html_info").get_by_text("Seed: 98765", exact=False).wait_for(timeout=60000)
    page.screenshot(path=str(tmp_path / "pnginfo.png"), full_page=True)

    page.locator("#pnginfo_send_to_txt2img").click()
    prompt = page.locator("#txt2img_prompt textarea")
    prompt.wait_for(state="visible", timeout=60000)
    page.wait_for_function(
        "() => document.querySelector('#txt2img_prompt textarea').value.startsWith('a photo of a lighthouse')",
        timeout=60000)
    assert prompt.input_value() == "a photo of a lighthouse, (dusk:1.2)"
    assert page.locator("#txt2img_neg_prompt textarea").input_value() == "fog"
    assert page.locator("#txt2img_seed input").input_value() == "98765"
    assert page.locator("#txt2img_steps input[type=number]").input_value() == "7"
    assert page.locator("#txt2img_cfg_scale input[type=number]").input_value() == "5.5"
    assert page.locator("#txt2img_height input[type=number]").input_value() == "96"
    assert page.locator("#txt2img_sampling input").input_value() == "Euler a"
    # Clip skip is a setting: it comes back as an override for the next generation.
    assert "Clip skip: 2" in page.locator("#txt2img_override_settings").inner_text(timeout=10000)
    # The checkpoint named by the hash is selected and loaded.
    page.wait_for_function(
        "() => (document.querySelector('#setting_sd_model_checkpoint input') || {}).value?.includes('zz-other-sd1')",
        timeout=60000)
    page.screenshot(path=str(tmp_path / "pnginfo-sent.png"), full_page=True)

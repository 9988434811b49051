"""img2img and PNG Info in a real headless Chromium against the real server (tiny sd1 checkpoints)."""
from __future__ import annotations

import hashlib
import io
import time

import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import expect

from conftest import set_number

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


def upload_to_editor(page, editor, path) -> None:
    # Gradio 6's ImageEditor: clicking its empty canvas opens the file chooser.
    with page.expect_file_chooser(timeout=60000) as chooser:
        editor.get_by_text("Upload an image").click(timeout=60000)
    chooser.value.set_files(str(path))


def wait_for_editor_tool(page, elem_id: str, tool: str, *extra_buttons: str, timeout: float = 60000) -> None:
    """Wait until the ImageEditor `elem_id` has its drawing canvas laid out and sized and `tool` (a toolbar
    button's label) selected. The editor selects "Image" once its canvases are ready, and "Brush" only at
    the end of an upload, after the picture is added to them and the view is zoomed to fit it;
    `extra_buttons` are the labels of the tool's options, shown with it."""
    page.wait_for_function(
        """([id, tool, extra]) => {
            const ed = document.getElementById(id);
            const canvas = ed && ed.querySelector('canvas');
            const button = ed && ed.querySelector(`button[aria-label="${tool}"]`);
            return !!(canvas && canvas.width > 0 && canvas.height > 0 && canvas.clientWidth > 0
                      && canvas.clientHeight > 0 && button && button.classList.contains('highlight')
                      && extra.every((label) => ed.querySelector(`button[aria-label="${label}"]`)));
        }""", arg=[elem_id, tool, list(extra_buttons)], timeout=timeout)


def canvas_pixels(canvas) -> np.ndarray:
    """What the canvas shows on screen (RGB, one row per CSS pixel: the viewport's scale is 1)."""
    return np.asarray(Image.open(io.BytesIO(canvas.screenshot())).convert("RGB"), dtype=np.int16)


def wait_for_canvas(canvas, shows, what: str, timeout_s: float = 60) -> np.ndarray:
    """Screenshot the canvas until two shots in a row are the same picture and `shows(picture)` holds: the
    canvas is drawn and settled (every screenshot waits for a new frame, so this is no fixed sleep)."""
    deadline = time.monotonic() + timeout_s
    previous = None
    while True:
        shot = canvas_pixels(canvas)
        if previous is not None and np.array_equal(shot, previous) and shows(shot):
            return shot
        if time.monotonic() > deadline:
            raise AssertionError(f"the editor's canvas did not show {what} within {timeout_s:.0f}s")
        previous = shot


def test_sub_tab_choice_is_kept_in_the_page_without_a_server_answer(img2img_server, page):
    """Gradio fires a select for the first sub-tab when img2img mounts. Answered by the server, that event and
    the user's click a moment later could complete in either order: the late one left the Inpaint tab open
    with its controls hidden and the mode at img2img (a flaky failure, seen in CI). The choice is now made in
    the page, in click order, and no select reaches the server."""
    joins = []
    page.on("request", lambda r: joins.append(r.post_data or "") if "/queue/join" in r.url else None)
    page.goto(img2img_server.url + "/")
    page.get_by_role("tab", name="img2img", exact=True).click(timeout=60000)
    mode = page.locator("#img2img_mode input")
    for label, index, inpaint in (("Inpaint", 2, True), ("Sketch", 1, False), ("Inpaint upload", 4, True),
                                  ("img2img", 0, False)):
        page.locator("#mode_img2img").get_by_role("tab", name=label, exact=True).click(timeout=60000)
        expect(mode).to_have_value(str(index), timeout=60000)
        expect(page.locator("#img2img_mask_blur")).to_be_visible(visible=inpaint, timeout=60000)
    page.get_by_role("tab", name="Resize by", exact=True).click(timeout=60000)
    expect(page.locator("#img2img_scale_tab input")).to_have_value("1", timeout=60000)
    # Only "Resize by" asks the server for its size preview; no sub-tab select went there.
    sub_tab_selects = [body for body in joins for label in ("img2img", "Sketch", "Inpaint", "Inpaint upload")
                       if f'"event_data":{{"value":"{label}"' in body]
    assert joins and not sub_tab_selects, joins


def test_inpaint_a_stroke_drawn_with_the_mouse(img2img_server, page, tmp_path):
    source = tmp_path / "source.png"
    gradient().save(source)
    page.goto(img2img_server.url + "/")
    page.get_by_role("tab", name="img2img", exact=True).click(timeout=60000)
    page.get_by_role("tab", name="Inpaint", exact=True).click(timeout=60000)
    editor = page.locator("#img2maskimg")
    editor.wait_for(timeout=60000)
    # The server answers the sub-tab's select event: the inpaint controls appear and the mode becomes inpaint.
    page.locator("#img2img_mask_blur").wait_for(timeout=120000)
    wait_for_editor_tool(page, "img2maskimg", "Image")  # the editor's canvases are ready for a picture
    upload_to_editor(page, editor, source)
    # The upload is done (picture added, view fitted, brush selected), and the canvas shows the picture and
    # has stopped changing: its middle is the gradient's grey, where the stroke goes.
    wait_for_editor_tool(page, "img2maskimg", "Brush", "Brush Size")
    canvas = editor.locator("canvas").first
    size = canvas.bounding_box()
    mid_x, mid_y = int(size["width"] / 2), int(size["height"] / 2)
    wait_for_canvas(canvas, lambda shot: (np.abs(shot[mid_y, mid_x] - 128) <= 16).all(), "the uploaded picture")

    # A short horizontal stroke through the middle of the picture (the brush is the active tool). The
    # screenshots scrolled the canvas into view: the mouse goes where it is now.
    box = canvas.bounding_box()
    cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(cx - 30, cy)
    page.mouse.down()
    for dx in range(-30, 31, 6):
        page.mouse.move(cx + dx, cy, steps=2)
    page.mouse.up()
    # The stroke is committed to the mask layer: the editor shows it in white (its one brush colour) once the
    # mouse is released (a stroke the editor drops disappears with its preview).
    wait_for_canvas(canvas, lambda shot: (shot[mid_y - 2:mid_y + 3, mid_x - 25:mid_x + 26] >= 245).all(),
                    "the white stroke")
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

    page.locator("#pnginfo_send_to_txt2img").click(timeout=60000)
    prompt = page.locator("#txt2img_prompt textarea")
    prompt.wait_for(state="visible", timeout=60000)
    page.wait_for_function(
        "() => document.querySelector('#txt2img_prompt textarea').value.startsWith('a photo of a lighthouse')",
        timeout=60000)
    # One server answer fills every field; each is checked once the page shows it.
    expect(prompt).to_have_value("a photo of a lighthouse, (dusk:1.2)", timeout=60000)
    expect(page.locator("#txt2img_neg_prompt textarea")).to_have_value("fog", timeout=60000)
    expect(page.locator("#txt2img_seed input")).to_have_value("98765", timeout=60000)
    expect(page.locator("#txt2img_steps input[type=number]")).to_have_value("7", timeout=60000)
    expect(page.locator("#txt2img_cfg_scale input[type=number]")).to_have_value("5.5", timeout=60000)
    expect(page.locator("#txt2img_height input[type=number]")).to_have_value("96", timeout=60000)
    expect(page.locator("#txt2img_sampling input")).to_have_value("Euler a", timeout=60000)
    # Clip skip is a setting: it comes back as an override for the next generation.
    expect(page.locator("#txt2img_override_settings")).to_contain_text("Clip skip: 2", use_inner_text=True,
                                                                        timeout=60000)
    # The checkpoint named by the hash is selected and loaded.
    page.wait_for_function(
        "() => (document.querySelector('#setting_sd_model_checkpoint input') || {}).value?.includes('zz-other-sd1')",
        timeout=60000)
    page.screenshot(path=str(tmp_path / "pnginfo-sent.png"), full_page=True)

"""The ControlNet accordion in a real headless Chromium against the real server (tiny SD1 + tiny ControlNet)."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from conftest import set_number

pytestmark = pytest.mark.browser

U0 = "txt2img_controlnet_ControlNet-0_"
U1 = "txt2img_controlnet_ControlNet-1_"


@pytest.fixture(scope="module")
def cn_server(tmp_path_factory):
    from conftest import start_server
    from tiny_controlnets import make_controlnet
    from tiny_models import make_checkpoint

    data_dir = tmp_path_factory.mktemp("browser-controlnet")
    make_checkpoint(data_dir / "models" / "Stable-diffusion" / "tiny-sd1.safetensors", "sd1")
    make_controlnet(data_dir / "models" / "ControlNet" / "control_tiny.safetensors", "sd1")
    srv = start_server(data_dir)
    yield srv
    srv.stop()


def choose(page, elem_id: str, option: str) -> None:
    page.locator(f"#{elem_id} input").click()
    page.get_by_role("option", name=option).first.click()


def test_accordion_preview_generate_and_paste(cn_server, page, tmp_path):
    from playwright.sync_api import expect

    source = tmp_path / "hint.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(source)
    page.goto(cn_server.url + "/")
    page.locator("#txt2img_controlnet").get_by_text("ControlNet", exact=True).first.click()
    for i in range(3):
        expect(page.get_by_role("tab", name=f"ControlNet Unit {i}")).to_be_visible()
    page.locator(f"#{U0}controlnet_input_image input[type=file]").set_input_files(str(source))
    page.locator(f"#{U0}controlnet_input_image img").first.wait_for()
    choose(page, f"{U0}controlnet_preprocessor_dropdown", "invert")
    page.locator(f"#{U0}controlnet_trigger_preprocessor").click()
    page.locator(f"#{U0}controlnet_generated_image img").first.wait_for()
    expect(page.locator(f"#{U0}controlnet_preprocessor_preview_checkbox input")).to_be_checked()

    page.locator(f"#{U0}controlnet_enable_checkbox input").check()
    choose(page, f"{U0}controlnet_model_dropdown", "control_tiny")
    page.locator("#txt2img_prompt textarea").fill("a cat")
    for elem_id, value in (("txt2img_width", "64"), ("txt2img_height", "64"), ("txt2img_steps", "2"),
                           ("txt2img_seed", "77")):
        set_number(page, elem_id, value)
    page.locator("#txt2img_generate").click()
    infotext = page.locator("#txt2img_infotext")
    infotext.get_by_text('ControlNet 0: "Module: invert, Model: control_tiny [', exact=False).wait_for(timeout=180000)
    page.screenshot(path=str(tmp_path / "controlnet-result.png"), full_page=True)

    # ↙ with an infotext in the prompt box restores the units it names.
    page.locator("#txt2img_prompt textarea").fill(
        'a dog\nSteps: 2, Sampler: Euler, Seed: 5, Size: 64x64, ControlNet 1: "Module: invert, Model: control_tiny, '
        'Weight: 0.55, Resize Mode: Just Resize, Processor Res: 512, Threshold A: -1, Threshold B: -1, '
        'Guidance Start: 0.1, Guidance End: 0.9, Pixel Perfect: False, Control Mode: ControlNet is more important"')
    page.locator("#txt2img_paste").click()
    expect(page.locator(f"#{U0}controlnet_enable_checkbox input")).not_to_be_checked(timeout=60000)
    page.get_by_role("tab", name="ControlNet Unit 1").click()
    expect(page.locator(f"#{U1}controlnet_enable_checkbox input")).to_be_checked(timeout=60000)
    expect(page.locator(f"#{U1}controlnet_control_weight_slider input[type=number]")).to_have_value("0.55")
    expect(page.locator(f"#{U1}controlnet_model_dropdown input")).to_have_value("control_tiny")
    expect(page.locator(f"#{U1}controlnet_ending_control_step_slider input[type=number]")).to_have_value("0.9")
    page.screenshot(path=str(tmp_path / "controlnet-pasted.png"), full_page=True)

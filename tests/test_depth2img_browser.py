"""img2img's depth map input for SD2 depth models, in a real headless Chromium against the real server."""
from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import requests
from PIL import Image, ImageDraw

from conftest import set_number

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def depth_server(tmp_path_factory):
    from conftest import start_server
    from tiny_models import make_checkpoint

    data_dir = tmp_path_factory.mktemp("browser-depth2img")
    make_checkpoint(data_dir / "models" / "Stable-diffusion" / "tiny-depth.safetensors", "sd2-depth", yaml=True)
    srv = start_server(data_dir, "--api")
    yield srv
    srv.stop()


def b64(path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def test_a_depth_map_uploaded_in_img2img_drives_the_depth_model(depth_server, page, tmp_path):
    init, depth = tmp_path / "init.png", tmp_path / "depth.png"
    picture = Image.new("RGB", (64, 64), (120, 130, 140))
    ImageDraw.Draw(picture).ellipse((10, 10, 50, 50), fill=(220, 40, 40))
    picture.save(init)
    Image.linear_gradient("L").resize((64, 64)).save(depth)

    page.goto(depth_server.url + "/")
    page.get_by_role("tab", name="img2img", exact=True).click(timeout=60000)
    page.locator("#img2img_image input[type=file]").set_input_files(str(init))
    page.locator("#img2img_prompt textarea").fill("a room")
    for elem_id, value in (("img2img_width", "64"), ("img2img_height", "64"), ("img2img_steps", "2"),
                           ("img2img_seed", "4321")):
        set_number(page, elem_id, value)

    # No depth map and no estimator: the error says what to supply or install, and where.
    page.locator("#img2img_generate").click()
    page.get_by_text("needs a depth map of the init image", exact=False).wait_for(timeout=120000)
    assert "models/depth/dpt-hybrid-midas" in page.content()

    page.get_by_text("Depth map (SD2 depth models)").click()
    page.locator("#img2img_depth_image input[type=file]").set_input_files(str(depth))
    page.locator("#img2img_depth_image img").first.wait_for(timeout=60000)  # the upload is in the component
    page.locator("#img2img_generate").click()
    infotext = page.locator("#img2img_infotext")
    infotext.get_by_text("Seed: 4321", exact=False).wait_for(timeout=120000)
    page.screenshot(path=str(tmp_path / "depth2img-result.png"), full_page=True)
    saved = list((depth_server.data_dir / "outputs" / "img2img-images").rglob("*-4321.png"))
    assert len(saved) == 1
    from_ui = np.asarray(Image.open(saved[0]).convert("RGB"))

    # The same request through the API, with the same map and with another: the UI's image is the first.
    body = {"prompt": "a room", "width": 64, "height": 64, "steps": 2, "seed": 4321, "denoising_strength": 0.75,
            "sampler_name": "DPM++ 2M", "scheduler": "Automatic", "cfg_scale": 7, "init_images": [b64(init)]}

    def api(depth_b64: str) -> np.ndarray:
        response = requests.post(f"{depth_server.url}/sdapi/v1/img2img", json={**body, "depth_image": depth_b64},
                                 timeout=300)
        assert response.status_code == 200, response.text
        return np.asarray(Image.open(io.BytesIO(base64.b64decode(response.json()["images"][0]))).convert("RGB"))

    flipped = tmp_path / "flipped.png"
    Image.open(depth).transpose(Image.Transpose.FLIP_TOP_BOTTOM).save(flipped)
    assert np.array_equal(from_ui, api(b64(depth)))
    assert not np.array_equal(from_ui, api(b64(flipped)))

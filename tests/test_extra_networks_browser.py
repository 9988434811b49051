"""The Extra Networks browser in a real headless Chromium against a real server, and its preview route attacked."""
from __future__ import annotations

import json

import pytest
import requests
import torch
from PIL import Image
from safetensors.torch import save_file

from conftest import start_server

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def en_server(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("extra-networks")
    lora = data_dir / "models" / "Lora"
    (lora / "styles").mkdir(parents=True)
    freq = {"10_ink": {"inked lines": 9, "paper": 2}}
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32),
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(32, 4)},
              str(lora / "styles" / "inkwash.safetensors"),
              metadata={"ss_network_dim": "4", "ss_output_name": "inkwash_v2", "ss_tag_frequency": json.dumps(freq)})
    save_file({"x.lora_down.weight": torch.zeros(1, 1)}, str(lora / "toplevel.safetensors"))
    (lora / "styles" / "inkwash.json").write_text(json.dumps({"preferred weight": 0.6, "activation text": "ink wash"}))
    Image.new("RGB", (32, 32), (10, 90, 200)).save(lora / "styles" / "inkwash.preview.png")
    from tiny_models import make_checkpoint

    make_checkpoint(data_dir / "models" / "Stable-diffusion" / "tiny-a.safetensors", "sd1", seed=0)
    make_checkpoint(data_dir / "models" / "Stable-diffusion" / "tiny-b.safetensors", "sd1", seed=1)
    Image.new("RGB", (8, 8), (255, 0, 0)).save(data_dir / "secret.png")
    srv = start_server(data_dir)
    yield srv
    srv.stop()


def _open_lora_page(page, url: str, tab: str = "txt2img"):
    page.goto(url + "/")
    page.locator("#txt2img_prompt textarea").wait_for()
    if tab != "txt2img":
        page.locator("#tabs").get_by_role("tab", name=tab, exact=True).click()
        page.locator(f"#{tab}_prompt textarea").wait_for()
    page.locator(f"#{tab}_extra_networks").click()
    page.locator(f"#{tab}_extra_tabs").get_by_role("tab", name="Lora").click()
    card = page.locator(f"#{tab}_lora_cards .card[data-name='inkwash']")
    card.wait_for()
    return card


def test_clicking_a_lora_card_adds_its_tag_and_clicking_again_removes_it(en_server, page):
    card = _open_lora_page(page, en_server.url)
    # The preview is served from beside the file and really loads.
    image = card.locator("img")
    page.wait_for_function("img => img.complete && img.naturalWidth === 32", arg=image.element_handle())
    prompt = page.locator("#txt2img_prompt textarea")
    prompt.fill("a harbour at dawn")
    card.click()
    page.wait_for_function(
        "() => document.querySelector('#txt2img_prompt textarea').value === "
        "'a harbour at dawn <lora:inkwash:0.6> ink wash'")
    card.click()
    page.wait_for_function(
        "() => document.querySelector('#txt2img_prompt textarea').value === 'a harbour at dawn'")


def test_the_img2img_tab_has_the_browser_too(en_server, page):
    card = _open_lora_page(page, en_server.url, "img2img")
    card.click()
    page.wait_for_function(
        "() => document.querySelector('#img2img_prompt textarea').value === '<lora:inkwash:0.6> ink wash'")


def test_search_filters_the_cards(en_server, page):
    card = _open_lora_page(page, en_server.url)
    page.locator("#txt2img_lora_extra_search textarea, #txt2img_lora_extra_search input").first.fill("nothing-like-it")
    card.wait_for(state="detached")
    page.locator("#txt2img_lora_cards .nocards").wait_for()
    page.locator("#txt2img_lora_extra_search textarea, #txt2img_lora_extra_search input").first.fill("ink")
    page.locator("#txt2img_lora_cards .card[data-name='inkwash']").wait_for()
    page.locator("#txt2img_lora_extra_search textarea, #txt2img_lora_extra_search input").first.fill("")
    top = page.locator("#txt2img_lora_cards .card[data-name='toplevel']")
    top.wait_for()


def test_the_folder_view_filters_by_folder(en_server, page):
    _open_lora_page(page, en_server.url)
    top = page.locator("#txt2img_lora_cards .card[data-name='toplevel']")
    top.wait_for()
    page.locator("#txt2img_lora_extra_tree_view").get_by_text("📁 styles").click()
    top.wait_for(state="detached")
    page.locator("#txt2img_lora_cards .card[data-name='inkwash']").wait_for()
    page.locator("#txt2img_lora_extra_tree_view").get_by_text("All", exact=True).click()
    top.wait_for()
    # Sorting by name, descending: toplevel comes before inkwash.
    page.locator("#txt2img_lora_extra_sortorder").click()
    page.get_by_role("option", name="Descending").click()
    page.wait_for_function("() => [...document.querySelectorAll('#txt2img_lora_cards .card')]"
                           ".map(c => c.dataset.name).join(',') === 'toplevel,inkwash'")


def test_editing_user_metadata_saves_name_json_and_shows_training_metadata(en_server, page):
    card = _open_lora_page(page, en_server.url)
    card.hover()
    card.locator(".edit-button").click()
    editor = page.locator("#txt2img_extra_networks_editor")
    editor.wait_for()
    # The training metadata view: kohya fields and the tag frequency.
    page.locator("#txt2img_extra_networks_editor_metadata").get_by_text("ss_network_dim").wait_for()
    page.locator("#txt2img_extra_networks_editor_metadata").get_by_text("inked lines").wait_for()
    activation = page.locator("#txt2img_extra_networks_editor_activation_text textarea, "
                              "#txt2img_extra_networks_editor_activation_text input").first
    assert activation.input_value() == "ink wash"
    page.locator("#txt2img_extra_networks_editor_description textarea").fill("Soft ink wash look")
    activation.fill("ink wash, sumi-e")
    page.locator("#txt2img_extra_networks_editor_notes textarea").fill("Works best at 0.6")
    page.locator("#txt2img_extra_networks_editor_save").click()
    page.locator("#txt2img_extra_networks_status").get_by_text("Saved inkwash.").wait_for()
    saved = json.loads((en_server.data_dir / "models" / "Lora" / "styles" / "inkwash.json").read_text())
    assert saved["description"] == "Soft ink wash look" and saved["activation text"] == "ink wash, sumi-e"
    assert saved["notes"] == "Works best at 0.6" and saved["preferred weight"] == 0.6
    # The card now carries the new activation text.
    page.locator("#txt2img_prompt textarea").fill("")
    page.locator("#txt2img_lora_cards .card[data-name='inkwash']").click()
    page.wait_for_function(
        "() => document.querySelector('#txt2img_prompt textarea').value === '<lora:inkwash:0.6> ink wash, sumi-e'")


def test_previews_are_served_only_from_inside_the_network_roots(en_server):
    thumb = en_server.url + "/sd_extra_networks/thumb"
    ok = requests.get(thumb, params={"page": "lora", "item": "styles/inkwash.safetensors"}, timeout=30)
    assert ok.status_code == 200 and ok.headers["content-type"] == "image/png"
    lora_dir = en_server.data_dir / "models" / "Lora"
    assert requests.get(thumb, params={"filename": str(lora_dir / "styles" / "inkwash.preview.png")},
                        timeout=30).status_code == 200
    attacks = [
        {"page": "lora", "item": "../../secret.png"},
        {"page": "lora", "item": "../../../etc/passwd"},
        {"page": "lora", "item": "styles/../../../secret.png"},
        {"page": "lora", "item": "styles/inkwash.preview.png"},
        {"page": "../lora", "item": "styles/inkwash.safetensors"},
        {"filename": str(en_server.data_dir / "secret.png")},
        {"filename": str(lora_dir / ".." / ".." / "secret.png")},
        {"filename": str(lora_dir / "styles" / "inkwash.safetensors")},
        {"filename": "/etc/passwd"},
    ]
    for params in attacks:
        r = requests.get(thumb, params=params, timeout=30)
        assert r.status_code == 404, (params, r.status_code)
    raw = requests.get(en_server.url + "/sd_extra_networks/thumb?page=lora&item=..%2F..%2Fsecret.png", timeout=30)
    assert raw.status_code == 404


def test_previews_need_the_ui_login(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("extra-networks-login")
    lora = data_dir / "models" / "Lora"
    lora.mkdir(parents=True)
    save_file({"x.lora_down.weight": torch.zeros(1, 1)}, str(lora / "a.safetensors"))
    Image.new("RGB", (8, 8)).save(lora / "a.png")
    srv = start_server(data_dir, "--gradio-auth", "ann:pw1")
    try:
        r = requests.get(srv.url + "/sd_extra_networks/thumb", params={"page": "lora", "item": "a.safetensors"},
                         timeout=30, allow_redirects=False)
        # Without the login session: the login page (or a redirect/refusal), never the image.
        assert not r.content.startswith(b"\x89PNG") and "image" not in r.headers.get("content-type", "")
        session = requests.Session()
        assert session.post(srv.url + "/login", data={"username": "ann", "password": "pw1"},
                            timeout=30).status_code == 200
        r = session.get(srv.url + "/sd_extra_networks/thumb", params={"page": "lora", "item": "a.safetensors"},
                        timeout=30)
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    finally:
        srv.stop()


def test_replace_preview_saves_the_generated_image_beside_the_lora(en_server, page):
    import numpy as np

    page.goto(en_server.url + "/")
    page.locator("#txt2img_prompt textarea").wait_for()
    page.locator("#txt2img_prompt textarea").fill("a lighthouse")
    for elem_id, value in (("txt2img_width", "64"), ("txt2img_height", "64"), ("txt2img_steps", "2"),
                           ("txt2img_seed", "4242")):
        box = page.locator(f"#{elem_id} input[type=number]")
        box.fill(value)
        box.press("Tab")
    page.locator("#txt2img_generate").click()
    page.locator("#txt2img_gallery img").first.wait_for()
    page.locator("#txt2img_extra_networks").click()
    page.locator("#txt2img_extra_tabs").get_by_role("tab", name="Lora").click()
    card = page.locator("#txt2img_lora_cards .card[data-name='inkwash']")
    card.hover()
    card.locator(".edit-button").click()
    page.locator("#txt2img_extra_networks_editor_replace_preview").click()
    page.locator("#txt2img_extra_networks_status").get_by_text("Preview saved as inkwash.preview.png.").wait_for()
    saved = list((en_server.data_dir / "outputs" / "txt2img-images").rglob("*-4242.png"))
    assert len(saved) == 1
    preview = en_server.data_dir / "models" / "Lora" / "styles" / "inkwash.preview.png"
    got = np.asarray(Image.open(preview).convert("RGB"))
    assert np.array_equal(got, np.asarray(Image.open(saved[0]).convert("RGB")))
    # The card shows the new preview (64x64 now, the old one was 32x32).
    image = page.locator("#txt2img_lora_cards .card[data-name='inkwash'] img")
    page.wait_for_function("img => img.complete && img.naturalWidth === 64", arg=image.element_handle())


def test_a_checkpoint_card_switches_the_model(en_server, page):
    import time

    page.goto(en_server.url + "/")
    page.locator("#txt2img_prompt textarea").wait_for()
    page.locator("#txt2img_extra_networks").click()
    page.locator("#txt2img_extra_tabs").get_by_role("tab", name="Checkpoints").click()
    page.locator("#txt2img_checkpoints_cards .card[data-name='tiny-b']").click()
    page.locator("#txt2img_extra_networks_status").get_by_text("Loading checkpoint tiny-b.safetensors").wait_for()
    config = en_server.data_dir / "config.json"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:   # the switch is a queued job: wait for it to be saved
        if config.exists() and "tiny-b" in json.loads(config.read_text()).get("sd_model_checkpoint", ""):
            break
        time.sleep(0.2)
    assert "tiny-b" in json.loads(config.read_text())["sd_model_checkpoint"]

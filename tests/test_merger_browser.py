"""The Checkpoint Merger tab in a real headless Chromium against the real server (tiny sd1 checkpoints)."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def merge_server(tmp_path_factory):
    from conftest import start_server
    from tiny_models import make_checkpoint

    data_dir = tmp_path_factory.mktemp("browser-merge")
    ckpt_dir = data_dir / "models" / "Stable-diffusion"
    make_checkpoint(ckpt_dir / "alpha.safetensors", "sd1", seed=1)
    make_checkpoint(ckpt_dir / "beta.safetensors", "sd1", seed=2)
    srv = start_server(data_dir)
    yield srv
    srv.stop()


def pick(page, elem_id: str, option_prefix: str) -> None:
    page.locator(f"#{elem_id} input").click()
    page.get_by_role("option").filter(has_text=option_prefix).first.click()


def test_merging_in_the_tab_saves_the_model_and_lists_it(merge_server, page):
    page.goto(merge_server.url + "/")
    page.get_by_role("tab", name="Checkpoint Merger", exact=True).click(timeout=120000)
    page.locator("#modelmerger_primary_model_name input").wait_for(timeout=120000)
    pick(page, "modelmerger_primary_model_name", "alpha.safetensors")
    pick(page, "modelmerger_secondary_model_name", "beta.safetensors")
    page.locator("#modelmerger_custom_name textarea").fill("from-the-tab")
    box = page.locator("#modelmerger_interp_amount input[type=number]")
    box.fill("0.5")
    box.press("Tab")
    page.locator("#modelmerger_save_as_half input").check()
    page.locator("#modelmerger_merge").click()
    result = page.locator("#modelmerger_result")
    try:
        result.get_by_text("Checkpoint saved to", exact=False).wait_for(timeout=120000)
    except Exception as err:
        raise AssertionError(f"no result; the tab shows {result.inner_text()!r}; server output:\n"
                             f"{merge_server.output[-3000:]}") from err
    ckpt_dir = merge_server.data_dir / "models" / "Stable-diffusion"
    merged = load_file(ckpt_dir / "from-the-tab.safetensors")
    a, b = load_file(ckpt_dir / "alpha.safetensors"), load_file(ckpt_dir / "beta.safetensors")
    key = "model.diffusion_model.out.2.weight"
    assert torch.equal(merged[key], (a[key].float() * 0.5 + b[key].float() * 0.5).half())
    # the new checkpoint is a choice at once: in this tab's lists, and for generation via the API's list
    page.locator("#modelmerger_primary_model_name input").click()
    page.get_by_role("option").filter(has_text="from-the-tab.safetensors").first.wait_for(timeout=60000)
    page.keyboard.press("Escape")
    # a second merge under the same name is refused with a message, and the file is kept
    page.locator("#modelmerger_merge").click()
    result.get_by_text("already exists", exact=False).wait_for(timeout=120000)
    assert torch.equal(load_file(ckpt_dir / "from-the-tab.safetensors")[key], merged[key])

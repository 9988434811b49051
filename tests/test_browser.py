"""A real headless Chromium against the real server."""
import json

import pytest

pytestmark = pytest.mark.browser


def test_page_shows_the_tabs(server, page, tmp_path):
    page.goto(server.url + "/")
    page.get_by_role("tab", name="Settings").wait_for(timeout=30000)
    tabs = [t.strip() for t in page.locator("#tabs > .tab-wrapper [role=tab]").all_inner_texts()]
    assert "Settings" in tabs
    page.screenshot(path=str(tmp_path / "home.png"), full_page=True)
    assert (tmp_path / "home.png").stat().st_size > 0


def test_settings_apply_persists_to_config_json(server, page):
    page.goto(server.url + "/")
    page.get_by_role("tab", name="Settings").click()
    checkbox = page.locator("#setting_save_txt input[type=checkbox]")
    checkbox.wait_for(timeout=30000)
    assert not checkbox.is_checked()
    checkbox.check()
    page.locator("#settings_submit").click()
    page.locator("#settings_result").get_by_text("1 settings changed: save_txt.").wait_for(timeout=30000)
    saved = json.loads((server.data_dir / "config.json").read_text())
    assert saved["save_txt"] is True

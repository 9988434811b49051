"""A1111's ``sd_hypernetwork`` setting ("Add hypernetwork to prompt"): a hypernetwork added to every prompt.

Real job path on the tiny SD1 checkpoint with A1111-format hypernetwork files; the settings dropdown and the
API. The twin of tests/test_lora_setting.py (both settings are core/network_settings.py).
"""
from __future__ import annotations

import logging

import numpy as np
import pytest

from lora_fixtures import hypernetwork, kohya_lora
from modules.core.infotext import parse_infotext
from modules.core.pipeline import Txt2ImgParams
from network_setting_checks import (SMALL, api_job_info, check_added_as_written, check_dropdown, check_settings_tab,
                                    pixels, run, setting)
from test_processing import make_services

WIDTHS = (32, 64)   # the tiny SD1's context width and a self-attention width


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    services = make_services(tmp_path_factory.mktemp("hypernetwork-setting"), "sd1")
    folder = services.paths.hypernetwork_dir
    hypernetwork(folder / "hn.pt", WIDTHS)
    hypernetwork(folder / "other.pt", WIDTHS, seed=3)
    kohya_lora(services.paths.lora_dir / "style.safetensors", services.models.current().pipe)
    yield services
    services.generation.queue.shutdown()


def test_the_setting_applies_its_hypernetwork_as_if_the_tag_were_written(sd1):
    check_added_as_written(sd1, "sd_hypernetwork", "hn", "hypernet")


def test_a_hypernetwork_already_in_the_prompt_is_not_added_twice(sd1):
    for prompt in ("a cat <hypernet:hn:0.5>", "a cat <hypernet:HN:0.5>"):   # the name as a tag finds it
        plain = run(sd1, prompt)
        with setting(sd1, sd_hypernetwork="hn"):
            result = run(sd1, prompt)
        assert parse_infotext(result.infotexts[0])["Prompt"] == prompt
        assert np.array_equal(pixels(plain), pixels(result))
    with setting(sd1, sd_hypernetwork="hn"):   # another hypernetwork in the prompt: the setting's is still added
        both = run(sd1, "a cat <hypernet:other:1>")
    assert parse_infotext(both.infotexts[0])["Prompt"] == "a cat <hypernet:other:1><hypernet:hn:1.0>"
    assert np.array_equal(pixels(both), pixels(run(sd1, "a cat <hypernet:other:1> <hypernet:hn:1>")))


def test_with_sd_lora_both_are_added_hypernetwork_first(sd1):
    with setting(sd1, sd_hypernetwork="hn", sd_lora="style"):
        result = run(sd1, "a cat")
    fields = parse_infotext(result.infotexts[0])
    assert fields["Prompt"] == "a cat<hypernet:hn:1.0><lora:style:1.0>" and fields["Lora hashes"].startswith("style: ")
    assert np.array_equal(pixels(result), pixels(run(sd1, "a cat <hypernet:hn:1> <lora:style:1>")))


def test_none_changes_nothing_and_an_unknown_name_warns_and_still_makes_the_image(sd1, caplog):
    base = run(sd1, "a cat")
    with setting(sd1, sd_hypernetwork="None"):
        none = run(sd1, "a cat")
    assert np.array_equal(pixels(base), pixels(none)) and none.infotexts == base.infotexts
    with setting(sd1, sd_hypernetwork="nosuchnet"), caplog.at_level(logging.WARNING):
        unknown = run(sd1, "a cat")
    assert np.array_equal(pixels(base), pixels(unknown))
    assert "Setting 'Hypernetwork added to prompts' names nosuchnet" in unknown.comments
    assert "nosuchnet" in caplog.text   # the console too
    assert parse_infotext(unknown.infotexts[0])["Prompt"] == "a cat"
    with setting(sd1, sd_hypernetwork="hn"):   # A1111's "disable extra networks" turns the setting off too
        off = sd1.generation.txt2img(Txt2ImgParams(prompt="a cat", disable_extra_networks=True, **SMALL))
    assert np.array_equal(pixels(base), pixels(off))


def test_settings_dropdown_lists_the_hypernetwork_files_and_refreshes(sd1):
    check_dropdown(sd1, "sd_hypernetwork", ["hn", "other"],
                   lambda: hypernetwork(sd1.paths.hypernetwork_dir / "sub" / "late.pt", WIDTHS, seed=5), "late")


def test_the_api_accepts_the_setting_and_its_jobs_use_it(sd1):
    assert "a cat<hypernet:hn:1.0>" in api_job_info(sd1, "sd_hypernetwork", "hn")


def test_the_settings_tab_shows_a_dropdown_with_a_refresh_button(sd1):
    check_settings_tab(sd1, "sd_hypernetwork", "hn",
                       lambda: hypernetwork(sd1.paths.hypernetwork_dir / "fresh.pt", WIDTHS, seed=6), "fresh")

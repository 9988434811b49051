"""A1111's ``sd_lora`` setting ("Add network to prompt"): a LoRA added to every prompt of a job.

Real job path on the tiny SD1 checkpoint with a kohya LoRA file; the settings dropdown and the API.
"""
from __future__ import annotations

import numpy as np
import pytest

from lora_fixtures import kohya_lora
from modules.core.infotext import parse_infotext
from modules.core.pipeline import Txt2ImgParams
from network_setting_checks import (SMALL, api_job_info, check_added_as_written, check_dropdown, check_settings_tab,
                                    pixels, run, setting)
from test_processing import make_services


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    services = make_services(tmp_path_factory.mktemp("lora-setting"), "sd1")
    pipe = services.models.current().pipe
    kohya_lora(services.paths.lora_dir / "style.safetensors", pipe,
               metadata={"ss_output_name": "styleAlias", "ss_base_model_version": "sd_v1"})
    kohya_lora(services.paths.lora_dir / "other.safetensors", pipe, seed=3)
    yield services
    services.generation.queue.shutdown()


def test_the_setting_applies_its_lora_as_if_the_tag_were_written(sd1):
    added = check_added_as_written(sd1, "sd_lora", "style", "lora")
    assert all(parse_infotext(text)["Lora hashes"].startswith("style: ") for text in added.infotexts)


def test_a_lora_already_in_the_prompt_is_not_added_twice(sd1):
    for prompt in ("a cat <lora:style:0.5>", "a cat <lyco:styleAlias:0.5>"):   # by name or alias
        plain = run(sd1, prompt)
        with setting(sd1, sd_lora="style"):
            result = run(sd1, prompt)
        assert parse_infotext(result.infotexts[0])["Prompt"] == prompt
        assert np.array_equal(pixels(plain), pixels(result))
    with setting(sd1, sd_lora="style"):   # another LoRA in the prompt: the setting's one is still added
        both = run(sd1, "a cat <lora:other:1>")
    assert parse_infotext(both.infotexts[0])["Prompt"] == "a cat <lora:other:1><lora:style:1.0>"
    assert np.array_equal(pixels(both), pixels(run(sd1, "a cat <lora:other:1> <lora:style:1>")))


def test_none_changes_nothing_and_an_unknown_name_warns_and_still_makes_the_image(sd1):
    base = run(sd1, "a cat")
    with setting(sd1, sd_lora="None"):
        none = run(sd1, "a cat")
    assert np.array_equal(pixels(base), pixels(none)) and none.infotexts == base.infotexts
    with setting(sd1, sd_lora="nosuchlora"):
        unknown = run(sd1, "a cat")
    assert np.array_equal(pixels(base), pixels(unknown))
    assert "nosuchlora" in unknown.comments
    assert parse_infotext(unknown.infotexts[0])["Prompt"] == "a cat"
    with setting(sd1, sd_lora="style"):   # A1111's "disable extra networks" turns the setting off too
        off = sd1.generation.txt2img(Txt2ImgParams(prompt="a cat", disable_extra_networks=True, **SMALL))
    assert np.array_equal(pixels(base), pixels(off))


def test_settings_dropdown_lists_the_lora_files_and_refreshes(sd1):
    assert not sd1.options.templates["extra_networks_default_multiplier"].compat_only   # it has an effect now
    pipe = sd1.models.current().pipe
    check_dropdown(sd1, "sd_lora", ["other", "style"],
                   lambda: kohya_lora(sd1.paths.lora_dir / "sub" / "late.safetensors", pipe, seed=5), "late")


def test_the_api_accepts_the_setting_and_its_jobs_use_it(sd1):
    info = api_job_info(sd1, "sd_lora", "style")
    assert "a cat<lora:style:1.0>" in info and "Lora hashes" in info


def test_the_settings_tab_shows_a_dropdown_with_a_refresh_button(sd1):
    pipe = sd1.models.current().pipe
    check_settings_tab(sd1, "sd_lora", "style",
                       lambda: kohya_lora(sd1.paths.lora_dir / "fresh.safetensors", pipe, seed=6), "fresh")

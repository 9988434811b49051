import json

import pytest

from modules.core.options import OptionError, OptionInfo, Options, default_templates


def make(path):
    opts = Options(path, default_templates())
    return opts, opts.load()


def test_defaults_are_typed_and_readable_as_attributes(tmp_path):
    opts, warnings = make(tmp_path / "config.json")
    assert warnings == []
    assert opts.samples_format == "png"
    assert opts.CLIP_stop_at_last_layers == 1
    assert opts.sd_vae == "Automatic"
    with pytest.raises(AttributeError):
        opts.no_such_setting


def test_set_coerces_and_validates(tmp_path):
    opts, _ = make(tmp_path / "config.json")
    assert opts.set("jpeg_quality", "95") is True
    assert opts.jpeg_quality == 95
    assert opts.set("jpeg_quality", 95) is False  # unchanged
    with pytest.raises(OptionError, match="between 1 and 100"):
        opts.set("jpeg_quality", 1000)
    with pytest.raises(OptionError, match="expects a bool"):
        opts.set("samples_save", "maybe")
    with pytest.raises(OptionError, match="unknown setting"):
        opts.set("nope", 1)
    opts.CLIP_stop_at_last_layers = 2  # attribute assignment goes through set()
    assert opts.data["CLIP_stop_at_last_layers"] == 2


def test_save_is_atomic_json_and_reloads(tmp_path):
    path = tmp_path / "config.json"
    opts, _ = make(path)
    opts.set("samples_format", "webp")
    opts.save()
    assert json.loads(path.read_text())["samples_format"] == "webp"
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]  # no temp file left behind
    again, warnings = make(path)
    assert warnings == [] and again.samples_format == "webp"


def test_corrupt_config_is_backed_up_and_defaults_used(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{"samples_format": "jpg", ')  # truncated
    opts, warnings = make(path)
    assert len(warnings) == 1 and "could not be read" in warnings[0]
    assert opts.samples_format == "png"
    backups = list(tmp_path.glob("config.json.corrupt-*"))
    assert len(backups) == 1 and backups[0].read_text() == '{"samples_format": "jpg", '
    assert not path.exists()


def test_bad_single_value_is_reported_and_others_kept(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"jpeg_quality": "lots", "samples_format": "jpg"}))
    opts, warnings = make(path)
    assert opts.samples_format == "jpg" and opts.jpeg_quality == 80
    assert len(warnings) == 1 and "jpeg_quality" in warnings[0]


def test_unknown_keys_survive_a_save(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"some_extension_option": [1, 2], "samples_save": False}))
    opts, _ = make(path)
    opts.set("grid_save", False)
    opts.save()
    data = json.loads(path.read_text())
    assert data["some_extension_option"] == [1, 2] and data["samples_save"] is False and data["grid_save"] is False


def test_extension_style_add_option_and_onchange(tmp_path):
    opts, _ = make(tmp_path / "config.json")
    calls = []
    opts.add_option("my_ext_strength", OptionInfo(0.5, "Strength", None, {"minimum": 0, "maximum": 1},
                                                  onchange=lambda: calls.append(opts.my_ext_strength),
                                                  section=("my_ext", "My extension")))
    assert opts.my_ext_strength == 0.5
    opts.set("my_ext_strength", 0.75)
    assert calls == [0.75]
    assert ("my_ext", "My extension") in opts.sections()


def test_frozen_settings_refuse_changes(tmp_path):
    opts = Options(tmp_path / "c.json", default_templates(), frozen=True)
    with pytest.raises(OptionError, match="frozen"):
        opts.set("samples_format", "jpg")

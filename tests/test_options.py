import json

import pytest

from modules.core.options import COMPAT_NOTE, OptionError, OptionInfo, Options, default_templates


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


# --------------------------------------------------------------------------- A1111 1.10.1's whole key set

# (key, A1111 1.10.1 default): the value and its type must match.
A1111_SPOT_CHECK = [
    ("send_seed", True), ("send_size", True), ("js_modal_lightbox", True), ("show_progressbar", True),
    ("sd_vae_as_default", True), ("CLIP_stop_at_last_layers", 1), ("eta_noise_seed_delta", 0),
    ("img2img_fix_steps", False), ("samples_format", "png"), ("jpeg_quality", 80),
    ("sd_vae", "Automatic"), ("emphasis", "Original"), ("comma_padding_backtrack", 20),
    ("eta_ddim", 0.0), ("s_noise", 1.0), ("initial_noise_multiplier", 1.0), ("uni_pc_order", 3),
    ("img_downscale_threshold", 4.0), ("target_side_length", 4000), ("directories_filename_pattern", "[date]"),
    ("realesrgan_enabled_models", ["R-ESRGAN 4x+", "R-ESRGAN 4x+ Anime6B"]), ("hide_samplers", []),
    ("sd_lora", "None"), ("lora_preferred_name", "Alias from file"), ("canvas_hotkey_zoom", "Alt"),
    ("hypertile_max_tile_vae", 128), ("extra_options_cols", 1), ("upscaler_for_img2img", None),
    ("keyedit_delimiters", ".,\\/!?%^*;:{}=`~() "), ("beta_dist_alpha", 0.6),
]


def test_a1111_keys_are_all_registered_with_their_defaults_and_types(tmp_path):
    from modules.core.options_a1111 import DEFINED_IN_CORE, a1111_keys

    keys = [key for key, _ in default_templates()]
    assert len(keys) == len(set(keys)), "a key is registered twice"
    assert len(keys) >= 250
    assert a1111_keys() <= set(keys)
    core = {key for key, info in default_templates() if not info.compat_only and key not in ("outdir_grids",)}
    assert DEFINED_IN_CORE <= core
    opts, _ = make(tmp_path / "config.json")
    values = opts.as_dict()
    for key, default in A1111_SPOT_CHECK:
        assert values[key] == default and type(values[key]) is type(default), key


def test_core_definitions_win_over_the_a1111_table(tmp_path):
    opts, _ = make(tmp_path / "config.json")
    info = opts.templates["outdir_txt2img_samples"]
    assert info.default == "" and not info.compat_only  # ours: "" means our outputs folder
    assert opts.templates["randn_source"].current_choices() == ["GPU", "CPU", "NV"]
    assert opts.templates["samples_format"].label == "File format for images"


def test_compat_only_keys_are_marked_and_the_used_ones_are_not(tmp_path):
    opts, _ = make(tmp_path / "config.json")
    for key in ("send_seed", "js_modal_lightbox", "img2img_fix_steps", "hypertile_enable_unet"):
        info = opts.templates[key]
        assert info.compat_only and COMPAT_NOTE in info.comment_after, key
    for key in ("samples_format", "CLIP_stop_at_last_layers", "eta_noise_seed_delta", "sd_model_checkpoint",
                "outdir_grids", "live_previews_enable"):
        info = opts.templates[key]
        assert not info.compat_only and COMPAT_NOTE not in info.comment_after, key
    assert opts.templates["sd_checkpoint_hash"].hidden
    assert opts.templates["api_useragent"].restrict_api


def test_compat_only_values_are_validated_stored_and_only_set_values_saved(tmp_path):
    path = tmp_path / "config.json"
    opts, _ = make(path)
    assert opts.set("send_seed", False) and opts.set("notification_volume", 40.0)
    assert opts.notification_volume == 40 and type(opts.notification_volume) is int
    with pytest.raises(OptionError, match="send_seed"):
        opts.set("send_seed", "sometimes")
    with pytest.raises(OptionError, match="notification_volume"):
        opts.set("notification_volume", 101)
    with pytest.raises(OptionError, match="s_noise"):
        opts.set("s_noise", [1])
    opts.save()
    assert json.loads(path.read_text()) == {"send_seed": False, "notification_volume": 40}  # not 300 defaults
    again, warnings = make(path)
    assert warnings == [] and again.send_seed is False and again.notification_volume == 40


def test_a_none_default_takes_a_string_or_none(tmp_path):
    opts, _ = make(tmp_path / "config.json")
    assert opts.upscaler_for_img2img is None
    assert opts.set("upscaler_for_img2img", "Lanczos") and opts.upscaler_for_img2img == "Lanczos"
    assert opts.set("upscaler_for_img2img", "") and opts.upscaler_for_img2img is None  # an empty text box
    with pytest.raises(OptionError, match="upscaler_for_img2img"):
        opts.set("upscaler_for_img2img", {"name": "x"})

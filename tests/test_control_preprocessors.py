"""ControlNet preprocessors: the model-free maps against OpenCV, sizes and modes, sliders as the
extension serves them, depth through tiny real transformers folders, and refusals naming the files."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
from PIL import Image, ImageDraw

from modules.engine.control import annotators
from modules.engine.control.preprocessors import (PREPROCESSORS, PreprocessorArgs, PreprocessorUnavailableError,
                                                  UnknownPreprocessorError, get_preprocessor, preprocessor_names)
from modules.models import depth as depth_models
from tiny_depth import make_tiny_depth_anything, make_tiny_dpt


def shapes_image(width: int = 192, height: int = 128) -> Image.Image:
    """A known picture: flat background, a filled rectangle, an ellipse and a line."""
    image = Image.new("RGB", (width, height), (200, 180, 160))
    draw = ImageDraw.Draw(image)
    draw.rectangle((20, 20, 90, 100), fill=(30, 60, 200))
    draw.ellipse((100, 30, 170, 110), fill=(240, 240, 20), outline=(0, 0, 0), width=3)
    draw.line((0, 120, width, 5), fill=(10, 10, 10), width=2)
    return image


@pytest.fixture
def estimators(tmp_path):
    """A fresh estimator registry over tmp_path/models, as services.py installs it; restored afterwards."""
    before = depth_models.default_estimators()
    est = depth_models.DepthEstimators.for_models_dir(tmp_path / "models", device="cpu")
    depth_models.set_default_estimators(est)
    yield est
    est.unload()
    depth_models.set_default_estimators(before)


# ---------------------------------------------------------------- canny vs OpenCV


def test_canny_equals_opencv_on_a_known_image():
    image = shapes_image()  # 192x128: the short side is the resolution and both are multiples of 64
    for low, high in ((100, 200), (30, 90)):
        out = get_preprocessor("canny").run(image, PreprocessorArgs(resolution=128, threshold_a=low, threshold_b=high))
        expected = cv2.Canny(np.asarray(image), low, high)
        assert out.mode == "RGB" and out.size == image.size
        got = np.asarray(out)
        assert np.array_equal(got[..., 0], expected) and np.array_equal(got[..., 1], expected)
        assert expected.any()  # the picture has edges: the comparison is not of two blanks


def test_canny_resizes_the_short_side_and_pads_like_the_extension():
    image = shapes_image(150, 100)
    out = get_preprocessor("canny").run(image, PreprocessorArgs(resolution=256, threshold_a=100, threshold_b=200))
    assert out.size == (384, 256)
    # the reference: cubic upscale to 384x256 (already multiples of 64: no padding), then OpenCV's Canny
    scaled = cv2.resize(np.asarray(image), (384, 256), interpolation=cv2.INTER_CUBIC)
    assert np.array_equal(np.asarray(out)[..., 0], cv2.Canny(scaled, 100, 200))


def test_out_of_range_thresholds_fall_back_to_the_slider_defaults():
    image = shapes_image()
    default = get_preprocessor("canny").run(image, PreprocessorArgs(resolution=128))  # -1, -1 as the API sends
    explicit = get_preprocessor("canny").run(image, PreprocessorArgs(resolution=128, threshold_a=100, threshold_b=200))
    assert np.array_equal(np.asarray(default), np.asarray(explicit))
    too_big = get_preprocessor("canny").run(image, PreprocessorArgs(resolution=128, threshold_a=999, threshold_b=200))
    assert np.array_equal(np.asarray(too_big), np.asarray(explicit))


# ---------------------------------------------------------------- every model-free map


# name -> expected output size for a 150x100 input at resolution 256 (short side -> 256)
MODEL_FREE = {
    "none": (150, 100), "invert": (150, 100), "canny": (384, 256), "threshold": (384, 256),
    "scribble_xdog": (384, 256), "lineart_standard": (384, 256), "blur_gaussian": (384, 256),
    "shuffle": (768, 512),          # the extension pins shuffle's resolution to 512
    "color": (384, 256), "tile_resample": (150, 100), "tile_colorfix": (150, 100),
    "tile_colorfix+sharp": (150, 100), "recolor_luminance": (150, 100), "recolor_intensity": (150, 100),
    "inpaint": (150, 100), "inpaint_only": (150, 100),
}


@pytest.mark.parametrize("name", sorted(MODEL_FREE))
def test_each_model_free_preprocessor_runs_with_the_expected_size_and_mode(name):
    image = shapes_image(150, 100)
    mask = Image.new("L", image.size, 0)
    ImageDraw.Draw(mask).rectangle((10, 10, 60, 60), fill=255)
    source = annotators.compose_inpaint_input(image, mask) if name.startswith("inpaint") else image
    pre = get_preprocessor(name)
    assert pre.unavailable() is None
    out = pre.run(source, PreprocessorArgs(resolution=256, seed=3))
    assert out.size == MODEL_FREE[name]
    assert out.mode == ("RGBA" if name.startswith("inpaint") else "RGB")
    assert np.asarray(out).std() > 0 or name == "threshold"


def test_model_free_maps_do_what_they_say():
    image = shapes_image()
    args = PreprocessorArgs(resolution=128)
    assert np.array_equal(np.asarray(get_preprocessor("invert").run(image, args)), 255 - np.asarray(image))
    thr = np.asarray(get_preprocessor("threshold").run(image, PreprocessorArgs(resolution=128, threshold_a=150)))
    assert np.array_equal(thr[..., 0] == 255, np.asarray(image).min(axis=2) > 150)
    blurred = np.asarray(get_preprocessor("blur_gaussian").run(image, PreprocessorArgs(resolution=128,
                                                                                          threshold_a=3)))
    assert np.array_equal(blurred, cv2.GaussianBlur(np.asarray(image), (0, 0), 3.0))
    half = get_preprocessor("tile_resample").run(image, PreprocessorArgs(threshold_a=2.0))
    assert half.size == (96, 64)
    grid = np.asarray(get_preprocessor("color").run(image, args))
    assert len(np.unique(grid.reshape(-1, 3), axis=0)) <= (192 // 64) * (128 // 64)  # one colour per cell


def test_normal_from_depth_points_along_the_depth_gradient():
    ramp = np.tile(np.linspace(0, 50, 64, dtype=np.float32), (32, 1))  # nearer to the right
    out = annotators.normal_from_depth(ramp, annotators.Resolved(512, 0.0, 0.0))
    inner = out[4:-4, 4:-4].astype(int)
    assert (inner[..., 2] > 127).all() and (inner[..., 1] == 127).all()  # x up, y flat (channels reversed)
    background = annotators.normal_from_depth(ramp, annotators.Resolved(512, 0.5, 0.0))
    assert (background[:, 2:20] == (255, 127, 127)).all()  # below the threshold: facing the viewer


def test_shuffle_is_repeatable_with_a_seed():
    image = shapes_image()
    one = get_preprocessor("shuffle").run(image, PreprocessorArgs(seed=7))
    two = get_preprocessor("shuffle").run(image, PreprocessorArgs(seed=7))
    other = get_preprocessor("shuffle").run(image, PreprocessorArgs(seed=8))
    assert np.array_equal(np.asarray(one), np.asarray(two))
    assert not np.array_equal(np.asarray(one), np.asarray(other))


def test_the_inpaint_map_marks_masked_pixels_as_the_extension_does():
    image = shapes_image()
    mask = Image.new("L", image.size, 0)
    ImageDraw.Draw(mask).rectangle((0, 0, 49, 49), fill=200)   # > 127: masked
    ImageDraw.Draw(mask).rectangle((100, 0, 149, 49), fill=100)  # <= 127: kept
    out = get_preprocessor("inpaint_only").run(annotators.compose_inpaint_input(image, mask), PreprocessorArgs())
    alpha = np.asarray(out)[..., 3]
    assert set(np.unique(alpha)) == {0, 255} and alpha[10, 10] == 255 and alpha[10, 120] == 0
    hint = annotators.inpaint_hint(out)
    assert hint.dtype == np.float32 and hint.shape == (128, 192, 3)
    assert (hint[:50, :50] == -1).all()                              # masked: -1 in every channel
    assert np.allclose(hint[60:, 60:], np.asarray(image, dtype=np.float32)[60:, 60:] / 255.0)


# ---------------------------------------------------------------- names and module_detail


def test_names_labels_and_sliders_are_the_extensions():
    names = preprocessor_names()
    assert names[:2] == ["none", "invert"] and {"canny", "depth", "depth_anything_v2", "openpose"} <= set(names)
    assert "depth_midas" in preprocessor_names(alias_names=True)
    assert get_preprocessor("t2ia_color_grid") is PREPROCESSORS["color"]
    assert get_preprocessor("inpaint_global_harmonious") is PREPROCESSORS["inpaint"]
    canny = PREPROCESSORS["canny"].detail
    assert canny == {"model_free": False, "sliders": [
        {"name": "Resolution", "value": 512, "min": 64, "max": 2048, "step": 8},
        {"name": "Low Threshold", "value": 100, "min": 1, "max": 255, "step": 1},
        {"name": "High Threshold", "value": 200, "min": 1, "max": 255, "step": 1}]}
    assert PREPROCESSORS["invert"].detail["sliders"] == []
    assert PREPROCESSORS["shuffle"].detail["sliders"] == []
    assert [s["name"] for s in PREPROCESSORS["tile_colorfix+sharp"].detail["sliders"]] == [
        "Resolution", "Variation", "Sharpness"]
    with pytest.raises(UnknownPreprocessorError, match="valid"):
        get_preprocessor("no_such_module")


def test_preprocessors_needing_controlnet_aux_are_listed_and_refused_clearly():
    for name in ("openpose_full", "softedge_hed", "lineart_realistic", "mlsd"):
        with pytest.raises(PreprocessorUnavailableError, match="controlnet-aux"):
            get_preprocessor(name)


# ---------------------------------------------------------------- depth


def test_a_depth_preprocessor_without_its_files_is_refused_naming_them(estimators, tmp_path):
    for name in ("depth", "depth_anything_v2", "normal_map"):
        assert name in PREPROCESSORS  # still listed
        with pytest.raises(PreprocessorUnavailableError) as err:
            get_preprocessor(name)
        message = str(err.value)
        assert "config.json" in message and "model.safetensors" in message
        assert str(tmp_path / "models" / "depth") in message
        assert str(tmp_path / "models" / "ControlNet" / "annotators") in message


def test_folders_without_safetensors_or_of_unknown_type_are_not_estimators(estimators, tmp_path):
    pickled = tmp_path / "models" / "depth" / "pickled"
    pickled.mkdir(parents=True)
    (pickled / "config.json").write_text('{"model_type": "dpt"}')
    (pickled / "pytorch_model.bin").write_bytes(b"not loaded")       # pickles are never read
    other = tmp_path / "models" / "depth" / "other"
    other.mkdir()
    (other / "config.json").write_text('{"model_type": "bert"}')
    (other / "model.safetensors").write_bytes(b"x")
    assert estimators.folders() == []
    with pytest.raises(PreprocessorUnavailableError):
        get_preprocessor("depth")


def test_tiny_dpt_and_depth_anything_load_through_auto_model_and_give_maps(estimators, tmp_path):
    from transformers import AutoModelForDepthEstimation, DepthAnythingForDepthEstimation, DPTForDepthEstimation

    dpt = make_tiny_dpt(tmp_path / "models" / "depth" / "tiny-dpt-hybrid-midas")
    anything = make_tiny_depth_anything(tmp_path / "models" / "ControlNet" / "annotators" / "tiny-depth-anything-v2")
    # the fixtures are real transformers folders: the reference loader reads them as such
    assert isinstance(AutoModelForDepthEstimation.from_pretrained(dpt, local_files_only=True), DPTForDepthEstimation)
    assert isinstance(AutoModelForDepthEstimation.from_pretrained(anything, local_files_only=True),
                      DepthAnythingForDepthEstimation)

    assert [f.family for f in estimators.folders()] == ["midas", "depth_anything"]
    image = shapes_image(150, 100)
    for folder in estimators.folders():
        depth = estimators.estimate(image, folder)
        assert depth.shape == (100, 150) and depth.dtype == np.float32 and np.isfinite(depth).all()
        assert np.array_equal(estimators.estimate(image, folder), depth)  # cached, same answer
    for name, family in (("depth", "dpt"), ("depth_anything_v2", "depth_anything")):
        out = get_preprocessor(name).run(image, PreprocessorArgs(resolution=128))
        assert out.mode == "RGB" and out.size == (192, 128)
        assert estimators._loaded is not None and estimators._loaded[1].config.model_type == family
    grey = np.asarray(out)
    assert grey.min() == 0 and grey.max() == 255  # min-max normalised, as the extension's maps
    normal = get_preprocessor("normal_midas").run(image, PreprocessorArgs(resolution=128, threshold_a=0.0))
    assert normal.mode == "RGB" and normal.size == (192, 128)
    estimators.unload()
    assert estimators._loaded is None


def test_a_dpt_folder_without_a_processor_config_uses_its_configured_size(estimators, tmp_path):
    folder = make_tiny_dpt(tmp_path / "models" / "depth" / "bare-dpt")
    (folder / "preprocessor_config.json").unlink()
    depth = estimators.estimate(shapes_image(150, 100))
    assert depth.shape == (100, 150) and estimators.estimate_raw(shapes_image(150, 100)).shape == (64, 64)


def test_a_damaged_estimator_folder_is_a_clear_error(estimators, tmp_path):
    folder = tmp_path / "models" / "depth" / "damaged"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text('{"model_type": "dpt"}')
    (folder / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(depth_models.DepthModelMissingError, match="could not be loaded"):
        get_preprocessor("depth").run(shapes_image(), PreprocessorArgs(resolution=64))

"""Model upscalers where A1111 offers them: hires fix (hr_upscaler), SD upscale, the X/Y/Z "Hires upscaler"
axis, and the Extras service (queued job, per-tile progress, saved to outputs/extras-images)."""
from __future__ import annotations

import pytest
from PIL import Image

from conftest import make_services
from upscaler_fixtures import make_upscaler

from modules.core.extras import ExtrasParams
from modules.core.infotext import parse_infotext
from modules.core.pipeline import HiresParams, ProcessingError, Txt2ImgParams
from modules.engine.upscaling import bind_model_upscalers

SMALL = dict(width=64, height=64, steps=1, cfg_scale=7.0, prompt="a fox", sampler_name="Euler", seed=5)


@pytest.fixture(scope="module")
def svc(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("upgen")
    make_upscaler(data_dir / "models", "compact", 2, name="2x-tiny")
    make_upscaler(data_dir / "models", "esrgan-old", 4, name="4x-tiny")
    services = make_services(data_dir, {"tiny.safetensors": ("sd1", 0)})
    services.data_dir = data_dir
    yield services
    services.generation.queue.shutdown()
    bind_model_upscalers(None)   # other modules' tests see only the built-in upscalers


def test_hires_fix_with_a_model_upscaler_reaches_the_target_and_names_it(svc):
    params = Txt2ImgParams(**SMALL, hires=HiresParams(enabled=True, upscaler="2x-tiny", scale=1.5, steps=1,
                                                      denoising_strength=0.3))
    processed = svc.generation.submit(params).result()
    assert processed.images[0].size == (96, 96)
    assert parse_infotext(processed.infotexts[0])["Hires upscaler"] == "2x-tiny"


def test_an_unknown_hires_upscaler_is_refused_with_the_valid_names(svc):
    params = Txt2ImgParams(**SMALL, hires=HiresParams(enabled=True, upscaler="4x-Nope"))
    with pytest.raises(ProcessingError, match="4x-Nope.*Latent.*Lanczos.*2x-tiny"):
        svc.generation.submit(params)


def test_xyz_hires_upscaler_axis_offers_and_renders_the_models(svc):
    from test_xyz_grid import xyz, xyz_args
    from modules.extensions import scripts

    assert "4x-tiny" in xyz._hires_upscaler_choices()
    svc.scripts = scripts.ScriptRegistry.from_modules({xyz.__name__: xyz})
    runner = svc.script_runner(False)
    runner.ensure_defaults()
    args = runner.args_from_api("X/Y/Z plot", xyz_args("Hires upscaler", "Lanczos, 4x-tiny",
                                                       include_lone_images=True), None)
    params = Txt2ImgParams(**SMALL, hires=HiresParams(enabled=True, scale=1.25, steps=1, denoising_strength=0.2))
    processed = svc.generation.submit(params, script=runner.job_script(args)).result()
    assert [parse_infotext(t)["Hires upscaler"] for t in processed.infotexts[1:]] == ["Lanczos", "4x-tiny"]
    assert processed.images[1].size == processed.images[2].size == (80, 80)


def test_sd_upscale_indexes_the_model_upscalers_after_the_builtins(svc):
    from sd_upscale_lib import SdUpscaleArgs, upscale, upscaler_names

    names = upscaler_names()
    assert names[:3] == ["None", "Lanczos", "Nearest"] and "2x-tiny" in names
    args = SdUpscaleArgs.from_script_args(["", 16, names.index("2x-tiny"), 2.0])
    assert args.upscaler == "2x-tiny"
    assert upscale(Image.new("RGB", (40, 24), (9, 90, 200)), args).size == (80, 48)


def test_extras_job_reports_tiles_saves_numbered_pngs_with_the_postprocess_lines(svc):
    svc.options.set("ESRGAN_tile", 16)   # 40x40 at tile 16, overlap 4: 3 x 3 tiles per pass
    svc.options.set("ESRGAN_tile_overlap", 4)
    source = Image.new("RGB", (40, 40), (200, 100, 50))
    source.info["parameters"] = "a fox\nSteps: 1, Seed: 5"
    seen = []
    original = svc.generation.state.set_step
    svc.generation.state.set_step = lambda step, total: (seen.append((step, total)), original(step, total))
    try:
        params = ExtrasParams(upscaler_1="2x-tiny", upscaling_resize=2, upscaler_2="Lanczos",
                              extras_upscaler_2_visibility=0.25)
        result = svc.extras.submit([source, source], params).result()
    finally:
        del svc.generation.state.set_step
        svc.options.set("ESRGAN_tile", 192)
        svc.options.set("ESRGAN_tile_overlap", 8)
    assert (9, 9) in seen and seen.count((9, 9)) == 2
    assert [p.name for p in result.paths] == ["00000.png", "00001.png"]
    assert all(p.parent == svc.data_dir / "outputs" / "extras-images" for p in result.paths)
    saved = Image.open(result.paths[0])
    assert saved.size == (80, 80)
    assert saved.info["parameters"].startswith("a fox")   # the source's infotext is kept
    assert saved.info["extras"] == ("Postprocess upscale by: 2, Postprocess upscaler: 2x-tiny, "
                                    "Postprocess upscaler 2: Lanczos, Postprocess upscaler 2 visibility: 0.25")


def test_extras_refuses_unknown_names_and_folders_outside_the_data_folder(svc, tmp_path):
    with pytest.raises(ProcessingError, match="upscaler_1: upscaler '4x-Nope' not found; available: None, Lanczos"):
        svc.extras.submit([Image.new("RGB", (8, 8))], ExtrasParams(upscaler_1="4x-Nope"))
    with pytest.raises(ProcessingError, match="outside the data folder"):
        svc.extras.directory_images(str(tmp_path), "")
    inside = svc.data_dir / "batch-in"
    inside.mkdir()
    Image.new("RGB", (16, 16)).save(inside / "a.png")
    (inside / "notes.txt").write_text("not an image")
    images, out_dir = svc.extras.directory_images("batch-in", "batch-out")
    assert len(images) == 1 and out_dir == (svc.data_dir / "batch-out").resolve()
    result = svc.extras.submit(images, ExtrasParams(upscaler_1="Nearest", upscaling_resize=2),
                               output_dir=out_dir).result()
    assert result.paths == [out_dir / "00000.png"]

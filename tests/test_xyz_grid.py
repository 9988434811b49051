"""The built-in "X/Y/Z plot" script (extensions-builtin/xyz-grid): value parsing, labelled grids from
real renders on tiny checkpoints, Prompt S/R, the checkpoint axis, errors before any render, and one
browser run through the txt2img tab."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import make_services
from modules.extensions import scripts
from modules.core.generation import GenerationService
from modules.core.infotext import parse_infotext
from modules.core.pipeline import Img2ImgParams, ProcessingError, Txt2ImgParams

SCRIPT_FILE = Path(__file__).resolve().parent.parent / "extensions-builtin" / "xyz-grid" / "scripts" / "xyz_grid.py"
SMALL = dict(width=64, height=64, steps=1, cfg_scale=7.0, prompt="a fox in the snow", negative_prompt="blurry",
             sampler_name="Euler", seed=123)


def _load_module():
    name = "xyz_grid_under_test"
    spec = importlib.util.spec_from_file_location(name, SCRIPT_FILE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


xyz = _load_module()


def xyz_args(x_type="Nothing", x_values="", y_type="Nothing", y_values="", z_type="Nothing", z_values="", *,
             draw_legend=True, include_lone_images=False, include_sub_grids=False, no_fixed_seeds=False,
             vary_seeds=(False, False, False), margin_size=0, csv_mode=False, x_dropdown=None):
    """script_args in A1111's order."""
    return [x_type, x_values, x_dropdown, y_type, y_values, None, z_type, z_values, None, draw_legend,
            include_lone_images, include_sub_grids, no_fixed_seeds, *vary_seeds, margin_size, csv_mode]


class Interrupter(scripts.Script):
    """Always visible: asks the job to stop after the first process_images it sees (when enabled)."""
    state = None

    def title(self):
        return "Interrupter"

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def ui(self, is_img2img):
        import gradio as gr
        return [gr.Checkbox(False, label="Interrupt")]

    def postprocess(self, p, processed, enabled):
        if enabled:
            Interrupter.state.interrupt()


@pytest.fixture(scope="module")
def svc(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("xyz")
    services = make_services(data_dir, {"tiny-a.safetensors": ("sd1", 0), "tiny-b.safetensors": ("sd1", 1)})
    registry = scripts.ScriptRegistry.from_modules({xyz.__name__: xyz})
    registry.classes.append(scripts.ScriptClassData(Interrupter, __file__, "", sys.modules[__name__], "test"))
    services.scripts = registry
    Interrupter.state = services.generation.state
    services.data_dir = data_dir
    yield services
    services.generation.queue.shutdown()


@pytest.fixture
def renders(monkeypatch):
    """How many times a cell was rendered (GenerationService._run), with the checkpoint each used."""
    calls: list[str] = []
    original = GenerationService._run

    def counting(self, params, job, *args, **kwargs):
        processed = original(self, params, job, *args, **kwargs)
        calls.append(processed.sd_model_name)
        return processed
    monkeypatch.setattr(GenerationService, "_run", counting)
    return calls


def run_plot(svc, args, alwayson=None, **params):
    runner = svc.script_runner(False)
    runner.ensure_defaults()
    full = runner.args_from_api("X/Y/Z plot", args, alwayson)
    return svc.generation.submit(Txt2ImgParams(**{**SMALL, **params}), script=runner.job_script(full)).result()


def info(text):
    return parse_infotext(text)


# -- value parsing -----------------------------------------------------------------------------
def test_int_ranges():
    assert xyz.expand_int_ranges(["1-5"]) == [1, 2, 3, 4, 5]
    assert xyz.expand_int_ranges(["1-10 (+2)"]) == [1, 3, 5, 7, 9]
    assert xyz.expand_int_ranges(["10-1 [4]"]) == [10, 7, 4, 1]
    assert xyz.expand_int_ranges(["5-1"]) == [5, 4, 3, 2, 1]
    assert xyz.expand_int_ranges(["10-0 (-5)"]) == [10, 5, 0]
    assert xyz.expand_int_ranges(["-1", "7", " 3 - 4 "]) == [-1, 7, 3, 4]
    assert xyz.expand_int_ranges(["1-3 [1]"]) == [1]
    with pytest.raises(ProcessingError, match="whole number"):
        xyz.expand_int_ranges(["abc"])
    with pytest.raises(ProcessingError, match="whole number"):
        xyz.expand_int_ranges(["2.5"])
    with pytest.raises(ProcessingError, match="step of 0"):
        xyz.expand_int_ranges(["1-3 (+0)"])


def test_float_ranges():
    assert xyz.expand_float_ranges(["0.5-1 (+0.25)"]) == [0.5, 0.75, 1.0]
    assert xyz.expand_float_ranges(["1-2 [3]"]) == [1.0, 1.5, 2.0]
    assert xyz.expand_float_ranges(["0-0.3 (+0.1)"]) == [0.0, 0.1, 0.2, 0.3]
    assert xyz.expand_float_ranges(["7.5", "3"]) == [7.5, 3.0]
    assert xyz.expand_float_ranges(["2-1 (-0.5)"]) == [2.0, 1.5, 1.0]
    with pytest.raises(ProcessingError, match="not a number"):
        xyz.expand_float_ranges(["seven"])


def test_csv_splitting_and_axis_lookup():
    assert xyz.split_values('a, "b, c",d ,') == ["a", "b, c", "d", ""]
    assert xyz.split_values(None) == []
    axes = xyz.axes_for(False)
    assert [a.label for a in axes][:5] == ["Nothing", "Seed", "Var. seed", "Var. strength", "Steps"]
    assert xyz.find_axis(axes, 4, "X").label == "Steps"
    assert xyz.find_axis(axes, "cfg scale", "X").label == "CFG Scale"
    assert xyz.find_axis(axes, None, "X").label == "Nothing"
    assert "Hires steps" not in [a.label for a in xyz.axes_for(True)]
    # A1111's txt2img indices, which API clients send
    assert (axes[9].label, axes[11].label) == ("Sampler", "Checkpoint name")
    with pytest.raises(ProcessingError, match="unknown axis"):
        xyz.find_axis(axes, "Wobble", "Y")
    with pytest.raises(ProcessingError, match="out of range"):
        xyz.find_axis(axes, 99, "Y")


# -- rendering -----------------------------------------------------------------------------------
def test_steps_by_cfg_grid_has_labels_and_cell_infotexts(svc, renders):
    steps_index = [a.label for a in xyz.axes_for(False)].index("Steps")
    processed = run_plot(svc, xyz_args(steps_index, "1,2", "CFG Scale", "5, 7.5", include_lone_images=True))
    assert len(renders) == 4
    grid, *cells = processed.images
    assert len(cells) == 4 and all(im.size == (64, 64) for im in cells)
    # 2 columns x 2 rows of 64x64 plus the label bands on top and on the left
    assert grid.width > 128 and grid.height > 128
    assert len(processed.infotexts) == len(processed.images)
    got = [(info(t)["Steps"], info(t)["CFG scale"]) for t in processed.infotexts[1:]]
    assert got == [("1", "5"), ("2", "5"), ("1", "7.5"), ("2", "7.5")]
    grid_info = info(processed.infotexts[0])
    assert grid_info["Script"] == "X/Y/Z plot"
    assert (grid_info["X Type"], grid_info["X Values"]) == ("Steps", "1,2")
    assert (grid_info["Y Type"], grid_info["Y Values"]) == ("CFG Scale", "5, 7.5")
    assert "Z Type" not in grid_info
    assert grid_info["Steps"] == "1" and grid_info["Seed"] == "123"  # the first cell's parameters
    assert grid.info["parameters"] == processed.infotexts[0]
    assert processed.index_of_first_image == 0 and processed.info == processed.infotexts[0]
    assert processed.js()["extra_generation_params"]["X Type"] == "Steps"
    # The bottom-right cell of the grid is the last image.
    corner = grid.crop((grid.width - 64, grid.height - 64, grid.width, grid.height))
    assert np.array_equal(np.asarray(corner.convert("RGB")), np.asarray(cells[-1].convert("RGB")))
    saved = list((svc.data_dir / "outputs" / "txt2img-grids").rglob("*.png"))
    assert saved, "the grid is saved with grid_save on"
    assert parse_infotext(Image.open(saved[-1]).info["parameters"])["Script"] == "X/Y/Z plot"


def test_z_axis_gives_a_grid_of_grids_and_sub_grids(svc):
    processed = run_plot(svc, xyz_args("Steps", "1-2", z_type="CFG Scale", z_values="4-6 [2]",
                                       include_sub_grids=True, margin_size=4))
    main, *subs = processed.images
    assert len(subs) == 2 and len(processed.infotexts) == 3
    assert main.width > 2 * subs[0].width and main.height > subs[0].height  # Z labels on top
    assert [info(t)["CFG scale"] for t in processed.infotexts[1:]] == ["4", "6"]
    assert info(processed.infotexts[0])["Z Values"] == "4-6 [2]"
    # no Y axis: no row labels, so a sub grid is two 64px cells, a 4px margin, and a label band on top
    assert subs[0].width == 2 * 64 + 4 and subs[0].height > 64


def test_prompt_search_and_replace(svc):
    processed = run_plot(svc, xyz_args("Prompt S/R", "fox, cat, dog", include_lone_images=True,
                                       draw_legend=False), negative_prompt="a blurry fox")
    grid, *cells = processed.images
    assert grid.size == (3 * 64, 64)  # no legend, no margin: the bare grid
    prompts = [info(t)["Prompt"] for t in processed.infotexts[1:]]
    assert prompts == ["a fox in the snow", "a cat in the snow", "a dog in the snow"]
    assert [info(t)["Negative prompt"] for t in processed.infotexts[1:]] == [
        "a blurry fox", "a blurry cat", "a blurry dog"]


def test_prompt_order(svc):
    processed = run_plot(svc, xyz_args("Prompt order", "fox, snow", include_lone_images=True))
    assert [info(t)["Prompt"] for t in processed.infotexts[1:]] == ["a fox in the snow", "a snow in the fox"]
    with pytest.raises(ProcessingError, match="did not find 'owl'"):
        run_plot(svc, xyz_args("Prompt order", "fox, owl"))


def test_checkpoint_axis_loads_each_model_once(svc, renders):
    selected = svc.options.sd_model_checkpoint
    processed = run_plot(svc, xyz_args("Steps", "1,2", "Checkpoint name", "tiny-a, tiny-b",
                                       include_lone_images=True))
    models = [info(t)["Model"] for t in processed.infotexts[1:]]
    assert models == ["tiny-a", "tiny-a", "tiny-b", "tiny-b"]
    assert renders == ["tiny-a", "tiny-a", "tiny-b", "tiny-b"]
    processed = run_plot(svc, xyz_args("Checkpoint name", "tiny-b, tiny-a", "Steps", "1,2",
                                       include_lone_images=True))
    # the checkpoint axis is rendered outermost even on X: one switch, not three
    assert renders[4:] == ["tiny-b", "tiny-b", "tiny-a", "tiny-a"]
    assert [info(t)["Model"] for t in processed.infotexts[1:]] == ["tiny-b", "tiny-a", "tiny-b", "tiny-a"]
    assert svc.options.sd_model_checkpoint == selected  # the per-cell override did not stick


def test_img2img_denoising_axis(svc):
    runner = svc.script_runner(True)
    runner.ensure_defaults()
    args = runner.args_from_api("X/Y/Z plot", xyz_args("Denoising", "0.3, 0.6", include_lone_images=True), None)
    params = Img2ImgParams(**{**SMALL, "steps": 2}, init_images=[Image.new("RGB", (64, 64), (200, 30, 30))])
    processed = svc.generation.submit(params, script=runner.job_script(args)).result()
    assert [info(t)["Denoising strength"] for t in processed.infotexts[1:]] == ["0.3", "0.6"]
    assert info(processed.infotexts[0])["X Type"] == "Denoising"


@pytest.mark.parametrize("args, message", [
    (xyz_args("Checkpoint name", "tiny-a, no-such-model"), "unknown checkpoint 'no-such-model'"),
    (xyz_args("Steps", "1, two"), "X axis \\(Steps\\): 'two' is not a whole number"),
    (xyz_args("Steps", "1", "Sampler", "Euler, Bogus Sampler"), "unknown sampler 'Bogus Sampler'"),
    (xyz_args("Steps", "0-1"), "steps must be between 1 and 150"),
    (xyz_args("Prompt S/R", "zebra, horse"), "did not find 'zebra'"),
    (xyz_args("Size", "64x64, big"), "not WIDTHxHEIGHT"),
    (xyz_args("Wobble", "1"), "unknown axis 'Wobble'"),
])
def test_bad_values_fail_before_anything_renders(svc, renders, args, message):
    with pytest.raises(ProcessingError, match=message):
        run_plot(svc, args)
    assert renders == []


def test_seeds_are_fixed_unless_kept(svc):
    processed = run_plot(svc, xyz_args("Seed", "-1, 5", include_lone_images=True))
    seeds = [int(info(t)["Seed"]) for t in processed.infotexts[1:]]
    assert seeds[1] == 5 and seeds[0] >= 0
    grid_info = info(processed.infotexts[0])
    assert grid_info["X Values"] == "-1, 5" and grid_info["Fixed X Values"] == f"{seeds[0]}, 5"
    # vary seeds along Y: each row gets the seed plus its offset
    processed = run_plot(svc, xyz_args("Steps", "1", "CFG Scale", "5,6", vary_seeds=(False, True, False),
                                       include_lone_images=True))
    assert [info(t)["Seed"] for t in processed.infotexts[1:]] == ["123", "124"]


def test_interrupt_stops_after_the_current_cell(svc, renders):
    processed = run_plot(svc, xyz_args("Steps", "1,2,3", include_lone_images=True),
                         alwayson={"Interrupter": {"args": [True]}})
    assert renders and len(renders) == 1
    assert processed.interrupted
    grid, *cells = processed.images
    assert len(cells) == 1 and grid.width == 3 * 64  # the layout keeps its empty cells


# -- browser ---------------------------------------------------------------------------------------
@pytest.mark.browser
def test_xyz_plot_in_the_txt2img_tab(model_server, page):
    page.goto(model_server.url + "/")
    page.locator("#txt2img_prompt textarea").wait_for(timeout=120000)
    page.locator("#txt2img_prompt textarea").fill("a photo of a cat")
    for elem_id, value in (("txt2img_width", "64"), ("txt2img_height", "64"), ("txt2img_steps", "2")):
        box = page.locator(f"#{elem_id} input[type=number]")
        box.fill(value)
        box.press("Tab")
    script_list = page.locator("#txt2img_script_list input")
    script_list.click()
    page.get_by_role("option", name="X/Y/Z plot", exact=True).click()
    x_type = page.locator("#script_txt2img_xyz_plot_x_type input")
    x_type.wait_for(timeout=120000)
    # an axis with choices swaps the values textbox for a multiselect of them
    x_type.click()
    page.get_by_role("option", name="Sampler", exact=True).click()
    page.locator("#script_txt2img_xyz_plot_x_values_dropdown").wait_for(state="visible", timeout=120000)
    x_type.click()
    page.get_by_role("option", name="Steps", exact=True).click()
    page.locator("#script_txt2img_xyz_plot_x_values_dropdown").wait_for(state="hidden", timeout=120000)
    x_values = page.locator("#script_txt2img_xyz_plot_x_values textarea")
    x_values.fill("1,2")
    x_values.press("Tab")
    page.locator("#txt2img_prompt textarea").press("Control+Enter")
    try:
        page.locator("#txt2img_infotext").get_by_text("X/Y/Z plot", exact=False).wait_for(timeout=120000)
    except Exception as err:  # say what the page and the server show, not just "timeout"
        raise AssertionError(f"no X/Y/Z infotext; progress: {page.locator('#txt2img_progress').inner_text()!r}; "
                             f"server output:\n{model_server.output[-3000:]}") from err
    text = page.locator("#txt2img_infotext").inner_text()
    assert "X Type: Steps" in text and 'X Values: "1,2"' in text
    image = page.locator("#txt2img_gallery img").first
    image.wait_for(timeout=120000)
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=image.element_handle(),
                           timeout=120000)
    # two 64px columns (no Y axis: no row-label band, as in A1111) under a band of column labels
    width, height = image.evaluate("img => [img.naturalWidth, img.naturalHeight]")
    assert width >= 128 and height > 64

"""The Script API (modules/scripts.py + the `p` facade) on tiny real-layout checkpoints, in process:
hook order and arguments, what scripts change reaching the images and infotexts, dropdown scripts
calling process_images on copies of p, A1111's Processed constructor, argument slots for the API,
and isolation of a failing hook."""
from __future__ import annotations

import copy
import sys
import types

import gradio as gr
import numpy as np
import pytest
from PIL import Image

from conftest import make_services
from modules import processing
from modules.extensions import scripts
from modules.core.infotext import parse_infotext
from modules.core.pipeline import Img2ImgParams, Processed, ProcessingError, Txt2ImgParams

SMALL = dict(width=64, height=64, steps=2, cfg_scale=7.0, prompt="a fox", negative_prompt="blurry",
             sampler_name="Euler", seed=123)

CALLS: list[tuple] = []


class Recorder(scripts.Script):
    """Always visible: records every hook, edits the prompt, adds an infotext field, tints images."""

    def title(self):
        return "Recorder"

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def ui(self, is_img2img):
        enabled = gr.Checkbox(False, label="Enable recorder")
        suffix = gr.Textbox("", label="Suffix")
        return [enabled, suffix]

    def setup(self, p, enabled, suffix):
        CALLS.append(("setup", enabled, suffix))

    def before_process(self, p, enabled, suffix):
        CALLS.append(("before_process", p.prompt))
        if enabled and suffix:
            p.prompt = f"{p.prompt}, {suffix}"
            p.extra_generation_params["Recorder suffix"] = suffix

    def process(self, p, enabled, suffix):
        CALLS.append(("process", list(p.all_prompts), list(p.all_seeds)))

    def before_process_batch(self, p, enabled, suffix, *, batch_number, prompts, seeds, subseeds):
        CALLS.append(("before_process_batch", batch_number, list(prompts), list(seeds)))

    def process_batch(self, p, enabled, suffix, *, batch_number, prompts, seeds, subseeds):
        CALLS.append(("process_batch", batch_number))

    def postprocess_batch(self, p, enabled, suffix, *, images, batch_number):
        CALLS.append(("postprocess_batch", tuple(images.shape), batch_number))

    def postprocess_image(self, p, pp, enabled, suffix):
        CALLS.append(("postprocess_image", pp.image.size))
        if enabled:
            pp.image = Image.new("RGB", pp.image.size, (0, 255, 0))

    def postprocess(self, p, processed, enabled, suffix):
        CALLS.append(("postprocess", len(processed.images)))


class TwoSeeds(scripts.Script):
    """A dropdown script in A1111's style: copies p, renders twice, returns its own Processed."""

    def title(self):
        return "Two seeds"

    def ui(self, is_img2img):
        return [gr.Slider(1, 10, value=3, step=1, label="Seed step")]

    def run(self, p, seed_step):
        images, infotexts = [], []
        for i in range(2):
            pc = copy.copy(p)
            pc.seed = p.seed + i * int(seed_step)
            pc.do_not_save_grid = True
            proc = processing.process_images(pc)
            images += proc.images
            infotexts += proc.infotexts
        return Processed(p, images, p.seed, infotexts[0], infotexts=infotexts)


class Broken(scripts.Script):
    def title(self):
        return "Broken"

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def process(self, p, *args):
        raise RuntimeError("broken on purpose")


class OnlyImg2Img(scripts.Script):
    def title(self):
        return "Only img2img"

    def show(self, is_img2img):
        return is_img2img


def _registry() -> scripts.ScriptRegistry:
    module = types.ModuleType("test_scripts_ext")
    for cls in (Recorder, TwoSeeds, Broken, OnlyImg2Img):
        setattr(module, cls.__name__, cls)
    module.__file__ = __file__
    module.Script = scripts.Script  # imported base classes are not scripts
    sys.modules[module.__name__] = module
    return scripts.ScriptRegistry([
        scripts.ScriptClassData(cls, __file__, "", module, "test") for cls in (Recorder, TwoSeeds, Broken, OnlyImg2Img)])


@pytest.fixture(scope="module")
def svc(tmp_path_factory):
    services = make_services(tmp_path_factory.mktemp("scripts"), {"tiny-sd1.safetensors": ("sd1", 0)})
    services.scripts = _registry()
    yield services
    services.generation.queue.shutdown()


def run(svc, params, args):
    runner = svc.script_runner(isinstance(params, Img2ImgParams))
    return svc.generation.submit(params, script=runner.job_script(args)).result()


def test_runner_sorts_scripts_by_show(svc):
    t2i, i2i = svc.script_runner(False), svc.script_runner(True)
    assert [s.title() for s in t2i.alwayson_scripts] == ["Recorder", "Broken"]
    assert t2i.titles == ["Two seeds"]
    assert i2i.titles == ["Two seeds", "Only img2img"]
    t2i.ensure_defaults()
    recorder = t2i.find("recorder")
    assert (recorder.args_from, recorder.args_to) == (1, 3)
    assert t2i.defaults[:3] == [0, False, ""]


def test_always_visible_hooks_run_in_order_and_change_the_result(svc):
    runner = svc.script_runner(False)
    runner.ensure_defaults()
    args = runner.args_from_api(None, None, {"Recorder": {"args": [True, "oil paint"]}})
    CALLS.clear()
    processed = run(svc, Txt2ImgParams(**SMALL, batch_size=2, n_iter=1), args)
    names = [c[0] for c in CALLS]
    assert names == ["setup", "before_process", "process", "before_process_batch", "process_batch",
                     "postprocess_batch", "postprocess_image", "postprocess_image", "postprocess"]
    assert CALLS[0] == ("setup", True, "oil paint")
    assert CALLS[2][1] == ["a fox, oil paint"] * 2          # before_process's edit reached all_prompts
    assert CALLS[2][2] == [123, 124]
    assert CALLS[5][1] == (2, 3, 64, 64)                    # a [B, 3, H, W] tensor, as in A1111
    # postprocess_image replaced the images; the grid is built from the replaced ones
    for image in processed.images[processed.index_of_first_image:]:
        assert np.asarray(image)[..., 1].min() == 255
    info = parse_infotext(processed.infotexts[-1])
    assert info["Prompt"] == "a fox, oil paint"
    assert info["Recorder suffix"] == "oil paint"
    assert processed.js()["extra_generation_params"]["Recorder suffix"] == "oil paint"


def test_a_failing_hook_is_skipped_and_the_job_finishes(svc, caplog):
    runner = svc.script_runner(False)
    args = runner.args_from_api(None, None, {})
    processed = run(svc, Txt2ImgParams(**SMALL), args)
    assert len(processed.images) == 1
    assert "broken on purpose" in caplog.text and "Broken" in caplog.text


def test_dropdown_script_renders_copies_of_p(svc):
    runner = svc.script_runner(False)
    args = runner.args_from_api("two seeds", [5], None)
    assert args[0] == 1
    CALLS.clear()
    processed = run(svc, Txt2ImgParams(**SMALL), args)
    assert len(processed.images) == 2
    seeds = [parse_infotext(t)["Seed"] for t in processed.infotexts]
    assert seeds == ["123", "128"]
    # the always-visible hooks ran for each process_images the script made (disabled recorder: no edit)
    assert [c[0] for c in CALLS].count("process") == 2
    assert processed.js()["all_seeds"] == [123]  # what the script put in its Processed


def test_prompt_and_seed_lists_give_one_image_each(svc):
    """A1111's prompt matrix sets p.prompt (and p.seed) to lists."""
    class Matrix(scripts.Script):
        def title(self):
            return "Matrix"

        def run(self, p):
            p.prompt = ["a cat", "a dog", "a cow"]
            p.seed = [7, 7, 9]
            p.n_iter, p.batch_size = 2, 2  # 3 prompts: the second batch is short, as in A1111
            return processing.process_images(p)

    runner = scripts.ScriptRunner([scripts.ScriptClassData(Matrix, __file__, "", None)], is_img2img=False)
    runner.ensure_defaults()
    processed = svc.generation.submit(Txt2ImgParams(**SMALL), script=runner.job_script([1])).result()
    texts = processed.infotexts[processed.index_of_first_image:]
    assert len(texts) == 3 and len(processed.images) - processed.index_of_first_image == 3
    assert [parse_infotext(t)["Prompt"] for t in texts] == ["a cat", "a dog", "a cow"]
    assert [parse_infotext(t)["Seed"] for t in texts] == ["7", "7", "9"]


def test_api_argument_errors_name_the_script(svc):
    runner = svc.script_runner(False)
    with pytest.raises(ProcessingError, match="Script 'nope' not found"):
        runner.args_from_api("nope", [], None)
    with pytest.raises(ProcessingError, match="always on script nope not found"):
        runner.args_from_api(None, None, {"nope": {"args": []}})
    with pytest.raises(ProcessingError, match="selectable"):
        runner.args_from_api(None, None, {"Two seeds": {"args": []}})
    with pytest.raises(ProcessingError, match="takes 2 argument"):
        runner.args_from_api(None, None, {"Recorder": {"args": [True, "x", "extra"]}})
    with pytest.raises(ProcessingError, match="Only img2img"):
        runner.args_from_api("Only img2img", [], None)


def test_p_facade_reads_and_writes_typed_params():
    params = Txt2ImgParams(**SMALL)
    p = processing.StableDiffusionProcessingTxt2Img(params)
    p.steps = 9
    p.enable_hr = True
    p.hr_scale = 1.5
    p.do_not_save_samples = True
    p.my_extension_state = {"x": 1}  # extensions keep their own state on p
    assert (params.steps, params.hires.enabled, params.hires.scale, params.save_images) == (9, True, 1.5, False)
    q = copy.copy(p)
    q.steps, q.hr_scale = 3, 2.0
    q.extra_generation_params["Only in q"] = 1
    assert (p.steps, p.hr_scale, "Only in q" in p.extra_generation_params) == (9, 1.5, False)
    assert q.my_extension_state is p.my_extension_state
    built = processing.StableDiffusionProcessingImg2Img(prompt="x", init_images=[Image.new("RGB", (8, 8))],
                                                         denoising_strength=0.3, steps=4)
    assert isinstance(built.params, Img2ImgParams)
    assert (built.params.prompt, built.params.denoising_strength, built.params.steps) == ("x", 0.3, 4)


def test_processed_takes_a1111_positional_form():
    p = processing.StableDiffusionProcessingTxt2Img(Txt2ImgParams(prompt="hello", seed=5))
    images = [Image.new("RGB", (8, 8))] * 2
    proc = Processed(p, images, 5, "info text")
    assert proc.infotexts == ["info text", "info text"]
    assert proc.all_prompts == ["hello"] and proc.all_seeds == [5]
    assert proc.js()["prompt"] == "hello" and proc.info == "info text"


def _builtin_registry() -> scripts.ScriptRegistry:
    """The built-in extensions' scripts, loaded the way the server loads them."""
    from modules.extensions import loader as extensions, callbacks as script_callbacks
    from conftest import ROOT

    found = [e for e in extensions.discover(ROOT / "no-user-extensions", ROOT / "extensions-builtin")
             if e.name in ("sd-upscale", "outpainting")]
    modules = extensions.load_scripts(found, script_callbacks.CallbackRegistry())
    return scripts.ScriptRegistry.from_modules(modules, found)


def test_builtin_outpainting_and_sd_upscale_run_as_scripts(svc):
    registry = _builtin_registry()
    runner = registry.img2img
    runner.ensure_defaults()
    assert {"Poor man's outpainting", "SD upscale"} <= set(runner.titles)
    assert registry.txt2img.find("sd upscale") is None  # img2img only
    base = Img2ImgParams(**{**SMALL, "denoising_strength": 0.5},
                         init_images=[Image.new("RGB", (64, 64), (200, 40, 40))])
    # A1111's args: [pixels, mask blur, masked content index, directions]
    args = runner.args_from_api("Poor man's outpainting", [16, 0, 1, ["left"]], None)
    processed = svc.generation.submit(base, script=runner.job_script(args)).result()
    image = processed.images[processed.index_of_first_image]
    assert image.size == (80, 64)  # grown 16 px to the left
    # The original picture is kept where the mask is 0 (right of the grown margin).
    assert np.asarray(image)[:, 16:].reshape(-1, 3).tolist().count([200, 40, 40]) == 64 * 64
    args = runner.args_from_api("sd upscale", ["", 0, 2, 2.0], None)  # Nearest, x2, no overlap
    processed = svc.generation.submit(base, script=runner.job_script(args)).result()
    assert processed.images[0].size == (128, 128)
    with pytest.raises(ProcessingError, match="upscaler"):
        args = runner.args_from_api("sd upscale", ["", 0, 7, 2.0], None)
        svc.generation.submit(base, script=runner.job_script(args)).result()


def test_the_script_modules_import_in_any_order():
    import subprocess

    from conftest import ROOT

    for first in ("modules.extensions.processing_adapter", "modules.scripts", "modules.processing"):
        code = f"import {first}; from modules.processing import StableDiffusionProcessingTxt2Img, process_images"
        result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr


def test_save_callbacks_get_a1111_p(svc):
    seen = []
    saved_hooks = svc.generation.save_hooks
    svc.generation.save_hooks = (lambda params: seen.append(params.p), None)
    try:
        run(svc, Txt2ImgParams(**SMALL), svc.script_runner(False).args_from_api(None, None, {}))
        svc.generation.txt2img(Txt2ImgParams(**{**SMALL, "prompt": "plain"}))
    finally:
        svc.generation.save_hooks = saved_hooks
    assert seen[0].prompt == "a fox" and seen[0].scripts is svc.script_runner(False)
    assert isinstance(seen[-1], processing.StableDiffusionProcessingTxt2Img) and seen[-1].prompt == "plain"
    assert seen[-1].seed == 123

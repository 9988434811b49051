"""The built-in dropdown scripts (Prompt matrix, Prompts from file or textbox, Loopback) on a tiny sd1
checkpoint at 64x64: in process through the Script API, and the prompt matrix through the real API."""
from __future__ import annotations

import base64
import importlib.util
import io
import json
import sys
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
import requests
from PIL import Image

from conftest import ROOT, make_services, start_server
from modules.extensions import scripts
from modules import shared
from modules.extensions import context
from modules.core.infotext import parse_infotext
from modules.core.pipeline import Img2ImgParams, ProcessingError, Txt2ImgParams
from tiny_models import make_checkpoint

SMALL = dict(width=64, height=64, steps=1, cfg_scale=7.0, sampler_name="Euler", seed=123)
SCRIPT_FILES = {
    "prompt_matrix": "prompt-matrix/scripts/prompt_matrix.py",
    "prompts_from_file": "prompts-from-file/scripts/prompts_from_file.py",
    "loopback": "loopback/scripts/loopback.py",
}
PROBE: list[dict] = []


def _load(name: str, rel: str):
    path = ROOT / "extensions-builtin" / rel
    spec = importlib.util.spec_from_file_location(f"test_builtin_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


MODULES = {name: _load(name, rel) for name, rel in SCRIPT_FILES.items()}


class Probe(scripts.Script):
    """Always visible: records what each process_images the dropdown script makes starts from."""

    def title(self):
        return "Probe"

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def ui(self, is_img2img):
        return [gr.Checkbox(True, label="Probe")]

    def before_process(self, p, enabled):
        init = getattr(p, "init_images", None)
        PROBE.append({"prompt": p.prompt, "seed": p.seed, "job_count": shared.state.job_count,
                      "init": np.asarray(init[0].convert("RGB")).copy() if init else None})


def _registry() -> scripts.ScriptRegistry:
    probe_module = type(sys)("test_builtin_probe")
    probe_module.Probe = Probe
    probe_module.__file__ = __file__
    Probe.__module__ = probe_module.__name__
    sys.modules[probe_module.__name__] = probe_module
    return scripts.ScriptRegistry.from_modules({**{m.__name__: m for m in MODULES.values()},
                                                probe_module.__name__: probe_module})


@pytest.fixture(scope="module")
def svc(tmp_path_factory):
    services = make_services(tmp_path_factory.mktemp("builtin_scripts"), {"tiny-sd1.safetensors": ("sd1", 0)})
    services.scripts = _registry()
    saved = context.services()
    shared.bind(services)  # A1111-style scripts read shared.opts / shared.state
    yield services
    shared.bind(saved)
    services.generation.queue.shutdown()


def run(svc, params, title, script_args):
    runner = svc.script_runner(isinstance(params, Img2ImgParams))
    args = runner.args_from_api(title, script_args, None)
    PROBE.clear()
    return svc.generation.submit(params, script=runner.job_script(args)).result()


def infos(processed) -> list[dict]:
    return [parse_infotext(t) for t in processed.infotexts[processed.index_of_first_image:]]


def test_scripts_are_in_the_right_tabs(svc):
    t2i, i2i = svc.script_runner(False), svc.script_runner(True)
    assert t2i.titles == ["Prompt matrix", "Prompts from file or textbox"]
    assert i2i.titles == ["Prompt matrix", "Prompts from file or textbox", "Loopback"]
    t2i.ensure_defaults()
    i2i.ensure_defaults()
    matrix = t2i.find("prompt matrix")
    assert t2i.defaults[matrix.args_from:matrix.args_to] == [False, False, "positive", "comma", 0]
    pff = t2i.find("prompts from file or textbox")
    assert t2i.defaults[pff.args_from:pff.args_to] == [False, False, "start", ""]
    loop = i2i.find("loopback")
    assert i2i.defaults[loop.args_from:loop.args_to] == [4, 0.5, "Linear", "None"]


# --------------------------------------------------------------------------- prompt matrix

def test_matrix_prompts_orders_combinations_by_bits():
    matrix_prompts = MODULES["prompt_matrix"].matrix_prompts
    assert matrix_prompts("a | b | c")[1] == ["a", "a, b", "a, c", "a, b, c"]
    assert matrix_prompts("a|b,|c", put_at_start=True, delimiter=" ")[1] == ["a", "b a", "c a", "b c a"]
    assert matrix_prompts("no parts")[1] == ["no parts"]


def test_prompt_matrix_renders_every_combination_and_a_labelled_grid(svc):
    processed = run(svc, Txt2ImgParams(prompt="a | b | c", **SMALL), "prompt matrix",
                    [False, False, "positive", "comma", 0])
    assert processed.index_of_first_image == 1 and len(processed.images) == 5
    got = infos(processed)
    assert [i["Prompt"] for i in got] == ["a", "a, b", "a, c", "a, b, c"]
    assert [i["Seed"] for i in got] == ["123"] * 4
    assert processed.all_prompts == ["a", "a, b", "a, c", "a, b, c"]
    grid = processed.images[0]
    assert grid.width > 128 and grid.height > 128                    # 2x2 cells plus the label bands
    pad_left, pad_top = grid.width - 128, grid.height - 128
    arr = np.asarray(grid.convert("RGB"))
    for i, image in enumerate(processed.images[1:]):
        x, y = pad_left + (i % 2) * 64, pad_top + (i // 2) * 64
        assert np.array_equal(arr[y:y + 64, x:x + 64], np.asarray(image.convert("RGB")))
    assert PROBE and PROBE[0]["job_count"] == 4                       # one batch per prompt
    assert list((svc.paths.outputs_dir / "txt2img-grids").rglob("*.png"))   # grid_save is on


def test_prompt_matrix_negative_different_seeds_and_a_batch_that_does_not_divide(svc):
    params = Txt2ImgParams(prompt="a fox", negative_prompt="x | y | z", batch_size=3, **SMALL)
    processed = run(svc, params, "prompt matrix", [True, True, "negative", "space", 6])
    got = infos(processed)
    assert [i.get("Negative prompt") for i in got] == ["x", "y x", "z x", "y z x"]
    assert [i["Seed"] for i in got] == ["123", "124", "125", "126"]
    assert len(processed.images) == 5                                # 2 batches of 3, trimmed to 4
    assert processed.images[0].width > 2 * 64 + 6 and PROBE[0]["job_count"] == 2


# --------------------------------------------------------------------------- prompts from file

def test_parse_line():
    parse = MODULES["prompts_from_file"].parse_line
    assert parse("just a prompt") == {"prompt": "just a prompt"}
    assert parse("a cat -- with a dash --steps 3") == {"prompt": "a cat -- with a dash --steps 3"}
    assert parse('--prompt "a cat" on a mat --steps 10 --cfg_scale 4.5 --styles one two --tiling true') == {
        "prompt": "a cat on a mat", "steps": 10, "cfg_scale": 4.5, "styles": ["one", "two"], "tiling": True}
    assert parse("--sampler_name euler --seed -1")["sampler_name"] == "Euler"
    for bad, match in [("--steps ten", "--steps"), ("--stepz 3", "unknown option --stepz"),
                       ("--width", "--width needs a value"), ("--sampler_name nope", "--sampler_name"),
                       ('--prompt "unclosed', "cannot split"), ("--steps 3 extra", "expected an option")]:
        with pytest.raises(ValueError, match=match):
            parse(bad)


def test_uploaded_file_goes_into_the_textbox(tmp_path):
    load = MODULES["prompts_from_file"]._load_file
    assert load("a fox\n--steps 3".encode()) == "a fox\n--steps 3"
    (tmp_path / "p.txt").write_text("caf\u00e9", encoding="utf-8")
    assert load(str(tmp_path / "p.txt")) == "caf\u00e9"


def test_prompts_from_file_renders_each_line_with_its_options(svc):
    text = '\na red fox\n--prompt "a blue cat" --steps 1 --seed 9 --negative_prompt "x"\n\n  a green owl  \n'
    params = Txt2ImgParams(prompt="", negative_prompt="", **{**SMALL, "steps": 2})
    processed = run(svc, params, "prompts from file or textbox", [True, False, "start", text])
    assert len(processed.images) == 3 and processed.index_of_first_image == 0
    got = infos(processed)
    assert [i["Prompt"] for i in got] == ["a red fox", "a blue cat", "a green owl"]
    assert [i["Steps"] for i in got] == ["2", "1", "2"]
    assert [i.get("Negative prompt") or "" for i in got] == ["", "x", ""]
    assert [i["Seed"] for i in got] == ["123", "9", "125"]          # "Iterate seed every line"
    assert processed.all_prompts == ["a red fox", "a blue cat", "a green owl"]
    assert processed.all_seeds == [123, 9, 125]
    assert [rec["job_count"] for rec in PROBE] == [3, 3, 3]


def test_prompts_from_file_inserts_lines_into_the_tabs_prompt(svc):
    params = Txt2ImgParams(prompt="base", negative_prompt="ugly", **SMALL)
    processed = run(svc, params, "prompts from file or textbox",
                    [False, False, "end", '--prompt fox --negative_prompt dark --batch_size 2'])
    got = infos(processed)
    assert len(got) == 2 and {i["Prompt"] for i in got} == {"base fox"}
    assert got[0]["Negative prompt"] == "ugly dark"


def test_a_bad_line_fails_before_anything_renders(svc):
    params = Txt2ImgParams(prompt="", **SMALL)
    for text, match in [("a fox\n--prompt cat --steps many", r"line 2 .*--steps"),
                        ("a fox\n\n--prompt cat --steps 0", r"line 3 .*steps must be"),
                        ("--prompt cat --frobnicate 2", r"line 1 .*unknown option --frobnicate"),
                        ("   \n", "empty")]:
        with pytest.raises(ProcessingError, match=match):
            run(svc, params, "prompts from file or textbox", [False, False, "start", text])
        assert PROBE == []   # no process_images was started


# --------------------------------------------------------------------------- loopback

def test_denoising_curves():
    at = MODULES["loopback"].denoising_strength_at
    assert [round(at(i, 3, 0.8, 0.2, "Linear"), 6) for i in range(3)] == [0.8, 0.5, 0.2]
    assert at(1, 3, 0.8, 0.2, "Aggressive") < 0.5 < at(1, 3, 0.8, 0.2, "Lazy")
    assert at(0, 1, 0.8, 0.2, "Lazy") == 0.8


def _init_image() -> Image.Image:
    arr = np.zeros((64, 64, 3), dtype=np.uint8)
    arr[:, :32] = (220, 40, 40)
    arr[:, 32:] = (40, 40, 220)
    return Image.fromarray(arr)


def test_loopback_feeds_each_output_back_in(svc):
    params = Img2ImgParams(prompt="a fox", init_images=[_init_image()], denoising_strength=0.75, **SMALL)
    processed = run(svc, params, "loopback", [3, 0.5, "Linear", "None"])
    assert processed.index_of_first_image == 1 and len(processed.images) == 4     # grid + 3 loops
    assert processed.images[0].size == (3 * 64, 64)
    got = infos(processed)
    assert [i["Denoising strength"] for i in got] == ["0.75", "0.625", "0.5"]
    assert [i["Seed"] for i in got] == ["123", "124", "125"]
    assert got[0]["Denoising curve"] == "Linear" and got[0]["Final denoising strength"] == "0.5"
    assert len(PROBE) == 3 and {rec["job_count"] for rec in PROBE} == {3}
    assert np.array_equal(PROBE[0]["init"], np.asarray(_init_image()))
    for k in range(2):   # loop k+1 started from loop k's output
        assert np.array_equal(PROBE[k + 1]["init"], np.asarray(processed.images[1 + k].convert("RGB")))


def test_loopback_batches_restart_from_the_init_image(svc):
    params = Img2ImgParams(prompt="a fox", init_images=[_init_image()], denoising_strength=0.6, n_iter=2,
                           batch_size=2, **SMALL)
    processed = run(svc, params, "loopback", [2, 0.2, "Aggressive", "None"])
    assert len(processed.images) == 5 and processed.images[0].size == (2 * 64, 2 * 64)   # a row per batch
    assert [i["Denoising strength"] for i in infos(processed)] == ["0.6", "0.2", "0.6", "0.2"]
    assert [rec["job_count"] for rec in PROBE] == [4] * 4
    assert np.array_equal(PROBE[2]["init"], np.asarray(_init_image()))


def test_loopback_rejects_interrogation(svc):
    params = Img2ImgParams(prompt="a fox", init_images=[_init_image()], **SMALL)
    with pytest.raises(ProcessingError, match="interrogation"):
        run(svc, params, "loopback", [2, 0.5, "Linear", "CLIP"])


# --------------------------------------------------------------------------- through the API

@pytest.fixture(scope="module")
def api(tmp_path_factory):
    root = tmp_path_factory.mktemp("builtin_api")
    ckpt_dir = root / "models" / "Stable-diffusion"
    ckpt_dir.mkdir(parents=True)
    make_checkpoint(ckpt_dir / "tiny.safetensors", "sd1")
    srv = start_server(root, "--api")
    yield srv
    srv.stop()


def test_prompt_matrix_through_the_api(api):
    scripts_list = requests.get(f"{api.url}/sdapi/v1/scripts", timeout=60).json()
    assert {"prompt matrix", "prompts from file or textbox"} <= set(scripts_list["txt2img"])
    assert "loopback" in scripts_list["img2img"] and "loopback" not in scripts_list["txt2img"]
    payload = {"prompt": "a | b | c", "width": 64, "height": 64, "steps": 1, "seed": 5, "sampler_name": "Euler",
               "script_name": "prompt matrix", "script_args": [False, True, "positive", "comma", 0]}
    response = requests.post(f"{api.url}/sdapi/v1/txt2img", json=payload, timeout=300)
    assert response.status_code == 200, response.text
    body = response.json()
    info = json.loads(body["info"])
    assert info["all_prompts"] == ["a", "a, b", "a, c", "a, b, c"]
    assert info["all_seeds"] == [5, 6, 7, 8]
    assert info["index_of_first_image"] == 1 and len(body["images"]) == 5
    grid = Image.open(io.BytesIO(base64.b64decode(body["images"][0])))
    assert grid.width > 128 and grid.height > 128
    for name in SCRIPT_FILES.values():   # no script failed to load or to build its UI
        assert Path(name).name not in api.output, api.output
    bad = requests.post(f"{api.url}/sdapi/v1/txt2img", timeout=60, json={
        **payload, "script_name": "prompts from file or textbox", "script_args": [False, False, "start", "--steps x"]})
    assert bad.status_code == 422 and "--steps" in bad.text

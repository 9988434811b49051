"""An example extension, written as for AUTOMATIC1111's web UI.

An always-visible script that appends a suffix to the prompt, a setting, an HTTP route, a tab of
its own, and one handler for each script callback. The counters it keeps are served by the route,
so a test (or a curious user) can see which callbacks fired.
"""
from pathlib import Path

import gradio as gr

from modules import script_callbacks, scripts, shared
from modules.ui_components import FormRow, InputAccordion, ToolButton

EXTENSION_DIR = Path(__file__).resolve().parent.parent

COUNTS = {
    "before_ui": 0, "model_loaded": 0, "cfg_denoiser": 0, "cfg_denoised": 0, "before_image_saved": 0,
    "image_saved": 0, "infotext_pasted": 0,
}
INNER_MODELS = set()


def data_dir():
    """Where this extension keeps its files: the web UI's --data-dir, else its own folder."""
    return Path(shared.cmd_opts.data_dir) if shared.cmd_opts.data_dir else EXTENSION_DIR


class ExampleScript(scripts.Script):
    def title(self):
        return "Example"

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def ui(self, is_img2img):
        with gr.Accordion("Example", open=False, elem_id=self.elem_id("accordion")):
            enabled = gr.Checkbox(False, label="Enable", elem_id=self.elem_id("enabled"))
            suffix = gr.Textbox("", label="Prompt suffix", elem_id=self.elem_id("suffix"))
        # ↙ and "Send to" fill these from an infotext: a label, or a function of the parsed fields.
        self.infotext_fields = [
            (enabled, lambda params: "Example suffix" in params),
            (suffix, "Example suffix"),
        ]
        return [enabled, suffix]

    def process(self, p, enabled, suffix):
        # p.all_prompts already holds one prompt per image here; edit them, not p.prompt.
        if not enabled or not suffix:
            return
        p.all_prompts = [f"{prompt}, {suffix}" for prompt in p.all_prompts]
        p.extra_generation_params["Example suffix"] = suffix


def on_app_started(demo, app):
    def ping():
        return {
            "pong": True,
            "flag": shared.cmd_opts.example_flag,
            "setting": shared.opts.example_setting,
            "counts": COUNTS,
            "inner_models": sorted(INNER_MODELS),
        }

    app.get("/example/ping")(ping)


def on_ui_settings():
    shared.opts.add_option("example_setting", shared.OptionInfo(
        "hello", "Example setting", section=("example", "Example")))


def on_ui_tabs():
    with gr.Blocks(analytics_enabled=False) as tab:
        gr.Markdown("The example extension's own tab.", elem_classes=["example-note"])
        with InputAccordion(False, label="Example options", elem_id="example_options") as options_on:
            with FormRow():
                state = gr.Textbox("", label="State", elem_id="example_state")
                check = ToolButton("🔍", elem_id="example_check")
        check.click(lambda on: f"options on: {on}", inputs=[options_on], outputs=[state])
    return [(tab, "Example tab", "example_tab")]


def count(name):
    COUNTS[name] += 1


def on_cfg_denoised(params):
    count("cfg_denoised")
    if params.inner_model is not None:
        INNER_MODELS.add(type(params.inner_model).__name__)


def on_before_image_saved(params):
    count("before_image_saved")
    params.pnginfo["example"] = "seen by the example extension"


def on_image_saved(params):
    count("image_saved")
    with open(data_dir() / "example-saved.txt", "a", encoding="utf-8") as log:
        log.write(params.filename + "\n")


def on_infotext_pasted(infotext, params):
    # The infotext's prompt has the suffix in it; take it out so generating again does not add it twice.
    count("infotext_pasted")
    suffix, prompt = params.get("Example suffix"), params.get("Prompt")
    if suffix and isinstance(prompt, str) and prompt.endswith(f", {suffix}"):
        params["Prompt"] = prompt[:-len(f", {suffix}")]


def on_script_unloaded():
    (data_dir() / "example-unloaded.txt").write_text("unloaded", encoding="utf-8")


script_callbacks.on_app_started(on_app_started)
script_callbacks.on_ui_settings(on_ui_settings)
script_callbacks.on_ui_tabs(on_ui_tabs)
script_callbacks.on_before_ui(lambda: count("before_ui"))
script_callbacks.on_model_loaded(lambda sd_model: count("model_loaded"))
script_callbacks.on_cfg_denoiser(lambda params: count("cfg_denoiser"))
script_callbacks.on_cfg_denoised(on_cfg_denoised)
script_callbacks.on_before_image_saved(on_before_image_saved)
script_callbacks.on_image_saved(on_image_saved)
script_callbacks.on_infotext_pasted(on_infotext_pasted)
script_callbacks.on_script_unloaded(on_script_unloaded)

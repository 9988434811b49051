"""The Checkpoint Merger tab (A1111's): controls -> MergeParams -> a queued merge job, with progress and
Interrupt; the new checkpoint is in every checkpoint list when it is done."""
from __future__ import annotations

import html
from typing import Any

import gradio as gr

from modules.core.jobs import QueueFullError
from modules.core.merge_service import MergeParams, MergeService
from modules.models.merge_names import CONFIG_SOURCES, FORMATS, INTERP_METHODS, MergeError
from modules.services import Services
from modules.ui.common import ui_caller

POLL_SECONDS = 0.25

# The controls, in MergeParams' order (their values become its fields by these names).
FIELDS = ("primary_model_name", "secondary_model_name", "tertiary_model_name", "interp_method", "multiplier",
          "save_as_half", "custom_name", "checkpoint_format", "config_source", "bake_in_vae", "discard_weights",
          "save_metadata", "add_merge_recipe", "copy_metadata_fields", "metadata_json")


def _status(text: str, kind: str = "progress-text") -> str:
    return f"<div class='{kind}'>{html.escape(text)}</div>"


def build_merger_tab(services: Services) -> None:
    models = services.models
    with gr.Row(equal_height=False):
        with gr.Column(variant="compact"):
            gr.HTML("A merger of checkpoints: the result is saved in the checkpoint folder.",
                    elem_id="modelmerger_help")
            with gr.Row():
                primary = gr.Dropdown(models.titles(), label="Primary model (A)", elem_id="modelmerger_primary_model_name")
                secondary = gr.Dropdown(models.titles(), label="Secondary model (B)",
                                        elem_id="modelmerger_secondary_model_name")
                tertiary = gr.Dropdown(models.titles(), label="Tertiary model (C)",
                                       elem_id="modelmerger_tertiary_model_name")
                refresh = gr.Button("🔄", elem_id="modelmerger_refresh", size="sm", scale=0)
            custom_name = gr.Textbox(label="Custom Name (Optional)", elem_id="modelmerger_custom_name")
            multiplier = gr.Slider(0.0, 1.0, value=0.3, step=0.05, label="Multiplier (M) - set to 0 to get model A",
                                   elem_id="modelmerger_interp_amount")
            interp_method = gr.Radio(list(INTERP_METHODS), value="Weighted sum", label="Interpolation Method",
                                     elem_id="modelmerger_interp_method")
            with gr.Row():
                checkpoint_format = gr.Radio(list(FORMATS), value="safetensors", label="Checkpoint format",
                                             elem_id="modelmerger_checkpoint_format")
                save_as_half = gr.Checkbox(False, label="Save as float16", elem_id="modelmerger_save_as_half")
            config_source = gr.Radio(list(CONFIG_SOURCES), value=CONFIG_SOURCES[0], label="Copy config from",
                                     elem_id="modelmerger_config_method")
            with gr.Row():
                bake_in_vae = gr.Dropdown(["None", *models.vaes.names()], value="None", label="Bake in VAE",
                                          elem_id="modelmerger_bake_in_vae")
                discard_weights = gr.Textbox(label="Discard weights with matching name",
                                             elem_id="modelmerger_discard_weights")
            with gr.Accordion("Metadata", open=False):
                save_metadata = gr.Checkbox(True, label="Save metadata", elem_id="modelmerger_save_metadata")
                add_merge_recipe = gr.Checkbox(True, label="Add merge recipe metadata",
                                               elem_id="modelmerger_add_recipe")
                copy_metadata_fields = gr.Checkbox(True, label="Copy metadata from merged models",
                                                   elem_id="modelmerger_copy_metadata")
                metadata_json = gr.Textbox("{}", label="Metadata in JSON format", lines=3,
                                           elem_id="modelmerger_metadata_json")
            with gr.Row():
                merge = gr.Button("Merge", variant="primary", elem_id="modelmerger_merge")
                interrupt = gr.Button("Interrupt", elem_id="modelmerger_interrupt")
        with gr.Column():
            result = gr.HTML(elem_id="modelmerger_result")

    controls = [primary, secondary, tertiary, interp_method, multiplier, save_as_half, custom_name, checkpoint_format,
                config_source, bake_in_vae, discard_weights, save_metadata, add_merge_recipe, copy_metadata_fields,
                metadata_json]
    lists = [primary, secondary, tertiary, bake_in_vae]
    _connect(services, controls, lists, merge, interrupt, refresh, result)


def _list_updates(services: Services, picked: list[Any] | tuple[Any, ...] = (None, None, None)) -> list[Any]:
    """New choices for A, B, C and the VAE; a picked model keeps its place under its current title (hashing
    a source for the metadata adds `[hash]` to its title)."""
    registry = services.models.registry
    titles = services.models.titles()

    def current(value: Any) -> Any:
        info = registry.get_closest(value) if value else None
        return gr.update(choices=titles, value=info.title) if info is not None else gr.update(choices=titles)
    return [current(v) for v in picked] + [gr.update(choices=["None", *services.models.vaes.names()])]


def _connect(services: Services, controls: list[Any], lists: list[Any], merge: Any, interrupt: Any, refresh: Any,
             result: Any) -> None:
    queue = services.generation.queue
    keep = [gr.update()] * len(lists)

    def run(request: gr.Request, *values):
        params = MergeParams(**{name: ("" if value is None else value) for name, value in zip(FIELDS, values)})
        try:
            job = MergeService(services.models, queue).submit(params, owner=ui_caller(services, request).name)
        except (MergeError, QueueFullError) as err:
            yield _status(f"Error: {err}", "error"), *keep
            return
        while not job.wait(POLL_SECONDS):
            yield _status(_progress(services, job)), *keep
        try:
            done = job.result()
        except Exception as err:  # shown to the user; the queue keeps working
            yield _status(f"Error: {err}", "error"), *keep
            return
        yield _status(done.message), *_list_updates(services, values[:3])

    def stop(request: gr.Request) -> None:
        if queue.control(ui_caller(services, request), "interrupt") == "not yours":
            gr.Warning("The running job is another user's: only its owner or an admin may interrupt it.")

    def reload_lists(*picked):
        services.models.refresh()
        return _list_updates(services, picked)

    merge.click(run, inputs=controls, outputs=[result, *lists], concurrency_limit=None, show_progress="hidden")
    interrupt.click(stop, show_progress="hidden")
    refresh.click(reload_lists, inputs=lists[:3], outputs=lists, show_progress="hidden")


def _progress(services: Services, job: Any) -> str:
    queue = services.generation.queue
    if queue.running() is not job:
        return f"Waiting in the queue (position {queue.queue_position(job)})…"
    snap = services.generation.state.snapshot()
    step, total = snap["state"]["sampling_step"], snap["state"]["sampling_steps"]
    text = snap.get("textinfo") or "Merging checkpoints…"
    return f"{text} {step}/{total} tensors" if total else text

"""The Extras tab (A1111's): upscale and restore faces on one image, a batch of files, or a folder.

Builds a core.extras.ExtrasParams from the controls and runs it as one queued job
(core/extras_service.py), showing per-tile progress; results are saved to outputs/extras-images.
"""
from __future__ import annotations

import html
from dataclasses import dataclass
from typing import Any

import gradio as gr
from PIL import Image

from modules.services import Services
from modules.ui.common import POLL_SECONDS, progress_html, select_sets, tab_value, ui_caller

MODES = ("single", "batch", "directory")


@dataclass
class ExtrasUi:
    tabs: Any            # the Single Image / Batch Process / Batch from Directory tabs
    image: Any           # Single Image's input
    source_info: Any     # gr.State: the infotext of an image sent here (the browser round trip drops PNG chunks)
    mode: Any            # hidden, kept in the browser: which sub-tab is selected
    gallery: Any
    html_info: Any
    send_to_img2img: Any
    send_to_inpaint: Any


def _face_note(services: Services) -> str:
    faces = services.extras.faces
    missing = faces.missing() if faces is not None else ["face restoration is not set up"]
    if not missing:
        return ""
    items = "".join(f"<li>{html.escape(line)}</li>" for line in missing)
    return f"<div id='extras_face_files'><p>Face restoration needs these files:</p><ul>{items}</ul></div>"


def _unusable_note(services: Services) -> str:
    bad = [u for u in services.upscalers.infos() if not u.usable]
    if not bad:
        return ""
    items = "".join(f"<li>{html.escape(u.name)}: {html.escape(u.reason)}</li>" for u in bad)
    return f"<div id='extras_unusable'><p>Upscaler files that cannot be used:</p><ul>{items}</ul></div>"


def _params(v: dict[str, Any]) -> Any:
    from modules.core.extras import ExtrasParams

    return ExtrasParams(
        resize_mode=int(v["resize_mode"]), upscaling_resize=float(v["upscaling_resize"]),
        upscaling_resize_w=int(v["upscaling_resize_w"]), upscaling_resize_h=int(v["upscaling_resize_h"]),
        upscaling_crop=bool(v["upscaling_crop"]), upscaler_1=str(v["upscaler_1"] or "None"),
        upscaler_2=str(v["upscaler_2"] or "None"),
        extras_upscaler_2_visibility=float(v["extras_upscaler_2_visibility"]),
        gfpgan_visibility=float(v["gfpgan_visibility"]), codeformer_visibility=float(v["codeformer_visibility"]),
        codeformer_weight=float(v["codeformer_weight"]), upscale_first=bool(v["upscale_first"]))


def _batch_images(files: list | None) -> list[Image.Image]:
    images = []
    for item in files or []:
        path = item if isinstance(item, str) else getattr(item, "name", None) or getattr(item, "path", None)
        with Image.open(path) as img:
            img.load()
            images.append(img.copy())
    return images


def _submit(services: Services, request: Any, v: dict[str, Any]):
    """(job, error message)."""
    from modules.core.pipeline import ProcessingError

    params = _params(v)
    output_dir = None
    try:
        if v["mode"] == "directory":
            images, output_dir = services.extras.directory_images(v["input_dir"], v["output_dir"])
        elif v["mode"] == "batch":
            images = _batch_images(v["files"])
        else:
            images = [v["image"]] if v["image"] is not None else []
            if images and v["source_info"] and "parameters" not in images[0].info:
                images[0].info["parameters"] = v["source_info"]   # kept in the saved file, as A1111 does
        if not images:
            return None, "Nothing to process: add an image first."
        job = services.extras.submit(images, params, save=True, output_dir=output_dir,
                                     owner=ui_caller(services, request).name)
        return job, ""
    except (ProcessingError, OSError, ValueError) as err:
        return None, str(err)


def _run(services: Services, names: list[str]):
    def run(request: gr.Request, *values):
        from modules.core.extras import info_text

        v = dict(zip(names, values))
        job, error = _submit(services, request, v)
        if job is None:
            yield gr.update(), "", f"<div class='error'>{html.escape(error)}</div>"
            return
        generation = services.generation
        while not job.wait(POLL_SECONDS):
            yield gr.update(), "", progress_html(generation.state.snapshot(), generation.queue.queue_position(job))
        try:
            result = job.result()
        except Exception as err:  # shown to the user; the queue keeps working
            yield gr.update(), "", f"<div class='error'>Error: {html.escape(str(err))}</div>"
            return
        note = " (interrupted)" if result.interrupted else ""
        shown = [str(p) for p in result.paths] if result.paths else result.images
        if v["mode"] == "directory" and not v["show_results"]:
            shown = []
        info = html.escape(info_text(result.info))
        yield shown, f"<p id='extras_info'>{info}</p>", f"<div class='progress-text'>Done{note}.</div>"
    return run


def _build_inputs() -> dict[str, Any]:
    c: dict[str, Any] = {}
    with gr.Tabs(elem_id="mode_extras") as c["tabs"]:
        with gr.Tab("Single Image", id="single", elem_id="extras_single_tab") as single:
            c["image"] = gr.Image(label="Source", type="pil", image_mode=None, sources=["upload", "clipboard"],
                                  elem_id="extras_image", height=360)
        with gr.Tab("Batch Process", id="batch", elem_id="extras_batch_process_tab") as batch:
            c["files"] = gr.File(label="Batch Process", file_count="multiple", elem_id="extras_image_batch")
        with gr.Tab("Batch from Directory", id="directory", elem_id="extras_batch_directory_tab") as directory:
            c["input_dir"] = gr.Textbox(label="Input directory", elem_id="extras_batch_input_dir",
                                        placeholder="A folder inside the data folder")
            c["output_dir"] = gr.Textbox(label="Output directory", elem_id="extras_batch_output_dir",
                                         placeholder="Empty: outputs/extras-images")
            c["show_results"] = gr.Checkbox(True, label="Show result images", elem_id="extras_show_extras_results")
    c["mode"] = tab_value("single", "extras_mode")
    c["source_info"] = gr.State(None)
    c["image"].upload(lambda: None, outputs=c["source_info"], show_progress="hidden")   # a new file has its own
    for tab, mode in ((single, "single"), (batch, "batch"), (directory, "directory")):
        select_sets(tab, [c["mode"]], [mode])
    return c


def _build_upscale_controls(services: Services) -> dict[str, Any]:
    from modules.engine.upscaling import image_upscaler_names

    c: dict[str, Any] = {"resize_mode": tab_value(0, "extras_resize_mode_value")}
    with gr.Tabs(elem_id="extras_resize_mode"):
        with gr.Tab("Scale by", id="scale_by", elem_id="extras_scale_by_tab") as by:
            c["upscaling_resize"] = gr.Slider(1, 8, value=4, step=0.05, label="Resize",
                                              elem_id="extras_upscaling_resize")
        with gr.Tab("Scale to", id="scale_to", elem_id="extras_scale_to_tab") as to:
            with gr.Row():
                c["upscaling_resize_w"] = gr.Slider(64, 8192, value=512, step=8, label="Width",
                                                    elem_id="extras_upscaling_resize_w")
                c["upscaling_resize_h"] = gr.Slider(64, 8192, value=512, step=8, label="Height",
                                                    elem_id="extras_upscaling_resize_h")
            c["upscaling_crop"] = gr.Checkbox(True, label="Crop to fit", elem_id="extras_upscaling_crop")
    select_sets(by, [c["resize_mode"]], [0])
    select_sets(to, [c["resize_mode"]], [1])
    names = image_upscaler_names()
    with gr.Row():
        c["upscaler_1"] = gr.Dropdown(names, value="None", label="Upscaler 1", elem_id="extras_upscaler_1")
        c["refresh"] = gr.Button("🔄", elem_id="extras_refresh_upscalers", size="sm", scale=0, min_width=40)
    with gr.Row():
        c["upscaler_2"] = gr.Dropdown(names, value="None", label="Upscaler 2", elem_id="extras_upscaler_2")
        c["extras_upscaler_2_visibility"] = gr.Slider(0, 1, value=0, step=0.001, label="Upscaler 2 visibility",
                                                      elem_id="extras_upscaler_2_visibility")
    c["unusable"] = gr.HTML("")   # filled by 🔄: probing the files imports torch, never done at startup
    return c


def _build_face_controls(services: Services) -> dict[str, Any]:
    c: dict[str, Any] = {}
    with gr.Accordion("Restore faces", open=False, elem_id="extras_face_restore"):
        c["gfpgan_visibility"] = gr.Slider(0, 1, value=0, step=0.001, label="GFPGAN visibility",
                                           elem_id="extras_gfpgan_visibility")
        c["codeformer_visibility"] = gr.Slider(0, 1, value=0, step=0.001, label="CodeFormer visibility",
                                               elem_id="extras_codeformer_visibility")
        c["codeformer_weight"] = gr.Slider(0, 1, value=0, step=0.001, label="CodeFormer weight (0 = maximum effect, 1 = minimum effect)",
                                           elem_id="extras_codeformer_weight")
        c["upscale_first"] = gr.Checkbox(False, label="Upscale before restoring faces", elem_id="extras_upscale_before_face_fix")
        gr.HTML(_face_note(services))
    return c


def build_extras_tab(services: Services) -> ExtrasUi:
    with gr.Row(equal_height=False):
        with gr.Column(variant="panel"):
            c = _build_inputs()
            generate = gr.Button("Generate", variant="primary", elem_id="extras_generate")
            c.update(_build_upscale_controls(services))
            c.update(_build_face_controls(services))
        with gr.Column(variant="panel"):
            progress = gr.HTML("", elem_id="extras_progress")
            interrupt = gr.Button("Interrupt", elem_id="extras_interrupt", size="sm")
            gallery = gr.Gallery(label="Result", elem_id="extras_gallery", format="png", columns=2,
                                 object_fit="contain", height="auto", show_label=False)
            with gr.Row():
                send_to_img2img = gr.Button("🖼️ Send to img2img", elem_id="extras_send_to_img2img", size="sm")
                send_to_inpaint = gr.Button("🎨️ Send to inpaint", elem_id="extras_send_to_inpaint", size="sm")
            html_info = gr.HTML("", elem_id="extras_html_info")
    names = ["mode", "image", "source_info", "files", "input_dir", "output_dir", "show_results", "resize_mode", "upscaling_resize",
             "upscaling_resize_w", "upscaling_resize_h", "upscaling_crop", "upscaler_1", "upscaler_2",
             "extras_upscaler_2_visibility", "gfpgan_visibility", "codeformer_visibility", "codeformer_weight",
             "upscale_first"]
    generate.click(_run(services, names), inputs=[c[n] for n in names], outputs=[gallery, html_info, progress],
                   show_progress="hidden")

    def do_interrupt(request: gr.Request) -> None:
        if services.generation.queue.control(ui_caller(services, request), "interrupt") == "not yours":
            gr.Warning("The running job is another user's: only its owner or an admin may interrupt it.")
    interrupt.click(do_interrupt, show_progress="hidden")
    _connect_refresh(services, c)
    return ExtrasUi(tabs=c["tabs"], image=c["image"], source_info=c["source_info"], mode=c["mode"], gallery=gallery, html_info=html_info,
                    send_to_img2img=send_to_img2img, send_to_inpaint=send_to_inpaint)


def _connect_refresh(services: Services, c: dict[str, Any]) -> None:
    def refresh():
        from modules.engine.upscaling import image_upscaler_names

        services.upscalers.refresh()
        names = image_upscaler_names()
        return gr.update(choices=names), gr.update(choices=names), _unusable_note(services)
    c["refresh"].click(refresh, outputs=[c["upscaler_1"], c["upscaler_2"], c["unusable"]], show_progress="hidden")


def connect_send_to_extras(ui: ExtrasUi, top_tabs: Any, button: Any, read: Any, inputs: list[Any]) -> None:
    """A "Send to extras" button: `read(*inputs)` gives (infotext, PIL image); the image becomes Single
    Image's source and the Extras tab opens."""
    def send(*values):
        text, image = read(*values)
        if image is None:
            return [gr.update()] * 5
        text = text or (image.info.get("parameters") if hasattr(image, "info") else None)
        return gr.Tabs(selected="extras"), gr.Tabs(selected="single"), "single", image, text
    button.click(send, inputs=inputs, outputs=[top_tabs, ui.tabs, ui.mode, ui.image, ui.source_info],
                 show_progress="hidden")

"""The img2img tab: img2img, Sketch, Inpaint, Inpaint sketch, Inpaint upload and Batch sub-tabs
-> Img2ImgParams -> the shared job queue -> gallery + infotext (the txt2img pattern).

What each sub-tab gives the job (A1111's modes 0-5):
  img2img         the image
  Sketch          the editor's composite (image + coloured strokes) as the image
  Inpaint         the editor's background as the image; every non-transparent brush pixel is masked
  Inpaint sketch  the composite as the image; where strokes were drawn is masked
  Inpaint upload  an image and a separate mask image (white = repaint, or a transparent PNG's alpha)
  Batch           every image of a folder (modules.img2img_batch)
"""
from __future__ import annotations

import html
import threading
from dataclasses import dataclass, field
from typing import Any

import gradio as gr
import numpy as np
from PIL import Image

from modules.core.img2img_batch import PNG_INFO_PROPS, run_batch
from modules.core.infotext import INPAINT_AREAS, MASK_MODES
from modules.core.masking import flatten, prepare_mask
from modules.core.jobs import QueueFullError
from modules.core.pipeline import MASKED_CONTENT, RESIZE_MODES, Img2ImgParams, ProcessingError
from modules.ui.depth_input import build_depth_input
from modules.services import Services
from modules.ui.controlnet_ui import MAX_UNITS, build_controlnet_ui, units_from_values
from modules.ui.common import (POLL_SECONDS, ControlsBase, build_batch_controls, build_output_panel,
                               build_sampling_controls, build_seed_controls, build_toprow, connect_tab_helpers,
                               error_updates, infotext_html, paste_targets, poll_job, progress_html, script_job,
                               select_sets, tab_value, ui_caller)
from modules.core.styles import apply_styles_to_params
from modules.ui import paste
from modules.ui.styles_ui import StylesUi
from modules.ui.extra_networks import build_extra_networks

# Sub-tab ids in A1111's order; the index is A1111's img2img "mode".
MODES = ("img2img", "sketch", "inpaint", "inpaint_sketch", "inpaint_upload", "batch")
MODE_ELEM_IDS = ("img2img_img2img_tab", "img2img_img2img_sketch_tab", "img2img_inpaint_tab",
                 "img2img_inpaint_sketch_tab", "img2img_inpaint_upload_tab", "img2img_batch_tab")
MODE_LABELS = ("img2img", "Sketch", "Inpaint", "Inpaint sketch", "Inpaint upload", "Batch")
INPAINT_MODES = (2, 3, 4, 5)


@dataclass
class Img2ImgControls(ControlsBase):
    """Every component whose value becomes a field of Img2ImgParams. Radios hold their labels."""
    prompt: Any
    negative_prompt: Any
    sampler_name: Any
    scheduler: Any
    steps: Any
    resize_mode: Any
    width: Any
    height: Any
    scale_by: Any
    batch_count: Any
    batch_size: Any
    cfg_scale: Any
    denoising_strength: Any
    seed: Any
    subseed: Any
    subseed_strength: Any
    seed_resize_from_w: Any
    seed_resize_from_h: Any
    tiling: Any
    mask_blur: Any
    mask_mode: Any
    inpainting_fill: Any
    inpaint_full_res: Any
    inpaint_full_res_padding: Any

    @classmethod
    def to_params(cls, values: list[Any] | dict[str, Any], *, init_images: list[Any] | None = None,
                  mask: Any = None) -> Img2ImgParams:
        v = values if isinstance(values, dict) else dict(zip(cls.names(), values))

        def num(key: str, default: int = -1) -> int:
            return int(v[key]) if v.get(key) not in (None, "") else default
        return Img2ImgParams(
            prompt=v["prompt"] or "", negative_prompt=v["negative_prompt"] or "",
            sampler_name=v["sampler_name"], scheduler=v["scheduler"], steps=int(v["steps"]),
            resize_mode=_index(RESIZE_MODES, v["resize_mode"]),
            width=int(v["width"]), height=int(v["height"]), n_iter=int(v["batch_count"]),
            batch_size=int(v["batch_size"]), cfg_scale=float(v["cfg_scale"]),
            denoising_strength=float(v["denoising_strength"]),
            seed=num("seed"), subseed=num("subseed"), subseed_strength=float(v["subseed_strength"]),
            seed_resize_from_w=int(v["seed_resize_from_w"]), seed_resize_from_h=int(v["seed_resize_from_h"]),
            tiling=bool(v["tiling"]),
            init_images=list(init_images or []), mask=mask, mask_blur=int(v["mask_blur"]),
            inpainting_mask_invert=_index(MASK_MODES, v["mask_mode"]) == 1,
            inpainting_fill=_index(MASKED_CONTENT, v["inpainting_fill"]),
            inpaint_full_res=_index(INPAINT_AREAS, v["inpaint_full_res"]) == 1,
            inpaint_full_res_padding=int(v["inpaint_full_res_padding"]),
        )


def _index(choices: tuple[str, ...], value: Any) -> int:
    if isinstance(value, int):
        return value
    if value not in choices:
        raise ProcessingError(f"{value!r} is not one of {', '.join(choices)}")
    return choices.index(value)


# --------------------------------------------------------------------------- editor values -> images


def _alpha_mask(layers: list[Any] | None, size: tuple[int, int]) -> Image.Image:
    """White wherever any brush layer has a non-transparent pixel."""
    mask = np.zeros((size[1], size[0]), dtype=bool)
    for layer in layers or []:
        if layer is None:
            continue
        rgba = layer.convert("RGBA")
        if rgba.size != size:
            rgba = rgba.resize(size, Image.Resampling.NEAREST)
        mask |= np.asarray(rgba.getchannel("A")) > 0
    return Image.fromarray(np.where(mask, 255, 0).astype(np.uint8), "L")


def _editor_background(value: dict | None) -> Image.Image | None:
    if not value:
        return None
    return value.get("background") or value.get("composite")


def images_for_mode(mode: int, *, init_img: Any = None, sketch: dict | None = None, inpaint: dict | None = None,
                    inpaint_sketch: dict | None = None, upload_img: Any = None,
                    upload_mask: Any = None) -> tuple[Image.Image, Image.Image | None]:
    """(init image, mask or None) from the sub-tab's inputs; raises ProcessingError if one is missing."""
    if mode == 0:
        if init_img is None:
            raise ProcessingError("img2img needs an image: drop one in the img2img tab")
        return flatten(init_img), None
    if mode == 1:
        composite = (sketch or {}).get("composite") if sketch else None
        if composite is None:
            raise ProcessingError("Sketch needs an image: upload one and draw on it")
        return flatten(composite), None
    if mode == 2:
        background = _editor_background(inpaint)
        if background is None:
            raise ProcessingError("Inpaint needs an image: upload one and paint the mask over it")
        return flatten(background), _alpha_mask(inpaint.get("layers"), background.size)
    if mode == 3:
        composite = (inpaint_sketch or {}).get("composite") if inpaint_sketch else None
        if composite is None:
            raise ProcessingError("Inpaint sketch needs an image: upload one and draw on it")
        return flatten(composite), _alpha_mask(inpaint_sketch.get("layers"), composite.size)
    if mode == 4:
        if upload_img is None or upload_mask is None:
            raise ProcessingError("Inpaint upload needs both an image and a mask")
        return flatten(upload_img), upload_mask
    raise ProcessingError(f"unknown img2img mode {mode}")


def scaled_size(image: Image.Image, scale: float) -> tuple[int, int]:
    """A1111's "Resize by": the init image size times the scale, here rounded to multiples of 8."""
    return (max(64, int(round(image.width * float(scale) / 8)) * 8),
            max(64, int(round(image.height * float(scale) / 8)) * 8))


@dataclass
class Img2ImgUi:
    controls: Img2ImgControls
    styles: StylesUi
    override_settings: Any
    tabs: Any                   # the sub-tab strip
    mode: Any                   # hidden, kept in the browser: index into MODES
    init_img: Any
    sketch: Any
    inpaint: Any
    inpaint_sketch: Any
    upload_img: Any
    upload_mask: Any
    inpaint_controls: Any       # the group shown for the inpaint modes
    paste_button: Any
    gallery: Any
    generation_info: Any
    paste_targets: dict[str, Any] = field(default_factory=dict)


def build_img2img_tab(services: Services) -> Img2ImgUi:
    top = build_toprow("img2img", services)
    networks = build_extra_networks(services, "img2img", top)
    mode = tab_value(0, "img2img_mode")
    scale_tab = tab_value(0, "img2img_scale_tab")
    with gr.Row():
        with gr.Column(scale=1):
            inputs = _build_mode_tabs(services.options.dir_config_locked)
            resize_mode = gr.Radio(list(RESIZE_MODES), value=RESIZE_MODES[0], label="Resize mode",
                                   elem_id="resize_mode")
            sampling = build_sampling_controls("img2img")
            size = _build_size_controls()
            cfg_scale = gr.Slider(1, 30, value=7, step=0.5, label="CFG Scale", elem_id="img2img_cfg_scale")
            denoising_strength = gr.Slider(0, 1, value=0.75, step=0.01, label="Denoising strength",
                                           elem_id="img2img_denoising_strength")
            seeds = build_seed_controls("img2img")
            inpaint_controls, inpaint = _build_inpaint_controls()
            depth_image = build_depth_input()
            controlnet = build_controlnet_ui("img2img", services)
            script_runner = services.script_runner(True)
            script_runner.setup_ui()
        with gr.Column(scale=1):
            output = build_output_panel("img2img", buttons=lambda: gr.Button(  # wired by ui/app.py
                "📐 Send to extras", elem_id="img2img_send_to_extras", size="sm"))
    networks.connect_gallery(output.gallery)

    controls = Img2ImgControls(prompt=top.prompt, negative_prompt=top.negative_prompt, **sampling,
                               resize_mode=resize_mode, width=size.width, height=size.height, scale_by=size.scale_by,
                               batch_count=size.batch_count, batch_size=size.batch_size, cfg_scale=cfg_scale,
                               denoising_strength=denoising_strength, **seeds.controls(), **inpaint)
    _connect_mode_tabs(inputs, size, mode, scale_tab, inpaint_controls)
    running_batches = _connect_generate(services, top, controls, script_runner, output,
                                        {"mode": mode, "scale_tab": scale_tab, "styles": top.styles_ui.dropdown,
                                         "override_settings": top.override_settings, **inputs.values(),
                                         "depth_image": depth_image, **controlnet.inputs})

    def stop_batches(caller: Any) -> None:  # the Batch tab's loops of the caller (an admin: all of them)
        for event, owner in list(running_batches.items()):
            if caller.admin or owner == caller.name:
                event.set()

    connect_tab_helpers(top, seeds, output, services, on_interrupt=stop_batches)
    return Img2ImgUi(controls=controls, styles=top.styles_ui, override_settings=top.override_settings,
                     tabs=inputs.tabs, mode=mode, init_img=inputs.init_img, sketch=inputs.sketch,
                     inpaint=inputs.inpaint, inpaint_sketch=inputs.inpaint_sketch, upload_img=inputs.upload_img,
                     upload_mask=inputs.upload_mask, inpaint_controls=inpaint_controls,
                     paste_button=top.paste_button, gallery=output.gallery, generation_info=output.generation_info,
                     paste_targets={**paste_targets(controls, top, script_runner), **controlnet.paste_targets()})


# --------------------------------------------------------------------------- control groups

SKETCH_COLORS = ["#000000", "#ffffff", "#ff0000", "#00aa00", "#0000ff", "#ffff00"]


@dataclass
class _ModeInputs:
    """The sub-tab strip, its tabs (in MODES order) and what each takes."""
    tabs: Any
    mode_tabs: list[Any]
    init_img: Any
    sketch: Any
    inpaint: Any
    inpaint_sketch: Any
    upload_img: Any
    upload_mask: Any
    batch: dict[str, Any]       # the Batch tab's inputs, by generate-handler name

    def values(self) -> dict[str, Any]:
        """The generate handler's image and batch inputs, by name."""
        return {"init_img": self.init_img, "sketch": self.sketch, "inpaint": self.inpaint,
                "inpaint_sketch": self.inpaint_sketch, "upload_img": self.upload_img,
                "upload_mask": self.upload_mask, **self.batch}


def _editor(label: str, elem_id: str, colors: list[str], color_mode: str) -> Any:
    return gr.ImageEditor(label=label, type="pil", format="png", image_mode="RGBA", sources=["upload", "clipboard"],
                          elem_id=elem_id, height=420, brush=gr.Brush(colors=colors, color_mode=color_mode),
                          layers=False, transforms=())


def _build_mode_tabs(locked: bool = False) -> _ModeInputs:
    mode_tabs = []

    def mode_tab(i: int) -> Any:
        tab = gr.Tab(MODE_LABELS[i], id=MODES[i], elem_id=MODE_ELEM_IDS[i])
        mode_tabs.append(tab)
        return tab

    with gr.Tabs(elem_id="mode_img2img") as tabs:
        with mode_tab(0):
            init_img = gr.Image(label="Image for img2img", type="pil", image_mode="RGBA", format="png",
                                sources=["upload", "clipboard"], elem_id="img2img_image", height=420)
        with mode_tab(1):
            sketch = _editor("Image for img2img", "img2img_sketch", SKETCH_COLORS, "defaults")
        with mode_tab(2):
            inpaint = _editor("Image for inpainting with mask", "img2maskimg", ["#ffffff"], "fixed")
        with mode_tab(3):
            inpaint_sketch = _editor("Color sketch inpainting", "inpaint_sketch", SKETCH_COLORS, "defaults")
        with mode_tab(4):
            upload_img = gr.Image(label="Image for img2img", type="pil", image_mode="RGBA", format="png",
                                  sources=["upload", "clipboard"], elem_id="img_inpaint_base", height=300)
            upload_mask = gr.Image(label="Mask", type="pil", image_mode="RGBA", format="png",
                                   sources=["upload", "clipboard"], elem_id="img_inpaint_mask", height=300)
        with mode_tab(5):
            batch = _build_batch_inputs(locked)
    return _ModeInputs(tabs=tabs, mode_tabs=mode_tabs, init_img=init_img, sketch=sketch, inpaint=inpaint,
                       inpaint_sketch=inpaint_sketch, upload_img=upload_img, upload_mask=upload_mask, batch=batch)


def _build_batch_inputs(locked: bool = False) -> dict[str, Any]:
    """`locked`: a server reachable from other machines without --allow-dir-config; its folders are read-only."""
    gr.Markdown("Process every image of a folder on the server. Leave the output folder empty "
                "to save into the usual img2img output folder. Add a mask folder for batch "
                "inpainting (one mask for all, or one per image with the same file name)."
                + (" Folders cannot be chosen on this server (it is reachable from other machines; "
                   "see --allow-dir-config)." if locked else ""))
    batch_input = gr.Textbox(label="Input directory", elem_id="img2img_batch_input_dir", interactive=not locked)
    batch_output = gr.Textbox(label="Output directory", elem_id="img2img_batch_output_dir", interactive=not locked)
    batch_mask = gr.Textbox(label="Inpaint batch mask directory (required for inpaint batch processing only)",
                            elem_id="img2img_batch_inpaint_mask_dir", interactive=not locked)
    with gr.Accordion("PNG info", open=False):
        batch_use_png = gr.Checkbox(False, label="Append png info to prompts", elem_id="img2img_batch_use_png_info")
        batch_png_dir = gr.Textbox(label="PNG info directory (empty: the input images)",
                                   elem_id="img2img_batch_png_info_dir", interactive=not locked)
        batch_png_props = gr.CheckboxGroup(list(PNG_INFO_PROPS), value=list(PNG_INFO_PROPS),
                                           label="Parameters to take from png info",
                                           elem_id="img2img_batch_png_info_props")
    return {"batch_input": batch_input, "batch_output": batch_output, "batch_mask": batch_mask,
            "batch_use_png": batch_use_png, "batch_png_dir": batch_png_dir, "batch_png_props": batch_png_props}


@dataclass
class _SizeControls:
    """"Resize to" / "Resize by" sub-tabs, and batch count and size beside them."""
    width: Any
    height: Any
    scale_by: Any
    scale_note: Any
    tab_scale_to: Any
    tab_scale_by: Any
    batch_count: Any
    batch_size: Any


def _build_size_controls() -> _SizeControls:
    with gr.Row():
        with gr.Column(scale=4):
            with gr.Tabs(elem_id="img2img_tabs_resize"):
                with gr.Tab("Resize to", elem_id="img2img_tab_resize_to") as tab_scale_to:
                    width = gr.Slider(64, 2048, value=512, step=8, label="Width", elem_id="img2img_width")
                    height = gr.Slider(64, 2048, value=512, step=8, label="Height", elem_id="img2img_height")
                with gr.Tab("Resize by", elem_id="img2img_tab_resize_by") as tab_scale_by:
                    scale_by = gr.Slider(0.05, 4, value=1, step=0.05, label="Scale", elem_id="img2img_scale")
                    scale_note = gr.Markdown("", elem_id="img2img_scale_resolution_preview")
        batch = build_batch_controls("img2img")
    return _SizeControls(width=width, height=height, scale_by=scale_by, scale_note=scale_note,
                         tab_scale_to=tab_scale_to, tab_scale_by=tab_scale_by, **batch)


def _build_inpaint_controls() -> tuple[Any, dict[str, Any]]:
    """The group shown for the inpaint modes, and its controls by name."""
    with gr.Group(visible=False, elem_id="img2img_inpaint_controls") as group:
        mask_blur = gr.Slider(0, 64, value=4, step=1, label="Mask blur", elem_id="img2img_mask_blur")
        mask_mode = gr.Radio(list(MASK_MODES), value=MASK_MODES[0], label="Mask mode", elem_id="img2img_mask_mode")
        inpainting_fill = gr.Radio(list(MASKED_CONTENT), value="original", label="Masked content",
                                   elem_id="img2img_inpainting_fill")
        with gr.Row():
            inpaint_full_res = gr.Radio(list(INPAINT_AREAS), value=INPAINT_AREAS[0], label="Inpaint area",
                                        elem_id="img2img_inpaint_full_res")
            inpaint_full_res_padding = gr.Slider(0, 256, value=32, step=4, label="Only masked padding, pixels",
                                                 elem_id="img2img_inpaint_full_res_padding")
    return group, {"mask_blur": mask_blur, "mask_mode": mask_mode, "inpainting_fill": inpainting_fill,
                   "inpaint_full_res": inpaint_full_res, "inpaint_full_res_padding": inpaint_full_res_padding}


# --------------------------------------------------------------------------- events


def _connect_mode_tabs(inputs: _ModeInputs, size: _SizeControls, mode: Any, scale_tab: Any,
                       inpaint_controls: Any) -> None:
    """Which sub-tab (mode) and which resize tab are selected, and the "Resize by" size preview."""
    for index, tab in enumerate(inputs.mode_tabs):
        select_sets(tab, [mode, inpaint_controls], [index, {"__type__": "update", "visible": index in INPAINT_MODES}])
    select_sets(size.tab_scale_to, [scale_tab], [0])
    select_sets(size.tab_scale_by, [scale_tab], [1])

    def scale_preview(m, scale, img, sk, inp, insk, up):
        try:
            image, _ = images_for_mode(int(m), init_img=img, sketch=sk, inpaint=inp, inpaint_sketch=insk,
                                       upload_img=up, upload_mask=up)
        except ProcessingError:
            return "Resize by: no image."
        w, h = scaled_size(image, scale)
        return f"Resize by: from {image.width}x{image.height} to {w}x{h}"

    scale_inputs = [mode, size.scale_by, inputs.init_img, inputs.sketch, inputs.inpaint, inputs.inpaint_sketch,
                    inputs.upload_img]
    size.scale_by.release(scale_preview, inputs=scale_inputs, outputs=size.scale_note, show_progress="hidden")
    size.tab_scale_by.select(scale_preview, inputs=scale_inputs, outputs=size.scale_note, show_progress="hidden")


def _connect_generate(services: Services, top: Any, controls: Img2ImgControls, script_runner: Any, output: Any,
                      extra_inputs: dict[str, Any]) -> dict[threading.Event, str | None]:
    """Generate: the sub-tab's image(s) or the Batch tab's folder -> jobs, polled into the output panel.
    Returns the stop events of the running batches (with their owners), for Interrupt."""
    extra_names = list(extra_inputs)
    n_controls = len(controls.components())
    running_batches: dict[threading.Event, str | None] = {}

    def run(request: gr.Request, *values):
        owner = ui_caller(services, request).name
        extra = dict(zip(extra_names, values[:len(extra_names)]))
        control_values = dict(zip(Img2ImgControls.names(), values[len(extra_names):len(extra_names) + n_controls]))
        script_args = list(values[len(extra_names) + n_controls:])
        overrides = paste.overrides_from_choices(extra["override_settings"], services.options)
        if int(extra["mode"] or 0) == 5:
            yield from _run_batch_mode(services, script_runner, running_batches, extra, control_values, overrides,
                                       script_args, owner)
        else:
            yield from _run_one(services, script_runner, extra, control_values, overrides, script_args, owner)

    top.generate.click(run, inputs=[*extra_inputs.values(), *controls.components(), *script_runner.script_inputs],
                       outputs=output.outputs(), concurrency_limit=None, show_progress="hidden",
                       trigger_mode="multiple")  # Generate while a job runs queues another (Queue tab)
    return running_batches


def _run_one(services: Services, script_runner: Any, extra: dict[str, Any], control_values: dict[str, Any],
             overrides: dict[str, Any], script_args: list[Any], owner: str | None = None):
    """One job on the sub-tab's image (and mask)."""
    generation = services.generation
    try:
        init, mask = images_for_mode(int(extra["mode"] or 0), init_img=extra["init_img"], sketch=extra["sketch"],
                                     inpaint=extra["inpaint"], inpaint_sketch=extra["inpaint_sketch"],
                                     upload_img=extra["upload_img"], upload_mask=extra["upload_mask"])
        params = Img2ImgControls.to_params(control_values, init_images=[init], mask=mask)
        params.depth_image = extra.get("depth_image")
        params.controlnet_units = units_from_values(extra, MAX_UNITS)
        if extra["scale_tab"] == 1:
            params.width, params.height = scaled_size(init, control_values["scale_by"])
        if mask is not None and params.inpaint_full_res and _mask_empty(mask, params.inpainting_mask_invert):
            params.inpaint_full_res = False  # nothing to crop to: A1111 falls back to the whole picture
        apply_styles_to_params(params, services.styles, extra["styles"])
        params.validate(services.limits)
        job = generation.submit_img2img(params, override_settings=overrides,
                                        script=script_job(script_runner, script_args), owner=owner)
    except (ProcessingError, ValueError, QueueFullError) as err:
        yield error_updates(str(err))
        return
    yield from poll_job(generation, job)


def _run_batch_mode(services: Services, script_runner: Any, running_batches: dict[threading.Event, str | None],
                    extra: dict[str, Any], control_values: dict[str, Any], overrides: dict[str, Any],
                    script_args: list[Any], owner: str | None = None):
    """The Batch tab: run_batch in a thread (one queued job per file), its progress, then its summary."""
    generation = services.generation
    try:
        base = Img2ImgControls.to_params(control_values, init_images=[Image.new("RGB", (64, 64))])
        base.controlnet_units = units_from_values(extra, MAX_UNITS)
        apply_styles_to_params(base, services.styles, extra["styles"])
        base.validate(services.limits)
        if services.options.dir_config_locked:
            raise ProcessingError("Batch: input/output folders cannot be chosen on a server reachable from other "
                                  "machines (start it with --allow-dir-config to allow this)")
    except (ProcessingError, ValueError) as err:
        yield error_updates(str(err))
        return
    stop = threading.Event()
    outcome: dict[str, Any] = {}
    where = {"file": ""}

    def work():
        try:
            outcome["result"] = run_batch(
                generation, base, extra["batch_input"], extra["batch_output"], extra["batch_mask"],
                use_png_info=bool(extra["batch_use_png"]), png_info_props=extra["batch_png_props"] or [],
                png_info_dir=extra["batch_png_dir"] or None,
                scale_by=float(control_values["scale_by"]) if extra["scale_tab"] == 1 else None,
                should_stop=stop.is_set,
                on_file=lambda i, n, name: where.update(file=f"file {i + 1}/{n}: {name}"),
                submit_kwargs={"override_settings": overrides, "script": script_job(script_runner, script_args),
                               "owner": owner},
                root=None if services.limits.allow_dir_config else services.paths.data_dir)
        except Exception as err:  # noqa: BLE001 - shown to the user
            outcome["error"] = err

    running_batches[stop] = owner
    thread = threading.Thread(target=work, name="img2img-batch", daemon=True)
    thread.start()
    try:
        while thread.is_alive():
            thread.join(POLL_SECONDS)
            text = html.escape(where["file"])
            yield (gr.update(), "", f"<div class='progress-text'>Batch: {text}</div>"
                   + progress_html(generation.state.snapshot(), 0), gr.update())
    finally:
        running_batches.pop(stop, None)
    yield _batch_summary_updates(outcome)


def _batch_summary_updates(outcome: dict[str, Any]) -> tuple[Any, ...]:
    if "error" in outcome:
        return error_updates(str(outcome["error"]))
    result = outcome["result"]
    summary = html.escape(result.summary()).replace("\n", "<br>")
    return (result.images or None, infotext_html(result.infotexts[0]) if result.infotexts else "",
            f"<div class='progress-text'>{summary}</div>",
            {"infotexts": result.infotexts, "index_of_first_image": 0, "all_seeds": []})


def _mask_empty(mask: Image.Image, inverted: bool) -> bool:
    # Read the way processing reads it (alpha of a brush layer, else luminance), then inverted.
    return prepare_mask(mask, invert=inverted, blur=0).getbbox() is None

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

from modules.engine import sampler_catalog as samplers
from modules.core.img2img_batch import PNG_INFO_PROPS, run_batch
from modules.core.infotext import INPAINT_AREAS, MASK_MODES
from modules.core.masking import flatten, prepare_mask
from modules.core.pipeline import MASKED_CONTENT, RESIZE_MODES, Img2ImgParams, ProcessingError
from modules.services import Services
from modules.ui.common import (POLL_SECONDS, ControlsBase, build_toprow, connect_seed_buttons, connect_token_counter,
                               error_updates, infotext_html, poll_job, progress_html, script_job)
from modules.core.styles import apply_styles_to_params
from modules.ui import paste
from modules.ui.styles_ui import StylesUi, connect_apply

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
    mode: Any                   # gr.State: index into MODES
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
    sampler_names = samplers.sampler_names()
    schedule_labels = samplers.schedule_labels()
    generation = services.generation
    top = build_toprow("img2img", services)
    prompt, negative_prompt, token_counter = top.prompt, top.negative_prompt, top.token_counter
    paste_button, generate, interrupt, skip = top.paste_button, top.generate, top.interrupt, top.skip
    styles_ui, override_settings = top.styles_ui, top.override_settings
    mode = gr.State(0)
    scale_tab = gr.State(0)
    with gr.Row():
        with gr.Column(scale=1):
            with gr.Tabs(elem_id="mode_img2img") as tabs:
                with gr.Tab(MODE_LABELS[0], id=MODES[0], elem_id=MODE_ELEM_IDS[0]) as t0:
                    init_img = gr.Image(label="Image for img2img", type="pil", image_mode="RGBA", format="png",
                                        sources=["upload", "clipboard"], elem_id="img2img_image", height=420)
                with gr.Tab(MODE_LABELS[1], id=MODES[1], elem_id=MODE_ELEM_IDS[1]) as t1:
                    sketch = gr.ImageEditor(label="Image for img2img", type="pil", format="png", image_mode="RGBA",
                                            sources=["upload", "clipboard"], elem_id="img2img_sketch", height=420,
                                            brush=gr.Brush(colors=["#000000", "#ffffff", "#ff0000", "#00aa00",
                                                                   "#0000ff", "#ffff00"], color_mode="defaults"),
                                            layers=False, transforms=())
                with gr.Tab(MODE_LABELS[2], id=MODES[2], elem_id=MODE_ELEM_IDS[2]) as t2:
                    inpaint = gr.ImageEditor(label="Image for inpainting with mask", type="pil", format="png",
                                             image_mode="RGBA", sources=["upload", "clipboard"],
                                             elem_id="img2maskimg", height=420,
                                             brush=gr.Brush(colors=["#ffffff"], color_mode="fixed"),
                                             layers=False, transforms=())
                with gr.Tab(MODE_LABELS[3], id=MODES[3], elem_id=MODE_ELEM_IDS[3]) as t3:
                    inpaint_sketch = gr.ImageEditor(label="Color sketch inpainting", type="pil", format="png",
                                                    image_mode="RGBA", sources=["upload", "clipboard"],
                                                    elem_id="inpaint_sketch", height=420,
                                                    brush=gr.Brush(colors=["#000000", "#ffffff", "#ff0000",
                                                                           "#00aa00", "#0000ff", "#ffff00"],
                                                                   color_mode="defaults"),
                                                    layers=False, transforms=())
                with gr.Tab(MODE_LABELS[4], id=MODES[4], elem_id=MODE_ELEM_IDS[4]) as t4:
                    upload_img = gr.Image(label="Image for img2img", type="pil", image_mode="RGBA", format="png",
                                          sources=["upload", "clipboard"], elem_id="img_inpaint_base", height=300)
                    upload_mask = gr.Image(label="Mask", type="pil", image_mode="RGBA", format="png",
                                           sources=["upload", "clipboard"], elem_id="img_inpaint_mask", height=300)
                with gr.Tab(MODE_LABELS[5], id=MODES[5], elem_id=MODE_ELEM_IDS[5]) as t5:
                    gr.Markdown("Process every image of a folder on the server. Leave the output folder empty "
                                "to save into the usual img2img output folder. Add a mask folder for batch "
                                "inpainting (one mask for all, or one per image with the same file name).")
                    batch_input = gr.Textbox(label="Input directory", elem_id="img2img_batch_input_dir")
                    batch_output = gr.Textbox(label="Output directory", elem_id="img2img_batch_output_dir")
                    batch_mask = gr.Textbox(label="Inpaint batch mask directory (required for inpaint batch processing only)",
                                            elem_id="img2img_batch_inpaint_mask_dir")
                    with gr.Accordion("PNG info", open=False):
                        batch_use_png = gr.Checkbox(False, label="Append png info to prompts",
                                                    elem_id="img2img_batch_use_png_info")
                        batch_png_dir = gr.Textbox(label="PNG info directory (empty: the input images)",
                                                   elem_id="img2img_batch_png_info_dir")
                        batch_png_props = gr.CheckboxGroup(list(PNG_INFO_PROPS), value=list(PNG_INFO_PROPS),
                                                           label="Parameters to take from png info",
                                                           elem_id="img2img_batch_png_info_props")
            resize_mode = gr.Radio(list(RESIZE_MODES), value=RESIZE_MODES[0], label="Resize mode",
                                   elem_id="resize_mode")
            with gr.Row():
                sampler_name = gr.Dropdown(sampler_names, value="DPM++ 2M", label="Sampling method",
                                           elem_id="img2img_sampling")
                scheduler = gr.Dropdown(schedule_labels, value="Automatic", label="Schedule type",
                                        elem_id="img2img_scheduler")
            steps = gr.Slider(1, 150, value=20, step=1, label="Sampling steps", elem_id="img2img_steps")
            with gr.Row():
                with gr.Column(scale=4):
                    with gr.Tabs(elem_id="img2img_tabs_resize"):
                        with gr.Tab("Resize to", elem_id="img2img_tab_resize_to") as tab_scale_to:
                            width = gr.Slider(64, 2048, value=512, step=8, label="Width", elem_id="img2img_width")
                            height = gr.Slider(64, 2048, value=512, step=8, label="Height", elem_id="img2img_height")
                        with gr.Tab("Resize by", elem_id="img2img_tab_resize_by") as tab_scale_by:
                            scale_by = gr.Slider(0.05, 4, value=1, step=0.05, label="Scale", elem_id="img2img_scale")
                            scale_note = gr.Markdown("", elem_id="img2img_scale_resolution_preview")
                with gr.Column(scale=1, min_width=120):
                    batch_count = gr.Slider(1, 100, value=1, step=1, label="Batch count", elem_id="img2img_batch_count")
                    batch_size = gr.Slider(1, 8, value=1, step=1, label="Batch size", elem_id="img2img_batch_size")
            cfg_scale = gr.Slider(1, 30, value=7, step=0.5, label="CFG Scale", elem_id="img2img_cfg_scale")
            denoising_strength = gr.Slider(0, 1, value=0.75, step=0.01, label="Denoising strength",
                                           elem_id="img2img_denoising_strength")
            with gr.Row(elem_id="img2img_seed_row"):
                seed = gr.Number(-1, label="Seed", precision=0, elem_id="img2img_seed")
                random_seed = gr.Button("🎲", elem_id="img2img_random_seed", size="sm", min_width=40)
                reuse_seed = gr.Button("♻", elem_id="img2img_reuse_seed", size="sm", min_width=40)
            with gr.Accordion("Extra", open=False, elem_id="img2img_subseed_show"):
                with gr.Row():
                    subseed = gr.Number(-1, label="Variation seed", precision=0, elem_id="img2img_subseed")
                    subseed_strength = gr.Slider(0, 1, value=0, step=0.01, label="Variation strength",
                                                 elem_id="img2img_subseed_strength")
                with gr.Row():
                    seed_resize_from_w = gr.Slider(0, 2048, value=0, step=8, label="Resize seed from width",
                                                   elem_id="img2img_seed_resize_from_w")
                    seed_resize_from_h = gr.Slider(0, 2048, value=0, step=8, label="Resize seed from height",
                                                   elem_id="img2img_seed_resize_from_h")
                tiling = gr.Checkbox(False, label="Tiling", elem_id="img2img_tiling")
            with gr.Group(visible=False, elem_id="img2img_inpaint_controls") as inpaint_controls:
                mask_blur = gr.Slider(0, 64, value=4, step=1, label="Mask blur", elem_id="img2img_mask_blur")
                mask_mode = gr.Radio(list(MASK_MODES), value=MASK_MODES[0], label="Mask mode",
                                     elem_id="img2img_mask_mode")
                inpainting_fill = gr.Radio(list(MASKED_CONTENT), value="original", label="Masked content",
                                           elem_id="img2img_inpainting_fill")
                with gr.Row():
                    inpaint_full_res = gr.Radio(list(INPAINT_AREAS), value=INPAINT_AREAS[0],
                                                label="Inpaint area", elem_id="img2img_inpaint_full_res")
                    inpaint_full_res_padding = gr.Slider(0, 256, value=32, step=4, label="Only masked padding, pixels",
                                                         elem_id="img2img_inpaint_full_res_padding")
            script_runner = services.script_runner(True)
            script_runner.setup_ui()
        with gr.Column(scale=1):
            progress = gr.HTML("", elem_id="img2img_progress")
            gallery = gr.Gallery(label="Output", elem_id="img2img_gallery", format="png", columns=2,
                                 object_fit="contain", height="auto", show_label=False)
            infotext = gr.HTML("", elem_id="img2img_infotext")
            generation_info = gr.JSON(visible=False, elem_id="img2img_generation_info")

    controls = Img2ImgControls(
        prompt=prompt, negative_prompt=negative_prompt, sampler_name=sampler_name, scheduler=scheduler, steps=steps,
        resize_mode=resize_mode, width=width, height=height, scale_by=scale_by, batch_count=batch_count,
        batch_size=batch_size, cfg_scale=cfg_scale, denoising_strength=denoising_strength, seed=seed,
        subseed=subseed, subseed_strength=subseed_strength, seed_resize_from_w=seed_resize_from_w,
        seed_resize_from_h=seed_resize_from_h, tiling=tiling, mask_blur=mask_blur, mask_mode=mask_mode,
        inpainting_fill=inpainting_fill, inpaint_full_res=inpaint_full_res,
        inpaint_full_res_padding=inpaint_full_res_padding,
    )

    # -- sub-tab bookkeeping ------------------------------------------------------------------
    for index, tab in enumerate((t0, t1, t2, t3, t4, t5)):
        tab.select(lambda i=index: (i, gr.update(visible=i in INPAINT_MODES)), outputs=[mode, inpaint_controls],
                   show_progress="hidden")
    tab_scale_to.select(lambda: 0, outputs=scale_tab, show_progress="hidden")
    tab_scale_by.select(lambda: 1, outputs=scale_tab, show_progress="hidden")

    def scale_preview(m, scale, img, sk, inp, insk, up):
        try:
            image, _ = images_for_mode(int(m), init_img=img, sketch=sk, inpaint=inp, inpaint_sketch=insk,
                                       upload_img=up, upload_mask=up)
        except ProcessingError:
            return "Resize by: no image."
        w, h = scaled_size(image, scale)
        return f"Resize by: from {image.width}x{image.height} to {w}x{h}"

    scale_inputs = [mode, scale_by, init_img, sketch, inpaint, inpaint_sketch, upload_img]
    scale_by.release(scale_preview, inputs=scale_inputs, outputs=scale_note, show_progress="hidden")
    tab_scale_by.select(scale_preview, inputs=scale_inputs, outputs=scale_note, show_progress="hidden")

    # -- generate ------------------------------------------------------------------------------
    extra_inputs = {
        "mode": mode, "scale_tab": scale_tab, "styles": styles_ui.dropdown, "override_settings": override_settings,
        "init_img": init_img, "sketch": sketch, "inpaint": inpaint, "inpaint_sketch": inpaint_sketch,
        "upload_img": upload_img, "upload_mask": upload_mask, "batch_input": batch_input,
        "batch_output": batch_output, "batch_mask": batch_mask, "batch_use_png": batch_use_png,
        "batch_png_dir": batch_png_dir, "batch_png_props": batch_png_props,
    }
    extra_names = list(extra_inputs)
    running_batches: set[threading.Event] = set()

    n_controls = len(controls.components())

    def run(*values):
        extra = dict(zip(extra_names, values[:len(extra_names)]))
        control_values = dict(zip(Img2ImgControls.names(), values[len(extra_names):len(extra_names) + n_controls]))
        script_args = list(values[len(extra_names) + n_controls:])
        m = int(extra["mode"] or 0)
        overrides = paste.overrides_from_choices(extra["override_settings"], services.options)
        if m == 5:
            yield from run_batch_mode(extra, control_values, overrides, script_args)
            return
        try:
            init, mask = images_for_mode(m, init_img=extra["init_img"], sketch=extra["sketch"],
                                         inpaint=extra["inpaint"], inpaint_sketch=extra["inpaint_sketch"],
                                         upload_img=extra["upload_img"], upload_mask=extra["upload_mask"])
            params = Img2ImgControls.to_params(control_values, init_images=[init], mask=mask)
            if extra["scale_tab"] == 1:
                params.width, params.height = scaled_size(init, control_values["scale_by"])
            if mask is not None and params.inpaint_full_res and _mask_empty(mask, params.inpainting_mask_invert):
                params.inpaint_full_res = False  # nothing to crop to: A1111 falls back to the whole picture
            apply_styles_to_params(params, services.styles, extra["styles"])
            params.validate()
            job = generation.submit_img2img(params, override_settings=overrides,
                                            script=script_job(script_runner, script_args))
        except (ProcessingError, ValueError) as err:
            yield error_updates(str(err))
            return
        yield from poll_job(generation, job)

    def run_batch_mode(extra: dict[str, Any], control_values: dict[str, Any], overrides: dict[str, Any],
                       script_args: list[Any]):
        try:
            base = Img2ImgControls.to_params(control_values, init_images=[Image.new("RGB", (64, 64))])
            apply_styles_to_params(base, services.styles, extra["styles"])
            base.validate()
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
                    submit_kwargs={"override_settings": overrides,
                                   "script": script_job(script_runner, script_args)})
            except Exception as err:  # noqa: BLE001 - shown to the user
                outcome["error"] = err

        running_batches.add(stop)
        thread = threading.Thread(target=work, name="img2img-batch", daemon=True)
        thread.start()
        try:
            while thread.is_alive():
                thread.join(POLL_SECONDS)
                text = html.escape(where["file"])
                yield (gr.update(), "", f"<div class='progress-text'>Batch: {text}</div>"
                       + progress_html(generation.state.snapshot(), 0), gr.update())
        finally:
            running_batches.discard(stop)
        if "error" in outcome:
            yield error_updates(str(outcome["error"]))
            return
        result = outcome["result"]
        summary = html.escape(result.summary()).replace("\n", "<br>")
        yield (result.images or None, infotext_html(result.infotexts[0]) if result.infotexts else "",
               f"<div class='progress-text'>{summary}</div>",
               {"infotexts": result.infotexts, "index_of_first_image": 0, "all_seeds": []})

    outputs = [gallery, infotext, progress, generation_info]
    generate.click(run, inputs=[*extra_inputs.values(), *controls.components(), *script_runner.script_inputs],
                   outputs=outputs,
                   concurrency_limit=None, show_progress="hidden")

    def do_interrupt():
        for event in list(running_batches):
            event.set()
        generation.state.interrupt()

    interrupt.click(do_interrupt, show_progress="hidden")
    skip.click(lambda: generation.state.skip(), show_progress="hidden")
    connect_seed_buttons(seed=seed, random_seed=random_seed, reuse_seed=reuse_seed, generation_info=generation_info)
    connect_token_counter(generation, prompt, token_counter)
    connect_apply(styles_ui, services, prompt, negative_prompt)

    targets = {name: getattr(controls, name) for name in Img2ImgControls.names()}
    targets["styles"] = styles_ui.dropdown
    targets.update(paste.script_field_targets(script_runner.infotext_fields()))
    return Img2ImgUi(controls=controls, styles=styles_ui, override_settings=override_settings, tabs=tabs, mode=mode,
                     init_img=init_img, sketch=sketch, inpaint=inpaint, inpaint_sketch=inpaint_sketch,
                     upload_img=upload_img, upload_mask=upload_mask, inpaint_controls=inpaint_controls,
                     paste_button=paste_button, gallery=gallery, generation_info=generation_info,
                     paste_targets=targets)


def _mask_empty(mask: Image.Image, inverted: bool) -> bool:
    # Read the way processing reads it (alpha of a brush layer, else luminance), then inverted.
    return prepare_mask(mask, invert=inverted, blur=0).getbbox() is None

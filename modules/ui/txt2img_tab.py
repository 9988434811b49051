"""The txt2img tab: controls -> Txt2ImgParams -> the shared job queue -> gallery + infotext."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import gradio as gr

from modules.engine import sampler_catalog as samplers
from modules.core.jobs import QueueFullError
from modules.core.pipeline import IMAGE_UPSCALERS, LATENT_UPSCALE_MODES, HiresParams, ProcessingError, Txt2ImgParams
from modules.core.pipeline import image_upscaler_names
from modules.services import Services
from modules.ui.common import (ControlsBase, build_batch_controls, build_output_panel, build_sampling_controls,
                               build_seed_controls, build_toprow, connect_tab_helpers, error_updates, paste_targets,
                               poll_job, script_job, ui_caller)
from modules.core.styles import apply_styles_to_params
from modules.ui import paste
from modules.ui.extra_networks import build_extra_networks
from modules.ui.controlnet_ui import build_controlnet_ui

@dataclass
class Txt2ImgControls(ControlsBase):
    """Every component whose value becomes a field of Txt2ImgParams (or its HiresParams)."""
    prompt: Any
    negative_prompt: Any
    sampler_name: Any
    scheduler: Any
    steps: Any
    width: Any
    height: Any
    batch_count: Any
    batch_size: Any
    cfg_scale: Any
    seed: Any
    subseed: Any
    subseed_strength: Any
    seed_resize_from_w: Any
    seed_resize_from_h: Any
    tiling: Any
    hires_enabled: Any
    hires_upscaler: Any
    hires_steps: Any
    hires_denoising: Any
    hires_scale: Any
    hires_resize_x: Any
    hires_resize_y: Any
    hires_sampler: Any
    hires_prompt: Any
    hires_negative_prompt: Any

    @classmethod
    def to_params(cls, values: list[Any]) -> Txt2ImgParams:
        v = dict(zip(cls.names(), values))
        return Txt2ImgParams(
            prompt=v["prompt"] or "", negative_prompt=v["negative_prompt"] or "",
            sampler_name=v["sampler_name"], scheduler=v["scheduler"], steps=int(v["steps"]),
            width=int(v["width"]), height=int(v["height"]), n_iter=int(v["batch_count"]),
            batch_size=int(v["batch_size"]), cfg_scale=float(v["cfg_scale"]),
            seed=int(v["seed"] if v["seed"] not in (None, "") else -1),
            subseed=int(v["subseed"] if v["subseed"] not in (None, "") else -1),
            subseed_strength=float(v["subseed_strength"]),
            seed_resize_from_w=int(v["seed_resize_from_w"]), seed_resize_from_h=int(v["seed_resize_from_h"]),
            tiling=bool(v["tiling"]),
            hires=HiresParams(
                enabled=bool(v["hires_enabled"]), upscaler=v["hires_upscaler"], steps=int(v["hires_steps"]),
                denoising_strength=float(v["hires_denoising"]), scale=float(v["hires_scale"]),
                resize_x=int(v["hires_resize_x"]), resize_y=int(v["hires_resize_y"]),
                sampler_name="" if v["hires_sampler"] == "Use same sampler" else v["hires_sampler"],
                prompt=v["hires_prompt"] or "", negative_prompt=v["hires_negative_prompt"] or "",
            ),
        )


@dataclass
class Txt2ImgUi:
    """What the page wires across tabs (paste, send-to, styles)."""
    controls: Txt2ImgControls
    styles: Any                 # styles_ui.StylesUi
    override_settings: Any
    paste_button: Any
    send_to_img2img: Any
    send_to_inpaint: Any
    gallery: Any
    gallery_index: Any          # gr.State: the selected gallery image (None: none selected)
    generation_info: Any
    paste_targets: dict[str, Any] = field(default_factory=dict)


def build_txt2img_tab(services: Services) -> Txt2ImgUi:
    top = build_toprow("txt2img", services)
    networks = build_extra_networks(services, "txt2img", top)
    with gr.Row():
        with gr.Column(scale=1):
            sampling = build_sampling_controls("txt2img")
            hires = _build_hires_fix()
            with gr.Row():
                with gr.Column(scale=4):
                    width = gr.Slider(64, 2048, value=512, step=8, label="Width", elem_id="txt2img_width")
                    height = gr.Slider(64, 2048, value=512, step=8, label="Height", elem_id="txt2img_height")
                batch = build_batch_controls("txt2img")
            cfg_scale = gr.Slider(1, 30, value=7, step=0.5, label="CFG Scale", elem_id="txt2img_cfg_scale")
            seeds = build_seed_controls("txt2img")
            controlnet = build_controlnet_ui("txt2img", services)
            script_runner = services.script_runner(False)
            script_runner.setup_ui()
        with gr.Column(scale=1):
            output = build_output_panel("txt2img", _build_send_buttons)
            gallery_index = gr.State(None)
    networks.connect_gallery(output.gallery)

    controls = Txt2ImgControls(prompt=top.prompt, negative_prompt=top.negative_prompt, **sampling, width=width,
                               height=height, **batch, cfg_scale=cfg_scale, **seeds.controls(), **hires)
    _connect_generate(services, top, controls, script_runner, output, gallery_index, controlnet)
    connect_tab_helpers(top, seeds, output, services)
    send_to_img2img, send_to_inpaint = output.buttons
    return Txt2ImgUi(controls=controls, styles=top.styles_ui, override_settings=top.override_settings,
                     paste_button=top.paste_button, send_to_img2img=send_to_img2img, send_to_inpaint=send_to_inpaint,
                     gallery=output.gallery, gallery_index=gallery_index, generation_info=output.generation_info,
                     paste_targets={**paste_targets(controls, top, script_runner), **controlnet.paste_targets()})


def _build_hires_fix() -> dict[str, Any]:
    """The "Hires. fix" accordion, as {control name: component}."""
    sampler_names = samplers.sampler_names()
    with gr.Accordion("Hires. fix", open=False, elem_id="txt2img_hr"):
        hires_enabled = gr.Checkbox(False, label="Enable", elem_id="txt2img_enable_hr")
        with gr.Row():
            hires_upscaler = gr.Dropdown([*LATENT_UPSCALE_MODES, *image_upscaler_names()[1:]], value="Latent",
                                         label="Upscaler", elem_id="txt2img_hr_upscaler")
            hires_steps = gr.Slider(0, 150, value=0, step=1, label="Hires steps", elem_id="txt2img_hires_steps")
            hires_denoising = gr.Slider(0, 1, value=0.7, step=0.01, label="Denoising strength",
                                        elem_id="txt2img_denoising_strength")
        with gr.Row():
            hires_scale = gr.Slider(1, 4, value=2, step=0.05, label="Upscale by", elem_id="txt2img_hr_scale")
            hires_resize_x = gr.Slider(0, 2048, value=0, step=8, label="Resize width to", elem_id="txt2img_hr_resize_x")
            hires_resize_y = gr.Slider(0, 2048, value=0, step=8, label="Resize height to",
                                       elem_id="txt2img_hr_resize_y")
        hires_sampler = gr.Dropdown(["Use same sampler", *sampler_names], value="Use same sampler",
                                    label="Hires sampling method", elem_id="hr_sampler")
        hires_prompt = gr.Textbox(label="Hires prompt", lines=2, elem_id="hires_prompt",
                                  placeholder="Empty: the same prompt")
        hires_negative_prompt = gr.Textbox(label="Hires negative prompt", lines=2, elem_id="hires_neg_prompt",
                                           placeholder="Empty: the same negative prompt")
    return {"hires_enabled": hires_enabled, "hires_upscaler": hires_upscaler, "hires_steps": hires_steps,
            "hires_denoising": hires_denoising, "hires_scale": hires_scale, "hires_resize_x": hires_resize_x,
            "hires_resize_y": hires_resize_y, "hires_sampler": hires_sampler, "hires_prompt": hires_prompt,
            "hires_negative_prompt": hires_negative_prompt}


def _build_send_buttons() -> tuple[Any, Any]:
    with gr.Row(elem_id="txt2img_send_buttons"):
        send_to_img2img = gr.Button("🖼️ Send to img2img", elem_id="txt2img_send_to_img2img", size="sm")
        send_to_inpaint = gr.Button("🎨️ Send to inpaint", elem_id="txt2img_send_to_inpaint", size="sm")
        gr.Button("📐 Send to extras", elem_id="txt2img_send_to_extras", size="sm")  # wired by ui/app.py
    return send_to_img2img, send_to_inpaint


def _connect_generate(services: Services, top: Any, controls: Txt2ImgControls, script_runner: Any,
                      output: Any, gallery_index: Any, controlnet: Any) -> None:
    """Generate: the controls -> Txt2ImgParams -> a queued job, polled into the output panel."""
    generation = services.generation
    n_controls = len(controls.components())
    n_controlnet = len(controlnet.components)

    def run(request: gr.Request, styles, overrides, *values):
        try:
            params = Txt2ImgControls.to_params(list(values[:n_controls]))
            params.controlnet_units = controlnet.units(list(values[n_controls:n_controls + n_controlnet]))
            script_args = list(values[n_controls + n_controlnet:])
            apply_styles_to_params(params, services.styles, styles)
            params.validate(services.limits)
            job = generation.submit_txt2img(params, override_settings=paste.overrides_from_choices(
                overrides, services.options), script=script_job(script_runner, script_args),
                owner=ui_caller(services, request).name)
        except (ProcessingError, ValueError, QueueFullError) as err:
            yield error_updates(str(err))
            return
        yield from poll_job(generation, job)

    top.generate.click(run, inputs=[top.styles_ui.dropdown, top.override_settings, *controls.components(),
                                    *controlnet.components, *script_runner.script_inputs],
                       outputs=output.outputs(), concurrency_limit=None, show_progress="hidden",
                       trigger_mode="multiple")  # Generate while a job runs queues another (Queue tab)
    top.generate.click(lambda: None, outputs=gallery_index, show_progress="hidden")  # a new gallery: nothing selected

    def select(evt: gr.SelectData):
        return evt.index

    output.gallery.select(select, outputs=gallery_index, show_progress="hidden")

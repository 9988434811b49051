"""The ControlNet accordion of txt2img and img2img: one tab per unit, with sd-webui-controlnet's
element ids (``txt2img_controlnet_ControlNet-0_controlnet_enable_checkbox``...), a preview of the
preprocessed map ("Allow Preview", the 💥 button) and infotext paste / "Send to" support.

Thin: the values become ``core.controlnet_units.ControlNetUnit``s on the tab's params; the
preprocessors and models are the core's.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import gradio as gr

from modules.core.controlnet_units import (CONTROL_MODES, HR_OPTIONS, MAX_UNITS, RESIZE_MODES, ControlNetUnit,
                                           units_from_infotext)

# Unit fields with a control, in the order the values arrive.
FIELDS = ("enabled", "image", "mask", "module", "model", "weight", "guidance_start", "guidance_end", "control_mode",
          "resize_mode", "processor_res", "threshold_a", "threshold_b", "pixel_perfect", "low_vram", "hr_option")
_NOT_PASTED = ("image", "mask")
_ID_SUFFIX = {
    "enabled": "controlnet_enable_checkbox", "image": "controlnet_input_image",
    "module": "controlnet_preprocessor_dropdown", "model": "controlnet_model_dropdown",
    "weight": "controlnet_control_weight_slider", "guidance_start": "controlnet_start_control_step_slider",
    "guidance_end": "controlnet_ending_control_step_slider", "control_mode": "controlnet_control_mode_radio",
    "resize_mode": "controlnet_resize_mode_radio", "processor_res": "controlnet_preprocessor_resolution_slider",
    "threshold_a": "controlnet_threshold_A_slider", "threshold_b": "controlnet_threshold_B_slider",
    "pixel_perfect": "controlnet_pixel_perfect_checkbox", "low_vram": "controlnet_low_vram_checkbox",
    "mask": "controlnet_mask_image", "hr_option": "controlnet_hr_option_radio",
}


def input_name(index: int, name: str) -> str:
    return f"controlnet_{index}_{name}"


@dataclass
class ControlNetUi:
    tabname: str
    count: int
    inputs: dict[str, Any] = field(default_factory=dict)      # input_name(i, field) -> component

    @property
    def components(self) -> list[Any]:
        return list(self.inputs.values())

    @property
    def names(self) -> list[str]:
        return list(self.inputs)

    def units(self, values: Mapping[str, Any] | list[Any]) -> list[ControlNetUnit]:
        """The units the controls hold (`values`: by input name, or in `components` order)."""
        if not isinstance(values, Mapping):
            values = dict(zip(self.names, values))
        return units_from_values(values, self.count)

    def paste_targets(self) -> dict[str, Any]:
        """Script-style infotext targets: each control gets its unit's pasted value (``ControlNet N``)."""
        from modules.ui import paste

        fields_ = []
        for i in range(self.count):
            for name in FIELDS:
                if name not in _NOT_PASTED:
                    fields_.append((self.inputs[input_name(i, name)], _pasted(i, name)))
        return paste.script_field_targets(fields_)


def units_from_values(values: Mapping[str, Any], count: int) -> list[ControlNetUnit]:
    """Units from the controls' values (keys: input_name(i, field)); units whose enable box is off are left out."""
    units = []
    for i in range(count):
        get = lambda name, i=i: values.get(input_name(i, name))  # noqa: E731
        if not get("enabled"):
            continue
        units.append(ControlNetUnit(
            enabled=True, image=get("image"), mask=get("mask"), module=get("module") or "none",
            model=get("model") or "None", hr_option=get("hr_option") or HR_OPTIONS[0],
            weight=float(get("weight")), guidance_start=float(get("guidance_start")),
            guidance_end=float(get("guidance_end")), control_mode=get("control_mode") or CONTROL_MODES[0],
            resize_mode=get("resize_mode") or RESIZE_MODES[1], processor_res=int(get("processor_res")),
            threshold_a=float(get("threshold_a")), threshold_b=float(get("threshold_b")),
            pixel_perfect=bool(get("pixel_perfect")), low_vram=bool(get("low_vram"))))
    return units


def _pasted(index: int, name: str):
    def value(parsed: Mapping[str, Any]) -> Any:
        unit = units_from_infotext(dict(parsed)).get(index)
        if unit is None:
            return False if name == "enabled" else None
        return getattr(unit, name)
    return value


def build_controlnet_ui(tabname: str, services: Any) -> ControlNetUi:
    count = max(1, min(MAX_UNITS, int(services.options.get("control_net_unit_count") or 3)))
    ui = ControlNetUi(tabname=tabname, count=count)
    registry = services.controlnets
    with gr.Accordion("ControlNet", open=False, elem_id=f"{tabname}_controlnet"):
        with gr.Tabs(elem_id=f"{tabname}_controlnet_tabs"):
            for i in range(count):
                with gr.Tab(f"ControlNet Unit {i}", elem_id=f"{tabname}_controlnet_ControlNet-{i}"):
                    _build_unit(ui, i, registry)
    return ui


def _build_unit(ui: ControlNetUi, i: int, registry: Any) -> None:
    from modules.engine.control.preprocessors import preprocessor_names

    prefix = f"{ui.tabname}_controlnet_ControlNet-{i}_"
    eid = lambda name: prefix + _ID_SUFFIX.get(name, name)  # noqa: E731
    c: dict[str, Any] = {}
    with gr.Row():
        c["image"] = gr.Image(type="pil", label="Single Image", elem_id=eid("image"), height=240,
                              sources=["upload", "clipboard"])
        c["mask"] = gr.Image(type="pil", image_mode="L", label="Mask (optional; white = masked, for inpaint)",
                             elem_id=eid("mask"), height=240, sources=["upload", "clipboard"])
        preview = gr.Image(type="pil", label="Preprocessor Preview", visible=False, interactive=False,
                           elem_id=prefix + "controlnet_generated_image", height=240)
    with gr.Row():
        c["enabled"] = gr.Checkbox(False, label="Enable", elem_id=eid("enabled"))
        c["low_vram"] = gr.Checkbox(False, label="Low VRAM", elem_id=eid("low_vram"))
        c["pixel_perfect"] = gr.Checkbox(False, label="Pixel Perfect", elem_id=eid("pixel_perfect"))
        allow_preview = gr.Checkbox(False, label="Allow Preview", elem_id=prefix + "controlnet_preprocessor_preview_checkbox")
    with gr.Row():
        c["module"] = gr.Dropdown(preprocessor_names(), value="none", label="Preprocessor", elem_id=eid("module"))
        run = gr.Button("\U0001F4A5", elem_id=prefix + "controlnet_trigger_preprocessor", size="sm", min_width=40,
                        scale=0)
        c["model"] = gr.Dropdown(["None", *registry.titles()], value="None", label="Model", elem_id=eid("model"),
                                 allow_custom_value=True)
        refresh = gr.Button("\U0001F504", elem_id=prefix + "controlnet_refresh_models", size="sm", min_width=40,
                            scale=0)
    with gr.Row():
        c["weight"] = gr.Slider(0, 2, value=1, step=0.05, label="Control Weight", elem_id=eid("weight"))
        c["guidance_start"] = gr.Slider(0, 1, value=0, step=0.01, label="Starting Control Step",
                                        elem_id=eid("guidance_start"))
        c["guidance_end"] = gr.Slider(0, 1, value=1, step=0.01, label="Ending Control Step",
                                      elem_id=eid("guidance_end"))
    with gr.Row():
        c["processor_res"] = gr.Slider(64, 2048, value=512, step=8, label="Preprocessor Resolution",
                                       elem_id=eid("processor_res"))
        c["threshold_a"] = gr.Slider(-1, 256, value=-1, step=1, label="Threshold A", elem_id=eid("threshold_a"))
        c["threshold_b"] = gr.Slider(-1, 256, value=-1, step=1, label="Threshold B", elem_id=eid("threshold_b"))
    c["control_mode"] = gr.Radio(list(CONTROL_MODES), value=CONTROL_MODES[0], label="Control Mode",
                                 elem_id=eid("control_mode"))
    c["resize_mode"] = gr.Radio(list(RESIZE_MODES), value=RESIZE_MODES[1], label="Resize Mode",
                                elem_id=eid("resize_mode"))
    c["hr_option"] = gr.Radio(list(HR_OPTIONS), value=HR_OPTIONS[0], label="Hires-Fix Option",
                              elem_id=eid("hr_option"))
    for name in FIELDS:
        ui.inputs[input_name(i, name)] = c[name]
    allow_preview.change(lambda on: gr.update(visible=bool(on)), inputs=allow_preview, outputs=preview,
                         show_progress="hidden")
    run.click(preview_map, inputs=[c["image"], c["mask"], c["module"], c["processor_res"], c["threshold_a"],
                                   c["threshold_b"]],
              outputs=[preview, allow_preview], show_progress="hidden")
    refresh.click(lambda current: gr.update(choices=["None", *registry.titles_refreshed()], value=current),
                  inputs=c["model"], outputs=c["model"], show_progress="hidden")
    # user picks only (.input): a pasted unit sets module and threshold A together and keeps both
    c["module"].input(threshold_a_slider, inputs=c["module"], outputs=c["threshold_a"], show_progress="hidden")


def threshold_a_slider(module: str) -> dict:
    """Threshold A as the reference preprocessors' "Style Fidelity" (0..1) or back to the plain slider."""
    from modules.core.controlnet_units import REFERENCE_MODULES

    if module in REFERENCE_MODULES:
        return gr.update(minimum=0, maximum=1, step=0.01, value=0.5, label="Style Fidelity (only for Balanced mode)")
    return gr.update(minimum=-1, maximum=256, step=1, value=-1, label="Threshold A")


def preview_map(image, mask, module, resolution, threshold_a, threshold_b):
    """💥: the unit's preprocessor on its image (with its mask, for the inpaint family), shown in the
    preview (which it turns on)."""
    from modules.engine.control import preprocessors as pre
    from modules.engine.control.units import takes_mask

    if image is None:
        gr.Warning("ControlNet: upload an image to preview its map")
        return gr.update(), gr.update()
    if mask is not None and takes_mask(module):
        from modules.engine.control.annotators import compose_inpaint_input

        image = compose_inpaint_input(image, mask)
    try:
        result = pre.get_preprocessor(module or "none").run(
            image, pre.PreprocessorArgs(resolution=int(resolution or 512), threshold_a=float(threshold_a),
                                        threshold_b=float(threshold_b)))
    except (pre.UnknownPreprocessorError, pre.PreprocessorUnavailableError, ValueError) as err:
        gr.Warning(str(err))
        return gr.update(), gr.update()
    return gr.update(value=result, visible=True), True

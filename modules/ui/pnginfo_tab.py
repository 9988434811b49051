"""The PNG Info tab: drop an image, read its generation parameters (PNG ``parameters`` chunk, or
the EXIF UserComment of a JPEG/WEBP) and other metadata, and send them to txt2img / img2img /
inpaint. The send buttons are wired by the page (modules/ui/app.py), which knows every tab.
"""
from __future__ import annotations

import html
from dataclasses import dataclass
from typing import Any

import gradio as gr

from modules.services import Services


@dataclass
class PngInfoUi:
    image: Any
    html_info: Any
    generation_info: Any        # hidden textbox: the infotext the send buttons use
    send_to_txt2img: Any
    send_to_img2img: Any
    send_to_inpaint: Any


def info_html(image: Any) -> tuple[str, str]:
    """(HTML shown to the user, the infotext or "") for an uploaded PIL image."""
    if image is None:
        return "", ""
    from modules.core.infotext import read_info_from_image

    text, items = read_info_from_image(image)
    blocks = []
    if text:
        blocks.append(("parameters", text))
    for key, value in items.items():
        if isinstance(value, bytes):
            value = f"<{len(value)} bytes>"
        blocks.append((str(key), str(value)))
    if not blocks:
        return "<div class='pnginfo-empty'><p>Nothing found in the image.</p></div>", ""
    shown = "".join(f"<div><p><b>{html.escape(k)}</b></p><p style='white-space:pre-wrap'>{html.escape(v)}</p></div>"
                    for k, v in blocks)
    return f"<div class='pnginfo'>{shown}</div>", text or ""


def build_pnginfo_tab(services: Services) -> PngInfoUi:
    with gr.Row(equal_height=False):
        with gr.Column(variant="panel"):
            # image_mode=None and type pil: the uploaded file is opened as is, so its text chunks survive.
            image = gr.Image(label="Source", type="pil", image_mode=None, sources=["upload", "clipboard"],
                             elem_id="pnginfo_image", height=480)
        with gr.Column(variant="panel"):
            html_info = gr.HTML(elem_id="pnginfo_html_info")
            generation_info = gr.Textbox(visible=False, elem_id="pnginfo_generation_info")
            with gr.Row():
                send_to_txt2img = gr.Button("Send to txt2img", elem_id="pnginfo_send_to_txt2img", size="sm")
                send_to_img2img = gr.Button("Send to img2img", elem_id="pnginfo_send_to_img2img", size="sm")
                send_to_inpaint = gr.Button("Send to inpaint", elem_id="pnginfo_send_to_inpaint", size="sm")
                gr.Button("Send to extras", elem_id="pnginfo_send_to_extras", size="sm")  # wired by ui/app.py

    image.change(info_html, inputs=image, outputs=[html_info, generation_info], show_progress="hidden")
    return PngInfoUi(image=image, html_info=html_info, generation_info=generation_info,
                     send_to_txt2img=send_to_txt2img, send_to_img2img=send_to_img2img,
                     send_to_inpaint=send_to_inpaint)

"""A1111's "Poor man's outpainting" img2img script on the Script API: grow the canvas on the
chosen sides and inpaint the new margins (the geometry lives in modules/outpainting.py).

script_args (A1111's order): [pixels, mask blur, masked content index, directions].
"""
import gradio as gr

from modules import scripts
from outpainting_lib import DIRECTIONS, outpaint_params
from modules.processing import MASKED_CONTENT, ProcessingError


class Script(scripts.Script):
    def title(self):
        return "Poor man's outpainting"

    def show(self, is_img2img):
        return is_img2img

    def ui(self, is_img2img):
        pixels = gr.Slider(8, 256, value=128, step=8, label="Pixels to expand", elem_id=self.elem_id("pixels"))
        mask_blur = gr.Slider(0, 64, value=4, step=1, label="Mask blur", elem_id=self.elem_id("mask_blur"))
        inpainting_fill = gr.Radio(list(MASKED_CONTENT), value="fill", type="index", label="Masked content",
                                   elem_id=self.elem_id("inpainting_fill"))
        direction = gr.CheckboxGroup(list(DIRECTIONS), value=list(DIRECTIONS), label="Outpainting direction",
                                     elem_id=self.elem_id("direction"))
        return [pixels, mask_blur, inpainting_fill, direction]

    def run(self, p, pixels, mask_blur, inpainting_fill, direction):
        if not p.init_images:
            raise ProcessingError("Poor man's outpainting needs an init image")
        params, _ = outpaint_params(p.params, p.init_images[0], pixels=int(pixels), directions=direction or [],
                                    mask_blur=int(mask_blur), inpainting_fill=int(inpainting_fill))
        return p.with_params(params).process_images()

"""A1111's "SD upscale" img2img script on the Script API: upscale, img2img each tile, blend.

script_args (A1111's order): [info, tile overlap, upscaler index, scale factor].
The tiling and blending live in modules/sd_upscale.py; each tile renders through
process_images, so always-visible scripts run for every tile as they do in A1111.
"""
import gradio as gr

from modules import processing, scripts
import sd_upscale_lib as sd_upscale


class Script(scripts.Script):
    def title(self):
        return sd_upscale.TITLE

    def show(self, is_img2img):
        return is_img2img

    def ui(self, is_img2img):
        info = gr.HTML("<p>Upscales the image by the scale factor, then redraws it tile by tile; "
                       "the width and height above set the tile size.</p>")
        overlap = gr.Slider(0, 256, value=64, step=16, label="Tile overlap", elem_id=self.elem_id("overlap"))
        scale_factor = gr.Slider(1.0, 4.0, value=2.0, step=0.05, label="Scale Factor",
                                 elem_id=self.elem_id("scale_factor"))
        upscaler_index = gr.Radio(sd_upscale.upscaler_names(), value="Lanczos", type="index", label="Upscaler",
                                  elem_id=self.elem_id("upscaler_index"))
        return [info, overlap, upscaler_index, scale_factor]

    def run(self, p, _info, overlap, upscaler_index, scale_factor):
        args = sd_upscale.SdUpscaleArgs.from_script_args([None, overlap, upscaler_index, scale_factor])
        return sd_upscale.run_sd_upscale(
            p.params, args, lambda params: p.with_params(params).process_images(),
            lambda image, **kw: p.save_image(image, **kw), processing.get_fixed_seed(p.seed))

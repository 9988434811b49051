"""img2img's optional depth map for SD2 depth checkpoints (depth2img); empty: the depth estimator makes it."""
from __future__ import annotations

from typing import Any

import gradio as gr


def build_depth_input() -> Any:
    """An image input under a closed accordion; its value goes to Img2ImgParams.depth_image."""
    with gr.Accordion("Depth map (SD2 depth models)", open=False, elem_id="img2img_depth_accordion"):
        return gr.Image(label="Depth map of the init image: greyscale, white = near. Leave empty to estimate it "
                              "with the depth model in models/depth/", type="pil", image_mode=None, format="png",
                        sources=["upload", "clipboard"], elem_id="img2img_depth_image", height=240)

"""The "Refiner" accordion of txt2img and img2img (A1111 1.6+): a checkpoint that takes over sampling at a
fraction of the steps. An always-on script on the public Script API; it only sets `p.refiner_checkpoint`
and `p.refiner_switch_at`, which the core checks (same latent space) and the engine runs
(modules/core/refiner.py, modules/engine/refiner.py). The API sets those two fields directly, or this
script's args through `alwayson_scripts` ({"Refiner": {"args": [true, "name", 0.8]}}), as in A1111.
"""
import gradio as gr

from modules import scripts, shared
from modules.ui_components import InputAccordion


def _models():
    services = getattr(shared, "services", None)
    return getattr(services, "models", None)


def _titles():
    models = _models()
    return sorted(models.titles(), key=str.casefold) if models is not None else []


def _title_for(infotext_name):
    """A pasted `Refiner: name [hash]` as this server's checkpoint title (unknown: left alone)."""
    models = _models()
    info = models.registry.get_closest(str(infotext_name)) if models is not None and infotext_name else None
    return info.title if info is not None else gr.update()


class Script(scripts.Script):
    def title(self):
        return "Refiner"

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def ui(self, is_img2img):
        with InputAccordion(False, label="Refiner", elem_id=self.elem_id("enable")) as enable_refiner:
            with gr.Row():
                refiner_checkpoint = gr.Dropdown(_titles(), value=None, label="Checkpoint",
                                                 elem_id=self.elem_id("checkpoint"), allow_custom_value=True)
                refresh = gr.Button("🔄", elem_id=self.elem_id("refresh"), size="sm", scale=0)
                refiner_switch_at = gr.Slider(0.01, 1.0, value=0.8, step=0.01, label="Switch at",
                                              elem_id=self.elem_id("switch_at"))
        refresh.click(lambda: gr.update(choices=_titles()), outputs=refiner_checkpoint, show_progress="hidden")
        self.infotext_fields = [
            (enable_refiner, lambda d: "Refiner" in d),
            (refiner_checkpoint, lambda d: _title_for(d.get("Refiner"))),
            (refiner_switch_at, "Refiner switch at"),
        ]
        return [enable_refiner, refiner_checkpoint, refiner_switch_at]

    def setup(self, p, enable_refiner=False, refiner_checkpoint=None, refiner_switch_at=0.8):
        if not enable_refiner or refiner_checkpoint in (None, "", "None"):
            return  # an API request may have set p.refiner_checkpoint itself
        p.refiner_checkpoint = str(refiner_checkpoint)
        p.refiner_switch_at = float(refiner_switch_at)

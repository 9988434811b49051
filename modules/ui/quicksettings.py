"""The row at the top of the page: the checkpoint picker and the user's quicksettings."""
from __future__ import annotations

import html

import gradio as gr

from modules.core.options import OptionError
from modules.services import Services
from modules.ui.components import component_for_option

POLL_SECONDS = 0.5


def _checkpoint_value(services: Services) -> str | None:
    try:
        return services.models.selected_info().title
    except Exception:
        return None


def build_quicksettings(services: Services) -> None:
    models, generation, options = services.models, services.generation, services.options
    with gr.Row(elem_id="quicksettings"):
        titles = models.titles()
        checkpoint = gr.Dropdown(titles, value=_checkpoint_value(services), label="Stable Diffusion checkpoint",
                                 elem_id="setting_sd_model_checkpoint", interactive=True, allow_custom_value=False)
        refresh = gr.Button("🔄", elem_id="refresh_sd_model_checkpoint", size="sm", min_width=40, scale=0)
        for key in options.quicksettings_list:
            if key == "sd_model_checkpoint" or key not in options.templates:
                continue
            component = component_for_option(key, options.templates[key], options.get(key))
            component.change(_apply_one(services, key), inputs=component, outputs=None, show_progress="hidden")
    status = gr.Markdown("" if titles else models.registry.empty_message(), elem_id="checkpoint_status")

    def switch(title: str):
        if not title:
            yield gr.update(), ""
            return
        job = generation.submit_model_switch(title)
        while not job.wait(POLL_SECONDS):
            yield gr.update(), f"Loading {html.escape(title)}…"
        try:
            model = job.result()
        except Exception as err:  # the previous model stays loaded
            yield gr.update(value=_checkpoint_value(services)), f"**Could not load {html.escape(title)}:** {html.escape(str(err))}"
            return
        # The title gains its [hash] once hashed: show the new title.
        yield gr.update(choices=models.titles(), value=model.info.title if model.info else title), f"Loaded {html.escape(model.title)}."

    def do_refresh():
        models.refresh()
        titles = models.titles()
        return (gr.update(choices=titles, value=_checkpoint_value(services)),
                "" if titles else models.registry.empty_message())

    checkpoint.input(switch, inputs=checkpoint, outputs=[checkpoint, status], show_progress="hidden",
                     concurrency_limit=None)
    refresh.click(do_refresh, outputs=[checkpoint, status], show_progress="hidden")


def _apply_one(services: Services, key: str):
    def apply(value):
        try:
            if services.options.set(key, value):
                services.options.save()
        except OptionError as err:
            gr.Warning(str(err))
    return apply

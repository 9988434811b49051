"""The Settings tab: one sub-tab per section, and Apply, as in A1111."""
from __future__ import annotations

import gradio as gr

from modules.core.options import OptionError
from modules.services import Services
from modules.ui.components import component_for_option


def build_settings_tab(services: Services) -> None:
    options = services.options
    keys: list[str] = []
    components: list[gr.components.Component] = []
    frozen = options.frozen
    with gr.Row():
        apply = gr.Button("Apply settings", variant="primary", elem_id="settings_submit", interactive=not frozen)
    result = gr.Markdown("Settings are frozen (--freeze-settings)." if frozen else "", elem_id="settings_result")
    with gr.Tabs(elem_id="settings_sections"):
        for (section_id, section_label), section_keys in options.sections().items():
            with gr.Tab(section_label, elem_id=f"settings_{section_id}"):
                for key in section_keys:
                    info = options.templates[key]
                    components.append(component_for_option(key, info, options.get(key), interactive=not frozen))
                    keys.append(key)

    def apply_settings(*values):
        changed, errors = [], []
        for key, value in zip(keys, values):
            try:
                if options.set(key, value):
                    changed.append(key)
            except OptionError as err:
                errors.append(str(err))
        if changed:
            options.save()
        restart = [k for k in changed if options.templates[k].restart_required]
        lines = [f"{len(changed)} settings changed" + (f": {', '.join(changed)}." if changed else ".")]
        if restart:
            lines.append(f"Restart the server for these to take effect: {', '.join(restart)}.")
        lines += [f"Not applied: {e}" for e in errors]
        return "\n\n".join(lines)

    apply.click(apply_settings, inputs=components, outputs=result, show_progress="hidden")

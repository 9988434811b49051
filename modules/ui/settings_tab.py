"""The Settings tab: one sub-tab per section, and Apply, as in A1111."""
from __future__ import annotations

import contextlib

import gradio as gr

from modules.core.options import COMPAT_NOTE, OptionError, Section
from modules.services import Services
from modules.ui.components import component_for_option

COMPAT_TAB_LABEL = "Compatibility (no effect)"


def add_refresh_button(dropdown: gr.Dropdown, info, key: str) -> gr.Button:
    """A1111's refresh button: the setting's own refresh (a rescan), then its current choices."""
    button = gr.Button("🔄", elem_id=f"refresh_{key}", size="sm", min_width=40, scale=0)

    def refresh():
        info.refresh()
        return gr.update(choices=info.current_choices() or [])

    button.click(refresh, outputs=dropdown, show_progress="hidden")
    return button


def build_settings_tab(services: Services) -> None:
    options = services.options
    keys: list[str] = []
    components: list[gr.components.Component] = []
    frozen = options.frozen
    with gr.Row():
        apply = gr.Button("Apply settings", variant="primary", elem_id="settings_submit", interactive=not frozen)
    result = gr.Markdown("Settings are frozen (--freeze-settings)." if frozen else "", elem_id="settings_result")

    def add(key: str) -> None:
        # Folders, file names and formats are read-only on a server others can reach (--allow-dir-config).
        locked = options.is_locked(key)
        info = options.templates[key]
        refreshable = info.refresh is not None and info.kind == "dropdown"   # choices that change (sd_lora)
        with gr.Row() if refreshable else contextlib.nullcontext():
            components.append(component_for_option(key, info, options.get(key), interactive=not frozen and not locked))
            if refreshable:
                add_refresh_button(components[-1], info, key)
        keys.append(key)

    # Settings this product reads get a tab per section; the A1111 keys it only keeps
    # (compat_only) share one last tab, a closed accordion per section.
    used: dict[Section, list[str]] = {}
    compat: dict[Section, list[str]] = {}
    for section, section_keys in options.sections().items():
        for key in section_keys:
            (compat if options.templates[key].compat_only else used).setdefault(section, []).append(key)
    with gr.Tabs(elem_id="settings_sections"):
        for (section_id, section_label), section_keys in used.items():
            with gr.Tab(section_label, elem_id=f"settings_{section_id}"):
                for key in section_keys:
                    add(key)
        if compat:
            with gr.Tab(COMPAT_TAB_LABEL, elem_id="settings_compat_only"):
                gr.Markdown(f"A1111 settings that API clients can read and write here. They are stored and "
                            f"returned, but this program does not use them ({COMPAT_NOTE}).")
                for (section_id, section_label), section_keys in compat.items():
                    with gr.Accordion(section_label, open=False, elem_id=f"settings_compat_{section_id}"):
                        for key in section_keys:
                            add(key)

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

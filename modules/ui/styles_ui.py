"""The styles row of the txt2img and img2img tabs: the Styles dropdown, "apply styles to the
prompt" and a small styles editor (save / delete / reload), over `modules.styles.StyleDatabase`.

Every tab's dropdown is refreshed when any tab saves or deletes a style (`connect_styles`).
"""
from __future__ import annotations

import html
from dataclasses import dataclass
from typing import Any

import gradio as gr

from modules.core.styles import StyleError


@dataclass
class StylesUi:
    tabname: str
    dropdown: Any
    apply: Any
    editor_name: Any
    editor_prompt: Any
    editor_negative: Any
    save: Any
    delete: Any
    reload: Any
    status: Any


def build_styles_row(tabname: str, services: Any) -> StylesUi:
    db = services.styles
    names = db.names() if db is not None else []
    with gr.Row(elem_id=f"{tabname}_styles_row"):
        dropdown = gr.Dropdown(names, value=[], multiselect=True, label="Styles", elem_id=f"{tabname}_styles",
                               show_label=False, container=False, scale=6,
                               info=None, allow_custom_value=False)
        apply = gr.Button("📋", elem_id=f"{tabname}_style_apply", size="sm", min_width=40, scale=0)
    with gr.Accordion("Styles editor", open=False, elem_id=f"{tabname}_styles_editor"):
        with gr.Row():
            editor_name = gr.Dropdown(names, value=None, label="Style", allow_custom_value=True,
                                      elem_id=f"{tabname}_edit_style_name", scale=4)
            save = gr.Button("💾", elem_id=f"{tabname}_edit_style_save", size="sm", min_width=40, scale=0)
            delete = gr.Button("🗑️", elem_id=f"{tabname}_edit_style_delete", size="sm", min_width=40, scale=0)
            reload = gr.Button("🔄", elem_id=f"{tabname}_edit_style_reload", size="sm", min_width=40, scale=0)
        editor_prompt = gr.Textbox(label="Prompt", lines=2, elem_id=f"{tabname}_edit_style_prompt",
                                   placeholder="Use {prompt} to say where the user's prompt goes")
        editor_negative = gr.Textbox(label="Negative prompt", lines=2, elem_id=f"{tabname}_edit_style_neg_prompt")
        status = gr.Markdown("", elem_id=f"{tabname}_edit_style_status")

    def pick(name: str | None):
        style = db.get(name) if db is not None and name else None
        if style is None:
            return gr.update(), gr.update()
        return style.prompt, style.negative_prompt

    editor_name.change(pick, inputs=editor_name, outputs=[editor_prompt, editor_negative], show_progress="hidden")
    return StylesUi(tabname=tabname, dropdown=dropdown, apply=apply, editor_name=editor_name,
                    editor_prompt=editor_prompt, editor_negative=editor_negative, save=save, delete=delete,
                    reload=reload, status=status)


def connect_apply(ui: StylesUi, services: Any, prompt: Any, negative_prompt: Any) -> None:
    """📋: write the selected styles into the prompts and clear the selection (A1111's button)."""
    db = services.styles

    def apply(styles: list[str] | None, p: str, n: str):
        if db is None or not styles:
            return gr.update(), gr.update(), gr.update()
        return db.apply_styles_to_prompt(p or "", styles), db.apply_negative_styles(n or "", styles), []

    ui.apply.click(apply, inputs=[ui.dropdown, prompt, negative_prompt], outputs=[prompt, negative_prompt, ui.dropdown],
                   show_progress="hidden")


def connect_styles(uis: list[StylesUi], services: Any) -> None:
    """Save / delete / reload in any tab refresh the style lists of every tab."""
    db = services.styles
    outputs = [c for ui in uis for c in (ui.dropdown, ui.editor_name)]

    def refreshed(acting: StylesUi, selected_name: str | None) -> list[Any]:
        names = db.names() if db is not None else []
        out: list[Any] = []
        for other in uis:
            out.append(gr.update(choices=names))
            out.append(gr.update(choices=names, value=selected_name) if other is acting else gr.update(choices=names))
        return out

    for ui in uis:
        def save(name: str | None, p: str, n: str, _ui: StylesUi = ui):
            try:
                style = db.save_style(name or "", p or "", n or "")
            except StyleError as err:
                return [*refreshed(_ui, name), f"**Not saved:** {html.escape(str(err))}"]
            return [*refreshed(_ui, style.name), f"Saved style {html.escape(style.name)}."]

        def delete(name: str | None, _ui: StylesUi = ui):
            if not name or not db.delete_style(name):
                return [*refreshed(_ui, name), "No such style."]
            return [*refreshed(_ui, None), f"Deleted style {html.escape(name)}."]

        def reload(_ui: StylesUi = ui):
            warnings = db.reload()
            note = "Reloaded." + "".join(f"\n\n{html.escape(w)}" for w in warnings)
            return [*refreshed(_ui, None), note]

        ui.save.click(save, inputs=[ui.editor_name, ui.editor_prompt, ui.editor_negative],
                      outputs=[*outputs, ui.status], show_progress="hidden")
        ui.delete.click(delete, inputs=[ui.editor_name], outputs=[*outputs, ui.status], show_progress="hidden")
        ui.reload.click(reload, outputs=[*outputs, ui.status], show_progress="hidden")

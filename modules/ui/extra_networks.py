"""The Extra Networks browser in the txt2img and img2img tabs: the 🎴 button under Generate opens a panel with
the Textual Inversion, Hypernetworks, Checkpoints and Lora pages of cards.

Thin Gradio wiring over modules/core/extra_networks.py (cards, search/sort/folders, the tag toggle, user
metadata, previews). A card click runs ``extraNetworksAction`` (EXTRA_NETWORKS_HEAD), which hands
``{"action", "page", "item"}`` to a hidden textbox and clicks a hidden button: the server does the rest.
"""
from __future__ import annotations

import html
import json
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import gradio as gr

from modules.core import extra_networks as en

EXTRA_NETWORKS_HEAD = """<script>
window.extraNetworksAction = (tab, action, page, item) => {
  const app = window.gradioApp ? gradioApp() : document;
  const box = app.querySelector(`#${tab}_extra_networks_action textarea`);
  if (!box) return;
  box.value = JSON.stringify({action, page, item, nonce: Date.now() + Math.random()});
  box.dispatchEvent(new Event('input', {bubbles: true}));
  app.querySelector(`#${tab}_extra_networks_action_button`).click();
};
</script>"""

EXTRA_NETWORKS_CSS = """
.extra-network-cards { display: flex; flex-wrap: wrap; gap: 0.5em; }
.extra-network-cards .card { position: relative; width: 12em; height: 16em; border-radius: 0.4em; cursor: pointer;
  overflow: hidden; background: var(--neutral-700, #444); box-shadow: 0 0 4px #0006; }
.extra-network-cards .card img { width: 100%; height: 100%; object-fit: cover; }
.extra-network-cards .card .actions { position: absolute; bottom: 0; left: 0; right: 0; padding: 0.4em;
  background: linear-gradient(transparent, #000c); color: white; }
.extra-network-cards .card .name { font-weight: bold; word-break: break-word; }
.extra-network-cards .card .description { font-size: 0.85em; opacity: 0.85; }
.extra-network-cards .card .edit-button { position: absolute; top: 0.2em; right: 0.2em; cursor: pointer;
  background: #000a; border-radius: 0.3em; padding: 0 0.3em; }
.extra-network-cards .card.selected { outline: 3px solid var(--color-accent, orange); }
.extra-network-cards .nocards { opacity: 0.7; padding: 1em; }
"""

_ALL = "__all__"


@dataclass
class PageUi:
    page: en.Page
    search: Any
    sort: Any
    order: Any
    refresh: Any
    folders: Any
    cards: Any

    def view_inputs(self) -> list[Any]:
        return [self.search, self.sort, self.order, self.folders]


@dataclass
class ExtraNetworksUi:
    tabname: str
    panel: Any
    pages: list[PageUi]
    editor: Any
    editor_title: Any
    fields: dict[str, Any]
    save: Any
    replace_preview: Any
    status: Any
    training: Any
    editing: Any            # gr.State: {"page", "item"} of the card in the editor
    cache: en.CardCache
    services: Any
    selected: Any = None    # gr.State: the selected gallery index (connect_gallery)
    extra: dict[str, Any] = field(default_factory=dict)

    def all_cards(self) -> list[Any]:
        return [p.cards for p in self.pages]

    def connect_gallery(self, gallery: Any) -> None:
        """Replace preview saves the gallery's selected image (else its first)."""
        _connect_replace_preview(self, gallery)


def _js_call(tabname: str, action: str, card: en.Card) -> str:
    args = ", ".join(json.dumps(a) for a in (tabname, action, card.page, card.relpath))
    return html.escape(f"extraNetworksAction({args})", quote=True)


def card_html(tabname: str, card: en.Card, show_description: bool = True) -> str:
    image = ""
    if card.preview is not None:
        try:  # the preview's own time: a replaced preview gets a new URL, so the browser shows it
            stamp = card.preview.stat().st_mtime_ns
        except OSError:
            stamp = 0
        src = f"sd_extra_networks/thumb?page={quote(card.page)}&item={quote(card.relpath)}&mtime={stamp}"
        image = f'<img src="{html.escape(src)}" loading="lazy" alt="">'
    description = (f'<div class="description">{html.escape(card.description)}</div>'
                   if show_description and card.description else "")
    edit = (f'<span class="edit-button" title="Edit metadata" '
            f'onclick="event.stopPropagation(); {_js_call(tabname, "edit", card)}">🛠️</span>')
    return (f'<div class="card" data-name="{html.escape(card.name)}" data-relpath="{html.escape(card.relpath)}" '
            f'data-prompt="{html.escape(card.prompt)}" onclick="{_js_call(tabname, "toggle", card)}">'
            f'{image}{edit}<div class="actions"><div class="name">{html.escape(card.name)}</div>{description}</div>'
            f'</div>')


def page_html(tabname: str, page: en.Page, cards: list[en.Card], show_description: bool = True) -> str:
    if not cards:
        roots = ", ".join(str(r) for r in page.roots)
        body = f'<div class="nocards">Nothing here. Put files into {html.escape(roots)}.</div>'
    else:
        body = "".join(card_html(tabname, c, show_description) for c in cards)
    return f'<div class="extra-network-cards" id="{tabname}_{page.id}_cards">{body}</div>'


def _folder_choices(cards: list[en.Card], style: str) -> list[tuple[str, str]]:
    label = en.tree_label if style == "Tree" else (lambda f: "📁 " + f)
    return [("All", _ALL)] + [(label(f), f) for f in en.folders(cards)]


def build_extra_networks(services: Any, tabname: str, top: Any) -> ExtraNetworksUi:
    """The panel (hidden until the toprow's 🎴 button opens it), below the prompts of `tabname`."""
    options = services.options
    cache = en.CardCache(en.default_pages(services.paths, services.cmd_opts),
                         lambda: float(options.extra_networks_default_multiplier))
    with gr.Column(visible=False, elem_id=f"{tabname}_extra_tabs") as panel:
        with gr.Tabs(elem_id=f"{tabname}_extra_networks_tabs"):
            pages = [_build_page(tabname, page, options) for page in cache.pages.values()]
        ui = _build_editor(services, tabname, panel, pages, cache)
    ui.extra["action"] = gr.Textbox(visible="hidden", elem_id=f"{tabname}_extra_networks_action")
    ui.extra["action_button"] = gr.Button("action", visible="hidden", elem_id=f"{tabname}_extra_networks_action_button")
    _connect(ui, top)
    return ui


def _build_page(tabname: str, page: en.Page, options: Any) -> PageUi:
    prefix = f"{tabname}_{page.id}"
    with gr.Tab(page.title, elem_id=f"{prefix}_extra_tab"):
        with gr.Row():
            search = gr.Textbox(show_label=False, placeholder="Search...", elem_id=f"{prefix}_extra_search", scale=4)
            sort = gr.Dropdown(list(en.SORT_FIELDS), value=options.extra_networks_card_order_field, show_label=False,
                               elem_id=f"{prefix}_extra_sort", scale=1)
            order = gr.Dropdown(["Ascending", "Descending"], value=options.extra_networks_card_order,
                                show_label=False, elem_id=f"{prefix}_extra_sortorder", scale=1)
            refresh = gr.Button("🔄", elem_id=f"{prefix}_extra_refresh", size="sm", scale=0, min_width=40)
        with gr.Row():
            folders = gr.Radio([("All", _ALL)], value=_ALL, label="Folders", elem_id=f"{prefix}_extra_tree_view",
                               visible=bool(options.extra_networks_tree_view_default_enabled), scale=1)
            cards = gr.HTML(elem_id=f"{prefix}_cards_html")
    return PageUi(page, search, sort, order, refresh, folders, cards)


def _build_editor(services: Any, tabname: str, panel: Any, pages: list[PageUi], cache: en.CardCache) -> ExtraNetworksUi:
    prefix = f"{tabname}_extra_networks_editor"
    with gr.Column(visible=False, elem_id=prefix, variant="panel") as editor:
        title = gr.Markdown(elem_id=f"{prefix}_title")
        with gr.Row():
            description = gr.Textbox(label="Description", lines=2, elem_id=f"{prefix}_description", scale=3)
            sd_version = gr.Dropdown(list(en.SD_VERSIONS), value="Unknown", label="SD version",
                                     elem_id=f"{prefix}_sd_version", scale=1)
        with gr.Row():
            activation = gr.Textbox(label="Activation text", elem_id=f"{prefix}_activation_text")
            weight = gr.Number(0, label="Preferred weight (0: the default)", elem_id=f"{prefix}_preferred_weight")
        negative = gr.Textbox(label="Negative prompt", elem_id=f"{prefix}_negative_text")
        notes = gr.Textbox(label="Notes", lines=2, elem_id=f"{prefix}_notes")
        with gr.Row():
            save = gr.Button("Save", variant="primary", elem_id=f"{prefix}_save")
            replace_preview = gr.Button("Replace preview", elem_id=f"{prefix}_replace_preview")
            close = gr.Button("Close", elem_id=f"{prefix}_close")
        training = gr.HTML(elem_id=f"{prefix}_metadata")
    status = gr.Markdown(elem_id=f"{tabname}_extra_networks_status")
    close.click(lambda: gr.update(visible=False), outputs=editor, show_progress="hidden")
    fields = {"description": description, "activation text": activation, "preferred weight": weight,
              "negative text": negative, "notes": notes, "sd version": sd_version}
    return ExtraNetworksUi(tabname=tabname, panel=panel, pages=pages, editor=editor, editor_title=title, fields=fields,
                           save=save, replace_preview=replace_preview, status=status, training=training,
                           editing=gr.State(None), cache=cache, services=services)


# --------------------------------------------------------------------------- events


def _render(ui: ExtraNetworksUi, page_ui: PageUi, search: str, sort: str, order: str, folder: str) -> str:
    cards = en.filter_cards(ui.cache.cards(page_ui.page.id), search, "" if folder in (None, _ALL) else folder)
    cards = en.sort_cards(cards, sort or "Path", order == "Descending")
    return page_html(ui.tabname, page_ui.page, cards, bool(ui.services.options.extra_networks_card_show_desc))


def _reload(ui: ExtraNetworksUi, page_ui: PageUi, view: list[Any]) -> tuple[Any, Any]:
    """Re-list the page's files; (cards html, folder choices)."""
    cards = ui.cache.reload(page_ui.page.id)
    folder = view[3] if view[3] in [f for f in en.folders(cards)] else _ALL
    style = ui.services.options.extra_networks_tree_view_style
    return (_render(ui, page_ui, view[0], view[1], view[2], folder),
            gr.update(choices=_folder_choices(cards, style), value=folder))


def _connect(ui: ExtraNetworksUi, top: Any) -> None:
    is_open = gr.State(False)
    view_inputs = [c for p in ui.pages for c in p.view_inputs()]
    per_page = [(p.cards, p.folders) for p in ui.pages]

    def toggle_panel(opened: bool, *views):
        if opened:
            return [gr.update(visible=False), False] + [gr.update() for _ in range(2 * len(ui.pages))]
        out: list[Any] = [gr.update(visible=True), True]
        for i, page_ui in enumerate(ui.pages):
            out += list(_reload(ui, page_ui, list(views[4 * i:4 * i + 4])))
        return out

    top.extra_networks.click(toggle_panel, inputs=[is_open, *view_inputs],
                             outputs=[ui.panel, is_open, *[c for pair in per_page for c in pair]], show_progress="hidden")
    for page_ui in ui.pages:
        def render(search, sort, order, folder, page_ui=page_ui):
            return _render(ui, page_ui, search, sort, order, folder)

        for control in (page_ui.search, page_ui.sort, page_ui.order, page_ui.folders):
            control.change(render, inputs=page_ui.view_inputs(), outputs=page_ui.cards, show_progress="hidden",
                           trigger_mode="always_last")
        page_ui.refresh.click(lambda *v, page_ui=page_ui: _reload(ui, page_ui, list(v)),
                              inputs=page_ui.view_inputs(), outputs=[page_ui.cards, page_ui.folders],
                              show_progress="hidden")
    _connect_actions(ui, top)
    _connect_save(ui)


def _editor_values(ui: ExtraNetworksUi, card: en.Card) -> list[Any]:
    meta = card.user_metadata
    try:
        weight = float(meta.get("preferred weight") or 0)
    except (TypeError, ValueError):
        weight = 0.0
    values = {"description": str(meta.get("description") or ""), "activation text": str(meta.get("activation text") or ""),
              "preferred weight": weight, "negative text": str(meta.get("negative text") or ""),
              "notes": str(meta.get("notes") or ""),
              "sd version": meta.get("sd version") if meta.get("sd version") in en.SD_VERSIONS else "Unknown"}
    return [values[k] for k in ui.fields]


def training_html(card: en.Card) -> str:
    """The file's safetensors metadata (kohya ss_* fields) and its tag frequency, as tables."""
    meta = en.training_metadata(card)
    if not meta:
        return "<p>No training metadata in this file.</p>"
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(v[:300])}</td></tr>"
                   for k, v in sorted(meta.items()) if k != "ss_tag_frequency")
    tags = en.tag_frequency(meta)
    tag_rows = "".join(f"<tr><td>{html.escape(t)}</td><td>{n}</td></tr>" for t, n in tags)
    tag_table = (f"<h4>Tag frequency</h4><table class='extra-network-tags'>{tag_rows}</table>" if tags else "")
    return f"<h4>Training metadata</h4><table class='extra-network-metadata'>{rows}</table>{tag_table}"


def _connect_actions(ui: ExtraNetworksUi, top: Any) -> None:
    editor_outputs = [ui.editor, ui.editor_title, *ui.fields.values(), ui.training, ui.editing]
    no_editor = [gr.update() for _ in editor_outputs]

    def act(raw: str, prompt: str, negative: str, request: gr.Request):
        try:
            action = json.loads(raw or "{}")
            card = ui.cache.find(str(action.get("page")), str(action.get("item")))
        except (ValueError, AttributeError):
            card = None
        if card is None:
            return [gr.update(), gr.update(), "That card is gone; refresh the page of cards.", *no_editor]
        if action.get("action") == "edit":
            title = f"### {card.name}\n`{card.relpath}`"
            return [gr.update(), gr.update(), "", gr.update(visible=True), title, *_editor_values(ui, card),
                    training_html(card), {"page": card.page, "item": card.relpath}]
        if card.page == en.CHECKPOINTS:
            return [gr.update(), gr.update(), _switch_checkpoint(ui, card, request), *no_editor]
        separator = str(ui.services.options.extra_networks_add_text_separator)
        edit = en.toggle(card, prompt, negative, separator)
        return [edit.prompt, edit.negative_prompt, "", *no_editor]

    ui.extra["action_button"].click(act, inputs=[ui.extra["action"], top.prompt, top.negative_prompt],
                                    outputs=[top.prompt, top.negative_prompt, ui.status, *editor_outputs],
                                    show_progress="hidden")


def _switch_checkpoint(ui: ExtraNetworksUi, card: en.Card, request: Any) -> str:
    from modules.ui.common import ui_caller

    info = ui.services.models.registry.get_closest(card.relpath)
    if info is None:
        return f"Checkpoint {card.relpath} is not known; refresh the checkpoints."
    ui.services.generation.submit_model_switch(info.title, owner=ui_caller(ui.services, request).name)
    return f"Loading checkpoint {info.name}…"


def _connect_save(ui: ExtraNetworksUi) -> None:
    def save(editing: dict | None, *values):
        card = ui.cache.find(editing["page"], editing["item"]) if editing else None
        if card is None:
            return ["No card is being edited.", *[gr.update() for _ in ui.pages]]
        try:
            en.save_user_metadata(card, dict(zip(ui.fields, values)))
        except (OSError, ValueError) as err:
            return [f"Not saved: {html.escape(str(err))}", *[gr.update() for _ in ui.pages]]
        return [f"Saved {card.name}.", *_rerender(ui, card.page)]

    ui.save.click(save, inputs=[ui.editing, *ui.fields.values()], outputs=[ui.status, *ui.all_cards()],
                  show_progress="hidden")


def _rerender(ui: ExtraNetworksUi, page_id: str) -> list[Any]:
    """New cards html for `page_id` (re-listed), no change for the other pages."""
    out = []
    for page_ui in ui.pages:
        if page_ui.page.id == page_id:
            ui.cache.reload(page_id)
            out.append(_render(ui, page_ui, "", ui.services.options.extra_networks_card_order_field,
                               ui.services.options.extra_networks_card_order, _ALL))
        else:
            out.append(gr.update())
    return out


def _selected_image(gallery: list | None, index: int | None):
    from PIL import Image

    if not gallery:
        return None
    i = index if index is not None and 0 <= index < len(gallery) else 0
    item = gallery[i][0] if isinstance(gallery[i], (list, tuple)) else gallery[i]
    if isinstance(item, dict):
        item = item.get("path") or item.get("image")
    return Image.open(item) if isinstance(item, str) else item


def _connect_replace_preview(ui: ExtraNetworksUi, gallery: Any) -> None:
    ui.selected = gr.State(None)
    gallery.select(_gallery_index, outputs=ui.selected, show_progress="hidden")

    def replace(editing: dict | None, images: list | None, index: int | None):
        card = ui.cache.find(editing["page"], editing["item"]) if editing else None
        image = _selected_image(images, index)
        if card is None or image is None:
            return ["Open a card's editor and generate an image first.", *[gr.update() for _ in ui.pages]]
        try:
            target = en.save_preview(card, image)
        except (OSError, ValueError) as err:
            return [f"Preview not saved: {html.escape(str(err))}", *[gr.update() for _ in ui.pages]]
        return [f"Preview saved as {target.name}.", *_rerender(ui, card.page)]

    ui.replace_preview.click(replace, inputs=[ui.editing, gallery, ui.selected], outputs=[ui.status, *ui.all_cards()],
                             show_progress="hidden")


def _gallery_index(evt: gr.SelectData):
    return evt.index

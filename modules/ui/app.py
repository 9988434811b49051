"""The Gradio page: quicksettings on top, then one tab per feature."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import gradio as gr

from modules.services import Services
from modules.ui import paste
from modules.ui.extensions_tab import build_extensions_tab
from modules.ui.extras_tab import ExtrasUi, build_extras_tab, connect_send_to_extras
from modules.ui.extra_networks import EXTRA_NETWORKS_CSS, EXTRA_NETWORKS_HEAD
from modules.ui.img2img_tab import INPAINT_MODES, MODES, Img2ImgUi, build_img2img_tab
from modules.ui.pnginfo_tab import PngInfoUi, build_pnginfo_tab
from modules.ui.queue_tab import GENERATE_FOREVER_HEAD, build_queue_tab, connect_queue_tab
from modules.ui.quicksettings import build_quicksettings
from modules.ui.settings_tab import build_settings_tab
from modules.ui.styles_ui import connect_styles
from modules.ui.txt2img_tab import Txt2ImgUi, build_txt2img_tab

# Ctrl+Enter generates in the visible tab, as in A1111. A <head> script, not Gradio's js= load hook:
# that hook runs after the page is interactive, so an early Ctrl+Enter would be lost.
CTRL_ENTER_HEAD = """<script>
document.addEventListener('keydown', (e) => {
  if (!(e.key === 'Enter' && (e.ctrlKey || e.metaKey))) return;
  const buttons = [...document.querySelectorAll('button[id$="_generate"]')].filter(b => b.offsetParent !== null);
  if (buttons.length) { e.preventDefault(); buttons[0].click(); }
});
</script>"""

# A1111's page helpers, which extensions' javascript/*.js call: defined before their scripts (head order).
# onUiLoaded fires once the generation tabs exist; onUiUpdate/onAfterUiUpdate on page changes (batched
# per animation frame); onUiTabChange when the selected top tab changes; onOptionsChanged is accepted.
A1111_JS_HEAD = """<script>
(() => {
  const lists = {loaded: [], update: [], after: [], tab: [], options: []};
  const call = (fns, arg) => fns.forEach((fn) => { try { fn(arg); } catch (e) { console.error(e); } });
  window.gradioApp = () => {
    const app = document.getElementsByTagName('gradio-app')[0];
    return app ? (app.shadowRoot || app) : document;
  };
  window.get_uiCurrentTab = () => gradioApp().querySelector('#tabs > .tab-wrapper button.selected');
  window.get_uiCurrentTabContent = () => [...gradioApp().querySelectorAll('#tabs > .tabitem')]
    .find((t) => t.offsetParent !== null) || null;
  window.onUiLoaded = (fn) => lists.loaded.push(fn);
  window.onUiUpdate = (fn) => lists.update.push(fn);
  window.onAfterUiUpdate = (fn) => lists.after.push(fn);
  window.onUiTabChange = (fn) => lists.tab.push(fn);
  window.onOptionsChanged = (fn) => lists.options.push(fn);
  let loaded = false, pending = [], scheduled = false, tab = null;
  new MutationObserver((mutations) => {
    if (!loaded && gradioApp().querySelector('#txt2img_prompt')) { loaded = true; call(lists.loaded); }
    if (!loaded) return;
    pending.push(...mutations);
    if (scheduled) return;
    scheduled = true;
    requestAnimationFrame(() => {
      const batch = pending; pending = []; scheduled = false;
      call(lists.update, batch);
      call(lists.after);
      const now = get_uiCurrentTab();
      if (now !== tab) { tab = now; call(lists.tab); }
    });
  }).observe(document, {childList: true, subtree: true});
})();
</script>"""

CSS = """
#quicksettings { gap: 0.5em; align-items: end; }
#quicksettings > * { max-width: 32em; }
"""


@dataclass
class UiBundle:
    blocks: gr.Blocks
    css: str
    js: str | None
    head: str | None


def _theme_head(theme: str | None) -> str | None:
    if not theme:
        return None
    # Gradio picks dark/light from the __theme query parameter; add it once.
    return (
        "<script>(function(){var u=new URL(window.location);"
        f"if(u.searchParams.get('__theme')!=='{theme}')"
        f"{{u.searchParams.set('__theme','{theme}');window.location.replace(u);}}}})();</script>"
    )


def _find(blocks: gr.Blocks, elem_id: str):
    return next((b for b in blocks.blocks.values() if getattr(b, "elem_id", None) == elem_id), None)


def build_ui(services: Services, *, extension_tabs: list[tuple[gr.Blocks, str, str]] = (),
             extension_head: str = "", extension_css: str = "", extensions: Sequence = ()) -> UiBundle:
    """`extension_tabs`: (blocks, title, elem_id) from on_ui_tabs; head/css: extensions' javascript/*.js and style.css."""
    with gr.Blocks(title="Stable Diffusion", analytics_enabled=False) as blocks:
        build_quicksettings(services)
        with gr.Tabs(elem_id="tabs") as tabs:
            with gr.Tab("txt2img", id="txt2img", elem_id="tab_txt2img"):
                txt2img = build_txt2img_tab(services)
            with gr.Tab("img2img", id="img2img", elem_id="tab_img2img"):
                img2img = build_img2img_tab(services)
            with gr.Tab("Extras", id="extras", elem_id="tab_extras"):
                extras = build_extras_tab(services)
            with gr.Tab("PNG Info", id="pnginfo", elem_id="tab_pnginfo"):
                pnginfo = build_pnginfo_tab(services)
            with gr.Tab("Queue", id="queue", elem_id="tab_queue") as queue_tab:
                queue_ui = build_queue_tab(services)
            for ext_blocks, title, elem_id in extension_tabs:
                _render_extension_tab(ext_blocks, title, elem_id)
            with gr.Tab("Settings", id="settings", elem_id="tab_settings"):
                build_settings_tab(services)
            with gr.Tab("Extensions", id="extensions", elem_id="tab_extensions"):
                build_extensions_tab(services, extensions)
        connect_styles([txt2img.styles, img2img.styles], services)
        ctx = paste.PasteContext(services=services, top_tabs=tabs,
                                 checkpoint=_find(blocks, "setting_sd_model_checkpoint"),
                                 pending_checkpoint=gr.State(None))
        _connect_paste(ctx, txt2img, img2img, pnginfo)
        connect_queue_tab(ctx, queue_tab, queue_ui, txt2img, img2img)
        _connect_extras(blocks, tabs, extras, txt2img, img2img, pnginfo)
    head = "\n".join(h for h in (CTRL_ENTER_HEAD, A1111_JS_HEAD, GENERATE_FOREVER_HEAD, _theme_head(services.cmd_opts.theme),
                                  extension_head, EXTRA_NETWORKS_HEAD) if h)
    css = CSS + EXTRA_NETWORKS_CSS
    return UiBundle(blocks=blocks, css=css + ("\n" + extension_css if extension_css else ""), js=None, head=head)


def _render_extension_tab(ext_blocks: gr.Blocks, title: str, elem_id: str) -> None:
    """An on_ui_tabs Blocks as one more top tab; a failing one is logged and left out."""
    import logging

    try:
        with gr.Tab(title, id=elem_id, elem_id=f"tab_{elem_id}"):
            ext_blocks.render()
    except Exception:
        logging.getLogger(__name__).exception("Extension tab %r could not be added", title)


def _gallery_image(gallery: list | None, index: int | None, info: dict | None):
    """(infotext, PIL image) of the selected gallery image, or the first non-grid one."""
    from PIL import Image

    if not gallery:
        return None, None
    first = int((info or {}).get("index_of_first_image") or 0)
    i = index if index is not None and 0 <= index < len(gallery) else min(first, len(gallery) - 1)
    item = gallery[i][0] if isinstance(gallery[i], (list, tuple)) else gallery[i]
    image = Image.open(item) if isinstance(item, str) else item
    infotexts = (info or {}).get("infotexts") or []
    text = infotexts[i] if i < len(infotexts) else None
    if text is None and image is not None:
        text = image.info.get("parameters")
    return text, image


def _connect_paste(ctx: paste.PasteContext, txt2img: Txt2ImgUi, img2img: Img2ImgUi, pnginfo: PngInfoUi) -> None:
    """↙ in both tabs, PNG Info's three send buttons, txt2img's send to img2img / inpaint."""
    controls = (txt2img.controls, img2img.controls)
    for ui, tab, ctl in ((txt2img, "txt2img", controls[0]), (img2img, "img2img", controls[1])):
        paste.connect_paste_button(ctx, tab=tab, button=ui.paste_button, prompt=ctl.prompt,
                                   generation_info=ui.generation_info, targets=ui.paste_targets,
                                   override_settings=ui.override_settings)

    def to_mode(mode: int, component):
        outputs = [img2img.tabs, img2img.mode, img2img.inpaint_controls, component]

        def value(image):
            if image is None:
                picture = gr.update()
            elif mode == 2:
                picture = {"background": image, "layers": [], "composite": image}
            else:
                picture = image
            return [gr.Tabs(selected=MODES[mode]), mode, gr.update(visible=mode in INPAINT_MODES), picture]
        return outputs, value

    paste.connect_send(ctx, button=pnginfo.send_to_txt2img, tab="txt2img", top_tab_id="txt2img",
                       targets=txt2img.paste_targets, override_settings=txt2img.override_settings,
                       read=lambda text: (text, None), inputs=[pnginfo.generation_info])
    for button, mode, component in ((pnginfo.send_to_img2img, 0, img2img.init_img),
                                    (pnginfo.send_to_inpaint, 2, img2img.inpaint)):
        outputs, value = to_mode(mode, component)
        paste.connect_send(ctx, button=button, tab="img2img", top_tab_id="img2img",
                           targets=img2img.paste_targets, override_settings=img2img.override_settings,
                           read=lambda text, image: (text, image), inputs=[pnginfo.generation_info, pnginfo.image],
                           image_outputs=outputs, image_value=value)
    for button, mode, component in ((txt2img.send_to_img2img, 0, img2img.init_img),
                                    (txt2img.send_to_inpaint, 2, img2img.inpaint)):
        outputs, value = to_mode(mode, component)
        paste.connect_send(ctx, button=button, tab="img2img", top_tab_id="img2img",
                           targets=img2img.paste_targets, override_settings=img2img.override_settings,
                           read=_gallery_image,
                           inputs=[txt2img.gallery, txt2img.gallery_index, txt2img.generation_info],
                           image_outputs=outputs, image_value=value)


def _select_index(gallery) -> Any:
    """A gr.State that follows the selected image of `gallery` (None: none selected)."""
    index = gr.State(None)

    def select(evt: gr.SelectData):
        return evt.index
    gallery.select(select, outputs=index, show_progress="hidden")
    return index


def _connect_extras(blocks: gr.Blocks, tabs, extras: ExtrasUi, txt2img: Txt2ImgUi, img2img: Img2ImgUi,
                    pnginfo: PngInfoUi) -> None:
    """"Send to extras" from PNG Info and the txt2img/img2img galleries; Extras' own send buttons."""
    connect_send_to_extras(extras, tabs, _find(blocks, "pnginfo_send_to_extras"),
                           lambda text, image: (text, image), [pnginfo.generation_info, pnginfo.image])
    for tab, gallery, index, info in (("txt2img", txt2img.gallery, txt2img.gallery_index, txt2img.generation_info),
                                      ("img2img", img2img.gallery, _select_index(img2img.gallery),
                                       img2img.generation_info)):
        connect_send_to_extras(extras, tabs, _find(blocks, f"{tab}_send_to_extras"), _gallery_image,
                               [gallery, index, info])
    extras_index = _select_index(extras.gallery)

    def to_img2img(mode: int):
        def send(gallery, index):
            _text, image = _gallery_image(gallery, index, None)
            if image is None:
                return [gr.update()] * 6
            picture = {"background": image, "layers": [], "composite": image} if mode == 2 else image
            return (gr.Tabs(selected="img2img"), gr.Tabs(selected=MODES[mode]), mode,
                    gr.update(visible=mode in INPAINT_MODES), picture if mode == 0 else gr.update(),
                    picture if mode == 2 else gr.update())
        return send
    for button, mode in ((extras.send_to_img2img, 0), (extras.send_to_inpaint, 2)):
        button.click(to_img2img(mode), inputs=[extras.gallery, extras_index],
                     outputs=[tabs, img2img.tabs, img2img.mode, img2img.inpaint_controls, img2img.init_img,
                              img2img.inpaint], show_progress="hidden")

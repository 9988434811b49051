"""The Gradio page: quicksettings on top, then one tab per feature."""
from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from modules.services import Services
from modules.ui.settings_tab import build_settings_tab

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


def build_ui(services: Services) -> UiBundle:
    with gr.Blocks(title="Stable Diffusion", analytics_enabled=False) as blocks:
        with gr.Tabs(elem_id="tabs"):
            with gr.Tab("Settings", id="settings", elem_id="tab_settings"):
                build_settings_tab(services)
    return UiBundle(blocks=blocks, css=CSS, js=None, head=_theme_head(services.cmd_opts.theme))

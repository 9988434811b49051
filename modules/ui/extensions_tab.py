"""The Extensions tab: the installed list with enable/disable, and install from a git URL.

Changes to the enabled set are saved to config.json and take effect at the next start;
installs and updates are refused on a server reachable from other machines unless
--enable-insecure-extension-access (see modules.extensions.check_install_access).
"""
from __future__ import annotations

import html
from typing import Sequence

import gradio as gr

from modules.extensions import loader as extension_loader
from modules.extensions.loader import Extension
from modules.services import Services

RESTART_NOTE = "Saved. Restart the web UI (stop it and run it again) to load the new set of extensions."


def installed_html(exts: Sequence[Extension]) -> str:
    if not exts:
        return "<p>No extensions installed. Put them in the <code>extensions</code> folder or install one from a URL.</p>"
    rows = []
    for e in exts:
        errors = f"<details><summary>details</summary><pre>{html.escape(chr(10).join(e.errors))}</pre></details>" if e.errors else ""
        rows.append(f"<tr><td>{html.escape(e.name)}</td><td>{'built-in' if e.is_builtin else 'user'}</td>"
                    f"<td>{html.escape(e.status)}{errors}</td><td><code>{html.escape(str(e.path))}</code></td></tr>")
    return ("<table id='extensions_table'><thead><tr><th>Extension</th><th>Kind</th><th>Status</th><th>Folder</th></tr>"
            "</thead><tbody>" + "".join(rows) + "</tbody></table>")


def build_extensions_tab(services: Services, exts: Sequence[Extension]) -> None:
    options = services.options
    names = [e.name for e in exts]
    with gr.Tabs(elem_id="tabs_extensions"):
        with gr.Tab("Installed", id="extensions_installed"):
            gr.HTML(installed_html(exts), elem_id="extensions_installed_html")
            enabled = gr.CheckboxGroup(names, value=[e.name for e in exts if e.name not in set(options.disabled_extensions)],
                                       label="Enabled extensions", elem_id="extensions_enabled")
            mode = gr.Radio(["none", "extra", "all"], value=options.disable_all_extensions,
                            label="Disable all extensions (keeps the list above)", elem_id="extensions_disable_all")
            apply = gr.Button("Apply (takes effect at the next start)", variant="primary", elem_id="extensions_apply")
            result = gr.Markdown(elem_id="extensions_apply_result")

            def on_apply(chosen, chosen_mode):
                try:
                    extension_loader.apply_enabled(options, names, chosen or [], chosen_mode or "none")
                except Exception as err:  # frozen settings, unwritable config.json
                    return f"Not saved: {err}"
                return RESTART_NOTE

            apply.click(on_apply, inputs=[enabled, mode], outputs=[result])
            user_exts = {e.name: e for e in exts if not e.is_builtin}
            with gr.Row():
                to_update = gr.Dropdown(list(user_exts), label="Update from its git remote", elem_id="extensions_update_name")
                update = gr.Button("Update", elem_id="extensions_update_button")
            update_result = gr.Markdown(elem_id="extensions_update_result")

            def on_update(chosen):
                ext = user_exts.get(chosen or "")
                if ext is None:
                    return "Choose an extension."
                try:
                    message = extension_loader.update(services.cmd_opts, ext)
                except (extension_loader.ExtensionAccessError, ValueError, RuntimeError, OSError) as err:
                    return f"Not updated: {err}"
                return f"{message or 'Updated.'} Restart the web UI to load the new code."

            update.click(on_update, inputs=[to_update], outputs=[update_result])
        with gr.Tab("Install from URL", id="extensions_install"):
            try:
                extension_loader.check_install_access(services.cmd_opts)
                refused = ""
            except extension_loader.ExtensionAccessError as err:
                refused = str(err)
            if refused:
                gr.Markdown(refused, elem_id="extensions_install_refused")
            url = gr.Textbox(label="URL for extension's git repository", elem_id="extensions_install_url",
                             interactive=not refused)
            name = gr.Textbox(label="Local directory name (leave empty for automatic)", elem_id="extensions_install_dirname",
                              interactive=not refused)
            install = gr.Button("Install", elem_id="extensions_install_button", interactive=not refused)
            install_result = gr.Markdown(elem_id="extensions_install_result")

            def on_install(url_text, dirname):
                try:
                    target = extension_loader.install_from_url(services.cmd_opts, services.paths.extensions_dir, url_text or "", dirname or "")
                except (extension_loader.ExtensionAccessError, ValueError, RuntimeError, OSError) as err:
                    return f"Not installed: {err}"
                return f"Installed into `{target}`. Restart the web UI to load it."

            install.click(on_install, inputs=[url, name], outputs=[install_result])

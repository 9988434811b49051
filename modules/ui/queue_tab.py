"""The Queue tab: the running job and its live preview, the caller's waiting jobs (cancel, move up/down,
pause), and the history: a paged gallery of finished jobs with search, model and date filters, and per
job Send to txt2img/img2img, Re-run, Delete (with its files, after a confirmation) and Open folder.

Everything goes through core/queue_service.QueueService with the caller of the event: a user sees and
acts on their own jobs, an admin on everybody's (the same rule as /queue/v1).
"""
from __future__ import annotations

import datetime as dt
import html
import logging
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr

from modules.core.job_store import HistoryQuery
from modules.core.queue_service import NotFound, QueueActionError
from modules.ui.common import ui_caller

log = logging.getLogger(__name__)

PAGE_SIZE = 24
REFRESH_SECONDS = 2.0
ALL_MODELS = "All models"

# A1111's "Generate forever": right-click Generate for a menu; while on, Generate is clicked again each time
# the tab has no job of its own waiting or running (its progress shows no .queue-busy element), so it keeps
# one job in the queue, never a flood.
GENERATE_FOREVER_HEAD = """<script>
(() => {
  const forever = {};
  let menu = null;
  const closeMenu = () => { if (menu) { menu.remove(); menu = null; } };
  // Only a person's click closes the menu (forever mode's own Generate clicks bubble up here too).
  document.addEventListener('click', (e) => { if (e.isTrusted) closeMenu(); });
  document.addEventListener('contextmenu', (e) => {
    const button = e.target.closest && e.target.closest('button[id$="_generate"]');
    if (!button) return;
    e.preventDefault();
    closeMenu();
    const tab = button.id.replace(/_generate$/, '');
    menu = document.createElement('div');
    menu.id = 'generate_forever_menu';
    menu.style.cssText = `position:fixed;left:${e.clientX}px;top:${e.clientY}px;z-index:1000;background:var(--background-fill-primary,#fff);border:1px solid #888;padding:4px;cursor:pointer`;
    menu.textContent = forever[tab] ? 'Cancel generate forever' : 'Generate forever';
    menu.addEventListener('click', (ev) => {
      ev.stopPropagation();
      closeMenu();
      if (forever[tab]) { clearInterval(forever[tab]); delete forever[tab]; return; }
      let pendingUntil = 0;   // after a click: until the tab shows its job (or 15 s, for a job done at once)
      const tick = () => {
        const busy = document.querySelector(`#${tab}_progress .queue-busy`);
        if (pendingUntil) {
          if (busy || Date.now() > pendingUntil) pendingUntil = 0;
          return;
        }
        if (busy) return;
        const generate = document.getElementById(`${tab}_generate`);
        if (generate) { generate.click(); pendingUntil = Date.now() + 15000; }
      };
      forever[tab] = setInterval(tick, 500);
      tick();
    });
    document.body.appendChild(menu);
  });
})();
</script>"""


@dataclass
class QueueTabUi:
    send_to_txt2img: Any
    send_to_img2img: Any
    selected: Any        # gr.State: {"id", "infotext", "path"} of the history job picked in the gallery
    first_page: Any      # (request, *filters) -> history outputs: the event that loads page 1
    filters: list[Any]
    history_outputs: list[Any]


def _caller(services, request):
    return ui_caller(services, request)


def _when(ts: float | None) -> str:
    return dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S") if ts else ""


def _short(text: str, n: int = 60) -> str:
    text = " ".join((text or "").split())
    return text if len(text) <= n else text[:n - 1] + "…"


# --------------------------------------------------------------------------- running + waiting

def running_html(services, caller) -> tuple[str, Any]:
    """(the running job's summary, its live preview or None): the preview only for its owner or an admin."""
    gen, q = services.generation, services.queue
    job = gen.queue.running()
    if job is None:
        return "<div id='queue_idle'>Nothing is running.</div>", None
    if not caller.owns(job):
        return "<div>Another user's job is running.</div>", None
    snap = gen.state.snapshot()
    st = snap["state"]
    rec = q.store.get(job.meta["rid"]) if job.meta.get("rid") else None
    what = html.escape(_short(rec.prompt if rec else job.name))
    eta = f" · ETA {snap['eta_relative']:.0f}s" if snap["eta_relative"] else ""
    who = f" · {html.escape(q.display_owner(job.owner))}" if caller.admin else ""
    text = (f"<div id='queue_running_job'><b>{html.escape(job.name)}</b>{who}: {what}<br>"
            f"{int(100 * snap['progress'])}% · step {st['sampling_step']}/{st['sampling_steps']}{eta}</div>")
    preview, _ = gen.state.current_preview()
    return text, preview


def waiting_html(views, q, admin: bool) -> str:
    if not views:
        return "<div id='queue_empty'>No jobs are waiting.</div>"
    rows = []
    for v in views:
        rec = v.record
        state = "paused" if v.paused else rec.status
        eta = f"{v.eta:.0f}s" if v.eta else ""
        who = f"<td>{html.escape(q.display_owner(rec.owner))}</td>" if admin else ""
        rows.append(f"<tr data-job='{html.escape(rec.id)}'><td>{v.position if v.position is not None else ''}</td>{who}"
                    f"<td>{html.escape(rec.kind)}</td><td>{html.escape(_short(rec.prompt))}</td>"
                    f"<td>{state}</td><td>{eta}</td></tr>")
    head = "<th>#</th>" + ("<th>User</th>" if admin else "") + "<th>Kind</th><th>Prompt</th><th>Status</th><th>ETA</th>"
    return f"<table id='queue_table'><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _choice_label(v, q, admin: bool) -> str:
    who = f"{q.display_owner(v.record.owner)} · " if admin else ""
    return f"#{v.position} · {who}{v.record.kind} · {_short(v.record.prompt, 40)}"


def refresh_waiting(services, request, current: str | None):
    caller = _caller(services, request)
    q = services.queue
    text, preview = running_html(services, caller)
    views = q.unfinished(caller)
    waiting = [v for v in views if v.record.status == "queued"]
    choices = [(_choice_label(v, q, caller.admin), v.record.id) for v in waiting]
    ids = [c[1] for c in choices]
    # The pick is left alone while its job still waits: a tick answered after the user picked another
    # job must not put the old one back.
    picked = gr.update(choices=choices) if current in ids else gr.update(choices=choices, value=ids[0] if ids else None)
    pause_label = "▶ Resume my queue" if q.is_paused(caller) else "⏸ Pause my queue"
    return text, preview, waiting_html(views, q, caller.admin), picked, gr.update(value=pause_label)


# --------------------------------------------------------------------------- history

def _day(text: str, end: bool = False) -> float | None:
    text = (text or "").strip()
    if not text:
        return None
    day = dt.datetime.strptime(text, "%Y-%m-%d")   # ValueError: shown to the user
    return (day + dt.timedelta(days=1 if end else 0)).timestamp()


def history_page(services, request, search: str, model: str, date_from: str, date_to: str, page: int):
    """(gallery items, the page's job ids, page info html, page number, model choices update, and the cleared
    details, selection and folder: in the same update, so a pick made right after is never undone)."""
    caller = _caller(services, request)
    q = services.queue
    try:
        query = HistoryQuery(search=(search or "")[:500], model="" if model in (None, "", ALL_MODELS) else model,
                             date_from=_day(date_from), date_to=_day(date_to, end=True),
                             limit=PAGE_SIZE, offset=max(0, int(page or 0)) * PAGE_SIZE)
    except ValueError:
        return (gr.update(), gr.update(), "<div class='error'>Dates are written YYYY-MM-DD.</div>", page, gr.update(),
                gr.update(), gr.update(), gr.update())
    recs, total = q.history(caller, query)
    pages = max(1, -(-total // PAGE_SIZE))
    if recs == [] and page and total:
        return history_page(services, request, search, model, date_from, date_to, pages - 1)
    items, ids = [], []
    for rec in recs:
        outputs = [o for o in rec.outputs if not o.grid] or rec.outputs
        # A job without a file (interrupted, failed, not saved) is still listed, so it can be re-run.
        path = next((o.path for o in outputs if os.path.isfile(o.path)), None) or _placeholder(rec.status)
        caption = f"{rec.status} · {_short(rec.prompt, 50)}"
        if caller.admin:
            caption = f"{q.display_owner(rec.owner)} · {caption}"
        items.append((path, caption))
        ids.append(rec.id)
    info = f"<span id='queue_history_count'>{total} job(s)</span> · page {int(page or 0) + 1} of {pages}"
    models = [ALL_MODELS, *q.store.models(None if caller.admin else caller.name)]
    return items, ids, info, int(page or 0), gr.update(choices=models), "", None, ""


_PLACEHOLDERS: dict[str, Any] = {}


def _placeholder(status: str):
    """A small grey tile for a history job with no image (one PIL image per status, made once)."""
    if status not in _PLACEHOLDERS:
        from PIL import Image, ImageDraw

        tile = Image.new("RGB", (128, 128), (70, 70, 70))
        ImageDraw.Draw(tile).text((10, 58), status, fill=(230, 230, 230))
        _PLACEHOLDERS[status] = tile
    return _PLACEHOLDERS[status]


def job_details(services, request, ids: list[str], index: int | None):
    """The picked history job: its infotext shown, and {"id", "infotext", "path"} kept for the buttons."""
    caller = _caller(services, request)
    if index is None or not ids or not 0 <= index < len(ids):
        return "", None
    try:
        rec = services.queue.get(caller, ids[index])
    except NotFound:
        return "<div class='error'>That job is gone.</div>", None
    outputs = [o for o in rec.outputs if not o.grid] or rec.outputs
    first = outputs[0] if outputs else None
    infotext = (first.infotext if first else "") or rec.info or ""
    files = len(rec.outputs)
    head = (f"<div id='queue_history_job' data-job='{html.escape(rec.id)}'><b>{html.escape(rec.status)}</b> · "
            f"{html.escape(rec.kind)} · {_when(rec.finished_at)} · {files} file(s)"
            + (f" · {html.escape(services.queue.display_owner(rec.owner))}" if caller.admin else "")
            + (f"<div class='error'>{html.escape(rec.error)}</div>" if rec.error else "") + "</div>")
    body = f"<pre class='infotext' style='white-space:pre-wrap'>{html.escape(infotext)}</pre>"
    return head + body, {"id": rec.id, "infotext": infotext, "path": first.path if first else None}


def open_folder(services, request, selected: dict | None) -> str:
    """The job's folder, as a path on the server. Only the one user of a local server (no login, loopback:
    the browser is on this machine) also gets it opened in the file manager; the folder comes from the
    job's row, checked to be inside outputs/, never from the client."""
    if not selected:
        return "Pick a job in the gallery first."
    caller = _caller(services, request)
    try:
        folder = services.queue.folder_of(caller, selected["id"])
    except NotFound:
        return "That job is gone."
    if folder is None:
        return "This job saved no files."
    callers = services.callers
    if callers is not None and callers.single_user and not services.cmd_opts.hide_ui_dir_config:
        _open_in_file_manager(folder)
    return folder


def _open_in_file_manager(folder: str) -> None:
    if sys.platform == "win32":
        os.startfile(folder)  # type: ignore[attr-defined]  # noqa: S606 - a server-side folder path
        return
    opener = "open" if sys.platform == "darwin" else "xdg-open"
    if shutil.which(opener) and (sys.platform == "darwin" or os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        subprocess.Popen([opener, folder], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # noqa: S603


# --------------------------------------------------------------------------- the tab

def build_queue_tab(services) -> QueueTabUi:
    q = services.queue
    with gr.Row():
        with gr.Column(scale=1):
            gr.Markdown("### Running")
            running = gr.HTML("", elem_id="queue_running")
            preview = gr.Image(label="Live preview", interactive=False, elem_id="queue_preview", height=256,
                               show_label=False)
        with gr.Column(scale=2):
            gr.Markdown("### Waiting")
            waiting = gr.HTML("", elem_id="queue_waiting")
            with gr.Row():
                picked = gr.Dropdown([], label="Job", elem_id="queue_pick", scale=3)
                up = gr.Button("▲ Up", elem_id="queue_up", size="sm", scale=0, min_width=60)
                down = gr.Button("▼ Down", elem_id="queue_down", size="sm", scale=0, min_width=60)
                cancel = gr.Button("✖ Cancel", elem_id="queue_cancel", size="sm", scale=0, min_width=80)
                pause = gr.Button("⏸ Pause my queue", elem_id="queue_pause", size="sm", scale=0, min_width=140)
            action_info = gr.HTML("", elem_id="queue_action_info")
    timer = gr.Timer(REFRESH_SECONDS)

    gr.Markdown("### History")
    with gr.Row():
        search = gr.Textbox(label="Search prompts", elem_id="queue_search", scale=3)
        model = gr.Dropdown([ALL_MODELS], value=ALL_MODELS, label="Model", elem_id="queue_model", scale=2)
        date_from = gr.Textbox(label="From (YYYY-MM-DD)", elem_id="queue_date_from", scale=1)
        date_to = gr.Textbox(label="To (YYYY-MM-DD)", elem_id="queue_date_to", scale=1)
        refresh = gr.Button("🔄 Refresh", elem_id="queue_refresh", scale=0, min_width=100)
    gallery = gr.Gallery(label="History", elem_id="queue_history_gallery", columns=6, height="auto",
                         object_fit="contain", allow_preview=False, show_label=False)
    with gr.Row():
        prev_page = gr.Button("◀ Newer", elem_id="queue_prev", size="sm", scale=0, min_width=100)
        page_info = gr.HTML("", elem_id="queue_page_info")
        next_page = gr.Button("Older ▶", elem_id="queue_next", size="sm", scale=0, min_width=100)
    page = gr.State(0)
    page_ids = gr.State([])
    selected = gr.State(None)
    details = gr.HTML("", elem_id="queue_history_info")
    with gr.Row():
        send_to_txt2img = gr.Button("📝 Send to txt2img", elem_id="queue_send_to_txt2img", size="sm")
        send_to_img2img = gr.Button("🖼️ Send to img2img", elem_id="queue_send_to_img2img", size="sm")
        rerun = gr.Button("🔁 Re-run", elem_id="queue_rerun", size="sm")
        delete = gr.Button("🗑️ Delete", elem_id="queue_delete", size="sm")
        folder_button = gr.Button("📂 Open folder", elem_id="queue_open_folder", size="sm")
    with gr.Row(visible=False, elem_id="queue_confirm_row") as confirm_row:
        confirm_text = gr.HTML("")
        confirm = gr.Button("Yes, delete the job and its files", variant="stop", elem_id="queue_confirm_delete",
                            size="sm")
        keep = gr.Button("Keep it", elem_id="queue_keep", size="sm")
    folder = gr.Textbox(label="Folder on the server", interactive=False, elem_id="queue_folder", visible=True)
    history_message = gr.HTML("", elem_id="queue_history_message")

    waiting_outputs = [running, preview, waiting, picked, pause]

    def do_refresh(request: gr.Request, current):
        return refresh_waiting(services, request, current)

    timer.tick(do_refresh, inputs=[picked], outputs=waiting_outputs, show_progress="hidden", queue=False,
               api_name="queue_status")

    def act(request: gr.Request, job_id, action: str):
        caller = _caller(services, request)
        try:
            if not job_id:
                return "Pick a waiting job first."
            if action == "cancel":
                return f"Job {q.cancel(caller, job_id)}."
            q.move(caller, job_id, -1 if action == "up" else 1)
            return ""
        except (NotFound, QueueActionError) as err:
            return f"<div class='error'>{html.escape(str(err))}</div>"

    def acting(action: str):
        def handler(request: gr.Request, job_id):   # gr.Request is given by its annotation
            return act(request, job_id, action)
        return handler

    for button, action in ((up, "up"), (down, "down"), (cancel, "cancel")):
        button.click(acting(action), inputs=[picked],
                     outputs=action_info, show_progress="hidden", queue=False).then(
            do_refresh, inputs=[picked], outputs=waiting_outputs, show_progress="hidden", queue=False)

    def toggle_pause(request: gr.Request):
        caller = _caller(services, request)
        q.set_paused(caller, not q.is_paused(caller))
        return ""
    pause.click(toggle_pause, outputs=action_info, show_progress="hidden", queue=False).then(
        do_refresh, inputs=[picked], outputs=waiting_outputs, show_progress="hidden", queue=False)

    # -- history
    filters = [search, model, date_from, date_to]
    history_outputs = [gallery, page_ids, page_info, page, model, details, selected, folder]

    def load(request: gr.Request, s, m, f, t, p):
        return history_page(services, request, s, m, f, t, p)

    def first_page(request: gr.Request, s, m, f, t):
        return history_page(services, request, s, m, f, t, 0)

    def step(delta: int):
        def go(request: gr.Request, s, m, f, t, p):
            return history_page(services, request, s, m, f, t, max(0, int(p or 0) + delta))
        return go

    # Reading the history is a quick indexed query: answered at once, never behind Gradio's queue.
    refresh.click(first_page, inputs=filters, outputs=history_outputs, show_progress="hidden", queue=False,
                  api_name="queue_history")
    for event in (search.submit, model.input, date_from.submit, date_to.submit):
        event(first_page, inputs=filters, outputs=history_outputs, show_progress="hidden", queue=False)
    prev_page.click(step(-1), inputs=[*filters, page], outputs=history_outputs, show_progress="hidden",
                    queue=False)
    next_page.click(step(1), inputs=[*filters, page], outputs=history_outputs, show_progress="hidden",
                    queue=False)

    def pick(request: gr.Request, ids, evt: gr.SelectData):
        return job_details(services, request, ids, evt.index)
    gallery.select(pick, inputs=[page_ids], outputs=[details, selected], show_progress="hidden", queue=False)

    def do_rerun(request: gr.Request, sel):
        if not sel:
            return "Pick a job in the gallery first."
        try:
            rec = q.rerun(_caller(services, request), sel["id"])
        except (NotFound, QueueActionError, ValueError) as err:
            return f"<div class='error'>{html.escape(str(err))}</div>"
        return f"Queued again as job {html.escape(rec.id[:8])}."
    rerun.click(do_rerun, inputs=[selected], outputs=history_message, show_progress="hidden")

    def ask_delete(request: gr.Request, sel):
        if not sel:
            return gr.update(visible=False), "", "Pick a job in the gallery first."
        try:
            rec = q.get(_caller(services, request), sel["id"])
        except NotFound:
            return gr.update(visible=False), "", "That job is gone."
        return (gr.update(visible=True), f"Delete this job and its {len(rec.outputs)} file(s) from the disk?", "")
    delete.click(ask_delete, inputs=[selected], outputs=[confirm_row, confirm_text, history_message],
                 show_progress="hidden")
    keep.click(lambda: gr.update(visible=False), outputs=confirm_row, show_progress="hidden")

    def do_delete(request: gr.Request, sel):
        if not sel:
            return gr.update(visible=False), "Pick a job in the gallery first."
        try:
            removed = q.delete(_caller(services, request), sel["id"])
        except (NotFound, QueueActionError) as err:
            return gr.update(visible=False), f"<div class='error'>{html.escape(str(err))}</div>"
        return gr.update(visible=False), f"Deleted the job and {len(removed)} file(s)."
    confirm.click(do_delete, inputs=[selected], outputs=[confirm_row, history_message], show_progress="hidden").then(
        load, inputs=[*filters, page], outputs=history_outputs, show_progress="hidden")

    def do_folder(request: gr.Request, sel):
        return open_folder(services, request, sel)
    folder_button.click(do_folder, inputs=[selected], outputs=folder, show_progress="hidden")

    return QueueTabUi(send_to_txt2img=send_to_txt2img, send_to_img2img=send_to_img2img, selected=selected,
                      first_page=first_page, filters=filters, history_outputs=history_outputs)


def connect_queue_tab(ctx, tab, queue_ui: QueueTabUi, txt2img, img2img) -> None:
    """Selecting the Queue tab loads the first history page; the history's Send to txt2img / img2img."""
    tab.select(queue_ui.first_page, inputs=queue_ui.filters, outputs=queue_ui.history_outputs,
               show_progress="hidden", queue=False)
    _connect_sends(ctx, queue_ui, txt2img, img2img)


def _connect_sends(ctx, queue_ui: QueueTabUi, txt2img, img2img) -> None:
    """Send to txt2img / img2img of the picked history job: its infotext (and its image for img2img)."""
    from PIL import Image

    from modules.ui import paste
    from modules.ui.img2img_tab import INPAINT_MODES, MODES

    to_img2img_outputs = [img2img.tabs, img2img.mode, img2img.inpaint_controls, img2img.init_img]

    def to_img2img_value(image):
        return [gr.Tabs(selected=MODES[0]), 0, gr.update(visible=0 in INPAINT_MODES),
                image if image is not None else gr.update()]

    def read_text(sel):
        return ((sel or {}).get("infotext"), None)

    def read_both(sel):
        path = (sel or {}).get("path")
        image = None
        # The path comes from the job's row (job_details); only files under outputs/ are ever opened.
        if path and ctx.services.queue.inside_outputs(Path(path)) and os.path.isfile(path):
            with Image.open(path) as opened:
                image = opened.copy()
        return ((sel or {}).get("infotext"), image)

    paste.connect_send(ctx, button=queue_ui.send_to_txt2img, tab="txt2img", top_tab_id="txt2img",
                       targets=txt2img.paste_targets, override_settings=txt2img.override_settings,
                       read=read_text, inputs=[queue_ui.selected])
    paste.connect_send(ctx, button=queue_ui.send_to_img2img, tab="img2img", top_tab_id="img2img",
                       targets=img2img.paste_targets, override_settings=img2img.override_settings,
                       read=read_both, inputs=[queue_ui.selected], image_outputs=to_img2img_outputs,
                       image_value=to_img2img_value)

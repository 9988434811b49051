"""Wiring shared by the generation tabs (txt2img, img2img)."""
from __future__ import annotations

import html
from dataclasses import dataclass, fields
from typing import Any

import gradio as gr


POLL_SECONDS = 0.5  # how often a running job's progress and preview are pushed to the page


def progress_html(snapshot: dict[str, Any], waiting_ahead: int) -> str:
    if waiting_ahead > 0:
        return f"<div class='progress-text'>Waiting in queue: {waiting_ahead} job(s) ahead…</div>"
    state = snapshot.get("state", {})
    pct = int(100 * snapshot.get("progress", 0.0))
    eta = snapshot.get("eta_relative") or 0
    step, total = state.get("sampling_step", 0), state.get("sampling_steps", 0)
    job_no, job_count = state.get("job_no", 0), state.get("job_count", 0)
    parts = [f"{pct}%"]
    if total:
        parts.append(f"step {step}/{total}")
    if job_count > 1:
        parts.append(f"batch {min(job_no + 1, job_count)}/{job_count}")
    if eta > 0:
        parts.append(f"ETA {eta:.0f}s")
    return (f"<div class='progress-text'>{' · '.join(parts)}</div>"
            f"<progress max='100' value='{pct}' style='width:100%'></progress>")


def infotext_html(text: str) -> str:
    return f"<pre class='infotext' style='white-space:pre-wrap'>{html.escape(text)}</pre>"


def _first_seed(info: dict | None, current: int):
    if not info:
        return current
    seeds = info.get("all_seeds") or [info.get("seed", current)]
    return seeds[0] if seeds else current


def connect_seed_buttons(*, seed, random_seed, reuse_seed, generation_info) -> None:
    """🎲 sets -1 (random); ♻ reuses the seed of the last generation."""
    random_seed.click(lambda: -1, outputs=seed, show_progress="hidden")
    reuse_seed.click(_first_seed, inputs=[generation_info, seed], outputs=seed, show_progress="hidden")


def connect_token_counter(generation, prompt, token_counter) -> None:
    """A1111's "12/75" counter: tokens used / the size of the 75-token chunks they fill."""
    def count(text: str) -> str:
        used, limit = generation.count_tokens(text or "")
        return f"{used}/{limit}"

    prompt.change(count, inputs=prompt, outputs=token_counter, show_progress="hidden", trigger_mode="always_last")


class ControlsBase:
    """For a tab's controls dataclass: its components in field order, and their names."""

    def components(self) -> list[Any]:
        return [getattr(self, f.name) for f in fields(self)]

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


@dataclass
class Toprow:
    """Prompt, negative prompt and the buttons beside them: the same in every generation tab."""
    prompt: Any
    negative_prompt: Any
    token_counter: Any
    paste_button: Any
    generate: Any
    interrupt: Any
    skip: Any
    styles_ui: Any
    override_settings: Any   # settings named by a pasted infotext (A1111's "Override settings"); shown only when set


def build_toprow(tabname: str, services) -> Toprow:
    from modules.ui.styles_ui import build_styles_row

    with gr.Row(elem_id=f"{tabname}_toprow"):
        with gr.Column(scale=6):
            prompt = gr.Textbox(label="Prompt", elem_id=f"{tabname}_prompt", lines=3,
                                placeholder="Prompt (Ctrl+Enter to generate)")
            negative_prompt = gr.Textbox(label="Negative prompt", elem_id=f"{tabname}_neg_prompt", lines=2,
                                         placeholder="Negative prompt")
        with gr.Column(scale=1, min_width=180):
            with gr.Row():
                token_counter = gr.Markdown("0/75", elem_id=f"{tabname}_token_counter")
                paste_button = gr.Button("↙️", elem_id=f"{tabname}_paste", size="sm", min_width=40, scale=0)
            generate = gr.Button("Generate", variant="primary", elem_id=f"{tabname}_generate")
            with gr.Row():
                interrupt = gr.Button("Interrupt", elem_id=f"{tabname}_interrupt", size="sm")
                skip = gr.Button("Skip", elem_id=f"{tabname}_skip", size="sm")
            styles_ui = build_styles_row(tabname, services)
    override_settings = gr.Dropdown([], value=[], multiselect=True, label="Override settings", visible=False,
                                    elem_id=f"{tabname}_override_settings", allow_custom_value=True)
    return Toprow(prompt=prompt, negative_prompt=negative_prompt, token_counter=token_counter,
                  paste_button=paste_button, generate=generate, interrupt=interrupt, skip=skip,
                  styles_ui=styles_ui, override_settings=override_settings)


def script_job(runner, script_args: list[Any]):
    """The `script` for GenerationService.submit when the tab's scripts have something to do, else None."""
    return runner.job_script(script_args) if runner.has_work(script_args) else None


def error_updates(message: str) -> tuple[Any, ...]:
    """(gallery, infotext, progress, generation info) updates that show `message` and keep the gallery."""
    return gr.update(), "", f"<div class='error'>{html.escape(message)}</div>", gr.update()


def poll_job(generation, job):
    """Yield (gallery, infotext, progress, generation info) updates while `job` waits and runs (the live
    preview, progress and ETA), then its images and infotext, or its error."""
    while not job.wait(POLL_SECONDS):
        preview = generation.state.current_image
        shown = [preview] if preview is not None else gr.update()
        yield shown, "", progress_html(generation.state.snapshot(), generation.queue.queue_position(job)), gr.update()
    try:
        processed = job.result()
    except Exception as err:  # shown to the user; the queue keeps working
        yield gr.update(value=None), "", f"<div class='error'>Error: {html.escape(str(err))}</div>", None
        return
    note = " (interrupted)" if processed.interrupted else ""
    first = processed.infotexts[processed.index_of_first_image] if processed.infotexts else ""
    yield (processed.saved_images_for_gallery(), infotext_html(first),
           f"<div class='progress-text'>Done{note}.</div>", processed.js())

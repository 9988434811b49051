"""Control groups and wiring shared by the generation tabs (txt2img, img2img)."""
from __future__ import annotations

import html
import json
from dataclasses import dataclass, fields
from typing import Any, Callable

import gradio as gr


def tab_value(value: int | str, elem_id: str) -> Any:
    """A hidden component that holds which sub-tab is selected. It lives in the browser, so the Generate
    click sends what the page shows (see `select_sets`)."""
    if isinstance(value, str):
        return gr.Textbox(value=value, visible="hidden", elem_id=elem_id)
    return gr.Number(value=value, precision=0, visible="hidden", elem_id=elem_id)


def select_sets(tab: Any, outputs: list[Any], values: list[Any]) -> None:
    """Selecting `tab` sets `outputs` to `values` in the browser, with no server round trip. Gradio fires a
    select for a tab set's first tab when the set mounts; answered by the server, that event and the user's
    own click a moment later complete in either order, and a late answer undid the click (it showed as a
    flaky browser test: the Inpaint tab open with the inpaint controls hidden and the mode left at img2img)."""
    tab.select(None, js="() => " + json.dumps(values), outputs=outputs, queue=False, show_progress="hidden")


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
    extra_networks: Any = None   # the 🎴 button that opens the Extra Networks browser (ui/extra_networks.py)


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
            extra_networks = gr.Button("🎴 Extra networks", elem_id=f"{tabname}_extra_networks", size="sm")
            styles_ui = build_styles_row(tabname, services)
    override_settings = gr.Dropdown([], value=[], multiselect=True, label="Override settings", visible=False,
                                    elem_id=f"{tabname}_override_settings", allow_custom_value=True)
    return Toprow(prompt=prompt, negative_prompt=negative_prompt, token_counter=token_counter,
                  paste_button=paste_button, generate=generate, interrupt=interrupt, skip=skip,
                  styles_ui=styles_ui, override_settings=override_settings, extra_networks=extra_networks)


def script_job(runner, script_args: list[Any]):
    """The `script` for GenerationService.submit when the tab's scripts have something to do, else None."""
    return runner.job_script(script_args) if runner.has_work(script_args) else None


def error_updates(message: str) -> tuple[Any, ...]:
    """(gallery, infotext, progress, generation info) updates that show `message` and keep the gallery."""
    return gr.update(), "", f"<div class='error'>{html.escape(message)}</div>", gr.update()


def ui_caller(services, request: Any):
    """The core.jobs.Caller of a UI event: its Gradio login user, else its address."""
    from modules.core.callers import CallerPolicy

    policy = getattr(services, "callers", None) or CallerPolicy(services.cmd_opts)
    client = getattr(request, "client", None)
    return policy.caller(getattr(request, "username", None), getattr(client, "host", None))


def _my_jobs_ahead(generation, job) -> list:
    """This owner's jobs of the same kind, submitted from the UI, that run before (or with) `job`."""
    queue = generation.queue
    running = queue.running()
    # One owner's jobs keep their own order (round-robin interleaves owners only); paused ones included.
    same = [j for j in ([running] if running is not None else []) + queue.queued(job.owner)
            if j.owner == job.owner and j.name == job.name and j.meta.get("ui_polled")]
    return same[:same.index(job) + 1] if job in same else same


def queue_status_html(generation, job) -> str:
    """Where `job` waits: how many jobs run before it, and when it should be done."""
    ahead = generation.queue.queue_position(job)
    if ahead is None:
        return ""
    service = getattr(generation, "queue_service", None)
    eta = service.eta(job) if service is not None else None
    paused = generation.queue.is_paused(job.owner)
    text = (f"Your queue is paused: resume it in the Queue tab ({ahead} job(s) ahead)" if paused
            else f"Waiting in queue: {ahead} job(s) ahead")
    if eta:
        text += f" · ETA {eta:.0f}s"
    return f"<div class='progress-text queue-busy'>{html.escape(text)}…</div>"


def poll_job(generation, job):
    """Yield (gallery, infotext, progress, generation info) updates while `job` waits and runs (the live
    preview, progress and ETA: only while `job` itself runs), then its images and infotext, or its error.

    Generate may be clicked again while a job runs (the click queues another job): of one owner's UI jobs,
    only the first unfinished one drives the panel, with a count of the others; each shows its result."""
    job.meta["ui_polled"] = True
    while not job.wait(POLL_SECONDS):
        mine = _my_jobs_ahead(generation, job)
        if mine and mine[0] is not job:
            continue   # an earlier job of this owner shows its progress; this one waits its turn
        more = len([j for j in generation.queue.queued(job.owner) if j is not job and j.name == job.name
                    and j.meta.get("ui_polled")])
        more_html = f"<div class='progress-text queue-busy'>+{more} more queued</div>" if more else ""
        if generation.queue.running() is job:
            preview = generation.state.current_image
            shown = [preview] if preview is not None else gr.update()
            body = progress_html(generation.state.snapshot(), 0).replace("class='progress-text'",
                                                                        "class='progress-text queue-busy'", 1)
            yield shown, "", body + more_html, gr.update()
        else:
            yield gr.update(), "", queue_status_html(generation, job) + more_html, gr.update()
    try:
        processed = job.result()
    except Exception as err:  # shown to the user; the queue keeps working
        yield gr.update(value=None), "", f"<div class='error'>Error: {html.escape(str(err))}</div>", None
        return
    note = " (interrupted)" if processed.interrupted else ""
    first = processed.infotexts[processed.index_of_first_image] if processed.infotexts else ""
    warnings = "".join(f"<div class='warning comments'>{html.escape(line)}</div>"
                       for line in (processed.comments or "").splitlines() if line)  # e.g. a missing LoRA
    yield (processed.saved_images_for_gallery(), infotext_html(first),
           f"<div class='progress-text'>Done{note}.</div>{warnings}", processed.js())


# --------------------------------------------------------------------------- control groups both tabs build


def build_sampling_controls(tabname: str) -> dict[str, Any]:
    """Sampler, schedule type and steps, as {control name: component}."""
    from modules.engine import sampler_catalog as samplers

    with gr.Row():
        sampler_name = gr.Dropdown(samplers.sampler_names(), value="DPM++ 2M", label="Sampling method",
                                   elem_id=f"{tabname}_sampling")
        scheduler = gr.Dropdown(samplers.schedule_labels(), value="Automatic", label="Schedule type",
                                elem_id=f"{tabname}_scheduler")
    steps = gr.Slider(1, 150, value=20, step=1, label="Sampling steps", elem_id=f"{tabname}_steps")
    return {"sampler_name": sampler_name, "scheduler": scheduler, "steps": steps}


def build_batch_controls(tabname: str) -> dict[str, Any]:
    """Batch count and size beside the size controls, as {control name: component}."""
    with gr.Column(scale=1, min_width=120):
        batch_count = gr.Slider(1, 100, value=1, step=1, label="Batch count", elem_id=f"{tabname}_batch_count")
        batch_size = gr.Slider(1, 8, value=1, step=1, label="Batch size", elem_id=f"{tabname}_batch_size")
    return {"batch_count": batch_count, "batch_size": batch_size}


@dataclass
class SeedControls:
    """The seed row (seed, 🎲, ♻) and its "Extra" accordion (variation seed, seed resize, tiling)."""
    seed: Any
    random_seed: Any
    reuse_seed: Any
    subseed: Any
    subseed_strength: Any
    seed_resize_from_w: Any
    seed_resize_from_h: Any
    tiling: Any

    def controls(self) -> dict[str, Any]:
        """The components whose values are params, by control name (the buttons are not)."""
        return {name: getattr(self, name) for name in ("seed", "subseed", "subseed_strength", "seed_resize_from_w",
                                                       "seed_resize_from_h", "tiling")}


def build_seed_controls(tabname: str) -> SeedControls:
    with gr.Row(elem_id=f"{tabname}_seed_row"):
        seed = gr.Number(-1, label="Seed", precision=0, elem_id=f"{tabname}_seed")
        random_seed = gr.Button("🎲", elem_id=f"{tabname}_random_seed", size="sm", min_width=40)
        reuse_seed = gr.Button("♻", elem_id=f"{tabname}_reuse_seed", size="sm", min_width=40)
    with gr.Accordion("Extra", open=False, elem_id=f"{tabname}_subseed_show"):
        with gr.Row():
            subseed = gr.Number(-1, label="Variation seed", precision=0, elem_id=f"{tabname}_subseed")
            subseed_strength = gr.Slider(0, 1, value=0, step=0.01, label="Variation strength",
                                         elem_id=f"{tabname}_subseed_strength")
        with gr.Row():
            seed_resize_from_w = gr.Slider(0, 2048, value=0, step=8, label="Resize seed from width",
                                           elem_id=f"{tabname}_seed_resize_from_w")
            seed_resize_from_h = gr.Slider(0, 2048, value=0, step=8, label="Resize seed from height",
                                           elem_id=f"{tabname}_seed_resize_from_h")
        tiling = gr.Checkbox(False, label="Tiling", elem_id=f"{tabname}_tiling")
    return SeedControls(seed=seed, random_seed=random_seed, reuse_seed=reuse_seed, subseed=subseed,
                        subseed_strength=subseed_strength, seed_resize_from_w=seed_resize_from_w,
                        seed_resize_from_h=seed_resize_from_h, tiling=tiling)


@dataclass
class OutputPanel:
    """The result column: progress, gallery, infotext and the (hidden) generation info."""
    progress: Any
    gallery: Any
    infotext: Any
    generation_info: Any
    buttons: Any = None     # what `buttons` built between the gallery and the infotext

    def outputs(self) -> list[Any]:
        """The outputs of a generate handler, in the order poll_job yields them."""
        return [self.gallery, self.infotext, self.progress, self.generation_info]


def build_output_panel(tabname: str, buttons: Callable[[], Any] | None = None) -> OutputPanel:
    progress = gr.HTML("", elem_id=f"{tabname}_progress")
    gallery = gr.Gallery(label="Output", elem_id=f"{tabname}_gallery", format="png", columns=2,
                         object_fit="contain", height="auto", show_label=False)
    built = buttons() if buttons is not None else None
    infotext = gr.HTML("", elem_id=f"{tabname}_infotext")
    generation_info = gr.JSON(visible=False, elem_id=f"{tabname}_generation_info")
    return OutputPanel(progress=progress, gallery=gallery, infotext=infotext, generation_info=generation_info,
                       buttons=built)


def connect_tab_helpers(top: Toprow, seeds: SeedControls, output: OutputPanel, services, *,
                        on_interrupt: Callable[[Any], Any] | None = None) -> None:
    """Interrupt and Skip (of the caller's own running job), the seed buttons, the token counter and the
    styles' apply button. `on_interrupt(caller)` also stops what the tab runs outside the queue."""
    from modules.ui.styles_ui import connect_apply

    generation = services.generation

    def control(request: gr.Request, action: str) -> None:
        caller = ui_caller(services, request)
        if action == "interrupt" and on_interrupt is not None:
            on_interrupt(caller)
        if generation.queue.control(caller, action) == "not yours":
            gr.Warning(f"The running job is another user's: only its owner or an admin may {action} it.")

    def do_interrupt(request: gr.Request) -> None:  # the name is the event's api_name
        control(request, "interrupt")

    def do_skip(request: gr.Request) -> None:
        control(request, "skip")
    top.interrupt.click(do_interrupt, show_progress="hidden")
    top.skip.click(do_skip, show_progress="hidden")
    connect_seed_buttons(seed=seeds.seed, random_seed=seeds.random_seed, reuse_seed=seeds.reuse_seed,
                         generation_info=output.generation_info)
    connect_token_counter(generation, top.prompt, top.token_counter)
    connect_apply(top.styles_ui, services, top.prompt, top.negative_prompt)


def paste_targets(controls: ControlsBase, top: Toprow, script_runner) -> dict[str, Any]:
    """What an infotext paste may set: every control, the styles, the scripts' infotext fields."""
    from modules.ui import paste

    targets = {name: getattr(controls, name) for name in type(controls).names()}
    targets["styles"] = top.styles_ui.dropdown
    targets.update(paste.script_field_targets(script_runner.infotext_fields()))
    return targets

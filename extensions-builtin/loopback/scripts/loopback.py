"""A1111's "Loopback" img2img script: img2img the result again `loops` times, each loop's output
being the next loop's init image, with the denoising strength moving from the tab's value to the
final one along a curve.

script_args (A1111's order): [loops, final_denoising_strength, denoising_curve ("Aggressive", "Linear",
"Lazy"), append_interrogation ("None"; there is no CLIP/DeepBooru interrogator here)].
Each of the n_iter batches runs all loops from the original init image (batch size is forced to 1, as
in A1111). Unlike A1111, which keeps only each batch's last image when n_iter > 1, every loop's image is
returned, after a grid with one row per batch.
"""
import math
from dataclasses import dataclass, field

import gradio as gr

from modules import images, processing, scripts, shared
from modules.processing import ProcessingError

CURVES = ("Aggressive", "Linear", "Lazy")


def denoising_strength_at(loop, loops, initial, final, curve):
    """Strength for loop `loop` (0-based): `initial` at the first, `final` at the last."""
    if loops <= 1:
        return initial
    progress = loop / (loops - 1)
    if curve == "Aggressive":
        shaped = math.sin(progress * math.pi / 2)     # moves fast at first
    elif curve == "Lazy":
        shaped = 1 - math.cos(progress * math.pi / 2)  # moves fast at the end
    else:
        shaped = progress
    return initial + (final - initial) * shaped


class Script(scripts.Script):
    def title(self):
        return "Loopback"

    def show(self, is_img2img):
        return is_img2img

    def ui(self, is_img2img):
        loops = gr.Slider(1, 32, value=4, step=1, label="Loops", elem_id=self.elem_id("loops"))
        final_denoising_strength = gr.Slider(0, 1, value=0.5, step=0.01, label="Final denoising strength",
                                             elem_id=self.elem_id("final_denoising_strength"))
        denoising_curve = gr.Dropdown(list(CURVES), value="Linear", label="Denoising strength curve",
                                      elem_id=self.elem_id("denoising_curve"))
        append_interrogation = gr.Dropdown(["None"], value="None", label="Append interrogated prompt at each iteration",
                                           elem_id=self.elem_id("append_interrogation"))
        return [loops, final_denoising_strength, denoising_curve, append_interrogation]

    def run(self, p, loops=4, final_denoising_strength=0.5, denoising_curve="Linear", append_interrogation="None"):
        loops, final = _checked_args(p, loops, final_denoising_strength, denoising_curve, append_interrogation)
        p.seed = processing.get_fixed_seed(p.seed)
        batch_count = p.n_iter
        p.extra_generation_params.update({"Final denoising strength": final, "Denoising curve": denoising_curve})
        p.batch_size = p.n_iter = 1
        p.do_not_save_grid = True
        initial_strength = p.denoising_strength
        original_init, original_fill = p.init_images, p.inpainting_fill
        state = shared.state
        state.job_count = loops * batch_count

        out = _Loops()
        for _batch in range(batch_count):
            p.init_images = original_init
            p.denoising_strength = initial_strength
            p.inpainting_fill = original_fill
            row = _run_loops(p, loops, initial_strength, final, denoising_curve, state, out)
            if row:
                out.rows.append(row)
            if out.stopped:
                break
        p.init_images, p.inpainting_fill, p.denoising_strength = original_init, original_fill, initial_strength

        grids, grid_infos = _grid(p, out)
        return processing.Processed(
            p, grids + out.images, out.seeds[0] if out.seeds else p.seed, out.infotexts[0] if out.infotexts else "",
            all_prompts=out.prompts, all_negative_prompts=out.negative_prompts, all_seeds=out.seeds,
            index_of_first_image=len(grids), infotexts=grid_infos + out.infotexts)


def _checked_args(p, loops, final_denoising_strength, denoising_curve, append_interrogation):
    """(loops, final strength) as numbers, or a ProcessingError naming the bad argument."""
    loops = int(loops)
    final = float(final_denoising_strength)
    if not 1 <= loops <= 1000:
        raise ProcessingError(f"Loopback: loops must be between 1 and 1000, got {loops}")
    if not 0 <= final <= 1:
        raise ProcessingError(f"Loopback: final denoising strength must be between 0 and 1, got {final}")
    if denoising_curve not in CURVES:
        raise ProcessingError(f"Loopback: denoising curve must be one of {', '.join(CURVES)}, "
                              f"got {denoising_curve!r}")
    if append_interrogation not in (None, "", "None"):
        raise ProcessingError(f"Loopback: interrogation ({append_interrogation}) is not available here; "
                              "use 'None'")
    if not p.init_images:
        raise ProcessingError("Loopback needs an init image")
    return loops, final


@dataclass
class _Loops:
    """Every loop's image and what Processed lists for it; rows: one list of images per batch."""
    rows: list = field(default_factory=list)
    images: list = field(default_factory=list)
    infotexts: list = field(default_factory=list)
    seeds: list = field(default_factory=list)
    prompts: list = field(default_factory=list)
    negative_prompts: list = field(default_factory=list)
    stopped: bool = False


def _run_loops(p, loops, initial, final, curve, state, out):
    """One batch: each loop's output is the next loop's init image. Returns the batch's images."""
    row = []
    for loop in range(loops):
        processed = processing.process_images(p)
        if not processed.images or state.interrupted or getattr(state, "stopping_generation", False):
            out.stopped = True
            break
        image = processed.images[processed.index_of_first_image]
        row.append(image)
        out.images.append(image)
        out.infotexts.append(processed.infotexts[processed.index_of_first_image])
        out.seeds.append(processed.seed)
        out.prompts.append(processed.all_prompts[0])
        out.negative_prompts.append(processed.all_negative_prompts[0])
        p.seed = processed.seed + 1
        p.denoising_strength = denoising_strength_at(loop + 1, loops, initial, final, curve)
        p.init_images = [image]
        p.inpainting_fill = 1  # "original": later loops keep what the masked area became
        if state.skipped:
            break
    return row


def _grid(p, out):
    """(grids, their infotexts): one row per batch, saved and returned as the settings say."""
    if len(out.images) <= 1:
        return [], []
    columns = max(len(r) for r in out.rows)
    cells = [image for r in out.rows for image in r + [None] * (columns - len(r))]
    blank = out.images[0].copy()
    blank.paste((255, 255, 255), (0, 0, blank.width, blank.height))
    grid = images.image_grid([c if c is not None else blank for c in cells], rows=len(out.rows),
                             background=shared.opts.grid_background_color)
    grid.info["parameters"] = out.infotexts[0]
    if shared.opts.grid_save:
        p.save_image(grid, info=out.infotexts[0], grid=True, seed=out.seeds[0], prompt=out.prompts[0])
    if shared.opts.return_grid:
        return [grid], [out.infotexts[0]]
    return [], []

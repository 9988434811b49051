"""A1111's "Prompt matrix" script: "base | part 1 | part 2" renders every combination of the
optional parts added to the base (2^parts images) and a grid labelled with which parts each cell has.

script_args (A1111's order): [put_at_start, different_seeds, prompt_type ("positive"/"negative"),
variations_delimiter ("comma"/"space"), margin_size].
Combination k has part i when bit i of k is set, so the grid's columns and rows line up with
grid_labels.draw_prompt_matrix's labels. Unlike A1111 the base part is stripped too, so
"a | b" gives "a, b" rather than "a , b".
"""
import math

import gradio as gr

from modules import images, processing, scripts, shared


def matrix_prompts(prompt, put_at_start=False, delimiter=", "):
    """(the prompt's parts, one prompt per combination in bit order)."""
    parts = prompt.split("|")
    base = parts[0].strip()
    optional = [part.strip().strip(",").strip() for part in parts[1:]]
    prompts = []
    for combination in range(1 << len(optional)):
        selected = [text for i, text in enumerate(optional) if combination & (1 << i)]
        ordered = selected + [base] if put_at_start else [base] + selected
        prompts.append(delimiter.join(text for text in ordered if text))
    return parts, prompts


class Script(scripts.Script):
    def title(self):
        return "Prompt matrix"

    def ui(self, is_img2img):
        gr.HTML('<p>Separate the parts of the prompt with "|": each combination of the parts after the '
                'first is rendered, and shown in a labelled grid.</p>')
        put_at_start = gr.Checkbox(False, label="Put variable parts at start of prompt",
                                   elem_id=self.elem_id("put_at_start"))
        different_seeds = gr.Checkbox(False, label="Use different seed for each picture",
                                      elem_id=self.elem_id("different_seeds"))
        prompt_type = gr.Radio(["positive", "negative"], value="positive", label="Select prompt",
                               elem_id=self.elem_id("prompt_type"))
        variations_delimiter = gr.Radio(["comma", "space"], value="comma", label="Select joining char",
                                        elem_id=self.elem_id("variations_delimiter"))
        margin_size = gr.Slider(0, 500, value=0, step=2, label="Grid margins (px)",
                                elem_id=self.elem_id("margin_size"))
        return [put_at_start, different_seeds, prompt_type, variations_delimiter, margin_size]

    def run(self, p, put_at_start=False, different_seeds=False, prompt_type="positive",
            variations_delimiter="comma", margin_size=0):
        if prompt_type not in ("positive", "negative"):
            raise processing.ProcessingError(f"Prompt matrix: prompt type must be 'positive' or 'negative', "
                                             f"got {prompt_type!r}")
        delimiter = ", " if variations_delimiter == "comma" else " "
        negative = prompt_type == "negative"
        original = p.negative_prompt if negative else p.prompt
        parts, all_prompts = matrix_prompts(original, bool(put_at_start), delimiter)

        seed = processing.get_fixed_seed(p.seed)
        p.n_iter = math.ceil(len(all_prompts) / p.batch_size)
        p.do_not_save_grid = True  # the labelled grid below replaces processing's plain one
        if negative:
            p.negative_prompt = all_prompts
        else:
            p.prompt = all_prompts
        p.seed = [seed + (i if different_seeds else 0) for i in range(len(all_prompts))]
        p.prompt_for_display = original
        shared.state.job_count = p.n_iter

        processed = processing.process_images(p)

        # A batch size that does not divide the count renders a few extra (repeated) prompts: drop them.
        n = len(all_prompts)
        first = processed.index_of_first_image
        processed.images = processed.images[first:first + n]
        processed.infotexts = processed.infotexts[first:first + n]
        processed.index_of_first_image = 0
        for name in ("all_prompts", "all_negative_prompts", "all_seeds", "all_subseeds"):
            setattr(processed, name, getattr(processed, name)[:n])
        if len(processed.images) < n:  # interrupted: no matrix to label
            return processed

        cell_w, cell_h = processed.images[0].size
        grid = images.image_grid(processed.images, rows=1 << ((len(parts) - 1) // 2),
                                 background=shared.opts.grid_background_color)
        grid = images.draw_prompt_matrix(grid, cell_w, cell_h, parts, int(margin_size or 0))
        info = processed.infotexts[0]
        grid.info["parameters"] = info
        processed.images.insert(0, grid)
        processed.infotexts.insert(0, info)
        processed.index_of_first_image = 1
        if shared.opts.grid_save:
            p.save_image(grid, info=info, grid=True, seed=processed.all_seeds[0], prompt=original)
        return processed

"""A1111's "Prompts from file or textbox" script: one job per non-empty line of the textbox.

A line is a prompt, or (when it starts with "--") A1111's option syntax, with shell quoting:
    --prompt "a cat" --negative_prompt "blurry" --steps 10 --seed 5 --cfg_scale 4 --width 512
Values after --prompt / --negative_prompt / --styles run up to the next "--" option.

script_args (A1111's order): [checkbox_iterate, checkbox_iterate_batch, prompt_position ("start"/"end"),
prompt_txt]. The file upload is not an argument: uploading loads the file into the textbox (as A1111).
Every line is parsed and checked before anything renders, so a typo on line 40 does not cost 39 renders;
unlike A1111 a bad line is an error naming the line and option, not silently used as a prompt.
"""
import copy
import shlex

import gradio as gr

from modules import processing, scripts, shared
from modules.engine import sampler_catalog as samplers
from modules.processing import ProcessingError

TITLE = "Prompts from file or textbox"


def _int(value):
    return int(value)


def _float(value):
    return float(value)


def _str(value):
    return value


def _bool(value):
    lowered = value.strip().lower()
    if lowered not in ("true", "false"):
        raise ValueError(f"expected true or false, got {value!r}")
    return lowered == "true"


def _sampler(value):
    return samplers.resolve_sampler(value).name  # raises with the valid names


# A1111's tags and a few of ours (scheduler, clip_skip). Unmodelled ones become plain attributes of p.
TAGS = {
    "sd_model": _str, "outpath_samples": _str, "outpath_grids": _str, "prompt_for_display": _str,
    "prompt": _str, "negative_prompt": _str, "styles": _str,
    "seed": _int, "subseed": _int, "subseed_strength": _float,
    "seed_resize_from_h": _int, "seed_resize_from_w": _int,
    "sampler_index": _int, "sampler_name": _sampler, "scheduler": _str,
    "batch_size": _int, "n_iter": _int, "steps": _int, "cfg_scale": _float, "width": _int, "height": _int,
    "denoising_strength": _float, "clip_skip": _int,
    "restore_faces": _bool, "tiling": _bool, "do_not_save_samples": _bool, "do_not_save_grid": _bool,
}
# Options whose value is every word up to the next option.
MULTI_WORD = ("prompt", "negative_prompt", "styles")


def parse_line(line):
    """A line -> {option: value}; a line not starting with "--" is the prompt (so a prompt may contain
    "--"). Raises ValueError naming the option."""
    if not line.lstrip().startswith("--"):
        return {"prompt": line}
    try:
        tokens = shlex.split(line)
    except ValueError as err:
        raise ValueError(f"cannot split the line: {err}") from None
    out = {}
    pos = 0
    while pos < len(tokens):
        token = tokens[pos]
        if not token.startswith("--"):
            raise ValueError(f"expected an option starting with --, got {token!r}")
        tag = token[2:]
        convert = TAGS.get(tag)
        if convert is None:
            raise ValueError(f"unknown option --{tag}; known: {', '.join('--' + t for t in TAGS)}")
        pos += 1
        if tag in MULTI_WORD:
            words = []
            while pos < len(tokens) and not tokens[pos].startswith("--"):
                words.append(tokens[pos])
                pos += 1
            out[tag] = words if tag == "styles" else " ".join(words)
            continue
        if pos >= len(tokens) or tokens[pos].startswith("--"):
            raise ValueError(f"--{tag} needs a value")
        try:
            out[tag] = convert(tokens[pos])
        except (ValueError, samplers.SamplerError) as err:
            raise ValueError(f"--{tag}: bad value {tokens[pos]!r} ({err})") from None
        pos += 1
    return out


def _load_file(data):
    """The uploaded file's text for the textbox (gr.File type="binary" gives bytes)."""
    if data is None:
        return gr.update()
    if isinstance(data, (bytes, bytearray)):
        return data.decode("utf-8", errors="replace")
    path = getattr(data, "name", data)
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


class Script(scripts.Script):
    def title(self):
        return TITLE

    def ui(self, is_img2img):
        checkbox_iterate = gr.Checkbox(False, label="Iterate seed every line", elem_id=self.elem_id("checkbox_iterate"))
        checkbox_iterate_batch = gr.Checkbox(False, label="Use same random seed for all lines",
                                             elem_id=self.elem_id("checkbox_iterate_batch"))
        prompt_position = gr.Radio(["start", "end"], value="start", label="Insert prompts at the",
                                   elem_id=self.elem_id("prompt_position"))
        prompt_txt = gr.Textbox("", label="List of prompt inputs", lines=2, elem_id=self.elem_id("prompt_txt"))
        upload = gr.File(label="Upload prompt inputs", type="binary", elem_id=self.elem_id("file"))
        upload.upload(_load_file, inputs=[upload], outputs=[prompt_txt], show_progress="hidden")
        return [checkbox_iterate, checkbox_iterate_batch, prompt_position, prompt_txt]

    def run(self, p, checkbox_iterate=False, checkbox_iterate_batch=False, prompt_position="start", prompt_txt=""):
        if prompt_position not in ("start", "end"):
            raise ProcessingError(f"{TITLE}: prompt position must be 'start' or 'end', got {prompt_position!r}")
        lines = [(n, line.strip()) for n, line in enumerate(str(prompt_txt or "").splitlines(), start=1)
                 if line.strip()]
        if not lines:
            raise ProcessingError(f"{TITLE}: the list of prompts is empty")
        p.do_not_save_grid = True

        # Parse and check every line before the first render.
        jobs = []
        for n, line in lines:
            try:
                args = parse_line(line)
                copy_p = self._apply(copy.copy(p), p, args, prompt_position)
                copy_p.params.validate()
            except ValueError as err:  # ProcessingError and the sampler errors are ValueErrors
                raise ProcessingError(f"{TITLE}: line {n} ({line!r}): {err}") from None
            jobs.append((args, copy_p))

        state = shared.state
        state.job_count = sum(copy_p.n_iter for _, copy_p in jobs)
        if (checkbox_iterate or checkbox_iterate_batch) and p.seed == -1:
            p.seed = processing.get_fixed_seed(-1)  # one random seed shared by (or iterated over) all lines

        images, infotexts = [], []
        all_prompts, all_negative_prompts, all_seeds, all_subseeds = [], [], [], []
        for args, copy_p in jobs:
            if "seed" not in args:
                copy_p.seed = p.seed
            proc = processing.process_images(copy_p)
            first = proc.index_of_first_image
            images += proc.images[first:]
            infotexts += proc.infotexts[first:]
            all_prompts += proc.all_prompts
            all_negative_prompts += proc.all_negative_prompts
            all_seeds += proc.all_seeds
            all_subseeds += proc.all_subseeds
            if checkbox_iterate:
                p.seed = p.seed + p.batch_size * p.n_iter
            if state.interrupted or getattr(state, "stopping_generation", False):
                break
        return processing.Processed(p, images, all_seeds[0] if all_seeds else p.seed, "",
                                    all_prompts=all_prompts, all_negative_prompts=all_negative_prompts,
                                    all_seeds=all_seeds, all_subseeds=all_subseeds, infotexts=infotexts)

    @staticmethod
    def _apply(copy_p, p, args, prompt_position):
        """Set a line's options on its copy of p; the line's prompts go before/after the tab's."""
        for key, value in args.items():
            if key == "sd_model":
                copy_p.override_settings["sd_model_checkpoint"] = _checkpoint_title(value)
            elif key != "styles":
                setattr(copy_p, key, value)
        for key in ("prompt", "negative_prompt"):
            line_text, tab_text = args.get(key), getattr(p, key)
            if line_text and tab_text:
                setattr(copy_p, key, f"{line_text} {tab_text}" if prompt_position == "start"
                        else f"{tab_text} {line_text}")
        if args.get("styles"):
            # The tab's styles are already expanded into p's prompts (before the job); expand the line's
            # on top and record both (unknown names do nothing, as in A1111).
            names = args["styles"]
            db = getattr(shared.services, "styles", None)
            if db is not None:
                copy_p.prompt = db.apply_styles_to_prompt(copy_p.prompt, names)
                copy_p.negative_prompt = db.apply_negative_styles(copy_p.negative_prompt, names)
            copy_p.styles = [*p.styles, *(n for n in names if n not in p.styles)]
        return copy_p


def _checkpoint_title(name):
    services = shared.services
    if services is None:
        return name
    found = services.models.registry.get_closest(str(name))
    if found is None:
        raise ValueError(f"--sd_model: checkpoint {name!r} not found")
    return found.title

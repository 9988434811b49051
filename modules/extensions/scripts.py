"""A1111's Script API: `modules.scripts.Script`, its runner, and the hooks it gets during a job.

An extension's `scripts/*.py` defines subclasses of :class:`Script`. Each is either

* a **dropdown** script (`show()` returns True): picked in the "Script" dropdown (or by
  `script_name` in the API); its `run(p, *args)` replaces the plain generation and returns a
  `Processed`, usually after calling `processing.process_images(p)` one or more times; or
* an **always-visible** script (`show()` returns `AlwaysVisible`): its UI sits in the tab all the
  time (or is passed as `alwayson_scripts` in the API) and its hooks run inside every
  `process_images`: setup -> before_process -> process -> (per batch) before_process_batch ->
  process_batch -> postprocess_batch -> postprocess_batch_list -> postprocess_image (per image)
  -> postprocess.

The values of the components a script's `ui()` returns are its `*args`, in order. All scripts of
a tab share one flat argument list: index 0 is the selected dropdown script (0: none) and each
script owns `args[args_from:args_to]` (A1111's layout, which the API's `script_args` follow).

Gradio is imported only when a tab's UI is built (or the API needs the UI's default values).
An exception in an always-visible script's hook is logged with the script's file and skipped;
one in a dropdown script's `run` fails that job with its message.
"""
from __future__ import annotations

import inspect
import logging
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from modules.extensions import processing_adapter
from modules.core.pipeline import ProcessingError, ProcessingHooks, ProcessingRun

log = logging.getLogger(__name__)

AlwaysVisible = object()


class PostprocessImageArgs:
    def __init__(self, image: Any):
        self.image = image


class PostprocessBatchListArgs:
    """A1111 passes a list of tensors; here `images` is the batch's PIL images (replace or edit the list)."""

    def __init__(self, images: list[Any]):
        self.images = images


class Script:
    name: str | None = None          # title().lower(), set by the runner
    section: str | None = None
    filename: str | None = None
    args_from: int | None = None
    args_to: int | None = None
    alwayson = False
    is_txt2img = False
    is_img2img = False
    tabname: str | None = None
    group: Any = None
    infotext_fields: list[tuple[Any, str]] | None = None  # [(component, infotext label)] for ↙ paste
    paste_field_names: list[str] | None = None
    api_info: Any = None
    controls: list[Any] | None = None
    extension: str | None = None    # the extension folder it came from

    def title(self) -> str:
        raise NotImplementedError(f"{type(self).__name__} must define title()")

    def ui(self, is_img2img: bool) -> list[Any] | None:
        """Build the controls (inside the tab's layout); their values become run()/hook *args."""
        return None

    def show(self, is_img2img: bool) -> Any:
        """False: not in this tab; True: in the Script dropdown; AlwaysVisible: always on."""
        return True

    def run(self, p: Any, *args: Any) -> Any:
        """Dropdown scripts: do the generation (processing.process_images(p)) and return a Processed."""
        return None

    def setup(self, p: Any, *args: Any) -> None:
        """Once per job, when p is made, before anything else."""

    def before_process(self, p: Any, *args: Any) -> None:
        """At the start of every process_images(p): p.prompt and the other fields may still change."""

    def process(self, p: Any, *args: Any) -> None:
        """After p.all_prompts/all_seeds are set, before the first batch: edit those lists here."""

    def before_process_batch(self, p: Any, *args: Any, **kwargs: Any) -> None:
        """kwargs: batch_number, prompts, seeds, subseeds (the batch's lists; edit in place)."""

    def process_batch(self, p: Any, *args: Any, **kwargs: Any) -> None:
        """kwargs: batch_number, prompts, seeds, subseeds; called right before sampling the batch."""

    def postprocess_batch(self, p: Any, *args: Any, **kwargs: Any) -> None:
        """kwargs: batch_number, images (a float tensor [B, 3, H, W] in 0..1; edit in place)."""

    def postprocess_batch_list(self, p: Any, pp: PostprocessBatchListArgs, *args: Any, **kwargs: Any) -> None:
        """pp.images: the batch's PIL images; kwargs: batch_number."""

    def postprocess_image(self, p: Any, pp: PostprocessImageArgs, *args: Any) -> None:
        """pp.image: one PIL image before its infotext is made and it is saved; replace it to change it."""

    def postprocess(self, p: Any, processed: Any, *args: Any) -> None:
        """After the whole run (and the grid); `processed` is what process_images returns."""

    def before_component(self, component: Any, **kwargs: Any) -> None:
        """Not called by this app (A1111 calls it for every component of the page)."""

    def after_component(self, component: Any, **kwargs: Any) -> None:
        """Not called by this app (A1111 calls it for every component of the page)."""

    def describe(self) -> str:
        return ""

    def elem_id(self, item_id: str) -> str:
        """A1111's element ids: script_[txt2img_|img2img_]<title>_<item_id>."""
        need_tabname = self.show(True) == self.show(False)
        tabkind = "img2img" if self.is_img2img else "txt2img"
        tabname = f"{tabkind}_" if need_tabname else ""
        title = re.sub(r"[^a-z_0-9]", "", re.sub(r"\s", "_", self.title().lower()))
        return f"script_{tabname}{title}_{item_id}"


@dataclass
class ScriptClassData:
    script_class: type[Script]
    path: str
    basedir: str
    module: Any
    extension: str | None = None


@dataclass
class ScriptArgInfo:
    """One control of a script as the API's /script-info lists it."""
    label: str | None
    value: Any
    minimum: Any = None
    maximum: Any = None
    step: Any = None
    choices: list[str] | None = None


class ScriptArgsError(ProcessingError):
    """script_name / script_args / alwayson_scripts that do not match the scripts (a 422 in the API)."""


def _overrides(script: Script, method: str) -> bool:
    return getattr(type(script), method) is not getattr(Script, method)


def _component_default(component: Any) -> Any:
    """What the script gets for this control when the API does not send a value: the UI's initial value
    (for index-typed dropdowns and radios, the index of that value)."""
    value = getattr(component, "value", None)
    if callable(value):
        try:
            value = value()
        except Exception:  # noqa: BLE001 - a default we cannot compute is None
            value = None
    if getattr(component, "type", None) == "index":
        labels = [c[0] if isinstance(c, (tuple, list)) else c for c in (getattr(component, "choices", None) or [])]
        if value in labels:
            return labels.index(value)
    return value


def _arg_info(component: Any) -> ScriptArgInfo:
    choices = getattr(component, "choices", None)
    return ScriptArgInfo(
        label=getattr(component, "label", None), value=_component_default(component),
        minimum=getattr(component, "minimum", None), maximum=getattr(component, "maximum", None),
        step=getattr(component, "step", None),
        choices=[str(c[0] if isinstance(c, (tuple, list)) else c) for c in choices] if choices else None)


class ScriptRunner:
    """The scripts of one tab (txt2img or img2img): their UI, their argument slots, and the hooks."""

    def __init__(self, classes: Iterable[ScriptClassData], *, is_img2img: bool):
        self.is_img2img = is_img2img
        self.tabname = "img2img" if is_img2img else "txt2img"
        self.scripts: list[Script] = []
        self.selectable_scripts: list[Script] = []
        self.alwayson_scripts: list[Script] = []
        self.inputs: list[Any] = [None]          # gradio components; [0] is the Script dropdown
        self.defaults: list[Any] = [0]           # the value of each slot when nobody sets it
        self.ui_built = False
        self.dropdown: Any = None
        self._ui_lock = threading.Lock()  # two first API requests must not build the slots twice
        for data in classes:
            self._add(data)

    def _add(self, data: ScriptClassData) -> None:
        try:
            script = data.script_class()
            script.filename = data.path
            script.extension = data.extension
            script.is_img2img = self.is_img2img
            script.is_txt2img = not self.is_img2img
            script.tabname = self.tabname
            visibility = script.show(self.is_img2img)
            if visibility is False or visibility is None:
                return
            script.name = str(script.title()).lower()
        except Exception:
            log.exception("Script %s from %s could not be set up; it is left out", data.script_class.__name__,
                          data.path)
            return
        script.alwayson = visibility is AlwaysVisible
        self.scripts.append(script)
        (self.alwayson_scripts if script.alwayson else self.selectable_scripts).append(script)

    # -- lookup ----------------------------------------------------------------------------------
    @property
    def titles(self) -> list[str]:
        return [s.title() for s in self.selectable_scripts]

    def find(self, name: str) -> Script | None:
        wanted = (name or "").strip().lower()
        return next((s for s in self.scripts if s.name == wanted), None)

    def selected(self, args: list[Any]) -> Script | None:
        index = args[0] if args else 0
        try:
            index = int(index or 0)
        except (TypeError, ValueError):
            index = self._title_index(str(index))
        if not 0 < index <= len(self.selectable_scripts):
            return None
        return self.selectable_scripts[index - 1]

    def _title_index(self, title: str) -> int:
        for i, script in enumerate(self.selectable_scripts, start=1):
            if script.title() == title:
                return i
        return 0

    # -- UI --------------------------------------------------------------------------------------
    def setup_ui(self) -> None:
        """The tab's script area, where this is called: always-visible scripts, then the Script dropdown."""
        import gradio as gr

        with gr.Column(elem_id=f"{self.tabname}_script_container"):
            self.setup_ui_alwayson()
            self.setup_ui_selectable()

    def setup_ui_alwayson(self) -> None:
        """Build the always-visible scripts' controls where this is called (A1111 puts them in the
        left column, each script in its own group; the script usually opens an accordion itself)."""
        import gradio as gr

        self.inputs, self.defaults = [None], [0]  # a second build (another app) starts the slots afresh
        for script in self.alwayson_scripts:
            with gr.Group(elem_id=f"{self.tabname}_script_container_{_id(script)}") as group:
                self._build_controls(script)
            script.group = group

    def setup_ui_selectable(self) -> Any:
        """The "Script" dropdown and, under it, each dropdown script's controls (shown when picked)."""
        import gradio as gr

        dropdown = gr.Dropdown(["None", *self.titles], value="None", type="index", label="Script",
                               elem_id=f"{self.tabname}_script_list")
        self.inputs[0] = dropdown
        self.dropdown = dropdown
        for script in self.selectable_scripts:
            with gr.Group(visible=False, elem_id=f"{self.tabname}_script_{_id(script)}") as group:
                self._build_controls(script)
            script.group = group
        groups = [s.group for s in self.selectable_scripts]

        def show(index: int | None):
            return [gr.update(visible=(i + 1 == (index or 0))) for i in range(len(groups))]
        if groups:
            dropdown.change(show, inputs=dropdown, outputs=groups, show_progress="hidden")
        self.ui_built = True
        return dropdown

    def _build_controls(self, script: Script) -> None:
        script.args_from = len(self.inputs)
        try:
            controls = script.ui(self.is_img2img)
        except Exception:
            log.exception("Script %r (%s) failed to build its UI; it gets no controls", script.title(),
                          script.filename)
            controls = None
        if isinstance(controls, dict):
            controls = list(controls.values())
        controls = [c for c in (controls or []) if c is not None]
        script.controls = controls
        self.inputs.extend(controls)
        self.defaults.extend(_component_default(c) for c in controls)
        script.args_to = len(self.inputs)
        script.api_info = {"name": script.name, "is_alwayson": script.alwayson, "is_img2img": self.is_img2img,
                           "args": [_arg_info(c).__dict__ for c in controls]}

    def ensure_defaults(self) -> None:
        """Without the web UI (--nowebui) the controls were never built: build them once, off-page, to
        learn each script's argument slots and defaults (A1111's API does the same)."""
        if self.ui_built:
            return
        import gradio as gr

        with self._ui_lock:
            if self.ui_built:
                return
            with gr.Blocks():
                self.setup_ui()

    @property
    def script_inputs(self) -> list[Any]:
        """The components to pass to the generate handler, in slot order (the dropdown first)."""
        return list(self.inputs)

    # -- arguments -------------------------------------------------------------------------------
    def args_from_api(self, script_name: str | None, script_args: list[Any] | None,
                      alwayson: dict[str, Any] | None) -> list[Any]:
        """The flat argument list for an API request: defaults, with the named scripts' args over them."""
        self.ensure_defaults()
        args = list(self.defaults)
        if script_name:
            script = self.find(script_name)
            if script is None or script.alwayson:
                raise ScriptArgsError(f"Script '{script_name}' not found")
            args[0] = self.selectable_scripts.index(script) + 1
            self._place(args, script, script_args or [])
        for name, value in (alwayson or {}).items():
            script = self.find(name)
            if script is None:
                raise ScriptArgsError(f"always on script {name} not found")
            if not script.alwayson:
                raise ScriptArgsError(f"Cannot have a selectable script in the always on scripts params: {name}")
            if isinstance(value, dict):
                given = value.get("args") or []
            elif isinstance(value, list):
                given = value
            else:
                raise ScriptArgsError(f"alwayson_scripts[{name!r}] must be {{\"args\": [...]}}")
            self._place(args, script, given)
        return args

    @staticmethod
    def _place(args: list[Any], script: Script, given: list[Any]) -> None:
        width = (script.args_to or 0) - (script.args_from or 0)
        if len(given) > width:
            raise ScriptArgsError(f"{script.title()}: takes {width} argument(s), got {len(given)}")
        for i, value in enumerate(given):
            args[script.args_from + i] = value

    # -- the job ---------------------------------------------------------------------------------
    def has_work(self, args: list[Any]) -> bool:
        return bool(self.alwayson_scripts) or self.selected(args) is not None

    def job_script(self, args: list[Any], *, is_api: bool = False, user: str | None = None):
        """A `script` for GenerationService.submit: wraps the params in A1111's `p`, runs setup, then the
        selected dropdown script (or plain process_images), all inside the one queued job."""
        args = list(args)

        def script(params, run, job):
            p = processing_adapter.wrap(params)
            p.scripts, p.script_args, p.runner = self, args, run
            p.is_api, p.user = is_api, user
            self.setup(p)
            selected = self.selected(args)
            processed = None
            if selected is not None:
                job.state.job_count = -1  # the script sets it, or the first process_images does
                processed = selected.run(p, *args[selected.args_from:selected.args_to])
            if processed is None:
                processed = p.process_images()
            return processed
        return script

    def hooks_for(self, p: Any) -> ProcessingHooks:
        return _ScriptHooks(self, p)

    def _each_alwayson(self, p: Any, method: str, *lead: Any, **kwargs: Any) -> None:
        args = list(getattr(p, "script_args", None) or [])
        for script in self.alwayson_scripts:
            if not _overrides(script, method):
                continue
            try:
                getattr(script, method)(p, *lead, *args[script.args_from:script.args_to], **kwargs)
            except Exception:
                log.exception("Error running %s of script %r (%s)", method, script.title(), script.filename)

    def setup(self, p: Any) -> None:
        self._each_alwayson(p, "setup")

    def before_process(self, p: Any) -> None:
        self._each_alwayson(p, "before_process")

    def process(self, p: Any) -> None:
        self._each_alwayson(p, "process")

    def before_process_batch(self, p: Any, **kwargs: Any) -> None:
        self._each_alwayson(p, "before_process_batch", **kwargs)

    def process_batch(self, p: Any, **kwargs: Any) -> None:
        self._each_alwayson(p, "process_batch", **kwargs)

    def postprocess_batch(self, p: Any, images: Any, **kwargs: Any) -> None:
        self._each_alwayson(p, "postprocess_batch", images=images, **kwargs)

    def postprocess_batch_list(self, p: Any, pp: PostprocessBatchListArgs, **kwargs: Any) -> None:
        self._each_alwayson(p, "postprocess_batch_list", pp, **kwargs)

    def postprocess_image(self, p: Any, pp: PostprocessImageArgs) -> None:
        self._each_alwayson(p, "postprocess_image", pp)

    def postprocess(self, p: Any, processed: Any) -> None:
        self._each_alwayson(p, "postprocess", processed)

    def any_overrides(self, method: str) -> bool:
        return any(_overrides(s, method) for s in self.alwayson_scripts)

    # -- paste -----------------------------------------------------------------------------------
    def infotext_fields(self) -> list[tuple[Any, str]]:
        out: list[tuple[Any, str]] = []
        for script in self.scripts:
            for item in script.infotext_fields or []:
                if isinstance(item, (tuple, list)) and len(item) == 2:
                    out.append((item[0], item[1]))
        return out


def _id(script: Script) -> str:
    return re.sub(r"[^a-z_0-9]", "", re.sub(r"\s", "_", script.title().lower()))


class _ScriptHooks(ProcessingHooks):
    """processing.ProcessingHooks -> the always-visible scripts' methods, with A1111's `p`."""

    def __init__(self, runner: ScriptRunner, p: Any):
        self.runner, self.p = runner, p

    def bind_model(self, model: Any) -> None:
        self.p.__dict__["_job_model"] = model

    def process(self, run: ProcessingRun) -> None:
        self.p.bind_run(run)
        self.runner.process(self.p)

    def before_process_batch(self, run: ProcessingRun, batch_number: int) -> None:
        self.runner.before_process_batch(self.p, batch_number=batch_number, prompts=run.prompts, seeds=run.seeds,
                                         subseeds=run.subseeds)

    def process_batch(self, run: ProcessingRun, batch_number: int) -> None:
        self.runner.process_batch(self.p, batch_number=batch_number, prompts=run.prompts, seeds=run.seeds,
                                  subseeds=run.subseeds)

    def postprocess_batch(self, run: ProcessingRun, images: list[Any], batch_number: int) -> list[Any]:
        if self.runner.any_overrides("postprocess_batch"):
            tensor = _to_tensor(images)
            self.runner.postprocess_batch(self.p, tensor, batch_number=batch_number)
            images = _from_tensor(tensor)
        if self.runner.any_overrides("postprocess_batch_list"):
            pp = PostprocessBatchListArgs(list(images))
            self.runner.postprocess_batch_list(self.p, pp, batch_number=batch_number)
            images = list(pp.images)
        return images

    def postprocess_image(self, run: ProcessingRun, image: Any) -> Any:
        if not self.runner.any_overrides("postprocess_image"):
            return image
        pp = PostprocessImageArgs(image)
        self.runner.postprocess_image(self.p, pp)
        return pp.image

    def postprocess(self, run: ProcessingRun, processed: Any) -> None:
        self.runner.postprocess(self.p, processed)


def _to_tensor(images: list[Any]):
    import numpy as np
    import torch

    arrays = np.stack([np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0 for img in images])
    return torch.from_numpy(arrays).permute(0, 3, 1, 2).contiguous()


def _from_tensor(tensor) -> list[Any]:
    import numpy as np
    from PIL import Image

    arrays = (tensor.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
    return [Image.fromarray(a) for a in arrays]


# -- discovery -------------------------------------------------------------------------------------
class ScriptRegistry:
    """The Script classes of the loaded extensions, and one runner per tab built from them."""

    def __init__(self, classes: Iterable[ScriptClassData] = ()):
        self.classes: list[ScriptClassData] = list(classes)
        self._runners: dict[bool, ScriptRunner] = {}

    @classmethod
    def from_modules(cls, modules: dict[str, Any], extensions: Iterable[Any] = ()) -> "ScriptRegistry":
        """Every Script subclass defined in the given modules (extension scripts/*.py), in load order."""
        exts = [(Path(e.path).resolve(), e.name) for e in extensions]
        classes: list[ScriptClassData] = []
        for name, module in modules.items():
            path = Path(getattr(module, "__file__", "") or "")
            ext_name = next((n for root, n in exts if path.resolve().is_relative_to(root)), None)
            for obj in list(vars(module).values()):
                if (inspect.isclass(obj) and issubclass(obj, Script) and obj is not Script
                        and obj.__module__ == module.__name__):
                    classes.append(ScriptClassData(obj, str(path), str(path.parent.parent), module, ext_name))
        return cls(classes)

    def runner(self, is_img2img: bool) -> ScriptRunner:
        if is_img2img not in self._runners:
            self._runners[is_img2img] = ScriptRunner(self.classes, is_img2img=is_img2img)
        return self._runners[is_img2img]

    @property
    def txt2img(self) -> ScriptRunner:
        return self.runner(False)

    @property
    def img2img(self) -> ScriptRunner:
        return self.runner(True)


__all__ = ["AlwaysVisible", "Script", "ScriptRunner", "ScriptRegistry", "ScriptClassData", "ScriptArgsError",
           "PostprocessImageArgs", "PostprocessBatchListArgs"]

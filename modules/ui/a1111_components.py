"""The gradio components A1111 extensions import from ``modules.ui_components``, for gradio 6.

Each is a thin subclass of a gradio component or layout that the browser renders as that
gradio class (the frontend knows only gradio's own names):

* ``FormRow`` / ``FormColumn`` / ``FormGroup``: gr.Row / gr.Column / gr.Group;
* ``ResizeHandleRow``: gr.Row (no drag handle between the columns here);
* ``ToolButton``: a small gr.Button with the ``tool`` class, for the icon buttons beside a field;
* ``FormHTML`` / ``FormColorPicker``: gr.HTML / gr.ColorPicker that group with neighbouring inputs;
* ``DropdownMulti``: gr.Dropdown with ``multiselect=True``; ``DropdownEditable``: with
  ``allow_custom_value=True``;
* ``InputAccordion``: an accordion whose open state is a boolean input (see its docstring for how
  it differs from A1111's).
"""
from __future__ import annotations

import contextlib
import inspect
import itertools
from typing import Any, Iterator

import gradio as gr
from gradio import component_meta
from gradio.layouts import Form

__all__ = ["FormComponent", "ToolButton", "ResizeHandleRow", "FormRow", "FormColumn", "FormGroup", "FormHTML",
           "FormColorPicker", "DropdownMulti", "DropdownEditable", "InputAccordion"]


@contextlib.contextmanager
def _no_stub_files() -> Iterator[None]:
    """gradio's component metaclass writes a .pyi stub beside the source of every component subclass it
    sees; the app must not write into its install folder, so that is off while these classes are made."""
    real = component_meta.create_or_modify_pyi
    component_meta.create_or_modify_pyi = lambda *args, **kwargs: None
    try:
        yield
    finally:
        component_meta.create_or_modify_pyi = real


def _gradio_class(cls: type) -> type:
    """The gradio component or layout a class extends (the first one of gradio's own in its MRO)."""
    for base in cls.__mro__:
        if base.__module__.startswith(("gradio.components.", "gradio.layouts.")):
            return base
    raise TypeError(f"{cls.__name__} does not extend a gradio component")


class _AsGradio:
    """Mixin: the page config names the gradio class, so the browser has a renderer for it."""

    def get_block_name(self) -> str:
        return _gradio_class(type(self)).__name__.lower()

    def get_block_class(self) -> str:
        return self.get_block_name()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # gradio lists a component's props from the signature of type(self).__init__; an __init__ of
        # ours takes **kwargs, so it shows the gradio class's signature instead.
        if "__init__" in cls.__dict__:
            cls.__init__.__signature__ = inspect.signature(_gradio_class(cls).__init__)


class FormComponent:
    """Mixin (A1111's): the component joins neighbouring inputs in one form box, as gradio's inputs do.
    Put it first: ``class MyField(FormComponent, gr.Dropdown)``."""

    def get_expected_parent(self) -> type | None:
        return None if getattr(self, "container", None) is False else Form


with _no_stub_files():

    class ToolButton(_AsGradio, gr.Button):
        """A small icon button (🔄, 📋...) for the row of a field; has the ``tool`` CSS class."""

        def __init__(self, value: str = "", **kwargs: Any):
            classes = kwargs.pop("elem_classes", None) or []
            kwargs["elem_classes"] = ["tool", *([classes] if isinstance(classes, str) else classes)]
            kwargs.setdefault("size", "sm")
            kwargs.setdefault("scale", 0)
            kwargs.setdefault("min_width", 40)
            super().__init__(value=value, **kwargs)

    class ResizeHandleRow(_AsGradio, gr.Row):
        """A1111 lets the user drag the split between the row's columns; here it is a plain row."""

    class FormRow(_AsGradio, gr.Row):
        """A row of form fields."""

    class FormColumn(_AsGradio, gr.Column):
        """A column of form fields."""

    class FormGroup(_AsGradio, gr.Group):
        """Fields drawn as one box, without gaps."""

    class FormHTML(FormComponent, _AsGradio, gr.HTML):
        """HTML that sits among form fields."""

    class FormColorPicker(FormComponent, _AsGradio, gr.ColorPicker):
        """A colour picker that sits among form fields."""

    class DropdownMulti(_AsGradio, gr.Dropdown):
        """A dropdown where several choices can be picked; its value is a list."""

        def __init__(self, choices: Any = None, value: Any = None, **kwargs: Any):
            kwargs["multiselect"] = True
            super().__init__(choices, value=value, **kwargs)

    class DropdownEditable(_AsGradio, gr.Dropdown):
        """A dropdown that also takes a typed value that is not among its choices."""

        def __init__(self, choices: Any = None, value: Any = None, **kwargs: Any):
            kwargs["allow_custom_value"] = True
            super().__init__(choices, value=value, **kwargs)

    _accordion_ids = itertools.count(1)

    class InputAccordion(_AsGradio, gr.Checkbox):
        """An accordion whose open state is a boolean input: open means True.

        Use it as A1111's::

            with InputAccordion(False, label="My feature") as enabled:
                strength = gr.Slider(...)
            return [enabled, strength]

        The object is a hidden gr.Checkbox holding the state (so it goes in a script's ``ui()`` list, in
        ``infotext_fields`` and in event inputs/outputs like any checkbox); ``with`` enters the accordion
        (``.accordion``). Opening or closing the accordion sets the value, and setting the value (a paste,
        an event output) opens or closes it.

        Unlike A1111's, there is no checkbox in the accordion's title bar: the state is the open state
        alone, so a feature cannot be on while its accordion is folded, and ``extra()`` gives a row at
        the top inside the accordion rather than in its title bar.
        """

        def __init__(self, value: bool = False, **kwargs: Any):
            label = kwargs.pop("label", None) or "Options"
            self.accordion_id = kwargs.pop("elem_id", None) or f"input-accordion-{next(_accordion_ids)}"
            classes = kwargs.pop("elem_classes", None) or []
            visible = kwargs.pop("visible", True)
            for unused in ("open", "interactive", "info", "show_label", "container", "scale", "min_width"):
                kwargs.pop(unused, None)
            super().__init__(value=bool(value), label=label, elem_id=f"{self.accordion_id}-checkbox", visible=False,
                             elem_classes=["input-accordion-checkbox"], **kwargs)
            self.accordion = gr.Accordion(
                label, open=bool(value), elem_id=self.accordion_id, visible=visible,
                elem_classes=["input-accordion", *([classes] if isinstance(classes, str) else classes)])
            # Client-side: the open state becomes the value with no round trip to the server.
            self.accordion.expand(None, js="() => true", outputs=[self], show_progress="hidden")
            self.accordion.collapse(None, js="() => false", outputs=[self], show_progress="hidden")
            accordion = self.accordion
            self.change(lambda checked: gr.Accordion(open=bool(checked)), inputs=[self], outputs=[accordion],
                        show_progress="hidden", queue=False)

        def extra(self) -> Any:
            """A row at the top of the accordion for small controls (A1111 puts them in its title bar)."""
            return gr.Row(elem_id=f"{self.accordion_id}-extra", elem_classes=["input-accordion-extra"])

        def __enter__(self) -> "InputAccordion":
            self.accordion.__enter__()
            return self

        def __exit__(self, *exc: Any) -> None:
            self.accordion.__exit__(*exc)

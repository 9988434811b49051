"""A1111's ``modules.ui_components``: FormRow, ToolButton, InputAccordion..., over modules/ui/a1111_components.py."""
from modules.ui.a1111_components import (  # noqa: F401 - re-exported for extensions
    FormComponent, ToolButton, ResizeHandleRow, FormRow, FormColumn, FormGroup, FormHTML, FormColorPicker,
    DropdownMulti, DropdownEditable, InputAccordion,
)

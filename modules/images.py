"""A1111's ``modules.images``: save_image, image_grid and the grid annotations, over modules/core/saving.py."""
from modules.core.grid_labels import GridAnnotation, draw_grid_annotations, draw_prompt_matrix  # noqa: F401
from modules.core.saving import (  # noqa: F401 - re-exported for extensions
    ImageSaveParams, SavedImage, apply_filename_pattern, image_grid, next_sequence_number, sanitize_filename_part,
    save_image,
)

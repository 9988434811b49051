"""A1111's ``modules.generation_parameters_copypaste`` (the old name of infotext_utils)."""
from modules.infotext_utils import parse_generation_parameters  # noqa: F401

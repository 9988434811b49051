"""The old name of modules.infotext_utils, which A1111 extensions still import."""
from modules.infotext_utils import parse_generation_parameters  # noqa: F401

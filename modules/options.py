"""A1111's ``modules.options``: OptionInfo and Options, over modules/core/options.py."""
from modules.core.options import (  # noqa: F401 - re-exported for extensions
    Section, OptionError, OptionInfo, Options, SAVING, PATHS, SD, SAMPLER, UI, LIVE, EXT, default_templates,
)

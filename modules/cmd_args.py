"""A1111's ``modules.cmd_args``: the flag parser, over modules/core/flags.py."""
from modules.core.flags import (  # noqa: F401 - re-exported for extensions
    DEFAULT_PORT, DEFAULT_API_ONLY_PORT, FlagError, LEGACY_FLAGS, LAUNCHER_FLAGS, build_parser, ParsedArgs,
    known_flags, parse_args, parse_credentials, is_non_local, bind_host, bind_port,
)

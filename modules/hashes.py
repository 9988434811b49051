"""A1111's ``modules.hashes``: file hashes and the hash cache, over modules/models/hashes.py."""
from modules.models.hashes import (  # noqa: F401 - re-exported for extensions
    file_sha256, HashCache,
)

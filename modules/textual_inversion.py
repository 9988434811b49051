"""A1111's ``modules.textual_inversion.textual_inversion``: ``Embedding``.

A1111's is a package; this one file also answers to ``modules.textual_inversion.textual_inversion`` (an
alias in sys.modules), so ``from modules.textual_inversion.textual_inversion import Embedding`` works.
"""
import sys

from modules.extensions.embedding_api import Embedding  # noqa: F401 - re-exported for extensions

textual_inversion = sys.modules[__name__]
sys.modules[__name__ + ".textual_inversion"] = textual_inversion

"""A1111's ``modules.sd_hijack``: ``model_hijack``, for its ``embedding_db`` (textual-inversion embeddings).

Over modules/extensions/embedding_api.py; the live app is found through the bound services.
"""
from modules.extensions import context
from modules.extensions.embedding_api import EmbeddingDatabaseView, ModelHijack  # noqa: F401 - re-exported

model_hijack = ModelHijack(context.services)

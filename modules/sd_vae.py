"""A1111's ``modules.sd_vae``: the VAE choices, over modules/models/vae.py."""
from modules.models.vae import (  # noqa: F401 - re-exported for extensions
    AUTOMATIC, NONE, VAE_EXTENSIONS, VaeInfo, UnknownVaeError, VaeRegistry,
)

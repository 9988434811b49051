"""A1111's ``modules.processing`` `p` classes under this app's older name, over modules/extensions/processing_adapter.py."""
from modules.extensions.processing_adapter import (  # noqa: F401 - re-exported for extensions
    StableDiffusionProcessing, StableDiffusionProcessingImg2Img, StableDiffusionProcessingTxt2Img, wrap,
)

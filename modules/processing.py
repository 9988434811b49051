"""A1111's ``modules.processing``: `p` classes, process_images, Processed, over modules/core/pipeline.py."""
from modules.core.pipeline import (  # noqa: F401 - re-exported for extensions
    IMAGE_UPSCALERS, LATENT_UPSCALE_MODES, MASKED_CONTENT, RESIZE_MODES, GenerationParams, HiresParams,
    Img2ImgParams, Processed, ProcessingError, Txt2ImgParams, create_infotext, fix_seed, get_fixed_seed,
    process_images,
)
from modules.engine.upscaling import image_upscaler_names  # noqa: F401 - built-ins then model files
from modules.extensions.processing_adapter import (  # noqa: F401
    StableDiffusionProcessing, StableDiffusionProcessingImg2Img, StableDiffusionProcessingTxt2Img,
)

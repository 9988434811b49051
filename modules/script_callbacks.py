"""A1111's ``modules.script_callbacks``: the on_* registration functions, over modules/extensions/callbacks.py."""
from modules.extensions.callbacks import (  # noqa: F401 - re-exported for extensions
    KINDS, NEVER_CALLED, CallbackEntry, CFGDenoiserParams, CFGDenoisedParams, CallbackRegistry, set_default,
    default, on_app_started, on_model_loaded, on_ui_tabs, on_ui_settings, on_before_image_saved, on_image_saved,
    on_cfg_denoiser, on_cfg_denoised, on_infotext_pasted, on_before_ui, on_script_unloaded,
    remove_current_script_callbacks, remove_callbacks_for_function, on_before_reload, on_ui_train_tabs,
    on_extra_noise, on_cfg_after_cfg, on_before_component, on_after_component, on_image_grid, on_list_optimizers,
    on_list_unets, on_before_token_counter,
)
from modules.core.saving import ImageSaveParams  # noqa: F401,E402 - A1111 extensions import it from here

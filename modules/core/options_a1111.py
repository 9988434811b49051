"""The rest of A1111 1.10.1's settings keys, so clients see the whole set.

Clients such as Open WebUI GET /sdapi/v1/options from A1111, keep the dict and POST it
back unchanged; the same must work here. So every key A1111 1.10.1 registers (its core
settings and those of its built-in extensions: Lora, hypertile, canvas zoom, the extra
options section, the upscalers) is registered here too, with A1111's default value and
type, and its choices or range where it has fixed ones.

Most of these have no effect in this product: they are stored, returned and round-tripped
(and persisted in config.json once changed), and their settings entry says so
(`OptionInfo.compat_only`). The few this product does read are listed in `HAS_EFFECT`.

Key names, defaults and types are facts of A1111's wire protocol; the labels and this
layout are our own. Keys that modules/core/options.py defines itself are not repeated here
(`DEFINED_IN_CORE` names them); those definitions win.

Pure data: no gradio, no torch.
"""
from __future__ import annotations

import copy
from typing import Any

from modules.core.option_info import LIVE, PATHS, SAMPLER, SAVING, SD, UI, OptionInfo, Section

Row = tuple  # (key, default, label) or (key, default, label, extra OptionInfo keywords)

# Sections this table adds to those of modules/core/options.py (ids as in A1111).
SAVING_DIRS: Section = ("saving-to-dirs", "Saving to a directory")
UPSCALING: Section = ("upscaling", "Upscaling")
FACE_RESTORATION: Section = ("face-restoration", "Face restoration")
SYSTEM: Section = ("system", "System")
PROFILER: Section = ("profiler", "Profiler")
API: Section = ("API", "API")
TRAINING: Section = ("training", "Training")
SDXL: Section = ("sdxl", "Stable Diffusion XL")
SD3: Section = ("sd3", "Stable Diffusion 3")
VAE: Section = ("vae", "VAE")
IMG2IMG: Section = ("img2img", "img2img")
OPTIMIZATIONS: Section = ("optimizations", "Optimizations")
COMPATIBILITY: Section = ("compatibility", "Compatibility")
INTERROGATE: Section = ("interrogate", "Interrogate")
EXTRA_NETWORKS: Section = ("extra_networks", "Extra Networks")
PROMPT_EDITING: Section = ("ui_prompt_editing", "Prompt editing")
GALLERY: Section = ("ui_gallery", "Gallery")
UI_ALTERNATIVES: Section = ("ui_alternatives", "UI alternatives")
INFOTEXT: Section = ("infotext", "Infotext")
POSTPROCESSING: Section = ("postprocessing", "Postprocessing")
CANVAS: Section = ("canvas_hotkey", "Canvas hotkeys")
SETTINGS_IN_UI: Section = ("settings_in_ui", "Settings in UI")
HYPERTILE: Section = ("hypertile", "Hypertile")
HIDDEN: Section = ("hidden", "Hidden options")  # A1111 never shows these; neither do we


def one_of(*choices: Any) -> dict[str, Any]:
    """A fixed list of allowed values (for a list default: allowed items)."""
    return {"choices": choices}


def span(minimum: float, maximum: float, step: float) -> dict[str, Any]:
    """A slider's range; values outside it are refused."""
    return {"minimum": minimum, "maximum": maximum, "step": step}


API_ONLY_LOCAL = {"restrict_api": True}  # A1111 refuses changes to these through the API
NULLABLE_TEXT = {"value_type": str}      # default None (nothing chosen), else a string

# A1111 keys whose definition lives in modules/options.py (with the defaults this product
# uses: the outdir_* defaults are "" there, meaning "our outputs folder", where A1111 writes
# "outputs/<kind>-images"; sd_model_checkpoint is "" rather than None before a model loads).
DEFINED_IN_CORE = frozenset({
    "samples_save", "samples_format", "samples_filename_pattern", "save_images_add_number",
    "grid_save", "grid_format", "return_grid", "n_rows", "grid_prevent_empty_spots",
    "grid_background_color", "enable_pnginfo", "save_txt", "jpeg_quality", "webp_lossless",
    "outdir_samples", "outdir_txt2img_samples", "outdir_img2img_samples", "outdir_extras_samples",
    "outdir_txt2img_grids", "outdir_img2img_grids",
    "sd_model_checkpoint", "sd_checkpoints_limit", "sd_vae", "CLIP_stop_at_last_layers",
    "eta_ancestral", "eta_noise_seed_delta", "randn_source", "quicksettings_list",
    "show_progress_every_n_steps", "live_previews_enable", "disabled_extensions", "disable_all_extensions",
})

# Keys of this table that the product reads (checked with grep over modules/): not marked.
HAS_EFFECT = frozenset({
    "outdir_grids",  # modules/images.py: one folder for all grids when set
    "sd_lora", "sd_hypernetwork",   # modules/core/network_settings.py: the network added to every prompt
    "extra_networks_default_multiplier",          # core/network_settings.py, ui/extra_networks.py (card weight)
    "lora_add_hashes_to_infotext", "lora_in_memory_limit",   # engine/networks/activation.py
    "textual_inversion_add_hashes_to_infotext",   # core/pipeline.py (TI hashes)
    "lora_bundled_ti_to_infotext",   # engine/networks/activation.py (TI hashes of LoRA-bundled embeddings)
})

# Not registered by A1111 1.10.1 itself: read once from old config files (it became
# sd_vae_overrides_per_model_preferences), so upgraded installs still return it.
LEGACY = frozenset({"sd_vae_as_default"})


TABLE: list[tuple[Section, list[Row]]] = [
    (SAVING, [
        ("save_images_replace_action", "Replace", "When the file name is taken", one_of("Replace", "Add number suffix")),
        ("grid_extended_filename", False, "Seed and prompt in grid file names"),
        ("grid_only_if_multiple", True, "Skip grids of a single image"),
        ("grid_zip_filename_pattern", "", "File name pattern for zip archives"),
        ("font", "", "Font for grid labels"),
        ("grid_text_active_color", "#000000", "Grid label colour"),
        ("grid_text_inactive_color", "#999999", "Grid label colour, inactive"),
        ("save_images_before_face_restoration", False, "Keep a copy from before face restoration"),
        ("save_images_before_highres_fix", False, "Keep a copy from before hires fix"),
        ("save_images_before_color_correction", False, "Keep a copy from before img2img colour correction"),
        ("save_mask", False, "Save the inpainting mask"),
        ("save_mask_composite", False, "Save the inpainting mask composite"),
        ("export_for_4chan", True, "Also save large images as JPEG"),
        ("img_downscale_threshold", 4.0, "Size limit for the JPEG copy (MB)"),
        ("target_side_length", 4000, "Side limit for the JPEG copy (pixels)"),
        ("img_max_size_mp", 200, "Largest image size (megapixels)"),
        ("use_original_name_batch", True, "Extras batch: keep the input file names"),
        ("use_upscaler_name_as_suffix", False, "Extras: add the upscaler name to file names"),
        ("save_selected_only", True, "Save button: only the selected image"),
        ("save_write_log_csv", True, "Save button: append to log.csv"),
        ("save_init_img", False, "Save img2img input images"),
        ("temp_dir", "", "Folder for temporary images (empty: default)"),
        ("clean_temp_dir_at_start", False, "Empty the temporary folder at start"),
        ("save_incomplete_images", False, "Save images of interrupted jobs"),
        ("notification_audio", True, "Play a sound when a job ends"),
        ("notification_volume", 100, "Sound volume (%)", span(0, 100, 1)),
    ]),
    (PATHS, [
        ("outdir_grids", "", "Folder for all grids (empty: the two grid folders)"),
        ("outdir_save", "log/images", "Folder for the Save button"),
        ("outdir_init_images", "outputs/init-images", "Folder for img2img input images"),
    ]),
    (SAVING_DIRS, [
        ("save_to_dirs", True, "Images into subfolders"),
        ("grid_save_to_dirs", True, "Grids into subfolders"),
        ("use_save_to_dirs_for_ui", False, "Save button: use subfolders"),
        ("directories_filename_pattern", "[date]", "Subfolder name pattern"),
        ("directories_max_prompt_words", 8, "Words for [prompt_words]", span(1, 20, 1)),
    ]),
    (UPSCALING, [
        ("ESRGAN_tile", 192, "ESRGAN tile size (0: no tiles)", span(0, 512, 16)),
        ("ESRGAN_tile_overlap", 8, "ESRGAN tile overlap", span(0, 48, 1)),
        ("realesrgan_enabled_models", ["R-ESRGAN 4x+", "R-ESRGAN 4x+ Anime6B"], "Real-ESRGAN models offered"),
        ("dat_enabled_models", ["DAT x2", "DAT x3", "DAT x4"], "DAT models offered"),
        ("DAT_tile", 192, "DAT tile size (0: no tiles)", span(0, 512, 16)),
        ("DAT_tile_overlap", 8, "DAT tile overlap", span(0, 48, 1)),
        ("upscaler_for_img2img", None, "img2img upscaler", NULLABLE_TEXT),
        ("set_scale_by_when_changing_upscaler", False, "Take the scale from the upscaler's name"),
        ("SCUNET_tile", 256, "ScuNET tile size (0: no tiles)", span(0, 512, 16)),
        ("SCUNET_tile_overlap", 8, "ScuNET tile overlap", span(0, 64, 1)),
        ("SWIN_tile", 192, "SwinIR tile size", span(16, 512, 16)),
        ("SWIN_tile_overlap", 8, "SwinIR tile overlap", span(0, 48, 1)),
        ("SWIN_torch_compile", False, "Compile SwinIR with torch.compile"),
        ("ldsr_steps", 100, "LDSR steps", span(1, 200, 1)),
        ("ldsr_cached", False, "Keep the LDSR model in memory"),
    ]),
    (FACE_RESTORATION, [
        ("face_restoration", False, "Face restoration on results"),
        ("face_restoration_model", "CodeFormer", "Model for face restoration"),
        ("code_former_weight", 0.5, "CodeFormer weight (0: strongest)", span(0.0, 1.0, 0.01)),
        ("face_restoration_unload", False, "Unload the face model after use"),
    ]),
    (SYSTEM, [
        ("auto_launch_browser", "Local", "Open a browser at start", one_of("Disable", "Local", "Remote")),
        ("enable_console_prompts", False, "Print prompts to the console"),
        ("show_warnings", False, "Show warnings in the console"),
        ("show_gradio_deprecation_warnings", True, "Show Gradio deprecation warnings"),
        ("memmon_poll_rate", 8, "VRAM polls per second (0: off)", span(0, 40, 1)),
        ("samples_log_stdout", False, "Print generation info to stdout"),
        ("multiple_tqdm", True, "Second console progress bar for the whole job"),
        ("enable_upscale_progressbar", True, "Console progress bar for tiled upscaling"),
        ("print_hypernet_extra", False, "Print hypernetwork details"),
        ("list_hidden_files", True, "List models in hidden folders"),
        ("disable_mmap_load_safetensors", False, "Read .safetensors without mmap"),
        ("hide_ldm_prints", True, "Silence ldm/sgm console output"),
        ("dump_stacks_on_signal", False, "Print stack traces on Ctrl+C"),
    ]),
    (PROFILER, [
        ("profiling_enable", False, "Profile generation"),
        ("profiling_activities", ["CPU"], "Profiled activities", one_of("CPU", "CUDA")),
        ("profiling_record_shapes", True, "Record tensor shapes"),
        ("profiling_profile_memory", True, "Record memory use"),
        ("profiling_with_stack", True, "Record Python stacks"),
        ("profiling_filename", "trace.json", "Profile file name"),
    ]),
    (API, [
        ("api_enable_requests", True, "Accept image URLs in API requests", API_ONLY_LOCAL),
        ("api_forbid_local_requests", True, "Refuse URLs of local addresses", API_ONLY_LOCAL),
        ("api_useragent", "", "User agent for those requests", API_ONLY_LOCAL),
    ]),
    (TRAINING, [
        ("unload_models_when_training", False, "Move VAE and CLIP to RAM while training"),
        ("pin_memory", False, "pin_memory for the data loader"),
        ("save_optimizer_state", False, "Save the optimizer state (.optim)"),
        ("save_training_settings_to_txt", True, "Write training settings to a text file"),
        ("dataset_filename_word_regex", "", "Regex for words in file names"),
        ("dataset_filename_join_string", " ", "String joining those words"),
        ("training_image_repeats_per_epoch", 1, "Repeats per image per epoch"),
        ("training_write_csv_every", 500, "Loss CSV every N steps (0: never)"),
        ("training_xattention_optimizations", False, "Cross-attention optimizations in training"),
        ("training_enable_tensorboard", False, "TensorBoard logging"),
        ("training_tensorboard_save_images", False, "Images in TensorBoard"),
        ("training_tensorboard_flush_every", 120, "TensorBoard flush period (seconds)"),
    ]),
    (SD, [
        ("sd_checkpoints_keep_in_cpu", True, "Keep other checkpoints in RAM, not VRAM"),
        ("sd_checkpoint_cache", 0, "Checkpoints cached in RAM (obsolete)", span(0, 10, 1)),
        ("sd_unet", "Automatic", "UNet"),
        ("enable_quantization", False, "Quantize K-sampler results"),
        ("emphasis", "Original", "How (text) and [text] weights apply", one_of("None", "Ignore", "Original", "No norm")),
        ("enable_batch_seeds", True, "K-samplers: same images in a batch as one by one"),
        ("comma_padding_backtrack", 20, "Prompt wrap at commas (tokens)", span(0, 74, 1)),
        ("sdxl_clip_l_skip", False, "Apply clip skip to SDXL's CLIP-L"),
        ("upcast_attn", False, "Upcast cross-attention to float32"),
        ("tiling", False, "Tileable output"),
        ("hires_fix_refiner_pass", "second pass", "Refiner in hires fix",
         one_of("first pass", "second pass", "both passes")),
        ("enable_prompt_comments", True, "# starts a comment in prompts"),
    ]),
    (SDXL, [
        ("sdxl_crop_top", 0, "Crop top"),
        ("sdxl_crop_left", 0, "Crop left"),
        ("sdxl_refiner_low_aesthetic_score", 2.5, "Refiner aesthetic score, negative"),
        ("sdxl_refiner_high_aesthetic_score", 6.0, "Refiner aesthetic score, positive"),
    ]),
    (SD3, [
        ("sd3_enable_t5", False, "Load the T5 text encoder"),
    ]),
    (VAE, [
        ("sd_vae_checkpoint_cache", 0, "VAEs cached in RAM", span(0, 10, 1)),
        ("sd_vae_overrides_per_model_preferences", True, "Chosen VAE beats per-model VAE"),
        ("sd_vae_as_default", True, "Old form of the setting above"),
        ("auto_vae_precision_bfloat16", False, "On NaNs, retry the VAE in bfloat16"),
        ("auto_vae_precision", True, "On NaNs, retry the VAE in float32"),
        ("sd_vae_encode_method", "Full", "VAE for encoding", one_of("Full", "TAESD")),
        ("sd_vae_decode_method", "Full", "VAE for decoding", one_of("Full", "TAESD")),
    ]),
    (IMG2IMG, [
        ("inpainting_mask_weight", 1.0, "Strength of the inpainting conditioning mask", span(0.0, 1.0, 0.01)),
        ("initial_noise_multiplier", 1.0, "img2img noise multiplier", span(0.0, 1.5, 0.001)),
        ("img2img_extra_noise", 0.0, "Extra noise for img2img and hires fix", span(0.0, 1.0, 0.01)),
        ("img2img_color_correction", False, "Match the input's colours"),
        ("img2img_fix_steps", False, "Run all the steps whatever the denoising"),
        ("img2img_background_color", "#ffffff", "Fill for transparent input areas"),
        ("img2img_editor_height", 720, "Image editor height (pixels)", span(80, 1600, 1)),
        ("img2img_sketch_default_brush_color", "#ffffff", "Sketch brush colour"),
        ("img2img_inpaint_mask_brush_color", "#ffffff", "Mask brush colour"),
        ("img2img_inpaint_sketch_default_brush_color", "#ffffff", "Inpaint sketch brush colour"),
        ("return_mask", False, "Show the inpainting mask in results"),
        ("return_mask_composite", False, "Show the mask composite in results"),
        ("img2img_batch_show_results_limit", 32, "Batch results shown (-1: all)", span(-1, 1000, 1)),
        ("overlay_inpaint", True, "Lay the original over unmasked areas"),
    ]),
    (OPTIMIZATIONS, [
        ("cross_attention_optimization", "Automatic", "Cross-attention method"),
        ("s_min_uncond", 0.0, "Minimum sigma for negative guidance", span(0.0, 15.0, 0.01)),
        ("s_min_uncond_all", False, "Minimum sigma for negative guidance: all steps"),
        ("token_merging_ratio", 0.0, "ToMe ratio", span(0.0, 0.9, 0.1)),
        ("token_merging_ratio_img2img", 0.0, "ToMe ratio, img2img", span(0.0, 0.9, 0.1)),
        ("token_merging_ratio_hr", 0.0, "ToMe ratio, hires pass", span(0.0, 0.9, 0.1)),
        ("pad_cond_uncond", False, "Pad prompt and negative prompt to one length"),
        ("pad_cond_uncond_v0", False, "Padding, pre-1.6 method"),
        ("persistent_cond_cache", True, "Reuse conditionings of unchanged prompts"),
        ("batch_cond_uncond", True, "Batch cond and uncond together"),
        ("fp8_storage", "Disable", "FP8 weights", one_of("Disable", "Enable for SDXL", "Enable")),
        ("cache_fp16_weight", False, "Keep FP16 weights for LoRA with FP8"),
    ]),
    (COMPATIBILITY, [
        ("auto_backcompat", True, "Old behaviours from a pasted infotext's version"),
        ("use_old_emphasis_implementation", False, "Old emphasis implementation"),
        ("use_old_karras_scheduler_sigmas", False, "Old Karras sigmas (0.1 to 10)"),
        ("no_dpmpp_sde_batch_determinism", False, "DPM++ SDE not batch-deterministic"),
        ("use_old_hires_fix_width_height", False, "Hires fix: size sliders set the final size"),
        ("hires_fix_use_firstpass_conds", False, "Hires fix: first pass extra networks for conds"),
        ("use_old_scheduling", False, "Old prompt editing timelines"),
        ("use_downcasted_alpha_bar", False, "Downcast alphas_cumprod to fp16"),
        ("refiner_switch_by_sample_steps", False, "Switch to the refiner by step count"),
        ("lora_functional", False, "Old, slower Lora method"),
    ]),
    (INTERROGATE, [
        ("interrogate_keep_models_in_memory", False, "Keep interrogation models in VRAM"),
        ("interrogate_return_ranks", False, "Include tag ranks"),
        ("interrogate_clip_num_beams", 1, "BLIP beams", span(1, 16, 1)),
        ("interrogate_clip_min_length", 24, "BLIP shortest caption", span(1, 128, 1)),
        ("interrogate_clip_max_length", 48, "BLIP longest caption", span(1, 256, 1)),
        ("interrogate_clip_dict_limit", 1500, "CLIP: lines read per file (0: all)"),
        ("interrogate_clip_skip_categories", [], "CLIP: categories skipped"),
        ("interrogate_deepbooru_score_threshold", 0.5, "DeepBooru score threshold", span(0.0, 1.0, 0.01)),
        ("deepbooru_sort_alpha", True, "DeepBooru: sort tags by name"),
        ("deepbooru_use_spaces", True, "DeepBooru: spaces instead of underscores"),
        ("deepbooru_escape", True, "DeepBooru: escape brackets"),
        ("deepbooru_filter_tags", "", "DeepBooru: tags to drop (comma separated)"),
    ]),
    (EXTRA_NETWORKS, [
        ("extra_networks_show_hidden_directories", True, "Show hidden folders"),
        ("extra_networks_dir_button_function", False, "Folder buttons browse instead of filter"),
        ("extra_networks_hidden_models", "When searched", "Cards in hidden folders",
         one_of("Always", "When searched", "Never")),
        ("extra_networks_default_multiplier", 1.0, "Default weight", span(0.0, 2.0, 0.01)),
        ("extra_networks_card_width", 0, "Card width (pixels)"),
        ("extra_networks_card_height", 0, "Card height (pixels)"),
        ("extra_networks_card_text_scale", 1.0, "Text size on cards", span(0.0, 2.0, 0.01)),
        ("extra_networks_card_show_desc", True, "Descriptions on cards"),
        ("extra_networks_card_description_is_html", False, "Descriptions are HTML"),
        ("extra_networks_card_order_field", "Path", "Sort cards by",
         one_of("Path", "Name", "Date Created", "Date Modified")),
        ("extra_networks_card_order", "Ascending", "Card order", one_of("Ascending", "Descending")),
        ("extra_networks_tree_view_style", "Dirs", "Folder view", one_of("Tree", "Dirs")),
        ("extra_networks_tree_view_default_enabled", True, "Folder view shown"),
        ("extra_networks_tree_view_default_width", 180, "Folder view width"),
        ("extra_networks_add_text_separator", " ", "Text put before an added <network>"),
        ("ui_extra_networks_tab_reorder", "", "Order of the network tabs"),
        ("textual_inversion_print_at_load", False, "List embeddings at model load"),
        ("textual_inversion_add_hashes_to_infotext", True, "Embedding hashes in infotext"),
        ("sd_hypernetwork", "None", "Hypernetwork added to prompts"),
        ("sd_lora", "None", "Lora added to prompts"),
        ("lora_preferred_name", "Alias from file", "Name Loras in prompts by", one_of("Alias from file", "Filename")),
        ("lora_add_hashes_to_infotext", True, "Lora hashes in infotext"),
        ("lora_bundled_ti_to_infotext", True, "Bundled embeddings in infotext hashes"),
        ("lora_show_all", False, "Show Loras for other model versions"),
        ("lora_hide_unknown_for_versions", [], "Hide Loras of unknown version for", one_of("SD1", "SD2", "SDXL")),
        ("lora_in_memory_limit", 0, "Loras cached in memory"),
        ("lora_not_found_warning_console", False, "Console warning for a missing Lora"),
        ("lora_not_found_gradio_warning", False, "Page warning for a missing Lora"),
    ]),
    (PROMPT_EDITING, [
        ("keyedit_precision_attention", 0.1, "Ctrl+Up/Down step for (text:1.1)", span(0.01, 0.2, 0.001)),
        ("keyedit_precision_extra", 0.05, "Ctrl+Up/Down step for <network:0.9>", span(0.01, 0.2, 0.001)),
        ("keyedit_delimiters", ".,\\/!?%^*;:{}=`~() ", "Ctrl+Up/Down word delimiters"),
        ("keyedit_delimiters_whitespace", ["Tab", "Carriage Return", "Line Feed"], "Ctrl+Up/Down whitespace stops",
         one_of("Tab", "Carriage Return", "Line Feed")),
        ("keyedit_move", True, "Alt+Left/Right moves prompt parts"),
        ("disable_token_counters", False, "Hide token counters"),
        ("include_styles_into_token_counters", True, "Count the tokens of styles"),
    ]),
    (GALLERY, [
        ("do_not_show_images", False, "Show no images in results"),
        ("js_modal_lightbox", True, "Full-page image viewer"),
        ("js_modal_lightbox_initially_zoomed", True, "Viewer starts zoomed in"),
        ("js_modal_lightbox_gamepad", False, "Viewer gamepad navigation"),
        ("js_modal_lightbox_gamepad_repeat", 250, "Gamepad repeat (ms)"),
        # A1111's default is the int 1 on a 0..1 slider: a float here, so 0.5 is accepted.
        ("sd_webui_modal_lightbox_icon_opacity", 1.0, "Viewer icon opacity", span(0.0, 1.0, 0.01)),
        ("sd_webui_modal_lightbox_toolbar_opacity", 0.9, "Viewer toolbar opacity", span(0.0, 1.0, 0.01)),
        ("gallery_height", "", "Gallery height (CSS)"),
        ("open_dir_button_choice", "Subdirectory", "Folder opened by the folder button",
         one_of("Output Root", "Subdirectory", "Subdirectory (even temp dir)")),
    ]),
    (UI_ALTERNATIVES, [
        ("compact_prompt_box", False, "Prompts inside the Generate tab"),
        ("samplers_in_dropdown", True, "Samplers in a dropdown"),
        ("dimensions_and_batch_together", True, "Size and batch on one row"),
        ("sd_checkpoint_dropdown_use_short", False, "Checkpoint names without folders"),
        ("hires_fix_show_sampler", False, "Hires fix: checkpoint and sampler pickers"),
        ("hires_fix_show_prompts", False, "Hires fix: prompt boxes"),
        ("txt2img_settings_accordion", False, "txt2img settings in an accordion"),
        ("img2img_settings_accordion", False, "img2img settings in an accordion"),
        ("interrupt_after_current", True, "Interrupt after the current image"),
    ]),
    (UI, [
        ("localization", "None", "Interface language"),
        ("ui_tab_order", [], "Tab order"),
        ("hidden_tabs", [], "Hidden tabs"),
        ("ui_reorder_list", [], "Order of txt2img/img2img parts"),
        ("gradio_theme", "Default", "Theme"),
        ("gradio_themes_cache", True, "Cache themes locally"),
        ("show_progress_in_title", True, "Progress in the window title"),
        ("send_seed", True, "Send the seed along to other tabs"),
        ("send_size", True, "Send the size along to other tabs"),
        ("enable_reloading_ui_scripts", False, "Reload UI scripts on Reload UI"),
    ]),
    (INFOTEXT, [
        ("add_model_name_to_info", True, "Model name in infotext"),
        ("add_model_hash_to_info", True, "Model hash in infotext"),
        ("add_vae_name_to_info", True, "VAE name in infotext"),
        ("add_vae_hash_to_info", True, "VAE hash in infotext"),
        ("add_user_name_to_info", False, "User name in infotext"),
        ("add_version_to_infotext", True, "Program version in infotext"),
        ("disable_weights_auto_swap", True, "Ignore the checkpoint of pasted infotext"),
        ("infotext_skip_pasting", [], "Fields ignored when pasting infotext"),
        ("infotext_styles", "Apply if any", "Styles found in pasted prompts",
         one_of("Ignore", "Apply", "Discard", "Apply if any")),
    ]),
    (LIVE, [
        ("show_progressbar", True, "Progress bar"),
        ("live_previews_image_format", "png", "Preview image format", one_of("jpeg", "png", "webp")),
        ("show_progress_grid", True, "Preview a batch as a grid"),
        ("show_progress_type", "Approx NN", "Preview method", one_of("Full", "Approx NN", "Approx cheap", "TAESD")),
        ("live_preview_allow_lowvram_full", False, "Allow Full previews with low VRAM"),
        ("live_preview_content", "Prompt", "Preview of", one_of("Combined", "Prompt", "Negative prompt")),
        ("live_preview_refresh_period", 1000, "Progress refresh period (ms)"),
        ("live_preview_fast_interrupt", False, "Interrupt returns the preview"),
        ("js_live_preview_in_modal_lightbox", False, "Previews in the full-page viewer"),
        ("prevent_screen_sleep_during_generation", True, "Keep the screen awake while generating"),
    ]),
    (SAMPLER, [
        ("hide_samplers", [], "Hidden samplers"),
        ("eta_ddim", 0.0, "DDIM eta", span(0.0, 1.0, 0.01)),
        ("ddim_discretize", "uniform", "DDIM discretization for img2img", one_of("uniform", "quad")),
        ("s_churn", 0.0, "Churn (sigma)", span(0.0, 100.0, 0.01)),
        ("s_tmin", 0.0, "Churn range start (sigma)", span(0.0, 10.0, 0.01)),
        ("s_tmax", 0.0, "Churn range end (sigma; 0: infinity)", span(0.0, 999.0, 0.01)),
        ("s_noise", 1.0, "Extra noise factor (sigma)", span(0.0, 1.1, 0.001)),
        ("sigma_min", 0.0, "Schedule sigma min (0: default)"),
        ("sigma_max", 0.0, "Schedule sigma max (0: default)"),
        ("rho", 0.0, "Schedule rho (0: default)"),
        ("always_discard_next_to_last_sigma", False, "Drop the penultimate sigma"),
        ("sgm_noise_multiplier", False, "Scale initial noise as SGM does"),
        ("uni_pc_variant", "bh1", "UniPC: variant", one_of("bh1", "bh2", "vary_coeff")),
        ("uni_pc_skip_type", "time_uniform", "UniPC: skip type", one_of("time_uniform", "time_quadratic", "logSNR")),
        ("uni_pc_order", 3, "UniPC: order", span(1, 50, 1)),
        ("uni_pc_lower_order_final", True, "UniPC: lower order on last steps"),
        ("sd_noise_schedule", "Default", "Noise schedule", one_of("Default", "Zero Terminal SNR")),
        ("skip_early_cond", 0.0, "Skip the negative prompt early (fraction)", span(0.0, 1.0, 0.01)),
        ("beta_dist_alpha", 0.6, "Beta schedule alpha", span(0.01, 1.0, 0.01)),
        ("beta_dist_beta", 0.6, "Beta schedule beta", span(0.01, 1.0, 0.01)),
    ]),
    (POSTPROCESSING, [
        ("postprocessing_enable_in_main_ui", [], "Postprocessing in txt2img/img2img"),
        ("postprocessing_disable_in_extras", [], "Postprocessing hidden in extras"),
        ("postprocessing_operation_order", [], "Postprocessing order"),
        ("upscaling_max_images_in_cache", 5, "Upscaled images cached", span(0, 10, 1)),
        ("postprocessing_existing_caption_action", "Ignore", "Existing captions",
         one_of("Ignore", "Keep", "Prepend", "Append")),
    ]),
    (CANVAS, [
        ("canvas_hotkey_zoom", "Alt", "Zoom key", one_of("Shift", "Ctrl", "Alt")),
        ("canvas_hotkey_adjust", "Ctrl", "Brush size key", one_of("Shift", "Ctrl", "Alt")),
        ("canvas_hotkey_shrink_brush", "Q", "Smaller brush"),
        ("canvas_hotkey_grow_brush", "W", "Larger brush"),
        ("canvas_hotkey_move", "F", "Move the canvas"),
        ("canvas_hotkey_fullscreen", "S", "Fit to screen"),
        ("canvas_hotkey_reset", "R", "Reset zoom"),
        ("canvas_hotkey_overlap", "O", "Overlap toggle"),
        ("canvas_show_tooltip", True, "Canvas tooltip"),
        ("canvas_auto_expand", True, "Expand images that do not fit"),
        ("canvas_blur_prompt", False, "Leave the prompt when on the canvas"),
        ("canvas_disabled_functions", ["Overlap"], "Turned-off canvas functions",
         one_of("Zoom", "Adjust brush size", "Hotkey enlarge brush", "Hotkey shrink brush", "Moving canvas",
                "Fullscreen", "Reset Zoom", "Overlap")),
    ]),
    (SETTINGS_IN_UI, [
        ("extra_options_txt2img", [], "Settings shown in txt2img"),
        ("extra_options_img2img", [], "Settings shown in img2img"),
        ("extra_options_cols", 1, "Columns for those settings", span(1, 20, 1)),
        ("extra_options_accordion", False, "Those settings in an accordion"),
    ]),
    (HYPERTILE, [
        ("hypertile_enable_unet", False, "Hypertile for the U-Net"),
        ("hypertile_enable_unet_secondpass", False, "Hypertile for the hires pass"),
        ("hypertile_max_depth_unet", 3, "U-Net max depth", span(0, 3, 1)),
        ("hypertile_max_tile_unet", 256, "U-Net max tile", span(0, 512, 16)),
        ("hypertile_swap_size_unet", 3, "U-Net swap size", span(0, 64, 1)),
        ("hypertile_enable_vae", False, "Hypertile for the VAE"),
        ("hypertile_max_depth_vae", 3, "VAE max depth", span(0, 3, 1)),
        ("hypertile_max_tile_vae", 128, "VAE max tile", span(0, 512, 16)),
        ("hypertile_swap_size_vae", 3, "VAE swap size", span(0, 64, 1)),
    ]),
    (HIDDEN, [
        ("restore_config_state_file", "", "Config state to restore"),
        ("sd_checkpoint_hash", "", "SHA256 of the loaded checkpoint"),
    ]),
]


def a1111_templates() -> list[tuple[str, OptionInfo]]:
    """(key, OptionInfo) for every key of the table, new objects on each call."""
    out: list[tuple[str, OptionInfo]] = []
    for section, rows in TABLE:
        for key, default, label, *rest in rows:
            extra = dict(rest[0]) if rest else {}
            out.append((key, OptionInfo(copy.deepcopy(default), label, section=section,
                                        compat_only=key not in HAS_EFFECT, hidden=section == HIDDEN, **extra)))
    return out


def a1111_keys() -> frozenset[str]:
    """Every key A1111 1.10.1 returns from GET /sdapi/v1/options (plus LEGACY)."""
    return DEFINED_IN_CORE | {key for _, rows in TABLE for key, *_ in rows}

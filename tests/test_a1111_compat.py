"""A1111 module names extensions import that are thin views over our own modules."""
from modules import generation_parameters_copypaste, infotext_utils, sd_samplers
from modules.engine import sampler_catalog as samplers


def test_sd_samplers_lists_our_samplers_under_a1111_names():
    assert [s.name for s in sd_samplers.all_samplers] == samplers.sampler_names()
    assert sd_samplers.find_sampler_config("k_euler_a").name == "Euler a"
    assert sd_samplers.find_sampler_config("no such sampler") is None
    assert sd_samplers.visible_sampler_names() == samplers.sampler_names()


def test_parse_generation_parameters_is_the_infotext_parser():
    text = "a cat\nNegative prompt: a dog\nSteps: 5, Sampler: Euler a, Size: 64x32, Seed: 3"
    parsed = infotext_utils.parse_generation_parameters(text, skip_fields=["Seed"])
    assert parsed["Prompt"] == "a cat" and parsed["Negative prompt"] == "a dog"
    assert (parsed["Steps"], parsed["Size-1"], parsed["Size-2"]) == ("5", "64", "32")
    assert "Seed" not in parsed
    assert generation_parameters_copypaste.parse_generation_parameters is infotext_utils.parse_generation_parameters


def test_shared_bind_sets_a1111_path_strings(tmp_path):
    from types import SimpleNamespace

    from modules import paths, shared
    from modules.extensions import context
    from modules.core.flags import parse_args

    app_paths = paths.AppPaths.from_opts(parse_args(["--data-dir", str(tmp_path)], env={}).opts)
    options = object()
    fake = SimpleNamespace(options=options, generation=SimpleNamespace(state=object(), current_options=lambda: options),
                           cmd_opts=object(), paths=app_paths)
    saved = context.services()
    try:
        shared.bind(fake)
        assert paths.models_path == str(app_paths.models_dir) and paths.data_path == str(tmp_path)
    finally:
        shared.bind(saved)


def test_launch_module_for_install_py(tmp_path):
    import sys

    import launch

    assert launch.is_installed("pytest") and not launch.is_installed("surely-not-installed-pkg")
    assert launch.python == sys.executable
    assert launch.run([sys.executable, "-c", "print('hi')"], live=False).strip() == "hi"
    import pytest

    with pytest.raises(RuntimeError, match="exit 3|Error code: 3"):
        launch.run([sys.executable, "-c", "raise SystemExit(3)"], live=False)


def test_scripts_basedir_is_the_extension_being_imported(tmp_path):
    from modules.extensions import loader as extensions, callbacks as script_callbacks

    ext = tmp_path / "extensions" / "my-ext"
    (ext / "scripts").mkdir(parents=True)
    (ext / "scripts" / "s.py").write_text("from modules import scripts\nBASE = scripts.basedir()\n")
    found = extensions.discover(tmp_path / "extensions", tmp_path / "none")
    loaded = extensions.load_scripts(found, script_callbacks.CallbackRegistry())
    (module,) = loaded.values()
    assert module.BASE == str(ext.resolve())


def test_callbacks_this_app_never_calls_are_accepted(caplog):
    from modules.extensions import callbacks as script_callbacks

    caplog.set_level("INFO", logger="modules.extensions.callbacks")
    registry = script_callbacks.CallbackRegistry()
    saved = script_callbacks.default()
    script_callbacks.set_default(registry)
    try:
        for kind in script_callbacks.NEVER_CALLED:
            getattr(script_callbacks, f"on_{kind}")(lambda *a: None)
        assert all(len(registry.callbacks[k]) == 1 for k in script_callbacks.NEVER_CALLED)
        assert "never calls it" in caplog.text
    finally:
        script_callbacks.set_default(saved)

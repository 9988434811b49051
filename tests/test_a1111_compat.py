"""A1111 module names extensions import that are thin views over our own modules."""
from modules import generation_parameters_copypaste, infotext_utils, sd_samplers, samplers


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
    from modules.cmd_args import parse_args

    app_paths = paths.AppPaths.from_opts(parse_args(["--data-dir", str(tmp_path)], env={}).opts)
    fake = SimpleNamespace(options=object(), generation=SimpleNamespace(state=object()), cmd_opts=object(),
                           paths=app_paths)
    saved = (shared.opts, shared.state, shared.cmd_opts, shared._services)
    try:
        shared.bind(fake)
        assert paths.models_path == str(app_paths.models_dir) and paths.data_path == str(tmp_path)
    finally:
        shared.opts, shared.state, shared.cmd_opts, shared._services = saved

import argparse

import pytest

from modules.core import flags as cmd_args
from modules.core.flags import FlagError, parse_args


def parse(*argv, env=None):
    return parse_args(list(argv), env=env or {})


def test_defaults_bind_localhost_on_7860():
    opts = parse().opts
    assert cmd_args.bind_host(opts) == "127.0.0.1"
    assert cmd_args.bind_port(opts) == 7860
    assert not opts.api and not opts.no_half


def test_listen_binds_all_interfaces_and_server_name_overrides():
    assert cmd_args.bind_host(parse("--listen").opts) == "0.0.0.0"
    assert cmd_args.bind_host(parse("--listen", "--server-name", "192.168.1.5").opts) == "192.168.1.5"


def test_nowebui_implies_api_and_uses_7861():
    opts = parse("--nowebui").opts
    assert opts.api is True
    assert cmd_args.bind_port(opts) == 7861
    assert cmd_args.bind_port(parse("--nowebui", "--port", "9000").opts) == 9000


def test_commandline_args_are_appended_after_argv():
    opts = parse("--port", "7000", env={"COMMANDLINE_ARGS": "--listen --port 7001 --ckpt-dir '/a b/models'"}).opts
    assert opts.listen is True
    assert opts.port == 7001  # later wins, as with A1111's sys.argv += COMMANDLINE_ARGS
    assert opts.ckpt_dir == "/a b/models"


def test_a1111_flags_parse_with_their_values():
    opts = parse("--api", "--api-auth", "u:p", "--gradio-auth", "a:b,c:d:e", "--no-half", "--no-half-vae",
                 "--precision", "full", "--medvram", "--use-cpu", "all", "--device-id", "1", "--no-hashing",
                 "--enable-insecure-extension-access", "--disable-all-extensions", "--theme", "dark",
                 "--data-dir", "/tmp/x", "--styles-file", "a.csv", "--styles-file", "b.csv").opts
    assert opts.use_cpu == ["all"] and opts.device_id == "1" and opts.precision == "full"
    assert opts.styles_file == ["a.csv", "b.csv"]
    assert cmd_args.parse_credentials(opts.gradio_auth) == [("a", "b"), ("c", "d:e")]


def test_legacy_flags_are_accepted_with_one_notice_each():
    parsed = parse("--xformers", "--ngrok", "TOKEN", "--listen", "--skip-torch-cuda-test")
    assert parsed.opts.listen is True
    assert len(parsed.notices) == 3
    assert all(n.startswith("Note: --") and "\n" not in n for n in parsed.notices)
    assert any("--xformers" in n for n in parsed.notices)


def test_unknown_flag_names_the_closest_known_flag():
    with pytest.raises(FlagError, match=r"unknown flag --lisen; did you mean --listen\?"):
        parse("--lisen")
    with pytest.raises(FlagError, match="--no-half"):
        parse("--no-hlaf")
    with pytest.raises(FlagError, match="--help"):
        parse("--completely-unrelated-thing")


def test_abbreviations_are_not_silently_accepted():
    with pytest.raises(FlagError, match="--listen"):
        parse("--list")


@pytest.mark.parametrize("argv, message", [
    (["--port", "70000"], "between 1 and 65535"),
    (["--port", "abc"], "invalid int value"),
    (["--gradio-auth", "nopassword"], "user:password"),
    (["--tls-keyfile", "k.pem"], "together"),
    (["--precision", "quarter"], "invalid choice"),
])
def test_bad_values_give_one_line_errors(argv, message):
    with pytest.raises(FlagError, match=message) as info:
        parse(*argv)
    assert "\n" not in str(info.value)


def test_preload_can_add_flags_before_parsing():
    def preload(parser: argparse.ArgumentParser):
        parser.add_argument("--my-extension-flag", default="x")

    assert parse_args(["--my-extension-flag", "y"], env={}, preloaders=[preload]).opts.my_extension_flag == "y"


def test_non_local_rule_for_extension_installs():
    assert not cmd_args.is_non_local(parse().opts)
    for flag in (["--listen"], ["--share"], ["--server-name", "box"]):
        assert cmd_args.is_non_local(parse(*flag).opts)

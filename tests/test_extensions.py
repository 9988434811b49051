"""Extensions: discovery, order, install.py, preload.py, scripts, callbacks, page assets."""
from __future__ import annotations

import logging
import textwrap
from pathlib import Path

import pytest
import requests

from conftest import start_server
from modules.extensions import loader as extensions, callbacks as script_callbacks


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text), encoding="utf-8")


# -- unit tests ----------------------------------------------------------------------------
def make_ext(root: Path, name: str, metadata: str = "") -> None:
    (root / name).mkdir(parents=True)
    if metadata:
        write(root / name / "metadata.ini", metadata)


def test_metadata_orders_extensions_and_breaks_cycles(tmp_path, caplog):
    user, builtin = tmp_path / "extensions", tmp_path / "builtin"
    make_ext(builtin, "core-ext")
    make_ext(user, "a-first", "[Extension]\nAfter = c-lib\n")
    make_ext(user, "b-second", "[Extension]\nRequires = a-first, missing-one\nBefore = core-ext\n")
    make_ext(user, "c-lib")
    make_ext(user, "x-cycle", "[Extension]\nAfter = y-cycle\n")
    make_ext(user, "y-cycle", "[Extension]\nAfter = x-cycle\n")
    with caplog.at_level(logging.WARNING):
        found = extensions.discover(user, builtin)
    names = [e.name for e in found]
    assert names.index("c-lib") < names.index("a-first") < names.index("b-second") < names.index("core-ext")
    assert {"x-cycle", "y-cycle"} <= set(names) and len(names) == 6
    assert "cycle" in caplog.text and "missing-one" in caplog.text


def test_disable_modes_and_disabled_list(tmp_path):
    user, builtin = tmp_path / "extensions", tmp_path / "builtin"
    make_ext(builtin, "ours")
    make_ext(user, "theirs")
    make_ext(user, "off")
    status = lambda found: {e.name: e.status for e in found}  # noqa: E731
    assert status(extensions.discover(user, builtin, disabled={"off"})) == {"ours": "ok", "theirs": "ok", "off": "disabled"}
    assert status(extensions.discover(user, builtin, mode="extra")) == {"ours": "ok", "theirs": "disabled", "off": "disabled"}
    assert set(status(extensions.discover(user, builtin, mode="all")).values()) == {"disabled"}


def test_a_failing_preload_or_install_fails_only_its_extension(tmp_path, caplog):
    from modules.core import flags as cmd_args

    user = tmp_path / "extensions"
    write(user / "bad-preload" / "preload.py", "def preload(parser):\n    raise ValueError('no-flags-9913')\n")
    write(user / "good-preload" / "preload.py", "def preload(parser):\n    parser.add_argument('--good-flag')\n")
    write(user / "bad-install" / "install.py", "import sys\nprint('install-broke-4410')\nsys.exit(3)\n")
    found = extensions.discover(user, tmp_path / "none")
    with caplog.at_level(logging.ERROR):
        extensions.run_installers(found, tmp_path)
        opts = cmd_args.parse_args(["--good-flag", "1"], env={}, preloaders=extensions.preloaders(found)).opts
    assert opts.good_flag == "1"
    status = {e.name: e.status for e in found}
    assert status["good-preload"] == "ok"
    assert status["bad-preload"].startswith("failed") and "no-flags-9913" in status["bad-preload"]
    assert status["bad-install"] == "failed: install.py exited with 3"
    assert "install-broke-4410" in caplog.text and "bad-preload" in caplog.text


def test_a_failing_callback_is_logged_with_its_file_and_skipped(caplog):
    registry = script_callbacks.CallbackRegistry()
    seen = []
    registry.current_script = "/ext/scripts/bad.py"
    registry.add("model_loaded", lambda m: 1 / 0)
    registry.current_script = "/ext/scripts/good.py"
    registry.add("model_loaded", seen.append)
    registry.current_script = None
    with caplog.at_level(logging.ERROR):
        registry.model_loaded("m")
    assert seen == ["m"] and "/ext/scripts/bad.py" in caplog.text and "ZeroDivisionError" in caplog.text
    registry.remove_script("/ext/scripts/good.py")
    assert [e.script for e in registry.callbacks["model_loaded"]] == ["/ext/scripts/bad.py"]


def test_module_functions_reach_the_default_registry_and_record_the_caller():
    registry = script_callbacks.set_default(script_callbacks.CallbackRegistry())

    def cb():
        return [("blocks", "My tab", "my_tab"), "not a tab"]

    script_callbacks.on_ui_tabs(cb)
    assert registry.callbacks["ui_tabs"][0].script == __file__
    assert registry.ui_tabs() == [("blocks", "My tab", "my_tab")]
    script_callbacks.remove_callbacks_for_function(cb)
    assert registry.callbacks["ui_tabs"] == []
    script_callbacks.on_before_ui(cb)
    script_callbacks.remove_current_script_callbacks()
    assert registry.callbacks["before_ui"] == []


def test_installs_are_refused_on_a_network_bind_unless_allowed(tmp_path):
    from modules.core import flags as cmd_args

    listen = cmd_args.parse_args(["--listen"], env={}).opts
    with pytest.raises(extensions.ExtensionAccessError, match="--enable-insecure-extension-access"):
        extensions.install_from_url(listen, tmp_path, "https://example.invalid/x.git")
    assert not any(tmp_path.iterdir())
    extensions.check_install_access(cmd_args.parse_args(["--listen", "--enable-insecure-extension-access"], env={}).opts)
    extensions.check_install_access(cmd_args.parse_args([], env={}).opts)


def test_install_from_a_git_url_and_apply_enabled(tmp_path):
    import subprocess

    from modules.core import flags as cmd_args
    from modules.core.options import Options, default_templates

    repo = tmp_path / "src" / "sd-webui-demo"
    write(repo / "scripts" / "demo.py", "X = 1\n")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(repo)]
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    subprocess.run(git + ["add", "."], check=True)
    subprocess.run(git + ["commit", "-qm", "init"], check=True)
    opts = cmd_args.parse_args([], env={}).opts
    target = extensions.install_from_url(opts, tmp_path / "extensions", str(repo))
    assert target == tmp_path / "extensions" / "sd-webui-demo" and (target / "scripts" / "demo.py").is_file()
    with pytest.raises(ValueError, match="already exists"):
        extensions.install_from_url(opts, tmp_path / "extensions", str(repo))
    with pytest.raises(ValueError, match="folder name"):
        extensions.install_from_url(opts, tmp_path / "extensions", str(repo), "../evil")
    ext = extensions.discover(tmp_path / "extensions", tmp_path / "none")[0]
    assert "up to date" in extensions.update(opts, ext).lower()
    with pytest.raises(extensions.ExtensionAccessError):
        extensions.update(cmd_args.parse_args(["--share"], env={}).opts, ext)

    options = Options(tmp_path / "config.json", default_templates())
    assert extensions.apply_enabled(options, ["a", "b", "c"], ["b"], "extra") == ["a", "c"]
    assert extensions.read_disable_settings(tmp_path / "config.json") == ({"a", "c"}, "extra")


# -- a real server with example extensions ---------------------------------------------
GOOD_SCRIPT = """
from fastapi import FastAPI
from modules import script_callbacks, shared
from modules.shared import OptionInfo


def started(demo, app: FastAPI):
    @app.get("/my-ext/hello")
    def hello():
        return {"hello": "world", "flag": shared.cmd_opts.my_flag, "setting": shared.opts.my_ext_setting,
                "busy": shared.state.job_count, "model": shared.sd_model is None}


def settings():
    shared.opts.add_option("my_ext_setting", OptionInfo("abc", "My extension's setting", section=("my_ext", "My ext")))


def tabs():
    import gradio as gr

    with gr.Blocks() as block:
        gr.Markdown("tabBody4471")
    return [(block, "MyExtTab", "my_ext_tab")]


script_callbacks.on_app_started(started)
script_callbacks.on_ui_settings(settings)
script_callbacks.on_ui_tabs(tabs)
"""


def make_extensions(data: Path) -> None:
    ext = data / "extensions"
    write(ext / "good-ext" / "scripts" / "x.py", GOOD_SCRIPT)
    write(ext / "good-ext" / "preload.py", """
        def preload(parser):
            parser.add_argument("--my-flag", default=None)
    """)
    write(ext / "good-ext" / "install.py", """
        import pathlib, modules  # the app root is importable
        with open(pathlib.Path(__file__).parent / "installed.txt", "a") as f:
            f.write("ran\\n")
    """)
    write(ext / "good-ext" / "javascript" / "x.js", "window.myExtMarker = 'jsMarker8142';\n")
    write(ext / "good-ext" / "style.css", ".cssMarker5531 { color: red; }\n")
    write(ext / "broken-ext" / "scripts" / "boom.py", "raise RuntimeError('kaboom-7731')\n")
    write(ext / "off-ext" / "scripts" / "x.py", """
        import pathlib
        (pathlib.Path(__file__).parent.parent / "loaded.txt").write_text("loaded")
    """)
    write(ext / "off-ext" / "install.py", """
        import pathlib
        (pathlib.Path(__file__).parent / "installed.txt").write_text("ran")
    """)
    (data / "config.json").write_text('{"disabled_extensions": ["off-ext"]}', encoding="utf-8")


@pytest.fixture(scope="module")
def ext_data(tmp_path_factory):
    data = tmp_path_factory.mktemp("extdata")
    make_extensions(data)
    return data


def page_text(url: str, login: tuple[str, str] | None = None) -> str:
    """The page HTML plus Gradio's config (where head and css travel), after the UI's login if given."""
    session = requests.Session()
    if login:
        form = {"username": login[0], "password": login[1]}
        assert session.post(url + "/login", data=form, timeout=30).status_code == 200
    text = session.get(url + "/", timeout=30).text
    return text + session.get(url + "/config", timeout=30).text


@pytest.fixture(scope="module")
def ext_server(ext_data):
    srv = start_server(ext_data, "--api", "--api-auth", "u:p", "--my-flag", "x")
    yield srv
    srv.stop()


def test_extensions_load_into_a_running_server(ext_server):
    srv, ext_data = ext_server, ext_server.data_dir
    assert requests.get(srv.url + "/my-ext/hello", timeout=10).status_code == 401
    r = requests.get(srv.url + "/my-ext/hello", auth=("u", "p"), timeout=10)
    assert r.status_code == 200, r.text
    assert r.json() == {"hello": "world", "flag": "x", "setting": "abc", "busy": 0, "model": True}
    options = requests.get(srv.url + "/sdapi/v1/options", auth=("u", "p"), timeout=10).json()
    assert options["my_ext_setting"] == "abc"
    assert (ext_data / "extensions" / "good-ext" / "installed.txt").read_text() == "ran\n"
    page = page_text(srv.url, login=("u", "p"))  # --api-auth alone is also the UI's login
    assert "jsMarker8142" in page and "cssMarker5531" in page
    assert "MyExtTab" in page and "tabBody4471" in page and "tab_extensions" in page
    assert "broken-ext" in srv.output and "kaboom-7731" in srv.output
    assert not (ext_data / "extensions" / "off-ext" / "loaded.txt").exists()
    assert not (ext_data / "extensions" / "off-ext" / "installed.txt").exists()


@pytest.mark.browser
def test_extension_javascript_runs_and_its_tab_shows_in_the_browser(ext_server, page):
    page.goto(ext_server.url + "/")
    page.locator("input[type=password]").wait_for(timeout=60000)  # --api-auth alone: the UI's login too
    page.locator("input[type=text]").fill("u")
    page.locator("input[type=password]").fill("p")
    page.get_by_role("button", name="Login").click()
    page.get_by_role("tab", name="MyExtTab").wait_for(timeout=60000)
    page.wait_for_function("window.myExtMarker === 'jsMarker8142'", timeout=60000)
    page.get_by_role("tab", name="Extensions").click(timeout=60000)
    page.get_by_text("kaboom-7731", exact=False).first.wait_for(state="attached", timeout=60000)


def test_skip_install_and_disable_all(ext_data):
    marker = ext_data / "extensions" / "good-ext" / "installed.txt"
    before = marker.read_text() if marker.exists() else ""
    srv = start_server(ext_data, "--skip-install", "--my-flag", "y")
    try:
        assert requests.get(srv.url + "/my-ext/hello", timeout=10).json()["flag"] == "y"
    finally:
        srv.stop()
    assert (marker.read_text() if marker.exists() else "") == before
    srv = start_server(ext_data, "--disable-all-extensions", "--skip-install")
    try:
        assert requests.get(srv.url + "/my-ext/hello", timeout=10).status_code == 404
        assert "kaboom-7731" not in srv.output
    finally:
        srv.stop()


HOOKS_SCRIPT = """
import json, pathlib
from modules import script_callbacks

LOG = pathlib.Path(__file__).parent.parent / "events.jsonl"


def record(kind, **data):
    with open(LOG, "a") as f:
        f.write(json.dumps({"kind": kind, **data}) + "\\n")


def before_saved(params):
    params.pnginfo["my_ext"] = "was here"
    record("before_image_saved", filename=params.filename)


script_callbacks.on_model_loaded(lambda m: record("model_loaded", title=m.title))
script_callbacks.on_before_image_saved(before_saved)
script_callbacks.on_image_saved(lambda p: record("image_saved", filename=p.filename))
script_callbacks.on_cfg_denoiser(lambda p: record("cfg_denoiser", step=p.sampling_step, total=p.total_sampling_steps))
script_callbacks.on_cfg_denoised(lambda p: record("cfg_denoised", step=p.sampling_step))
script_callbacks.on_cfg_denoiser(lambda p: 1 / 0)  # a broken hook must not stop the job
"""


def test_generation_fires_model_loaded_image_saved_and_cfg_callbacks(tmp_path):
    import json

    from PIL import Image

    from tiny_models import make_checkpoint

    ckpt_dir = tmp_path / "models" / "Stable-diffusion"
    ckpt_dir.mkdir(parents=True)
    make_checkpoint(ckpt_dir / "tiny.safetensors", "sd1", seed=0)
    write(tmp_path / "extensions" / "hooks-ext" / "scripts" / "hooks.py", HOOKS_SCRIPT)
    srv = start_server(tmp_path, "--api", "--skip-load-model-at-start")
    try:
        r = requests.post(srv.url + "/sdapi/v1/txt2img", json={"prompt": "x", "width": 64, "height": 64, "steps": 2,
                                                               "save_images": True}, timeout=300)
        assert r.status_code == 200, r.text
    finally:
        srv.stop()
    events = [json.loads(line) for line in (tmp_path / "extensions" / "hooks-ext" / "events.jsonl").read_text().splitlines()]
    kinds = [e["kind"] for e in events]
    assert kinds[0] == "model_loaded" and "tiny" in events[0]["title"]
    assert [e["step"] for e in events if e["kind"] == "cfg_denoiser"] == [0, 1]
    assert kinds.count("cfg_denoised") == 2
    saved = [e["filename"] for e in events if e["kind"] == "image_saved"]
    assert len(saved) == 1 and Image.open(saved[0]).info["my_ext"] == "was here"
    assert "ZeroDivisionError" in srv.output and "hooks.py" in srv.output

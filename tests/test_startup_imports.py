"""The way to the first HTTP response must not import torch or diffusers (seconds each)."""
import subprocess
import sys

from conftest import ROOT

CHECK = """
import sys
data_dir = sys.argv[1]
import webui
from modules import cmd_args
parsed = cmd_args.parse_args(["--data-dir", data_dir], env={})
services, _ = webui.prepare(parsed)
found, callbacks = webui.load_extensions(["--data-dir", data_dir])  # the built-in scripts too
webui.attach_extensions(services, found, callbacks)
assert services.scripts.img2img.find("sd upscale") is not None
webui.create_app(services, callbacks=callbacks, extensions=found)  # builds the whole Gradio UI
heavy = sorted(m for m in ("torch", "diffusers", "transformers") if m in sys.modules)
print("HEAVY:", ",".join(heavy))
"""


def test_building_the_app_imports_no_torch_or_diffusers(tmp_path):
    result = subprocess.run([sys.executable, "-c", CHECK, str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                            timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "HEAVY: \n" in result.stdout, result.stdout

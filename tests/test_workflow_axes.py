"""VAE per job (override_settings sd_vae, Automatic beside the checkpoint, the X/Y/Z "VAE" axis swapping only
the VAE) and the X/Y/Z "Refiner checkpoint" / "Refiner switch at" axes, on tiny real-layout checkpoints."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from conftest import make_services
from modules.core.pipeline import Txt2ImgParams
from modules.extensions import scripts
from modules.models.hashes import file_sha256
from test_xyz_grid import SMALL, info, run_plot, xyz, xyz_args
from tiny_models import make_vae_file


@pytest.fixture(scope="module")
def svc(tmp_path_factory):
    services = make_services(tmp_path_factory.mktemp("axes"), {"tiny-a.safetensors": ("sd1", 0),
                                                                "tiny-b.safetensors": ("sd1", 1)})
    make_vae_file(services.paths.vae_dir / "other.vae.safetensors", "sd1", seed=7)
    make_vae_file(services.paths.ckpt_dir / "tiny-b.vae.safetensors", "sd1", seed=8)
    services.models.refresh()
    services.options.set("sd_checkpoints_limit", 2)
    services.scripts = scripts.ScriptRegistry.from_modules({xyz.__name__: xyz})
    services.loads = Counter()
    services.models.add_loaded_listener(lambda model: services.loads.update([model.path.name]))
    yield services
    services.generation.queue.shutdown()


def render(svc, **overrides):
    return svc.generation.txt2img(Txt2ImgParams(**SMALL), override_settings={"sd_model_checkpoint": "tiny-a",
                                                                             **overrides})


def pixels(image):
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def test_sd_vae_as_an_override_swaps_only_the_vae_and_the_infotext_names_it(svc):
    plain = render(svc)
    loads = dict(svc.loads)
    other = render(svc, sd_vae="other.vae.safetensors")
    assert dict(svc.loads) == loads                      # the checkpoint was not reloaded
    assert not np.array_equal(pixels(plain.images[0]), pixels(other.images[0]))
    text = info(other.infotexts[0])
    assert text["VAE"] == "other.vae"
    assert text["VAE hash"] == file_sha256(svc.paths.vae_dir / "other.vae.safetensors")[:10]
    assert "VAE hash" not in info(plain.infotexts[0]) and "VAE" not in info(plain.infotexts[0])
    again = render(svc)                                  # the next job has the checkpoint's own VAE back
    assert np.array_equal(pixels(plain.images[0]), pixels(again.images[0]))
    assert svc.options.sd_vae == "Automatic"             # the override did not stick


def test_automatic_picks_the_vae_beside_the_checkpoint(svc):
    result = svc.generation.txt2img(Txt2ImgParams(**SMALL), override_settings={"sd_model_checkpoint": "tiny-b"})
    text = info(result.infotexts[0])
    assert text["VAE"] == "tiny-b.vae"
    assert text["VAE hash"] == file_sha256(svc.paths.ckpt_dir / "tiny-b.vae.safetensors")[:10]


def test_the_vae_axis_swaps_the_vae_per_cell_without_reloading(svc):
    render(svc)
    loads = dict(svc.loads)
    processed = run_plot(svc, xyz_args("VAE", "None, other.vae.safetensors", include_lone_images=True),
                         **{"seed": 123})
    assert dict(svc.loads) == loads
    cells = processed.infotexts[1:]
    assert "VAE" not in info(cells[0]) and info(cells[1])["VAE"] == "other.vae"
    assert not np.array_equal(pixels(processed.images[1]), pixels(processed.images[2]))


def test_the_refiner_axes(svc):
    selected = svc.options.sd_model_checkpoint
    processed = run_plot(svc, xyz_args("Refiner checkpoint", "None, tiny-b", "Refiner switch at", "0.5, 1",
                                       include_lone_images=True), steps=2)
    cells = [info(t) for t in processed.infotexts[1:]]
    assert len(cells) == 4
    refiners = [c.get("Refiner", "").split(" [")[0] for c in cells]
    # (None, 0.5) (tiny-b, 0.5) (None, 1) (tiny-b, 1): at 1.0 the refiner never takes over
    assert refiners == ["", "tiny-b", "", ""]
    assert cells[1]["Refiner switch at"] == "0.5"
    assert not np.array_equal(pixels(processed.images[1]), pixels(processed.images[2]))
    assert np.array_equal(pixels(processed.images[3]), pixels(processed.images[4]))
    assert svc.options.sd_model_checkpoint == selected
    labels = [a.label for a in xyz.axes_for(False)]
    assert "Refiner checkpoint" in labels and "Refiner switch at" in labels and "VAE" in labels

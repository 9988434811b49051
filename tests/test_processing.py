"""The generation core end to end: tiny real-layout checkpoints -> services -> job queue -> saved PNGs."""
from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from modules.engine import sampler_catalog as samplers
from modules.core.flags import parse_args
from modules.core.infotext import parse_infotext
from modules.core.options import Options, default_templates
from modules.core.paths import AppPaths
from modules.core.pipeline import HiresParams, ProcessingError, Txt2ImgParams
from modules.services import build_services
from tiny_models import make_checkpoint

SMALL = dict(width=64, height=64, steps=3, cfg_scale=7.0)


def make_services(data_dir: Path, *families: str, extra_args: tuple[str, ...] = (), **checkpoint_kw):
    opts = parse_args(["--data-dir", str(data_dir), *extra_args], env={}).opts
    paths = AppPaths.from_opts(opts)
    paths.ensure_user_dirs()
    for family in families:
        make_checkpoint(paths.ckpt_dir / f"tiny-{family}.safetensors", family, yaml=family == "sd2-v", **checkpoint_kw)
    options = Options(paths.config_file, default_templates())
    options.load()
    return build_services(opts, paths, options)


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    services = make_services(tmp_path_factory.mktemp("sd1"), "sd1")
    yield services
    services.generation.queue.shutdown()


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def run(services, **kwargs):
    return services.generation.txt2img(Txt2ImgParams(**{**SMALL, **kwargs}))


def test_same_seed_is_bit_identical_and_another_seed_differs(sd1):
    a = run(sd1, prompt="a cat", seed=1234)
    b = run(sd1, prompt="a cat", seed=1234)
    c = run(sd1, prompt="a cat", seed=1235)
    assert a.images[0].size == (64, 64)
    assert np.array_equal(pixels(a.images[0]), pixels(b.images[0]))
    assert not np.array_equal(pixels(a.images[0]), pixels(c.images[0]))


def test_random_seed_is_resolved_and_reported(sd1):
    result = run(sd1, prompt="a cat", seed=-1)
    assert 0 <= result.seed < 2**32 and result.all_seeds == [result.seed]
    assert f"Seed: {result.seed}," in result.infotexts[0]


def test_batch_of_2x2_has_consecutive_seeds_saved_files_and_a_grid(sd1):
    result = run(sd1, prompt="a cat", seed=500, batch_size=2, n_iter=2)
    assert result.all_seeds == [500, 501, 502, 503]
    assert result.index_of_first_image == 1 and len(result.images) == 5  # grid first, as A1111 shows it
    assert result.images[0].size == (128, 128)
    names = [Path(p).name for p in result.saved_paths]
    assert [n.split("-", 1)[1] for n in names] == ["500.png", "501.png", "502.png", "503.png"]
    numbers = [int(n.split("-")[0]) for n in names]
    assert numbers == list(range(numbers[0], numbers[0] + 4))
    day_dir = Path(result.saved_paths[0]).parent
    assert day_dir.parent.name == "txt2img-images"
    grids = list((day_dir.parent.parent / "txt2img-grids").rglob("grid-*.png"))
    assert grids, "the grid was not saved"
    js = result.js()
    assert js["all_seeds"] == [500, 501, 502, 503] and js["sd_model_hash"] == result.sd_model_hash


def test_saved_png_infotext_parses_back_to_the_parameters(sd1):
    ckpt = sd1.models.registry.list()[0]
    result = run(sd1, prompt="a photo of a cat, (masterpiece:1.2)", negative_prompt="blurry, lowres",
                 seed=42, sampler_name="Euler a", scheduler="Karras", cfg_scale=6.5)
    saved = Image.open(result.saved_paths[0])
    text = saved.info["parameters"]
    assert text == result.infotexts[0]
    parsed = parse_infotext(text)
    assert parsed["Prompt"] == "a photo of a cat, (masterpiece:1.2)"
    assert parsed["Negative prompt"] == "blurry, lowres"
    assert str(parsed["Steps"]) == "3" and parsed["Sampler"] == "Euler a" and parsed["Schedule type"] == "Karras"
    assert str(parsed["CFG scale"]) == "6.5" and str(parsed["Seed"]) == "42"
    assert str(parsed["Size-1"]) == "64" and str(parsed["Size-2"]) == "64"
    expected_hash = hashlib.sha256(Path(ckpt.filename).read_bytes()).hexdigest()[:10]
    assert parsed["Model hash"] == expected_hash and parsed["Model"] == "tiny-sd1"
    assert text.rstrip().split(", ")[-1].startswith("Version: ")


@pytest.mark.parametrize("sampler", samplers.sampler_names())
def test_every_sampler_runs(sd1, sampler):
    result = run(sd1, prompt="a cat", seed=7, sampler_name=sampler, steps=4)
    arr = pixels(result.images[0])
    assert arr.shape == (64, 64, 3) and arr.std() > 0
    assert f"Sampler: {sampler}," in result.infotexts[0]


def test_prompt_weights_and_editing_change_the_image(sd1):
    base = pixels(run(sd1, prompt="a cat", seed=9).images[0])
    weighted = pixels(run(sd1, prompt="a (cat:1.6)", seed=9).images[0])
    edited = pixels(run(sd1, prompt="a [cat:dog:0.5]", seed=9).images[0])
    dog = pixels(run(sd1, prompt="a dog", seed=9).images[0])
    assert not np.array_equal(base, weighted)
    assert not np.array_equal(edited, base) and not np.array_equal(edited, dog)


def test_prompt_over_75_tokens_uses_every_token(sd1):
    words = ", ".join(f"word{i}" for i in range(60))  # about 180 tokens: three chunks
    long = pixels(run(sd1, prompt=words + ", red", seed=11).images[0])
    other_tail = pixels(run(sd1, prompt=words + ", blue", seed=11).images[0])
    assert not np.array_equal(long, other_tail), "tokens past 75 were dropped"
    assert sd1.generation.count_tokens(words + ", red")[1] >= 150


def test_hires_fix_renders_at_the_target_size_and_records_it(sd1):
    latent = run(sd1, prompt="a cat", seed=3, hires=HiresParams(enabled=True, scale=1.5, upscaler="Latent", steps=2))
    assert latent.images[0].size == (96, 96)
    assert "Hires upscale: 1.5" in latent.infotexts[0] and "Denoising strength: 0.7" in latent.infotexts[0]
    lanczos = run(sd1, prompt="a cat", seed=3, hires=HiresParams(enabled=True, resize_x=128, resize_y=96,
                                                                  upscaler="Lanczos", steps=2))
    assert lanczos.images[0].size == (128, 96)
    assert "Hires resize: 128x96" in lanczos.infotexts[0]


def test_variation_seed_moves_the_image_by_its_strength(sd1):
    plain = pixels(run(sd1, prompt="a cat", seed=20).images[0])
    zero = pixels(run(sd1, prompt="a cat", seed=20, subseed=99, subseed_strength=0.0).images[0])
    varied = run(sd1, prompt="a cat", seed=20, subseed=99, subseed_strength=0.5)
    assert np.array_equal(plain, zero)
    assert not np.array_equal(plain, pixels(varied.images[0]))
    assert "Variation seed: 99, Variation seed strength: 0.5" in varied.infotexts[0]


def test_interrupt_returns_what_is_done_and_the_queue_keeps_working(sd1):
    generation = sd1.generation
    started = threading.Event()
    original = generation.state.set_step

    def set_step(step, total):
        original(step, total)
        started.set()

    generation.state.set_step = set_step
    try:
        job = generation.submit_txt2img(Txt2ImgParams(prompt="a cat", seed=1, width=64, height=64, steps=40, n_iter=5))
        assert started.wait(120)
        generation.state.interrupt()
        result = job.result(timeout=300)
    finally:
        generation.state.set_step = original
    assert result.interrupted and len(result.images) < 5
    assert len(run(sd1, prompt="a dog", seed=2).images) == 1


def test_bad_parameters_are_clear_errors_before_queueing(sd1):
    with pytest.raises(ProcessingError, match="multiple of 8"):
        sd1.generation.submit_txt2img(Txt2ImgParams(prompt="x", width=100, height=64))
    with pytest.raises(ValueError, match="Euler"):
        sd1.generation.submit_txt2img(Txt2ImgParams(prompt="x", sampler_name="Nonexistent sampler"))


def test_no_checkpoint_gives_a_message_naming_the_folder(tmp_path):
    services = make_services(tmp_path)
    try:
        with pytest.raises(Exception, match="Stable-diffusion"):
            services.generation.txt2img(Txt2ImgParams(prompt="x", **{k: v for k, v in SMALL.items()}))
    finally:
        services.generation.queue.shutdown()


@pytest.mark.parametrize("family", ["sd1-inpaint", "sd2", "sd2-v", "sdxl", "sdxl-refiner", "sdxl-inpaint"])
def test_each_family_renders_two_steps_through_processing(tmp_path, family):
    services = make_services(tmp_path, family)
    try:
        result = services.generation.txt2img(Txt2ImgParams(prompt="a cat", negative_prompt="dog", seed=5,
                                                           width=64, height=64, steps=2))
        assert result.images[0].size == (64, 64)
        assert pixels(result.images[0]).std() > 0
        model = services.models.loaded_model
        assert model.spec.family == family
    finally:
        services.generation.queue.shutdown()


def test_sdxl_with_a_non_standard_time_embedding_renders_through_processing(tmp_path):
    """The time ids are embedded at the width the weights have (8 here, 256 in real SDXL)."""
    services = make_services(tmp_path, "sdxl", addition_time_embed_dim=8)
    try:
        result = services.generation.txt2img(Txt2ImgParams(prompt="a cat", seed=5, width=64, height=64, steps=2))
        assert result.images[0].size == (64, 64) and pixels(result.images[0]).std() > 0
        assert services.models.loaded_model.pipe.unet.config.addition_time_embed_dim == 8
    finally:
        services.generation.queue.shutdown()


def test_a_depth_checkpoint_gives_a_clear_message_instead_of_a_shape_error(tmp_path):
    services = make_services(tmp_path, "sd2-depth")
    try:
        with pytest.raises(ProcessingError, match="depth map"):
            services.generation.txt2img(Txt2ImgParams(prompt="a cat", width=64, height=64, steps=2))
        assert services.models.loaded_model.spec.family == "sd2-depth"  # it did load
    finally:
        services.generation.queue.shutdown()
